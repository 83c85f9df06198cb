"""How much of a model DeepSparse runs natively, read at each opset it could be read at.

Why: DeepSparse 1.8 loads opset 18, but with the opset-18 forms of some ops (reductions that take
their axes as an input, Split with num_outputs) it ran none of some graphs natively, and then its
per-layer analysis names no prunable layer. The tool reads such models at opset 17 where they compute
the same (passes/opsets.py). This prints, for each file, the engine's fraction of supported ops on
the graph the tool makes (its dense static copy), with the model read at opset 18 and at 17. Not a test.

    python benchmarks/native_share.py out/hf_dynamo/resnet-hf.onnx out/hf_dynamo/gpt2-lm.onnx
"""
from __future__ import annotations

import argparse
import logging
import os

os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from spdy_onnx import api, modelio  # noqa: E402
from spdy_onnx.runtimes import deepsparse as ds  # noqa: E402


def share(path: str, opset: int, batch_size: int, cores: int) -> tuple[int, float]:
    import deepsparse
    ds.DeepSparseRuntime.native_opset = opset
    prep = api.Prepared(path, runtime="deepsparse", batch_size=batch_size, cores=cores, input_shapes=None,
                        exclude=None, include=None, min_weights=0, progress=False)
    try:
        engine = deepsparse.Engine(str(prep.dense_static()), batch_size=batch_size, num_cores=cores)
        return modelio.default_opset(prep.model), float(engine.fraction_of_supported_ops)
    finally:
        prep.close()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--cores", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    print(f"DeepSparse, {ds.cpu_name()}, batch {args.batch_size}, {args.cores} core(s)")
    print("| model | read at opset | fraction of ops DeepSparse runs natively |")
    print("|---|---|---|")
    for path in args.models:
        for opset in (18, 17):
            read_at, fraction = share(path, opset, args.batch_size, args.cores)
            print(f"| {os.path.basename(path)} | {read_at} | {fraction:.3f} |", flush=True)


if __name__ == "__main__":
    main()
