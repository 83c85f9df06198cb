"""Level factors: low levels timed among pruned neighbours scale the solver's times, not the fixed time."""
import numpy as np
import pytest

from spdy_onnx import context
from spdy_onnx.errors import SpdyError
from spdy_onnx.solver import solve_dp
from spdy_onnx.tables import LatencyTable

LEVELS = [0.0, 0.4, 0.543, 0.7, 0.85, 0.95]


def _engine(times: np.ndarray, fixed: float, penalty: float, speed: float, background: int):
    """A fake engine: sites at a level under 0.6 among pruned ones take `penalty` x their table time;
    everything runs `speed` x slower than when the table was measured."""
    def total(picks):
        ms = fixed
        for i, j in enumerate(picks):
            ms += times[i, j] * (penalty if LEVELS[j] < context.CONTEXT_BELOW else 1.0)
        return ms * speed
    return total


@pytest.mark.parametrize("penalty,speed", [(1.3, 1.0), (1.25, 1.7), (1.0, 0.8), (1.5, 1.2)])
def test_pooled_factor_recovers_the_engines_penalty_under_drift(penalty, speed):
    rng = np.random.default_rng(0)
    times = np.sort(rng.uniform(0.2, 1.0, (10, len(LEVELS))), axis=1)[:, ::-1]
    fixed = 2.0
    units = [[i] for i in range(10)]
    background, design = context.designs(LEVELS, units, 10)
    assert LEVELS[background] == 0.85
    engine = _engine(times, fixed, penalty, speed, background)
    base = np.full(10, background)
    measured = [engine(np.where(mask, j, base)) for j, mask in design]
    predicted = fixed + times[:, background].sum()
    factor, each = context.pooled_factor(times, background, design, engine(base), predicted, measured)
    assert factor == pytest.approx(penalty)
    assert each == pytest.approx([penalty] * len(design))


def test_pooled_factor_is_clamped():
    times = np.ones((4, len(LEVELS)))
    background, design = context.designs(LEVELS, [[0], [1], [2], [3]], 4)
    # faster than the table among pruned neighbours: taken as noise, factor 1
    low, _ = context.pooled_factor(times, background, design, 10.0, 10.0, [9.0] * len(design))
    assert low == 1.0
    high, each = context.pooled_factor(times, background, design, 10.0, 10.0, [30.0] * len(design))
    assert high == context.MAX_FACTOR and min(each) > context.MAX_FACTOR


def test_designs_alternate_units_keep_fused_groups_whole_and_flip_parity():
    units = [[0, 3], [1], [2], [4, 5]]
    background, design = context.designs(LEVELS, units, 6)
    assert [LEVELS[j] for j, _ in design] == [0.0, 0.4, 0.543]
    first, second = design[0][1], design[1][1]
    assert list(first) == [True, False, True, True, False, False]      # units 0 and 2: [0, 3] whole, [2]
    assert list(first | second) == [True] * 6 and not (first & second).any()
    for _, mask in design:                                            # a fused group never splits
        for unit in units:
            assert len(set(mask[unit])) == 1
    assert context.designs([0.0, 0.9], [[0], [1]], 2)[1][0][0] == 0   # the dense level alone
    assert context.designs([0.0, 0.5], [[0], [1]], 2) is None          # no pruned background
    assert context.designs(LEVELS, [[0, 1]], 2) is None                # nothing to alternate


def test_factors_scale_site_times_but_not_the_dense_total_or_fixed_time():
    times = {"a": [1.0, 0.9, 0.4], "b": [2.0, 1.6, 0.5]}
    plain = LatencyTable(levels=[0.0, 0.5, 0.9], times=times, dense_total_ms=4.0, runtime="t")
    scaled = LatencyTable(levels=[0.0, 0.5, 0.9], times=times, dense_total_ms=4.0, runtime="t",
                          level_factors=[1.5, 1.5, 1.0])
    assert scaled.fixed_ms(["a", "b"]) == plain.fixed_ms(["a", "b"]) == pytest.approx(1.0)
    np.testing.assert_allclose(scaled.matrix(["a", "b"]), [[1.5, 1.35, 0.4], [3.0, 2.4, 0.5]])
    # a dense site among pruned ones: 1.0 + 1.5 x 1.0 + 0.5, against 1.0 + 1.0 + 0.5 in the plain table
    assert scaled.predicted_ms({"a": 0, "b": 2}) == pytest.approx(3.0)
    assert plain.predicted_ms({"a": 0, "b": 2}) == pytest.approx(2.5)
    assert scaled.site_ms("b", 1) == pytest.approx(2.4)
    # the solver sees the factor: a dense and b at 0.5 fit 2.65 ms in the plain table, not in the scaled one
    errors = np.array([[0.0, 1.0, 3.0], [0.0, 1.0, 3.0]])
    assert list(solve_dp(errors, plain.matrix(["a", "b"]), budget=2.65)) == [0, 1]
    assert list(solve_dp(errors, scaled.matrix(["a", "b"]), budget=2.65)) == [0, 2]
    again = LatencyTable.from_json(scaled.to_json())
    assert again.level_factors == [1.5, 1.5, 1.0]
    assert "level_factors" not in plain.to_json()
    with pytest.raises(SpdyError, match="level_factors"):
        LatencyTable(levels=[0.0, 0.5], times={"a": [1.0, 0.5]}, dense_total_ms=2.0, runtime="t",
                     level_factors=[1.2]).validate()


