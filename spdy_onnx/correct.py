"""Global correction: after the profile is fixed, tune the kept weights of every pruned site together.

Why: the database reconstructs each site alone against the dense model's inputs. Stitched together,
the errors compound through the network; tuning all kept weights and biases at once against the
dense model's outputs on the calibration data (the SPDY paper's "global AdaPrune") removes much of that.
The zeros stay zeros (gradients and weights are masked every step), so the sparsity pattern, and with
it the speed on the engine, is unchanged.

The graph runs on PyTorch through the ONNX executor of the GPU runtime (float32, on the CPU), one
sample batch at a time, because the exported graph fixes its shapes. Padded token batches run cut to
their real length on verified short copies of the graph (spdy_onnx.shorten). A slice of the calibration data
is held back: the result is the epoch with the lowest loss on that slice, or the input weights if no
epoch beats them, so the correction never makes the held-back loss worse.
"""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import onnx

from spdy_onnx import calibrate, shorten
from spdy_onnx.errors import SpdyError
from spdy_onnx.evaluate import TINY_PROBABILITY, class_axis_last, compared_outputs, output_weights
from spdy_onnx.graph import shared_weight_groups
from spdy_onnx.ort_session import make_session
from spdy_onnx.ort_session import run as ort_run

log = logging.getLogger(__name__)


class CorrectionUnsupported(SpdyError):
    """The graph has an op the PyTorch executor cannot run: the correction is skipped, not the run."""

DEFAULT_EPOCHS = 1          # MiniLM-L6 at 1.5x: a second epoch bought 0.2 points of probe accuracy for about 55 s
DEFAULT_LR = 3e-4
MAX_TRAIN_SAMPLES = 2048     # per epoch; the time budget cuts it down for big models (see DEFAULT_SECONDS)
DEFAULT_SECONDS = 120.0      # fewer samples per epoch when a model is too big to tune on them all in this time
HOLDOUT_SHARE = 0.125
MAX_HOLDOUT = 32
# Validation data (--validation-data) is the user's own held-back set: more of it is worth the forward
# passes (an epoch's check, no gradients), because it is the only evidence the correction generalises.
MAX_VALIDATION_BATCHES = 128


def available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _shared_names(model: onnx.ModelProto) -> set[str]:
    """Initializers read by more than one node: tuning them for one site would change another."""
    seen: dict[str, int] = {}
    for node in model.graph.node:
        for t in set(node.input):
            seen[t] = seen.get(t, 0) + 1
    return {t for t, n in seen.items() if n > 1}


def _split(data: dict, batch: int, seed: int, validation: dict | None = None):
    """(train feeds, held-back feeds): whole model batches, the held-back ones drawn at random.

    With `validation` (samples kept apart by the user), every calibration batch trains and the
    validation batches are the held-back ones."""
    feeds = list(calibrate.batches(data, batch))
    if validation is not None:
        hold = list(calibrate.batches(validation, batch, limit=MAX_VALIDATION_BATCHES * batch))
        if not feeds or not hold:
            raise SpdyError(f"global correction needs a whole batch ({batch} samples) of calibration and of "
                            "validation data")
        return feeds, hold
    if len(feeds) < 2:
        raise SpdyError("global correction needs at least two batches of calibration data")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(feeds))
    n_hold = max(1, min(MAX_HOLDOUT, int(round(len(feeds) * HOLDOUT_SHARE))))
    hold = [feeds[i] for i in sorted(order[:n_hold])]
    train = [feeds[i] for i in sorted(order[n_hold:])]
    return train, hold


