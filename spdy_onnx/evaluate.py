"""Label-free loss of a stitched candidate against the dense model, on calibration data.

One onnxruntime session for the whole search: every site's weight becomes a graph input, so a
candidate is evaluated by feeding its weights, never by building a new session.
"""
from __future__ import annotations

import json
import logging
import math
import re

import numpy as np
import onnx

from spdy_onnx import calibrate, shorten
from spdy_onnx.errors import SpdyError
from spdy_onnx.journal import Journal
from spdy_onnx.ort_session import make_session, run

log = logging.getLogger(__name__)

DEFAULT_EVAL_SAMPLES = 16  # per candidate; the same samples for all, so comparisons are paired


def weights_as_inputs(model: onnx.ModelProto, weight_names: list[str]) -> onnx.ModelProto:
    """A copy where the named initializers are graph inputs instead (same name, dtype and shape)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    wanted = set(weight_names)
    keep = []
    for init in out.graph.initializer:
        if init.name in wanted:
            out.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            keep.append(init)
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    # an initializer may already have been listed as an input by old exporters: keep one entry
    seen, inputs = set(), []
    for value in out.graph.input:
        if value.name not in seen:
            seen.add(value.name)
            inputs.append(value)
    del out.graph.input[:]
    out.graph.input.extend(inputs)
    return out


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean KL(softmax(ref) || softmax(x)) over all leading positions."""
    def log_softmax(z):
        z = z.astype(np.float64)
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


# a probability the engine rounded to 0 counts as this one, so that KL stays finite
TINY_PROBABILITY = 1e-30


def kl_of_probabilities(ref_probs: np.ndarray, probs: np.ndarray) -> float:
    """Mean KL(ref || x) over all leading positions, for outputs that already are distributions (a
    Softmax at the end of the graph): the softmax of probabilities would be nearly uniform."""
    lp = np.log(np.maximum(ref_probs.astype(np.float64), TINY_PROBABILITY))
    lq = np.log(np.maximum(probs.astype(np.float64), TINY_PROBABILITY))
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def normalised_mse(ref: np.ndarray, out: np.ndarray, scale: float | None = None) -> float:
    """Squared error over the reference's energy, or over `scale` per sample (first axis) when given:
    see centred_scale."""
    ref = ref.astype(np.float64)
    den = float(np.sum(ref ** 2)) if scale is None else scale * len(ref)
    num = float(np.sum((out.astype(np.float64) - ref) ** 2))
    return num / den if den > 0 else num


def centred_scale(refs: list[np.ndarray]) -> float | None:
    """The per-sample energy of a (batch,) or (batch, k) output (or one bounded to [0, 1]) around its mean over the calibration
    samples, or None when it does not vary. Normalised by this, an output with an offset (a sigmoid's
    boxes near 0.5, a regression around 3) that loses what each sample says scores about 1; over its
    raw energy, mostly the offset, it scored 0.01-0.15 and looked fine."""
    rows = np.concatenate([np.asarray(r, dtype=np.float64).reshape(len(r), -1) for r in refs])
    if len(rows) < 2:
        return None
    centred = float(np.sum((rows - rows.mean(axis=0)) ** 2)) / len(rows)
    raw = float(np.sum(rows ** 2)) / len(rows)
    return centred if centred > 1e-9 * raw and centred > 0 else None


# a rank-2 output named with one of these is a vector to keep, not class scores (sentence_embedding,
# pooler_output, image_embeds, features): KL would compare softmaxes of its coordinates
EMBEDDING_WORDS = ("embed", "pool", "hidden", "feature", "vector", "encod")

# the loss of each kind: KL of logits, KL of probabilities (an output that is already a distribution),
# normalised MSE
LOSSES = {"kl": kl_divergence, "kl-probs": kl_of_probabilities, "mse": normalised_mse}
# a KL kind with this suffix takes its classes on axis 1, per pixel: (N, classes, H, W) segmentation scores
CHANNELS = "-channels"


def class_axis_last(kind: str, ref, out):
    """(the kind without CHANNELS, ref, out) with the class axis moved last when the kind has it; works
    on numpy arrays and torch tensors."""
    if not kind.endswith(CHANNELS):
        return kind, ref, out
    move = (lambda a: a.movedim(1, -1)) if hasattr(ref, "movedim") else (lambda a: np.moveaxis(a, 1, -1))
    return kind[: -len(CHANNELS)], move(ref), move(out)


