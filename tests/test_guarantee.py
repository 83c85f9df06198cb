"""The promise: success only on a measured speedup; re-solve when the additive model was optimistic."""
import json

import onnx
import pytest
import tiny

from spdy_onnx import api
from spdy_onnx.cli import EXIT_MISSED, main
from spdy_onnx.errors import SpdyError, TargetMissed
from spdy_onnx.runtimes import REGISTRY, Comparison
from spdy_onnx.tables import LatencyTable

LEVELS = [0.0, 0.5, 0.7, 0.9]


class ScriptedRuntime:
    """An engine whose real speed is the table's prediction times `efficiency` (a stand-in for the
    gap between the additive timing model and the engine); everything else is the real pipeline."""
    name = "scripted"
    pattern = "unstructured"
    efficiency = 1.0
    calls: list = []

    def __init__(self, **_):
        pass

    def default_levels(self):
        return LEVELS

    def check_model(self, model):
        pass

    def fingerprint(self):
        return {"engine": "scripted"}

    def measure(self, model_path, sites, *, levels, batch_size, feeds, aliases, checkpoint=None):
        times = {s.name: [1.0, 0.8, 0.5, 0.25][: len(levels)] for s in sites}
        return LatencyTable(levels=levels, times=times, dense_total_ms=1.0 * len(sites) + 0.5,
                            runtime="scripted", meta={"cores": 1, "engine": "scripted"})

    def compare(self, baseline_path, candidate_path, *, batch_size, feeds):
        from spdy_onnx import graph
        from spdy_onnx.passes import sparsity_of
        model = onnx.load(candidate_path)
        sites, _ = graph.find_sites(model)
        w = graph.read_weights(model, sites)
        level_time = dict(zip(LEVELS, [1.0, 0.8, 0.5, 0.25]))
        t = 0.5 + sum(level_time[min(LEVELS, key=lambda l: abs(l - sparsity_of(w[s.name])))] for s in sites)
        dense = 0.5 + len(sites)
        type(self).calls.append(dense / t)
        return Comparison(baseline_ms=dense, candidate_ms=t / type(self).efficiency, rounds=1,
                          iterations_per_round=1)


@pytest.fixture
def scripted(monkeypatch):
    monkeypatch.setitem(REGISTRY, "scripted", (__name__, "ScriptedRuntime", None))
    ScriptedRuntime.calls = []
    return ScriptedRuntime


@pytest.fixture
def model_path(tmp_path):
    p = tmp_path / "m.onnx"
    onnx.save(tiny.mlp(width=64, depth=6, seq=4), p)
    return p


def test_exact_engine_meets_target_first_time(scripted, model_path, tmp_path):
    scripted.efficiency = 1.0
    rep = api.optimize(model_path, target=2.0, runtime="scripted", output=tmp_path / "o.onnx",
                       cache_dir=tmp_path / "c", progress=False)
    # the first candidate meets 2.04x with a 6.2% surplus: one lower aim is tried, misses, and the
    # first candidate is kept
    assert rep["status"] == "met" and len(rep["attempts"]) <= 2
    assert rep["measured_speedup"] == rep["attempts"][0]["measured_speedup"] >= 2.0 * 1.02


def test_optimistic_model_is_repaired_by_resolving(scripted, model_path, tmp_path):
    scripted.efficiency = 0.9   # the engine is 10% slower than the sum of layer times says
    rep = api.optimize(model_path, target=2.0, runtime="scripted", output=tmp_path / "o.onnx",
                       cache_dir=tmp_path / "c", progress=False, max_attempts=5)
    assert rep["status"] == "met"
    assert len(rep["attempts"]) >= 2
    aims = [a["aimed_speedup"] for a in rep["attempts"]]
    assert aims[1] > aims[0]
    assert rep["attempts"][0]["measured_speedup"] < 2.0 <= rep["measured_speedup"]


def test_an_overshoot_after_a_miss_is_searched_back_down(scripted, tmp_path, monkeypatch):
    """More speed than asked costs accuracy: after a miss raised the aim, a hit with a large surplus is
    re-solved at a lower aim, between the miss and the hit."""
    real = ScriptedRuntime.compare

    def uneven(self, *a, **k):   # slow profiles run 15% under the table, fast ones as predicted
        c = real(self, *a, **k)
        if c.speedup < 2.2:
            c.candidate_ms /= 0.85
        return c
    scripted.efficiency = 1.0
    monkeypatch.setattr(ScriptedRuntime, "compare", uneven)
    model_path = tmp_path / "m12.onnx"   # 12 sites: a grid fine enough to land between miss and hit
    onnx.save(tiny.mlp(width=64, depth=12, seq=4), model_path)
    rep = api.optimize(model_path, target=2.0, runtime="scripted", output=tmp_path / "o.onnx",
                       cache_dir=tmp_path / "c", progress=False)
    aims = [a["aimed_speedup"] for a in rep["attempts"]]
    required = 2.0 * 1.02
    assert rep["attempts"][0]["measured_speedup"] < required              # the first profile misses
    assert any(later < earlier for earlier, later in zip(aims, aims[1:]))  # the aim came back down
    assert min(aims[1:]) > aims[0]                                         # never back down to the miss
    assert rep["status"] == "met" and rep["measured_speedup"] >= required
    hits = [a for a in rep["attempts"] if a["measured_speedup"] >= required]
    assert rep["measured_speedup"] == min(a["measured_speedup"] for a in hits)


