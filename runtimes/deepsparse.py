"""DeepSparse on CPU: per-layer times at imposed sparsity, and interleaved end-to-end timing.

A debug-analysis engine compiled with `imposed_ks=s` times every layer as if its weights were s sparse,
without pruning anything, so one run per level fills one column of the latency table. Engines are
compiled one at a time in the calling thread: compiling side by side in other threads cut a MiniLM-L6
pass by 30%, but the engines then timed up to 2x slow at random (benchmarks/profile_time.py).
Never hand the engine the user's file: with input_shapes it rewrites the file in place. Callers pass
their own copies.
"""
from __future__ import annotations

import contextlib
import logging
import os
import platform
import re
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import deepsparse  # noqa: E402,F401  (ImportError here means the engine is not installed)
from deepsparse.engine import DebugAnalysisEngine, Engine  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from spdy_onnx.errors import SpdyError  # noqa: E402
from spdy_onnx.journal import Journal  # noqa: E402
from spdy_onnx.levels import log_density_grid  # noqa: E402
from spdy_onnx.runtimes import Comparison  # noqa: E402
from spdy_onnx.runtimes.cpu_load import ForeignLoad, stopped, usable_cpus  # noqa: E402,F401
from spdy_onnx.tables import LatencyTable, merge_groups  # noqa: E402

log = logging.getLogger(__name__)

MAX_IR_VERSION = 9
MAX_OPSET = 18
MAX_ML_OPSET = 3      # ai.onnx.ml
BUSY_WARNING_CORES = 0.5


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


AUTO_REPEATS = 2                # by default the second of them runs the dense level only
STEADY_SPREAD = 0.02            # a dense re-run within this of the first needs no third
DENSE_AGAIN = -1.0              # a third dense run, journaled under its own key (the median of three is robust)
DENSE_OUTLIER_SPREAD = 0.25     # two dense runs further apart than this get a third
# A run's slowness is gauged by the layers outside the sites, used only when they take at least this share of
# the dense model's time (else their own noise dominates)
MIN_OTHER_SHARE = 0.05
# Under this share of ops run by the engine itself (the rest go to onnxruntime), a measurement warns.
# MiniLM-L6 at opset 13: 98% (its attention-mask ops are the rest); with LayerNormalization ops: 89%.
NATIVE_WARNING = 0.95
SLOWNESS_LIMITS = (1.0, 2.5)    # never fast; over 2.5x is clipped: something other than a slow moment
# A run counts as slow only from this factor up. BERT-base size has a real hump of 12-26% in that time at
# the middle levels, the same in both of two passes (benchmarks/results/table_noise_bert_base.txt): divided
# out, its DP profiles measured 0.82-0.91 of their prediction against 0.96-1.06 raw. The slow moments
# that skewed MiniLM-L6's tables were 1.4-2x.
SLOWNESS_THRESHOLD = 1.3
MAX_COMPILE_THREADS = 4
BANNER = re.compile(r"DeepSparse(?: Engine)?, Copyright ")
_first_compile = threading.Lock()
_banner_pending = True


@contextlib.contextmanager
def banner_hidden_when_quiet():
    """Around an engine compile: the first in this process prints DeepSparse's banner, which is left out
    when our log hides info (-q). Why here: the engine's library writes it to file descriptor 2 itself,
    below Python's sys.stderr and the engine's own log level (NM_LOGGING_LEVEL leaves it), so that
    compile's stderr is caught in a file and every other line is passed on after it."""
    global _banner_pending
    _first_compile.acquire()   # other threads' compiles wait for the first one only
    if not _banner_pending or log.isEnabledFor(logging.INFO):
        _banner_pending = False
        _first_compile.release()
        yield
        return
    _banner_pending = False
    try:
        with tempfile.TemporaryFile() as caught:
            sys.stderr.flush()
            saved = os.dup(2)
            os.dup2(caught.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                caught.seek(0)
                lines = caught.read().decode(errors="replace").splitlines(keepends=True)
                sys.stderr.write("".join(line for line in lines if not BANNER.match(line)))
                sys.stderr.flush()
    finally:
        _first_compile.release()


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), max(1, size))]


