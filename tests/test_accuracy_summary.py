"""The cross-run summary of benchmarks/accuracy.py results: gaps, McNemar counts and verdicts."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import accuracy_summary  # noqa: E402


def _row(strategy, right, loss=0.1, measured=2.0, cf=True):
    key = "probe_right_cf" if cf else "probe_right"
    return {"strategy": strategy, "target": "2", key: right, "calibration_loss": str(loss), "measured": str(measured)}


def test_gaps_and_mcnemar_counts_match_a_count_by_hand():
    spdy = "1" * 60 + "0" * 40             # 60% right
    uniform = "1" * 40 + "0" * 60          # 40%: the first 40 sentences, all also right with SPDY
    gm = "0" * 10 + "1" * 60 + "0" * 30    # 60%, differently placed
    line, = accuracy_summary.compare([_row("spdy", spdy), _row("uniform", uniform), _row("global-magnitude", gm)])
    assert line["sentences"] == 100 and line["spdy"] == pytest.approx(0.6)
    u, g = line["uniform"], line["global-magnitude"]
    assert (u["only_spdy"], u["only_base"]) == (20, 0) and u["gap"] == pytest.approx(20.0)
    assert u["p"] == pytest.approx(math.erfc(20 / math.sqrt(20) / math.sqrt(2)))
    assert (g["only_spdy"], g["only_base"]) == (10, 10) and g["gap"] == pytest.approx(0.0) and g["p"] == 1.0
    assert accuracy_summary.verdict(u["gap"], u["p"]) == "ahead"
    assert accuracy_summary.verdict(g["gap"], g["p"]) == "level"
    assert accuracy_summary.verdict(-u["gap"], u["p"]) == "behind"


def test_runs_without_cross_fit_columns_use_the_held_out_sentences_and_skip_missing_baselines():
    line, = accuracy_summary.compare([_row("spdy", "1100", cf=False), _row("uniform", "1000", cf=False)])
    assert line["sentences"] == 4 and line["uniform"]["only_spdy"] == 1
    assert "global-magnitude" not in line


def _image_row(strategy, target, top1, measured=1.2, agree=1 / 3):
    return {"strategy": strategy, "target": target, "top1": top1, "n_labelled": 20, "agree": agree, "n_photos": 9,
            "kl_labelled": 1.5, "sparsity": 0.5, "measured": measured}


def test_runs_without_a_probe_are_set_side_by_side_in_the_order_given(tmp_path, capsys):
    import json
    first = [{"strategy": "dense", "target": None}, _image_row("spdy", 1.25, 7), _image_row("spdy", 1.1, 14),
             _image_row("uniform", 1.1, 9, measured=1.234)]
    second = [_image_row("spdy", 1.1, 12), _image_row("spdy", 1.25, 5, agree=2 / 9)]   # no uniform row
    paths = []
    for i, rows in enumerate((first, second)):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps({"rows": rows}))
    assert accuracy_summary.main([str(p) for p in paths]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("| spdy") or x.startswith("| uniform")]
    assert lines[0].startswith("| spdy | 1.1x | 1.20x / 1.20x | 14/20 / 12/20 | 3/9 / 3/9 |")   # targets sorted
    assert lines[1].startswith("| uniform | 1.1x | 1.23x / - | 9/20 / - |")                       # missing run: -
    assert lines[2].startswith("| spdy | 1.25x | 1.20x / 1.20x | 7/20 / 5/20 | 3/9 / 2/9 |")
