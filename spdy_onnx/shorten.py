"""Shorter copies of a fixed-length token model, so that calibration work skips the padding.

Why: engines like DeepSparse compile one static shape, so encoders are exported with a fixed sequence
length (MiniLM-L6: 128) and calibration sentences are padded to it, yet they average about 28 real
tokens. Every forward and backward pass of the search and of the global correction spent most of its
arithmetic on padding that no loss looks at. A copy of the graph for length n (inputs (batch, n), the
shape constants that name the length rewritten, position-like constants cut) computes the same
real-token outputs for a right-padded sample whose real tokens fit in n with a fraction of the
arithmetic (what a run still pays for reading the weights stays: the search's evaluations gained less
than the correction's training steps).

The rewrite is a heuristic, so it is never trusted: each short copy is used only after it reproduced
the full model's outputs at the real positions of a calibration sample. A model it does not fit
(no padding mask, left padding, a length baked in some other way) simply runs at full length.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

from spdy_onnx import calibrate

log = logging.getLogger(__name__)

STEP = 16            # short lengths are multiples of this: few copies, little padding left
MAX_SHAPE_LEN = 8    # 1-D integer constants up to this size are read as shapes
TOLERANCE = 1e-3     # relative error of a short copy's real-token outputs that still counts as the same

# inputs of these (op, input index) are data, never shapes or positions: a weight whose size happens to
# equal the sequence length must not be cut
_DATA_SLOTS = {("MatMul", 1), ("Gemm", 1), ("Conv", 1), ("Gather", 0), ("ConvTranspose", 1)}


def padded_length(model: onnx.ModelProto, feed: dict) -> int | None:
    """The fixed sequence length L when the model takes (batch, L, ...) inputs with a padding mask."""
    if calibrate.token_mask(feed) is None:
        return None
    lengths = set()
    for inp in model.graph.input:
        if inp.name not in feed:
            continue
        dims = inp.type.tensor_type.shape.dim
        if len(dims) < 2 or not dims[1].HasField("dim_value"):
            return None
        lengths.add(int(dims[1].dim_value))
    if len(lengths) != 1:
        return None
    length = lengths.pop()
    return length if length > STEP else None


def real_length(feed: dict) -> int:
    """One past the last real token of any sample in the feed (cutting after it loses nothing)."""
    mask = calibrate.token_mask(feed)
    if mask is None:
        return next(iter(feed.values())).shape[1]
    any_real = mask.any(axis=0)
    return int(np.nonzero(any_real)[0][-1]) + 1 if any_real.any() else 1


def bucket(length: int, full: int) -> int:
    return min(full, -(-length // STEP) * STEP)


def trim(feed: dict, n: int, full: int) -> dict:
    """The feed cut to n positions (inputs laid out (batch, full, ...))."""
    return {k: (v[:, :n] if v.ndim >= 2 and v.shape[1] == full else v) for k, v in feed.items()}


def shorten(model: onnx.ModelProto, full: int, n: int, inputs=None) -> onnx.ModelProto:
    """A copy of `model` for sequence length n instead of `full`; `inputs`: the names of the data
    inputs to cut (default: every input that is not an initializer; weights fed as inputs are not)."""
    from spdy_onnx.graph import constants_to_initializers
    out = constants_to_initializers(model)   # a copy
    g = out.graph
    data_slots, nd_indices = set(), set()
    for node in g.node:
        for k, t in enumerate(node.input):
            if (node.op_type, k) in _DATA_SLOTS:
                data_slots.add(t)
        if node.op_type == "GatherND" and len(node.input) > 1:
            nd_indices.add(node.input[1])   # (..., positions, k): dynamo's mask[:, None, None, :]
    initialized = {i.name for i in g.initializer}
    to_cut = [i for i in g.input if i.name not in initialized and (inputs is None or i.name in inputs)]
    for inp in to_cut + list(g.output):
        dims = inp.type.tensor_type.shape.dim
        for axis in range(1, len(dims)):
            if dims[axis].HasField("dim_value") and dims[axis].dim_value == full:
                dims[axis].dim_value = n
    del g.value_info[:]
    for k, init in enumerate(g.initializer):
        dims = list(init.dims)
        index_dims = dims[:-1] if init.name in nd_indices else dims   # an index tuple's own axis stays
        if init.name in data_slots or not (len(dims) <= 1 and _prod(dims) <= MAX_SHAPE_LEN
                                          or len(dims) >= 2 and full in index_dims and set(index_dims) <= {1, full}):
            continue   # judged from the dims alone: weights are never converted
        arr = numpy_helper.to_array(init)
        new = None
        if arr.ndim == 1 and arr.size <= MAX_SHAPE_LEN and np.issubdtype(arr.dtype, np.integer) \
                and (arr == full).any():
            new = np.where(arr == full, n, arr).astype(arr.dtype)
        elif arr.ndim == 0 and np.issubdtype(arr.dtype, np.integer) and int(arr) == full:
            new = np.array(n, dtype=arr.dtype)
        elif arr.ndim >= 2 and full in index_dims and all(d in (1, full) for d in index_dims):
            new = arr[tuple(slice(0, n) if d == full else slice(None) for d in index_dims)]
        if new is not None:
            g.initializer[k].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new), init.name))
    return out


def _prod(dims) -> int:
    out = 1
    for d in dims:
        out *= int(d)
    return out


def _relative_error(full_out: np.ndarray, short_out: np.ndarray, n: int, mask) -> float:
    if full_out.ndim >= 2 and short_out.ndim == full_out.ndim and short_out.shape[1] == n \
            and full_out.shape[1] != n:
        full_out = full_out[:, :n]
        if mask is not None and full_out.ndim >= 3:
            m = mask[:, :n]
            full_out, short_out = full_out[m], short_out[m]
    if full_out.shape != short_out.shape:
        return float("inf")
    scale = float(np.abs(full_out).max()) or 1.0
    return float(np.abs(full_out.astype(np.float64) - short_out).max() / scale)


class LengthBuckets:
    """Verified short copies of one model, by length; None where only the full length is safe.

    A copy for length n is checked once, on a feed whose real tokens fit in n. Other graphs that differ
    from `model` only in weight values (its pruned copies) are cut the same way with `copy_of`.
    """

    def __init__(self, model: onnx.ModelProto, sample_feed: dict):
        self.model = model
        self.inputs = set(sample_feed)
        self.full = padded_length(model, sample_feed)
        self._short: dict[int, onnx.ModelProto | None] = {}

    @property
    def enabled(self) -> bool:
        return self.full is not None

    def copy_of(self, model: onnx.ModelProto, n: int) -> onnx.ModelProto:
        return shorten(model, self.full, n, self.inputs)

    def length_of(self, feed: dict) -> int:
        if self.full is None:
            return next(iter(feed.values())).shape[1]
        return bucket(real_length(feed), self.full)

    def cut(self, feed: dict, run_full, run_short) -> tuple[int | None, dict]:
        """(n, the feed cut to n) when a verified copy of length n exists, else (None, the whole feed).
        `run_short(n, model, feed)` runs a candidate copy (and may keep its session for length n)."""
        if self.full is None:
            return None, feed
        n = self.length_of(feed)
        if self.model_for(n, feed, run_full, lambda model, f: run_short(n, model, f)) is None:
            return None, feed
        return n, trim(feed, n, self.full)

    def model_for(self, n: int, check_feed: dict, run_full, run_short) -> onnx.ModelProto | None:
        """The short copy for length n, or None. `run_full(feed)` / `run_short(model, feed)` return the
        outputs (a list of arrays) of the full model and of a candidate copy."""
        if self.full is None or n >= self.full:
            return None
        if n not in self._short:
            self._short[n] = self._verified(n, check_feed, run_full, run_short)
        return self._short[n]

    def release(self, n: int) -> None:
        """Drop the stored copy for length n (a big model's copy holds all its weights)."""
        self._short.pop(n, None)

    def _verified(self, n, check_feed, run_full, run_short):
        if real_length(check_feed) > n:
            return None
        try:
            short = shorten(self.model, self.full, n, self.inputs)
            short_outs = run_short(short, trim(check_feed, n, self.full))
            full_outs = run_full(check_feed)
        except Exception as exc:  # noqa: BLE001 - any failure means: run this length in full
            log.debug("no short copy of length %d: %s", n, exc)
            return None
        mask = calibrate.token_mask(check_feed)
        err = max(_relative_error(np.asarray(f), np.asarray(s), n, mask) for f, s in zip(full_outs, short_outs))
        if not err <= TOLERANCE:
            log.info("the graph cut to %d tokens does not reproduce the full model (relative error %.2g): "
                     "calibration runs that length in full", n, err)
            return None
        log.debug("short copy of length %d verified (relative error %.2g)", n, err)
        return short
