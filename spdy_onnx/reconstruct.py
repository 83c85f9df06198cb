"""Build the reconstruction database from calibration data, one site at a time, stored on disk.

Each site's file holds its pruned weight at every level (source layout and dtype). Files are written
atomically and checked when read, so a killed run resumes where it stopped and a damaged file is
rebuilt. Only one site's weights are in memory while building; reading maps one level at a time.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from spdy_onnx import cache, calibrate, graph, obs
from spdy_onnx.database import MagnitudeDatabase
from spdy_onnx.tables import new_file_mode

log = logging.getLogger(__name__)


def _site_file(folder: Path, name: str) -> Path:
    return folder / (hashlib.sha1(name.encode()).hexdigest()[:20] + ".npy")


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.chmod(tmp, new_file_mode())   # readable by whoever shares the cache, like the tables
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class StoredDatabase:
    """Pruned weights per (site, level) read from per-site .npy files (memory-mapped)."""

    def __init__(self, folder: Path, sites, levels, method: str):
        self.folder = folder
        self.sites = {s.name: s for s in sites}
        self.levels = list(levels)
        self.method = method

    def _load(self, name: str):
        return np.load(_site_file(self.folder, name), mmap_mode="r", allow_pickle=False)

    def valid(self, name: str) -> bool:
        site = self.sites[name]
        try:
            arr = self._load(name)
        except (OSError, ValueError, EOFError):
            return False
        return arr.shape == (len(self.levels),) + tuple(site.source_shape) and arr.dtype == np.dtype(site.source_dtype)

    def weight(self, name: str, j: int) -> np.ndarray:
        return np.array(self._load(name)[j])


# The Hessians (and so the database) use the first this many calibration samples. More data goes to the
# global correction, where it measurably helps (one MiniLM-L6 profile at 1.6x: cosine to dense 0.875 with
# 1,024 sentences, 0.892 with 2,048; benchmarks/results/correction_data_minilm_1.6x.txt); on a
# BERT-base-size encoder every 1,024 more sentences would add about 90 s of Hessians to a 20-minute budget.
HESSIAN_SAMPLES = 1024
# OBS dampening, as a share of H's mean diagonal (SparseGPT's 1%); read at call time, so that
# benchmarks/obs_damping.py can compare values without a parameter on every caller
DEFAULT_DAMP = 0.01


def build_database(prep, sites, sources: dict, levels: list[float], data: dict, *, method: str = "obs",
                   pattern: str = "unstructured", cache_dir=None, progress: bool = True, damp: float | None = None,
                   timings: dict | None = None, on_site=None):
    """The database for `sites`: magnitude (in memory, no data needed) or OBS (on disk, cached).
    `timings`, when given, receives hessians_s and reconstruction_s of the sites built now;
    `on_site(done, total)` is called as the sites to build are done (from 0 of them)."""
    if method == "magnitude":
        if pattern == "2:4":
            from spdy_onnx.database import SemiStructuredDatabase
            return SemiStructuredDatabase(sites, sources, levels)
        return MagnitudeDatabase(sites, sources, levels)
    if method != "obs":
        raise ValueError(f"unknown reconstruction method {method}")
    data = {k: v[:HESSIAN_SAMPLES] for k, v in data.items()}
    damp = DEFAULT_DAMP if damp is None else damp
    # Gemm transA sites had the transposed Hessian until it was fixed: their databases are keyed apart,
    # and every other model's cached database stays valid
    fixed = {"trans_a": sorted(s.name for s in sites if s.trans_a)} if any(s.trans_a for s in sites) else {}
    key = cache.cache_key(model=prep.digest, sites=sorted(s.name for s in sites), levels=levels, method=method,
                          pattern=pattern, data=calibrate.data_digest(data), damp=damp, version=5, **fixed)
    folder = Path(cache_dir or cache.default_cache_dir()) / "databases" / key
    folder.mkdir(parents=True, exist_ok=True)
    db = StoredDatabase(folder, sites, levels, method)
    todo = [s for s in sites if not db.valid(s.name)]
    if not todo:
        log.info("reconstruction database from cache %s", folder)
        return db
    log.info("building the %s database for %d sites x %d levels (%s)", method, len(todo), len(levels), folder)
    supported = [s for s in todo if s.op_type != "Conv" or (s.group == 1 and len(s.kernel_shape) == 2)]
    t0 = time.perf_counter()
    hess = calibrate.hessians(prep.calibration_model, supported, data, prep.batch_size, progress=progress) if supported else {}
    t1 = time.perf_counter()
    hess = _shared_hessians(hess, sites)
    built: dict[str, np.ndarray] = {}   # weight -> its stack: sites that share a weight get one reconstruction
    if on_site is not None:
        on_site(0, len(todo))
    for done, site in enumerate(tqdm(todo, desc="reconstructing", unit="site", disable=not progress, leave=False)):
        if site.weight not in built:
            built[site.weight] = _reconstruct_site(site, sources[site.name], hess.get(site.name), levels, pattern, damp)
        _save_npy_atomic(_site_file(folder, site.name), built[site.weight])
        if on_site is not None:
            on_site(done + 1, len(todo))
    if timings is not None:
        timings.update(hessians_s=t1 - t0, reconstruction_s=time.perf_counter() - t1)
    (folder / "manifest.json").write_text(json.dumps(
        {"sites": [s.name for s in sites], "levels": levels, "method": method, "pattern": pattern}, indent=1))
    return db


def _shared_hessians(hess: dict, sites) -> dict:
    """Each site that shares its weight gets the sum of its group's Hessians (each a mean over its own
    rows): one pruned weight serves all of them, so it minimises their summed output errors. A group
    with a member lacking a Hessian gets none (magnitude pruning, the same for all)."""
    out = dict(hess)
    for group in graph.shared_weight_groups(sites):
        parts = [hess.get(name) for name in group]
        total = None if any(h is None for h in parts) else sum(np.asarray(h, dtype=np.float64) for h in parts)
        for name in group:
            out.pop(name, None)
            if total is not None:
                out[name] = total
    return out


def _unit_scale(h: np.ndarray) -> np.ndarray | None:
    """H over its mean non-zero diagonal, or None when H is not finite. The reconstruction does not
    depend on H's scale, but its float32 steps do: a layer whose inputs are about 1e-20 (a randomly
    initialised MobileViT has such) gives an H^-1 beyond float32's range."""
    h = np.asarray(h, dtype=np.float64)
    if not np.isfinite(h).all():
        return None
    diag = np.diag(h)
    live = diag[diag > 0]
    return h / float(live.mean()) if live.size else h