def global_correction(model: onnx.ModelProto, sites, weights: dict[str, np.ndarray], data: dict, *,
                      loss: str, batch_size: int, epochs: int = DEFAULT_EPOCHS, lr: float = DEFAULT_LR,
                      max_samples: int = MAX_TRAIN_SAMPLES, max_seconds: float | None = DEFAULT_SECONDS,
                      seed: int = 0, schedule: str = "cosine", progress: bool = False,
                      validation: dict | None = None, loss_scales: list | None = None,
                      layer_weight: float = 0.0) -> tuple[dict[str, np.ndarray], dict]:
    """Tuned copies of `weights` ({initializer: array}, pruned) and of the sites' biases; and a summary.

    The result is the epoch with the lowest loss on held-back samples, or no change: a random slice of
    `data`, or `validation` when given. Why the option: a slice of augmented views of a few photos
    (MobileNetV2's calibration) is no test of generalisation; the correction lowered such a slice's loss
    while raising the KL on unseen images (benchmarks/results/correction_generalisation_mobilenetv2.txt).

    `model` is the dense model, `data` the calibration samples, `loss` 'mse' (masked to real tokens
    when the feed has an attention mask), 'kl' or 'kl-probs', or one of them per compared output joined by '+'
    (the evaluator's `loss_name`: every floating-point output counts); `loss_scales` the evaluator's
    per-output MSE normalisers (`scales`), so that both minimise the same loss. `layer_weight`
    (--correct-layers) adds the sites' own output errors to the training loss, as SPDY's global
    AdaPrune matches every layer: W times the mean normalised squared error of each pruned site's
    output (after its bias) against the dense model's; the held-back check still judges the output
    loss alone. Returns the weights
    to write (site weights and bias initializers) and {'loss_before', 'loss_after', 'epochs_run',
    'best_epoch', 'seconds', ...}.
    """
    import torch

    from spdy_onnx.passes.prune import write_weights
    from spdy_onnx.runtimes.torch_onnx import GraphExecutor, matrix_to_weight

    t_start = time.perf_counter()
    layer_weight = float(layer_weight)
    train, hold = _split(data, batch_size, seed, validation)
    train = train[: max(1, max_samples // batch_size)]
    layers = _layer_tensors(model, [s for s in sites if s.weight in weights]) if layer_weight > 0 else []
    if layers:
        model = calibrate.with_outputs(model, layers)   # requested outputs survive ORT's graph optimisations
    pruned = write_weights(model, weights)

    # the dense model's outputs come from onnxruntime: three times faster than a PyTorch forward here.
    # Padded token feeds are cut to their real length (rounded up) and run on a short copy of the graph
    # verified to give the same outputs (spdy_onnx.shorten): one session/executor per length
    dense_session = make_session(model)
    dense_inputs = [i.name for i in dense_session.get_inputs()]
    dense_outputs = [o for o in compared_outputs(dense_session) if o not in layers]
    loss_names = loss.split("+")
    if len(loss_names) == 1:
        loss_names *= len(dense_outputs)
    if len(loss_names) != len(dense_outputs):
        raise SpdyError(f"loss '{loss}' names {len(loss_names)} outputs; the model has {len(dense_outputs)} to compare")
    scales = list(loss_scales) if loss_scales is not None else [None] * len(loss_names)
    shares = output_weights(model, dense_outputs)
    buckets = shorten.LengthBuckets(model, train[0])
    dense_sessions = {None: dense_session}   # length -> session of the dense model's short copy

    def full_outputs(feed):
        return ort_run(dense_session, dense_outputs, {k: feed[k] for k in dense_inputs})

    def short_outputs(n, short_model, feed):
        dense_sessions[n] = make_session(short_model)
        return ort_run(dense_sessions[n], dense_outputs, {k: feed[k] for k in dense_inputs})

    # (length, feed) items: cut to a verified short length, or (None, the whole feed)
    train = [buckets.cut(f, full_outputs, short_outputs) for f in train]
    hold = [buckets.cut(f, full_outputs, short_outputs) for f in hold]
    lengths = sorted({n for n, _ in train + hold}, key=lambda n: -1 if n is None else n)

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    executors = {}
    try:
        for n in lengths:
            feed = next(f for m, f in train + hold if m == n)
            graph_n = pruned if n is None else buckets.copy_of(pruned, n)
            executors[n] = GraphExecutor(graph_n, feed, device="cpu", dtype=torch.float32)
    except SpdyError as exc:
        raise CorrectionUnsupported(f"global correction cannot run this graph on PyTorch: {exc}") from exc
    if len(lengths) > 1 or lengths[0] is not None:
        real = sum(buckets.full if n is None else n for n, _ in train) / max(1, len(train))
        log.info("global correction: padded feeds cut to %s tokens (mean %.0f of %d)",
                 ", ".join(str(n) for n in lengths if n is not None), real, buckets.full)
    ex = executors[lengths[0]]

    inits = {i.name: i for i in model.graph.initializer}
    shared = _shared_names(model)
    by_name = {s.name: s for s in sites}
    pruned_names = {s.name for s in sites if s.weight in weights}
    grouped = {by_name[g[0]].weight for g in shared_weight_groups(sites)}   # read by several sites: one parameter
    params, masks, slots = [], [], []   # slots: (kind, site, holder, initializer name)
    tuned: dict[str, object] = {}       # weight -> its parameter
    joined = {}                          # ("weight", site) -> the parameter of the site it shares a weight with
    for step in ex.steps:
        name = getattr(step, "site", None)
        if name not in pruned_names:
            continue
        site = by_name[name]
        through = any(op != "Identity" for op, _ in site.chain)
        if through or (site.weight in shared and site.weight not in grouped) \
                or inits[site.weight].data_type != onnx.TensorProto.FLOAT:
            continue   # the weight reaches the node through a Transpose/Cast, or feeds other nodes too
        op = step.op
        holder = op if op.op_type == "Conv" else op.linear
        if site.weight in tuned:   # its gradient adds to the other readers' (autograd sums them)
            holder.w = joined[("weight", name)] = tuned[site.weight]
        else:
            w = tuned[site.weight] = holder.w.detach().clone().requires_grad_(True)
            holder.w = w
            params.append(w)
            masks.append((w.detach() != 0).to(w.dtype))
            slots.append(("weight", site, op, site.weight))
        bias_name = ex.site_info[name].get("bias_name")
        if holder.b is not None and bias_name in inits and bias_name not in shared \
                and inits[bias_name].data_type == onnx.TensorProto.FLOAT:
            b = holder.b.detach().clone().requires_grad_(True)
            holder.b = b
            params.append(b)
            masks.append(None)
            slots.append(("bias", site, op, bias_name))
    shared_params = {(slot[0], slot[1].name): p for slot, p in zip(slots, params)} | joined
    for other in list(executors.values())[1:]:
        for step in other.steps:
            name = getattr(step, "site", None)
            if ("weight", name) not in shared_params:
                continue
            holder = step.op if step.op.op_type == "Conv" else step.op.linear
            holder.w = shared_params[("weight", name)]
            if ("bias", name) in shared_params:
                holder.b = shared_params[("bias", name)]
    if not params:
        torch.random.set_rng_state(gen_state)
        raise CorrectionUnsupported("no pruned weight can be tuned: each reaches its node through a "
                                    "Transpose or Cast, or feeds several nodes")

    def run(item, grad: bool):
        """The compared outputs of the pruned graph, in the order of `dense_outputs`."""
        n, feed = item
        executor = executors[n]
        with torch.set_grad_enabled(grad):
            outs = executor.forward({k: feed[k] for k in executor.input_names})
        by_name = dict(zip(executor.output_names, outs))
        return [by_name[name] for name in dense_outputs + (layers if grad else [])]

    def dense_output_of(item, with_layers: bool = False):
        n, feed = item
        refs = ort_run(dense_sessions[n], dense_outputs + (layers if with_layers else []),
                       {k: feed[k] for k in dense_inputs})
        return [torch.from_numpy(np.array(r, dtype=np.float32)) for r in refs]

    def targets(feeds):
        # with layer outputs the targets are made step by step: a CNN's feature maps for every
        # training batch would not fit in memory
        return [None if layers else dense_output_of(f) for f in feeds]

    def masks_of(feeds):
        out = []
        for _, f in feeds:
            m = calibrate.token_mask(f)
            out.append(None if m is None else torch.from_numpy(m))
        return out

    def loss_of(ys, refs, mask):
        """The weighted mean over the compared outputs, as the search's evaluator scores them."""
        values = [torch_loss(kind, y, ref, mask, scale) for kind, y, ref, scale in zip(loss_names, ys, refs, scales)]
        return values[0] if len(values) == 1 else sum(w * v for w, v in zip(shares, values))

    def train_step(opt, feed, ref, mask):
        ys = run(feed, True)
        if layers:
            ref = dense_output_of(feed, with_layers=True)
            out_n = len(dense_outputs)
            value = loss_of(ys[:out_n], ref[:out_n], mask)
            layer_loss = sum(torch_loss("mse", y, r, mask) for y, r in zip(ys[out_n:], ref[out_n:]))
            value = value + layer_weight * layer_loss / len(layers)
        else:
            value = loss_of(ys, ref, mask)
        if not value.requires_grad:   # every compared output passes an ArgMax, a Round, a comparison
            raise CorrectionUnsupported("the compared outputs do not depend differentiably on the weights")
        opt.zero_grad(set_to_none=True)
        value.backward()
        # the gradients at the zeros are not masked: Adam works element by element, so they move only
        # those entries' own moments, and the weights are zeroed again below (a mask multiply per
        # weight saved, the kept weights' steps unchanged to the bit)
        opt.step()
        with torch.no_grad():
            for p, m in zip(params, masks):
                if m is not None:
                    p.mul_(m)
        return value

    def step_seconds(feed, ref) -> float:
        """The time of one whole step (optimizer and masks included: on big models they are a good part
        of it), on a throwaway optimizer whose first step (allocating its state) is not counted; the
        weights are put back."""
        saved = [p.detach().clone() for p in params]
        trial = _adam(params, lr)
        mask = masks_of([feed])[0]
        train_step(trial, feed, ref, mask)
        seconds = math.inf
        for _ in range(2):   # the faster of two: one step is short enough for a hiccup to double it
            t0 = time.perf_counter()
            train_step(trial, feed, ref, mask)
            seconds = min(seconds, time.perf_counter() - t0)
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)
                p.grad = None
        return seconds

    if max_seconds is not None and len(train) > 1:
        full = buckets.full or 1
        lengths_of = np.array([full if n is None else n for n, _ in train], dtype=float)
        # timed on a batch of about the mean length: a step's cost is not proportional to its length
        probe = int(np.argmin(np.abs(lengths_of - lengths_of.mean())))
        cost = float(lengths_of.mean() / lengths_of[probe])
        # the time left: the sessions and executors built above are part of the budget too
        left = max(0.0, max_seconds - (time.perf_counter() - t_start))
        train = train[:_samples_in_time(train, hold, left, epochs, dense_output_of,
                                        lambda f: run(f, False), step_seconds, cost=cost, probe=probe)]
    train_ref, hold_ref = targets(train), [dense_output_of(f) for f in hold]
    train_mask, hold_mask = masks_of(train), masks_of(hold)

    def held_loss() -> float:
        with torch.no_grad():
            return float(np.mean([float(loss_of(run(f, False), r, m))
                                  for f, r, m in zip(hold, hold_ref, hold_mask)]))

    def snapshot():
        return [p.detach().clone() for p in params]

    t0 = time.perf_counter()
    before = held_loss()
    # training stops while an epoch's held-back check still fits the budget: a cut epoch is judged like
    # a whole one, so the result is always a judged epoch or no change (the sizing above is an estimate)
    deadline = None if max_seconds is None else t_start + max_seconds - (time.perf_counter() - t0)
    out_of_time = False
    best, best_state, best_epoch = before, snapshot(), 0
    opt = _adam(params, lr)
    total_steps = epochs * len(train)
    # cosine decay to zero: the last steps settle instead of hopping around at the full rate
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, total_steps) / total_steps)) if schedule == "cosine" else 1.0)
    rng = np.random.default_rng(seed)
    history = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=epochs * len(train), desc="global correction", unit="batch", leave=False)
    for epoch in range(1, epochs + 1):
        running, steps = 0.0, 0
        for i in rng.permutation(len(train)):
            if deadline is not None and time.perf_counter() >= deadline:
                out_of_time = True
                break
            value = train_step(opt, train[i], train_ref[i], train_mask[i])
            sched.step()
            running += float(value.detach())
            steps += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{running / steps:.4f}", best=f"{best:.4f}")
        if out_of_time:
            log.info("global correction: --correct-budget (%.1f s) spent after %d of %d batches of epoch %d",
                     max_seconds, steps, len(train), epoch)
        if steps == 0:
            break
        held = held_loss()
        history.append({"epoch": epoch, "train_loss": running / steps, "held_back_loss": held})
        if steps < len(train):
            history[-1]["batches"] = steps
        log.info("global correction epoch %d: train loss %.4f, held-back loss %.4f (before %.4f)",
                 epoch, running / steps, held, before)
        if not math.isfinite(held):
            break
        if held < best:
            best, best_state, best_epoch = held, snapshot(), epoch
        if out_of_time:
            break
    if bar is not None:
        bar.close()
    torch.random.set_rng_state(gen_state)

    result: dict[str, np.ndarray] = {}
    if best_epoch > 0:
        for (kind, site, op, init_name), value in zip(slots, best_state):
            if kind == "weight":
                arr = value if op.op_type == "Conv" else matrix_to_weight(op.op_type, value, site.weight_shape,
                                                                          op.trans_b)
                result[init_name] = arr.numpy().astype(np.float32).reshape(tuple(inits[init_name].dims))
            else:
                result[init_name] = value.numpy().astype(np.float32).reshape(tuple(inits[init_name].dims))
    summary = {"loss_before": before, "loss_after": best, "best_epoch": best_epoch, "epochs": history,
               "train_batches": len(train), "held_back_batches": len(hold), "lr": lr, "out_of_time": out_of_time,
               "held_back": "validation data" if validation is not None else "calibration slice",
               "tuned_sites": sum(1 for s in slots if s[0] == "weight"),
               "layer_weight": layer_weight, "layer_outputs": len(layers),
               "seconds": time.perf_counter() - t_start}
    return result, summary


