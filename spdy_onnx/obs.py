"""Layer-wise second-order reconstruction (the OBC / SparseGPT family), in numpy.

Given W (outputs x K) and H = X^T X over calibration rows, prune to an exact number of zeros while
keeping W X close to the dense output: columns are processed left to right; each pruned weight's
error is spread over the not-yet-processed columns of its row with the optimal (OBS) update, using
the Cholesky factor of H^-1, which is computed once per site and shared by all levels.
"""
from __future__ import annotations

import numpy as np

BLOCK = 32


def inverse_cholesky(h: np.ndarray, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Upper Cholesky factor of (H + damp * mean(diag) I)^-1, and the mask of dead (all-zero) inputs."""
    h = np.array(h, dtype=np.float64, copy=True)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    mean_diag = float(np.mean(np.diag(h)))
    for attempt in range(6):
        try:
            hd = h + (damp * (10 ** attempt)) * mean_diag * np.eye(h.shape[0])
            lower = np.linalg.cholesky(hd)
            inv = np.linalg.inv(lower)
            hinv = inv.T @ inv
            return np.linalg.cholesky(hinv).T, dead
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("Hessian is not positive definite even with strong damping")


def _block_counts(n_rows: int, n_cols: int, sparsity: float, block: int) -> list[int]:
    """Zeros per column block, so that the total is exactly round(sparsity * size)."""
    counts, done = [], 0
    for start in range(0, n_cols, block):
        end = min(n_cols, start + block)
        want = int(round(sparsity * n_rows * end))
        counts.append(want - done)
        done = want
    return counts


def prune(w: np.ndarray, hinv_chol: np.ndarray, dead: np.ndarray, sparsity: float = 0.0, *,
          n: int = 0, m: int = 0, block: int = BLOCK) -> np.ndarray:
    """OBS-pruned copy of w (float64 maths) with exactly round(sparsity*size) zeros, or n:m zeros per
    group of m consecutive columns when n and m are given."""
    w = np.array(w, dtype=np.float64, copy=True)
    w[:, dead] = 0.0
    rows, cols = w.shape
    if m:
        block = max(m, block - block % m)
    counts = _block_counts(rows, cols, sparsity, block) if not m else None
    for bi, i1 in enumerate(range(0, cols, block)):
        i2 = min(cols, i1 + block)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        hinv1 = hinv_chol[i1:i2, i1:i2]
        diag = np.diag(hinv1)
        mask = np.zeros_like(w1, dtype=bool)   # True = prune
        if not m:
            k = counts[bi]
            if k > 0:
                score = (w1 ** 2) / (diag[None, :] ** 2)
                idx = np.argsort(score, axis=None, kind="stable")[:k]
                mask.ravel()[idx] = True
        for i in range(i2 - i1):
            if m and i % m == 0:
                group = w1[:, i:i + m]
                score = group ** 2 / (diag[None, i:i + m] ** 2)
                drop = np.argsort(score, axis=1, kind="stable")[:, :n]
                np.put_along_axis(mask[:, i:i + m], drop, True, axis=1)
            col = w1[:, i]
            q = np.where(mask[:, i], 0.0, col)
            err = (col - q) / diag[i]
            w1[:, i:] -= np.outer(err, hinv1[i, i:])
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        if i2 < cols:
            w[:, i2:] -= err1 @ hinv_chol[i1:i2, i2:]
    # the update can leave tiny values in pruned positions: they are exactly zero by construction
    return w


def reconstruction_error(w_dense: np.ndarray, w_pruned: np.ndarray, h: np.ndarray) -> float:
    """|| (W_p - W) X ||^2 / || W X ||^2 written with H = X^T X."""
    d = (w_pruned - w_dense).astype(np.float64)
    h = np.asarray(h, dtype=np.float64)
    w = np.asarray(w_dense, dtype=np.float64)
    num = float(np.sum((d @ h) * d))
    den = float(np.sum((w @ h) * w))
    return num / den if den > 0 else num


def refine(w_dense: np.ndarray, w_pruned: np.ndarray, h: np.ndarray, *, iters: int = 8,
           damp: float = 1e-3, cross: np.ndarray | None = None) -> np.ndarray:
    """Least-squares re-fit of the kept weights on a fixed mask, by conjugate gradients batched over rows.

    Minimises || V X - W X ||^2 with V zero wherever w_pruned is zero: the exact optimum the greedy
    OBS sweep only approximates. With `cross` = X_dense^T X, it minimises || V X - W X_dense ||^2
    instead, where X are the inputs of the pruned model (the sequential correction). A ridge term
    damp * mean(diag H) * || V - anchor ||^2 keeps the fit from chasing noise, with the anchor the dense
    weights (plain refit) or the starting weights (sequential correction). The mask is kept.
    Jacobi-preconditioned: on MiniLM-L6, 8 iterations reach the error of 15 unpreconditioned ones.
    """
    # float32 GEMMs (half the time of float64, the same error to 4 digits on MiniLM-L6); dot products
    # that decide the step sizes are accumulated in float64
    f32 = np.float32
    w0 = np.asarray(w_dense, dtype=f32)
    v = np.array(w_pruned, dtype=f32, copy=True)
    mask = (v != 0).astype(f32)
    h = np.asarray(h, dtype=np.float64)
    ridge = damp * float(np.mean(np.diag(h)))
    hd = (h + ridge * np.eye(h.shape[0])).astype(f32)
    diag = np.diag(hd).astype(np.float64)
    inv_diag = np.divide(1.0, diag, out=np.ones_like(diag), where=diag > 0).astype(f32)[None, :]  # 0: a dead input
    if cross is None:
        target = w0 @ hd
    else:
        target = w0 @ np.asarray(cross, dtype=f32) + f32(ridge) * v
    r = mask * (target - v @ hd)
    z = inv_diag * r
    p = z.copy()
    rz = np.einsum("ij,ij->i", r, z, dtype=np.float64)
    for _ in range(iters):
        ap = mask * (p @ hd)
        pap = np.einsum("ij,ij->i", p, ap, dtype=np.float64)
        alpha = np.divide(rz, pap, out=np.zeros_like(rz), where=pap > 1e-30).astype(f32)
        v += alpha[:, None] * p
        r -= alpha[:, None] * ap
        z = inv_diag * r
        rz_new = np.einsum("ij,ij->i", r, z, dtype=np.float64)
        beta = np.divide(rz_new, rz, out=np.zeros_like(rz), where=rz > 1e-30).astype(f32)
        p = z + beta[:, None] * p
        rz = rz_new
        if float(rz.max(initial=0.0)) < 1e-20:
            break
    return v * mask


def best_reconstruction(w: np.ndarray, h: np.ndarray, chol: np.ndarray, dead: np.ndarray, sparsity: float = 0.0,
                        *, n: int = 0, m: int = 0, iters: int = 8) -> np.ndarray:
    """OBS sweep to choose the mask, then an exact least-squares refit of the kept weights.

    (On MiniLM-L6 this beat both plain OBS and a refit magnitude mask at every site and level tried.)
    """
    return refine(w, prune(w, chol, dead, sparsity, n=n, m=m), h, iters=iters)
