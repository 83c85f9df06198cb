"""Layer-wise second-order reconstruction (the OBC / SparseGPT family), in numpy.

Given W (outputs x K) and H = X^T X over calibration rows, prune to an exact number of zeros while
keeping W X close to the dense output: columns are processed left to right; each pruned weight's
error is spread over the not-yet-processed columns of its row with the optimal (OBS) update, using
the Cholesky factor of H^-1, which is computed once per site and shared by all levels.
"""
from __future__ import annotations

import numpy as np

from spdy_onnx import blas

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
            inv = blas.inverse_lower(blas.cholesky(hd))
            hinv = blas.matmul(inv.T, inv)
            return blas.cholesky(hinv).T, dead
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
    """OBS-pruned copy of w with exactly round(sparsity*size) zeros, or n:m zeros per group of m
    consecutive columns when n and m are given."""
    return prune_levels(w, hinv_chol, dead, [sparsity], n=n, m=m, block=block)[0]


STACK_BYTES = 256 << 20         # levels swept together while their stacked copies of W fit in this
REFINE_STACK_BYTES = 32 << 20   # levels refit together while their stacked copies of W fit in this
# masks at most this dense are refit on their kept weights with a sparse product (_refine_kept): on the
# AMD EPYC it beat the dense GEMM from 88.3% sparsity on BERT-base's three shapes, was about even at
# 84.6% (density 0.154: 0.89-1.43x) and lost at 79.8% on two of them (benchmarks/refit_sparse.py)
SPARSE_REFIT_DENSITY = 0.16
_ON_KEPT = True                 # tests turn the sparse path off to compare it with the dense one