def test_an_engine_faster_than_the_table_is_aimed_below_the_target(scripted, tmp_path):
    """The engine runs 30% faster than the table: the first profile overshoots, and the aim goes under
    the requirement, to a less sparse profile that still measures at least the requirement."""
    scripted.efficiency = 1.3
    model_path = tmp_path / "m12.onnx"
    onnx.save(tiny.mlp(width=64, depth=12, seq=4), model_path)
    rep = api.optimize(model_path, target=2.0, runtime="scripted", output=tmp_path / "o.onnx",
                       cache_dir=tmp_path / "c", progress=False)
    required = 2.0 * 1.02
    first = rep["attempts"][0]
    assert first["aimed_speedup"] == pytest.approx(required)
    assert first["measured_speedup"] > required * 1.06                      # a large surplus
    assert rep["status"] == "met" and required <= rep["measured_speedup"] < first["measured_speedup"]
    assert rep["predicted_speedup"] < required                              # aimed below the target
    hits = [a for a in rep["attempts"] if a["measured_speedup"] >= required]
    kept = min(hits, key=lambda a: a["aimed_speedup"])                      # the hit with the lowest aim
    assert rep["measured_speedup"] == kept["measured_speedup"]


def test_missed_target_fails_and_writes_no_model(scripted, model_path, tmp_path, capsys):
    # the table's fastest profile (3.25x) runs at 1.99x: close enough to 2.04x (2x with the margin) that
    # the up-front check lets it through, and the aim search then misses at every aim
    scripted.efficiency = 1.99 / 3.25
    out = tmp_path / "o.onnx"
    code = main(["optimize", str(model_path), "--target", "2x", "--runtime", "scripted", "-o", str(out), "-q",
                 "--cache-dir", str(tmp_path / "c"), "--max-attempts", "3"])
    assert code == EXIT_MISSED
    assert not out.exists()
    err = capsys.readouterr().err
    assert "missed the target" in err
    rep = json.loads((tmp_path / "o.report.json").read_text())
    assert rep["status"] == "missed" and rep["output"] is None
    assert all(a["measured_speedup"] < 2.0 for a in rep["attempts"])
    # the fastest profile the table allows was measured (up front): the message says the engine is the
    # limit, and what it did reach
    assert rep["fastest_profile_measured_speedup"] == pytest.approx(1.99)
    assert "fastest profile the latency table allows (predicted 3.25x) measured 1.990x" in err
    assert "at most about 1.99x" in err
    with pytest.raises(TargetMissed):
        api.optimize(model_path, target=2.0, runtime="scripted", output=out, cache_dir=tmp_path / "c",
                     progress=False, max_attempts=2)


def test_a_miss_that_reached_the_target_without_the_margin_asks_for_a_little_less(scripted, model_path,
                                                                                   tmp_path):
    """The fastest profile measures 2.01x: over the 2x asked, under the 2.04x the margin needs. "Ask for at
    most 2.01x" would ask for what just failed; the message asks for a little less instead. Re-measures
    of one attempt count as one attempt, on their pooled figure."""
    scripted.efficiency = 2.01 / 3.25
    with pytest.raises(TargetMissed) as missed:
        api.optimize(model_path, target=2.0, runtime="scripted", output=tmp_path / "o.onnx",
                     cache_dir=tmp_path / "c", progress=False, max_attempts=3)
    text = str(missed.value)
    assert "is over the target 2x but under the 2.0" in text and "--margin" in text   # not "2.01x missed 2x"
    assert "at most about" not in text
    assert "ask for a little less, about 1.94x" in text
    rep = json.loads((tmp_path / "o.report.json").read_text())
    attempts = {a["attempt"] for a in rep["attempts"] if a["measured_speedup"] is not None}
    assert f"after {len(attempts)} attempt(s)" in text


def test_standing_measurements_take_the_pooled_figure_once_per_attempt():
    records = [{"attempt": 1, "aimed_speedup": 2.0, "measured_speedup": 2.10},
               {"attempt": 1, "aimed_speedup": 2.0, "measured_speedup": 1.90, "pooled_speedup": 2.00},
               {"attempt": 2, "aimed_speedup": 2.2, "measured_speedup": None},
               {"attempt": 3, "aimed_speedup": 2.3, "measured_speedup": 2.05}]
    got = api.standing_measurements(records)
    assert [(a["attempt"], v) for a, v in got] == [(1, 2.00), (3, 2.05)]


def test_the_console_names_nodes_left_dense_that_are_not_sites(scripted, tmp_path, capsys):
    """Weights shared by several nodes (DeBERTa-v3's query and key) were only in the report: the console's
    site table simply did not have them."""
    path = tmp_path / "shared.onnx"
    model = tiny.mlp(width=64, depth=4, seq=4, weight_form="shared", hidden=128)
    shared = next(n for n in model.graph.node if n.op_type == "MatMul" and n.name == "matmul_2")
    model.graph.node.insert(0, onnx.helper.make_node("Transpose", [shared.input[1]], ["w_t"], perm=[1, 0]))
    shared.input[1] = "w_t"      # read through a Transpose by one node and directly by the others: left dense
    onnx.save(model, path)
    code = main(["optimize", str(path), "--target", "1.3x", "--runtime", "scripted", "--min-weights", "0", "-q",
                 "--cache-dir", str(tmp_path / "c"), "-o", str(tmp_path / "o.onnx")])
    out = capsys.readouterr().out
    assert code == 0 and "node(s) left dense that cannot be pruned, such as" in out and "is shared by several" in out


