"""The OBS database built in a child process while the engine profiles: the same database, our helper
stopped while an engine times, and no child left behind."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
import tiny

from spdy_onnx import api, early_database, graph
from spdy_onnx.runtimes import cpu_load

pytestmark = pytest.mark.skipif(not early_database.possible(), reason="needs Linux and two usable cores")

BUSY = "while True: pass"


@pytest.fixture
def busy():
    proc = subprocess.Popen([sys.executable, "-c", BUSY])
    time.sleep(0.2)
    yield proc
    proc.kill()
    proc.wait()


def _state(pid) -> str:
    return cpu_load._stat_fields(pid)[0]


def _ticks(pid) -> int:
    return cpu_load._ticks_of([pid])


def test_stopped_holds_a_helper_still_and_lets_it_go(busy):
    me = cpu_load.identity(busy.pid)
    with cpu_load.stopped([me]):
        assert _state(busy.pid) == "T"
        before = _ticks(busy.pid)
        time.sleep(0.3)
        assert _ticks(busy.pid) == before      # no CPU while stopped
    time.sleep(0.3)
    assert _state(busy.pid) != "T" and _ticks(busy.pid) > before


def test_stopped_leaves_a_pid_that_names_another_process_alone(busy):
    pid, start = cpu_load.identity(busy.pid)
    with cpu_load.stopped([(pid, start + 1)]):   # same pid, another start time: a reused pid
        time.sleep(0.05)
        assert _state(busy.pid) != "T"
    with cpu_load.stopped([(2 ** 22 + 7, 0)]):    # no such process
        pass


def test_foreign_load_does_not_count_our_helpers(busy):
    with cpu_load.ForeignLoad() as anyone:
        time.sleep(0.5)
    with cpu_load.ForeignLoad(ours=[busy.pid]) as others:
        time.sleep(0.5)
    assert anyone.cores > 0.5 and others.cores < anyone.cores - 0.5


@pytest.fixture
def mlp(tmp_path):
    model = tiny.mlp(width=128, depth=3, seq=8)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    data = {"x": np.random.default_rng(0).standard_normal((24, 8, 128)).astype(np.float32)}
    return model, path, data


def _prepared(path):
    return api.Prepared(path, runtime="table", batch_size=1, cores=1, input_shapes=None, exclude=None,
                        include=None, min_weights=0, progress=False)


def test_the_child_builds_the_database_the_run_would_build(mlp, tmp_path):
    from spdy_onnx.reconstruct import build_database
    _, path, data = mlp
    prep = _prepared(path)
    levels = [0.0, 0.5, 0.8]
    try:
        child = early_database.start(prep, prep.sites, levels, data, pattern="unstructured",
                                     cache_dir=tmp_path / "early")
        assert child is not None and child.identity[0] == child.proc.pid
        timings = child.wait()
        assert timings is not None and timings["database_s"] > 0 and child.proc.returncode == 0
        assert child.sites == (len(prep.sites), len(prep.sites))   # its progress, told as it went
        sources = graph.read_weights(prep.model, prep.sites)
        early = build_database(prep, prep.sites, sources, levels, data, cache_dir=tmp_path / "early",
                               progress=False)
        here = build_database(prep, prep.sites, sources, levels, data, cache_dir=tmp_path / "here",
                              progress=False)
    finally:
        prep.close()
    assert early.folder.name == here.folder.name           # the run finds the child's work under its own key
    for site in prep.sites:
        for j in range(len(levels)):
            a, b = early.weight(site.name, j), here.weight(site.name, j)
            assert np.array_equal(a == 0, b == 0)             # the same mask
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_child_that_fails_is_reported_as_none_and_the_run_builds_it(mlp, tmp_path, caplog):
    _, path, data = mlp
    prep = _prepared(path)
    try:
        child = early_database.start(prep, prep.sites, [0.0, 0.5], {"nonsense": data["x"]}, pattern="unstructured",
                                     cache_dir=tmp_path / "c")
        with caplog.at_level("INFO", logger="spdy_onnx"):
            assert child.wait() is None
    finally:
        prep.close()
    assert "did not finish" in caplog.text


def test_the_child_dies_with_its_parent(tmp_path):
    """Killed without a word (SIGKILL), the parent cannot cancel the child: the child sees its stdin close
    and exits at once, not when its work is done (about 10 s of OBS levels here)."""
    path = tmp_path / "m.onnx"
    onnx.save(tiny.mlp(width=512, depth=3, seq=32), path)
    script = tmp_path / "parent.py"
    script.write_text(
        "import time, numpy as np\n"
        "from spdy_onnx import api, early_database\n"
        "prep = api.Prepared(%r, runtime='table', batch_size=1, cores=1, input_shapes=None, exclude=None,\n"
        "                    include=None, min_weights=0, progress=False)\n"
        "data = {'x': np.random.default_rng(0).standard_normal((64, 32, 512)).astype(np.float32)}\n"
        "levels = [0.0] + list(np.linspace(0.3, 0.97, 60))\n"
        "child = early_database.start(prep, prep.sites, levels, data, pattern='unstructured', cache_dir=%r)\n"
        "print(child.proc.pid, flush=True)\n"
        "time.sleep(120)\n" % (str(path), str(tmp_path / "c")))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        time.sleep(1.0)
        assert _state(pid) not in "ZX"                    # at work
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5 and cpu_load._stat_fields(pid) is not None and _state(pid) not in "ZX":
            time.sleep(0.05)
        fields = cpu_load._stat_fields(pid)
        assert fields is None or fields[0] in "ZX", "the orphaned child went on working"
    finally:
        parent.kill()
        parent.wait()


@pytest.mark.deepsparse
def test_optimize_builds_the_database_during_profiling_and_leaves_no_child(mlp, tmp_path, monkeypatch):
    pytest.importorskip("deepsparse")
    model, path, data = mlp
    np.savez(tmp_path / "calib.npz", **data)
    started = []
    real_start = early_database.start

    def spy(*args, **kwargs):
        child = real_start(*args, **kwargs)
        started.append(child)
        return child

    monkeypatch.setattr(early_database, "start", spy)
    with pytest.raises(api.SpdyError):   # a tiny model: no level pays on the engine, or the target is missed
        api.optimize(path, target=50.0, runtime="deepsparse", cores=1, data=tmp_path / "calib.npz",
                     cache_dir=tmp_path / "cache", output=tmp_path / "out.onnx", progress=False, min_weights=0,
                     levels="0.5,0.9", runtime_options={"repeats": 1})
    assert len(started) == 1 and started[0] is not None
    assert started[0].proc.poll() is not None    # waited for or killed: never left running
    assert not (tmp_path / "out.onnx").exists()
    started.clear()
    with pytest.raises(api.SpdyError):           # switched off: no child
        api.optimize(path, target=50.0, runtime="deepsparse", cores=1, data=tmp_path / "calib.npz",
                     cache_dir=tmp_path / "cache2", output=tmp_path / "out.onnx", progress=False, min_weights=0,
                     levels="0.5,0.9", runtime_options={"repeats": 1}, early_database=False)
    assert started == []


@pytest.mark.deepsparse
def test_optimize_finds_the_database_the_child_built(tmp_path, caplog):
    pytest.importorskip("deepsparse")
    path = tmp_path / "mlp.onnx"
    onnx.save(tiny.mlp(width=512, depth=4, seq=64), path)
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(1).standard_normal((16, 64, 512)).astype(np.float32))
    with caplog.at_level("INFO", logger="spdy_onnx"):
        try:
            rep = api.optimize(path, target="1.3x", output=tmp_path / "o.onnx", cache_dir=tmp_path / "cache",
                               data=tmp_path / "calib.npz", correct_epochs=0, search_budget="20", max_attempts=3,
                               margin=-0.05, cores=1, levels="0.5,0.7,0.9",
                               runtime_options={"repeats": 1, "rounds": 5}, progress=False)
        except api.TargetMissed as exc:
            pytest.skip(f"machine too noisy to meet the target here: {exc}")
    assert "building the OBS database in a child process" in caplog.text
    assert "reconstruction database from cache" in caplog.text      # the run itself built nothing
    early = rep["quality"]["calibration_phases_s"]["during_profiling"]
    assert early["database_s"] > 0 and early["wall_s"] >= early["database_s"]
    assert "early_database_wait_s" in rep["phases_s"]
