"""Does the engine compute what the written file says? Its outputs against onnxruntime's.

Why: the end-to-end measurement runs the engine on real inputs, but a fast file is worth nothing if
the engine returns NaN or garbage for it (DeepSparse 1.8 does so for some models, in some compiles,
dense ones included). The outputs the engine returned while it was timed are compared with
onnxruntime's for the same file and inputs, for the dense model and for the written file, so that a
fault of the engine on the model itself is told apart from one that came with the pruning.
"""
from __future__ import annotations

import logging

import numpy as np

from spdy_onnx.errors import SpdyError
from spdy_onnx.ort_session import make_session, run

log = logging.getLogger(__name__)

# relative to the largest reference value of each output; the engine's sparse kernels sum in another
# order than onnxruntime's (about 1e-6: benchmarks/results/architectures_hf.md), a miscompiled file is
# off by orders of magnitude more
TOLERANCE = 1e-2


def output_error(engine: list[np.ndarray], reference: list[np.ndarray]) -> dict:
    """How far the engine's outputs are from the reference's. `max_rel_error` is the largest absolute
    difference of each output over its largest reference value, taken over the reference's finite
    entries; `finite` says whether the engine's outputs are finite wherever the reference's are."""
    if len(engine) != len(reference):
        return {"finite": False, "reference_finite": True, "max_rel_error": None,
                "note": f"{len(engine)} outputs from the engine, {len(reference)} from the reference"}
    finite, reference_finite, worst = True, True, 0.0
    for got, want in zip(engine, reference):
        got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
        if got.shape != want.shape:
            if got.size != want.size:
                return {"finite": False, "reference_finite": True, "max_rel_error": None,
                        "note": f"an output of shape {list(got.shape)} where the reference has {list(want.shape)}"}
            got = got.reshape(want.shape)
        ok = np.isfinite(want)
        reference_finite &= bool(ok.all())
        finite &= bool(np.isfinite(got[ok]).all())
        if ok.any():
            scale = max(float(np.abs(want[ok]).max()), 1e-6)
            diff = np.abs(got[ok] - want[ok])
            worst = max(worst, float(np.nanmax(np.where(np.isfinite(diff), diff, np.inf))) / scale)
    # None, not inf, where the engine's outputs are not finite: the report is strict JSON
    return {"finite": finite, "reference_finite": reference_finite,
            "max_rel_error": worst if np.isfinite(worst) else None}


def is_wrong(error: dict) -> bool:
    return not error["finite"] or error["max_rel_error"] is None or error["max_rel_error"] > TOLERANCE


def reference_outputs(path, feeds: dict) -> list[np.ndarray]:
    session = make_session(path)
    names = [o.name for o in session.get_outputs()]
    return run(session, names, {k: np.ascontiguousarray(v) for k, v in feeds.items()})


def check(dense_path, candidate_path, feeds: dict, comparison, *, engine: str,
          names: tuple[str, str] = ("the dense model", "the written file")) -> tuple[dict | None, list[str]]:
    """(the report's `engine_outputs`, warnings) for a measurement of `candidate_path` against
    `dense_path`, which `names` call them in the warnings; (None, []) where the engine gave no outputs
    back (an engine that cannot run here, or one that does not hand them out)."""
    outputs = getattr(comparison, "outputs", None)
    if outputs is None:
        return None, []
    try:
        dense = output_error(outputs[0], reference_outputs(dense_path, feeds))
        pruned = output_error(outputs[1], reference_outputs(candidate_path, feeds))
    except SpdyError as exc:   # onnxruntime cannot run the file: nothing to compare with
        log.warning("the engine's outputs were not checked: %s", exc)
        return {"reference": "onnxruntime", "checked": False, "note": str(exc)}, []
    report = {"reference": "onnxruntime", "checked": True, "tolerance": TOLERANCE, "dense": dense, "pruned": pruned}
    base, cand = names
    warnings = []
    if not pruned["reference_finite"]:
        warnings.append(f"the outputs of {cand} are not finite even in onnxruntime on the measurement inputs: "
                        "its weights break the model's numerics")
    if is_wrong(pruned) and is_wrong(dense):
        warnings.append(f"{engine} computes this model wrongly, pruned or not: on the measurement inputs its "
                        f"outputs of {cand} are {_describe(pruned)} and those of {base} {_describe(dense)}. "
                        "Check the engine's outputs before deploying either")
    elif is_wrong(pruned):
        warnings.append(f"{engine}'s outputs of {cand} are {_describe(pruned)} on the measurement inputs, while "
                        f"those of {base} agree: check the file on the engine before deploying it")
    elif is_wrong(dense):
        warnings.append(f"{engine}'s outputs of {base} are {_describe(dense)} on the measurement inputs, while "
                        f"those of {cand} agree: the engine may not run this model reliably")
    return report, warnings   # the caller reports them (the CLI prints the report's warnings)


def _describe(error: dict) -> str:
    if not error["finite"]:
        return "not finite where onnxruntime's are"
    return f"off from onnxruntime's by up to {error['max_rel_error']:.2g} of the largest value"
