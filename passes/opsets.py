"""Opset imports: drop those no node uses, and read opsets newer than the installed onnx knows.

Tools such as onnxruntime's quantization pre-processing declare domains the graph never uses
(ai.onnx.ml at opset 5, com.microsoft, ai.onnx.training). DeepSparse 1.8 refuses a model that imports
ai.onnx.ml past opset 3 even when no node of it is present; without the unused imports the same graph
compiles. The computation is unchanged, and the file written is the one measured.

Today's exporters write opset 20 and later (torch.onnx.export's default exporter: opset 20, IR version
10), which the onnx that DeepSparse 1.8 pins (1.14, opsets up to 19) cannot check. Most ops did not
change after 19 but for the element types they accept; a model made of those computes the same as
opset 19, and is read as such (`as_known_opset`). Gelu, new in opset 20, is written in the ops torch's
opset-13 export uses for it. A model with an op that did change is one clear error that names it.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx

from spdy_onnx.errors import SpdyError
from spdy_onnx.graph import _subgraph_nodes

log = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")


def all_nodes(model: onnx.ModelProto):
    """(where, node) for every node: the main graph (where ""), control-flow subgraphs, local functions
    (their bodies' own subgraphs are not walked: no exporter writes them)."""
    for node in model.graph.node:
        yield "", node
    for name, node, _ in _subgraph_nodes(model.graph, ""):
        yield name, node
    for f in model.functions:
        for node in f.node:
            yield f"function {f.name}", node


def used_domains(model: onnx.ModelProto) -> set[str]:
    """Domains of every node, in the main graph, in control-flow subgraphs and in local functions."""
    return {n.domain for _, n in all_nodes(model)} | {f.domain for f in model.functions}


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


# How each standard op changed after opset 17, from onnx 1.23's schemas (benchmarks/opset_changes.py
# prints this): (opset, "types") = only the element types it accepts changed; "changed" = attributes,
# inputs or outputs did; "new" = no version before
KNOWN_OPSET = 19     # the newest opset the installed onnx (1.14, DeepSparse 1.8's pin) knows
OLDEST_TABLED_OPSET = 17
NEWEST_TABLED_OPSET = 28
OPS_AFTER_17 = {
    'Acos': [(22, 'types')],
    'Acosh': [(22, 'types')],
    'AffineGrid': [(20, 'new')],
    'Asin': [(22, 'types')],
    'Asinh': [(22, 'types')],
    'Atan': [(22, 'types')],
    'Atanh': [(22, 'types')],
    'Attention': [(23, 'new'), (24, 'changed'), (25, 'changed')],
    'AveragePool': [(19, 'changed'), (22, 'types')],
    'Bernoulli': [(22, 'types')],
    'BitCast': [(26, 'new')],
    'BitShift': [(28, 'types')],
    'BitwiseAnd': [(18, 'new')],
    'BitwiseNot': [(18, 'new')],
    'BitwiseOr': [(18, 'new')],
    'BitwiseXor': [(18, 'new')],
    'Cast': [(19, 'changed'), (21, 'types'), (23, 'types'), (24, 'changed'), (25, 'types'), (28, 'types')],
    'CastLike': [(19, 'changed'), (21, 'types'), (23, 'types'), (24, 'changed'), (25, 'types')],
    'CausalConvWithState': [(27, 'new')],
    'Celu': [(28, 'types')],
    'CenterCropPad': [(18, 'new')],
    'Col2Im': [(18, 'new')],
    'Compress': [(28, 'types')],
    'Constant': [(19, 'types'), (21, 'types'), (23, 'types'), (24, 'types'), (25, 'types')],
    'ConstantOfShape': [(20, 'types'), (21, 'types'), (23, 'types'), (24, 'types'), (25, 'types')],
    'Conv': [(22, 'types')],
    'ConvTranspose': [(22, 'types')],
    'Cos': [(22, 'types')],
    'Cosh': [(22, 'types')],
    'CumProd': [(26, 'new')],
    'DFT': [(20, 'changed')],
    'DeformConv': [(19, 'new'), (22, 'types')],
    'DepthToSpace': [(28, 'types')],
    'DequantizeLinear': [(19, 'types'), (21, 'changed'), (23, 'changed'), (24, 'types'), (25, 'types'), (28, 'types')],
    'Det': [(22, 'types')],
    'Dropout': [(22, 'types')],
    'Einsum': [(28, 'types')],
    'Elu': [(22, 'types')],
    'Equal': [(19, 'types')],
    'EyeLike': [(22, 'types')],
    'Flatten': [(21, 'types'), (23, 'types'), (24, 'types'), (25, 'types')],
    'GRU': [(22, 'types')],
    'Gelu': [(20, 'new')],
    'GlobalAveragePool': [(22, 'types')],
    'GlobalLpPool': [(22, 'types')],
    'GlobalMaxPool': [(22, 'types')],
    'GridSample': [(20, 'changed'), (22, 'types')],
    'GroupNormalization': [(18, 'new'), (21, 'changed')],
    'HardSigmoid': [(22, 'types')],
    'HardSwish': [(22, 'types')],
    'Identity': [(19, 'types'), (21, 'types'), (23, 'types'), (24, 'types'), (25, 'types')],
    'If': [(19, 'types'), (21, 'types'), (23, 'types'), (24, 'types'), (25, 'types')],
    'ImageDecoder': [(20, 'new')],
    'InstanceNormalization': [(22, 'types')],
    'IsInf': [(20, 'types')],
    'IsNaN': [(20, 'types')],
    'LSTM': [(22, 'types')],
    'LinearAttention': [(27, 'new')],
    'Loop': [(19, 'types'), (21, 'types'), (23, 'types'), (24, 'types'), (25, 'types')],
    'LpNormalization': [(22, 'types')],
    'LpPool': [(18, 'changed'), (22, 'types')],
    'MaxPool': [(22, 'types')],
    'MaxRoiPool': [(22, 'types')],
    'MaxUnpool': [(22, 'types')],
    'Mish': [(18, 'new'), (22, 'types')],
    'Mod': [(28, 'types')],
    'Multinomial': [(22, 'types')],
    'NegativeLogLikelihoodLoss': [(22, 'types')],
    'OneHot': [(28, 'types')],
    'Optional': [(28, 'types')],
    'OptionalGetElement': [(18, 'types'), (28, 'types')],
    'OptionalHasElement': [(18, 'changed'), (28, 'types')],
    'Pad': [(18, 'changed'), (19, 'types'), (21, 'types'), (23, 'types'), (24, 'types'), (25, 'types')],
    'QLinearMatMul': [(21, 'types')],
    'QuantizeLinear': [(19, 'changed'), (21, 'changed'), (23, 'changed'), (24, 'types'), (25, 'types'), (28, 'types')],
    'RMSNormalization': [(23, 'new')],
    'RNN': [(22, 'types')],
    'RandomNormal': [(22, 'types')],
    'RandomNormalLike': [(22, 'types')],
    'RandomUniform': [(22, 'types')],
    'RandomUniformLike': [(22, 'types')],
    'Range': [(27, 'changed')],
    'ReduceL1': [(18, 'changed')],
    'ReduceL2': [(18, 'changed')],
    'ReduceLogSum': [(18, 'changed'), (28, 'types')],
    'ReduceLogSumExp': [(18, 'changed'), (28, 'types')],
    'ReduceMax': [(18, 'changed'), (20, 'types')],
    'ReduceMean': [(18, 'changed')],
    'ReduceMin': [(18, 'changed'), (20, 'types')],
    'ReduceProd': [(18, 'changed')],
    'ReduceSumSquare': [(18, 'changed')],
    'RegexFullMatch': [(20, 'new')],
    'Reshape': [(19, 'types'), (21, 'types'), (23, 'types'), (24, 'types'), (25, 'types')],
    'Resize': [(18, 'changed'), (19, 'types')],
    'ReverseSequence': [(28, 'types')],
    'RoiAlign': [(22, 'types')],
    'RotaryEmbedding': [(23, 'new')],
    'Round': [(22, 'types')],
    'Scan': [(19, 'types'), (21, 'types'), (23, 'types'), (24, 'types'), (25, 'types')],
    'ScatterElements': [(18, 'types')],
    'ScatterND': [(18, 'types')],
    'Selu': [(22, 'types')],
    'Shape': [(19, 'types'), (21, 'types'), (23, 'types'), (24, 'types'), (25, 'types')],
    'Sin': [(22, 'types')],
    'Sinh': [(22, 'types')],
    'Size': [(19, 'types'), (21, 'types'), (23, 'types'), (24, 'types'), (25, 'types')],
    'Softplus': [(22, 'types')],
    'Softsign': [(22, 'types')],
    'SpaceToDepth': [(28, 'changed')],
    'Split': [(18, 'changed')],
    'SplitToSequence': [(24, 'types')],
    'Squeeze': [(21, 'types'), (23, 'types'), (24, 'types'), (25, 'types')],
    'StringConcat': [(20, 'new')],
    'StringSplit': [(20, 'new')],
    'SwiGLU': [(28, 'new')],
    'Swish': [(24, 'new')],
    'Tan': [(22, 'types')],
    'TensorScatter': [(24, 'new')],
    'ThresholdedRelu': [(22, 'types')],
    'TopK': [(24, 'types')],
    'Transpose': [(21, 'types'), (23, 'types'), (24, 'types'), (25, 'types')],
    'Unique': [(28, 'types')],
    'Unsqueeze': [(21, 'types'), (23, 'types'), (24, 'types'), (25, 'types')],
}

_FLOAT8 = {17, 18, 19, 20}


def _attr(node: onnx.NodeProto, name: str):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


# (op, opset): the condition under which a node computes the same as at the opset before. "changed"
# versions whose change is an attribute a node may leave out, and "types" versions that also added
# an attribute value (the signature comparison cannot see those)
SAME_AS_BEFORE = {
    ("Cast", 19): lambda n: _attr(n, "saturate") is None and _attr(n, "to") not in _FLOAT8,   # float8 only
    ("CastLike", 19): lambda n: _attr(n, "saturate") is None,
    ("Cast", 24): lambda n: _attr(n, "round_mode") is None,                                 # float8e8m0 only
    ("CastLike", 24): lambda n: _attr(n, "round_mode") is None,
    ("AveragePool", 19): lambda n: all(d == 1 for d in (_attr(n, "dilations") or [])),
    ("Pad", 19): lambda n: (_attr(n, "mode") or b"constant") != b"wrap",
    ("Resize", 19): lambda n: (_attr(n, "coordinate_transformation_mode") or b"") != b"half_pixel_symmetric",
    # opset 18 moved the reductions' axes to an input and gave Split its number of outputs; a node in
    # the opset-17 form (what _opset_17_forms writes) is the same; the rest added attributes or values
    **{(op, 18): (lambda n: len(n.input) < 2 and not _attr(n, "noop_with_empty_axes"))
       for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                  "ReduceMin", "ReduceProd", "ReduceSumSquare")},
    ("Split", 18): lambda n: _attr(n, "num_outputs") is None,
    ("Pad", 18): lambda n: len(n.input) < 4 or not n.input[3],
    ("Resize", 18): lambda n: not _attr(n, "antialias") and _attr(n, "axes") is None
    and (_attr(n, "keep_aspect_ratio_policy") or b"stretch") == b"stretch",
    ("LpPool", 18): lambda n: not _attr(n, "ceil_mode"),
    ("ScatterElements", 18): lambda n: (_attr(n, "reduction") or b"none") not in (b"max", b"min"),
    ("ScatterND", 18): lambda n: (_attr(n, "reduction") or b"none") not in (b"max", b"min"),
}

