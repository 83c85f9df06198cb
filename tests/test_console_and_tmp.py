"""What a run leaves outside its own outputs: no folder in $TMPDIR, and under -q no engine banner.

Each runs the CLI in a fresh interpreter: both happen once per process (PyTorch's torch._dynamo import,
DeepSparse's first compile), so an earlier test in this process would hide them.
"""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import tiny

from spdy_onnx import graph
from spdy_onnx.tables import LatencyTable

BANNER = "Copyright 2021-present / Neuralmagic"


def _cli(*argv, env=None, timeout=300):
    env = {**os.environ, "NM_DISABLE_ANALYTICS": "1", **(env or {})}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    return subprocess.run([sys.executable, "-m", "spdy_onnx", *map(str, argv)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_the_global_correction_leaves_no_torch_cache_folder_in_tmpdir(tmp_path):
    """Importing torch._dynamo (an optimizer does) made an empty $TMPDIR/torchinductor_<user> and left it."""
    pytest.importorskip("torch")
    model = tiny.mlp(width=64, depth=4, seq=8)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((48, 8, 64)).astype(np.float32))
    sites, _ = graph.find_sites(model)
    LatencyTable(levels=[0.0, 0.5, 0.7, 0.9], times={s.name: [1.0, 0.7, 0.45, 0.2] for s in sites},
                 dense_total_ms=4.5, runtime="table", meta={"cores": 1}).save(tmp_path / "table.json")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    done = _cli("optimize", tmp_path / "m.onnx", "--target", "2x", "--runtime", "table", "--latency-table",
                tmp_path / "table.json", "--data", tmp_path / "calib.npz", "--correct-epochs", "1", "-o",
                tmp_path / "out.onnx", "--cache-dir", tmp_path / "cache", "-q", env={"TMPDIR": str(tmpdir)})
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out.report.json").read_text())["quality"]["global_correction"]
    # .ses: onnxruntime's telemetry session file, one fixed name that its import rewrites
    assert sorted(p.name for p in tmpdir.iterdir() if p.name != ".ses") == []


@pytest.mark.deepsparse
def test_quiet_cli_leaves_out_the_deepsparse_banner(tmp_path):
    pytest.importorskip("deepsparse")
    onnx.save(tiny.mlp(width=64, depth=2, seq=4), tmp_path / "m.onnx")
    done = _cli("benchmark", tmp_path / "m.onnx", "--rounds", "3", "--cores", "1", "-q")
    assert done.returncode == 0, done.stderr
    assert "median ms" in done.stdout
    assert BANNER not in done.stdout + done.stderr


def test_the_banner_filter_passes_every_other_engine_line_on(capfd, caplog, monkeypatch):
    """Lines the engine writes to file descriptor 2 in its first compile, under -q: all but the banner."""
    pytest.importorskip("deepsparse")
    from spdy_onnx.runtimes import deepsparse as ds
    monkeypatch.setattr(ds, "_banner_pending", True)
    caplog.set_level("WARNING", logger=ds.log.name)   # -q
    capfd.readouterr()
    with ds.banner_hidden_when_quiet():
        os.write(2, f"DeepSparse, {BANNER}, Inc. version: 1.8.0 COMMUNITY\n".encode())
        os.write(2, b"WARN: an engine line\n")
    with ds.banner_hidden_when_quiet():   # printed once per process: later compiles are left alone
        os.write(2, b"later line\n")
    assert capfd.readouterr().err == "WARN: an engine line\nlater line\n"
