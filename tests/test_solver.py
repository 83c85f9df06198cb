"""The DP against brute force, on random small instances, including non-monotone times."""
import itertools

import numpy as np
import pytest

from spdy_onnx.solver import Infeasible, profile_time, solve_dp, tied_units


def brute_force(errors, times, budget, groups=()):
    best, best_err = None, np.inf
    for picks in itertools.product(*[range(errors.shape[1])] * errors.shape[0]):
        if any(len({picks[i] for i in g}) > 1 for g in groups):
            continue
        t = sum(times[l, j] for l, j in enumerate(picks))
        e = sum(errors[l, j] for l, j in enumerate(picks))
        if t <= budget and e < best_err - 1e-12:
            best, best_err = picks, e
    return best, best_err


@pytest.mark.parametrize("seed", range(40))
def test_dp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n_layers, n_levels = rng.integers(1, 5), rng.integers(2, 5)
    times = rng.uniform(0.1, 2.0, (n_layers, n_levels))  # arbitrary: not monotone in the level
    errors = np.sort(rng.uniform(0, 1, (n_layers, n_levels)), axis=1)
    errors[:, 0] = 0.0
    budget = rng.uniform(times.min(axis=1).sum(), times.max(axis=1).sum() * 1.1)
    picks = solve_dp(errors, times, budget)
    assert profile_time(times, picks) <= budget + 1e-9
    _, best_err = brute_force(errors, times, budget)
    got = errors[np.arange(n_layers), picks].sum()
    # discretisation may cost a little: at most what rounding to 10,000 buckets can hide
    assert got <= best_err + 1e-9 or np.isclose(got, best_err, rtol=1e-3, atol=1e-3)


def test_dense_stays_an_option_when_slower_levels_exist():
    # level 1 is slower than dense (seen on DeepSparse at moderate sparsity): never worth choosing
    times = np.array([[1.0, 1.5, 0.4], [1.0, 1.2, 0.5]])
    errors = np.array([[0.0, 0.1, 1.0], [0.0, 0.1, 1.0]])
    assert list(solve_dp(errors, times, budget=2.0)) == [0, 0]
    assert sorted(solve_dp(errors, times, budget=1.5)) == [0, 2]


def test_infeasible_budget_raises():
    times = np.array([[1.0, 0.5], [1.0, 0.5]])
    with pytest.raises(Infeasible):
        solve_dp(np.zeros_like(times), times, budget=0.9)


def test_exactly_feasible_budget_picks_fastest():
    times = np.array([[1.0, 0.3], [1.0, 0.2], [1.0, 0.5]])
    errors = np.array([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    assert list(solve_dp(errors, times, budget=1.0)) == [1, 1, 1]


def test_rounding_never_overshoots_real_budget():
    rng = np.random.default_rng(7)
    for _ in range(20):
        times = rng.uniform(0, 1, (60, 6))
        errors = rng.uniform(0, 1, (60, 6))
        budget = times.min(axis=1).sum() + 0.3 * (times.max(axis=1).sum() - times.min(axis=1).sum())
        picks = solve_dp(errors, times, budget, buckets=500)
        assert profile_time(times, picks) <= budget


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        solve_dp(np.zeros((2, 3)), np.zeros((2, 4)), 1.0)


@pytest.mark.parametrize("seed", range(30))
def test_tied_groups_match_brute_force(seed):
    """Layers an engine fuses share one level; the optimum over tied profiles, not over all profiles."""
    rng = np.random.default_rng(100 + seed)
    n_layers, n_levels = int(rng.integers(2, 6)), int(rng.integers(2, 5))
    times = rng.uniform(0.1, 2.0, (n_layers, n_levels))
    errors = rng.uniform(0, 1, (n_layers, n_levels))
    errors[:, 0] = 0.0
    members = rng.permutation(n_layers)[: int(rng.integers(2, n_layers + 1))]
    groups = [list(members[:2]), list(members[1:])] if len(members) > 2 else [list(members)]
    budget = rng.uniform(times.min(axis=1).sum(), times.max(axis=1).sum() * 1.1)
    best, best_err = brute_force(errors, times, budget, groups)
    if best is None:
        with pytest.raises(Infeasible):
            solve_dp(errors, times, budget, groups=groups)
        return
    picks = solve_dp(errors, times, budget, groups=groups)
    assert len({int(picks[i]) for i in members}) == 1   # overlapping groups merge into one
    assert profile_time(times, picks) <= budget + 1e-9
    got = errors[np.arange(n_layers), picks].sum()
    assert got <= best_err + 1e-9 or np.isclose(got, best_err, rtol=1e-3, atol=1e-3)


def test_tie_changes_the_answer():
    # untied, the cheap way is to prune layer 1 alone; tied to layer 0, both go dense or both sparse
    times = np.array([[1.0, 0.9], [1.0, 0.2]])
    errors = np.array([[0.0, 5.0], [0.0, 0.1]])
    assert list(solve_dp(errors, times, budget=1.3)) == [0, 1]
    assert list(solve_dp(errors, times, budget=1.3, groups=[[0, 1]])) == [1, 1]
    with pytest.raises(Infeasible):
        solve_dp(errors, times, budget=1.0, groups=[[0, 1]])


def test_tied_units_cover_each_layer_once_and_check_indices():
    assert sorted(map(sorted, tied_units(5, [[0, 2], [2, 4]]))) == [[0, 2, 4], [1], [3]]
    with pytest.raises(ValueError):
        tied_units(3, [[0, 3]])


def test_table_fastest_profile_respects_fused_groups():
    from spdy_onnx.tables import LatencyTable
    # b is fastest at level 2, a at level 1; tied, both take the level fastest for their sum
    times = {"a": [1.0, 0.2, 0.9], "b": [1.0, 0.8, 0.5], "c": [1.0, 0.5, 0.4]}
    untied = LatencyTable(levels=[0.0, 0.5, 0.9], times=times, dense_total_ms=3.5, runtime="t")
    tied = LatencyTable(levels=[0.0, 0.5, 0.9], times=times, dense_total_ms=3.5, runtime="t",
                        fused_groups=[["a", "b"]])
    assert list(untied.fastest_picks(["a", "b", "c"])) == [1, 2, 2]
    assert list(tied.fastest_picks(["a", "b", "c"])) == [1, 1, 2]
    assert tied.max_speedup(["a", "b", "c"]) == pytest.approx(3.5 / (0.5 + 0.2 + 0.8 + 0.4))
    assert untied.max_speedup(["a", "b", "c"]) == pytest.approx(3.5 / (0.5 + 0.2 + 0.5 + 0.4))
    # a member left out of the choice (excluded) leaves a group of one: no tie
    assert tied.tied_groups(["a", "c"]) == []
    assert LatencyTable.from_json(tied.to_json()).fused_groups == [["a", "b"]]


def test_a_level_s_savings_are_cut_to_a_share():
    from spdy_onnx.tables import LatencyTable
    t = LatencyTable(levels=[0.0, 0.4, 0.8], times={"a": [10.0, 8.0, 4.0], "b": [5.0, 6.0, 2.0]},
                     dense_total_ms=20.0, runtime="x")
    t.scale_savings(1, 0.25)
    assert t.times["a"] == [10.0, 9.5, 4.0]          # a quarter of the 2 ms saving kept
    assert t.times["b"] == [5.0, 6.0, 2.0]           # slower than dense there: nothing to cut
    t.scale_savings(2, -1.0)                          # clipped: no saving at all
    assert t.times["a"][2] == 10.0 and t.times["b"][2] == 5.0
