"""Rewrite ops DeepSparse 1.8 does not run natively into the primitive ops older exporters emit:
LayerNormalization (opset 17+), HardSwish (opset 14+) and HardSigmoid.

DeepSparse 1.8 does not run LayerNormalization natively: it hands the op to onnxruntime, which cuts the
graph into pieces at every normalisation, and a sparse model gains less (MiniLM-L6
exported at opset 17, 80% magnitude, batch 1, 1 core: 1.79x over dense with the ops, 1.91x
rewritten; benchmarks/results/layernorm_opset17_minilm.txt). The same computation written as
ReduceMean, Sub, Pow, Add, Sqrt, Div, Mul and Add, which is what torch's exporter writes at opset 13,
runs natively. The rewrite is exact up to float rounding, and the file written is the rewritten one,
so the graph deployed is the graph measured.

HardSwish is worse: with one in the graph DeepSparse runs none of the ops itself (conv, HardSwish, conv
at opset 14: 0% native). HardSigmoid, which torch's opset-13 export writes for it (x * HardSigmoid(x)),
is not native either (75% of that graph). Written as Mul, Add and Clip, both run natively (100%;
tests/test_graph_and_passes.py).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from spdy_onnx.modelio import default_opset

_DTYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
           onnx.TensorProto.DOUBLE: np.float64}


def _types_and_ranks(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, int]]:
    """Element type and rank of every tensor whose type is known (inputs, initializers, inferred values)."""
    types = {t.name: t.data_type for t in model.graph.initializer}
    ranks = {t.name: len(t.dims) for t in model.graph.initializer}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False).graph
    except Exception:  # a model shape inference cannot read: rely on the declared types
        inferred = model.graph
    for v in list(inferred.input) + list(inferred.value_info) + list(inferred.output):
        tensor = v.type.tensor_type
        if tensor.elem_type:
            types.setdefault(v.name, tensor.elem_type)
        if tensor.HasField("shape"):
            ranks.setdefault(v.name, len(tensor.shape.dim))
    return types, ranks


def _fresh_names(model: onnx.ModelProto):
    """A function that returns a tensor or node name not yet used in `model` (nor returned before)."""
    taken = {t.name for t in model.graph.initializer} | {i for n in model.graph.node for i in list(n.input) + list(n.output)}
    taken |= {v.name for v in list(model.graph.input) + list(model.graph.output)}

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name
    return fresh


def _clip_01(node_input: str, output: str, name: str, opset: int, fresh, inits: list) -> onnx.NodeProto:
    """Clip(node_input, 0, 1): bounds as inputs from opset 11, as attributes before."""
    if opset < 11:
        return helper.make_node("Clip", [node_input], [output], name=name, min=0.0, max=1.0)
    lo, hi = fresh(f"{name}/zero"), fresh(f"{name}/one")
    inits += [numpy_helper.from_array(np.array(0.0, dtype=np.float32), lo),
              numpy_helper.from_array(np.array(1.0, dtype=np.float32), hi)]
    return helper.make_node("Clip", [node_input, lo, hi], [output], name=name)


def decompose_hard_activations(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """A copy of `model` with every float32 HardSwish and HardSigmoid in the main graph written as Mul,
    Add and Clip (HardSwish(x) = x * Clip(x / 6 + 1/2, 0, 1); HardSigmoid(x) = Clip(alpha x + beta, 0, 1)),
    and how many of each were rewritten. Nodes whose input rank is unknown are left alone.

    The constants are shaped [1] * rank of the input: DeepSparse 1.8 folds a Mul and an Add that follow a
    Conv into the conv's bias, and with rank-0 constants its compiler then fails ("Bias width does not
    match the number of output channels")."""
    ops = ("HardSwish", "HardSigmoid")
    if not any(n.op_type in ops and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return model, {}
    opset = default_opset(model)
    types, ranks = _types_and_ranks(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    fresh = _fresh_names(out)
    nodes, inits, counts = [], [], {}
    for node in out.graph.node:
        x = node.input[0] if node.input else ""
        if not (node.op_type in ops and node.domain in ("", "ai.onnx")) or x not in ranks \
                or types.get(x) != onnx.TensorProto.FLOAT:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "HardSwish":
            alpha, beta = 1.0 / 6.0, 0.5
        else:
            alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
        base = node.name or node.output[0]
        shape = [1] * ranks[x]
        k, q = fresh(f"{base}/alpha"), fresh(f"{base}/beta")
        inits += [numpy_helper.from_array(np.full(shape, alpha, dtype=np.float32), k),
                  numpy_helper.from_array(np.full(shape, beta, dtype=np.float32), q)]
        scaled, shifted = fresh(f"{base}/scaled"), fresh(f"{base}/shifted")
        gate = fresh(f"{base}/gate") if node.op_type == "HardSwish" else node.output[0]
        nodes += [helper.make_node("Mul", [x, k], [scaled], name=fresh(f"{base}/mul_alpha")),
                  helper.make_node("Add", [scaled, q], [shifted], name=fresh(f"{base}/add_beta")),
                  _clip_01(shifted, gate, fresh(f"{base}/clip"), opset, fresh, inits)]
        if node.op_type == "HardSwish":
            nodes.append(helper.make_node("Mul", [x, gate], [node.output[0]], name=fresh(f"{base}/mul")))
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    if not counts:
        return model, {}
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(inits)
    return out, counts


def decompose_layernorm(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of `model` with every rewritable LayerNormalization in the main graph written as
    primitive ops, and how many were rewritten. Nodes whose statistics outputs (Mean, InvStdDev) are
    used, whose normalised axes cannot be told, or whose element type is not a float are left alone."""
    lns = [n for n in model.graph.node if n.op_type == "LayerNormalization" and n.domain in ("", "ai.onnx")]
    if not lns:
        return model, 0
    opset = default_opset(model)
    types, ranks = _types_and_ranks(model)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    fresh = _fresh_names(out)

    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in out.graph.node:
        if not (node.op_type == "LayerNormalization" and node.domain in ("", "ai.onnx")):
            nodes.append(node)
            continue
        x = node.input[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axis = int(attrs.get("axis", -1))
        eps = float(attrs.get("epsilon", 1e-5))
        dtype = _DTYPES.get(types.get(x, 0))
        if axis < 0:
            axes = list(range(axis, 0))
        elif x in ranks:
            axes = list(range(axis, ranks[x]))
        else:
            axes = None
        stats_used = any(o and o in used for o in node.output[1:])
        if axes is None or dtype is None or stats_used or len(node.input) < 2 or not node.input[1]:
            nodes.append(node)
            continue
        base = node.name or node.output[0]

        def const(tag: str, value) -> str:
            name = fresh(f"{base}/{tag}")
            out.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
            return name

        def reduce_mean(src: str, tag: str) -> onnx.NodeProto:
            dst = fresh(f"{base}/{tag}")
            if opset >= 18:   # axes became an input in opset 18
                return helper.make_node("ReduceMean", [src, const(f"{tag}_axes", np.array(axes, np.int64))], [dst],
                                        name=dst, keepdims=1)
            return helper.make_node("ReduceMean", [src], [dst], name=dst, axes=axes, keepdims=1)

        mean = reduce_mean(x, "mean")
        centred = fresh(f"{base}/centred")
        squared = fresh(f"{base}/squared")
        var = reduce_mean(squared, "var")
        var_eps = fresh(f"{base}/var_eps")
        std = fresh(f"{base}/std")
        normed = fresh(f"{base}/normed")
        has_bias = len(node.input) > 2 and bool(node.input[2])
        scaled = fresh(f"{base}/scaled") if has_bias else node.output[0]
        new = [mean,
               helper.make_node("Sub", [x, mean.output[0]], [centred], name=centred),
               helper.make_node("Pow", [centred, const("two", np.array(2.0, dtype))], [squared], name=squared),
               var,
               helper.make_node("Add", [var.output[0], const("eps", np.array(eps, dtype))], [var_eps], name=var_eps),
               helper.make_node("Sqrt", [var_eps], [std], name=std),
               helper.make_node("Div", [centred, std], [normed], name=normed),
               helper.make_node("Mul", [normed, node.input[1]], [scaled], name=scaled)]
        if has_bias:
            new.append(helper.make_node("Add", [scaled, node.input[2]], [node.output[0]], name=fresh(f"{base}/shift")))
        nodes.extend(new)
        count += 1
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out, count


def decompose_gelu(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """A copy of `model` with every Gelu (opset 20) of the main graph whose input type is known written
    in the ops torch's opset-13 export uses, and how many were rewritten:
    approximate="none": 0.5 * x * (1 + Erf(x / sqrt(2)));
    approximate="tanh": 0.5 * x * (1 + Tanh(sqrt(2 / pi) * (x + 0.044715 * x^3))).
    Why: onnx 1.14 (DeepSparse 1.8's pin) knows no Gelu, and DeepSparse runs the Erf form natively.
    The constants are scalars in the input's element type."""
    if not any(n.op_type == "Gelu" and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return model, 0
    types, _ = _types_and_ranks(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    fresh = _fresh_names(out)
    nodes, count = [], 0
    for node in out.graph.node:
        dtype = _DTYPES.get(types.get(node.input[0] if node.input else "", 0))
        if not (node.op_type == "Gelu" and node.domain in ("", "ai.onnx")) or dtype is None:
            nodes.append(node)
            continue
        x, y = node.input[0], node.output[0]
        approximate = "none"
        for a in node.attribute:
            if a.name == "approximate":
                approximate = helper.get_attribute_value(a).decode()
        base = node.name or y

        def const(tag: str, value: float) -> str:
            name = fresh(f"{base}/{tag}")
            out.graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=dtype), name))
            return name

        def op(kind: str, inputs: list[str], tag: str, output: str | None = None) -> str:
            result = output or fresh(f"{base}/{tag}")
            nodes.append(helper.make_node(kind, inputs, [result], name=fresh(f"{base}/{tag}")))
            return result

        if approximate == "tanh":
            cube = op("Mul", [op("Mul", [x, x], "square"), x], "cube")
            inner = op("Add", [x, op("Mul", [cube, const("coeff", 0.044715)], "cube_scaled")], "inner")
            gate = op("Tanh", [op("Mul", [inner, const("sqrt_2_over_pi", float(np.sqrt(2.0 / np.pi)))], "scaled")],
                      "tanh")
        else:
            gate = op("Erf", [op("Div", [x, const("sqrt_2", float(np.sqrt(2.0)))], "div")], "erf")
        half_x = op("Mul", [x, op("Add", [gate, const("one", 1.0)], "one_plus")], "times_x")
        op("Mul", [half_x, const("half", 0.5)], "half", output=y)
        count += 1
    if not count:
        return model, 0
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out, count