def test_margin_is_honoured(scripted, model_path, tmp_path, capsys):
    scripted.efficiency = 0.97
    kw = dict(runtime="scripted", cache_dir=tmp_path / "c", progress=False, max_attempts=1)
    rep = api.optimize(model_path, target=2.0, output=tmp_path / "o.onnx", margin=-0.05, **kw)
    assert rep["status"] == "met" and 1.9 <= rep["measured_speedup"] < 2.0
    assert any("is under the target 2x: accepted because --margin -0.05" in w for w in rep["warnings"])
    # the console does not say "target met" for it
    code = main(["optimize", str(model_path), "--target", "2x", "--runtime", "scripted", "--margin", "-0.05",
                 "--max-attempts", "1", "-q", "--cache-dir", str(tmp_path / "c"), "-o", str(tmp_path / "q.onnx")])
    out = capsys.readouterr().out
    assert code == 0 and "target met" not in out and "target NOT reached, accepted as --margin -0.05 allows" in out
    with pytest.raises(TargetMissed) as missed:  # the same measurement without the margin is a miss
        api.optimize(model_path, target=2.0, output=tmp_path / "p.onnx", margin=0.0, **kw)
    # one attempt, far below the table's fastest profile: the engine's limit is not known, so not claimed
    assert "fastest profile" not in str(missed.value)


@pytest.mark.parametrize("margin", [0.02, 0.05])
def test_a_measurement_pooled_over_more_compiles_needs_less_of_the_margin(margin):
    """One compile needs the whole margin; k compiles margin x sqrt((1 + 1/k) / 2), never under half of it."""
    need = [api.required_speedup(2.0, margin, k) for k in (1, 2, 3, 4, 100)]
    assert need[0] == pytest.approx(2.0 * (1 + margin))
    assert all(a > b for a, b in zip(need, need[1:]))
    assert need[3] == pytest.approx(2.0 * (1 + margin * (5 / 8) ** 0.5))
    assert need[-1] > 2.0 * (1 + margin / 2 ** 0.5)
    # a shortfall asked for is not scaled: no pooling makes it stricter or looser
    assert api.required_speedup(2.0, -0.05, 4) == pytest.approx(1.9)


def test_noisy_measurements_are_flagged_in_the_report(scripted, model_path, tmp_path, monkeypatch):
    scripted.efficiency = 1.0
    real = ScriptedRuntime.compare

    def noisy(self, *a, **k):
        c = real(self, *a, **k)
        c.foreign_load_cores, c.ratio_p25, c.ratio_p75 = 1.3, c.speedup * 0.8, c.speedup * 1.2
        return c
    monkeypatch.setattr(ScriptedRuntime, "compare", noisy)
    rep = api.optimize(model_path, target=2.0, runtime="scripted", output=tmp_path / "o.onnx",
                       cache_dir=tmp_path / "c", progress=False)
    text = " ".join(rep["warnings"])
    assert "1.3 cores while benchmarking" in text and "spread" in text


def test_the_aim_search_stops_once_a_miss_and_a_hit_are_closer_than_the_noise(scripted, tmp_path, monkeypatch):
    """Bisecting between a miss and a hit a few percent apart chases run-to-run noise: each draft costs a
    solve and an engine measurement. Once they are within AIM_RESOLUTION the hit is kept. The engine
    here runs 7-15% under the table, differently each call, as BERT-base did on one core."""
    real = ScriptedRuntime.compare
    efficiency = iter([0.85, 0.85, 0.93, 0.86, 0.87, 0.85, 0.86, 0.87, 0.86, 0.9])

    def noisy(self, *a, **k):
        c = real(self, *a, **k)
        c.candidate_ms /= next(efficiency)
        return c
    monkeypatch.setattr(ScriptedRuntime, "compare", noisy)
    model_path = tmp_path / "m48.onnx"   # 48 sites: a grid fine enough for aims a percent apart
    onnx.save(tiny.mlp(width=64, depth=48, seq=4), model_path)
    required = 2.0 * 1.02
    rep = api.optimize(model_path, target=2.0, runtime="scripted", output=tmp_path / "o.onnx",
                       cache_dir=tmp_path / "c", progress=False, max_attempts=8)
    attempts = rep["attempts"]
    for k in range(1, len(attempts)):
        misses = [a["aimed_speedup"] for a in attempts[:k] if a["measured_speedup"] < required]
        hits = [a["aimed_speedup"] for a in attempts[:k] if a["measured_speedup"] >= required]
        if misses and hits:   # no draft once the bracket is narrower than the resolution
            assert min(hits) > max(misses) * (1 + api.AIM_RESOLUTION), (k, misses, hits)
    last_miss = max(a["aimed_speedup"] for a in attempts if a["measured_speedup"] < required)
    hit = min((a for a in attempts if a["measured_speedup"] >= required), key=lambda a: a["aimed_speedup"])
    assert hit["aimed_speedup"] <= last_miss * (1 + api.AIM_RESOLUTION)   # it stopped because of the rule
    assert len(attempts) < 8
    assert rep["status"] == "met" and rep["measured_speedup"] == hit["measured_speedup"] >= required


