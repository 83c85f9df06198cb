"""A small ONNX executor on PyTorch: the end-to-end engine behind the cuda-2:4 runtime.

Why our own: the GPU machines have PyTorch (with cuSPARSELt and CUTLASS 2:4 kernels) but neither
TensorRT nor onnxruntime-gpu, and neither can be installed there. This executor runs a static-shape
ONNX graph on the GPU in half precision, with each prunable site (Conv/Gemm/MatMul with a constant
weight) as either its dense kernel or a 2:4 sparse GEMM, so dense and 2:4 models are timed end to end
by the same code, with the same kernels the per-site latency table was measured with.

How it runs a graph:
- Everything that does not depend on the inputs' values (weights behind Transpose/Cast, shape
  arithmetic; shapes are static) is folded once, on the CPU, when the executor is built.
- What is left is a list of steps, each one torch call. A few patterns are fused the way a real
  engine fuses them: LayerNorm decomposed by old exporters, GELU written with Erf, and a weight's
  bias Add folded into its GEMM (cuBLASLt / cuSPARSELt take a bias).
- On CUDA the steps are captured once into a CUDA graph and replayed: no Python or launch overhead in
  the timings, and no host-device synchronisation inside the graph.
- 4-D activations are kept channels-last, so a 1x1 conv is a GEMM on a view of its input and a kxk
  conv's im2col is in the (kh, kw, cin) order of the 2:4 groups.
Dense convs use cuDNN (the best dense baseline); 2:4 convs use their GEMM form.
"""
from __future__ import annotations

import logging
import math
import os
import sys

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from spdy_onnx import graph as graph_mod
from spdy_onnx.errors import SpdyError

log = logging.getLogger(__name__)

FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
ONNX_TO_TORCH = {
    TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16, TensorProto.DOUBLE: torch.float64,
    TensorProto.BFLOAT16: torch.bfloat16, TensorProto.INT8: torch.int8, TensorProto.UINT8: torch.uint8,
    TensorProto.INT16: torch.int16, TensorProto.INT32: torch.int32, TensorProto.INT64: torch.int64,
    TensorProto.BOOL: torch.bool,
}
SITE_OPS = ("Conv", "Gemm", "MatMul")


def import_dynamo_without_cache_folder():
    """Import torch._dynamo with its cache folder in a temporary folder of ours, removed after.

    Why: the import, which torch.optim's optimizers and the 2:4 tensor classes trigger on first use,
    makes $TMPDIR/torchinductor_<user> and leaves it there, empty: nothing here compiles, so nothing
    is cached. Left alone when already imported, or when TORCHINDUCTOR_CACHE_DIR names a folder
    (the user chose it)."""
    if "torch._dynamo" in sys.modules or os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return
    from spdy_onnx.workdir import make_workdir
    folder = make_workdir()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder.name
    try:
        import torch._dynamo  # noqa: F401
    finally:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)   # torch sets it to the folder it made
        folder.cleanup()


class Unsupported(SpdyError):
    pass


class Ctx:
    """Where and in which float precision an op runs (static folding: CPU, the ONNX types)."""

    def __init__(self, device, float_dtype, static: bool, opset: int):
        self.device = device
        self.float_dtype = float_dtype
        self.static = static
        self.opset = opset

    def cast_type(self, onnx_type: int):
        if onnx_type in FLOAT_TYPES and not self.static:
            return self.float_dtype
        if onnx_type not in ONNX_TO_TORCH:
            raise Unsupported(f"the PyTorch executor has no tensor type {TensorProto.DataType.Name(onnx_type)}")
        return ONNX_TO_TORCH[onnx_type]


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _str(a, key, default):
    """A string attribute (onnx gives bytes)."""
    v = a.get(key, default)
    return v.decode() if isinstance(v, bytes) else v


def _ints(t) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def to_device_const(t: torch.Tensor, device, float_dtype) -> torch.Tensor:
    """A folded constant as a device tensor; floats in the compute precision, clamped to its range."""
    if t.is_floating_point():
        if float_dtype in (torch.float16, torch.bfloat16):
            big = torch.finfo(float_dtype).max
            t = t.to(torch.float32).clamp(-big, big)
        return t.to(device=device, dtype=float_dtype)
    return t.to(device=device)


# --------------------------------------------------------------------------------------------
# ops: f(ctx, attrs, *inputs) -> list of outputs. Inputs listed in PARAMS stay CPU tensors.
# --------------------------------------------------------------------------------------------

PARAMS = {
    "Reshape": {1}, "Slice": {1, 2, 3, 4}, "Unsqueeze": {1}, "Squeeze": {1}, "Expand": {1}, "Tile": {1},
    "ConstantOfShape": {0}, "ReduceMean": {1}, "ReduceSum": {1}, "ReduceMax": {1}, "ReduceMin": {1},
    "ReduceProd": {1}, "ReduceL1": {1}, "ReduceL2": {1}, "ReduceSumSquare": {1}, "ReduceLogSumExp": {1},
    "Pad": {1, 2}, "Split": {1}, "Clip": {1, 2}, "Range": {0, 1, 2},
    "CumSum": {1}, "Trilu": {1}, "Resize": {1, 2, 3},
}


def _binary(fn):
    return lambda ctx, a, x, y: [fn(x, y)]


def _div(ctx, a, x, y):
    if not x.is_floating_point() and not y.is_floating_point():
        return [torch.div(x, y, rounding_mode="trunc")]
    return [x / y]


def _pow(ctx, a, x, y):
    if x.is_floating_point() and y.dtype != x.dtype:
        y = y.to(x.dtype)
    if y.numel() == 1 and not y.is_cuda and float(y) == 2.0:
        return [x * x]
    return [torch.pow(x, y)]


def _clip(ctx, a, x, lo=None, hi=None):
    if ctx.opset < 11:
        lo_v, hi_v = a.get("min"), a.get("max")
    else:
        lo_v = float(lo) if lo is not None and lo.numel() else None
        hi_v = float(hi) if hi is not None and hi.numel() else None
    if not x.is_floating_point():
        lo_v = int(lo_v) if lo_v is not None else None
        hi_v = int(hi_v) if hi_v is not None else None
    if lo_v is None and hi_v is None:
        return [x]
    return [torch.clamp(x, lo_v, hi_v)]


def _softmax_like(fn):
    def op(ctx, a, x):
        if ctx.opset >= 13:
            return [fn(x, dim=int(a.get("axis", -1)))]
        axis = int(a.get("axis", 1)) % max(x.dim(), 1)
        shape = x.shape
        y = fn(x.reshape(int(np.prod(shape[:axis])), -1), dim=-1)
        return [y.reshape(shape)]
    return op


def _reduce(kind):
    def op(ctx, a, x, axes_in=None):
        if axes_in is not None and axes_in.numel():
            axes = _ints(axes_in)
        else:
            axes = list(a.get("axes", []))
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        axes = sorted(ax % x.dim() for ax in axes)
        if kind == "mean":
            return [x.mean(dim=axes, keepdim=keep)]
        if kind == "sum":
            return [x.sum(dim=axes, keepdim=keep)]
        if kind == "max":
            return [x.amax(dim=axes, keepdim=keep)]
        if kind == "min":
            return [x.amin(dim=axes, keepdim=keep)]
        if kind == "l1":
            return [x.abs().sum(dim=axes, keepdim=keep)]
        if kind == "l2":
            return [torch.sqrt((x * x).sum(dim=axes, keepdim=keep))]
        if kind == "sumsquare":
            return [(x * x).sum(dim=axes, keepdim=keep)]
        if kind == "logsumexp":
            return [torch.logsumexp(x, dim=axes, keepdim=keep)]
        y = x
        for ax in reversed(axes):
            y = y.prod(dim=ax, keepdim=keep)
        return [y]
    return op


