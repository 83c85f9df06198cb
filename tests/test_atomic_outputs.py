"""Outputs (issue #5, item 2): written to a temporary file in the target folder and renamed into
place; the input is never modified; an interrupted or failed write leaves no output and no temporary
files; nothing is written outside the output's folder and the tool's own (removed) work folder."""
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import tiny

from spdy_onnx import graph, modelio
from spdy_onnx.cli import main
from spdy_onnx.errors import SpdyError
from spdy_onnx.tables import LatencyTable

_EVENTS: list | None = None
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _audit(event, args):
    if _EVENTS is None:
        return
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (mode is None and flags & _WRITE_FLAGS):
            _EVENTS.append(("write", os.fsdecode(args[0])))
    elif event in ("os.rename", "os.replace"):
        _EVENTS.append((event, _resolve(args[1], args[3])))
    elif event in ("os.mkdir", "os.remove", "os.rmdir"):
        _EVENTS.append((event, _resolve(args[0], args[-1])))


def _resolve(path, dir_fd) -> str:
    """Paths relative to a directory descriptor (shutil.rmtree works that way) made absolute."""
    path = os.fsdecode(path)
    if isinstance(dir_fd, int) and not os.path.isabs(path):
        return os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    return path


sys.addaudithook(_audit)


class recorded_writes:
    def __enter__(self):
        global _EVENTS
        _EVENTS = []
        return _EVENTS

    def __exit__(self, *exc):
        global _EVENTS
        _EVENTS = None


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A tiny model, its latency table, an output folder, and a private system temp folder."""
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    inp = tmp_path / "in"
    inp.mkdir()
    model = tiny.mlp(width=64, depth=2, seq=4)
    path = inp / "m.onnx"
    onnx.save(model, str(path))
    sites, _ = graph.find_sites(model)
    table = LatencyTable(levels=[0.0, 0.5, 0.9], times={s.name: [1.0, 0.6, 0.3] for s in sites},
                         dense_total_ms=2.5, runtime="table").save(inp / "t.json")
    out = tmp_path / "out"
    out.mkdir()
    return path, table, out, systmp


def optimize(path, table, out_path, *extra):
    return main(["optimize", str(path), "--target", "1.5x", "--runtime", "table", "--latency-table", str(table),
                 "-q", "--min-weights", "0", "-o", str(out_path), *extra])


def test_input_unchanged_and_writes_stay_in_the_output_folder(setup, capsys):
    path, table, out, systmp = setup
    stat, data = path.stat(), path.read_bytes()
    with recorded_writes() as writes:
        assert optimize(path, table, out / "pruned.onnx") == 0
    assert path.read_bytes() == data
    assert path.stat().st_mtime_ns == stat.st_mtime_ns and path.stat().st_size == stat.st_size
    assert listing(out) == ["pruned.onnx", "pruned.report.json"]
    assert listing(systmp) == []                      # the work folder is gone
    for kind, target in writes:
        p = Path(target).resolve()
        assert p == out or out in p.parents or systmp in p.parents, (kind, target)
    assert not any(Path(t).resolve() == path.resolve() for _, t in writes)
    final = [t for k, t in writes if k in ("os.rename", "os.replace") and Path(t).name == "pruned.onnx"]
    assert final == [str(out / "pruned.onnx")]       # renamed into place, not written there directly
    assert not any(k == "write" and Path(t) == out / "pruned.onnx" for k, t in writes)


def test_report_and_model_get_the_same_permissions(setup, capsys):
    """The report is renamed from a private temp file; it ends up as readable as the model beside it
    (what the umask gives a new file), not 0600."""
    path, table, out, _ = setup
    old = os.umask(0o022)
    try:
        assert optimize(path, table, out / "pruned.onnx") == 0
    finally:
        os.umask(old)
    model_mode = (out / "pruned.onnx").stat().st_mode & 0o777
    assert (out / "pruned.report.json").stat().st_mode & 0o777 == model_mode == 0o644


def _fail_on(monkeypatch, exc, *, when):
    real = os.replace

    def replace(src, dst, *a, **k):
        if when(Path(os.fsdecode(dst))):
            raise exc
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("exc,code", [(KeyboardInterrupt(), 130), (OSError(28, "No space left on device"), 2)])
def test_interrupted_final_rename_leaves_nothing(setup, capsys, monkeypatch, exc, code):
    path, table, out, systmp = setup
    data = path.read_bytes()
    _fail_on(monkeypatch, exc, when=lambda dst: dst.name == "pruned.onnx")
    assert optimize(path, table, out / "pruned.onnx") == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code == 2:
        assert [line for line in err.splitlines() if line.startswith("spdy-onnx: error")] == [
            f"spdy-onnx: error: cannot write {out / 'pruned.onnx'}: No space left on device"]
    assert listing(out) == []                         # no output, no report, no temporary files
    assert listing(systmp) == []
    assert path.read_bytes() == data


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), OSError(5, "Input/output error")])
def test_interrupted_mid_write_leaves_nothing(setup, capsys, monkeypatch, exc):
    """The model bytes are in the temporary file when the interruption comes (at fsync)."""
    path, table, out, systmp = setup
    real = os.fsync
    seen = []

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if Path(name).name == "pruned.onnx":
            seen.append(os.path.getsize(name))
            raise exc
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert optimize(path, table, out / "pruned.onnx") in (2, 130)
    assert seen and seen[0] > 0                       # it was interrupted half-way, with data written
    assert "Traceback" not in capsys.readouterr().err
    assert listing(out) == []
    assert listing(systmp) == []


def test_external_data_save_interrupted_between_renames_leaves_nothing(tmp_path, monkeypatch):
    """The .data goes into place first; if the model's rename then fails, the .data is taken back."""
    model = tiny.mlp(width=64, depth=2, seq=4)
    monkeypatch.setattr(modelio, "TWO_GB", 1024)      # take the external-data path
    _fail_on(monkeypatch, KeyboardInterrupt(), when=lambda dst: dst.name == "big.onnx")
    with pytest.raises(KeyboardInterrupt):
        modelio.save_model_atomic(model, tmp_path / "big.onnx")
    assert listing(tmp_path) == []