def test_a_target_reachable_only_without_the_margin_is_refused_up_front(scripted, model_path, tmp_path):
    """The table allows 3.25x at most: 3.2x is reachable on paper but not with the 2% margin the
    measurement must clear, so the tool says so before any calibration or measurement; --margin 0 runs."""
    from spdy_onnx.errors import InfeasibleTarget
    scripted.efficiency = 1.0
    kw = dict(runtime="scripted", cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(InfeasibleTarget) as refused:
        api.optimize(model_path, target=3.2, output=tmp_path / "o.onnx", **kw)
    assert "3.250x" in str(refused.value) and "margin" in str(refused.value)
    assert scripted.calls == [] and not (tmp_path / "o.onnx").exists()
    rep = api.optimize(model_path, target=3.2, output=tmp_path / "o.onnx", margin=0.0, **kw)
    assert rep["status"] == "met" and rep["measured_speedup"] >= 3.2


def test_a_target_beyond_the_measured_fastest_profile_is_refused_before_calibration(scripted, model_path,
                                                                                   tmp_path, capsys):
    """The table allows 3.25x, the engine runs that profile at 1.625x: 2x is refused after one end-to-end
    measurement (exit 2, nothing written), and the measurement is cached with the table."""
    scripted.efficiency = 0.5
    out = tmp_path / "o.onnx"
    argv = ["optimize", str(model_path), "--target", "2x", "--runtime", "scripted", "-o", str(out), "-q",
            "--cache-dir", str(tmp_path / "c")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "measured 1.625x end to end" in err and "at most about 1.62x" in err
    # the fastest profile, measured twice (a short first measurement is repeated on a fresh compile)
    assert len(scripted.calls) == 2 and scripted.calls == pytest.approx([3.25, 3.25])
    assert not out.exists() and not (tmp_path / "o.report.json").exists()
    assert main(argv) == 2                      # the cached measurement: no further run on the engine
    assert len(scripted.calls) == 2


def test_a_short_first_measurement_of_the_fastest_profile_is_repeated(scripted, model_path, tmp_path, monkeypatch):
    """One unlucky compile must not refuse a target: the second, better measurement is the one kept."""
    from pathlib import Path
    real = ScriptedRuntime.compare
    fastest_efficiency = iter([0.5, 0.64])

    def compare(self, baseline_path, candidate_path, **kw):
        c = real(self, baseline_path, candidate_path, **kw)
        if Path(candidate_path).stem == "fastest":
            c.candidate_ms /= next(fastest_efficiency)
        return c
    monkeypatch.setattr(ScriptedRuntime, "compare", compare)
    scripted.efficiency = 1.0
    rep = api.optimize(model_path, target=2.0, runtime="scripted", output=tmp_path / "o.onnx",
                       cache_dir=tmp_path / "c", progress=False)
    assert rep["status"] == "met"
    assert rep["fastest_profile_measured_speedup"] == pytest.approx(3.25 * 0.64)


def test_a_table_where_no_level_pays_says_so(model_path, tmp_path):
    """Small layers at batch 1: every sparse level is slower than dense, the largest speedup is 1.0x."""
    from spdy_onnx import graph
    from spdy_onnx.errors import InfeasibleTarget
    sites, _ = graph.find_sites(onnx.load(model_path))
    table = LatencyTable(levels=LEVELS, times={s.name: [1.0, 1.4, 1.3, 1.2] for s in sites},
                         dense_total_ms=len(sites) + 0.5, runtime="table", meta={"cores": 1})
    table.save(tmp_path / "t.json")
    with pytest.raises(InfeasibleTarget) as refused:
        api.optimize(model_path, target=1.5, runtime="table", latency_table=tmp_path / "t.json",
                     output=tmp_path / "o.onnx", progress=False)
    assert refused.value.max_speedup == pytest.approx(1.0)
    assert "no sparsity level runs faster than dense" in str(refused.value)
    assert not (tmp_path / "o.onnx").exists()


def test_a_near_miss_is_measured_again_before_the_aim_goes_up(scripted, model_path, tmp_path, monkeypatch):
    """A draft 1% short is within compile-to-compile noise: it is measured once more and the two pooled;
    a draft 10% short sends the aim up at once."""
    required = 2.0 * 1.02
    factors = []   # each measurement's speedup, as a multiple of the requirement

    def scripted_speed(self, *a, **k):
        dense = 10.0
        return Comparison(baseline_ms=dense, candidate_ms=dense / (required * factors.pop(0)), rounds=15,
                          iterations_per_round=1)
    monkeypatch.setattr(ScriptedRuntime, "compare", scripted_speed)
    factors[:] = [1.5, 0.99, 1.02]   # the first: the fastest profile, measured up front
    rep = api.optimize(model_path, target=2.0, runtime="scripted", output=tmp_path / "o.onnx",
                       cache_dir=tmp_path / "c", progress=False)
    first, second = rep["attempts"][:2]
    assert first["attempt"] == second["attempt"] and first["aimed_speedup"] == second["aimed_speedup"]
    assert first["measured_speedup"] < required <= second["pooled_speedup"]
    assert rep["status"] == "met" and rep["measured_speedup"] == pytest.approx(second["pooled_speedup"])
    assert len({a["aimed_speedup"] for a in rep["attempts"]}) == 1   # the aim never went up
    assert not factors

    factors[:] = [0.9, 1.0, 1.0, 1.0, 1.0]   # the fastest profile's measurement is cached now
    rep = api.optimize(model_path, target=2.0, runtime="scripted", output=tmp_path / "p.onnx",
                       cache_dir=tmp_path / "c", progress=False)
    first, second = rep["attempts"][:2]
    assert first["measured_speedup"] < required * (1 - api.NEAR_MISS)
    assert second["attempt"] == first["attempt"] + 1 and second["aimed_speedup"] > first["aimed_speedup"]

    # a near miss that pools 1% short: the aim goes up by the aims' resolution, not by the 1% shortfall
    # (a profile 1% faster on the table measures the same, within the noise)
    factors[:] = [0.99, 0.99, 1.0, 1.0, 1.0, 1.0]
    rep = api.optimize(model_path, target=2.0, runtime="scripted", output=tmp_path / "q.onnx",
                       cache_dir=tmp_path / "c", progress=False)
    aims = [a["aimed_speedup"] for a in rep["attempts"]]
    assert rep["attempts"][1]["pooled_speedup"] < required and aims[0] == aims[1]
    assert aims[2] >= aims[0] * (1 + api.AIM_RESOLUTION) * (1 - 1e-9)


class FusingRuntime(ScriptedRuntime):
    """An engine that fuses every site into one kernel whenever their levels differ, and then runs 30%
    slower than the table: a kernel no profiling run (every site at one level) can show. The table
    knows one fused pair, so the engine counts as one that fuses."""
    analysed: list = []

    def measure(self, model_path, sites, **kw):
        table = super().measure(model_path, sites, **kw)
        table.fused_groups = [[sites[0].name, sites[1].name]]
        return table

    @staticmethod
    def _levels(path):
        from spdy_onnx import graph
        from spdy_onnx.passes import sparsity_of
        model = onnx.load(path)
        sites, _ = graph.find_sites(model)
        w = graph.read_weights(model, sites)
        return {s.name: round(sparsity_of(w[s.name]), 2) for s in sites}

    def compare(self, baseline_path, candidate_path, **kw):
        c = super().compare(baseline_path, candidate_path, **kw)
        if len(set(self._levels(candidate_path).values())) > 1:
            c.candidate_ms *= 1.3
        return c

    def fused_sites(self, model_path, *, batch_size, feeds, aliases):
        type(self).analysed.append(model_path)
        levels = self._levels(model_path)
        return [sorted(levels)] if len(set(levels.values())) > 1 else []


def test_kernels_fused_only_in_a_mixed_draft_are_tied_and_the_aim_solved_again(monkeypatch, model_path, tmp_path):
    """2x on this table needs mixed levels; the engine fuses the mixed draft into one slow kernel. The
    draft's own analysis ties its sites, the same aim is solved again with them at one level, and the
    tie is kept in the cached table for later runs."""
    monkeypatch.setitem(REGISTRY, "fusing", (__name__, "FusingRuntime", None))
    monkeypatch.setattr(ScriptedRuntime, "efficiency", 1.0)
    FusingRuntime.analysed = []
    rep = api.optimize(model_path, target=2.0, runtime="fusing", output=tmp_path / "o.onnx",
                       cache_dir=tmp_path / "c", progress=False, max_attempts=3)
    first, second = rep["attempts"][:2]
    assert first["measured_speedup"] < 2.0 and first["tied_after"]          # a mixed draft, slow
    assert second["aimed_speedup"] == first["aimed_speedup"]                # the same aim, not raised
    assert rep["status"] == "met" and rep["measured_speedup"] >= 2.04
    assert len({s["sparsity"] for s in rep["sites"]}) == 1                  # now at one level
    names = sorted(s["name"] for s in rep["sites"])
    assert rep["fused_groups_from_drafts"] == [names] and rep["fused_groups"] == [names]
    assert len(FusingRuntime.analysed) == 1                                 # only the missed draft
    (saved,) = (tmp_path / "c" / "tables").glob("*.json")
    assert LatencyTable.load(saved).fused_groups == [names]


def test_a_missed_draft_is_not_analysed_for_a_strategy_that_ignores_groups(monkeypatch, model_path, tmp_path):
    monkeypatch.setitem(REGISTRY, "fusing", (__name__, "FusingRuntime", None))
    monkeypatch.setattr(ScriptedRuntime, "efficiency", 0.9)
    FusingRuntime.analysed = []
    rep = api.optimize(model_path, target=1.75, runtime="fusing", output=tmp_path / "o.onnx",
                       cache_dir=tmp_path / "c", progress=False, strategy="uniform", max_attempts=3)
    assert rep["attempts"][0]["measured_speedup"] < 1.75 and FusingRuntime.analysed == []
    assert "fused_groups_from_drafts" not in rep


def test_a_failed_analysis_of_the_draft_leaves_the_aim_search_as_it_was(monkeypatch, model_path, tmp_path, caplog):
    from spdy_onnx.errors import SpdyError

    def broken(self, *a, **k):
        raise SpdyError("DeepSparse could not run the model: boom")
    monkeypatch.setitem(REGISTRY, "fusing", (__name__, "FusingRuntime", None))
    monkeypatch.setattr(ScriptedRuntime, "efficiency", 1.0)
    monkeypatch.setattr(FusingRuntime, "fused_sites", broken)
    rep = api.optimize(model_path, target=2.0, runtime="fusing", output=tmp_path / "o.onnx",
                       cache_dir=tmp_path / "c", progress=False, max_attempts=4)
    first, second = rep["attempts"][:2]
    assert first["measured_speedup"] < 2.0 and "tied_after" not in first
    assert second["aimed_speedup"] > first["aimed_speedup"]      # raised, as without the check
    assert "analysis of the draft failed" in caplog.text and "fused_groups_from_drafts" not in rep


def test_a_file_whose_outputs_are_mostly_gone_is_called_out():
    from spdy_onnx.api import _quality_warnings
    assert _quality_warnings({}) == []                                        # no data: nothing measured
    assert _quality_warnings({"calibration_loss": 0.2, "loss": "mse"}) == []
    assert _quality_warnings({"calibration_loss": 0.8, "loss": "kl"}) == []
    (text,) = _quality_warnings({"calibration_loss": 0.73, "loss": "mse"})
    assert "mse 0.73" in text and "less speed" in text
    assert _quality_warnings({"calibration_loss": 1.3, "loss": "mse+kl"})
    assert _quality_warnings({"calibration_loss": 2.0, "loss": "kl-channels"})


def test_one_lost_head_among_kept_ones_is_called_out_by_name():
    """Three heads, one of them gone: their mean (0.3) is under every limit; the lost head is named."""
    from spdy_onnx.api import _quality_warnings
    quality = {"calibration_loss": 0.3, "loss": "kl+mse+mse",
               "calibration_loss_per_output": {"logits": 0.05, "score": 0.05, "box": 0.8}}
    (text,) = _quality_warnings(quality)
    assert "output 'box' is far" in text and "mse 0.8" in text
    quality["calibration_loss_per_output"]["box"] = 0.1
    assert _quality_warnings(quality) == []


def test_a_refusal_says_how_little_of_the_time_can_be_pruned():
    from spdy_onnx.errors import InfeasibleTarget
    text = str(InfeasibleTarget(1.3, 1.001, margin=0.02, pruned_share=0.25))
    assert "take 25% of the dense model's time" in text and "at most 1.33x faster" in text
    assert "dense model's time" not in str(InfeasibleTarget(1.3, 1.1, margin=0.02, pruned_share=0.9))
    # where the share itself is the limit, a bigger batch is not the advice
    assert "--batch-size" not in str(InfeasibleTarget(1.3, 1.001, margin=0.02, pruned_share=0.01))
    assert "--batch-size" in str(InfeasibleTarget(1.3, 1.001, margin=0.02, pruned_share=0.9))


def test_a_refusal_names_why_most_of_the_model_is_left_dense():
    """ALBERT shares one layer's weights across all layers: every MatMul is left dense and the refusal
    only said 'sites left dense' among generic causes. It now counts the reasons."""
    from types import SimpleNamespace

    from spdy_onnx.errors import InfeasibleTarget
    excluded = {f"layer{i}/mm{j}": f"weight 'w{j}' is shared by several nodes: left dense"
                for i in range(12) for j in range(6)}
    excluded["head"] = "tiny (20 weights < 1000): left dense by default"
    summary = api._left_dense_summary(SimpleNamespace(excluded=excluded))
    assert summary.startswith("72 x weight 'w0' is shared by several nodes") and "1 x tiny (20 weights" in summary
    text = str(InfeasibleTarget(1.5, 1.003, margin=0.02, pruned_share=0.01, left_dense=summary))
    assert "take 1% of the dense model's time" in text and "Left dense: 72 x weight 'w0' is shared" in text


def test_a_miss_on_a_coarse_grid_raises_the_aim_past_the_missed_profile(scripted, tmp_path):
    """Two sites: the profiles' predictions are far apart (1.61x, 1.67x, 2x ...). The first profile,
    predicted well above the aim, measures 12% under its prediction and misses. Raising the aim from the
    aim only lands on the same profile, already measured, again and again until the attempts run out;
    raising it from that profile's own prediction reaches the next, faster one."""
    scripted.efficiency = 0.88
    model_path = tmp_path / "m2.onnx"
    onnx.save(tiny.mlp(width=64, depth=2, seq=4), model_path)
    rep = api.optimize(model_path, target=1.5, runtime="scripted", output=tmp_path / "o.onnx",
                       cache_dir=tmp_path / "c", progress=False, max_attempts=2)
    first = rep["attempts"][0]
    assert first["predicted_speedup"] > first["aimed_speedup"] * 1.03 and first["measured_speedup"] < 1.5 * 1.02
    assert rep["status"] == "met" and rep["measured_speedup"] >= 1.5 * 1.02
    assert len({a["attempt"] for a in rep["attempts"]}) == 2


@pytest.mark.parametrize("quiet_speed,loads", [(1.0, [1.3, 0.0]), (0.9, [1.3, 0.0]), (1.0, [1.3, 1.2, 1.1])])
def test_a_measurement_under_load_is_checked_again_on_a_quieter_machine(scripted, model_path, tmp_path,
                                                                        monkeypatch, quiet_speed, loads):
    """Under contention the dense model slows more than the sparse one and the speedup comes out high.
    A met target measured under load is measured again: the first quiet measurement decides (met, or
    missed when it falls short); when none is quiet the loaded one stands, with a warning."""
    real = ScriptedRuntime.compare
    calls = iter(loads + [0.0] * 20)

    def loaded(self, baseline, candidate, **k):
        c = real(self, baseline, candidate, **k)
        c.foreign_load_cores = next(calls) if "candidate" in str(candidate) else 0.0   # the files of attempts
        if c.foreign_load_cores <= api.NOISY_CORES:
            c.candidate_ms /= quiet_speed
        return c
    scripted.efficiency = 1.0
    monkeypatch.setattr(ScriptedRuntime, "compare", loaded)
    kw = dict(runtime="scripted", output=tmp_path / "o.onnx", cache_dir=tmp_path / "c", progress=False,
              max_attempts=1)
    if quiet_speed < 1.0:
        with pytest.raises(TargetMissed):
            api.optimize(model_path, target=2.0, **kw)
        assert not (tmp_path / "o.onnx").exists()
        return
    rep = api.optimize(model_path, target=2.0, **kw)
    assert rep["status"] == "met"
    loaded_warning = any("overstated" in w for w in rep["warnings"])
    assert loaded_warning == (len(loads) == 3)
    assert [a["measurement"]["foreign_load_cores"] for a in rep["attempts"]] == loads[:3 if loaded_warning else 2]


def _loaded_but_slower_when_quiet(monkeypatch, scripted, *, efficiency):
    """Every measurement of an attempt runs under load (1.3 cores); the quiet check's measurements run
    quiet and find each file 7% slower."""
    real = ScriptedRuntime.compare

    def loaded(self, baseline, candidate, **k):
        c = real(self, baseline, candidate, **k)
        quiet = str(candidate).endswith("q.onnx")   # the quiet check's file
        c.foreign_load_cores = 0.0 if quiet else 1.3
        if quiet:
            c.candidate_ms /= 0.93
        return c
    scripted.efficiency = efficiency
    monkeypatch.setattr(ScriptedRuntime, "compare", loaded)


def test_a_kept_profile_that_misses_its_quiet_check_falls_back_to_one_with_speed_to_spare(
        scripted, model_path, tmp_path, monkeypatch):
    """The engine beats the table, so the first profile overshoots and a lower aim is kept; every attempt
    runs under load, and on a quiet machine each file is 7% slower. The kept profile then misses; the
    first one, which met with speed to spare, meets on a quiet machine too and is written (the run used
    to end with nothing, while a profile measured at 2.06x was at hand)."""
    _loaded_but_slower_when_quiet(monkeypatch, scripted, efficiency=1.3)
    rep = api.optimize(model_path, target=1.5, runtime="scripted", output=tmp_path / "o.onnx",
                       cache_dir=tmp_path / "c", progress=False, max_attempts=3)
    first, lower = rep["attempts"][0], rep["attempts"][1]
    assert lower["aimed_speedup"] < first["aimed_speedup"]
    quiet = [a for a in rep["attempts"] if a["measurement"]["foreign_load_cores"] == 0.0]
    assert len(quiet) == 2 and quiet[0]["measured_speedup"] < 1.5 * 1.02 <= quiet[1]["measured_speedup"]
    assert rep["status"] == "met" and rep["measured_speedup"] == quiet[1]["measured_speedup"]
    assert rep["predicted_speedup"] == first["predicted_speedup"] and (tmp_path / "o.onnx").exists()


def test_a_kept_profile_that_misses_its_quiet_check_raises_the_aim_while_attempts_remain(
        scripted, model_path, tmp_path, monkeypatch):
    """No profile with speed to spare was found before the quiet check missed: the aim is raised by the
    shortfall, as after any miss, instead of ending the run with attempts left (a 2x run ended after 2
    of 6 attempts under load)."""
    _loaded_but_slower_when_quiet(monkeypatch, scripted, efficiency=1.0)
    kw = dict(runtime="scripted", cache_dir=tmp_path / "c", progress=False)
    rep = api.optimize(model_path, target=1.5, output=tmp_path / "o.onnx", max_attempts=3, **kw)
    aims = [a["aimed_speedup"] for a in rep["attempts"]]
    assert rep["status"] == "met" and rep["measured_speedup"] >= 1.5 * 1.02 and aims == sorted(aims)
    assert len({a["attempt"] for a in rep["attempts"]}) > 1
    with pytest.raises(TargetMissed):      # with one attempt there is nothing left to raise the aim with
        api.optimize(model_path, target=1.5, output=tmp_path / "p.onnx", max_attempts=1, **kw)


def test_the_quiet_check_is_recorded_under_the_attempt_of_the_kept_profile(scripted, model_path, tmp_path,
                                                                           monkeypatch):
    """The first profile meets with speed to spare, the lower aim's misses, and the first is kept: its
    quiet check belongs to attempt 1, not to the missed attempt 2, whose standing it used to take over."""
    real = ScriptedRuntime.compare
    efficiency = iter([1.1, 0.9, 1.1])

    def loaded(self, baseline, candidate, **k):
        c = real(self, baseline, candidate, **k)
        if "candidate" in str(candidate):   # the files of attempts; under load but for the quiet check
            c.candidate_ms /= next(efficiency)
            c.foreign_load_cores = 0.0 if str(candidate).endswith("q.onnx") else 1.3
        return c
    scripted.efficiency = 1.0
    monkeypatch.setattr(ScriptedRuntime, "compare", loaded)
    rep = api.optimize(model_path, target=2.0, runtime="scripted", output=tmp_path / "o.onnx",
                       cache_dir=tmp_path / "c", progress=False, max_attempts=2)
    rows = rep["attempts"]
    assert rep["status"] == "met" and [a["attempt"] for a in rows] == [1, 2, 1]
    first, quiet = rows[0], rows[-1]
    assert quiet["measurement"]["foreign_load_cores"] == 0.0 and rows[1]["measured_speedup"] < 2.0 * 1.02
    assert (quiet["aimed_speedup"], quiet["predicted_speedup"]) == (first["aimed_speedup"], first["predicted_speedup"])
    assert rep["measured_speedup"] == quiet["measured_speedup"]
    standing = dict((a["attempt"], v) for a, v in api.standing_measurements(rows))
    assert standing == {1: quiet["measured_speedup"], 2: rows[1]["measured_speedup"]}


def test_a_refusal_on_a_noisy_table_says_the_table_may_be_off():
    """A refusal that rests on the table alone: when the table was profiled under load or its dense time
    moved, the message says so and how to check (a noisy dense time once refused a model that ran 1.88x)."""
    from spdy_onnx.errors import InfeasibleTarget
    quiet = LatencyTable(levels=LEVELS, times={"a": [1.0, 0.5]}, dense_total_ms=2.0, runtime="t",
                         meta={"foreign_load_cores": 0.1, "dense_total_spread": 0.02})
    noisy = LatencyTable(levels=LEVELS, times={"a": [1.0, 0.5]}, dense_total_ms=2.0, runtime="t",
                         meta={"foreign_load_cores": 1.3, "dense_total_spread": 0.3})
    assert api._table_doubts(quiet) == ""
    text = str(InfeasibleTarget(1.3, 1.2, margin=0.02, table_note=api._table_doubts(noisy)))
    assert "1.3 cores while it was profiled and its dense time varied by 30%" in text and "--no-cache" in text
    # a refusal that measured the fastest profile end to end rests on the engine, not on the table
    assert "--no-cache" not in str(InfeasibleTarget(1.3, 1.2, measured=1.1, table_note=api._table_doubts(noisy)))


def test_the_aim_is_never_lowered_to_an_all_dense_profile(scripted, model_path, tmp_path):
    """The engine runs 80% faster than the table: lowering the aim by that much went under 1.0, where the
    solver's profile is all dense and measuring it is a wasted attempt."""
    scripted.efficiency = 1.8
    rep = api.optimize(model_path, target=1.1, runtime="scripted", output=tmp_path / "o.onnx",
                       cache_dir=tmp_path / "c", progress=False, max_attempts=6)
    floor = 1 + (1.1 * 1.02 - 1) * api.AIM_FLOOR
    assert all(a["aimed_speedup"] >= floor * (1 - 1e-9) for a in rep["attempts"])
    assert all(a["predicted_speedup"] > 1.0 for a in rep["attempts"])
    assert rep["status"] == "met"


def test_a_missed_run_leaves_an_earlier_model_with_its_own_report(scripted, model_path, tmp_path):
    """A 2x run wrote o.onnx and its report; a later 3x run at the same -o misses: the 2x model stays, and
    its report must still describe it, so the miss is reported beside it."""
    import json
    kw = dict(runtime="scripted", output=tmp_path / "o.onnx", cache_dir=tmp_path / "c", progress=False)
    scripted.efficiency = 1.0
    api.optimize(model_path, target=2.0, **kw)
    scripted.efficiency = 0.5
    with pytest.raises(TargetMissed) as missed:
        api.optimize(model_path, target=3.0, max_attempts=2, **kw)
    assert json.loads((tmp_path / "o.report.json").read_text())["target"] == 2.0
    assert json.loads((tmp_path / "o.missed.report.json").read_text())["status"] == "missed"
    assert "o.missed.report.json" in str(missed.value)


@pytest.mark.parametrize("slow,warned", [(1.10, True), (1.02, False)])
def test_a_deciding_measurement_with_a_slowed_dense_model_is_flagged(slow, warned):
    """Load from outside the machine shows in no process count, but the dense model runs slower than the
    run saw it: the report says so when the deciding measurement's dense time is 5% over the fastest."""
    table = LatencyTable(levels=LEVELS, times={"a": [1.0, 0.8, 0.5, 0.25]}, dense_total_ms=1.5, runtime="scripted",
                         meta={"cores": 1})
    first = Comparison(baseline_ms=30.0, candidate_ms=15.0, rounds=15, iterations_per_round=10)
    last = Comparison(baseline_ms=30.0 * slow, candidate_ms=15.0 * slow, rounds=15, iterations_per_round=10)
    attempts = [{"attempt": 1, "measurement": first.to_json()}, {"attempt": 2, "measurement": last.to_json()}]
    flagged = [w for w in api._noise_warnings(table, last, attempts) if "dense model ran" in w]
    assert bool(flagged) == warned
    if warned:
        assert "10% slower" in flagged[0] and "33.00 ms against 30.00 ms" in flagged[0]
    # the fastest measurement deciding is never flagged, however slow the others were
    assert not [w for w in api._noise_warnings(table, first, attempts) if "dense model ran" in w]


class QueuedRuntime(ScriptedRuntime):
    """Speedups handed out in a given order, one per measurement."""
    queue: list = []

    def compare(self, baseline_path, candidate_path, **kw):
        return Comparison(baseline_ms=10.0, candidate_ms=10.0 / type(self).queue.pop(0), rounds=3,
                          iterations_per_round=1)


def test_benchmark_reports_the_median_of_fresh_measurements(monkeypatch, model_path, capsys):
    """One measurement can fall in a stretch of outside load; `--measurements N` measures N times afresh and
    reports the median, with every figure in the order measured."""
    monkeypatch.setitem(REGISTRY, "queued", (__name__, "QueuedRuntime", None))
    monkeypatch.setattr(QueuedRuntime, "queue", [2.1, 1.7, 2.0, 9.9])
    assert main(["benchmark", str(model_path), "--baseline", str(model_path), "--runtime", "queued",
                 "--measurements", "3", "-q"]) == 0
    out = capsys.readouterr().out
    assert "speedup 2.000x" in out
    assert "the median of 3 fresh measurements: 2.100x, 1.700x, 2.000x" in out
    assert QueuedRuntime.queue == [9.9]                      # three measured, no more
    # an even count reports the lower middle one: the conservative side
    monkeypatch.setattr(QueuedRuntime, "queue", [2.1, 1.7, 2.0, 1.9])
    c = api.benchmark(model_path, baseline=model_path, runtime="queued", progress=False, measurements=4)
    assert round(c.speedup, 3) == 1.9 and len(c.extra["measured_speedups"]) == 4
    assert main(["benchmark", str(model_path), "--runtime", "queued", "--measurements", "0", "-q"]) != 0


def test_benchmark_refuses_a_bad_measurement_count_before_compiling(monkeypatch, model_path):
    monkeypatch.setitem(REGISTRY, "queued", (__name__, "QueuedRuntime", None))
    monkeypatch.setattr(QueuedRuntime, "queue", [2.0])
    with pytest.raises(SpdyError, match="measurements must be >= 1"):
        api.benchmark(model_path, baseline=model_path, runtime="queued", progress=False, measurements=0)
    assert QueuedRuntime.queue == [2.0]