def _is_inf(ctx, a, x):
    neg, pos = int(a.get("detect_negative", 1)), int(a.get("detect_positive", 1))
    return [(torch.isneginf(x) & bool(neg)) | (torch.isposinf(x) & bool(pos))]


def _lp_normalization(ctx, a, x):
    p, axis = int(a.get("p", 2)), int(a.get("axis", -1))
    norm = x.abs().sum(dim=axis, keepdim=True) if p == 1 else torch.sqrt((x * x).sum(dim=axis, keepdim=True))
    return [x / norm]


def _depth_to_space(ctx, a, x):
    b, mode = int(a["blocksize"]), a.get("mode", "DCR")
    n, c, h, w = x.shape
    if mode in ("DCR", b"DCR"):
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return [y.reshape(n, c // (b * b), h * b, w * b)]


def _space_to_depth(ctx, a, x):
    b = int(a["blocksize"])
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return [y.reshape(n, c * b * b, h // b, w // b)]


def _reshape(ctx, a, x, shape):
    dims = _ints(shape)
    if not a.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return [x.reshape(dims)]


def _flatten(ctx, a, x):
    axis = int(a.get("axis", 1)) % (x.dim() + 1) if x.dim() else 0
    lead = int(np.prod(x.shape[:axis])) if axis else 1
    return [x.reshape(lead, -1)]


def _transpose(ctx, a, x):
    perm = a.get("perm")
    perm = list(perm) if perm is not None else list(reversed(range(x.dim())))
    return [x.permute(perm)]


def _squeeze(ctx, a, x, axes_in=None):
    axes = _ints(axes_in) if axes_in is not None else list(a.get("axes", []))
    if not axes:
        return [x.squeeze()]
    for ax in sorted((ax % x.dim() for ax in axes), reverse=True):
        x = x.squeeze(ax)
    return [x]


def _unsqueeze(ctx, a, x, axes_in=None):
    axes = _ints(axes_in) if axes_in is not None else list(a.get("axes", []))
    rank = x.dim() + len(axes)
    for ax in sorted(ax % rank for ax in axes):
        x = x.unsqueeze(ax)
    return [x]


def _concat(ctx, a, *xs):
    xs = [x for x in xs if x is not None]
    dtype = xs[0].dtype
    return [torch.cat([x.to(dtype) for x in xs], dim=int(a["axis"]))]


def _slice(ctx, a, x, starts=None, ends=None, axes=None, steps=None):
    if ctx.opset < 10:
        starts, ends = list(a["starts"]), list(a["ends"])
        axes = list(a.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(starts), _ints(ends)
        axes = _ints(axes) if axes is not None and axes.numel() else list(range(len(starts)))
        steps = _ints(steps) if steps is not None and steps.numel() else [1] * len(starts)
    index = [slice(None)] * x.dim()
    flips = []
    for s, e, ax, st in zip(starts, ends, axes, steps):
        ax %= x.dim()
        n = x.shape[ax]
        if st > 0:
            s = max(0, min(n, s + n if s < 0 else s))
            e = max(0, min(n, e + n if e < 0 else e))
            index[ax] = slice(s, max(s, e), st)
        else:
            s = max(-1, min(n - 1, s + n if s < 0 else s))
            e = max(-1, min(n - 1, e + n if e < 0 else e))
            idx = torch.arange(s, e, st, device=x.device)
            flips.append((ax, idx))
    y = x[tuple(index)]
    for ax, idx in flips:
        y = y.index_select(ax, idx)
    return [y]


def _gather(ctx, a, x, idx):
    axis = int(a.get("axis", 0)) % x.dim()
    idx = idx.to(torch.int64)
    if idx.device != x.device:
        idx = idx.to(x.device)
    n = x.shape[axis]
    if not idx.is_cuda:
        idx = torch.where(idx < 0, idx + n, idx)
    flat = x.index_select(axis, idx.reshape(-1))
    return [flat.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1:]))]


def _shape(ctx, a, x):
    dims = list(x.shape)
    start, end = a.get("start", 0), a.get("end", None)
    return [torch.tensor(dims[start:end], dtype=torch.int64)]


def _size(ctx, a, x):
    return [torch.tensor(int(x.numel()), dtype=torch.int64)]


def _cast(ctx, a, x):
    return [x.to(ctx.cast_type(int(a["to"])))]


def _constant_of_shape(ctx, a, shape):
    value = a.get("value")
    if value is None:
        fill, dtype = 0.0, ctx.cast_type(TensorProto.FLOAT)
    else:
        arr = numpy_helper.to_array(value).reshape(-1)
        fill, dtype = arr[0].item(), ctx.cast_type(value.data_type)
    device = "cpu" if ctx.static else ctx.device
    return [torch.full(_ints(shape), fill, dtype=dtype, device=device)]


def _constant(ctx, a):
    if "value" in a:
        arr = numpy_helper.to_array(a["value"])
    elif "value_float" in a:
        arr = np.array(a["value_float"], np.float32)
    elif "value_floats" in a:
        arr = np.array(a["value_floats"], np.float32)
    elif "value_int" in a:
        arr = np.array(a["value_int"], np.int64)
    elif "value_ints" in a:
        arr = np.array(a["value_ints"], np.int64)
    else:
        raise Unsupported("Constant without a tensor value is not supported by the PyTorch executor")
    return [torch.from_numpy(np.array(arr))]


def _expand(ctx, a, x, shape):
    out = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape)))
    return [x.expand(out)]


def _where(ctx, a, c, x, y):
    if x.dtype != y.dtype:
        y = y.to(x.dtype)
    return [torch.where(c.to(torch.bool), x, y)]


