"""Print, from a newer onnx's operator schemas, how each standard op changed after opset 17.

Why: DeepSparse 1.8 pins onnx < 1.15, which knows opsets up to 19, and loads opset 18 at most, while
today's exporters write 20 and later (torch.onnx.export's default exporter: opset 20). An op none of
whose versions after opset N changed more than the element types it accepts computes the same at
opset N, so a model made of such ops can be read as opset N (passes/opsets.py holds the table this
prints, and the few conditions under which a "changed" op still computes the same). The script compares each
schema with the version before it: the same attributes (names, types, defaults), inputs and outputs
and arities is "types" (only the type constraints differ); anything else is "changed"; no earlier
schema is "new". Run it with onnx >= 1.23 in a separate environment (the project's own onnx is the
old one):

    python -m venv /tmp/newonnx && /tmp/newonnx/bin/pip install onnx
    /tmp/newonnx/bin/python benchmarks/opset_changes.py > table.txt
"""
from __future__ import annotations

import onnx
import onnx.defs as defs

BASE = 17   # the oldest opset a model is ever read as (DeepSparse 1.8 loads up to 18)


def signature(schema) -> tuple:
    attrs = sorted((name, int(a.type), bool(a.required),
                    a.default_value.SerializeToString() if a.default_value is not None else b"")
                   for name, a in schema.attributes.items())
    inputs = [(i.name, int(i.option)) for i in schema.inputs]
    outputs = [(o.name, int(o.option)) for o in schema.outputs]
    return attrs, inputs, outputs, schema.min_input, schema.max_input, schema.min_output, schema.max_output


def main() -> None:
    changes: dict[str, list[tuple[int, str]]] = {}
    for schema in defs.get_all_schemas_with_history():
        if schema.domain not in ("", "ai.onnx") or schema.since_version <= BASE:
            continue
        try:
            before = defs.get_schema(schema.name, schema.since_version - 1, "")
        except Exception:  # noqa: BLE001 - no earlier version: a new op
            before = None
        kind = "new" if before is None else ("types" if signature(before) == signature(schema) else "changed")
        changes.setdefault(schema.name, []).append((schema.since_version, kind))
    print(f"# onnx {onnx.__version__}, opsets {BASE + 1}-{defs.onnx_opset_version()}")
    print(f"NEWEST_TABLED_OPSET = {defs.onnx_opset_version()}")
    print(f"OPS_AFTER_{BASE} = {{")
    for name in sorted(changes):
        print(f"    {name!r}: {sorted(changes[name])},")
    print("}")


if __name__ == "__main__":
    main()
