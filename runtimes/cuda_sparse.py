"""cuda-2:4: each prunable site dense or 2:4 on an NVIDIA GPU, timed per site and end to end.

Levels are {0.0: dense, 0.5: 2:4}. For every site, the dense operation (cuBLAS GEMM; cuDNN for convs)
and its 2:4 form (PyTorch's semi-structured sparse tensors: cuSPARSELt and CUTLASS, the faster one
per site; convs through their GEMM form) are timed at the model's real shapes, batch size and
precision (fp16 by default), with CUDA events around CUDA-graph replays after warm-up, interleaved,
medians kept. The whole model runs end to end on the GPU through `torch_onnx.GraphExecutor`, which
executes the same per-site kernels: that gives the table's dense total and the guarantee step's
measured dense-vs-pruned speedup. Neither TensorRT nor onnxruntime-gpu is used: they are not on the
GPU machines this was built for (the executor is what is there).

This module imports without torch or CUDA, so the whole flow runs on a CPU machine from a recorded
table (`--latency-table`): `compare()` then returns None and the report says "not_measured".
"""
from __future__ import annotations

import logging

import numpy as np

from spdy_onnx.errors import SpdyError
from spdy_onnx.runtimes import Comparison
from spdy_onnx.tables import LatencyTable

log = logging.getLogger(__name__)