def _variadic(fn):
    def op(ctx, a, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return [out]
    return op


def _split(ctx, a, x, split=None, *, n_out=None):
    axis = int(a.get("axis", 0)) % x.dim()
    if split is not None and split.numel():
        sizes = _ints(split)
    elif "split" in a:
        sizes = list(a["split"])
    else:
        n = int(a.get("num_outputs", n_out))
        chunk = -(-x.shape[axis] // n)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(n)]
    return list(torch.split(x, sizes, dim=axis))


def _range(ctx, a, start, limit, delta):
    return [torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)]


def _tile(ctx, a, x, reps):
    return [x.repeat(_ints(reps))]


def _pad(ctx, a, x, pads=None, value=None, axes=None):
    if ctx.opset < 11:
        pads, fill = list(a["pads"]), float(a.get("value", 0.0))
    else:
        pads = _ints(pads)
        fill = float(value) if value is not None and value.numel() else 0.0
    mode = _str(a, "mode", "constant")
    r = x.dim()
    torch_pads = []
    for ax in reversed(range(r)):
        torch_pads += [pads[ax], pads[ax + r]]
    tmode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[mode]
    return [F.pad(x, torch_pads, mode=tmode, value=fill) if tmode == "constant" else F.pad(x, torch_pads, mode=tmode)]


def _batchnorm(ctx, a, x, scale, bias, mean, var, *rest):
    return [F.batch_norm(x, mean, var, scale, bias, False, 0.0, float(a.get("epsilon", 1e-5)))]


def _layernorm(ctx, a, x, scale, bias=None):
    axis = int(a.get("axis", -1)) % x.dim()
    shape = tuple(x.shape[axis:])
    return [F.layer_norm(x, shape, scale.expand(shape).contiguous() if scale is not None else None,
                         bias.expand(shape).contiguous() if bias is not None else None,
                         float(a.get("epsilon", 1e-5)))]


def _gelu(ctx, a, x):
    approx = _str(a, "approximate", "none")
    return [F.gelu(x, approximate="tanh" if approx == "tanh" else "none")]


def _pool_pads(a, nd):
    pads = list(a.get("pads", [0] * (2 * nd)))
    return pads[:nd], pads[nd:]


def _pool(kind):
    def op(ctx, a, x):
        nd = x.dim() - 2
        if nd != 2:
            raise Unsupported(f"{kind} pooling over {nd} spatial dims is not supported by the PyTorch executor")
        k = list(a["kernel_shape"])
        strides = list(a.get("strides", [1] * nd))
        auto = _str(a, "auto_pad", "NOTSET")
        if auto not in ("NOTSET", "VALID"):
            raise Unsupported(f"pooling with auto_pad={auto} is not supported by the PyTorch executor")
        begin, end = _pool_pads(a, nd) if auto == "NOTSET" else ([0] * nd, [0] * nd)
        ceil = bool(a.get("ceil_mode", 0))
        if begin == end:
            padding = begin
        else:
            fill = -math.inf if kind == "max" else 0.0
            x = F.pad(x, [begin[1], end[1], begin[0], end[0]], value=fill)
            padding = [0, 0]
        if kind == "max":
            dil = list(a.get("dilations", [1] * nd))
            return [F.max_pool2d(x, k, strides, padding, dil, ceil_mode=ceil)]
        return [F.avg_pool2d(x, k, strides, padding, ceil_mode=ceil,
                             count_include_pad=bool(a.get("count_include_pad", 0)))]
    return op


def _global_pool(kind):
    def op(ctx, a, x):
        dims = list(range(2, x.dim()))
        return [x.mean(dim=dims, keepdim=True) if kind == "avg" else x.amax(dim=dims, keepdim=True)]
    return op


def conv_padding(a, in_spatial, kernel, strides, dilations):
    """(begin, end) pads per spatial dim, auto_pad resolved from the static input shape."""
    nd = len(kernel)
    auto = _str(a, "auto_pad", "NOTSET")
    if auto == "NOTSET":
        pads = list(a.get("pads", [0] * (2 * nd)))
        return pads[:nd], pads[nd:]
    if auto == "VALID":
        return [0] * nd, [0] * nd
    begin, end = [], []
    for n, k, s, d in zip(in_spatial, kernel, strides, dilations):
        out = -(-n // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
        lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
        begin.append(lo)
        end.append(total - lo)
    return begin, end


def _conv(ctx, a, x, w, b=None):
    nd = x.dim() - 2
    kernel = list(a.get("kernel_shape", w.shape[2:]))
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    begin, end = conv_padding(a, list(x.shape[2:]), kernel, strides, dil)
    if begin != end:
        torch_pads = []
        for i in reversed(range(nd)):
            torch_pads += [begin[i], end[i]]
        x = F.pad(x, torch_pads)
        begin = [0] * nd
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(nd)
    if fn is None:
        raise Unsupported(f"Conv over {nd} spatial dims is not supported by the PyTorch executor")
    return [fn(x, w, b, strides, begin, dil, int(a.get("group", 1)))]


def _gemm(ctx, a, x, w, c=None):
    if a.get("transA", 0):
        x = x.t()
    if a.get("transB", 0):
        w = w.t()
    y = x @ w
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return [y]


def _matmul(ctx, a, x, y):
    return [torch.matmul(x, y)]


def _dropout(ctx, a, x, *rest):
    return [x, torch.ones_like(x, dtype=torch.bool)]


def _fused_bias_gelu(ctx, a, x):
    return [F.gelu(x)]


def _mod(ctx, a, x, y):
    return [torch.fmod(x, y) if int(a.get("fmod", 0)) else torch.remainder(x, y)]


def _prelu(ctx, a, x, slope):
    return [torch.where(x < 0, x * slope.to(x.dtype), x)]


def _instance_norm(ctx, a, x, scale, bias):
    return [F.instance_norm(x, weight=scale, bias=bias, eps=float(a.get("epsilon", 1e-5)))]


def _conv_transpose(ctx, a, x, w, b=None):
    nd = x.dim() - 2
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}.get(nd)
    if fn is None:
        raise Unsupported(f"ConvTranspose over {nd} spatial dims is not supported by the PyTorch executor")
    if "output_shape" in a or _str(a, "auto_pad", "NOTSET") != "NOTSET":
        raise Unsupported("ConvTranspose with output_shape or auto_pad is not supported by the PyTorch executor")
    strides = list(a.get("strides", [1] * nd))
    dil = list(a.get("dilations", [1] * nd))
    out_pad = list(a.get("output_padding", [0] * nd))
    pads = list(a.get("pads", [0] * (2 * nd)))
    y = fn(x, w, b, strides, 0, out_pad, int(a.get("group", 1)), dil)
    # ONNX pads crop the full output, begin and end separately
    index = [slice(None), slice(None)] + [slice(pads[i], y.shape[2 + i] - pads[nd + i]) for i in range(nd)]
    return [y[tuple(index)]]


def _arg(fn):
    def op(ctx, a, x):
        if int(a.get("select_last_index", 0)):
            raise Unsupported("ArgMax/ArgMin with select_last_index is not supported by the PyTorch executor")
        return [fn(x, dim=int(a.get("axis", 0)), keepdim=bool(a.get("keepdims", 1)))]
    return op


def _cumsum(ctx, a, x, axis):
    dim = int(axis.reshape(-1)[0]) % x.dim()
    if int(a.get("reverse", 0)):
        x = x.flip(dim)
    y = torch.cumsum(x, dim)
    if int(a.get("exclusive", 0)):
        y = y - x
    return [y.flip(dim) if int(a.get("reverse", 0)) else y]


def _trilu(ctx, a, x, k=None):
    diag = int(k.reshape(-1)[0]) if k is not None and k.numel() else 0
    return [torch.triu(x, diag) if int(a.get("upper", 1)) else torch.tril(x, diag)]


def _einsum(ctx, a, *xs):
    return [torch.einsum(_str(a, "equation", ""), *xs)]


def _gather_elements(ctx, a, x, idx):
    axis = int(a.get("axis", 0)) % x.dim()
    idx = idx.to(device=x.device, dtype=torch.int64)
    return [torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx))]


def _nd_index(x, idx, batch_dims: int):
    """(x with its batch dims and the k indexed dims each flattened to one, linear indices [nb, m]) for
    GatherND/ScatterND: indices' last axis indexes the k axes of x after its first `batch_dims`."""
    idx = idx.to(device=x.device, dtype=torch.int64)
    b, k = batch_dims, idx.shape[-1]
    dims = list(x.shape[b:b + k])
    nb = int(np.prod(x.shape[:b])) if b else 1
    rest = tuple(x.shape[b + k:])
    flat = x.reshape((nb, int(np.prod(dims)) if dims else 1) + rest)
    i = idx.reshape(nb, -1, k)
    sizes = torch.tensor(dims, dtype=torch.int64, device=x.device)
    i = torch.where(i < 0, i + sizes, i)
    strides = torch.tensor([int(np.prod(dims[j + 1:])) for j in range(k)], dtype=torch.int64, device=x.device)
    return flat, (i * strides).sum(-1), rest


