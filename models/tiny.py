"""Tiny ONNX models built in code, for tests and quick tries: no downloads, seeded, a few ms to run.

    python models/tiny.py mlp out.onnx          # 4 x (MatMul 512x512 + Add + Relu), input (1, 64, 512)
    python models/tiny.py cnn out.onnx          # Conv/BN/Relu, a depthwise conv, GlobalAveragePool, Gemm
    python models/tiny.py blocks out.onnx       # two inverted-residual blocks (1x1 expand, depthwise, 1x1 project)
    python models/tiny.py layernorm out.onnx    # 4 x (MatMul + Add + Relu + residual + LayerNormalization), opset 17
"""
from __future__ import annotations

import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13
IR_VERSION = 8


def _model(nodes, inputs, outputs, inits, opset=OPSET, ir_version=IR_VERSION):
    g = helper.make_graph(nodes, "tiny", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], producer_name="spdy-onnx-tiny")
    m.ir_version = ir_version
    onnx.checker.check_model(m)
    return m


def mlp(width: int = 512, depth: int = 4, seq: int = 64, batch: int | str = 1, seed: int = 0,
        hidden: int | None = None, weight_form: str = "initializer") -> onnx.ModelProto:
    """Stack of MatMul + bias Add + Relu. weight_form: initializer | constant | transpose | fp16 | shared."""
    rng = np.random.default_rng(seed)
    hidden = hidden or width
    nodes, inits = [], []
    x = "x"
    shared_name = None
    for i in range(depth):
        d_in = width if i == 0 else hidden
        d_out = width if i == depth - 1 else hidden
        w = (rng.standard_normal((d_in, d_out)) / np.sqrt(d_in)).astype(np.float32)
        b = (0.01 * rng.standard_normal(d_out)).astype(np.float32)
        wname = f"w{i}"
        if weight_form == "constant":
            nodes.append(helper.make_node("Constant", [], [wname], name=f"const_{i}",
                                          value=numpy_helper.from_array(w, f"{wname}_value")))
        elif weight_form == "transpose":
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"{wname}_t"))
            nodes.append(helper.make_node("Transpose", [f"{wname}_t"], [wname], name=f"transpose_{i}", perm=[1, 0]))
        elif weight_form == "fp16":
            inits.append(numpy_helper.from_array(w.astype(np.float16), f"{wname}_h"))
            nodes.append(helper.make_node("Cast", [f"{wname}_h"], [wname], name=f"cast_{i}", to=TensorProto.FLOAT))
        elif weight_form == "shared" and d_in == d_out:
            if shared_name is None:
                shared_name = wname
                inits.append(numpy_helper.from_array(w, wname))
            wname = shared_name
        else:
            inits.append(numpy_helper.from_array(w, wname))
        inits.append(numpy_helper.from_array(b, f"b{i}"))
        nodes.append(helper.make_node("MatMul", [x, wname], [f"mm{i}"], name=f"matmul_{i}"))
        nodes.append(helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"add{i}"], name=f"add_{i}"))
        if i < depth - 1:
            nodes.append(helper.make_node("Relu", [f"add{i}"], [f"relu{i}"], name=f"relu_{i}"))
            x = f"relu{i}"
        else:
            x = f"add{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"], name="output"))
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, seq, width])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, seq, width])
    return _model(nodes, [inp], [out], inits)