LEVEL_2_4 = 0.5
DTYPES = {"float16": "float16", "fp16": "float16", "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    try:
        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken driver is "no GPU" here
        return False


class _HostEvent:
    """perf_counter stand-in for torch.cuda.Event in the CPU dry run."""

    def __init__(self):
        self.t = 0.0

    def record(self):
        import time
        self.t = time.perf_counter()

    def synchronize(self):
        return None

    def elapsed_time(self, other) -> float:
        return (other.t - self.t) * 1000.0


def _median(xs) -> float:
    return float(np.median(np.asarray(xs, dtype=np.float64)))


class CudaSemiStructuredRuntime:
    name = "cuda-2:4"
    pattern = "2:4"

    def __init__(self, cores: int | None = None, progress: bool = True, dtype: str = "float16",
                 rounds: int = 15, site_rounds: int = 11, backends=None, target_round_ms: float = 2.0,
                 device: str = "cuda", **_ignored):
        """device="cpu" is a dry run of the whole code path for tests on machines without a GPU: the
        2:4 GEMMs run densely (backend "reference"), in float32, timed on the host. Its numbers are
        labelled as such and are never GPU measurements."""
        if str(dtype).lower() not in DTYPES:
            raise SpdyError(f"cuda-2:4: unknown dtype '{dtype}'; choose float16 or bfloat16")
        self.dtype_name = DTYPES[str(dtype).lower()]
        self.rounds = max(3, int(rounds))
        self.site_rounds = max(3, int(site_rounds))
        self.backends = list(backends) if backends else None
        self.target_round_ms = float(target_round_ms)
        self.progress = progress
        if device not in ("cuda", "cpu"):
            raise SpdyError(f"cuda-2:4: device must be cuda (or cpu for a dry run), got '{device}'")
        self.device = device
        self.dry_run = device == "cpu"
        if self.dry_run:
            self.dtype_name = "float32"
            log.warning("cuda-2:4 with device=cpu: a DRY RUN of the code path; its times are not GPU times")
        self._best: dict[str, str] = {}      # site -> fastest 2:4 backend, learnt in this process

    # --- protocol ------------------------------------------------------------------------------
    def default_levels(self) -> list[float]:
        return [0.0, LEVEL_2_4]

    def check_model(self, model) -> None:
        custom = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})
        if custom:
            raise SpdyError(f"the model uses custom operator domain(s) {', '.join(custom)} that the cuda-2:4 "
                            "runtime cannot run")

    def fingerprint(self) -> dict:
        info = {"engine": "torch-cuda-2:4", "dtype": self.dtype_name}
        if self.dry_run:
            info.update({"device": "cpu", "dry_run": True})
        try:
            import torch
            info.update({"torch": torch.__version__, "cuda": torch.version.cuda})
            if cuda_available() and not self.dry_run:
                info.update({"gpu": torch.cuda.get_device_name(), "capability": ".".join(
                    str(v) for v in torch.cuda.get_device_capability())})
        except ImportError:
            info["torch"] = None
        return info

    def _torch(self):
        try:
            import torch
        except ImportError:
            raise SpdyError("the cuda-2:4 runtime needs a CUDA build of PyTorch to measure; on a machine without "
                            "a GPU, pass a recorded GPU table with --latency-table") from None
        if not self.dry_run and not cuda_available():
            raise SpdyError("the cuda-2:4 runtime needs an NVIDIA GPU to measure and none is visible here; pass a "
                            "table recorded on a GPU with --latency-table")
        return torch

    def _dtype(self, torch):
        return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[self.dtype_name]

    def _backends(self):
        from spdy_onnx.runtimes import torch_onnx as tx
        if self.dry_run:
            return ["reference"]
        torch = self._torch()
        have = tx.sparse_backends(self.device, self._dtype(torch))
        if self.backends:
            have = [b for b in self.backends if b in have]
        if not have:
            raise SpdyError("this PyTorch offers no 2:4 sparse backend (cuSPARSELt or CUTLASS) on this GPU")
        return have

    # --- timing helpers --------------------------------------------------------------------------
    def _runnable(self, torch, fns: dict, failed: dict) -> dict:
        """The callables that run at their real shape: a backend can build a kernel for a weight and
        still refuse the activations (cuSPARSELt rejects some very tall inputs), so each 2:4 form is
        run once before it is timed; failures are recorded and that form is left out."""
        out = {}
        for key, fn in fns.items():
            if key == "dense":
                out[key] = fn
                continue
            try:
                fn()
                if not self.dry_run:
                    torch.cuda.synchronize()
                out[key] = fn
            except Exception as exc:  # noqa: BLE001
                failed[key] = str(exc).splitlines()[0][:200]
        return out

    def _graphed(self, torch, fn, reps: int):
        """A replayable callable running fn `reps` times: a CUDA graph, or eager if capture fails."""
        def eager():
            for _ in range(reps):
                fn()
        if self.dry_run:
            return eager, False
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(reps):
                    fn()
            torch.cuda.synchronize()
            return g.replay, True
        except Exception as exc:  # noqa: BLE001
            log.debug("graph capture failed (%s); eager timing", exc)
            torch.cuda.synchronize()
            return eager, False

    def _events(self, torch):
        if self.dry_run:
            return _HostEvent(), _HostEvent()
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def _free(self, torch):
        if not self.dry_run:
            torch.cuda.empty_cache()

    def _one_ms(self, torch, fn) -> float:
        start, end = self._events(torch)
        fn()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return max(start.elapsed_time(end), 1e-3)

    def _time_interleaved(self, torch, fns: dict, rounds: int, capture: bool = True) -> tuple[dict, dict]:
        """{key: [ms per call, one per round]} for callables timed in turn (order alternating per round).

        capture: run each callable's repetitions as one CUDA graph (False for callables that already
        replay a graph: those loop on the host).
        """
        runners, graphed = {}, {}
        for key, fn in fns.items():
            reps = int(min(200, max(3, self.target_round_ms / self._one_ms(torch, fn))))
            if capture:
                runner, ok = self._graphed(torch, fn, reps)
            else:
                def runner(fn=fn, reps=reps):
                    for _ in range(reps):
                        fn()
                ok = False
            runners[key] = (runner, reps)
            graphed[key] = ok
        start, end = self._events(torch)
        keys = list(fns)
        out = {k: [] for k in keys}
        for key in keys:  # warm-up of the replays themselves
            runners[key][0]()
        for r in range(rounds):
            for key in (keys if r % 2 == 0 else keys[::-1]):
                runner, reps = runners[key]
                start.record()
                runner()
                end.record()
                end.synchronize()
                out[key].append(start.elapsed_time(end) / reps)
        return out, graphed

    # --- per-site table ------------------------------------------------------------------------
    def measure(self, model_path, sites, *, levels, batch_size, feeds, aliases=None, checkpoint=None) -> LatencyTable:
        if [float(v) for v in levels] != [0.0, LEVEL_2_4]:
            raise SpdyError(f"the cuda-2:4 runtime times two levels: dense (0) and 2:4 (0.5); got {list(levels)}")
        torch = self._torch()
        from tqdm.auto import tqdm

        from spdy_onnx import graph, modelio
        from spdy_onnx.passes.semi_structured import eligible
        from spdy_onnx.runtimes import torch_onnx as tx

        dtype = self._dtype(torch)
        backends = self._backends()
        model = graph.constants_to_initializers(modelio.load_model(model_path))
        inferred = inferred_shapes(model)
        ex = tx.GraphExecutor(model, feeds, device=self.device, dtype=dtype)
        graphed = ex.capture()
        whole, _ = self._time_interleaved(torch, {"model": ex.replay}, self.rounds, capture=False)
        dense_total = _median(whole["model"])
        spread = float((max(whole["model"]) - min(whole["model"])) / dense_total)

        times: dict[str, list[float]] = {}
        meta_sites: dict[str, dict] = {}
        ineligible, failed, untimed = {}, {}, {}
        gen = torch.Generator(device=self.device).manual_seed(0)
        bar = tqdm(total=len(sites), desc="timing sites (dense vs 2:4)", unit="site", disable=not self.progress,
                   leave=False)
        for site in sites:
            bar.update(1)
            if site.name not in ex.site_info:
                untimed[site.name] = "not run as a separate GEMM/conv by the GPU executor"
                continue
            info = ex.site_info[site.name]
            shape = tuple(info["in_shape"])
            if site.input in inferred and tuple(inferred[site.input]) != shape:
                log.warning("site %s: shape inference says %s, the executor saw %s; using the latter",
                            site.name, inferred[site.input], shape)
            x = torch.randn(shape, generator=gen, device=self.device, dtype=torch.float32).to(dtype)
            if info["in_format_cl"]:
                x = x.contiguous(memory_format=torch.channels_last)
            fns = {"dense": _bind(ex.site_op(site.name, None), x)}
            ok, why = eligible(site)
            if ok:
                w = info["weight"]
                trans_b = bool(getattr(site, "trans_b", False))
                pruned = tx.matrix_to_weight(site.op_type, tx.prune_matrix_2_4(
                    tx.weight_matrix(site.op_type, w, trans_b)), tuple(w.shape), trans_b)
                site_failed = {}
                for b in backends:
                    try:
                        fns[b] = _bind(ex.site_op(site.name, b, pruned), x)
                    except Exception as exc:  # noqa: BLE001 - a backend that cannot run this shape
                        site_failed[b] = str(exc).splitlines()[0][:200]
                fns = self._runnable(torch, fns, site_failed)
                if site_failed:
                    failed[site.name] = site_failed
            else:
                ineligible[site.name] = why
            res, site_graphed = self._time_interleaved(torch, fns, self.site_rounds)
            med = {k: _median(v) for k, v in res.items()}
            sparse = {k: v for k, v in med.items() if k != "dense"}
            best = min(sparse, key=sparse.get) if sparse else None
            if best:
                self._best[site.name] = best
            times[site.name] = [med["dense"], sparse[best] if best else med["dense"]]
            meta_sites[site.name] = {"op": site.op_type, "input_shape": list(shape),
                                     "gemm_mnk": gemm_mnk(site, shape, info["weight"].shape),
                                     "dense_ms": med["dense"], **{f"{k}_ms": v for k, v in sparse.items()},
                                     "backend": best, "cuda_graph": all(site_graphed.values())}
            del fns
        bar.close()
        self._free(torch)
        sites_dense = float(sum(v[0] for v in times.values()))
        meta = {**self.fingerprint(), "version": torch.__version__, "batch_size": int(batch_size),
                "cusparselt": _cusparselt_version(torch), "backends_available": backends,
                "cuda_graph": graphed, "rounds": self.rounds, "site_rounds": self.site_rounds,
                "dense_total_spread": spread, "sites_dense_ms": sites_dense,
                "executor_fusions": ex.fusions, "ineligible": ineligible, "sparse_failed": failed,
                "unmapped_sites": sorted(untimed), "sites": meta_sites, "cores": None,
                "note": "levels: 0.0 = dense, 0.5 = 2:4; ineligible sites carry their dense time twice"}
        del ex
        self._free(torch)
        return LatencyTable(levels=[0.0, LEVEL_2_4], times=times, dense_total_ms=dense_total, runtime=self.name,
                            pattern=self.pattern, meta=meta)

    # --- end to end ----------------------------------------------------------------------------
    def executor(self, model_path, feeds, *, sparse: str | dict = "auto"):
        """A GraphExecutor for a model file: 'auto' runs every site whose weight is 2:4 as a 2:4 GEMM."""
        torch = self._torch()
        from spdy_onnx import graph, modelio
        from spdy_onnx.passes.semi_structured import satisfies_2_4
        from spdy_onnx.runtimes import torch_onnx as tx

        model = graph.constants_to_initializers(modelio.load_model(model_path))
        if sparse == "auto":
            sites, _ = graph.find_sites(model)
            weights = graph.read_weights(model, sites)
            names = {s.name for s in sites
                     if np.count_nonzero(weights[s.name]) and satisfies_2_4(s, weights[s.name])}
            sparse = self._chooser(torch, names)
        elif sparse == "dense":
            sparse = {}
        return tx.GraphExecutor(model, feeds, device=self.device, dtype=self._dtype(torch), sparse=sparse)

    def _chooser(self, torch, names: set):
        backends = self._backends()

        def choose(name, make_op, x):
            if name not in names:
                return None
            if name in self._best and self._best[name] in backends:
                return self._best[name]
            ops, failed = {}, {}
            for b in backends:
                try:
                    ops[b] = _bind(make_op(b), x)
                except Exception as exc:  # noqa: BLE001
                    failed[b] = str(exc).splitlines()[0][:120]
            ops = self._runnable(torch, ops, failed)
            for b, why in failed.items():
                log.info("site %s: 2:4 backend %s does not run it (%s)", name, b, why)
            if not ops:
                log.warning("site %s is 2:4 but no sparse backend runs it: timed dense", name)
                return None
            best = next(iter(ops))
            if len(ops) > 1:
                res, _ = self._time_interleaved(torch, ops, 5)
                best = min(res, key=lambda k: _median(res[k]))
            self._best[name] = best
            return best
        return choose

    def compare(self, baseline_path, candidate_path, *, batch_size, feeds) -> Comparison | None:
        if not self.dry_run and not cuda_available():
            return None
        torch = self._torch()
        base = self.executor(baseline_path, feeds)
        cand = self.executor(candidate_path, feeds)
        n_sparse = sum(1 for i in cand.site_info.values() if i["backend"])
        ok_base, ok_cand = base.capture(), cand.capture()
        ok = ok_base and ok_cand
        # ABBA rounds of whole-model replays; each round ~ target_round_ms * 25
        one = self._one_ms(torch, base.replay)
        iters = int(min(200, max(3, 25 * self.target_round_ms / one)))
        start, end = self._events(torch)
        per = [[], []]
        runners = [base.replay, cand.replay]
        for r in runners:
            r()
        for rnd in range(self.rounds):
            for k in ((0, 1) if rnd % 2 == 0 else (1, 0)):
                start.record()
                for _ in range(iters):
                    runners[k]()
                end.record()
                end.synchronize()
                per[k].append(start.elapsed_time(end) / iters)
        b, c = np.array(per[0]), np.array(per[1])
        ratios = b / c
        backends = {}
        for info in cand.site_info.values():
            if info["backend"]:
                backends[info["backend"]] = backends.get(info["backend"], 0) + 1
        extra = {**self.fingerprint(), "batch_size": int(batch_size), "cuda_graph": ok, "sparse_sites": n_sparse,
                 "sparse_backends": backends}
        del base, cand
        self._free(torch)
        return Comparison(baseline_ms=float(np.median(b)), candidate_ms=float(np.median(c)), rounds=self.rounds,
                          iterations_per_round=iters, ratio_p25=float(np.percentile(ratios, 25)),
                          ratio_p75=float(np.percentile(ratios, 75)), foreign_load_cores=0.0, extra=extra)


def _bind(op, x):
    def call():
        return op(x)
    return call


def _cusparselt_version(torch):
    try:
        return torch.backends.cusparselt.version()
    except Exception:  # noqa: BLE001
        return None


def inferred_shapes(model) -> dict[str, tuple]:
    """Static shapes of every tensor ONNX shape inference can resolve (empty if inference fails)."""
    import onnx
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - large or odd models: the executor's own shapes are the fallback
        return {}
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]
        if dims and all(d > 0 for d in dims):
            out[vi.name] = tuple(dims)
    return out


def gemm_mnk(site, in_shape, weight_shape) -> list[int]:
    """The GEMM a site is (M rows of activations, N outputs, K reduction), from its input shape."""
    if site.op_type == "Conv":
        n = int(in_shape[0])
        spatial = int(np.prod(in_shape[2:]))
        strides = int(np.prod(site.strides)) if site.strides else 1
        return [n * max(1, spatial // strides), int(weight_shape[0]), int(np.prod(weight_shape[1:]))]
    k = int(site.reduction_size)
    n_out = int(site.n_weights // k)
    m = int(np.prod(in_shape)) // k if k else 0
    return [m, n_out, k]