def _reconstruct_site(site, source, h, levels, pattern, damp) -> np.ndarray:
    out = np.empty((len(levels),) + tuple(source.shape), dtype=source.dtype)
    out[0] = source
    fallback = MagnitudeDatabase([site], {site.name: source}, levels)
    w = site.to_matrix(source) if h is not None else None
    if h is None or h.shape[0] != w.shape[1]:
        log.info("site %s: no second-order reconstruction for this layout; magnitude pruning", site.name)
        if pattern == "2:4":
            from spdy_onnx.passes.semi_structured import prune_2_4
            for j in range(1, len(levels)):
                out[j] = prune_2_4(site, source)
        else:
            for j in range(1, len(levels)):
                out[j] = fallback.weight(site.name, j)
        return out
    h = _unit_scale(h)
    if h is None:
        log.warning("site %s: its inputs on the calibration data are not finite; magnitude pruning instead",
                    site.name)
        return _reconstruct_site(site, source, None, levels, pattern, damp)
    try:
        chol, dead = obs.inverse_cholesky(h, damp=damp)
    except np.linalg.LinAlgError:
        log.warning("site %s: Hessian is singular even with damping; magnitude pruning instead", site.name)
        return _reconstruct_site(site, source, None, levels, pattern, damp)
    if pattern == "2:4":
        stack = np.repeat(obs.best_reconstruction(w, h, chol, dead, n=2, m=4)[None], len(levels) - 1, axis=0)
    else:
        stack = obs.best_reconstruction_levels(w, h, chol, dead, levels[1:])
    if not np.isfinite(stack).all():
        log.warning("site %s: the second-order reconstruction is not finite (inputs of extreme scale?); "
                    "magnitude pruning instead", site.name)
        return _reconstruct_site(site, source, None, levels, pattern, damp)
    for j in range(1, len(levels)):
        out[j] = site.from_matrix(stack[j - 1])
    return out