def _gather_nd(ctx, a, x, idx):
    b = int(a.get("batch_dims", 0))
    flat, lin, rest = _nd_index(x, idx, b)
    out = flat[torch.arange(flat.shape[0], device=x.device)[:, None], lin]
    return [out.reshape(tuple(idx.shape[:-1]) + rest)]


def _scatter_nd(ctx, a, x, idx, updates):
    flat, lin, rest = _nd_index(x, idx, 0)
    flat = flat.clone()
    upd = updates.reshape((1, -1) + rest).to(flat.dtype)
    rows = torch.zeros_like(lin)
    how = _str(a, "reduction", "none")
    if how == "none":
        flat[rows, lin] = upd
    elif how in ("add", "mul", "max", "min"):
        reduce = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}[how]
        target = lin.reshape(lin.shape + (1,) * len(rest)).expand(lin.shape + rest)
        flat = flat.scatter_reduce(1, target, upd, reduce=reduce, include_self=True)
    else:
        raise Unsupported(f"ScatterND reduction {how} is not supported by the PyTorch executor")
    return [flat.reshape(x.shape)]


def _resize(ctx, a, x, roi=None, scales=None, sizes=None):
    """Spatial Resize as the exporters write it: nearest (asymmetric, floor) or (bi)linear."""
    mode = _str(a, "mode", "nearest")
    coord = _str(a, "coordinate_transformation_mode", "half_pixel")
    nd = x.dim() - 2
    if sizes is not None and sizes.numel():
        out = _ints(sizes)
        if out[:2] != list(x.shape[:2]):
            raise Unsupported("Resize of the batch or channel axis is not supported by the PyTorch executor")
        kw = {"size": out[2:]}
    elif scales is not None and scales.numel():
        sc = [float(v) for v in scales.reshape(-1).tolist()]
        if sc[:2] != [1.0, 1.0]:
            raise Unsupported("Resize of the batch or channel axis is not supported by the PyTorch executor")
        kw = {"size": [int(math.floor(n * f)) for n, f in zip(x.shape[2:], sc[2:])]}
    else:
        raise Unsupported("Resize without scales or sizes is not supported by the PyTorch executor")
    if mode == "nearest":
        if coord != "asymmetric" or _str(a, "nearest_mode", "round_prefer_floor") != "floor":
            raise Unsupported(f"nearest Resize with {coord} coordinates is not supported by the PyTorch executor")
        return [F.interpolate(x, mode="nearest", **kw)]
    if mode == "linear" and coord in ("half_pixel", "pytorch_half_pixel", "align_corners") and nd in (1, 2, 3):
        tmode = {1: "linear", 2: "bilinear", 3: "trilinear"}[nd]
        return [F.interpolate(x, mode=tmode, align_corners=coord == "align_corners", **kw)]
    raise Unsupported(f"Resize mode {mode} with {coord} coordinates is not supported by the PyTorch executor")


OPS = {
    "Identity": lambda ctx, a, x: [x],
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _div,
    "Pow": _pow, "Sqrt": lambda ctx, a, x: [torch.sqrt(x)], "Exp": lambda ctx, a, x: [torch.exp(x)],
    "Log": lambda ctx, a, x: [torch.log(x)], "Neg": lambda ctx, a, x: [torch.neg(x)],
    "Abs": lambda ctx, a, x: [torch.abs(x)], "Reciprocal": lambda ctx, a, x: [torch.reciprocal(x)],
    "Erf": lambda ctx, a, x: [torch.erf(x)], "Tanh": lambda ctx, a, x: [torch.tanh(x)],
    "Sigmoid": lambda ctx, a, x: [torch.sigmoid(x)], "Relu": lambda ctx, a, x: [F.relu(x)],
    "Floor": lambda ctx, a, x: [torch.floor(x)], "Ceil": lambda ctx, a, x: [torch.ceil(x)],
    "LeakyRelu": lambda ctx, a, x: [F.leaky_relu(x, float(a.get("alpha", 0.01)))],
    "Elu": lambda ctx, a, x: [F.elu(x, float(a.get("alpha", 1.0)))],
    "HardSigmoid": lambda ctx, a, x: [torch.clamp(x * float(a.get("alpha", 0.2)) + float(a.get("beta", 0.5)), 0, 1)],
    "HardSwish": lambda ctx, a, x: [F.hardswish(x)], "Gelu": _gelu, "Clip": _clip,
    "Softmax": _softmax_like(torch.softmax), "LogSoftmax": _softmax_like(torch.log_softmax),
    "ReduceMean": _reduce("mean"), "ReduceSum": _reduce("sum"), "ReduceMax": _reduce("max"),
    "ReduceMin": _reduce("min"), "ReduceProd": _reduce("prod"), "ReduceL1": _reduce("l1"),
    "ReduceL2": _reduce("l2"), "ReduceSumSquare": _reduce("sumsquare"), "ReduceLogSumExp": _reduce("logsumexp"),
    "IsNaN": lambda ctx, a, x: [torch.isnan(x)], "IsInf": _is_inf,
    "Round": lambda ctx, a, x: [torch.round(x)], "Tan": lambda ctx, a, x: [torch.tan(x)],
    "Asin": lambda ctx, a, x: [torch.asin(x)], "Acos": lambda ctx, a, x: [torch.acos(x)],
    "Atan": lambda ctx, a, x: [torch.atan(x)], "Sinh": lambda ctx, a, x: [torch.sinh(x)],
    "Cosh": lambda ctx, a, x: [torch.cosh(x)],
    "Mean": lambda ctx, a, *xs: [_variadic(torch.add)(ctx, a, *xs)[0] / len(xs)],
    "CastLike": lambda ctx, a, x, like: [x.to(like.dtype)],
    "ThresholdedRelu": lambda ctx, a, x: [torch.where(x > float(a.get("alpha", 1.0)), x, torch.zeros_like(x))],
    "Celu": lambda ctx, a, x: [F.celu(x, float(a.get("alpha", 1.0)))],
    "LpNormalization": _lp_normalization, "DepthToSpace": _depth_to_space, "SpaceToDepth": _space_to_depth,
    "MatMul": _matmul, "Gemm": _gemm, "Conv": _conv, "BatchNormalization": _batchnorm,
    "LayerNormalization": _layernorm,
    "MaxPool": _pool("max"), "AveragePool": _pool("avg"),
    "GlobalAveragePool": _global_pool("avg"), "GlobalMaxPool": _global_pool("max"),
    "Flatten": _flatten, "Reshape": _reshape, "Transpose": _transpose, "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze, "Concat": _concat, "Slice": _slice, "Gather": _gather, "Shape": _shape,
    "Size": _size, "Cast": _cast, "ConstantOfShape": _constant_of_shape, "Constant": _constant,
    "Expand": _expand, "Where": _where,
    "Equal": _binary(torch.eq), "Less": _binary(torch.lt), "Greater": _binary(torch.gt),
    "LessOrEqual": _binary(torch.le), "GreaterOrEqual": _binary(torch.ge),
    "Not": lambda ctx, a, x: [torch.logical_not(x)], "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or), "Xor": _binary(torch.logical_xor),
    "Min": _variadic(torch.minimum), "Max": _variadic(torch.maximum), "Sum": _variadic(torch.add),
    "Split": _split, "Range": _range, "Tile": _tile, "Pad": _pad, "Dropout": _dropout,
    "Mod": _mod, "Sign": lambda ctx, a, x: [torch.sign(x)], "Sin": lambda ctx, a, x: [torch.sin(x)],
    "Cos": lambda ctx, a, x: [torch.cos(x)], "Softplus": lambda ctx, a, x: [F.softplus(x)],
    "Softsign": lambda ctx, a, x: [F.softsign(x)], "Selu": lambda ctx, a, x: [torch.selu(x)],
    "Mish": lambda ctx, a, x: [F.mish(x)], "PRelu": _prelu, "InstanceNormalization": _instance_norm,
    "ConvTranspose": _conv_transpose, "ArgMax": _arg(torch.argmax), "ArgMin": _arg(torch.argmin),
    "CumSum": _cumsum, "Trilu": _trilu, "Einsum": _einsum, "GatherElements": _gather_elements,
    "Resize": _resize, "GatherND": _gather_nd, "ScatterND": _scatter_nd,
    "spdy.Gelu": _fused_bias_gelu,
}


