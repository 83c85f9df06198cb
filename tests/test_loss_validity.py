"""Helpers of the probe benchmarks (loss_validity, probe_oracle, probe_sensitivity): whitened errors, ranks,
profiles read from result files, exact McNemar and gaps to the baselines of one speed."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import loss_validity  # noqa: E402


def test_whitened_error_weighs_a_quiet_direction_like_a_loud_one():
    rng = np.random.default_rng(0)
    scales = np.array([10.0, 1.0, 0.1])
    samples = rng.standard_normal((20000, 3)) * scales
    inverse = loss_validity.whitener(samples)
    loud = np.array([[scales[0], 0.0, 0.0]])     # one standard deviation along each axis
    quiet = np.array([[0.0, 0.0, scales[2]]])
    # a plain squared error counts the loud direction 10,000 times more; whitened, the shrinkage
    # (0.1 x the mean variance, ~3.4) is all that still separates them
    mean_var = np.mean(scales ** 2)
    expected_loud = scales[0] ** 2 / (scales[0] ** 2 + loss_validity.SHRINK * mean_var)
    expected_quiet = scales[2] ** 2 / (scales[2] ** 2 + loss_validity.SHRINK * mean_var)
    assert loss_validity.quadratic(loud, inverse) == pytest.approx(expected_loud, rel=0.05)
    assert loss_validity.quadratic(quiet, inverse) == pytest.approx(expected_quiet, rel=0.05)
    assert np.sum(loud ** 2) / np.sum(quiet ** 2) > 1e3


def test_pooled_embedding_is_the_normalised_mean_of_the_token_rows():
    states = [np.array([[3.0, 0.0], [1.0, 0.0]]), np.array([[0.0, 2.0], [0.0, 4.0], [0.0, 0.0]])]
    np.testing.assert_allclose(loss_validity.pooled(states), [[1.0, 0.0], [0.0, 1.0]])


def test_profiles_are_read_once_each_with_the_runners_up(tmp_path):
    row = dict(target=2.0, strategy="spdy", predicted=2.0, probe_acc=0.7, picks=[1, 2],
               spread=[dict(probe_acc=0.7, picks=[1, 2]), dict(probe_acc=0.71, picks=[2, 2])])
    other = dict(target=2.0, strategy="uniform", predicted=2.16, probe_acc=0.73, picks=[2, 2])
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"rows": [row]}))
    b.write_text(json.dumps({"rows": [row, other]}))
    profiles = loss_validity.read_profiles([str(a), str(b)])
    # SPDY's own profile once, its second runner-up (the first is itself), uniform's profile equals
    # that runner-up's and is not read again
    assert [p["name"] for p in profiles] == ["spdy@2.000", "spdy runner-up 2@2.000"]
    assert [p["probe_acc"] for p in profiles] == [0.7, 0.71]


def test_summary_groups_by_speed_and_places_uniform():
    def prof(name, predicted, acc, loss):
        return {"name": name, "predicted": predicted, "probe_acc": acc, **{k: loss for k in loss_validity.LOSSES}}
    profiles = [prof("uniform@2.161", 2.161, 0.73, 0.5), prof("spdy@2.161", 2.161, 0.72, 0.4),
                prof("oracle@2.167", 2.167, 0.71, 0.6),
                prof("spdy@2.000", 2.0, 0.72, 0.3), prof("gm@2.004", 2.004, 0.70, 0.45), prof("x@2.006", 2.006, 0.71, 0.35)]
    summary = loss_validity.summarise(profiles)
    assert list(summary) == ["2.00x", "2.15x"]
    assert summary["2.00x"]["profiles"] == 3 and summary["2.15x"]["profiles"] == 3
    # 2.0x: lower loss, higher accuracy throughout: a perfect ranking; no uniform profile there
    assert summary["2.00x"]["tokens-nmse"]["spearman"] == pytest.approx(-1.0)
    assert summary["2.00x"]["tokens-nmse"]["uniform_place"] is None
    # 2.16x: uniform best on the probe but second in the loss's order
    assert summary["2.15x"]["pooled-cos"]["uniform_place"] == 2
    assert summary["2.15x"]["pooled-cos"]["spearman"] == pytest.approx(-0.5)


def test_two_runs_profiles_of_one_strategy_and_speed_keep_apart_names(tmp_path):
    rows = [dict(target=2.0, strategy="spdy", predicted=2.161, probe_acc=0.72, picks=[3, 3])]
    again = [dict(target=2.0, strategy="spdy", predicted=2.161, probe_acc=0.71, picks=[3, 4])]
    a, b = tmp_path / "first.json", tmp_path / "second.json"
    a.write_text(json.dumps({"rows": rows}))
    b.write_text(json.dumps({"rows": again}))
    names = [p["name"] for p in loss_validity.read_profiles([str(a), str(b)])]
    assert names == ["spdy@2.161", "spdy@2.161 (second)"]


def test_spearman_shares_tied_ranks_and_matches_a_count_by_hand():
    np.testing.assert_allclose(loss_validity.ranks([3.0, 1.0, 3.0, 2.0]), [2.5, 0.0, 2.5, 1.0])
    # ranks (0, 1, 2, 3) against (1, 0, 3, 2): d^2 sums to 4, so rho = 1 - 6*4 / (4 * 15) = 0.6
    assert loss_validity.spearman([1, 2, 3, 4], [20, 10, 40, 30]) == pytest.approx(0.6)
    assert loss_validity.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(loss_validity.spearman([1, 2], [1, 2]))
    assert np.isnan(loss_validity.spearman([1, 1, 1], [1, 2, 3]))


def test_exact_mcnemar_counts_and_p_match_the_binomial_by_hand():
    import probe_oracle
    a = np.array([True] * 7 + [False] * 3 + [True] * 5)
    b = np.array([False] * 7 + [True] * 3 + [True] * 5)
    only_a, only_b, p = probe_oracle.mcnemar_exact(a, b)
    # 7 against 3 of 10 discordant: two-sided p = 2 * (1 + 10 + 45 + 120) / 1024
    assert (only_a, only_b) == (7, 3) and p == pytest.approx(2 * 176 / 1024)
    assert probe_oracle.mcnemar_exact(a, a)[2] == 1.0


def test_gaps_compare_each_profile_with_the_baselines_of_its_speed_only():
    import probe_sensitivity
    profiles = [probe_sensitivity.profile_item({"name": n, "predicted": v}) for n, v in
                [("uniform@2.161", 2.161), ("spdy@2.161", 2.161), ("spdy@2.000", 2.0), ("global-magnitude@2.004", 2.004)]]
    right = {"uniform@2.161": np.array([1, 1, 1, 0], bool), "spdy@2.161": np.array([1, 0, 1, 0], bool),
             "spdy@2.000": np.array([1, 1, 1, 1], bool), "global-magnitude@2.004": np.array([0, 1, 1, 1], bool)}
    gaps = probe_sensitivity.baseline_gaps(right, profiles)
    assert set(gaps["spdy@2.161"]) == {"uniform@2.161"}
    assert gaps["spdy@2.161"]["uniform@2.161"][0] == pytest.approx(-25.0)
    assert set(gaps["spdy@2.000"]) == {"global-magnitude@2.004"}
    assert gaps["spdy@2.000"]["global-magnitude@2.004"][0] == pytest.approx(25.0)
    assert "global-magnitude@2.004" not in gaps       # no other baseline at its speed
    assert "uniform@2.161" not in gaps


def test_kept_files_are_grouped_by_their_target(tmp_path):
    import probe_sensitivity
    item = probe_sensitivity.file_item(tmp_path / "minilm.global-magnitude.2x.onnx")
    assert (item["name"], item["strategy"], item["group"]) == ("minilm.global-magnitude.2x", "global-magnitude", "2x")
    with pytest.raises(SystemExit, match="expected a name like"):
        probe_sensitivity.file_item(tmp_path / "pruned.onnx")
