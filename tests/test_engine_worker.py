"""End-to-end engine runs in a child process: a crash there is one error, and the next run starts a new child."""
import os
import signal
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import tiny

pytest.importorskip("deepsparse")

from spdy_onnx.cli import main  # noqa: E402
from spdy_onnx.errors import SpdyError  # noqa: E402
from spdy_onnx.runtimes import engine_worker  # noqa: E402
from spdy_onnx.runtimes.deepsparse import DeepSparseRuntime  # noqa: E402

pytestmark = pytest.mark.deepsparse

# a child that reads one request and dies the way DeepSparse 1.8 does on a segfault: its handler names
# the signal on stderr after a register dump, and the process ends
CRASHING = ("import os, pickle, signal, sys\n"
            "pickle.load(sys.stdin.buffer)\n"
            "sys.stderr.write('RAX = 0000\\nReceived signal: Segmentation fault (signal addr: 0)\\n')\n"
            "sys.stderr.flush()\n"
            "os.kill(os.getpid(), signal.SIGSEGV)\n")


@pytest.fixture
def mlp_file(tmp_path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(tiny.mlp(width=256, depth=2, seq=16), str(path))
    return path


def _feeds():
    return {"x": np.random.default_rng(0).standard_normal((1, 16, 256)).astype(np.float32)}


def test_a_crashing_child_is_one_error_naming_the_signal(monkeypatch, mlp_file):
    monkeypatch.setattr(engine_worker, "WORKER", engine_worker.Worker(CRASHING))
    rt = DeepSparseRuntime(cores=1, rounds=3, progress=False)
    with pytest.raises(SpdyError, match=r"crashed \(Segmentation fault\) compiling or running mlp.onnx and mlp.onnx"):
        rt.compare(str(mlp_file), str(mlp_file), batch_size=1, feeds=_feeds())
    engine_worker.WORKER.close()


def test_benchmark_through_the_cli_reports_the_crash_on_one_line(monkeypatch, mlp_file, capsys):
    monkeypatch.setattr(engine_worker, "WORKER", engine_worker.Worker(CRASHING))
    code = main(["benchmark", str(mlp_file), "--baseline", str(mlp_file), "--cores", "1", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "RAX" not in err
    errors = [line for line in err.splitlines() if line.startswith("spdy-onnx: error")]
    assert len(errors) == 1 and "crashed (Segmentation fault)" in errors[0]
    engine_worker.WORKER.close()


def test_the_child_measures_like_this_process_and_is_started_again_after_dying(mlp_file):
    worker = engine_worker.WORKER
    rt = DeepSparseRuntime(cores=1, rounds=3, progress=False)
    first = rt.compare(str(mlp_file), str(mlp_file), batch_size=1, feeds=_feeds())
    assert worker.proc is not None and worker.proc.poll() is None   # kept for the next request
    pid = worker.proc.pid
    assert pid != os.getpid()
    here = DeepSparseRuntime(cores=1, rounds=3, progress=False, isolate=False).compare(
        str(mlp_file), str(mlp_file), batch_size=1, feeds=_feeds())
    # the same model against itself, and the engine's outputs handed back whole
    assert 0.5 < first.speedup < 2.0 and first.rounds == 3
    for got, want in zip(first.outputs, here.outputs):
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    os.kill(pid, signal.SIGKILL)
    worker.proc.wait()
    again = rt.compare(str(mlp_file), str(mlp_file), batch_size=1, feeds=_feeds())
    assert again.rounds == 3 and worker.proc.pid != pid


def test_the_child_ends_when_this_process_lets_it_go(mlp_file):
    worker = engine_worker.Worker()
    worker.call("analyse", {"runtime": {"cores": 1}, "model_path": str(mlp_file), "batch_size": 1,
                            "feeds": _feeds()})
    proc = worker.proc
    proc.stdin.close()   # what our exit does to its end of the pipe
    assert proc.wait(timeout=30) == 0
    worker.close()


def test_the_engines_errors_in_the_child_stay_one_line(mlp_file):
    bad = mlp_file.parent / "bad.onnx"
    bad.write_bytes(b"not a model")
    rt = DeepSparseRuntime(cores=1, rounds=3, progress=False)
    rt.compare(str(bad.parent / "mlp.onnx"), str(bad.parent / "mlp.onnx"), batch_size=1, feeds=_feeds())
    pid = engine_worker.WORKER.proc.pid
    with pytest.raises(SpdyError) as info:
        rt.compare(str(bad), str(bad), batch_size=1, feeds=_feeds())
    assert "could not compile bad.onnx" in str(info.value) and "\n" not in str(info.value)
    assert engine_worker.WORKER.proc.pid == pid and engine_worker.WORKER.proc.poll() is None   # still serving
    assert sys.exc_info()[0] is None


def test_without_a_child_the_engine_runs_here_with_a_warning(monkeypatch, mlp_file, caplog):
    monkeypatch.setattr(engine_worker, "WORKER", engine_worker.Worker())
    monkeypatch.setattr(sys, "executable", str(mlp_file.parent / "no-such-python"))
    rt = DeepSparseRuntime(cores=1, rounds=3, progress=False)
    c = rt.compare(str(mlp_file), str(mlp_file), batch_size=1, feeds=_feeds())
    assert c.rounds == 3 and not rt.isolate
    assert "the engine runs in this process" in caplog.text


def test_a_forked_process_starts_a_child_of_its_own(mlp_file):
    """The parent's pipes are not shared with a fork (a user's multiprocessing pool)."""
    rt = DeepSparseRuntime(cores=1, rounds=3, progress=False)
    rt.compare(str(mlp_file), str(mlp_file), batch_size=1, feeds=_feeds())
    parent_child = engine_worker.WORKER.proc.pid
    pid = os.fork()
    if pid == 0:   # the forked process: measure, and report through the exit status
        status = 1
        try:
            c = rt.compare(str(mlp_file), str(mlp_file), batch_size=1, feeds=_feeds())
            status = 0 if c.rounds == 3 and engine_worker.WORKER.proc.pid != parent_child else 2
            engine_worker.WORKER.close()
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert engine_worker.WORKER.proc.pid == parent_child and engine_worker.WORKER.proc.poll() is None
    assert rt.compare(str(mlp_file), str(mlp_file), batch_size=1, feeds=_feeds()).rounds == 3


def test_profiling_runs_in_the_child_and_matches_this_process(mlp_file, tmp_path):
    """The latency table's runs (sparsity imposed by the engine) go through the child too."""
    from spdy_onnx import graph
    model = onnx.load(str(mlp_file))
    sites, _ = graph.find_sites(model)
    aliases = graph.output_aliases(model, sites)
    journal = tmp_path / "runs.jsonl"
    seen = []
    rt = DeepSparseRuntime(cores=1, progress=False)
    table = rt.measure(str(mlp_file), sites, levels=[0.0, 0.8], batch_size=1, feeds=_feeds(), aliases=aliases,
                       checkpoint=journal)
    pid = engine_worker.WORKER.proc.pid
    assert pid != os.getpid() and rt.isolate
    here = DeepSparseRuntime(cores=1, progress=False, isolate=False).measure_here(
        str(mlp_file), sites, levels=[0.0, 0.8], batch_size=1, feeds=_feeds(), aliases=aliases,
        on_run=lambda: seen.append(1))
    assert sorted(table.times) == sorted(here.times) == sorted(s.name for s in sites)
    assert table.levels == [0.0, 0.8] and table.dense_total_ms > 0
    assert len(seen) >= 3                      # one pass over the levels, and the dense level again
    assert len(journal.read_text().splitlines()) >= 3   # the child journaled its runs where we asked


def test_the_childs_log_records_are_told_here(mlp_file, tmp_path, caplog):
    """Profiling's notes (a resumed journal here) are logged in the child; they reach our handlers."""
    from spdy_onnx import graph
    model = onnx.load(str(mlp_file))
    sites, _ = graph.find_sites(model)
    kw = dict(levels=[0.0, 0.8], batch_size=1, feeds=_feeds(), aliases=graph.output_aliases(model, sites),
              checkpoint=tmp_path / "runs.jsonl")
    rt = DeepSparseRuntime(cores=1, progress=False)
    rt.measure(str(mlp_file), sites, **kw)
    with caplog.at_level("INFO", logger="spdy_onnx"):
        rt.measure(str(mlp_file), sites, **kw)     # every run already in the journal
    records = [r for r in caplog.records if "resuming profiling" in r.getMessage()]
    assert records and records[0].name == "spdy_onnx.runtimes.deepsparse" and records[0].levelname == "INFO"


def test_a_crash_while_profiling_is_one_error(monkeypatch, mlp_file):
    from spdy_onnx import graph
    monkeypatch.setattr(engine_worker, "WORKER", engine_worker.Worker(CRASHING))
    model = onnx.load(str(mlp_file))
    sites, _ = graph.find_sites(model)
    rt = DeepSparseRuntime(cores=1, progress=False)
    with pytest.raises(SpdyError, match=r"crashed \(Segmentation fault\) compiling or running mlp.onnx with "
                                        r"sparsity imposed on its layers \(profiling"):
        rt.measure(str(mlp_file), sites, levels=[0.0, 0.8], batch_size=1, feeds=_feeds(),
                   aliases=graph.output_aliases(model, sites))
    with pytest.raises(SpdyError, match=r"crashed \(Segmentation fault\) compiling or running mlp.onnx"):
        rt.dense_check_ms(str(mlp_file), batch_size=1, feeds=_feeds())
    engine_worker.WORKER.close()


def test_optimize_reports_a_profiling_crash_on_one_line_and_writes_nothing(monkeypatch, mlp_file, tmp_path, capsys):
    monkeypatch.setattr(engine_worker, "WORKER", engine_worker.Worker(CRASHING))
    out = tmp_path / "out.onnx"
    code = main(["optimize", str(mlp_file), "--target", "1.5x", "--cores", "1", "-q", "--min-weights", "0",
                 "--cache-dir", str(tmp_path / "cache"), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "RAX" not in err
    errors = [line for line in err.splitlines() if line.startswith("spdy-onnx: error")]
    assert len(errors) == 1 and "crashed (Segmentation fault)" in errors[0] and "profiling" in errors[0]
    assert not out.exists()
    engine_worker.WORKER.close()
