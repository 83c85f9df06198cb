"""The comparison of an engine's outputs with onnxruntime's (spdy_onnx/engine_check.py)."""
import json

import numpy as np

from spdy_onnx.engine_check import TOLERANCE, is_wrong, output_error


def _ref():
    rng = np.random.default_rng(0)
    return [rng.standard_normal((2, 10)).astype(np.float32), rng.standard_normal((2, 3, 4)).astype(np.float32)]


def test_float_rounding_passes_and_is_measured_relative_to_the_output():
    ref = _ref()
    got = [a * (1 + 1e-6) for a in ref]
    err = output_error(got, ref)
    assert err["finite"] and err["reference_finite"] and not is_wrong(err)
    assert 0 < err["max_rel_error"] < 1e-5
    # a model whose outputs are 1000x larger, off by the same share, is as right
    scaled = output_error([a.astype(np.float64) * 1000 for a in got], [a.astype(np.float64) * 1000 for a in ref])
    assert abs(scaled["max_rel_error"] - err["max_rel_error"]) < 1e-3 * err["max_rel_error"]


def test_nan_and_garbage_are_wrong():
    ref = _ref()
    nan = [ref[0], np.full_like(ref[1], np.nan)]
    err = output_error(nan, ref)
    assert not err["finite"] and err["max_rel_error"] is None and is_wrong(err)
    json.dumps(err, allow_nan=False)     # strict JSON in the report
    garbage = [ref[0], ref[1] + 0.1 * np.abs(ref[1]).max()]
    err = output_error(garbage, ref)
    assert err["finite"] and err["max_rel_error"] > TOLERANCE and is_wrong(err)


def test_only_entries_the_reference_computes_are_compared():
    ref = _ref()
    ref[0][0, 0] = np.nan
    got = [a.copy() for a in ref]
    got[0][0, 0] = np.nan
    err = output_error(got, ref)
    assert not err["reference_finite"] and err["finite"] and not is_wrong(err)


def test_outputs_that_do_not_match_in_number_or_size_are_wrong():
    ref = _ref()
    assert is_wrong(output_error(ref[:1], ref))
    assert is_wrong(output_error([ref[0], ref[1][:, :2]], ref))
    # the same values in another layout (an engine that drops a unit axis) are compared as such
    flat = [ref[0].reshape(20), ref[1]]
    assert not is_wrong(output_error(flat, ref))