def test_external_data_save_failure_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
    model = tiny.mlp(width=64, depth=2, seq=4)
    monkeypatch.setattr(modelio, "TWO_GB", 1024)
    _fail_on(monkeypatch, OSError(13, "Permission denied"), when=lambda dst: dst.name == "big.onnx.data")
    with pytest.raises(SpdyError, match="cannot write .*big.onnx: Permission denied"):
        modelio.save_model_atomic(model, tmp_path / "big.onnx")
    assert listing(tmp_path) == []


def test_existing_output_is_replaced_whole_or_kept(setup, capsys, monkeypatch):
    """A failed run never leaves a mix: the previous output stays byte for byte."""
    path, table, out, systmp = setup
    assert optimize(path, table, out / "pruned.onnx") == 0
    old = (out / "pruned.onnx").read_bytes()
    _fail_on(monkeypatch, OSError(28, "No space left on device"), when=lambda dst: dst.name == "pruned.onnx")
    assert optimize(path, table, out / "pruned.onnx", "--target", "1.2x") == 2
    assert (out / "pruned.onnx").read_bytes() == old
    assert listing(out) == ["pruned.onnx", "pruned.report.json"]


def test_output_folder_that_cannot_be_created_is_one_error(setup, capsys):
    path, table, out, systmp = setup
    (out / "blocker").write_text("a file where a folder is needed")
    assert optimize(path, table, out / "blocker" / "pruned.onnx") == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("spdy-onnx: error")]
    assert len(errors) == 1 and "blocker" in errors[0], errors
    assert listing(out) == ["blocker"]


def test_external_data_input_unchanged(tmp_path, capsys):
    folder = tmp_path / "ext"
    folder.mkdir()
    model = tiny.mlp(width=64, depth=2, seq=4)
    path = folder / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    sites, _ = graph.find_sites(model)
    table = LatencyTable(levels=[0.0, 0.5, 0.9], times={s.name: [1.0, 0.6, 0.3] for s in sites},
                         dense_total_ms=2.5, runtime="table").save(tmp_path / "t.json")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}
    assert optimize(path, table, folder / "pruned.onnx") == 0
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}
    assert {k: after[k] for k in before} == before
    assert sorted(after) == ["m.data", "m.onnx", "pruned.onnx", "pruned.onnx.data", "pruned.report.json"]
    pruned = onnx.load(str(folder / "pruned.onnx"))   # its data file holds the pruned weights
    weights = graph.read_weights(pruned, graph.find_sites(pruned)[0])
    assert sorted(float(np.mean(w == 0)) for w in weights.values()) == pytest.approx([0.5, 0.9], abs=1e-3)


def test_output_and_report_paths_that_cannot_work_fail_before_any_work(setup, capsys):
    """The report on the model's path would replace the model; a folder in the way, or a folder that
    takes no files, would fail only after the whole run: each is one error up front, nothing written."""
    path, table, out, _ = setup
    model = out / "m.onnx"
    cases = [(["--report", str(model)], "the report path is the output model's path"),
             (["--report", str(out)], "is a folder"),
             ([], "is a folder")]
    for extra, match in cases:
        target = out if match == "is a folder" and not extra else model
        assert optimize(path, table, target, *extra) == 2
        assert match in capsys.readouterr().err
        assert listing(out) == []