def compile_in_parallel(build, items: list, threads: int) -> list:
    """`build(item)` for every item, up to `threads` at once (the engine releases the GIL while it
    compiles), results in order; with one thread, in the calling thread."""
    if threads <= 1 or len(items) <= 1:
        return [build(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        return list(pool.map(build, items))


def slowness_factors(run_levels, totals, site_sums, *, fused: bool = False) -> list[float]:
    """How slow each profiling run was, gauged by the layers outside the sites.

    One level's column comes from one run, so a slow moment of a shared machine during that run made the
    whole column slow, and the solver then avoided (or, after a slow dense run, over-trusted) that level.
    The layers outside the sites (attention products, softmax, norms) slow down with the sites in such a
    moment. Their time also drifts with the level for real (MiniLM-L6: about 10% less among sparse
    sites), so a run is compared with the quickest of the levels around it (two on each side), and
    never counted as fast: a slow moment only slows. On MiniLM-L6, three profiling passes in each of
    two hours (benchmarks/table_noise.py), the end-to-end speedup of 9 profiles over each pass's
    prediction ran 0.73-1.83 raw and 0.87-1.00 divided, and 0.96-1.16 and 0.97-1.09 in the steadier
    hour. Factors under SLOWNESS_THRESHOLD count as 1: on BERT-base size that time rises 12-26% at the
    middle levels for real, in every pass, and dividing it out made the table optimistic (the DP's
    profiles measured 0.82-0.91 of their prediction, 0.96-1.06 raw); with the threshold MiniLM-L6's
    profiles measured 0.81-1.01 and 0.92-1.11 of the prediction in the two hours (within-pass sd of the
    log 0.032 and 0.033, against 0.040 and 0.020 dividing by every factor and 0.110 and 0.036 raw;
    benchmarks/results/table_noise_*_threshold.txt). All ones when that time is too small a share of the
    dense time to gauge, with fewer than three levels, or when the engine fused sites together (`fused`): then the layers outside the sites
    share kernels with them and their time changes with the level for real (MobileNetV2 at batch 16:
    the same levels 20-50% above their neighbours in both of two passes; divided, the DP's profiles
    measured 0.78-0.91 of their prediction against 0.83-1.01 raw)."""
    run_levels = np.asarray(run_levels, dtype=float)
    totals, site_sums = np.asarray(totals, dtype=float), np.asarray(site_sums, dtype=float)
    other = totals - site_sums
    grid = np.unique(run_levels)
    dense = run_levels == 0.0
    if fused or len(grid) < 3 or not dense.any() or not np.all(other > 0) or \
            np.median(other[dense]) < MIN_OTHER_SHARE * np.median(totals[dense]):
        return [1.0] * len(totals)
    per_level = np.array([np.median(other[run_levels == lvl]) for lvl in grid])
    quickest = np.array([per_level[max(0, j - 2):j + 3].min() for j in range(len(grid))])
    expected = quickest[np.searchsorted(grid, run_levels)]
    factors = np.clip(other / expected, *SLOWNESS_LIMITS)
    return [float(f) if f >= SLOWNESS_THRESHOLD else 1.0 for f in factors]


CANARY_TIMEOUT_S = 600


class DeepSparseRuntime:
    name = "deepsparse"
    pattern = "unstructured"
    checks_lowest_level = True    # profiling times a uniform file at the lowest sparse level (api.py)
    # a model at a newer opset is read as this one when its ops compute the same (passes/opsets.py);
    # at 17 if it can be: DeepSparse 1.8 runs reductions with their axes as an input (opset 18) not
    # natively, and with them none of some graphs (transformers' ResNet from torch's default exporter)
    max_opset = MAX_OPSET
    native_opset = 17
    reader = f"DeepSparse {deepsparse.__version__}"

    def __init__(self, cores: int | None = None, repeats: int | None = None, iterations: int = 20,
                 rounds: int = 15, progress: bool = True, compile_threads: int | None = None,
                 compiles: int = 1, isolate: bool = True, quiet=(), **_ignored):
        self.cores = int(cores) if cores else None
        # our own helper processes, as cpu_load.identity gives them, stopped while an engine times and
        # let run while it compiles (the OBS database built during profiling: spdy_onnx/early_database.py)
        self.quiet = [tuple(q) for q in quiet or ()]
        # every engine run (profiling, measurements, analyses of drafts) in a child process
        # (runtimes/engine_worker.py), where an engine crash is one error, not the end of the run
        self.isolate = bool(isolate)
        # engines compiled of each model in one `compare`, timed in turn and averaged. Two did not steady
        # MiniLM-L6's measured speedup (benchmarks/results/compiles_per_measurement_minilm_2x.txt): its
        # spread came in stretches of load from outside the machine, which slow every engine alike
        self.compiles = max(1, int(compiles))
        self._warned_native = False
        # profiling compiles this many engines side by side before timing them one by one. 1 (the default)
        # compiles each in this thread: engines compiled in other threads timed up to 2x slow at random
        # (benchmarks/profile_time.py), and the table's dense column divides every prediction
        self.compile_threads = max(1, min(MAX_COMPILE_THREADS, int(compile_threads or 1)))
        # None: one pass over the levels, then the dense level again (see `measure`); N: N whole passes
        self.repeats = None if repeats is None else max(1, int(repeats))
        self.iterations = max(2, int(iterations))
        self.rounds = max(3, int(rounds))
        self.progress = progress

    def default_levels(self) -> list[float]:
        return log_density_grid()

    def check_model(self, model) -> None:
        from spdy_onnx.modelio import default_opset
        opset = default_opset(model)
        if model.ir_version > MAX_IR_VERSION or opset > MAX_OPSET:
            raise SpdyError(
                f"DeepSparse {deepsparse.__version__} loads ONNX IR version <= {MAX_IR_VERSION} and opset <= "
                f"{MAX_OPSET}; this model has IR version {model.ir_version} and opset {opset} "
                "(re-export it with an older opset, e.g. torch.onnx.export(..., opset_version=13))")
        custom = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx", "ai.onnx.ml")})
        if custom:
            raise SpdyError(f"the model uses custom operator domain(s) {', '.join(custom)} that DeepSparse cannot run")
        from spdy_onnx.modelio import printable
        half = [f"'{printable(v.name, 40)}'" for v in list(model.graph.input) + list(model.graph.output)
                if v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)]
        if half:
            raise SpdyError(f"DeepSparse {deepsparse.__version__} runs float32 models: input/output {', '.join(half[:4])} "
                            f"{'is' if len(half) == 1 else 'are'} float16. Export the model in float32 (weights "
                            "stored as float16 behind a Cast are fine: they are pruned in place)")
        from spdy_onnx.passes.opsets import used_domains
        ml = [e.version for e in model.opset_import if e.domain == "ai.onnx.ml"]
        if ml and ml[0] > MAX_ML_OPSET and "ai.onnx.ml" in used_domains(model):
            raise SpdyError(f"the model uses ai.onnx.ml opset {ml[0]}; DeepSparse {deepsparse.__version__} runs it "
                            f"up to opset {MAX_ML_OPSET}")

    def native_graph(self, model):
        """LayerNormalization (opset 17+), HardSwish (opset 14+) and HardSigmoid written as primitive ops:
        DeepSparse hands LayerNormalization and HardSigmoid to onnxruntime, which splits the engine's graph
        at each of them, and runs none of a graph with HardSwish itself (passes/decompose.py).
        Opset imports that no node uses are dropped: DeepSparse refuses some (passes/opsets.py)."""
        from spdy_onnx.passes.decompose import decompose_hard_activations, decompose_layernorm
        from spdy_onnx.passes.opsets import drop_unused_opset_imports
        model, layernorms = decompose_layernorm(model)
        model, hard = decompose_hard_activations(model)
        model, dropped = drop_unused_opset_imports(model)
        if dropped:
            log.info("opset imports no node uses dropped: %s", ", ".join(dropped))
        counts = {"LayerNormalization": layernorms, **hard}
        return model, {op: n for op, n in counts.items() if n}

    def fingerprint(self) -> dict:
        return {"engine": "deepsparse", "version": deepsparse.__version__, "cpu": cpu_name(),
                "cores": self.cores or os.cpu_count(), "numpy": np.__version__}

    # --- per-layer latency table -------------------------------------------------------------

    # compiled and run once in a child process: a crash there (DeepSparse segfaults on some graphs) is one
    # line of ours, not a register dump that takes the run down with its temporary folder
    CANARY = ("import os, sys\n"
              "os.environ['NM_DISABLE_ANALYTICS'] = '1'\n"
              "import numpy as np\n"
              "from deepsparse import Engine\n"
              "data = np.load(sys.argv[4])\n"
              "engine = Engine(model=sys.argv[1], batch_size=int(sys.argv[2]), num_cores=int(sys.argv[3]))\n"
              "engine.run([data[f'arr_{i}'] for i in range(len(data.files))])\n")

    def check_runs(self, model_path, *, batch_size, feeds, name: str = "", script: str | None = None) -> None:
        """Compile and run `model_path` (the user's `name`) once in a child process; raise SpdyError when
        the engine crashes there (killed by a signal). Other failures are left to the run itself, which
        words them."""
        import signal
        import subprocess
        import sys
        inputs = f"{model_path}.canary.npz"   # beside the run's own copy, in its temporary folder
        np.savez(inputs, *[np.ascontiguousarray(a) for a in feeds.values()])
        try:
            done = subprocess.run([sys.executable, "-c", script or self.CANARY, str(model_path), str(batch_size),
                                   str(self.cores or os.cpu_count() or 1), inputs],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=CANARY_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return   # slow, not crashed: the run goes on and its own timings show it
        finally:
            os.unlink(inputs)
        # the engine's own handler catches the signal, prints "Received signal: Segmentation fault" and
        # exits with status 1; without it the process dies by the signal
        caught = re.search(r"Received signal: ([A-Za-z ]+)", done.stderr.decode(errors="replace"))
        if done.returncode < 0 or (done.returncode and caught):
            try:
                killed_by = caught.group(1).strip() if caught else signal.Signals(-done.returncode).name
            except ValueError:
                killed_by = f"signal {-done.returncode}"
            raise SpdyError(f"DeepSparse {deepsparse.__version__} crashed ({killed_by}) compiling or running "
                            f"{name or os.path.basename(str(model_path))} in a test process: this engine cannot run this "
                            "model; nothing was measured or written")

    def _compile(self, model_path, batch_size, sparsity):
        """The engine for one profiling run: every prunable layer timed as if `sparsity` of its weights
        were zeros."""
        try:
            with banner_hidden_when_quiet():
                return DebugAnalysisEngine(model=str(model_path), batch_size=batch_size, num_cores=self.cores,
                                           num_iterations=self.iterations, num_warmup_iterations=5,
                                           imposed_ks=sparsity if sparsity > 0 else None)
        except Exception as exc:  # the engine's own errors are not ours to show as a stack trace
            raise SpdyError(f"DeepSparse could not run the model: {str(exc).strip().splitlines()[0]}") from None

    def _analyse_engine(self, engine, inputs, sparsity) -> dict:
        """Per-layer times of a compiled profiling run; nothing else of ours runs meanwhile."""
        try:
            with stopped(self.quiet):
                return engine.analyze(inputs)
        except Exception as exc:
            raise SpdyError(f"DeepSparse could not run the model: {str(exc).strip().splitlines()[0]}") from None

    def _analyse(self, model_path, inputs, batch_size, sparsity):
        return self._analyse_engine(self._compile(model_path, batch_size, sparsity), inputs, sparsity)

    @staticmethod
    def attribute(layer_info: list[dict], aliases: dict[str, str], weights: dict[str, int]) -> dict[str, float]:
        """Per-site ms from one analysis: sum a site's layers; split fused groups, never count twice."""
        times: dict[str, float] = {}
        for layer in layer_info:
            names = [n.strip() for n in str(layer.get("canonical_name", "")).split(",")]
            owners = sorted({aliases[n] for n in names if n in aliases})
            if not owners:
                continue
            ms = float(layer.get("average_run_time_in_ms", 0.0))
            total_w = sum(weights.get(o, 1) for o in owners)
            for owner in owners:
                times[owner] = times.get(owner, 0.0) + ms * weights.get(owner, 1) / total_w
        return times

    @staticmethod
    def fused(layer_info: list[dict], aliases: dict[str, str]) -> list[list[str]]:
        """Sites the engine ran as one kernel in this analysis (one layer naming several sites' outputs)."""
        groups = []
        for layer in layer_info:
            names = [n.strip() for n in str(layer.get("canonical_name", "")).split(",")]
            owners = sorted({aliases[n] for n in names if n in aliases})
            if len(owners) > 1:
                groups.append(owners)
        return groups

    def _expected_runs(self, levels) -> int:
        return len(levels) + 2 if self.repeats is None else self.repeats * len(levels)

    def measure(self, model_path, sites, *, levels, batch_size, feeds, aliases, checkpoint=None) -> LatencyTable:
        """One engine run per (repeat, level); each finished run is journaled to `checkpoint`, so a killed
        profiling resumes where it stopped. In the child process unless `isolate` is off."""
        if not self.isolate:
            return self.measure_here(model_path, sites, levels=levels, batch_size=batch_size, feeds=feeds,
                                     aliases=aliases, checkpoint=checkpoint)
        bar = tqdm(total=self._expected_runs(levels), desc="profiling", unit="run", disable=not self.progress,
                   leave=False)
        try:
            what = (f"{os.path.basename(str(model_path))} with sparsity imposed on its layers (profiling; the runs "
                    "finished before the crash are kept)")
            return self._in_child("measure", what, on_progress=bar.update, model_path=str(model_path),
                                  sites=list(sites), levels=list(levels), batch_size=batch_size, feeds=dict(feeds),
                                  aliases=dict(aliases), checkpoint=None if checkpoint is None else str(checkpoint))
        finally:
            bar.close()

    def measure_here(self, model_path, sites, *, levels, batch_size, feeds, aliases, checkpoint=None,
                     on_run=None) -> LatencyTable:
        """`measure` in this process; `on_run()` after each run (else a progress bar of its own)."""
        inputs = [np.ascontiguousarray(a) for a in feeds.values()]
        weights = {s.name: s.n_weights for s in sites}
        used: list[tuple[float, dict]] = []    # every run in the table: (level, journal entry)
        totals: list[float] = []
        fused: list[list[str]] = []
        order = list(levels)
        journal = Journal(checkpoint)
        done = {(e.get("repeat"), e.get("level")): e for e in journal.read()
                if isinstance(e.get("times"), dict) and isinstance(e.get("total"), (int, float))}
        auto = self.repeats is None
        planned = self.repeats or AUTO_REPEATS
        expected_runs = self._expected_runs(order)
        if done:
            log.info("resuming profiling: %d of about %d runs already measured", len(done), expected_runs)
        bar = tqdm(total=expected_runs, desc="profiling", unit="run", disable=not self.progress or on_run is not None,
                   leave=False)
        repeats_done = 0

        def run(rep, key, engine=None):
            """One profiling run (or its journal entry), recorded."""
            lvl = 0.0 if key == DENSE_AGAIN else key
            entry = done.get((rep, key))
            if entry is None:
                result = self._analyse_engine(engine or self._compile(model_path, batch_size, lvl), inputs, lvl)
                entry = {"repeat": rep, "level": key, "total": float(result["average_total_time"]),
                         "times": self.attribute(result["layer_info"], aliases, weights),
                         "fused": self.fused(result["layer_info"], aliases)}
                journal.append(entry)
            used.append((lvl, entry))
            fused.extend(entry.get("fused", []))
            if lvl == 0.0:
                totals.append(entry["total"])
            bar.update(1)
            if on_run is not None:
                on_run()

        with ForeignLoad(ours=[pid for pid, _ in self.quiet]) as load:
            for rep in range(planned):
                # by default (auto) the sparse levels are run once and only the dense level again: a second
                # pass over every level did not make the table predict measured speedups better (MiniLM-L6,
                # BERT-base size, MobileNetV2: sd of log(measured / predicted) within a table 0.031-0.066
                # with two passes, 0.032-0.059 with one; benchmarks/table_noise.py --combine) and cost
                # MiniLM-L6 about 45 s. The dense level is re-run (median of up to three): its total divides
                # every predicted speedup and sets the time the solver cannot prune, so one slow moment
                # there skews the whole table (BERT-base size: a table 36% optimistic took three drafts)
                dense_only = auto and rep == 1
                repeats_done += 1
                # alternate the order of levels between repeats so drift does not bias one end of the grid
                chunks = [[0.0], [DENSE_AGAIN]] if dense_only else \
                    _chunks(order if rep % 2 == 0 else order[::-1], self.compile_threads)
                steady = False
                for chunk in chunks:
                    todo = [lvl for lvl in chunk if (rep, lvl) not in done]
                    engines = dict(zip(todo, compile_in_parallel(
                        lambda lvl: self._compile(model_path, batch_size, 0.0 if lvl == DENSE_AGAIN else lvl),
                        todo, self.compile_threads)))
                    for key in chunk:
                        run(rep, key, engines.pop(key, None))
                        if dense_only and key == 0.0 and len(totals) == 2 and \
                                abs(totals[1] - totals[0]) <= STEADY_SPREAD * min(totals):
                            log.info("profiling: the dense model re-measured within %.1f%% of the first run",
                                     100 * abs(totals[1] - totals[0]) / min(totals))
                            steady = True
                            break
                    engines.clear()
                    if steady:
                        break
                if dense_only:
                    if not steady:
                        log.info("profiling: the dense model re-measured %s off its first run; the median of "
                                 "three is used", " and ".join(f"{100 * (t / totals[0] - 1):+.1f}%" for t in totals[1:]))
                    repeats_done = 1
                    break
            if len(totals) == 2 and abs(totals[1] - totals[0]) > DENSE_OUTLIER_SPREAD * min(totals):
                # two dense runs far apart: their median is their mean, and one slow moment divides every
                # prediction (it made a table refuse a target its model then met)
                log.info("profiling: the dense model's two runs differ by %.0f%%; a third decides",
                         100 * abs(totals[1] - totals[0]) / min(totals))
                bar.total += 1
                run(planned, DENSE_AGAIN)
        bar.close()
        factors = slowness_factors([lvl for lvl, _ in used], [e["total"] for _, e in used],
                                   [sum(e["times"].values()) for _, e in used], fused=bool(fused))
        runs: dict[float, list[dict]] = {lvl: [] for lvl in levels}   # each run's site times, divided
        for (lvl, entry), f in zip(used, factors):
            runs[lvl].append({name: ms / f for name, ms in entry["times"].items()})
        measured = [s.name for s in sites if all(s.name in r for r in runs[0.0])]
        times = {name: [float(np.median([r.get(name, np.nan) for r in runs[lvl]])) for lvl in levels]
                 for name in measured}
        times = {k: v for k, v in times.items() if all(np.isfinite(v))}
        unmapped = sorted(s.name for s in sites if s.name not in times)
        dense_total = float(np.median([e["total"] / f for (lvl, e), f in zip(used, factors) if lvl == 0.0]))
        spread = float((max(totals) - min(totals)) / dense_total) if len(totals) > 1 else 0.0
        slow = {f"{lvl:g}": round(f, 4) for (lvl, _), f in zip(used, factors) if abs(f - 1) > 0.1}
        if slow:
            log.info("profiling: runs slow outside the sites against the levels around them, divided out: %s",
                     ", ".join(f"level {k} x{v:.2f}" for k, v in slow.items()))
        if load.cores > BUSY_WARNING_CORES:
            log.warning("other processes used %.1f CPU cores while profiling: times may be noisy", load.cores)
        meta = {**self.fingerprint(), "batch_size": batch_size, "repeats": repeats_done, "dense_runs": len(totals),
                "iterations": self.iterations, "dense_total_spread": spread,
                "foreign_load_cores": load.cores, "unmapped_sites": unmapped,
                "slowness": [[lvl, round(f, 4)] for (lvl, _), f in zip(used, factors)],
                "layers_total_ms": float(np.median([sum(r.values()) for r in runs[0.0]]))}
        return LatencyTable(levels=list(levels), times=times, dense_total_ms=dense_total, runtime=self.name,
                            pattern=self.pattern, meta=meta, fused_groups=merge_groups(fused, set(times)))

    def dense_check_ms(self, model_path, *, batch_size, feeds) -> float:
        """The dense total of one profiling run, to check a cached table against the machine now."""
        if self.isolate:
            analysis = self._in_child("analyse", os.path.basename(str(model_path)), model_path=str(model_path),
                                      batch_size=batch_size, feeds=dict(feeds))
        else:
            analysis = self.analyse_here(model_path, batch_size=batch_size, feeds=feeds)
        return float(analysis["average_total_time"])

    def analyse_here(self, model_path, *, batch_size, feeds) -> dict:
        """The engine's per-layer analysis of a file as it is (its own zeros, nothing imposed)."""
        inputs = [np.ascontiguousarray(a) for a in feeds.values()]
        return self._analyse(model_path, inputs, batch_size, 0.0)

    def _in_child(self, method: str, what: str, on_progress=None, **kwargs):
        from spdy_onnx.runtimes import engine_worker
        from spdy_onnx.runtimes.engine_worker import EngineCrashed, WorkerUnavailable
        options = {"cores": self.cores, "rounds": self.rounds, "compiles": self.compiles,
                   "iterations": self.iterations, "repeats": self.repeats, "compile_threads": self.compile_threads,
                   "quiet": self.quiet}
        try:
            return engine_worker.WORKER.call(method, {"runtime": options, **kwargs}, on_progress=on_progress)
        except WorkerUnavailable as exc:
            log.warning("%s: the engine runs in this process, where a crash of it ends the run", exc)
            self.isolate = False
            here = {"compare": self.compare_here, "analyse": self.analyse_here, "measure": self.measure_here}[method]
            return here(**kwargs)
        except EngineCrashed as exc:
            raise SpdyError(f"DeepSparse {deepsparse.__version__} crashed ({exc.how}) compiling or running {what} "
                            "(this run's copies of the model) in a child process: the engine cannot run that "
                            "file") from None

    def fused_sites(self, model_path, *, batch_size, feeds, aliases) -> list[list[str]]:
        """Sites the engine runs as one kernel in this file, as it is (its own zeros, nothing imposed).

        A mixed file can fuse sites that no profiling run (every site at one level) fused: on MobileNetV2
        a draft with blocks 4-5 sparse and blocks 6-7 dense ran block 5's project and block 6's expand as
        one kernel, and those blocks ran slower than dense (benchmarks/draft_fusion.py)."""
        if self.isolate:
            analysis = self._in_child("analyse", os.path.basename(str(model_path)), model_path=str(model_path),
                                      batch_size=batch_size, feeds=dict(feeds))
        else:
            analysis = self.analyse_here(model_path, batch_size=batch_size, feeds=feeds)
        return self.fused(analysis["layer_info"], aliases)

    # --- end-to-end, interleaved ---------------------------------------------------------------

    def _engine(self, path, batch_size):
        try:
            with banner_hidden_when_quiet():
                return Engine(model=str(path), batch_size=batch_size, num_cores=self.cores)
        except Exception as exc:
            raise SpdyError(f"DeepSparse could not compile {os.path.basename(str(path))}: "
                            f"{str(exc).strip().splitlines()[0]}") from None

    def compare(self, baseline_path, candidate_path, *, batch_size, feeds) -> Comparison:
        if self.isolate:
            bar = tqdm(total=self.rounds, desc="benchmarking", unit="round", disable=not self.progress, leave=False)
            try:
                what = " and ".join(os.path.basename(str(p)) for p in (baseline_path, candidate_path))
                result = self._in_child("compare", what, on_progress=bar.update, baseline_path=str(baseline_path),
                                        candidate_path=str(candidate_path), batch_size=batch_size, feeds=dict(feeds))
            finally:
                bar.close()
        else:
            result = self.compare_here(baseline_path, candidate_path, batch_size=batch_size, feeds=feeds)
        if result.foreign_load_cores > BUSY_WARNING_CORES:
            log.warning("other processes used %.1f CPU cores while benchmarking: the speedup may be off",
                        result.foreign_load_cores)
        native = result.extra.get("native_ops_share")
        if native is not None and native < NATIVE_WARNING and not self._warned_native:
            self._warned_native = True
            log.warning("DeepSparse runs only %.0f%% of this model's ops itself and hands the rest to "
                        "onnxruntime, between its own pieces; sparsity gains less there", 100 * native)
        return result

    def compare_here(self, baseline_path, candidate_path, *, batch_size, feeds, on_round=None) -> Comparison:
        """`compare` in this process; `on_round()` after each round (else a progress bar of its own)."""
        inputs = [np.ascontiguousarray(a) for a in feeds.values()]
        # compiled one after the other in this thread, as they are timed: the guarantee's measurement is not
        # the place to save two seconds (benchmarks/profile_time.py). With `compiles` > 1, each model has
        # that many engines, alternated baseline/candidate
        paths = [baseline_path, candidate_path] * self.compiles
        engines = [self._engine(path, batch_size) for path in paths]
        with stopped(self.quiet):   # our helpers run while the engines compile, never while they run
            return self._time_engines(engines, inputs, batch_size, on_round)

    def _time_engines(self, engines, inputs, batch_size, on_round) -> Comparison:
        outputs = []
        for engine in engines:  # warm-up, and a first estimate of one run's time
            for _ in range(3):
                out = engine.run(inputs)
            if len(outputs) < 2:
                outputs.append([np.array(a, copy=True) for a in out])
        t0 = time.perf_counter()
        engines[0].run(inputs)
        one = max(time.perf_counter() - t0, 1e-5)
        # each model's time per round stays 0.25 s, split between its engines
        iters = int(min(200, max(3, 0.25 / self.compiles / one)))
        per_engine = [[] for _ in engines]
        bar = tqdm(total=self.rounds, desc="benchmarking", unit="round", leave=False,
                   disable=not self.progress or on_round is not None)
        with ForeignLoad(ours=[pid for pid, _ in self.quiet]) as load:
            for r in range(self.rounds):
                # ABBA: neither model always runs first
                order = range(len(engines)) if r % 2 == 0 else range(len(engines) - 1, -1, -1)
                for k in order:
                    t0 = time.perf_counter()
                    for _ in range(iters):
                        engines[k].run(inputs)
                    per_engine[k].append((time.perf_counter() - t0) * 1000.0 / iters)
                bar.update(1)
                if on_round is not None:
                    on_round()
        bar.close()
        # a round's time of a model is the mean over its engines: their compiles' speeds average out
        base = np.mean(per_engine[0::2], axis=0)
        cand = np.mean(per_engine[1::2], axis=0)
        ratios = base / cand
        native = getattr(engines[1], "fraction_of_supported_ops", None)
        return Comparison(baseline_ms=float(np.median(base)), candidate_ms=float(np.median(cand)),
                          rounds=self.rounds, iterations_per_round=iters,
                          ratio_p25=float(np.percentile(ratios, 25)), ratio_p75=float(np.percentile(ratios, 75)),
                          foreign_load_cores=load.cores,
                          extra={"engine": "deepsparse", "version": deepsparse.__version__,
                                 "cores": self.cores or os.cpu_count(), "batch_size": batch_size,
                                 "compiles": self.compiles,
                                 "native_ops_share": None if native is None else float(native)},
                          outputs=outputs)