_REDUCTIONS_18 = {op for op, v in SAME_AS_BEFORE if v == 18 and op.startswith("Reduce")}


def _opset_17_forms(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` (opset 18 or later) whose main-graph reductions take constant axes as an
    attribute and whose Splits take their sizes as an input, as at opset 17; nodes that cannot be
    written so (axes computed at run time, a split axis of unknown length) are left as they are.

    Why: DeepSparse 1.8 runs none of a graph natively when its reductions take axes as an input
    (transformers' ResNet from torch's default exporter: 0% of its ops at opset 18, 96% at 17)."""
    from onnx import numpy_helper
    inits = {t.name: t for t in model.graph.initializer}
    todo = [n for n in model.graph.node if n.domain in DEFAULT_DOMAINS and (
        (n.op_type in _REDUCTIONS_18 and (len(n.input) > 1 or _attr(n, "noop_with_empty_axes") is not None))
        or (n.op_type == "Split" and _attr(n, "num_outputs") is not None))]
    if not todo:
        return model
    lengths: dict[str, list] = {}
    if any(n.op_type == "Split" for n in todo):
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
        except Exception:  # noqa: BLE001 - no lengths: the Splits stay as they are
            inferred = onnx.GraphProto()
        for v in list(inferred.input) + list(inferred.value_info) + list(inferred.output):
            lengths[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        for t in model.graph.initializer:
            lengths[t.name] = list(t.dims)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    names = {t.name for t in out.graph.initializer} | {o for n in out.graph.node for o in n.output}
    for node in out.graph.node:
        if node.domain not in DEFAULT_DOMAINS:
            continue
        if node.op_type in _REDUCTIONS_18:
            noop = bool(_attr(node, "noop_with_empty_axes"))
            axes_name = node.input[1] if len(node.input) > 1 else ""
            if axes_name and axes_name not in inits:
                continue   # axes computed at run time
            axes = numpy_helper.to_array(inits[axes_name]).astype(int).ravel().tolist() if axes_name else []
            if noop and not axes:
                continue   # the input, or its squares, logs...: the spec and onnxruntime differ, left as is
            kept = [a for a in node.attribute if a.name != "noop_with_empty_axes"]
            del node.attribute[:]
            node.attribute.extend(kept)
            del node.input[1:]
            if axes:
                node.attribute.append(onnx.helper.make_attribute("axes", axes))
        elif node.op_type == "Split":
            parts = int(_attr(node, "num_outputs"))
            shape = lengths.get(node.input[0]) or []
            axis = int(_attr(node, "axis") or 0)
            size = shape[axis] if -len(shape) <= axis < len(shape) else None
            if not size or len(node.input) > 1 and node.input[1]:
                continue
            step = -(-size // parts)   # Split-18: equal parts, the last one smaller
            sizes = [step] * (size // step) + ([size % step] if size % step else [])
            name = f"{node.name or node.output[0]}/split_sizes"
            while name in names:
                name += "_"
            names.add(name)
            out.graph.initializer.append(numpy_helper.from_array(np.array(sizes, dtype=np.int64), name))
            kept = [a for a in node.attribute if a.name != "num_outputs"]
            del node.attribute[:]
            node.attribute.extend(kept)
            del node.input[1:]
            node.input.append(name)
    return out

# new ops written in older ones as the model is read (passes/decompose.py)
REWRITTEN_NEW_OPS = ("Gelu",)


def opset_blockers(model: onnx.ModelProto, opset: int, target: int) -> dict[str, str]:
    """{op: why} for the default-domain nodes of `model` (at `opset`) that would not compute at `target`
    what they compute now; in the main graph, ops in REWRITTEN_NEW_OPS do not count."""
    blockers = {}
    for where, node in all_nodes(model):
        if node.domain not in DEFAULT_DOMAINS:
            continue
        for version, kind in OPS_AFTER_17.get(node.op_type, []):
            if not target < version <= opset:
                continue
            same = SAME_AS_BEFORE.get((node.op_type, version))
            if same is not None:
                if same(node):
                    continue
            elif kind == "types" or (kind == "new" and node.op_type in REWRITTEN_NEW_OPS and not where):
                continue
            blockers.setdefault(node.op_type, f"new in opset {version}" if kind == "new"
                                else f"changed in opset {version}")
    return blockers


def as_opset(model: onnx.ModelProto, target: int, name: str = "the model", *,
             reader: str = f"the installed onnx {onnx.__version__} (DeepSparse 1.8's pin)") -> onnx.ModelProto:
    """`model` (default-domain opset past `target`) as opset `target`, when that computes the same;
    Gelu written in older ops. Raises SpdyError naming the ops that would change, or when the model's
    opset is past what the table knows. `reader` names what needs the older opset, for the messages."""
    from spdy_onnx.passes.decompose import decompose_gelu

    opset = max(int(e.version) for e in model.opset_import if e.domain in ("", "ai.onnx"))
    if opset <= target:
        return model
    advice = (f"re-export it with opset {target} or older, e.g. torch.onnx.export(..., opset_version={min(target, 17)}), "
              "or with torch's older exporter (dynamo=False)")
    if opset > NEWEST_TABLED_OPSET or target < OLDEST_TABLED_OPSET:
        raise SpdyError(f"{name} uses opset {opset}; {reader} reads opsets up to {target}, and opsets past "
                        f"{NEWEST_TABLED_OPSET} are not known here: {advice}")
    if target < 18 <= opset:
        model = _opset_17_forms(model)
    blockers = opset_blockers(model, opset, target)
    if blockers:
        listed = ", ".join(f"{op} ({why})" for op, why in sorted(blockers.items()))
        raise SpdyError(f"{name} uses opset {opset}; {reader} reads opsets up to {target}, and these ops of the "
                        f"model do not compute the same there: {listed}; {advice}")
    model, rewritten = decompose_gelu(model)
    gelu_left = [n for n in model.graph.node if n.op_type == "Gelu" and n.domain in ("", "ai.onnx")]
    if gelu_left:
        raise SpdyError(f"{name} uses opset {opset} and its Gelu node '{gelu_left[0].name}' has an input whose "
                        f"element type is not recorded in the graph, so it cannot be written in opset {target}'s ops; "
                        f"{advice}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for entry in list(out.opset_import) + [e for f in out.functions for e in f.opset_import]:
        if entry.domain in ("", "ai.onnx") and entry.version > target:
            entry.version = target
    log.warning("%s uses opset %d; every op it uses computes the same at opset %d%s: read, and written, as opset "
                "%d, which %s reads", name, opset, target,
                f" ({rewritten} Gelu node(s) written as Erf or Tanh and arithmetic)" if rewritten else "",
                target, reader)
    return out


def as_known_opset(model: onnx.ModelProto, name: str = "the model") -> onnx.ModelProto:
    """`model` at the newest opset the installed onnx knows (see as_opset)."""
    return as_opset(model, min(KNOWN_OPSET, onnx.defs.onnx_opset_version()), name)