# ops whose output can be class scores: a linear layer, or its bias, or log-probabilities. A rank-2
# output made by anything else (LayerNorm, Tanh, pooling, an activation) is a vector to keep
SCORE_OPS = ("Gemm", "MatMul", "Add", "Conv", "Einsum", "Sub", "LogSoftmax")
# ops that only reshape, skipped when looking for what made an output
SHAPE_OPS = ("Identity", "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Cast", "Dropout")
# ops whose outputs hold channels on axis 1 (N, C, ...): a conv net's class scores per pixel or frame
CHANNEL_OPS = ("Conv", "ConvTranspose", "Resize", "Upsample", "BatchNormalization", "InstanceNormalization")


def _producers(model: onnx.ModelProto) -> dict:
    return {o: n for n in model.graph.node for o in n.output}


def _through_reshapes(model: onnx.ModelProto, tensor: str, made: dict | None = None):
    """(the node that computes `tensor`, looking through reshapes and casts, or None; the tensor reached:
    where that node's output, or a graph input or initializer when there is no such node). `made`:
    _producers(model), when the caller looks up many tensors."""
    made = made if made is not None else _producers(model)
    seen = set()
    node = made.get(tensor)
    while node is not None and node.op_type in SHAPE_OPS and node.input and tensor not in seen:
        seen.add(tensor)
        tensor = node.input[0]
        node = made.get(tensor)
    return node, tensor


def producer_node(model: onnx.ModelProto, output: str):
    """The node that computes graph output `output`, looking through reshapes; None for an input or an
    initializer."""
    return _through_reshapes(model, output)[0]


# ops that turn scores into labels: nothing in the label says how far the scores moved
LABEL_OPS = ("ArgMax", "ArgMin")
THRESHOLD_OPS = ("Greater", "Less", "GreaterOrEqual", "LessOrEqual")   # a score against a fixed threshold


def _fixed(model: onnx.ModelProto, made: dict, tensor: str) -> bool:
    """Whether `tensor` is a constant (an initializer or a Constant node's output, through reshapes)."""
    node, reached = _through_reshapes(model, tensor, made)
    if node is not None:
        return node.op_type == "Constant"
    return reached in {t.name for t in model.graph.initializer}


def _thresholded(model: onnx.ModelProto, made: dict, node) -> str | None:
    """The score a comparison with a fixed threshold (a binary label, `sigmoid(x) > 0.5`) is taken from."""
    if node.op_type not in THRESHOLD_OPS or len(node.input) != 2:
        return None
    varying = [t for t in node.input if not _fixed(model, made, t)]
    return varying[0] if len(varying) == 1 else None