# --------------------------------------------------------------------------------------------
# prunable sites: dense kernels and 2:4 GEMMs
# --------------------------------------------------------------------------------------------

def matrix_to_weight(op_type: str, m: torch.Tensor, shape, trans_b: bool) -> torch.Tensor:
    """Inverse of weight_matrix: back to the consumed weight's layout."""
    if op_type == "Conv":
        w = m.reshape((shape[0],) + tuple(shape[2:]) + (shape[1],))
        return w.permute(0, w.dim() - 1, *range(1, w.dim() - 1)).contiguous()
    if op_type == "Gemm" and trans_b:
        return m.contiguous()
    return m.t().contiguous()


def weight_matrix(op_type: str, w: torch.Tensor, trans_b: bool) -> torch.Tensor:
    """The (outputs x reduction) matrix of a consumed weight, as Site.to_matrix (Conv: kh, kw, cin)."""
    if op_type == "Conv":
        return w.permute(0, *range(2, w.dim()), 1).reshape(w.shape[0], -1)
    if op_type == "Gemm" and trans_b:
        return w
    return w.t()


def satisfies_2_4_matrix(m: torch.Tensor) -> bool:
    if m.dim() != 2 or m.shape[1] % 4:
        return False
    return bool(((m.reshape(m.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def prune_matrix_2_4(m: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive columns (the same rule as passes.semi_structured)."""
    g = m.reshape(m.shape[0], -1, 4)
    order = torch.argsort(-g.abs().to(torch.float64), dim=-1, stable=True)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, order[..., :2], True)
    return torch.where(keep, g, torch.zeros((), dtype=g.dtype)).reshape(m.shape)


class _ReferenceBackend:
    """Not a sparse kernel: the 2:4 GEMM path (padding, im2col, bias) run densely, for CPU tests."""

    _DTYPE_SHAPE_CONSTRAINTS = {d: type("C", (), {"sparse_min_rows": 16, "sparse_min_cols": 16})
                                for d in (torch.float32, torch.float16, torch.bfloat16)}

    @staticmethod
    def from_dense(dense):
        return dense


def _sparse_classes():
    import_dynamo_without_cache_folder()   # the classes import it on first use
    import torch.sparse as ts
    return {"cusparselt": getattr(ts, "SparseSemiStructuredTensorCUSPARSELT", None),
            "cutlass": getattr(ts, "SparseSemiStructuredTensorCUTLASS", None),
            "reference": _ReferenceBackend}


_WORKING: dict[tuple, bool] = {}
_PROBE_SHAPES = [(64, 64, 111), (384, 1536, 4096), (1536, 384, 16384)]   # (N, K, rows of x)


def _probe_main(backend: str, device: str, dtype_name: str) -> int:
    """Run in a child process by sparse_backends(): a few 2:4 GEMMs with this backend, checked
    against dense. Exit status 0 when every one ran and matched."""
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device="cpu").manual_seed(0)
    for n, k, rows in _PROBE_SHAPES:
        m = prune_matrix_2_4(torch.randn(n, k, generator=gen))
        bias = torch.randn(n, generator=gen)
        lin = LinearKernel(m, bias, device=device, dtype=dtype, backend=backend)
        x = torch.randn(rows, k, generator=gen).to(device=device, dtype=dtype)
        y = lin(x).float()
        if device == "cuda":
            torch.cuda.synchronize()
        ref = x.float() @ m.to(device).float().t() + bias.to(device)
        rel = float((y - ref).norm() / ref.norm())
        if not rel < 2e-2:
            print(f"{backend}: {n}x{k} at {rows} rows: relative error {rel:.3g}", file=sys.stderr)
            return 3
    return 0


def _probe_all(backends: list[str], device: str, dtype, timeout_s: float = 180.0) -> dict[str, bool]:
    """Each backend probed in its own child process, all at once: a 2:4 kernel that faults (an
    illegal instruction poisons the whole CUDA context, seen with cuSPARSELt on an H200) must take
    down the probe, not the caller."""
    import os
    import subprocess
    dtype_name = str(dtype).replace("torch.", "")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    procs = {}
    for b in backends:
        code = (f"from spdy_onnx.runtimes.torch_onnx import _probe_main; "
                f"raise SystemExit(_probe_main({b!r}, {device!r}, {dtype_name!r}))")
        procs[b] = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
    out = {}
    for b, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            err, proc.returncode = f"no answer in {timeout_s:.0f} s", -1
        out[b] = proc.returncode == 0
        if not out[b]:
            lines = [ln for ln in (err or "").strip().splitlines() if ln.strip()]
            log.info("2:4 backend %s does not run here (probe exit %s): %s", b, proc.returncode,
                     lines[-1][:200] if lines else "")
    return out


def sparse_backends(device="cuda", dtype=torch.float16) -> list[str]:
    """2:4 backends PyTorch offers that run correctly on this GPU (cuSPARSELt first). Each is
    probed once per process, in a child process: a backend can be compiled in and still refuse the
    GPU (PyTorch's CUTLASS 2:4 kernels run on compute capability 8.x only) or fault on it."""
    classes = _sparse_classes()
    try:
        cusparselt = torch.backends.cusparselt.is_available()
    except Exception:  # older torch without torch.backends.cusparselt
        cusparselt = False
    offered = [b for b in ("cusparselt", "cutlass") if classes[b] is not None and (cusparselt or b != "cusparselt")]
    unknown = [b for b in offered if (b, str(device), dtype) not in _WORKING]
    if unknown:
        for b, ok in _probe_all(unknown, str(device), dtype).items():
            _WORKING[(b, str(device), dtype)] = ok
    return [b for b in offered if _WORKING[(b, str(device), dtype)]]


def _constraints(backend: str, dtype) -> tuple[int, int]:
    cls = _sparse_classes()[backend]
    c = cls._DTYPE_SHAPE_CONSTRAINTS[dtype]
    return int(c.sparse_min_rows), int(c.sparse_min_cols)


def _round_up(n: int, q: int) -> int:
    return -(-n // q) * q


class LinearKernel:
    """y = x @ M^T (+ bias) for x (..., K), M the (N x K) site matrix: cuBLAS dense, or a 2:4 GEMM.

    2:4 weights are zero-padded to the backend's shape multiples (K pads the input too; N is sliced
    off the output); that cost is part of what is timed.
    """

    def __init__(self, matrix: torch.Tensor, bias: torch.Tensor | None, *, device, dtype, backend: str | None):
        self.n, self.k = int(matrix.shape[0]), int(matrix.shape[1])
        self.backend = backend
        self.fused_bias = True
        if backend is None:
            self.w = matrix.to(device=device, dtype=dtype).contiguous()
            self.b = bias.to(device=device, dtype=dtype).contiguous() if bias is not None else None
            return
        if not satisfies_2_4_matrix(matrix):
            raise ValueError("the weight is not 2:4 along its reduction axis")
        rows, cols = _constraints(backend, dtype)
        self.n_pad, self.k_pad = _round_up(max(self.n, rows), rows), _round_up(max(self.k, cols), cols)
        wp = torch.zeros(self.n_pad, self.k_pad, dtype=torch.float32)
        wp[: self.n, : self.k] = matrix.to(torch.float32)
        dense = wp.to(device=device, dtype=dtype).contiguous()
        self.w = _sparse_classes()[backend].from_dense(dense)
        self.b = None
        if bias is not None:
            bp = torch.zeros(self.n_pad, dtype=torch.float32)
            bp[: self.n] = bias.reshape(-1).to(torch.float32)
            self.b = bp.to(device=device, dtype=dtype).contiguous()
        self._check(dense, bias is not None)

    def _check(self, dense: torch.Tensor, has_bias: bool):
        """The sparse GEMM must compute what the dense one does; else try the bias unfused, else fail."""
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(64, self.k, generator=gen).to(device=dense.device, dtype=dense.dtype)
        ref = x.float() @ dense[: self.n, : self.k].float().t()
        if has_bias:
            ref = ref + self.b[: self.n].float()
        for fused in ((True, False) if has_bias else (True,)):
            self.fused_bias = fused
            try:
                got = self(x).float()
            except Exception as exc:  # noqa: BLE001 - any backend failure means: not usable this way
                err = repr(exc)
                continue
            rel = float((got - ref).norm() / ref.norm().clamp_min(1e-6))
            if rel < 2e-2:
                return
            err = f"relative error {rel:.3g}"
        raise RuntimeError(f"{self.backend} 2:4 GEMM ({self.n}x{self.k}) is wrong or failed: {err}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend is None:
            return F.linear(x, self.w, self.b)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.k)
        if self.k_pad != self.k:
            x2 = F.pad(x2, (0, self.k_pad - self.k))
        y = F.linear(x2, self.w, self.b if self.fused_bias else None)
        if self.b is not None and not self.fused_bias:
            y = y + self.b
        if self.n_pad != self.n:
            y = y[:, : self.n]
        return y.reshape(*lead, self.n)


class SiteOp:
    """One prunable node (MatMul/Gemm/Conv with a folded constant weight) as a callable on its input."""

    def __init__(self, node, name: str, weight: torch.Tensor, bias: torch.Tensor | None, in_shape,
                 *, device, dtype, backend: str | None):
        self.node, self.name, self.op_type = node, name, node.op_type
        self.attrs = _attrs(node)
        self.in_shape = tuple(in_shape)
        self.backend = backend
        self.device, self.dtype = device, dtype
        a = self.attrs
        self.trans_b = bool(a.get("transB", 0)) if self.op_type == "Gemm" else False
        matrix = weight_matrix(self.op_type, weight, self.trans_b)
        if self.op_type == "Conv":
            self._init_conv(weight, bias, matrix)
        else:
            self.trans_a = bool(a.get("transA", 0)) if self.op_type == "Gemm" else False
            self.alpha = float(a.get("alpha", 1.0)) if self.op_type == "Gemm" else 1.0
            self.beta = float(a.get("beta", 1.0)) if self.op_type == "Gemm" else 1.0
            fuse = bias is not None and self.alpha == 1.0 and self.beta == 1.0 and bias.numel() == matrix.shape[0]
            self.extra_c = None
            if bias is not None and not fuse:
                self.extra_c = to_device_const(bias * self.beta, device, dtype)
            self.linear = LinearKernel(matrix, bias.reshape(-1) if fuse else None, device=device, dtype=dtype,
                                       backend=backend)

    # conv ---------------------------------------------------------------------------------------
    def _init_conv(self, weight, bias, matrix):
        a = self.attrs
        nd = weight.dim() - 2
        self.group = int(a.get("group", 1))
        self.kernel = list(a.get("kernel_shape", weight.shape[2:]))
        self.strides = list(a.get("strides", [1] * nd))
        self.dil = list(a.get("dilations", [1] * nd))
        self.begin, self.end = conv_padding(a, list(self.in_shape[2:]), self.kernel, self.strides, self.dil)
        if self.backend is None:
            w = weight.to(device=self.device, dtype=self.dtype)
            if nd == 2:
                w = w.contiguous(memory_format=torch.channels_last)
            self.w = w
            self.b = bias.to(device=self.device, dtype=self.dtype) if bias is not None else None
            return
        if nd != 2 or self.group != 1:
            raise Unsupported("2:4 convs run as GEMMs for 2-D, ungrouped convs only")
        self.cout = int(weight.shape[0])
        self.linear = LinearKernel(matrix, bias.reshape(-1) if bias is not None else None, device=self.device,
                                   dtype=self.dtype, backend=self.backend)
        self.pointwise = (self.kernel == [1, 1] and self.strides == [1, 1] and self.begin == [0, 0]
                          and self.end == [0, 0])

    def _conv_dense(self, x):
        return _conv(None, self.attrs, x, self.w, self.b)[0]

    def _conv_sparse(self, x):
        n, c, h, w = x.shape
        if self.pointwise:
            a = x.permute(0, 2, 3, 1).reshape(-1, c)
            ho, wo = h, w
        else:
            (pt, pl), (pb, pr) = self.begin, self.end
            xn = F.pad(x, [pl, pr, pt, pb]).permute(0, 2, 3, 1)
            kh, kw = self.kernel
            sh, sw = self.strides
            dh, dw = self.dil
            hp, wp = h + pt + pb, w + pl + pr
            ho = (hp - (kh - 1) * dh - 1) // sh + 1
            wo = (wp - (kw - 1) * dw - 1) // sw + 1
            cols = [xn[:, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw, :]
                    for i in range(kh) for j in range(kw)]
            a = (torch.cat(cols, dim=-1) if len(cols) > 1 else cols[0]).reshape(-1, kh * kw * c)
        y = self.linear(a)
        return y.reshape(n, ho, wo, self.cout).permute(0, 3, 1, 2)

    # any ----------------------------------------------------------------------------------------
    def __call__(self, x):
        if self.op_type == "Conv":
            return self._conv_dense(x) if self.backend is None else self._conv_sparse(x)
        if self.op_type == "Gemm" and self.trans_a:
            x = x.t()
        y = self.linear(x)
        if self.alpha != 1.0:
            y = y * self.alpha
        if self.extra_c is not None:
            y = y + self.extra_c
        return y


# --------------------------------------------------------------------------------------------
# fusions: patterns old exporters spell out op by op
# --------------------------------------------------------------------------------------------

class _Graph:
    def __init__(self, nodes, static_names, outputs):
        self.nodes = nodes
        self.static = static_names
        self.graph_outputs = set(outputs)
        self.producer = {o: i for i, n in enumerate(nodes) for o in n.output}
        self.consumers: dict[str, list[int]] = {}
        for i, n in enumerate(nodes):
            for t in n.input:
                self.consumers.setdefault(t, []).append(i)

    def only_user(self, tensor, op_type):
        users = self.consumers.get(tensor, [])
        if tensor in self.graph_outputs or len(users) != 1:
            return None
        i = users[0]
        return i if self.nodes[i].op_type == op_type else None

    def other_input(self, node, tensor):
        ins = [t for t in node.input if t != tensor]
        return ins[0] if len(ins) == 1 else None


def _scalar(static_values, name):
    t = static_values.get(name)
    if t is None or t.numel() != 1:
        return None
    return float(t.reshape(-1)[0])


def fuse_patterns(nodes, static_values: dict, outputs) -> tuple[list, dict]:
    """Replace LayerNorm and Erf-GELU subgraphs with single nodes; returns (nodes, counts)."""
    g = _Graph(nodes, set(static_values), outputs)
    drop: set[int] = set()
    replace: dict[int, onnx.NodeProto] = {}
    counts = {"LayerNorm": 0, "Gelu": 0}

    for i, n in enumerate(nodes):
        if i in drop:
            continue
        # LayerNorm: m=ReduceMean(x); d=Sub(x,m); p=Pow(d,2); v=ReduceMean(p); a=Add(v,eps); s=Sqrt(a); y=Div(d,s)
        if n.op_type == "ReduceMean" and len(n.input) == 1:
            x = n.input[0]
            axes = list(_attrs(n).get("axes", []))
            if axes != [-1]:
                continue
            sub_i = g.only_user(n.output[0], "Sub")
            if sub_i is None or nodes[sub_i].input[0] != x or nodes[sub_i].input[1] != n.output[0]:
                continue
            d = nodes[sub_i].output[0]
            users = g.consumers.get(d, [])
            if d in g.graph_outputs or len(users) != 2:
                continue
            pow_i = next((u for u in users if nodes[u].op_type == "Pow"), None)
            div_i = next((u for u in users if nodes[u].op_type == "Div"), None)
            if pow_i is None or div_i is None or _scalar(static_values, nodes[pow_i].input[1]) != 2.0:
                continue
            rm2 = g.only_user(nodes[pow_i].output[0], "ReduceMean")
            if rm2 is None or list(_attrs(nodes[rm2]).get("axes", [])) != [-1]:
                continue
            add_i = g.only_user(nodes[rm2].output[0], "Add")
            if add_i is None:
                continue
            eps = _scalar(static_values, g.other_input(nodes[add_i], nodes[rm2].output[0]))
            sqrt_i = g.only_user(nodes[add_i].output[0], "Sqrt")
            if eps is None or sqrt_i is None or list(nodes[div_i].input) != [d, nodes[sqrt_i].output[0]]:
                continue
            chain = [i, sub_i, pow_i, rm2, add_i, sqrt_i, div_i]
            out = nodes[div_i].output[0]
            scale = bias = ""
            mul_i = g.only_user(out, "Mul")
            if mul_i is not None:
                s = g.other_input(nodes[mul_i], out)
                if s in g.static and static_values[s].dim() <= 1:
                    scale, out = s, nodes[mul_i].output[0]
                    chain.append(mul_i)
                    badd = g.only_user(out, "Add")
                    if badd is not None:
                        b = g.other_input(nodes[badd], out)
                        if b in g.static and static_values[b].dim() <= 1:
                            bias, out = b, nodes[badd].output[0]
                            chain.append(badd)
            fused = helper.make_node("LayerNormalization", [x, scale, bias], [out],
                                     name=n.name + "/fused_layernorm", axis=-1, epsilon=eps)
            drop.update(chain)
            replace[chain[-1]] = fused
            counts["LayerNorm"] += 1
        # GELU: Div(x, sqrt2) -> Erf -> Add(., 1) -> Mul(x, .) -> Mul(., 0.5)
        elif n.op_type == "Div" and _scalar(static_values, n.input[1]) is not None:
            if abs(_scalar(static_values, n.input[1]) - math.sqrt(2.0)) > 1e-4:
                continue
            x = n.input[0]
            erf_i = g.only_user(n.output[0], "Erf")
            if erf_i is None:
                continue
            add_i = g.only_user(nodes[erf_i].output[0], "Add")
            if add_i is None or _scalar(static_values, g.other_input(nodes[add_i], nodes[erf_i].output[0])) != 1.0:
                continue
            mul_i = g.only_user(nodes[add_i].output[0], "Mul")
            if mul_i is None or g.other_input(nodes[mul_i], nodes[add_i].output[0]) != x:
                continue
            half_i = g.only_user(nodes[mul_i].output[0], "Mul")
            if half_i is None or _scalar(static_values, g.other_input(nodes[half_i], nodes[mul_i].output[0])) != 0.5:
                continue
            fused = helper.make_node("spdy.Gelu", [x], [nodes[half_i].output[0]], name=n.name + "/fused_gelu")
            chain = [i, erf_i, add_i, mul_i, half_i]
            drop.update(chain)
            replace[half_i] = fused
            counts["Gelu"] += 1

    out_nodes = []
    for i, n in enumerate(nodes):
        if i in replace:
            out_nodes.append(replace[i])
        elif i not in drop:
            out_nodes.append(n)
    return out_nodes, counts


# --------------------------------------------------------------------------------------------
# the executor
# --------------------------------------------------------------------------------------------

class GraphExecutor:
    """Build once (fold constants, record the dynamic steps), then run eagerly or as a CUDA graph.

    sparse: {site name: backend} for the sites to run as 2:4 GEMMs (all other sites are dense), or a
    callable (site name, make_op(backend), input) -> backend or None, asked once per site at build.
    """

    def __init__(self, model: onnx.ModelProto, feeds: dict, *, device="cuda", dtype=torch.float16,
                 sparse: dict[str, str] | None = None, fuse: bool = True):
        self.device = torch.device(device)
        self.dtype = dtype
        self.sparse = sparse if callable(sparse) else dict(sparse or {})
        model = graph_mod.constants_to_initializers(model)
        self.opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        sites, _ = graph_mod.find_sites(model)
        self.site_names = {s.name for s in sites}
        names = graph_mod._node_names(model)
        static: dict[str, torch.Tensor] = {}
        for init in model.graph.initializer:
            static[init.name] = torch.from_numpy(np.array(numpy_helper.to_array(init)))
        self.input_names = [i.name for i in model.graph.input if i.name not in static]
        self.output_names = [o.name for o in model.graph.output]
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise SpdyError(f"no input given for {', '.join(missing)}")
        # the graph inputs: static buffers on the device (CUDA graphs replay on fixed addresses)
        self.buffers: dict[str, torch.Tensor] = {}
        for name in self.input_names:
            self.buffers[name] = self._to_buffer(np.asarray(feeds[name]))
        static_ctx = Ctx("cpu", torch.float32, True, self.opset)
        self.ctx = Ctx(self.device, dtype, False, self.opset)
        self.static = static

        nodes = list(model.graph.node)
        name_of = {id(n): nm for n, nm in zip(nodes, names)}
        self.fusions = {"LayerNorm": 0, "Gelu": 0, "bias": 0}
        if fuse:
            nodes, counts = fuse_patterns(nodes, static, self.output_names)
            self.fusions.update(counts)
        g = _Graph(nodes, set(static), self.output_names)

        # build run: fold what does not depend on input values (on the CPU, once); run the rest once
        # on the real inputs, recording each step, the shapes, and what each site sees
        env: dict[str, torch.Tensor] = dict(self.buffers)
        self.steps = []
        self.shapes: dict[str, tuple] = {}
        self.site_info: dict[str, dict] = {}
        skip: set[int] = set()
        for idx, node in enumerate(nodes):
            if idx in skip:
                continue
            name = name_of.get(id(node), node.name or node.output[0])
            if node.op_type in ("Shape", "Size") and node.input[0] in env:
                for o, v in zip(node.output, OPS[node.op_type](static_ctx, _attrs(node), env[node.input[0]])):
                    static[o] = v
                continue
            if all((t == "" or t in static) for t in node.input):
                self._fold(node, static, static_ctx)
                continue
            missing = [t for t in node.input if t and t not in static and t not in env]
            if missing:
                raise SpdyError(f"the PyTorch executor found no value for '{missing[0]}' (node '{node.name}'): "
                                "is the graph topologically sorted?")
            bias = None
            if node.op_type == "MatMul" and name in self.site_names and node.input[1] in static:
                bias = self._bias_after(g, idx, node, static)
                if bias is not None:
                    skip.add(bias[2])
                    self.fusions["bias"] += 1
            step = self._make_step(node, name, static, env, bias)
            outs = step(env)
            self.steps.append(step)
            for o, v in zip(step.outputs, outs):
                env[o] = v
                self.shapes[o] = tuple(v.shape)
        for o in self.output_names:
            if o not in env and o not in static:
                raise SpdyError(f"the PyTorch executor did not compute output '{o}'")
        self._graph = None
        self._out = None

    # ---------------------------------------------------------------------------------------------
    def _to_buffer(self, arr: np.ndarray) -> torch.Tensor:
        # a copy: on the CPU, from_numpy would share memory with the caller's array, and run() copies
        # later feeds into the buffer, overwriting the caller's data
        t = torch.from_numpy(np.array(arr, copy=True, order="C"))
        if t.is_floating_point():
            t = t.to(self.dtype)
        t = t.to(self.device)
        if t.dim() == 4 and t.is_floating_point():
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    def _fold(self, node, static, ctx):
        fn = OPS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if fn is None:
            raise Unsupported(f"the PyTorch executor does not run op {node.domain + '.' if node.domain else ''}"
                              f"{node.op_type} (node '{node.name}')")
        args = [static[t] if t else None for t in node.input]
        outs = fn(ctx, _attrs(node), *args) if node.op_type != "Split" else \
            _split(ctx, _attrs(node), *args, n_out=len(node.output))
        for o, v in zip(node.output, outs):
            if o:
                static[o] = v

    def _bias_after(self, g, idx, node, static):
        """(bias, output name, index of the Add) when the site's only user adds a 1-D constant bias."""
        add_i = g.only_user(node.output[0], "Add")
        if add_i is None:
            return None
        b = g.other_input(g.nodes[add_i], node.output[0])
        w = static[node.input[1]]
        if b not in static or static[b].dim() != 1 or static[b].numel() != w.shape[-1]:
            return None
        return static[b], g.nodes[add_i].output[0], add_i, b

    def _make_step(self, node, name, static, env, bias_and_out):
        if node.op_type in SITE_OPS and name in self.site_names and len(node.input) > 1 \
                and node.input[1] in static and node.input[0] in env:
            return self._site_step(node, name, static, env, bias_and_out)
        fn = OPS.get(node.op_type) if node.domain in ("", "ai.onnx") or node.op_type.startswith("spdy.") else None
        if fn is None:
            raise Unsupported(f"the PyTorch executor does not run op {node.op_type} (node '{node.name}')")
        params = PARAMS.get(node.op_type, set())
        plan = []
        for k, t in enumerate(node.input):
            if not t:
                plan.append(("none", None))
            elif t in static:
                v = static[t]
                if node.op_type == "Gather" and k == 1:  # negative indices resolved once, here
                    data = env.get(node.input[0], static.get(node.input[0]))
                    n = data.shape[int(_attrs(node).get("axis", 0)) % data.dim()]
                    v = torch.where(v < 0, v + n, v)
                plan.append(("const", v if k in params else to_device_const(v, self.device, self.dtype)))
            else:
                plan.append(("dyn", t))
        attrs = _attrs(node)
        ctx = self.ctx
        n_out = len(node.output)
        outputs = list(node.output)
        if node.op_type == "Split":
            def call(*args):
                return _split(ctx, attrs, *args, n_out=n_out)
        else:
            def call(*args):
                return fn(ctx, attrs, *args)

        def step(env):
            args = [env[v] if kind == "dyn" else v for kind, v in plan]
            return call(*args)

        step.outputs = outputs
        step.node = node
        return step

    def _site_step(self, node, name, static, env, bias_and_out):
        x = env[node.input[0]]
        weight = static[node.input[1]].to(torch.float32)
        bias = bias_name = None
        outputs = list(node.output)
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
            if node.input[2] not in static:
                raise Unsupported(f"{node.op_type} '{name}' has a computed bias; not supported")
            bias_name = node.input[2]
            bias = static[bias_name].to(torch.float32)
        if bias_and_out is not None:
            bias, out, _, bias_name = bias_and_out
            bias = bias.to(torch.float32)
            outputs = [out]
        def make(backend_name, w=weight):
            return SiteOp(node, name, w, bias, tuple(x.shape), device=self.device, dtype=self.dtype,
                          backend=backend_name)

        backend = self.sparse(name, make, x) if callable(self.sparse) else self.sparse.get(name)
        op = make(backend)
        self.site_info[name] = {"node": node, "weight": weight, "bias": bias, "in_shape": tuple(x.shape),
                                "in_format_cl": x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last),
                                "backend": backend, "bias_name": bias_name}
        src = node.input[0]

        def step(env):
            return [op(env[src])]

        step.outputs = outputs
        step.node = node
        step.site = name
        step.op = op
        return step

    def site_op(self, name: str, backend: str | None, weight: torch.Tensor | None = None) -> SiteOp:
        """A fresh op for one site (its real input shape), dense or 2:4; for per-site timing."""
        info = self.site_info[name]
        w = info["weight"] if weight is None else weight
        return SiteOp(info["node"], name, w, info["bias"], info["in_shape"], device=self.device,
                      dtype=self.dtype, backend=backend)

    # ---------------------------------------------------------------------------------------------
    def _run_steps(self):
        env = dict(self.buffers)
        for step in self.steps:
            for o, v in zip(step.outputs, step(env)):
                env[o] = v
        return [env[o] if o in env else to_device_const(self.static[o], self.device, self.dtype)
                for o in self.output_names]

    def capture(self) -> bool:
        """Capture the steps into a CUDA graph; False (eager replays) if capture fails."""
        if self.device.type != "cuda":
            return False
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self._run_steps()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = self._run_steps()
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001
            log.warning("CUDA graph capture failed (%s): timing eager launches instead", str(exc).splitlines()[0])
            self._graph = None
            torch.cuda.synchronize()
            return False
        self._graph, self._out = g, out
        return True

    def replay(self):
        if self._graph is not None:
            self._graph.replay()
            return self._out
        return self._run_steps()

    def _load(self, feeds: dict | None):
        for name, arr in (feeds or {}).items():
            self.buffers[name].copy_(self._to_buffer(np.asarray(arr)))

    def forward(self, feeds: dict | None = None) -> list[torch.Tensor]:
        """Outputs as tensors, run eagerly (autograd sees them when grad is enabled)."""
        self._load(feeds)
        return self._run_steps()

    def run(self, feeds: dict | None = None) -> list[np.ndarray]:
        """Outputs as float32/int numpy arrays (copies feeds into the input buffers first)."""
        self._load(feeds)
        outs = self.replay()
        res = []
        for t in outs:
            t = t.detach()
            res.append((t.float() if t.is_floating_point() else t).cpu().numpy())
        return res
