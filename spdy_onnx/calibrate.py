"""Calibration data: loading and checking it, and the per-site Hessians H = X^T X from activations.

Data is an .npz (arrays keyed by input name, first axis = samples) or a folder of .npz files, one
sample each. Activations are captured with onnxruntime, streamed batch by batch, so memory stays
bounded by one batch of activations plus one K x K matrix per distinct site input.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import onnx
from tqdm.auto import tqdm

from spdy_onnx import blas
from spdy_onnx.errors import SpdyError
from spdy_onnx.ort_session import make_session, run

log = logging.getLogger(__name__)


def _read_npz(path: Path, what: str = "calibration") -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:  # numpy raises many kinds on damaged files (incl. tokenize errors in headers)
        raise SpdyError(f"cannot read {what} file {path}: {type(exc).__name__}: {exc}") from None


def sample_shapes(path) -> dict[str, tuple[int, ...]]:
    """{array name: shape} as stored, read from the .npy headers without loading the arrays (of the
    first file, for a folder); {} when the path cannot be read: load_data gives the error later."""
    import zipfile
    if isinstance(path, dict):   # the arrays themselves
        return {k: tuple(np.shape(v)) for k, v in path.items()}
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            return {}
        path = files[0]
    try:
        with zipfile.ZipFile(path) as z:
            out = {}
            for member in z.namelist():
                if not member.endswith(".npy"):
                    continue
                with z.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    out[member[:-4]] = tuple(int(d) for d in read(f)[0])
            return out
    except Exception:   # damaged or not a zip: load_data says so with the file's name
        return {}


def check_kind(data, what: str = "calibration") -> None:
    """Data is a path (an .npz file or a folder of them) or {input name: array}; anything else is one error,
    not a TypeError from deep in the pipeline (the Python API takes any object)."""
    if not isinstance(data, (str, os.PathLike, dict)):
        raise SpdyError(f"{what} data must be an .npz file, a folder of them, or {{input name: array}}; got "
                        f"{type(data).__name__}")


def load_data(path, specs: dict, *, samples: int | None = None, what: str = "calibration",
              defaults: set | None = None, index_rows: dict | None = None) -> dict[str, np.ndarray]:
    """Arrays keyed by model input, first axis = samples, checked against the model's inputs.

    `what` names the data in errors (calibration, validation). `path` may also be the arrays themselves,
    {input name: array with samples first}, from the Python API."""
    if isinstance(path, dict):
        return check_data(path, specs, samples=samples, source="given as arrays", what=what, defaults=defaults,
                          index_rows=index_rows)
    check_kind(path, what)
    path = Path(path)
    if samples is not None and samples < 1:
        raise SpdyError(f"--samples must be >= 1, got {samples}")
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise SpdyError(f"{what} folder {path} has no .npz files")
        if samples:
            files = files[:samples]
        per_sample = [_read_npz(f, what) for f in files]
        names = set(per_sample[0])
        for f, d in zip(files, per_sample):
            if set(d) != names:
                raise SpdyError(f"{what} file {f.name} has arrays {sorted(d)}, the first has {sorted(names)}")
        data = {}
        for name in names:
            arrays = []
            for f, d in zip(files, per_sample):
                a = d[name]
                want = specs[name][0][1:] if name in specs else None
                if want is not None and a.shape == (1,) + tuple(want):
                    a = a[0]          # a sample saved with its batch axis of 1
                arrays.append(a)
            shapes = {a.shape for a in arrays}
            if len(shapes) != 1:
                raise SpdyError(f"{what} input '{name}' has samples of different shapes: {sorted(shapes)[:3]}")
            data[name] = np.stack(arrays)
    elif path.is_file():
        data = _read_npz(path, what)
    else:
        raise SpdyError(f"no such {what} data: {path}")
    return check_data(data, specs, samples=samples, source=str(path), what=what, defaults=defaults,
                      index_rows=index_rows)


def check_data(data: dict, specs: dict, *, samples: int | None = None, source: str = "data",
               what: str = "calibration", defaults: set | None = None, index_rows: dict | None = None) -> dict:
    """The arrays for `specs`, checked and cast; `defaults`: graph inputs that have a default value
    (an initializer), which are not fed: arrays for them are ignored with a warning; `index_rows`:
    {input: (rows, node)} for ids into a table (modelio.index_rows), checked to lie inside it."""
    missing = [n for n in specs if n not in data]
    if missing:
        raise SpdyError(f"{what} data {source} lacks model input(s) {', '.join(missing)}; it has "
                        f"{', '.join(sorted(data)) or 'no arrays'} (arrays must be keyed by the model's input names)")
    extra = sorted(set(data) - set(specs))
    given_defaults = [n for n in extra if n in (defaults or ())]
    others = [n for n in extra if n not in given_defaults]
    if others:
        log.info("%s data: ignoring arrays that are not model inputs: %s", what, ", ".join(others))
    if given_defaults:   # the user meant them to be used: say that they are not
        log.warning("%s data: %s %s graph input(s) with a default value in the model (an initializer of the "
                    "same name); the default is used, not these arrays", what, ", ".join(given_defaults),
                    "is a" if len(given_defaults) == 1 else "are")
    out, count = {}, None
    for name, (shape, dtype) in specs.items():
        a = np.asarray(data[name])
        if a.ndim == 0 or a.shape[0] == 0:
            raise SpdyError(f"{what} input '{name}' ({source}) is empty")
        if a.ndim == len(shape) + 1 and a.shape[1] == 1 and tuple(a.shape[2:]) == tuple(shape[1:]):
            a = a[:, 0]   # samples saved with their batch axis of 1, as a folder's files may be
        if tuple(a.shape[1:]) != tuple(shape[1:]):
            raise SpdyError(f"{what} input '{name}' has samples of shape {tuple(a.shape[1:])}; the model "
                            f"expects {tuple(shape[1:])} (first axis = samples; the model's fixed dimensions "
                            "and --input-shape, where given, set this)")
        if np.issubdtype(dtype, np.floating):
            if not np.issubdtype(a.dtype, np.floating):
                raise SpdyError(f"{what} input '{name}' is {a.dtype}; the model expects {np.dtype(dtype)}")
            with np.errstate(over="ignore", invalid="ignore"):
                cast = a.astype(dtype, copy=False)
            if not np.isfinite(cast).all():
                raise SpdyError(f"{what} input '{name}' contains NaN or infinity (as {np.dtype(dtype)})")
        elif np.issubdtype(dtype, np.integer):
            if not np.issubdtype(a.dtype, np.integer):
                raise SpdyError(f"{what} input '{name}' is {a.dtype}; the model expects {np.dtype(dtype)}")
            if name in (index_rows or {}) and a.size:
                rows, node = index_rows[name]
                low, high = int(a.min()), int(a.max())
                if low < -rows or high >= rows:
                    raise SpdyError(f"{what} input '{name}' has values from {low} to {high}, but it indexes a "
                                    f"table of {rows} rows (Gather '{node}'): ids must be 0 to {rows - 1}. Was "
                                    "the data made with this model's tokenizer or vocabulary?")
        elif a.dtype != dtype:
            raise SpdyError(f"{what} input '{name}' is {a.dtype}; the model expects {np.dtype(dtype)}")
        if count is not None and a.shape[0] != count:
            raise SpdyError(f"{what} inputs have different sample counts ({count} and {a.shape[0]} for '{name}')")
        count = a.shape[0]
        out[name] = a.astype(dtype, copy=False)
    batch = next(iter(specs.values()))[0][0] if specs else 1
    if samples:
        out = {k: v[:samples] for k, v in out.items()}
        if min(samples, count) < batch:   # the cap, not the file, leaves too few
            raise SpdyError(f"--samples {samples} is fewer than the batch size {batch}: every feed is one whole "
                            f"batch; use at least --samples {batch}")
    if count < batch:
        raise SpdyError(f"{what} data has {count} sample(s), fewer than the batch size {batch}")
    return out


def data_digest(data: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(data):
        a = np.ascontiguousarray(data[name])
        h.update(f"{name}:{a.dtype}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def n_samples(data: dict) -> int:
    return int(next(iter(data.values())).shape[0])


def batches(data: dict, batch_size: int, limit: int | None = None):
    """Feeds of exactly `batch_size` samples (the model may fix its batch); a remainder is dropped."""
    n = n_samples(data) if limit is None else min(limit, n_samples(data))
    for start in range(0, n - batch_size + 1, batch_size):
        yield {k: v[start:start + batch_size] for k, v in data.items()}


MASK_NAMES = ("attention_mask", "input_mask", "mask")


def token_mask(feed: dict) -> np.ndarray | None:
    """The (batch, seq) padding mask of a transformer encoder's feed, if it has one.

    Padded positions are computed but never used; with short sentences padded to a fixed length they
    are most of the activations, so Hessians and losses count only real tokens (1 in the mask).
    """
    for name, value in feed.items():
        if name.lower() in MASK_NAMES and value.ndim == 2 and \
                (np.issubdtype(value.dtype, np.integer) or value.dtype == np.bool_):
            mask = value != 0
            return mask if mask.any() else None
    return None


def masked_rows(x: np.ndarray, rows: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Keep the rows of real tokens when x is laid out (batch, seq, ...) like the mask."""
    if mask is None or x.ndim < 3 or x.shape[:2] != mask.shape or rows.shape[0] != mask.size:
        return rows
    return rows[mask.ravel()]