def cnn(channels: int = 64, size: int = 32, classes: int = 100, batch: int | str = 1, seed: int = 0) -> onnx.ModelProto:
    """Conv3x3 stem (tiny) -> Conv3x3+BN+Relu -> depthwise 3x3 -> Conv1x1 + residual -> pool -> Gemm."""
    rng = np.random.default_rng(seed)
    c = channels

    def conv_w(o, i, k):
        return (rng.standard_normal((o, i, k, k)) * np.sqrt(2.0 / (i * k * k))).astype(np.float32)

    inits = [
        numpy_helper.from_array(conv_w(16, 3, 3), "stem_w"),
        numpy_helper.from_array(conv_w(c, 16, 3), "c1_w"),
        numpy_helper.from_array(np.ones(c, np.float32), "bn_scale"),
        numpy_helper.from_array((0.1 * rng.standard_normal(c)).astype(np.float32), "bn_bias"),
        numpy_helper.from_array(np.zeros(c, np.float32), "bn_mean"),
        numpy_helper.from_array(np.ones(c, np.float32), "bn_var"),
        numpy_helper.from_array(conv_w(c, 1, 3), "dw_w"),
        numpy_helper.from_array(conv_w(c, c, 1), "pw_w"),
        numpy_helper.from_array((0.01 * rng.standard_normal(c)).astype(np.float32), "pw_b"),
        numpy_helper.from_array((rng.standard_normal((classes, c)) / np.sqrt(c)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(np.zeros(classes, np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "stem_w"], ["stem"], name="stem_conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["stem"], ["stem_r"], name="stem_relu"),
        helper.make_node("Conv", ["stem_r", "c1_w"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["c1", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn1"], name="bn1"),
        helper.make_node("Relu", ["bn1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "dw_w"], ["dw"], name="depthwise", pads=[1, 1, 1, 1], group=c),
        helper.make_node("Relu", ["dw"], ["dw_r"], name="dw_relu"),
        helper.make_node("Conv", ["dw_r", "pw_w", "pw_b"], ["pw"], name="pointwise"),
        helper.make_node("Add", ["pw", "r1"], ["res"], name="residual"),
        helper.make_node("GlobalAveragePool", ["res"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="classifier", transB=1),
    ]
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, size, size])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])
    return _model(nodes, [inp], [out], inits)


def inverted_residual(channels: int = 16, expand: int = 6, size: int = 28, blocks: int = 2, batch: int | str = 1,
                      seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2-style blocks: x + project(relu(depthwise(relu(expand(x))))). DeepSparse runs such a
    block as one fused kernel while dense, which is what tied levels are about."""
    rng = np.random.default_rng(seed)
    c, e = channels, channels * expand
    inits, nodes, x = [], [], "x"
    for b in range(blocks):
        for name, shape in ((f"e{b}_w", (e, c, 1, 1)), (f"d{b}_w", (e, 1, 3, 3)), (f"p{b}_w", (c, e, 1, 1))):
            fan_in = shape[1] * shape[2] * shape[3]
            inits.append(numpy_helper.from_array(
                (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32), name))
        nodes += [
            helper.make_node("Conv", [x, f"e{b}_w"], [f"e{b}"], name=f"expand{b}"),
            helper.make_node("Relu", [f"e{b}"], [f"e{b}_r"], name=f"expand{b}_relu"),
            helper.make_node("Conv", [f"e{b}_r", f"d{b}_w"], [f"d{b}"], name=f"depthwise{b}", pads=[1, 1, 1, 1], group=e),
            helper.make_node("Relu", [f"d{b}"], [f"d{b}_r"], name=f"depthwise{b}_relu"),
            helper.make_node("Conv", [f"d{b}_r", f"p{b}_w"], [f"p{b}"], name=f"project{b}"),
            helper.make_node("Add", [f"p{b}", x], [f"y{b}"], name=f"residual{b}"),
        ]
        x = f"y{b}"
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c, size, size])
    out = helper.make_tensor_value_info(x, TensorProto.FLOAT, [batch, c, size, size])
    return _model(nodes, [inp], [out], inits)


def layernorm_mlp(width: int = 256, depth: int = 4, seq: int = 64, batch: int | str = 1, opset: int = 17,
                  seed: int = 0, bias: bool = True) -> onnx.ModelProto:
    """Residual MatMul + bias + Relu blocks, each followed by a LayerNormalization op (opset 17+), as
    torch's exporter writes transformers at its default opset."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(depth):
        inits += [numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), f"w{i}"),
                  numpy_helper.from_array((0.01 * rng.standard_normal(width)).astype(np.float32), f"b{i}"),
                  numpy_helper.from_array((1 + 0.1 * rng.standard_normal(width)).astype(np.float32), f"g{i}")]
        ln_inputs = [f"res{i}", f"g{i}"]
        if bias:
            inits.append(numpy_helper.from_array((0.1 * rng.standard_normal(width)).astype(np.float32), f"beta{i}"))
            ln_inputs.append(f"beta{i}")
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"matmul_{i}"),
                  helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"add{i}"], name=f"add_{i}"),
                  helper.make_node("Relu", [f"add{i}"], [f"relu{i}"], name=f"relu_{i}"),
                  helper.make_node("Add", [f"relu{i}", x], [f"res{i}"], name=f"residual_{i}"),
                  helper.make_node("LayerNormalization", ln_inputs, [f"ln{i}"], name=f"norm_{i}", axis=-1,
                                   epsilon=1e-5)]
        x = f"ln{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"], name="output"))
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, seq, width])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, seq, width])
    return _model(nodes, [inp], [out], inits, opset=opset)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["mlp", "cnn", "blocks", "layernorm"])
    p.add_argument("out")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    args = p.parse_args()
    model = {"mlp": lambda: mlp(args.width, args.depth, args.seq), "cnn": cnn, "blocks": inverted_residual,
             "layernorm": lambda: layernorm_mlp(args.width, args.depth, args.seq)}[args.kind]()
    onnx.save(model, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
