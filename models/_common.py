"""Helpers shared by the model/data scripts in this folder.

Why a module: every script writes its outputs atomically (temp file in the same folder, then
os.replace) so an interrupted run never leaves a half-written .onnx/.npz that a later stage would
silently load, and every exported model gets the same checks (IR/opset fit DeepSparse 1.8, ORT and
DeepSparse agree with torch).  Import as `from _common import ...`: the scripts are run as
`python models/<script>.py`, which puts this folder on sys.path.
"""
from __future__ import annotations

import os

# Must be set before deepsparse/sparsezoo are imported anywhere: otherwise the import makes
# network calls with no timeout and can hang on a closed network.
os.environ.setdefault("NM_DISABLE_ANALYTICS", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import contextlib
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Sequence

import numpy as np

log = logging.getLogger("models")

# DeepSparse 1.8 loads ONNX IR <= 9 and opset <= 18; onnx 1.14 writes IR 9 by default.  We pin IR 8
# (what onnx 1.13/opset 13 tooling and older runtimes accept everywhere).
MAX_IR_VERSION = 8
OPSET = 13
PRUNABLE_OPS = ("MatMul", "Gemm", "Conv")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")


@contextlib.contextmanager
def atomic_path(final: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path in final's folder; on success os.replace it onto final."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix + ".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the final file normal permissions
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_savez(final: Path, arrays: Dict[str, np.ndarray]) -> None:
    """np.savez_compressed to final atomically (through a file handle, so no '.npz' is appended)."""
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    log.info("wrote %s (%s)", final, ", ".join(f"{k}{tuple(v.shape)}:{v.dtype}" for k, v in arrays.items()))


def atomic_replace_dir(tmp_dir: Path, final: Path) -> None:
    """Move a fully written temp folder onto final (old final moved aside first, then removed)."""
    final = Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old.{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp_dir, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def finalize_onnx(tmp_export: Path, final: Path, opset: int = OPSET) -> "onnx.ModelProto":  # noqa: F821
    """Load the exporter's file, cap ir_version, check opset and ops, save atomically to final. At
    another opset than the default, ops DeepSparse does not run natively are allowed (that file exists
    to show what they cost)."""
    import onnx

    model = onnx.load(str(tmp_export))
    if model.ir_version > MAX_IR_VERSION:
        log.info("ir_version %d -> %d", model.ir_version, MAX_IR_VERSION)
        model.ir_version = MAX_IR_VERSION
    opsets = {o.domain: o.version for o in model.opset_import}
    if opsets.get("", opsets.get("ai.onnx")) != opset:
        raise RuntimeError(f"expected default-domain opset {opset}, got {opsets}")
    bad = sorted({n.op_type for n in model.graph.node if n.op_type == "LayerNormalization"})
    if bad and opset == OPSET:
        raise RuntimeError(f"graph has ops DeepSparse 1.8 does not run natively: {bad}")
    onnx.checker.check_model(model, full_check=True)
    with atomic_path(final, suffix=".onnx") as tmp:
        onnx.save(model, str(tmp))
    log.info("wrote %s (ir_version=%d, opsets=%s)", final, model.ir_version, opsets)
    return model


def constant_weight_nodes(model) -> Dict[str, int]:
    """Count MatMul/Gemm/Conv nodes whose weight (input 1) is an initializer or Constant output."""
    consts = {i.name for i in model.graph.initializer}
    consts |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    counts = {op: 0 for op in PRUNABLE_OPS}
    params = 0
    sizes = {i.name: int(np.prod(i.dims)) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type in PRUNABLE_OPS and len(n.input) > 1 and n.input[1] in consts:
            counts[n.op_type] += 1
            params += sizes.get(n.input[1], 0)
    counts["weight_params"] = params
    return counts


def io_summary(model) -> str:
    """'name:elem_type[dims]' for graph inputs and outputs (the contract later stages rely on)."""
    import onnx

    def fmt(v):
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
        return f"{v.name}:{onnx.TensorProto.DataType.Name(t.elem_type)}{dims}"

    init = {i.name for i in model.graph.initializer}
    ins = [fmt(v) for v in model.graph.input if v.name not in init]
    outs = [fmt(v) for v in model.graph.output]
    return f"inputs={ins} outputs={outs}"


def run_onnxruntime(path: Path, feeds: Dict[str, np.ndarray]) -> List[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def run_deepsparse(path: Path, inputs: Sequence[np.ndarray], batch_size: int, *,
                   bench_iters: int = 30, warmup: int = 5):
    """Compile a COPY of path on 1 core (Engine may rewrite the file it is given); return
    (outputs, median latency ms over bench_iters single runs)."""
    import deepsparse

    with tempfile.TemporaryDirectory(prefix="ds-check-") as d:
        copy = Path(d) / Path(path).name
        shutil.copyfile(path, copy)
        engine = deepsparse.compile_model(str(copy), batch_size=batch_size, num_cores=1)
        outs = engine.run(list(inputs))
        for _ in range(warmup):
            engine.run(list(inputs))
        times = []
        for _ in range(bench_iters):
            t0 = time.perf_counter()
            engine.run(list(inputs))
            times.append((time.perf_counter() - t0) * 1e3)
        del engine
    return outs, statistics.median(times)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def export_all(doc: str, names: Sequence[str], export, argv=None) -> None:
    """The command line of an exporter of several models: NAME... (default all), --out, --calib; each
    model through `export(name, out, calib=N)`, which returns the paths it wrote."""
    import argparse
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help=f"default all: {', '.join(names)}")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--calib", type=int, default=64, help="random calibration samples (default 64)")
    args = p.parse_args(argv)
    for name in args.names or list(names):
        if name not in names:
            p.error(f"unknown architecture {name!r}; choose from {', '.join(names)}")
        paths = export(name, args.out, calib=args.calib)
        print(f"{name}: {' '.join(str(x) for x in paths)}", flush=True)