def compared_tensors(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, tuple[str, str]]]:
    """A copy whose graph outputs that say little about the weights are replaced by the tensors that do,
    and {output: (tensor compared instead, why)}:
    - a label (an ArgMax of the class scores, or a score compared with a fixed threshold, also cast to
      float) by the scores: a label is piecewise constant in the weights, so the search sees no
      difference between most profiles and the correction has no gradient;
    - a cache output (a KV cache's `present`: Concat of the past, from a graph input through ops no
      pruning changes, and what this step computed) by what this step computed: the past is copied
      through, and on a 31-token past it was 31/32 of the output's energy, hiding the new token's error."""
    inputs = {i.name for i in model.graph.input}
    made = _producers(model)
    replaced, cache_parts = {}, []
    for out in model.graph.output:
        node = _through_reshapes(model, out.name, made)[0]
        if node is None:
            continue
        if node.op_type in LABEL_OPS and node.input:
            replaced[out.name] = (node.input[0], "a label (ArgMax): the scores it is taken from")
        elif score := _thresholded(model, made, node):
            replaced[out.name] = (score, f"a label ({node.op_type} than a fixed threshold): the score it is "
                                         "taken from")
        elif node.op_type == "Concat":
            passed = [t for t in node.input if _weight_free(made, t, inputs)]
            computed = [t for t in node.input if t not in passed]
            if len(passed) == 1 and len(computed) == 1:
                replaced[out.name] = (computed[0], "the input it copies through plus what this step computed: "
                                                   "that step's part")
                cache_parts.append(computed[0])
    if not replaced:
        return model, {}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    try:
        inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model, strict_mode=False).graph.value_info}
    except Exception:   # a graph shape inference cannot read: the tensor's type is taken to be float
        inferred = {}
    names = {o.name for o in m.graph.output}
    kept = [o for o in m.graph.output if o.name not in replaced]
    stands_for = {}
    for output, (tensor, _) in replaced.items():
        if (tensor in names and tensor not in replaced) or tensor in stands_for:
            continue
        stands_for[tensor] = output
        info = onnx.ValueInfoProto()
        if tensor in inferred:
            info.CopyFrom(inferred[tensor])
        else:
            info.CopyFrom(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
        kept.append(info)
    del m.graph.output[:]
    m.graph.output.extend(kept)
    # read back by output_weights and output_names: the tensors compared no longer carry the outputs' names
    for key, value in ((CACHE_PARTS_KEY, cache_parts), (STANDS_FOR_KEY, stands_for)):
        entry = m.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    return m, replaced


CACHE_PARTS_KEY = "spdy_onnx.cache_parts"
STANDS_FOR_KEY = "spdy_onnx.stands_for"


def _metadata_json(model: onnx.ModelProto, key: str, default):
    return next((json.loads(e.value) for e in model.metadata_props if e.key == key), default)


def output_names(model: onnx.ModelProto, outputs: list[str]) -> list[str]:
    """The graph output each compared tensor stands for (a cache's 'present.0.key' for this step's part of
    it): what per-output losses are reported under."""
    stands_for = _metadata_json(model, STANDS_FOR_KEY, {})
    return [stands_for.get(name, name) for name in outputs]


# a decoder's cache outputs as exporters name them: present.0.key, present_key_values, past_key_values.3
CACHE_OUTPUT_NAME = re.compile(r"(^|[._/])(present|past_key_values?|present_key_values?)([._/0-9]|$)", re.IGNORECASE)


def output_weights(model: onnx.ModelProto, outputs: list[str]) -> list[float]:
    """Each compared output's share of the loss (summing to 1): equal, except that the cache outputs of
    a KV-cache decoder (two per layer) share one output's share. Counted one by one, a 24-layer decoder's
    48 caches made its logits 1/49 of the loss, and the search kept the key and value projections dense
    while pruning the rest hard. Cache outputs: those compared_tensors cut to this step's part, and
    outputs named like a cache (a decoder's first step has no past to concatenate)."""
    marked = set(_metadata_json(model, CACHE_PARTS_KEY, []))
    cache = [name in marked or bool(CACHE_OUTPUT_NAME.search(name)) for name in outputs]
    n_cache = sum(cache)
    if not n_cache or n_cache == len(outputs):
        return [1.0 / len(outputs)] * len(outputs)
    groups = len(outputs) - n_cache + 1
    return [1.0 / (groups * n_cache) if c else 1.0 / groups for c in cache]


# ops whose weights pruning changes: a tensor computed without any of them is the same in every profile
WEIGHTED_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "MatMulInteger", "ConvInteger", "QLinearMatMul",
                "QLinearConv")


def _weight_free(made: dict, tensor: str, inputs: set) -> bool:
    """Whether `tensor` comes from graph inputs through ops that no pruning changes (a past cache through
    a reshape, a transpose, a slice or a repeat for grouped heads): at least one input, no weighted op.
    `made`: _producers of the model."""
    stack, seen, reaches_input = [tensor], set(), False
    while stack:
        t = stack.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        node = made.get(t)
        if node is None:
            reaches_input |= t in inputs
        elif node.op_type in WEIGHTED_OPS or node.op_type in ("If", "Loop", "Scan"):
            return False
        else:
            stack.extend(node.input)
    return reaches_input


def producer_op(model: onnx.ModelProto, output: str) -> str | None:
    node = producer_node(model, output)
    return None if node is None else node.op_type