def prune_levels(w: np.ndarray, hinv_chol: np.ndarray, dead: np.ndarray, sparsities, *, n: int = 0, m: int = 0,
                 block: int = BLOCK) -> np.ndarray:
    """OBS-pruned copies of w, one per sparsity (or one n:m copy), as float32 (levels, rows, cols).

    The levels share H^-1 and the column sweep is the same for each, so the copies are stacked
    row-wise and swept together: the per-column work is paid once per site instead of once per level,
    and the updates are larger GEMMs. Only the choice of which weights to prune differs per level.
    float32, as in SparseGPT (tests/test_accuracy_core.py: exact zero counts, lower error than magnitude).
    """
    w = np.asarray(w)
    rows, cols = w.shape
    sparsities = [0.0] if m else list(sparsities)
    per_chunk = max(1, int(STACK_BYTES // max(1, w.size * 4)))
    out = np.empty((len(sparsities), rows, cols), dtype=np.float32)
    for c in range(0, len(sparsities), per_chunk):
        chunk = sparsities[c:c + per_chunk]
        out[c:c + len(chunk)] = _sweep(w, hinv_chol, dead, chunk, n=n, m=m, block=block).reshape(len(chunk), rows, cols)
    return out


def _smallest(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k smallest values (a partial sort: the sweep calls this per block and level)."""
    if k >= values.size:
        return np.arange(values.size)
    return np.argpartition(values, k - 1)[:k]


def _sweep(w, hinv_chol, dead, sparsities, *, n, m, block):
    """The OBS sweep over the columns of len(sparsities) stacked copies of w: (levels * rows, cols)."""
    rows, cols = w.shape
    n_levels = len(sparsities)
    ws = np.tile(np.asarray(w, dtype=np.float32), (n_levels, 1))
    ws[:, dead] = 0.0
    hinv = np.asarray(hinv_chol, dtype=np.float32)
    if m:
        block = max(m, block - block % m)
    counts = [_block_counts(rows, cols, s, block) for s in sparsities] if not m else None
    for bi, i1 in enumerate(range(0, cols, block)):
        i2 = min(cols, i1 + block)
        # the block transposed, so that each column the sweep visits is contiguous in memory
        w1 = np.ascontiguousarray(ws[:, i1:i2].T)          # (block, levels * rows)
        err1 = np.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        diag = np.diag(hinv1)
        prune_mask = np.zeros(w1.shape, dtype=bool)
        if not m:
            score = (w1 ** 2) / (diag[:, None] ** 2)
            for lv in range(n_levels):
                k = counts[lv][bi]
                if k > 0:
                    part = np.ascontiguousarray(score[:, lv * rows:(lv + 1) * rows])
                    chosen = np.zeros(part.size, dtype=bool)
                    chosen[_smallest(part.ravel(), k)] = True
                    prune_mask[:, lv * rows:(lv + 1) * rows] = chosen.reshape(part.shape)
        for i in range(i2 - i1):
            if m and i % m == 0:
                group = w1[i:i + m]
                score = group ** 2 / (diag[i:i + m, None] ** 2)
                drop = np.argsort(score, axis=0, kind="stable")[:n]
                np.put_along_axis(prune_mask[i:i + m], drop, True, axis=0)
            col = w1[i]
            q = np.where(prune_mask[i], 0.0, col)
            err = (col - q) / diag[i]
            w1[i:] -= np.outer(hinv1[i, i:], err)
            w1[i] = q
            err1[i] = err
        ws[:, i1:i2] = w1.T
        if i2 < cols:
            blas.subtract_product(ws[:, i2:], err1.T, hinv[i1:i2, i2:])
    # the update can leave tiny values in pruned positions: they are exactly zero by construction
    return ws


def reconstruction_error(w_dense: np.ndarray, w_pruned: np.ndarray, h: np.ndarray) -> float:
    """|| (W_p - W) X ||^2 / || W X ||^2 written with H = X^T X."""
    d = (w_pruned - w_dense).astype(np.float64)
    h = np.asarray(h, dtype=np.float64)
    w = np.asarray(w_dense, dtype=np.float64)
    num = float(np.sum(blas.matmul(d, h) * d))
    den = float(np.sum(blas.matmul(w, h) * w))
    return num / den if den > 0 else num


def refine(w_dense: np.ndarray, w_pruned: np.ndarray, h: np.ndarray, *, iters: int = 8,
           damp: float = 1e-3, cross: np.ndarray | None = None) -> np.ndarray:
    """Least-squares re-fit of the kept weights on a fixed mask, by conjugate gradients batched over rows.

    Minimises || V X - W X ||^2 with V zero wherever w_pruned is zero: the exact optimum the greedy
    OBS sweep only approximates. `w_pruned` may stack several pruned copies of w row-wise (levels).
    With `cross` = X_dense^T X, it minimises || V X - W X_dense ||^2
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
    copies, rest = divmod(v.shape[0], w0.shape[0])
    if rest or copies < 1:
        raise ValueError(f"w_pruned has {v.shape[0]} rows, not a multiple of the dense {w0.shape[0]}")
    mask = (v != 0).astype(f32)
    h = np.asarray(h, dtype=np.float64)
    ridge = damp * float(np.mean(np.diag(h)))
    hd = (h + ridge * np.eye(h.shape[0])).astype(f32)
    diag = np.diag(hd).astype(np.float64)
    inv_diag = np.divide(1.0, diag, out=np.ones_like(diag), where=diag > 0).astype(f32)[None, :]  # 0: a dead input
    if cross is None:
        target = blas.matmul(w0, hd)
    else:
        target = blas.matmul(w0, np.asarray(cross, dtype=f32))
    if copies > 1:                         # several pruned copies of w stacked row-wise (one per level)
        target = np.tile(target, (copies, 1))
    if cross is not None:
        target = target + f32(ridge) * v
    if _ON_KEPT and blas.backend() == "torch" and float(mask.mean()) <= SPARSE_REFIT_DENSITY:
        return _refine_kept(v, mask, hd, inv_diag[0], target, iters)
    r = target - blas.matmul(v, hd)
    r *= mask
    z = inv_diag * r
    p = z.copy()
    rz = _row_dots(r, z)
    for _ in range(iters):
        ap = blas.matmul(p, hd)          # in place from here on: these arrays are the size of the stack
        ap *= mask
        pap = _row_dots(p, ap)
        alpha = np.divide(rz, pap, out=np.zeros_like(rz), where=pap > 1e-30)
        alpha = alpha.astype(f32)[:, None]
        v += alpha * p
        ap *= alpha
        r -= ap
        np.multiply(inv_diag, r, out=z)
        rz_new = _row_dots(r, z)
        beta = np.divide(rz_new, rz, out=np.zeros_like(rz), where=rz > 1e-30).astype(f32)
        p *= beta[:, None]
        p += z
        rz = rz_new
        if float(rz.max(initial=0.0)) < 1e-20:
            break
    return v * mask


def _refine_kept(v, mask, hd, inv_diag, target, iters):
    """refine's conjugate gradients on the kept weights alone, for sparse masks: the same iterates as
    the dense path (to float32 rounding), with every vector the length of the kept weights and the
    product with H a sparse x dense one (blas.KeptProduct)."""
    f32 = np.float32
    rows, k = v.shape
    kept = np.flatnonzero(mask.ravel())
    if kept.size == 0:
        return v * mask
    product = blas.KeptProduct(kept, (rows, k), hd)
    row_of = product.rows
    x = v.ravel()[kept]
    d = inv_diag[kept % k]

    def row_dots(a, b):
        return np.bincount(row_of, weights=a.astype(np.float64) * b, minlength=rows)

    r = target.ravel()[kept] - product(x)
    z = d * r
    p = z.copy()
    rz = row_dots(r, z)
    for _ in range(iters):
        ap = product(p)
        pap = row_dots(p, ap)
        alpha = np.divide(rz, pap, out=np.zeros_like(rz), where=pap > 1e-30).astype(f32)[row_of]
        x += alpha * p
        r -= alpha * ap
        z = d * r
        rz_new = row_dots(r, z)
        beta = np.divide(rz_new, rz, out=np.zeros_like(rz), where=rz > 1e-30).astype(f32)[row_of]
        p = z + beta * p
        rz = rz_new
        if float(rz.max(initial=0.0)) < 1e-20:
            break
    out = np.zeros(rows * k, dtype=f32)
    out[kept] = x
    return out.reshape(rows, k)


def _row_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-row dot products of two float32 arrays, accumulated in float64 (they set CG's step sizes)."""
    return np.einsum("ij,ij->i", a, b, dtype=np.float64)


def best_reconstruction(w: np.ndarray, h: np.ndarray, chol: np.ndarray, dead: np.ndarray, sparsity: float = 0.0,
                        *, n: int = 0, m: int = 0, iters: int = 8) -> np.ndarray:
    """OBS sweep to choose the mask, then an exact least-squares refit of the kept weights.

    (On MiniLM-L6 this beat both plain OBS and a refit magnitude mask at every site and level tried.)
    """
    return best_reconstruction_levels(w, h, chol, dead, [sparsity], n=n, m=m, iters=iters)[0]


def best_reconstruction_levels(w: np.ndarray, h: np.ndarray, chol: np.ndarray, dead: np.ndarray, sparsities,
                               *, n: int = 0, m: int = 0, iters: int = 8) -> np.ndarray:
    """best_reconstruction at every sparsity (or once for n:m), as float32 (levels, rows, cols).

    Levels are swept stacked (prune_levels), then refit in stacks of at most REFINE_STACK_BYTES:
    the refit is GEMM-bound, and stacking helps only while the stack stays small.
    """
    w = np.asarray(w)
    pruned = prune_levels(w, chol, dead, sparsities, n=n, m=m)
    per_chunk = max(1, int(REFINE_STACK_BYTES // max(1, w.size * 4)))
    # the dense and the sparse levels stacked apart, so that each stack takes one path of refine
    density = [float(np.count_nonzero(p)) / max(1, p.size) for p in pruned]
    for group in ([i for i, d in enumerate(density) if d > SPARSE_REFIT_DENSITY],
                  [i for i, d in enumerate(density) if d <= SPARSE_REFIT_DENSITY]):
        for c in range(0, len(group), per_chunk):
            idx = group[c:c + per_chunk]
            stack = pruned[idx].reshape(-1, w.shape[1])
            pruned[idx] = refine(w, stack, h, iters=iters).reshape(len(idx), *w.shape)
    return pruned
