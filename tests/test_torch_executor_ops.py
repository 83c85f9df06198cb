"""The PyTorch executor (global correction, GPU runtime) on ops that exporters emit outside the usual
transformer and CNN set: each must compute what onnxruntime computes, or say it cannot."""
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from spdy_onnx import modelio  # noqa: E402
from spdy_onnx.runtimes.torch_onnx import GraphExecutor, Unsupported  # noqa: E402

RNG = np.random.default_rng(0)


def _const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _model(nodes, x_shape, inits=(), out_type=TensorProto.FLOAT, opset=13):
    g = helper.make_graph(nodes, "ops", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"] + x_shape)],
                          [helper.make_tensor_value_info("y", out_type, None)], list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _check(model, rtol=1e-5):
    specs = modelio.input_specs(model, 2)
    feeds = modelio.example_inputs(specs)
    model = modelio.with_static_inputs(model, specs)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = GraphExecutor(model, feeds, device="cpu", dtype=torch.float32).run()[0]
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert np.linalg.norm(got.astype(np.float64) - ref) <= rtol * max(np.linalg.norm(ref), 1e-12)


n = helper.make_node
CASES = {
    "Mod-fmod": ([n("Mod", ["x", "d"], ["y"], fmod=1)], [3, 5], [_const("d", np.float32(0.7))]),
    "Mod-int": ([n("Mul", ["x", "ten"], ["s"]), n("Cast", ["s"], ["i"], to=TensorProto.INT64),
                 n("Mod", ["i", "d"], ["m"]), n("Cast", ["m"], ["y"], to=TensorProto.FLOAT)], [3, 5],
                [_const("ten", np.float32(10)), _const("d", np.int64(3))]),
    "Sign": ([n("Sign", ["x"], ["y"])], [4, 4], []),
    "Sin-Cos": ([n("Sin", ["x"], ["s"]), n("Cos", ["x"], ["c"]), n("Add", ["s", "c"], ["y"])], [4, 4], []),
    "Softplus-Softsign-Selu": ([n("Softplus", ["x"], ["a"]), n("Softsign", ["a"], ["b"]), n("Selu", ["b"], ["y"])],
                               [4, 4], []),
    "PRelu": ([n("PRelu", ["x", "slope"], ["y"])], [3, 4, 4],
              [_const("slope", RNG.uniform(0.1, 0.3, (3, 1, 1)).astype(np.float32))]),
    "InstanceNormalization": ([n("InstanceNormalization", ["x", "g", "b"], ["y"], epsilon=1e-3)], [3, 5, 6],
                              [_const("g", RNG.standard_normal(3).astype(np.float32)),
                               _const("b", RNG.standard_normal(3).astype(np.float32))]),
    "ConvTranspose": ([n("ConvTranspose", ["x", "w", "b"], ["y"], strides=[2, 2], pads=[1, 0, 0, 1],
                         output_padding=[1, 0], group=2, dilations=[1, 2])], [4, 5, 6],
                      [_const("w", RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)),
                       _const("b", RNG.standard_normal(6).astype(np.float32))]),
    "ConvTranspose-1d": ([n("ConvTranspose", ["x", "w"], ["y"], strides=[3], pads=[2, 2])], [4, 7],
                         [_const("w", RNG.standard_normal((4, 2, 5)).astype(np.float32))]),
    "ArgMax": ([n("ArgMax", ["x"], ["y"], axis=-1, keepdims=0)], [3, 7], []),
    "ArgMin": ([n("ArgMin", ["x"], ["y"], axis=1)], [3, 7], []),
    "CumSum": ([n("CumSum", ["x", "ax"], ["a"]), n("CumSum", ["a", "ax"], ["y"], exclusive=1, reverse=1)], [5, 3],
               [_const("ax", np.int64(1))]),
    "Trilu": ([n("Trilu", ["x", "k"], ["a"]), n("Trilu", ["a", "k"], ["y"], upper=0)], [5, 5],
              [_const("k", np.int64(-1))]),
    "Einsum": ([n("Einsum", ["x", "w"], ["y"], equation="bij,jk->bik")], [3, 4],
               [_const("w", RNG.standard_normal((4, 6)).astype(np.float32))]),
    "GatherElements": ([n("GatherElements", ["x", "i"], ["y"], axis=2)], [3, 4],
                       [_const("i", np.array([[[0, -1, 2], [3, 1, 0], [1, 1, 1]]] * 2, dtype=np.int64))]),
    "Resize-nearest": ([n("Resize", ["x", "", "s"], ["y"], mode="nearest", coordinate_transformation_mode="asymmetric",
                          nearest_mode="floor")], [3, 4, 5], [_const("s", np.array([1, 1, 2, 2], np.float32))]),
    "Resize-linear": ([n("Resize", ["x", "", "", "z"], ["y"], mode="linear")], [3, 4, 5],
                      [_const("z", np.array([2, 3, 7, 9], np.int64))]),
    "Resize-align-corners": ([n("Resize", ["x", "", "s"], ["y"], mode="linear",
                                coordinate_transformation_mode="align_corners")], [3, 4, 5],
                             [_const("s", np.array([1, 1, 2, 2], np.float32))]),
    # attention masks in transformers exports (IsNaN), sentence-embedding heads (ReduceL2), and the rest
    # of the element-wise and reduction set
    "IsNaN-IsInf": ([n("Div", ["x", "z"], ["q"]), n("IsNaN", ["q"], ["nan"]),
                     n("IsInf", ["q"], ["pinf"], detect_negative=0), n("Or", ["nan", "pinf"], ["bad"]),
                     n("Where", ["bad", "zero", "x"], ["y"])], [4, 5],
                    [_const("z", np.array([0, 1, 0, 2, 1], np.float32)), _const("zero", np.float32(0))]),
    "Reduce-L1-L2-SumSquare-LogSumExp": ([n("ReduceL1", ["x"], ["a"], axes=[-1]), n("ReduceL2", ["x"], ["b"], axes=[-1]),
                                          n("ReduceSumSquare", ["x"], ["c"], axes=[1], keepdims=1),
                                          n("ReduceLogSumExp", ["x"], ["d"], axes=[2]),
                                          n("Sum", ["a", "b", "c", "d"], ["y"])], [3, 5], []),
    "Round-trig": ([n("Round", ["x"], ["r"]), n("Tanh", ["x"], ["t"]), n("Asin", ["t"], ["as"]),
                    n("Acos", ["t"], ["ac"]), n("Atan", ["x"], ["at"]), n("Tan", ["t"], ["ta"]),
                    n("Sinh", ["t"], ["sh"]), n("Cosh", ["t"], ["ch"]),
                    n("Mean", ["r", "as", "ac", "at", "ta", "sh", "ch"], ["y"])], [4, 4], []),
    "CastLike-ThresholdedRelu-Celu": ([n("Cast", ["x"], ["d"], to=TensorProto.DOUBLE),
                                       n("CastLike", ["d", "x"], ["f"]),
                                       n("ThresholdedRelu", ["f"], ["t"], alpha=0.3),
                                       n("Celu", ["t"], ["y"], alpha=0.7)], [4, 4], []),
    "LpNormalization": ([n("LpNormalization", ["x"], ["a"], axis=-1, p=2), n("LpNormalization", ["a"], ["y"], axis=1, p=1)],
                        [3, 5], []),
    # dynamo exports index the attention mask with GatherND; cache updates write with ScatterND
    "GatherND": ([n("GatherND", ["x", "i"], ["y"])], [3, 4], [_const("i", np.array([[0, 1], [1, -1], [-2, 0]], np.int64))]),
    "GatherND-batch": ([n("GatherND", ["x", "i"], ["y"], batch_dims=1)], [3, 4],
                       [_const("i", np.array([[[2], [0]], [[-1], [1]]], np.int64))]),
    "ScatterND": ([n("ScatterND", ["x", "i", "u"], ["y"])], [3, 4],
                  [_const("i", np.array([[0, 1], [1, -1]], np.int64)), _const("u", RNG.standard_normal((2, 4)).astype(np.float32))]),
    "ScatterND-add": ([n("ScatterND", ["x", "i", "u"], ["y"], reduction="add")], [3, 4],
                      [_const("i", np.array([[0, 1], [0, 1]], np.int64)),   # the same row twice: summed
                       _const("u", RNG.standard_normal((2, 4)).astype(np.float32))]),
    "DepthToSpace-SpaceToDepth": ([n("DepthToSpace", ["x"], ["a"], blocksize=2, mode="CRD"),
                                   n("SpaceToDepth", ["a"], ["b"], blocksize=2),
                                   n("DepthToSpace", ["b"], ["y"], blocksize=2)], [8, 3, 4], []),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_matches_onnxruntime(name):
    nodes, shape, inits = CASES[name]
    out_type = TensorProto.INT64 if name.startswith("Arg") else TensorProto.FLOAT
    opset = 14 if name == "Trilu" else 15 if name.startswith("CastLike") else 16 if name == "ScatterND-add" else 13
    _check(_model(nodes, shape, inits, out_type=out_type, opset=opset), rtol=1e-4 if "Resize" in name else 1e-5)


def test_mish_at_opset_18():
    _check(_model([n("Mish", ["x"], ["y"])], [4, 4], opset=18))


def test_an_op_it_cannot_run_is_named():
    m = _model([n("Resize", ["x", "", "s"], ["y"], mode="cubic")], [3, 4, 5],
               [_const("s", np.array([1, 1, 2, 2], np.float32))])
    specs = modelio.input_specs(m, 2)
    feeds = modelio.example_inputs(specs)
    with pytest.raises(Unsupported, match="Resize mode cubic"):
        GraphExecutor(modelio.with_static_inputs(m, specs), feeds, device="cpu", dtype=torch.float32).run()
