"""A run killed during profiling, database building or search resumes from its caches."""
import numpy as np
import onnx
import pytest
import tiny

from spdy_onnx import api, evaluate, graph
from spdy_onnx.tables import LatencyTable


class Killed(Exception):
    pass


def _kill_after(monkeypatch, cls, method, n):
    if cls.__name__ == "DeepSparseRuntime":   # run counts without a third dense run on the machine's noise
        monkeypatch.setattr(f"{cls.__module__}.DENSE_OUTLIER_SPREAD", float("inf"))
    real = getattr(cls, method)
    calls = []

    def wrapper(self, *a, **k):
        if len(calls) >= n:
            raise Killed()
        calls.append(1)
        return real(self, *a, **k)
    monkeypatch.setattr(cls, method, wrapper)
    return calls


@pytest.mark.deepsparse
def test_profiling_resumes_from_journal(tmp_path, monkeypatch):
    pytest.importorskip("deepsparse")
    from spdy_onnx.runtimes.deepsparse import DeepSparseRuntime
    path = tmp_path / "m.onnx"
    onnx.save(tiny.mlp(width=256, depth=2, seq=16), path)
    # in this process (isolate off), where the patched method runs: the engine's own child would not see it
    kw = dict(cores=1, levels="0.5,0.9", cache_dir=tmp_path / "c", progress=False,
              runtime_options={"repeats": 2, "isolate": False})
    _kill_after(monkeypatch, DeepSparseRuntime, "_analyse_engine", 4)
    with pytest.raises(Killed):
        api.profile(path, output=tmp_path / "t.json", **kw)
    assert not (tmp_path / "t.json").exists()
    assert len(list((tmp_path / "c" / "tables").glob("*.partial.jsonl"))) == 1
    monkeypatch.undo()
    calls = _kill_after(monkeypatch, DeepSparseRuntime, "_analyse_engine", 100)
    table, out = api.profile(path, output=tmp_path / "t.json", **kw)
    assert len(calls) == 2 * 3 - 4          # only the runs the killed profiling had not finished
    assert set(table.times) == {"matmul_0", "matmul_1"}
    assert not list((tmp_path / "c" / "tables").glob("*.partial.jsonl"))

    # --no-cache measures everything afresh, even where a killed profiling left a journal
    monkeypatch.undo()
    _kill_after(monkeypatch, DeepSparseRuntime, "_analyse_engine", 4)
    with pytest.raises(Killed):
        api.profile(path, output=tmp_path / "t2.json", use_cache=False, **kw)
    monkeypatch.undo()
    calls = _kill_after(monkeypatch, DeepSparseRuntime, "_analyse_engine", 100)
    api.profile(path, output=tmp_path / "t2.json", use_cache=False, **kw)
    assert len(calls) == 2 * 3              # every run again


def _table_setup(tmp_path, depth=4):
    """A small MLP, 8 calibration samples, a replayed table, and optimize's arguments for them."""
    model = tiny.mlp(width=64, depth=depth, seq=4)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((8, 4, 64)).astype(np.float32))
    sites, _ = graph.find_sites(model)
    table = LatencyTable(levels=[0.0, 0.5, 0.7, 0.9], times={s.name: [1.0, 0.7, 0.45, 0.2] for s in sites},
                         dense_total_ms=depth + 0.5, runtime="table").save(tmp_path / "t.json")
    return path, dict(target=1.5, runtime="table", latency_table=table, data=tmp_path / "d.npz", progress=False,
                      search_budget="60", seed=1)



def test_search_resumes_and_gives_the_same_profile(tmp_path, monkeypatch):
    path, kw = _table_setup(tmp_path, depth=5)
    kw.update(target=2.0, search_budget="160")
    fresh_calls = _kill_after(monkeypatch, evaluate.Evaluator, "_run", 10**6)
    fresh = api.optimize(path, output=tmp_path / "fresh.onnx", cache_dir=tmp_path / "c1", **kw)
    monkeypatch.undo()

    _kill_after(monkeypatch, evaluate.Evaluator, "_run", 40)   # dies in the middle of the search
    with pytest.raises(Killed):
        api.optimize(path, output=tmp_path / "r.onnx", cache_dir=tmp_path / "c2", **kw)
    assert not (tmp_path / "r.onnx").exists()
    monkeypatch.undo()
    calls = _kill_after(monkeypatch, evaluate.Evaluator, "_run", 10**6)
    resumed = api.optimize(path, output=tmp_path / "r.onnx", cache_dir=tmp_path / "c2", **kw)
    assert [s["sparsity"] for s in resumed["sites"]] == [s["sparsity"] for s in fresh["sites"]]
    # the killed run finished 4 evaluations of 8 batches each (after its 8 reference runs): the
    # resumed run repeats none of them
    assert len(fresh_calls) > 8 + 4 * 8
    assert len(calls) == len(fresh_calls) - 4 * 8
    assert resumed["quality"]["calibration_loss"] == pytest.approx(fresh["quality"]["calibration_loss"])


def test_a_journal_line_that_is_not_a_loss_is_ignored(tmp_path):
    """A NaN, negative or infinite loss in the evaluations journal (a damaged or foreign line) made the
    dense profile's loss NaN, every level look free, and the run prune everything to 0.97."""
    import json
    path, kw = _table_setup(tmp_path)
    clean = api.optimize(path, output=tmp_path / "a.onnx", cache_dir=tmp_path / "c", **kw)
    (journal,) = (tmp_path / "c" / "evaluations").glob("*.jsonl")
    n_sites = len(clean["sites"])
    with open(journal, "a") as f:
        for bad in ("NaN", "-1.0", "Infinity"):
            f.write(f'{{"picks": {json.dumps([0] * n_sites)}, "loss": {bad}}}\n')
    again = api.optimize(path, output=tmp_path / "b.onnx", cache_dir=tmp_path / "c", **kw)
    assert [s["sparsity"] for s in again["sites"]] == [s["sparsity"] for s in clean["sites"]]
    assert again["quality"]["calibration_loss"] == pytest.approx(clean["quality"]["calibration_loss"])


def test_an_unwritable_cache_folder_runs_on_a_temporary_one(tmp_path, caplog):
    """A read-only cache (a shared one, a read-only mount; here a file where the folder should be) gave
    a traceback halfway through; the run now caches in a temporary folder, with a warning."""
    path, kw = _table_setup(tmp_path)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    with caplog.at_level("WARNING", logger="spdy_onnx"):
        rep = api.optimize(path, output=tmp_path / "o.onnx", cache_dir=blocked, **kw)
    assert rep["status"] == "not_measured" and (tmp_path / "o.onnx").exists()
    assert "cannot be written" in caplog.text and blocked.read_text() == ""


def test_the_database_files_are_readable_by_whoever_shares_the_cache(tmp_path):
    import os
    path, kw = _table_setup(tmp_path)
    old = os.umask(0o022)
    try:
        api.optimize(path, output=tmp_path / "o.onnx", cache_dir=tmp_path / "c", **kw)
    finally:
        os.umask(old)
    files = list((tmp_path / "c" / "databases").rglob("*.npy"))
    assert files and all(f.stat().st_mode & 0o777 == 0o644 for f in files)