@pytest.mark.deepsparse
def test_profiling_on_deepsparse_measures_the_low_levels_among_pruned_ones(tmp_path, cache_dir, monkeypatch):
    pytest.importorskip("deepsparse")
    import onnx
    import tiny

    from spdy_onnx import api
    from spdy_onnx.cli import main
    path = tmp_path / "m.onnx"
    onnx.save(tiny.mlp(width=256, depth=4, seq=32), path)
    plain, _ = api.profile(path, output=tmp_path / "plain.json", cores=1, levels="0.5,0.9", cache_dir=cache_dir,
                           progress=False, runtime_options={"repeats": 1})
    assert plain.level_factors == [] and "level_context" not in plain.meta      # off by default
    assert main(["profile", str(path), "--cores", "1", "--levels", "0.5,0.9", "--repeats", "1", "-q",
                 "--cache-dir", str(cache_dir), "--level-context", "-o", str(tmp_path / "t.json")]) == 0
    table = LatencyTable.load(tmp_path / "t.json")    # measured again: the cached plain table is not reused
    assert len(table.level_factors) == 3
    assert table.level_factors[0] == table.level_factors[1] >= 1.0 and table.level_factors[2] == 1.0
    info = table.meta["level_context"]
    assert info["background_level"] == 0.9 and set(info["per_level"]) == {"0.0", "0.5"}
    assert all(v["measured_ms"] > 0 for v in info["per_level"].values())
    # the cache keeps both: asked again, each comes back as it was
    monkeypatch.setattr(api, "STALE_TABLE", 1e9)    # a tiny model's dense time is noisy; not tested here
    again, _ = api.profile(path, output=tmp_path / "again.json", cores=1, levels="0.5,0.9", cache_dir=cache_dir,
                           progress=False, runtime_options={"repeats": 1}, level_context=True)
    assert again.level_factors == table.level_factors


def test_a_run_budget_measures_the_dense_level_first_and_too_small_a_budget_nothing(tmp_path):
    import onnx
    import tiny

    from spdy_onnx import api
    path = tmp_path / "m.onnx"
    onnx.save(tiny.mlp(width=32, depth=4, seq=4), path)
    prep = api.Prepared(path, runtime="table", batch_size=1, cores=1, input_shapes=None, exclude=None,
                        include=None, min_weights=0, progress=False)
    try:
        names = [s.name for s in prep.all_sites]
        table = LatencyTable(levels=LEVELS, times={n: [1.0, 0.95, 0.8, 0.6, 0.4, 0.2] for n in names},
                             dense_total_ms=len(names) + 1.0, runtime="table")
        timed = []

        def total_ms(file):
            # every site at a level under 0.6 costs 1.2x the table: the file's zeros say which
            m = onnx.load(str(file))
            ms = 1.0
            for init in m.graph.initializer:
                w = onnx.numpy_helper.to_array(init)
                if w.ndim == 2:
                    zeros = float((w == 0).mean())
                    j = int(np.argmin(np.abs(np.asarray(LEVELS) - zeros)))
                    ms += table.times[names[0]][j] * (1.2 if LEVELS[j] < context.CONTEXT_BELOW else 1.0)
            timed.append(file)
            return ms

        factors, info = context.measure_level_factors(prep, table, total_ms, max_runs=2)
        assert len(timed) == 2 and list(info["per_level"]) == ["0.0"]
        assert factors == pytest.approx([1.2, 1.2, 1.2, 1.0, 1.0, 1.0])
        timed.clear()
        factors, info = context.measure_level_factors(prep, table, total_ms)
        assert len(timed) == 4 and list(info["per_level"]) == ["0.0", "0.4", "0.543"]
        assert info["factor"] == pytest.approx(1.2)
        assert context.measure_level_factors(prep, table, total_ms, max_runs=1) is None
    finally:
        prep.close()


def test_sites_sharing_one_weight_move_together_in_every_design(tmp_path, monkeypatch):
    """One array holds one sparsity: a design that moved only one of the nodes reading it would time a
    file other than the one it describes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from spdy_onnx import api
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), n)
             for n in ("w_shared", "w2", "w3")]
    nodes = [helper.make_node("MatMul", ["x", "w_shared"], ["a"], name="first"),
             helper.make_node("MatMul", ["a", "w_shared"], ["b"], name="second"),
             helper.make_node("MatMul", ["b", "w2"], ["c"], name="third"),
             helper.make_node("MatMul", ["c", "w3"], ["y"], name="fourth")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 32])], inits)
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    prep = api.Prepared(path, runtime="table", batch_size=1, cores=1, input_shapes=None, exclude=None,
                        include=None, min_weights=0, progress=False)
    try:
        names = [s.name for s in prep.all_sites]
        assert names == ["first", "second", "third", "fourth"]
        table = LatencyTable(levels=LEVELS, times={n: [1.0, 0.95, 0.8, 0.6, 0.4, 0.2] for n in names},
                             dense_total_ms=5.0, runtime="table")
        seen, plain = [], context.designs
        monkeypatch.setattr(context, "designs", lambda *a: seen.append(plain(*a)) or seen[-1])
        assert context.measure_level_factors(prep, table, lambda file: 5.0) is not None
        (_, design), = seen
        assert len(design) == 3
        for _, mask in design:
            assert mask[0] == mask[1]
        assert not all(mask[0] == mask[2] for _, mask in design)      # the others still alternate
    finally:
        prep.close()
