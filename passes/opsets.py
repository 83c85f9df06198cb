"""Drop opset imports that no node uses.

Tools such as onnxruntime's quantization pre-processing declare domains the graph never uses
(ai.onnx.ml at opset 5, com.microsoft, ai.onnx.training). DeepSparse 1.8 refuses a model that imports
ai.onnx.ml past opset 3 even when no node of it is present; without the unused imports the same graph
compiles. The computation is unchanged, and the file written is the one measured.
"""
from __future__ import annotations

import onnx

from spdy_onnx.graph import _subgraph_nodes

DEFAULT_DOMAINS = ("", "ai.onnx")


def used_domains(model: onnx.ModelProto) -> set[str]:
    """Domains of every node, in the main graph, in control-flow subgraphs and in local functions."""
    nodes = list(model.graph.node) + [n for _, n, _ in _subgraph_nodes(model.graph, "")]
    for f in model.functions:
        nodes.extend(f.node)
    return {n.domain for n in nodes} | {f.domain for f in model.functions}


def drop_unused_opset_imports(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy without the opset imports of domains no node uses, and those domains (empty: `model` itself)."""
    used = used_domains(model)
    unused = [e.domain for e in model.opset_import if e.domain not in DEFAULT_DOMAINS and e.domain not in used]
    if not unused:
        return model, []
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [e for e in out.opset_import if e.domain not in unused]
    del out.opset_import[:]
    out.opset_import.extend(kept)
    return out, unused
