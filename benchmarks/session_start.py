"""Time of the per-model overheads that do not depend on the weights' values: an onnxruntime session of an
in-memory model, and the 2 GB test before each write.

Why: the pipeline opens about 20 sessions of a model it holds in memory (short copies for the Hessians,
the evaluator, the correction's dense references) and writes about 10 files for the engine. Serialising
a model and parsing it back costs seconds at BERT-base size, and upb's ByteSize encodes the whole model.
This times the old way and the package's way, interleaved, for each model given. Not a test.

    python benchmarks/session_start.py out/minilm-l6.onnx out/bert-base.onnx --repeats 5
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from spdy_onnx import modelio, ort_session  # noqa: E402


def session_from_bytes(model):
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, onnxruntime {ort.__version__} (its default threads), "
          f"{args.repeats} interleaved repeats, medians")
    print("| model | MB | session from bytes (s) | session from arrays (s) | ratio | ByteSize (s) | bound (s) | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for path in args.models:
        model = onnx.load(path)
        rows = {"bytes": [], "arrays": [], "bytesize": [], "bound": []}
        for rep in range(args.repeats):
            for way, fn in ((("bytes", session_from_bytes), ("arrays", ort_session.make_session))
                            if rep % 2 == 0 else (("arrays", ort_session.make_session), ("bytes", session_from_bytes))):
                seconds, session = timed(fn, model)
                rows[way].append(seconds)
                del session
            rows["bytesize"].append(timed(model.ByteSize)[0])
            rows["bound"].append(timed(modelio.over_two_gb, model)[0])
        feeds = {}
        for value in session_from_bytes(model).get_inputs():
            shape = [d if isinstance(d, int) else 1 for d in value.shape]
            feeds[value.name] = np.ones(shape, dtype=np.int64 if "int64" in value.type else np.float32)
        a = session_from_bytes(model).run(None, feeds)
        b = ort_session.make_session(model).run(None, feeds)
        same = all(np.array_equal(x, y) for x, y in zip(a, b))
        m = {k: statistics.median(v) for k, v in rows.items()}
        print(f"| {os.path.basename(path)} | {os.path.getsize(path) / 1e6:.0f} | {m['bytes']:.3f} | {m['arrays']:.3f} "
              f"| {m['bytes'] / m['arrays']:.1f}x | {m['bytesize']:.3f} | {m['bound']:.4f} | "
              f"{m['bytesize'] / m['bound']:.0f}x |" + ("" if same else " OUTPUTS DIFFER"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