def timing_batch(data: dict, specs: dict) -> dict:
    """Real inputs for timing: the first batch of calibration samples."""
    batch = next(iter(specs.values()))[0][0]
    return next(batches(data, batch))


# --- activations -> Hessians -------------------------------------------------------------------

def with_outputs(model: onnx.ModelProto, extra_outputs: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs these tensors (the activation capture, the correction's
    layer targets); onnxruntime keeps requested outputs through its graph optimisations."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for name in extra_outputs:
        if name not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
            have.add(name)
    return m


def _conv_pads(site, in_hw):
    nd = len(site.kernel_shape)
    if site.pads:
        return list(site.pads)
    pads = [0] * (2 * nd)  # auto_pad SAME_*: resolve from the input size
    for i in range(nd):
        out = -(-in_hw[i] // site.strides[i])
        total = max(0, (out - 1) * site.strides[i] + (site.kernel_shape[i] - 1) * site.dilations[i] + 1 - in_hw[i])
        pads[i], pads[i + nd] = total // 2, total - total // 2
    return pads


def site_rows(site, x: np.ndarray) -> np.ndarray:
    """The rows of the reduction: (n_rows, K), with K in the order of Site.to_matrix's columns."""
    if site.op_type == "Conv":
        if len(site.kernel_shape) != 2 or site.group != 1:
            raise NotImplementedError("only 2-D convs with group 1 are reconstructed")
        b, c, h, w = x.shape
        kh, kw = site.kernel_shape
        sh, sw = site.strides
        dh, dw = site.dilations
        pt, pl, pb, pr = _conv_pads(site, (h, w))
        xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
        ho = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
        wo = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
        cols = [xp[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
                for i in range(kh) for j in range(kw)]
        patches = np.stack(cols, axis=-1)                     # (b, c, ho, wo, kh*kw)
        return patches.transpose(0, 2, 3, 4, 1).reshape(-1, kh * kw * c)
    if site.op_type == "Gemm" and site.trans_a:
        return x.reshape(-1, x.shape[-1]).T    # A is (K, M): its rows are the columns
    return x.reshape(-1, x.shape[-1])


FLUSH_ELEMENTS = 8_000_000   # rows gathered per input before one GEMM (about 32 MB of float32)


class _RowAccumulator:
    """Sum of x x^T over rows, computed in large GEMMs: per-sample GEMMs with few rows (short sentences)
    spend their time in overhead and in adding K x K matrices, not in the multiply."""

    def __init__(self):
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0
        self.total: np.ndarray | None = None
        self.rows = 0

    def add(self, rows: np.ndarray) -> None:
        if rows.shape[0] == 0:
            return
        self.pending.append(rows)
        self.pending_rows += rows.shape[0]
        self.rows += rows.shape[0]
        if self.pending_rows * rows.shape[1] >= FLUSH_ELEMENTS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        x = self.pending[0] if len(self.pending) == 1 else np.concatenate(self.pending)
        self.pending, self.pending_rows = [], 0
        h = blas.gram(x)                          # float32 GEMM, float64 accumulation across flushes
        if self.total is None:
            self.total = h.astype(np.float64)
        else:
            self.total += h

    def mean(self, k: int) -> np.ndarray:
        self.flush()
        if self.total is None:
            return np.zeros((k, k))
        return self.total / max(1, self.rows)


def hessians(model: onnx.ModelProto, sites, data: dict, batch_size: int, *,
             progress=True) -> dict[str, np.ndarray]:
    """{site name: H} with H = sum over rows of x x^T / n_rows, float64, sites sharing an input share H.

    Padded token batches run cut to their real length (rounded up) on verified short copies of the
    graph (spdy_onnx.shorten), one length at a time so that at most two sessions hold the weights:
    the rows are the same real-token rows, for a fraction of the forward passes' arithmetic
    (BERT-base size, 1,024 sentences of about 28 tokens padded to 128: most of this phase).
    """
    from spdy_onnx import shorten   # shorten imports this module

    inputs = sorted({s.input for s in sites})
    captured = with_outputs(model, inputs)
    sess = make_session(captured, optimize=False)
    out_names = [o.name for o in sess.get_outputs()]
    groups: dict[tuple, list] = {}
    for s in sites:
        geometry = (s.input, s.op_type == "Conv", s.kernel_shape, s.strides, s.pads, s.dilations, s.trans_a)
        groups.setdefault(geometry, []).append(s)
    acc = {geometry: _RowAccumulator() for geometry in groups}
    widths: dict[tuple, int] = {}
    feeds = list(batches(data, batch_size))
    buckets = shorten.LengthBuckets(captured, feeds[0]) if feeds else None
    by_length: dict[int, list] = {}
    for feed in feeds:
        by_length.setdefault(buckets.length_of(feed) if buckets.enabled else 0, []).append(feed)

    def run_full(feed):
        return run(sess, out_names, feed)

    short = {}   # the session of the short copy for the length being captured

    def run_short(short_model, feed):
        short["session"] = make_session(short_model, optimize=False)
        return run(short["session"], out_names, feed)

    bar = tqdm(total=len(feeds), desc="activations", unit="batch", disable=not progress, leave=False)
    for n in sorted(by_length):
        group = by_length[n]
        use = buckets.enabled and buckets.model_for(n, group[0], run_full, run_short) is not None
        this = short["session"] if use else sess
        for feed in group:
            if use:
                feed = shorten.trim(feed, n, buckets.full)
            values = dict(zip(out_names, run(this, out_names, feed)))
            mask = token_mask(feed)
            for geometry, members in groups.items():
                x = np.asarray(values[geometry[0]], dtype=np.float32)
                rows = masked_rows(x, site_rows(members[0], x), mask)
                widths[geometry] = rows.shape[1]
                acc[geometry].add(np.ascontiguousarray(rows))
            bar.update(1)
        this = None
        short.clear()
        if buckets.enabled:
            buckets.release(n)
    bar.close()
    result = {}
    for geometry, members in groups.items():
        h = acc[geometry].mean(widths.get(geometry, 0))
        if not np.isfinite(h).all():
            raise SpdyError(f"the activations at '{geometry[0]}' overflow on the calibration data (inf or NaN); "
                            "check the data's scale and preprocessing")
        for s in members:
            result[s.name] = h
    return result