def class_axis(model: onnx.ModelProto, output: str, rank: int) -> int:
    """Where a rank-3+ output keeps its classes: 1 after a conv (N, classes, H, W) or (N, classes, T);
    last after a matmul (batch, tokens, vocabulary) or a Transpose to channels-last (NHWC, as tf2onnx
    writes); otherwise 1 for rank 4 and up, last for rank 3."""
    node = producer_node(model, output)
    if node is not None and node.op_type in CHANNEL_OPS:
        return 1
    if node is not None and node.op_type in ("MatMul", "Gemm", "Einsum"):
        return -1
    if node is not None and node.op_type == "Transpose":
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        if perm and len(perm) == rank:
            return -1 if perm[-1] == 1 else 1 if perm[1] == 1 else (1 if rank >= 4 else -1)
    return 1 if rank >= 4 else -1


def choose_loss(loss: str, output_shape, name: str = "", values: np.ndarray | None = None,
                producer: str | None = None, axis: int | None = None) -> str:
    """auto: KL for class scores (rank-2 outputs with several columns not named like an embedding, made
    by a linear op when `producer` is given, and whose rows, in `values` when given, are neither unit
    vectors nor bounded to [0, 1] like a sigmoid's; rank-3+ outputs named like logits, e.g. a language
    model's (batch, tokens, vocabulary); outputs that are log-probabilities), normalised MSE otherwise.
    KL is taken per position over the class axis: `axis` (see class_axis), by default the last one for
    rank 2 and 3 and axis 1 for rank 4 and up ((N, classes, H, W), kinds ending in CHANNELS). An output
    whose rows are distributions (a Softmax's) gets KL of the probabilities themselves, with auto or kl.
    An output with no class axis (rank 1, or one column) gets MSE even with kl: KL over one column is 0."""
    if loss not in ("auto", "kl", "mse"):
        raise SpdyError(f"unknown loss '{loss}'; choose kl, mse or auto")
    rank = len(output_shape)
    if axis is None:
        axis = 1 if rank >= 4 else -1
    axis = axis if rank >= 3 else -1
    suffix = CHANNELS if axis == 1 else ""
    classes = output_shape[axis] if rank >= 2 else 1
    along = np.moveaxis(values, axis, -1) if values is not None and rank >= 2 else None
    if loss == "mse":
        return "mse"
    if classes <= 1:
        if loss == "kl":
            log.warning("--loss kl: output '%s' of shape %s has no class axis (KL over one value is 0); it is "
                        "compared by normalised MSE", name, tuple(output_shape))
        return "mse"
    if along is not None and _distribution_rows(along):
        return "kl-probs" + suffix
    if loss == "kl" or (along is not None and _log_distribution_rows(along)):
        return "kl" + suffix
    lowered = name.lower()
    if rank == 2 and "logit" not in lowered:
        named = any(w in lowered for w in EMBEDDING_WORDS)
        vector = values is not None and (_unit_rows(values) or _unit_interval(values))
        made_as_vector = producer is not None and producer not in SCORE_OPS
        return "mse" if named or vector or made_as_vector else "kl"
    return "kl" + suffix if "logit" in lowered else "mse"


def _log_distribution_rows(values: np.ndarray) -> bool:
    """Non-positive rows whose exponentials sum to 1: a LogSoftmax's log-probabilities."""
    v = np.asarray(values, dtype=np.float64)
    if not v.size or np.any(v > 1e-6):
        return False
    return bool(np.all(np.abs(np.exp(v).sum(axis=-1) - 1.0) < 1e-3))


def _unit_rows(values: np.ndarray) -> bool:
    """Rows of length 1: an L2-normalised embedding (a sentence-transformers export), not class scores."""
    norms = np.linalg.norm(np.asarray(values, dtype=np.float64).reshape(len(values), -1), axis=1)
    return bool(norms.size) and bool(np.all(np.abs(norms - 1.0) < 1e-3))


def _distribution_rows(values: np.ndarray) -> bool:
    """Non-negative rows (over the last axis) that sum to 1: a Softmax's probabilities."""
    v = np.asarray(values, dtype=np.float64)
    return bool(v.size) and bool(np.all(v >= 0)) and bool(np.all(np.abs(v.sum(axis=-1) - 1.0) < 1e-3))


def _unit_interval(values: np.ndarray) -> bool:
    """Every value in [0, 1] (a Sigmoid's independent probabilities): not scores to compare by softmax."""
    v = np.asarray(values, dtype=np.float64)
    return bool(v.size) and bool(np.all((v >= 0) & (v <= 1)))


FLOAT_TYPES = ("tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)")


