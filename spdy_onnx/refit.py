"""Sequential correction of a chosen profile (SPDY's optional global step, in closed form).

The database reconstructs every site against the dense model's own inputs, so that any mix of levels
can be stitched. Once the profile is fixed, errors of earlier sites change the inputs of later ones.
Going through the sites in graph order, each site's kept weights are re-fitted so that, fed the
*pruned* model's inputs, it reproduces the dense model's output:  min || V X_pruned - W X_dense ||^2,
masks unchanged (so the measured speed is unchanged).
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from tqdm.auto import tqdm

from spdy_onnx import blas, calibrate, obs
from spdy_onnx.evaluate import weights_as_inputs
from spdy_onnx.ort_session import make_session, run

log = logging.getLogger(__name__)

DEFAULT_SAMPLES = 64
DAMP = 1.0   # strong pull toward the database's weights: the fit has few rows per input dimension


def sequential_refit(model: onnx.ModelProto, sites, dense: dict[str, np.ndarray], pruned: dict[str, np.ndarray],
                     data: dict, batch_size: int, *, samples: int = DEFAULT_SAMPLES, progress: bool = True
                     ) -> dict[str, np.ndarray]:
    """{initializer: weight} after the correction; `dense` and `pruned` are keyed by initializer name."""
    m = weights_as_inputs(model, [s.weight for s in sites])
    have = {o.name for o in m.graph.output}
    for name in dict.fromkeys(s.input for s in sites):
        if name not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = make_session(m)  # requested outputs survive graph optimisations
    current = dict(pruned)
    groups: dict[str, list] = {}
    for site in sites:                       # graph order is topological order in ONNX
        groups.setdefault(site.input, []).append(site)
    feeds = list(calibrate.batches(data, batch_size, limit=samples))
    dense_rows = _dense_rows(session, feeds, dense, groups)
    for input_name, members in tqdm(list(groups.items()), desc="refit", unit="input", disable=not progress,
                                    leave=False):
        h = g = None
        n = 0
        try:
            for i, feed in enumerate(feeds):
                xp = np.asarray(run(session, [input_name], {**feed, **current})[0], dtype=np.float32)
                mask = calibrate.token_mask(feed)
                rp = calibrate.masked_rows(xp, calibrate.site_rows(members[0], xp), mask)
                if dense_rows is not None:
                    rd = dense_rows[input_name][i]
                else:
                    xd = np.asarray(run(session, [input_name], {**feed, **dense})[0], dtype=np.float32)
                    rd = calibrate.masked_rows(xd, calibrate.site_rows(members[0], xd), mask)
                h = blas.gram(rp).astype(np.float64) + (0 if h is None else h)
                g = blas.matmul(rd.T, rp).astype(np.float64) + (0 if g is None else g)
                n += rp.shape[0]
        except NotImplementedError:
            continue                          # layouts without a matrix view keep their weights
        if not n or not (np.isfinite(h).all() and np.isfinite(g).all()):
            continue
        h, g = h / n, g / n
        for site in members:
            w0 = site.to_matrix(dense[site.weight])
            v = site.to_matrix(current[site.weight])
            if v.shape[1] != h.shape[0]:
                continue
            fitted = obs.refine(w0, v, h, cross=g, damp=DAMP)
            before = _residual(v, w0, h, g)
            after = _residual(fitted, w0, h, g)
            if after < before:               # never make a site worse than the database's weights
                current[site.weight] = site.from_matrix(fitted.astype(np.float32))
    return current


def _dense_rows(session, feeds, dense, groups, limit_bytes: int = 1 << 30):
    """The dense model's rows at every site input, from one pass per sample, if they fit in memory
    (else None, and each group runs the dense model itself)."""
    names = list(groups)
    out: dict[str, list] = {name: [] for name in names}
    total = 0
    try:
        for feed in feeds:
            values = run(session, names, {**feed, **dense})
            mask = calibrate.token_mask(feed)
            for name, x in zip(names, values):
                x = np.asarray(x, dtype=np.float32)
                rows = calibrate.masked_rows(x, calibrate.site_rows(groups[name][0], x), mask)
                total += rows.nbytes
                if total > limit_bytes:
                    return None
                out[name].append(np.ascontiguousarray(rows))
    except NotImplementedError:
        return None
    return out


def _residual(v, w0, h, g) -> float:
    """|| V Xp - W Xd ||^2 up to the constant || W Xd ||^2 term."""
    v = np.asarray(v, dtype=np.float64)
    return float(np.sum(blas.matmul(v, h) * v) - 2.0 * np.sum(blas.matmul(np.asarray(w0, dtype=np.float64), g) * v))