def _layer_tensors(model: onnx.ModelProto, sites) -> list[str]:
    """Each site's output as the PyTorch executor computes it: after the bias Add it fuses into the
    site (a 1-D constant), so that naming it as an output keeps the fusion and the bias stays tunable."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for t in node.input:
            consumers.setdefault(t, []).append(node)
    consts = {i.name: len(i.dims) for i in model.graph.initializer}
    consts.update({n.output[0]: 1 for n in model.graph.node if n.op_type == "Constant"})   # rank unknown: allow
    graph_outputs = {o.name for o in model.graph.output}
    out = []
    for s in sites:
        tensor = s.output
        users = consumers.get(tensor, [])
        if s.op_type == "MatMul" and len(users) == 1 and users[0].op_type == "Add" and tensor not in graph_outputs:
            other = [t for t in users[0].input if t != tensor]
            if len(other) == 1 and consts.get(other[0]) == 1:
                tensor = users[0].output[0]
        if tensor not in graph_outputs and tensor not in out:
            out.append(tensor)
    return out


def torch_loss(kind: str, y, ref, mask=None, scale: float | None = None):
    """The evaluator's loss (evaluate.LOSSES) on torch tensors, differentiable: KL over the last axis per
    position (of logits, or of probabilities for 'kl-probs'; over axis 1 for a '-channels'
    kind), or normalised MSE; real tokens only when a padding mask of the
    output's (batch, seq) shape is given."""
    import torch
    y = y.to(torch.float32)
    if mask is not None and y.dim() >= 3 and tuple(y.shape[:2]) == tuple(mask.shape):
        y, ref = y[mask], ref[mask]
    kind, ref, y = class_axis_last(kind, ref, y)
    if kind in ("kl", "kl-probs"):
        ref, y = ref.reshape(-1, ref.shape[-1]), y.reshape(-1, y.shape[-1])
        if kind == "kl":
            logp, logq = torch.log_softmax(ref, dim=-1), torch.log_softmax(y, dim=-1)
        else:
            logp, logq = ref.clamp_min(TINY_PROBABILITY).log(), y.clamp_min(TINY_PROBABILITY).log()
        return (logp.exp() * (logp - logq)).sum(-1).mean()
    if scale is not None:   # the evaluator's per-sample spread (evaluate.centred_scale)
        return ((y - ref) ** 2).sum() / (scale * len(ref))
    return ((y - ref) ** 2).sum() / (ref ** 2).sum().clamp_min(1e-12)