def compared_outputs(session) -> list[str]:
    """The outputs the loss compares: every floating-point output (a QA model's start and end logits, a
    detector's scores and boxes), or the first output when none is floating point."""
    outs = session.get_outputs()
    names = [o.name for o in outs if o.type in FLOAT_TYPES]
    return names or [outs[0].name]


def combined_loss(loss_names: list[str], refs: list[np.ndarray], outs: list[np.ndarray], mask,
                  scales: list | None = None, weights: list | None = None) -> float:
    """Mean over the compared outputs of each one's loss (KL or normalised MSE, see choose_loss), weighted
    by `weights` (output_weights) when given; `scales`: per output, the per-sample energy an MSE is
    normalised by (centred_scale), or None."""
    values = []
    for i, (name, ref, out) in enumerate(zip(loss_names, refs, outs)):
        kind, ref, out = class_axis_last(name, *_real_tokens(ref, out, mask))
        scale = scales[i] if scales else None
        values.append(normalised_mse(ref, out, scale) if kind == "mse" else LOSSES[kind](ref, out))
    return float(np.dot(weights, values)) if weights is not None else float(np.mean(values))


def _real_tokens(ref: np.ndarray, out: np.ndarray, mask):
    """Compare only real-token positions of (batch, seq, ...) outputs when the feed has a padding mask."""
    if mask is None or ref.ndim < 3 or ref.shape[:2] != mask.shape:
        return ref, out
    return ref[mask], out[mask]


