"""Command line: `spdy-onnx optimize|profile|benchmark|sites`. Mirrors spdy_onnx.api."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from spdy_onnx import __version__
from spdy_onnx.errors import SpdyError

EXIT_ERROR = 2
EXIT_MISSED = 3


def _common(p: argparse.ArgumentParser, *, runtime_default="deepsparse", batch_is="optimise for"):
    p.add_argument("--runtime", default=runtime_default,
                   help="engine to measure on: deepsparse | cuda-2:4 | table (default: %(default)s)")
    p.add_argument("-b", "--batch-size", type=int, default=None,
                   help=f"batch size to {batch_is} "
                        "(default: the batch the model's inputs fix, else 1)")
    p.add_argument("--cores", type=int, default=None, help="CPU cores the engine may use (default: all)")
    p.add_argument("--input-shape", action="append", metavar="NAME:D0xD1x...",
                   help="concrete shape for an input with dynamic dimensions (repeatable, one per "
                        "input; in optimize, with --data, they default to its arrays' shapes); the first dimension is the "
                        "batch: write 1 or the --batch-size")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")


def _table_opts(p):
    p.add_argument("--levels", default=None,
                   help="sparsity grid: a count of levels equally spaced in log-density between 0.4 and "
                        "0.97 (default 12), or an explicit list like 0.5,0.7,0.9; dense is always included")
    p.add_argument("--cache-dir", default=None, help="where latency tables and databases are cached "
                                                     "(default: $SPDY_ONNX_CACHE or ~/.cache/spdy-onnx)")
    p.add_argument("--no-cache", action="store_true", help="re-measure even if a cached table exists")
    p.add_argument("--level-context", action="store_true",
                   help="also time the levels under 60%% among pruned neighbours (one more engine run per "
                        "such level, within a 40 s budget) and scale their times by what that shows; off by "
                        "default: closer predictions for profiles "
                        "that keep sites dense, no accuracy gain measured (README, How it works)")
    p.add_argument("--repeats", type=int, default=None,
                   help="profiling passes over the levels; medians are kept (default: one pass, then the "
                        "dense model again, a third time when the two runs are more than 2%% apart)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spdy-onnx",
        description="Prune an ONNX model so that a real engine runs it a promised amount faster (SPDY).")
    parser.add_argument("--version", action="version", version=f"spdy-onnx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("optimize", help="prune a model to a measured speedup target")
    p.add_argument("model", help="input ONNX file (never modified)")
    p.add_argument("--target", required=True, help="speedup to reach, e.g. 2x or 2.5")
    p.add_argument("-o", "--output", default=None, help="output ONNX file (default: MODEL.<target>x.onnx)")
    p.add_argument("--report", default=None, help="report JSON path (default: next to the output)")
    _common(p)
    _table_opts(p)
    p.add_argument("--latency-table", default=None,
                   help="use this saved latency table (from `profile`) instead of measuring")
    p.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="keep these sites dense: node or output names, or regular expressions that match "
                        "the whole name, e.g. '.*attention.*' (repeatable)")
    p.add_argument("--include", action="append", metavar="PATTERN",
                   help="prune these sites even if excluded by default (tiny or grouped/depthwise); names or "
                        "whole-name regular expressions, as --exclude (repeatable)")
    p.add_argument("--min-weights", type=int, default=4096,
                   help="sites with fewer weights stay dense unless --include'd (default: %(default)s)")
    p.add_argument("--data", default=None,
                   help="calibration data: an .npz (arrays keyed by input name, first axis = samples) "
                        "or a folder of .npz files, one sample each")
    p.add_argument("--samples", type=int, default=None, help="use at most this many calibration samples")
    p.add_argument("--validation-data", default=None, metavar="PATH",
                   help="samples kept apart from --data (same format), on which the global correction judges "
                        "its epochs and keeps the best or none; without it, a random eighth of the calibration "
                        "batches. Give it when the calibration samples are not independent (augmented views of "
                        "a few images)")
    p.add_argument("--strategy", default="spdy",
                   choices=["spdy", "uniform", "global-magnitude", "dp-loss", "magnitude-dp"],
                   help="how the per-site profile is chosen (default: %(default)s)")
    p.add_argument("--no-early-database", action="store_true",
                   help="build the OBS database after profiling instead of in a child process during it (which "
                        "is stopped whenever the engine times; README, How it works)")
    p.add_argument("--reconstruct", default="obs", choices=["obs", "magnitude"],
                   help="how pruned weights are computed with calibration data (default: %(default)s)")
    p.add_argument("--loss", default="auto", choices=["auto", "kl", "mse"],
                   help="label-free calibration loss against the dense model: auto picks KL over the class "
                        "axis for class scores (rank-2 outputs made by a linear op that are not an embedding by "
                        "name or unit rows, nor all in [0, 1]; outputs named like logits; log-probabilities), "
                        "KL of the probabilities themselves for outputs whose rows sum to 1 (a Softmax), and "
                        "normalised MSE otherwise; README, How it works (default: auto)")
    p.add_argument("--search-budget", default=None,
                   help="SPDY search budget: a number of evaluations (600) or a time (5m, 90s); "
                        "default: 40 s (the paper's schedule, then restarts from the best while they find new "
                        "profiles); a re-solve after a measured draft gets a quarter of the first search's evaluations")
    p.add_argument("--search-prior", choices=["auto", "shape", "losses"], default="auto",
                   help="what SPDY's coefficients scale: each site's measured loss curve (the dp-loss errors; "
                        "the search then starts from dp-loss's profile), or the paper's quadratic shape. "
                        "losses measures every level; auto (default) measures the curves at as many levels "
                        "as fit in 3/4 of the search budget, and uses the shape when fewer than 2 fit")
    p.add_argument("--eval-samples", type=int, default=None,
                   help="calibration samples each search candidate is scored on, the same ones for every "
                        "candidate (default: 16; at least one batch). More samples give a less noisy loss "
                        "and fewer evaluations in the same time")
    p.add_argument("--refit", action="store_true",
                   help="after choosing the profile, re-fit kept weights site by site against the pruned "
                        "model's own inputs (a closed-form correction, site by site; with --data). Off by default: "
                        "on MiniLM-L6 with 256 calibration sentences it lowered the calibration loss but not "
                        "the held-out quality")
    p.add_argument("--correct-epochs", type=int, default=1,
                   help="global correction after the profile is chosen (with --data; needs PyTorch): epochs of "
                        "tuning every kept weight and bias against the dense model's outputs (at most 2048 "
                        "samples each), zeros kept; 0 turns it off (default: %(default)s)")
    p.add_argument("--correct-budget", default=None, metavar="TIME",
                   help="time for the global correction (90s, 5m): each epoch tunes on as many of the 2048 "
                        "samples as fit it, judged from two timed trial steps; training stops when it is "
                        "spent (a cut epoch is judged like a whole one; the best, or no change, is kept) "
                        "(default: 2m)")
    p.add_argument("--correct-layers", type=float, default=0.0, metavar="W",
                   help="also match every pruned layer's own output to the dense model's in the global correction, "
                        "at weight W against the output loss (SPDY's global AdaPrune): with narrow calibration data "
                        "(a few photos) W = 10-100 lowered the held-out error; on MiniLM-L6's 1,024 sentences it "
                        "did not help and cost half again the correction's time (default: %(default)s, off)")
    p.add_argument("--seed", type=int, default=0, help="seed for every random choice (default: 0)")
    p.add_argument("--max-attempts", type=int, default=6,
                   help="profiles measured end to end while searching the aim: re-solved higher after a miss, "
                        "lower after more than 6%% surplus (default: %(default)s)")
    p.add_argument("--margin", type=float, default=0.02,
                   help="the measured speedup must reach target x (1 + margin): a safety margin against "
                        "run-to-run noise; a measurement pooled over k compiles needs margin x "
                        "sqrt((1 + 1/k) / 2), over -0.5 and under 0.5 (default: %(default)s; a negative value accepts a "
                        "shortfall)")

    p = sub.add_parser("profile", help="measure the per-site latency table and save it as JSON")
    p.add_argument("model")
    p.add_argument("-o", "--output", default=None, help="table JSON (default: MODEL.latency.json)")
    _common(p)
    _table_opts(p)

    p = sub.add_parser("benchmark", help="measure a model end to end against a baseline, interleaved")
    p.add_argument("model")
    p.add_argument("--baseline", default=None, help="the model to compare against (e.g. the dense original)")
    p.add_argument("--rounds", type=int, default=15,
                   help="interleaved rounds, at least 3 for a median and its spread (default: %(default)s)")
    p.add_argument("--measurements", type=int, default=1,
                   help="fresh measurements (new compiles of both models, one after the other); the median "
                        "speedup is reported with all of them. On a shared machine one measurement can land "
                        "10%% or more off (default: %(default)s)")
    _common(p, batch_is="measure at")

    p = sub.add_parser("sites", help="list the prunable sites and what is excluded by default")
    p.add_argument("model", help="ONNX file (only read)")
    p.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="as optimize's: names or whole-name regular expressions to keep dense (repeatable)")
    p.add_argument("--include", action="append", metavar="PATTERN",
                   help="as optimize's: prune these even if excluded by default (repeatable)")
    p.add_argument("--min-weights", type=int, default=4096,
                   help="sites with fewer weights stay dense unless --include'd (default: %(default)s)")
    return parser


def _setup_logging(args):
    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", 0)
    level = logging.WARNING if quiet else (logging.DEBUG if verbose >= 2 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger("spdy_onnx")
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    return handler


def _fmt(v, spec=".3f", none="-"):
    return none if v is None else format(v, spec)


def _where(rep: dict) -> str:
    """What the times were taken on: the GPU for a GPU table, else the CPU cores."""
    return f"on {rep['gpu']}" if rep.get("gpu") else f"cores {rep['cores']}"


def _print_optimize(rep: dict):
    print(f"{'site':40s} {'op':7s} {'sparsity':>8s} {'dense ms':>9s} {'chosen ms':>9s}")
    for s in rep["sites"]:
        note = "  (dense: " + s["excluded"] + ")" if s.get("excluded") else ""
        print(f"{_fit(s['name'], 40):40s} {s['op_type']:7s} {s['sparsity']:8.3f} {_fmt(s['dense_ms'], '9.3f'):>9s} "
              f"{_fmt(s['ms_at_chosen'], '9.3f'):>9s}{note[:80]}")
    listed = {s["name"] for s in rep["sites"]}
    unlisted = {n: why for n, why in (rep.get("left_dense") or {}).items() if n not in listed}
    if unlisted:
        name, why = next(iter(unlisted.items()))
        print(f"and {len(unlisted)} node(s) left dense that cannot be pruned, such as {_fit(name, 40)} ({why}); "
              "all in the report's left_dense")
    print()
    print(f"target {rep['target']:g}x | predicted {rep['predicted_speedup']:.3f}x | "
          f"measured {_fmt(rep['measured_speedup'])}x{_pooled(rep)} | dense {rep['dense_ms']:.3f} ms -> "
          f"pruned {rep['pruned_ms']:.3f} ms | {rep['runtime']} batch {rep['batch_size']} {_where(rep)}")
    q = rep.get("quality") or {}
    if "calibration_loss" in q:
        before = q.get("calibration_loss_before_correction")
        extra = f" (database weights {before:.4g}, before the correction)" if before is not None else ""
        if before is not None and (q.get("global_correction") or {}).get("best_epoch") == 0:
            extra = " (the database weights: the global correction kept no epoch)"
        if q.get("global_correction_skipped"):
            extra = " (the global correction was skipped: see the warning)"
        print(f"calibration {q.get('loss')} vs dense: {q['calibration_loss']:.4g}{extra}")
        per_output = q.get("calibration_loss_per_output") or {}
        if per_output:
            from spdy_onnx.modelio import printable
            print("  per output: " + ", ".join(f"{printable(n, 40)} {v:.3g}" for n, v in per_output.items()))
    corr = q.get("global_correction") or {}
    if corr.get("held_back") == "validation data":
        kept = f"epoch {corr['best_epoch']} kept" if corr.get("best_epoch") else "no epoch beat the draft: not applied"
        print(f"global correction on validation data: {q.get('loss')} {corr['loss_before']:.5f} -> "
              f"{corr['loss_after']:.5f} ({kept})")
    for group in rep.get("fused_groups_from_drafts", []):
        print(f"tied {len(group)} sites from {group[0]}: the engine ran them as one kernel in a draft")
    for warning in rep.get("warnings", []):
        print(f"warning: {warning}")
    if rep["status"] == "met" and rep["measured_speedup"] is not None and rep["measured_speedup"] < rep["target"]:
        print(f"target NOT reached, accepted as --margin {rep['margin']:g} allows: measured "
              f"{rep['measured_speedup']:.3f}x for {rep['target']:g}x; wrote {rep['output']} (report {rep['report_path']})")
    elif rep["status"] == "met":
        print(f"target met: wrote {rep['output']} (report {rep['report_path']})")
    elif rep["status"] == "not_measured":
        print(f"wrote {rep['output']}, but the speedup was NOT measured on this machine ({rep['runtime']} "
              f"cannot run here): predicted only, not guaranteed (report {rep['report_path']})")


def _pooled(rep) -> str:
    k = rep.get("compiles_pooled") or 1
    return f" (pooled over {k} compiles, needs {rep['required_speedup_applied']:.3f}x)" if k > 1 else ""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler, `kill`, a container stopping) or SIGHUP (the terminal or ssh session
    closed), unwound like Ctrl-C so that temporary folders are removed and nothing half-written is left;
    the exit status is 128 + the signal's number (143, 129), as a shell reports it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.status = 128 + int(signum)


def _terminate(signum, frame):
    raise Terminated(signum)


def _stop_signals():
    import signal
    return [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])


def _fit(name: str, width: int) -> str:
    """A node name cut to `width` in the middle: exporters' names share long prefixes
    (/model/encoder/layer.0/...) and differ at both ends, so the start and the end are kept."""
    if len(name) <= width:
        return name
    head = (width - 3) // 3
    return name[:head] + "..." + name[len(name) - (width - 3 - head):]


def _at_least(least: int, value: int, flag: str) -> int:
    if value < least:
        from spdy_onnx.errors import SpdyError
        raise SpdyError(f"{flag} must be >= {least}, got {value}")
    return value


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handler = _setup_logging(args)
    import signal
    import threading
    previous = {}
    if threading.current_thread() is threading.main_thread():   # handlers can only be set there
        for signum in _stop_signals():
            if signal.getsignal(signum) is not signal.SIG_IGN:   # `nohup` asked for the run to go on
                previous[signum] = signal.signal(signum, _terminate)
    try:
        return _run(args)
    finally:
        for signum, handler_before in previous.items():
            signal.signal(signum, handler_before)
        logging.getLogger("spdy_onnx").removeHandler(handler)


def _run(args) -> int:
    progress = not getattr(args, "quiet", False)
    try:
        if args.command == "optimize":
            from spdy_onnx.api import optimize
            rep = optimize(
                args.model, target=args.target, runtime=args.runtime, output=args.output, report=args.report,
                batch_size=args.batch_size, cores=args.cores, input_shapes=args.input_shape, levels=args.levels,
                exclude=args.exclude, include=args.include, min_weights=args.min_weights,
                latency_table=args.latency_table, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                strategy=args.strategy, data=args.data, samples=args.samples, reconstruct=args.reconstruct,
                loss=args.loss, search_budget=args.search_budget, eval_samples=args.eval_samples, seed=args.seed,
                search_prior=args.search_prior,
                max_attempts=args.max_attempts, margin=args.margin, refit=args.refit,
                correct_epochs=args.correct_epochs, correct_budget=args.correct_budget,
                correct_layers=args.correct_layers, progress=progress,
                runtime_options={"repeats": args.repeats}, level_context=args.level_context,
                validation_data=args.validation_data, early_database=not args.no_early_database)
            _print_optimize(rep)
        elif args.command == "profile":
            from spdy_onnx.api import profile
            table, path = profile(args.model, runtime=args.runtime, output=args.output,
                                  batch_size=args.batch_size, cores=args.cores, input_shapes=args.input_shape,
                                  levels=args.levels, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                                  progress=progress, runtime_options={"repeats": args.repeats},
                                  level_context=args.level_context)
            names = sorted(table.times, key=lambda n: -table.times[n][0])
            print(f"{'site':40s} {'dense ms':>9s} {'fastest ms':>10s} {'at':>6s}")
            for n in names:
                row = table.times[n]
                j = min(range(len(row)), key=row.__getitem__)
                print(f"{_fit(n, 40):40s} {row[0]:9.3f} {row[j]:10.3f} {table.levels[j]:6.3f}")
            print(f"\ndense total {table.dense_total_ms:.3f} ms; sites {len(table.times)}; "
                  f"largest achievable speedup (all sites) {table.max_speedup(list(table.times)):.3f}x")
            if table.level_factors and max(table.level_factors) > 1.0:
                low = [f"{v:g}" for v, f in zip(table.levels, table.level_factors) if f > 1.0]
                print(f"levels {', '.join(low)} count {max(table.level_factors):.2f}x their time: measured among "
                      "pruned neighbours, where they run slower than in their own run")
            if table.fused_groups:
                print(f"{len(table.fused_groups)} group(s) of sites the engine fuses, each kept at one level: "
                      + "; ".join(f"{len(g)} sites from {g[0]}" for g in table.fused_groups))
            print(f"wrote {path}")
        elif args.command == "benchmark":
            from spdy_onnx.api import benchmark
            c = benchmark(args.model, baseline=args.baseline, runtime=args.runtime, batch_size=args.batch_size,
                          cores=args.cores, input_shapes=args.input_shape, progress=progress,
                          runtime_options={"rounds": _at_least(3, args.rounds, "--rounds")},
                          measurements=_at_least(1, args.measurements, "--measurements"))
            print(f"{'model':50s} {'median ms':>10s}")
            if args.baseline:
                print(f"{args.baseline[-50:]:50s} {c.baseline_ms:10.3f}")
            print(f"{args.model[-50:]:50s} {c.candidate_ms:10.3f}")
            if args.baseline:
                print(f"speedup {c.speedup:.3f}x (ratio of the median times; per-round ratios p25 "
                      f"{c.ratio_p25:.3f}, p75 {c.ratio_p75:.3f}); "
                      f"{c.rounds} interleaved rounds x {c.iterations_per_round} runs; "
                      f"batch {c.extra.get('batch_size')}, cores {c.extra.get('cores')}")
                every = c.extra.get("measured_speedups", [])
                if len(every) > 1:
                    print(f"the median of {len(every)} fresh measurements: "
                          f"{', '.join(f'{v:.3f}x' for v in every)} (in the order measured)")
            if c.foreign_load_cores > 0.5:
                print(f"warning: other processes used {c.foreign_load_cores:.1f} cores meanwhile")
            for warning in c.extra.get("warnings", []):
                print(f"warning: {warning}")
        elif args.command == "sites":
            from spdy_onnx import graph, modelio
            model = graph.constants_to_initializers(modelio.load_model(args.model))
            sites, unprunable = graph.find_sites(model)
            chosen, excluded = graph.select_sites(sites, exclude=args.exclude, include=args.include,
                                                  min_weights=args.min_weights, unprunable=unprunable)
            excluded.update(unprunable)
            # whole names: they are what --exclude and --include match
            width = max([48] + [len(s.name) for s in sites] + [len(n) for n in unprunable])
            sharing = {n: len(g) for g in graph.shared_weight_groups(sites) for n in g}
            for s in sites:
                why = excluded.get(s.name, "")
                shared = (f" (its weight '{modelio.printable(s.weight, 40)}' shared by {sharing[s.name]} sites: "
                          "one level)") if s.name in sharing else ""
                print(f"{s.name:{width}s} {s.op_type:7s} {s.n_weights:10d}  "
                      f"{('dense: ' + why) if why else 'prunable' + shared}")
            for name, why in unprunable.items():
                if name not in {s.name for s in sites}:
                    print(f"{name:{width}s} {'':7s} {'':10s}  dense: {why}")
            print(f"\n{len(chosen)} prunable, {len(excluded)} left dense")
            if not sites:
                print(graph.no_sites_message(os.path.basename(args.model), model, unprunable))
    except SpdyError as exc:
        from spdy_onnx.modelio import printable
        print(f"spdy-onnx: error: {printable(exc, limit=2000)}", file=sys.stderr)
        from spdy_onnx.errors import TargetMissed
        return EXIT_MISSED if isinstance(exc, TargetMissed) else EXIT_ERROR
    except KeyboardInterrupt as exc:
        print("spdy-onnx: interrupted (outputs are only ever renamed into place complete; caches keep "
              "finished work for the next run)", file=sys.stderr)
        return exc.status if isinstance(exc, Terminated) else 130
    except BrokenPipeError:
        # the reader went away (`spdy-onnx sites m.onnx | head`): stop quietly, and keep Python's own
        # flush of stdout at exit from raising the same error again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141   # 128 + SIGPIPE, as a shell reports a command killed by a closed pipe
    return 0


if __name__ == "__main__":
    sys.exit(main())