def test_a_folder_that_takes_no_files_is_named_up_front(setup, capsys, monkeypatch):
    path, table, out, _ = setup
    real = tempfile.TemporaryFile

    def refuse(*a, dir=None, **k):
        if dir is not None and Path(dir) == out:
            raise OSError(30, "Read-only file system")
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    assert optimize(path, table, out / "sub" / "m.onnx") == 2
    err = capsys.readouterr().err
    assert "cannot write the output" in err and "Read-only file system" in err
    assert listing(out) == []


def test_a_report_that_cannot_be_written_is_one_error_not_a_traceback(tmp_path):
    from spdy_onnx.tables import write_json_atomic
    (tmp_path / "taken").mkdir()
    with pytest.raises(SpdyError, match="cannot write"):
        write_json_atomic(tmp_path / "taken", {"a": 1})
    assert listing(tmp_path) == ["taken"]


def _default_stop_signals():
    """In the child: the default action for SIGHUP and SIGTERM. A suite started under `nohup` passes
    SIGHUP on ignored, and the CLI then rightly leaves it ignored (it asked for the run to go on)."""
    import signal
    for signum in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


def _run_to_be_stopped(tmp_path, started: str):
    """An `optimize` run in a subprocess with its own TMPDIR, returned once `started` (a glob in that
    folder) exists; skips the test when the run ends first. Returns (process, its TMPDIR)."""
    import subprocess
    import time
    model = tmp_path / "m.onnx"
    onnx.save(tiny.mlp(width=256, depth=4, seq=16), model)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch), "NM_DISABLE_ANALYTICS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "spdy_onnx", "optimize", str(model), "--target", "1.5x",
                             "--cores", "1", "-o", str(tmp_path / "out.onnx"), "--cache-dir", str(tmp_path / "c")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_stop_signals)
    deadline = time.time() + 120
    while time.time() < deadline and not list(scratch.glob(started)) and proc.poll() is None:
        time.sleep(0.05)
    if proc.poll() is not None:
        proc.communicate()
        pytest.skip("the run ended before it could be stopped")
    return proc, scratch


@pytest.mark.deepsparse
@pytest.mark.parametrize("signame,status", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_sigterm_and_sighup_unwind_like_ctrl_c(tmp_path, signame, status):
    """A job scheduler or `kill` sends SIGTERM, a closed terminal or ssh session SIGHUP: the run stops
    with 128 + the signal's number, removes its temporary folder and writes nothing (both used to kill it
    where it stood, leaving its copies in /tmp)."""
    import signal
    pytest.importorskip("deepsparse")
    proc, scratch = _run_to_be_stopped(tmp_path, "spdy-onnx-*")
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err.decode()[-2000:]
    assert "interrupted" in err.decode() and "Traceback" not in err.decode()
    assert not list(scratch.glob("spdy-onnx-*"))
    assert not (tmp_path / "out.onnx").exists()


def test_folders_of_killed_runs_are_removed_by_the_next_run_and_no_others(tmp_path, monkeypatch):
    """SIGKILL (the out-of-memory killer, `kill -9`) cannot be caught, and each run's folder holds a copy of
    the model. The next run removes the folders of this machine's dead processes, never a live one's, one
    from another machine or anything not ours."""
    import subprocess

    from spdy_onnx import workdir
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = workdir._host_tag()
        names = {"dead": f"spdy-onnx-{host}-{dead.pid}-abc", "live": f"spdy-onnx-{host}-{live.pid}-abc",
                 "other machine": f"spdy-onnx-{'0' * 8 if host != '0' * 8 else '1' * 8}-{dead.pid}-abc",
                 "old style": "spdy-onnx-abc123", "user's": "notes"}
        for name in names.values():
            (tmp_path / name).mkdir()
            (tmp_path / name / "dense.onnx").write_bytes(b"x")
        current = workdir.make_workdir()
        try:
            left = sorted(p.name for p in tmp_path.iterdir())
            assert names["dead"] not in left
            assert all(names[k] in left for k in ("live", "other machine", "old style", "user's"))
            assert Path(current.name).parent == tmp_path and f"-{os.getpid()}-" in Path(current.name).name
        finally:
            current.cleanup()
    finally:
        live.kill()
        live.wait()


@pytest.mark.deepsparse
def test_a_run_killed_with_sigkill_leaves_a_folder_the_next_run_removes(tmp_path, monkeypatch):
    import signal

    from spdy_onnx import workdir
    proc, scratch = _run_to_be_stopped(tmp_path, "spdy-onnx-*/*.onnx")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert list(scratch.glob("spdy-onnx-*"))               # what SIGKILL leaves
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    workdir.make_workdir().cleanup()
    assert not list(scratch.glob("spdy-onnx-*"))
    assert not (tmp_path / "out.onnx").exists()
