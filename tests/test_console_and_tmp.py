"""What a run leaves outside its own outputs: nothing in $TMPDIR, no telemetry, and under -q no engine banner.

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


def _env(extra=None) -> dict:
    """This environment without the settings a run must make itself (CI exports ORT_DISABLE_TELEMETRY), and
    without the CI markers that turn onnxruntime's telemetry off on their own."""
    env = {**os.environ, "NM_DISABLE_ANALYTICS": "1", **(extra or {})}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    env.pop("ORT_DISABLE_TELEMETRY", None)
    for name in ("CI", "GITHUB_ACTIONS", "TF_BUILD"):   # onnxruntime sends nothing where these are set
        env.pop(name, None)
    return env


def _telemetry_files(tmpdir, home) -> list[str]:
    """What onnxruntime's telemetry writes: a session file in $TMPDIR, a device id and a database under ~/.cache."""
    found = [tmpdir / ".ses"] + sorted((home / ".cache" / "Microsoft").rglob("*"))
    return [str(p) for p in found if p.is_file()]


def _cli(*argv, env=None, timeout=300):
    env = _env(env)
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
    tmpdir, home = tmp_path / "tmp", tmp_path / "home"
    tmpdir.mkdir()
    home.mkdir()
    done = _cli("optimize", tmp_path / "m.onnx", "--target", "2x", "--runtime", "table", "--latency-table",
                tmp_path / "table.json", "--data", tmp_path / "calib.npz", "--correct-epochs", "1", "-o",
                tmp_path / "out.onnx", "--cache-dir", tmp_path / "cache", "-q",
                env={"TMPDIR": str(tmpdir), "HOME": str(home)})
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out.report.json").read_text())["quality"]["global_correction"]
    assert sorted(p.name for p in tmpdir.iterdir()) == []
    assert _telemetry_files(tmpdir, home) == []


def test_onnxruntime_telemetry_is_off_once_spdy_onnx_is_imported(tmp_path):
    """onnxruntime 1.29 and later send usage events from Linux and write a device id, unless
    ORT_DISABLE_TELEMETRY=1 is set before it is imported; `import spdy_onnx` sets it. The same session made
    without spdy_onnx shows what onnxruntime does on its own (no files: a build without telemetry)."""
    onnx.save(tiny.mlp(width=64, depth=2, seq=4), tmp_path / "m.onnx")

    def run(code: str, tag: str) -> list[str]:
        tmpdir, home = tmp_path / f"tmp_{tag}", tmp_path / f"home_{tag}"
        tmpdir.mkdir()
        home.mkdir()
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m.onnx")], capture_output=True, text=True,
                              env=_env({"TMPDIR": str(tmpdir), "HOME": str(home)}), timeout=120)
        assert done.returncode == 0, done.stderr
        return _telemetry_files(tmpdir, home)

    alone = run("import sys, onnxruntime as ort; ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])",
                "alone")
    if not alone:
        pytest.skip("this onnxruntime writes no telemetry files; nothing to turn off")
    assert run("import sys, spdy_onnx, onnxruntime as ort; ort.InferenceSession(sys.argv[1], "
               "providers=['CPUExecutionProvider'])", "user") == []
    assert run("import sys\nfrom spdy_onnx.ort_session import make_session\nmake_session(sys.argv[1])", "package") == []


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