def _adam(params, lr):
    """Adam, fused where this PyTorch has it for the CPU: on MiniLM-L6 the plain per-tensor loop over
    every kept weight cost more than the forward pass of a short sentence."""
    import torch

    from spdy_onnx.runtimes.torch_onnx import import_dynamo_without_cache_folder
    import_dynamo_without_cache_folder()   # an optimizer imports it, which leaves a folder in $TMPDIR
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def _samples_in_time(train, hold, max_seconds, epochs, target, forward, step_seconds, cost: float = 1.0,
                     probe: int = 0) -> int:
    """How many training batches fit `max_seconds`: each costs one dense output (its target) and
    `epochs` training steps; the held-back batches get targets and are run before and after every epoch.
    Batch `probe` is timed; `cost` is the mean batch's cost relative to it (cut feeds differ in length).
    At least one: a budget too small for it is honoured by the training loop, which stops when it is spent."""
    t_begin = t0 = time.perf_counter()
    ref = target(train[probe])
    t_target = time.perf_counter() - t0
    t0 = time.perf_counter()
    forward(train[probe])
    t_forward = time.perf_counter() - t0
    t_step = step_seconds(train[probe], ref)
    fixed = len(hold) * cost * (t_target + (epochs + 1) * t_forward)
    per_batch = cost * (t_target + epochs * t_step)
    left = max_seconds - (time.perf_counter() - t_begin)   # the trial steps above count too
    n = int(max(0.0, left - fixed) // max(per_batch, 1e-9))
    n = max(1, min(len(train), n))
    if n < len(train):
        log.info("global correction: %d of %d calibration batches per epoch fit the %.1f s left "
                 "(one step %.2f s; --correct-budget raises it)", n, len(train), max_seconds, t_step)
    return n

