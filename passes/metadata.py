"""Record what was done to a model in its metadata_props, where deployment tools can read it."""
from __future__ import annotations

import json

import onnx

KEY = "spdy_onnx"


def set_metadata(model: onnx.ModelProto, info: dict) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [p for p in out.metadata_props if p.key != KEY]
    del out.metadata_props[:]
    out.metadata_props.extend(kept)
    entry = out.metadata_props.add()
    entry.key = KEY
    entry.value = json.dumps(info, sort_keys=True)
    return out


def get_metadata(model: onnx.ModelProto) -> dict | None:
    for p in model.metadata_props:
        if p.key == KEY:
            return json.loads(p.value)
    return None