class Evaluator:
    def __init__(self, model: onnx.ModelProto, sites, database, data: dict, *, loss: str = "auto",
                 specs: dict, eval_samples: int = DEFAULT_EVAL_SAMPLES, threads: int | None = None,
                 journal=None):
        self.sites = sites
        self.database = database
        self.weight_names = [s.weight for s in sites]
        m = weights_as_inputs(model, self.weight_names)
        self._graph_with_inputs, self._threads = m, threads
        self.session = make_session(m, threads=threads)
        self.outputs = compared_outputs(self.session)
        self.output_weights = output_weights(model, self.outputs)
        self.output_names = output_names(model, self.outputs)
        self.batch_size = next(iter(specs.values()))[0][0]
        self.data = data
        dense = {s.weight: database.weight(s.name, 0) for s in sites}
        # padded token feeds run cut to their real length on verified short copies (spdy_onnx.shorten)
        self.sessions = {None: self.session}
        self._graphs = {None: m}
        # at least one batch; every candidate is scored on these same samples (paired comparisons)
        feeds = list(calibrate.batches(data, self.batch_size, limit=max(int(eval_samples), self.batch_size)))
        if len(feeds) * self.batch_size < int(eval_samples):
            log.warning("the search scores each candidate on %d calibration sample(s) (whole batches of %d), "
                        "fewer than the %d it uses (--eval-samples, default %d): more calibration data scores "
                        "candidates more reliably", len(feeds) * self.batch_size, self.batch_size,
                        int(eval_samples), DEFAULT_EVAL_SAMPLES)
        self._buckets = shorten.LengthBuckets(m, feeds[0])
        self.feeds = [self._cut(f, dense) for f in feeds]
        self.reference = [self._run(f, dense) for f in self.feeds]
        self.masks = [calibrate.token_mask(f) for _, f in self.feeds]
        self.loss_names = [choose_loss(loss, ref.shape, name, ref, producer_op(model, name),
                                       class_axis(model, name, ref.ndim))
                           for ref, name in zip(self.reference[0], self.outputs)]
        self.loss_name = "+".join(self.loss_names)   # one name per compared output, e.g. kl+kl
        # an MSE on per-sample values (batch,) or (batch, k), or on values bounded to [0, 1] like a
        # sigmoid's (a detector's (batch, anchors, 4) boxes), is normalised by their spread around the
        # mean, not by their energy: an offset must not hide a head that lost every sample's value
        self.scales = [centred_scale([r[i] for r in self.reference])
                       if kind == "mse" and (ref.ndim <= 2 or _unit_interval(ref)) else None
                       for i, (kind, ref) in enumerate(zip(self.loss_names, self.reference[0]))]
        self._memo: dict[tuple, float] = {}
        # evaluations of earlier (possibly killed) runs on the same model, data and database
        self.journal = Journal(journal)
        for entry in self.journal.read():
            picks, value = entry.get("picks"), entry.get("loss")
            # a loss is a finite number >= 0: one NaN line made every level look free (max(0, NaN - x))
            if isinstance(picks, list) and len(picks) == len(sites) and isinstance(value, (int, float)) \
                    and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
                self._memo[tuple(int(j) for j in picks)] = float(value)
        self._cached: dict[str, tuple[int, np.ndarray]] = {}
        self.evaluations = 0

    def _cut(self, feed, dense):
        """(length, feed): cut to a verified short length, or (None, the whole feed)."""
        def full_outputs(f):
            return run(self.session, self.outputs, {**f, **dense})

        def short_outputs(n, short, f):
            self.sessions[n] = make_session(short, threads=self._threads)
            self._graphs[n] = short
            return run(self.sessions[n], self.outputs, {**f, **dense})

        return self._buckets.cut(feed, full_outputs, short_outputs)

    def _run(self, item, weights, sessions=None):
        n, feed = item
        return run((sessions or self.sessions)[n], self.outputs, {**feed, **weights})

    def _weights(self, picks) -> dict:
        # a weight several sites share holds their sparsest pick: pruning it for one prunes it for all (the
        # solver ties them; a one-site curve of the per-site losses is the only other case)
        sparsest = {}
        for site, j in zip(self.sites, picks):
            if site.weight not in sparsest or int(j) > sparsest[site.weight][1]:
                sparsest[site.weight] = (site, int(j))
        out = {}
        for site, j in sparsest.values():
            hit = self._cached.get(site.name)
            if hit is None or hit[0] != int(j):
                hit = (int(j), self.database.weight(site.name, int(j)))
                self._cached[site.name] = hit
            out[site.weight] = hit[1]
        return out

    def loss_of_weights(self, weights: dict) -> float:
        """The loss of arbitrary weights {initializer: array} (not memoised). Initializers that are not
        site weights (biases a correction tuned) cost one extra session."""
        return self.combined(self.output_losses(weights))

    def combined(self, per_output: dict[str, float]) -> float:
        """The loss from output_losses' figures: their mean weighted as the search weighs them."""
        return float(np.dot(self.output_weights, list(per_output.values())))

    def output_losses(self, weights: dict) -> dict[str, float]:
        """{output: its loss} for arbitrary weights, as loss_of_weights, under the names of the graph
        outputs compared (output_names): a model with several heads can keep most of them and lose one,
        which the mean hides."""
        inputs = set(self.weight_names)
        extra = {k: v for k, v in weights.items() if k not in inputs}
        sessions = self.sessions
        if extra:
            from spdy_onnx.passes.prune import write_weights
            used = {n for n, _ in self.feeds}
            sessions = {n: make_session(write_weights(self._graphs[n], extra), threads=self._threads) for n in used}
        fed = {k: v for k, v in weights.items() if k in inputs}
        per_feed = [[combined_loss([kind], [r], [o], mask, [scale])
                     for kind, r, o, scale in zip(self.loss_names, ref, outs, self.scales)]
                    for item, ref, mask in zip(self.feeds, self.reference, self.masks)
                    for outs in [self._run(item, fed, sessions)]]
        return dict(zip(self.output_names, (float(v) for v in np.mean(per_feed, axis=0))))

    def weights_of(self, picks) -> dict:
        """The database weights of a profile, {initializer: array}."""
        return self._weights(tuple(int(j) for j in picks))

    def is_cached(self, picks) -> bool:
        """Whether loss(picks) is already known (this run or the journal of an earlier one)."""
        return tuple(int(j) for j in picks) in self._memo

    def loss(self, picks) -> float:
        key = tuple(int(j) for j in picks)
        if key in self._memo:
            return self._memo[key]
        weights = self._weights(key)
        values = [combined_loss(self.loss_names, ref, self._run(item, weights), mask, self.scales,
                                self.output_weights)
                  for item, ref, mask in zip(self.feeds, self.reference, self.masks)]
        value = float(np.mean(values))
        if not math.isfinite(value):   # outputs that overflow: the worst candidate, never the best
            value = math.inf
        self._memo[key] = value
        if math.isfinite(value):
            self.journal.append({"picks": list(key), "loss": value})
        self.evaluations += 1
        return value
