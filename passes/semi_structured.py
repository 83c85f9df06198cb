"""2:4 semi-structured sparsity: which sites can take it, the mask, and the check.

The pattern: in every group of 4 consecutive weights along the reduction axis, at most 2 are non-zero
(exactly 2 are kept by `mask_2_4`). The reduction axis is the one the GPU's sparse tensor cores reduce
over: K of a MatMul/Gemm weight (honouring Gemm's transB), and for a Conv the input channels at each
output channel and kernel position. All of it works on `Site.to_matrix`, the (outputs x reduction)
view whose Conv columns are in channels-last (kh, kw, cin) order, so a group of 4 consecutive columns
is 4 consecutive input channels at one kernel position whenever cin is a multiple of 4.
"""
from __future__ import annotations

import numpy as np

GROUP = 4
KEEP = 2


def eligible(site) -> tuple[bool, str]:
    """(True, "") when the site can be made 2:4; else (False, why it stays dense)."""
    if site.op_type == "Conv":
        if site.group != 1:
            return False, (f"grouped conv (group={site.group}): 2:4 kernels need a plain GEMM reduction; "
                           "left dense")
        cin = int(site.weight_shape[1])
        if cin % GROUP:
            return False, (f"2:4 needs the conv's input channels to be a multiple of {GROUP} "
                           f"(this one has {cin}); left dense")
        return True, ""
    if site.op_type in ("MatMul", "Gemm"):
        if len(site.weight_shape) != 2:
            return False, f"2:4 needs a 2-D weight (this one is {len(site.weight_shape)}-D); left dense"
        k = site.reduction_size
        if k % GROUP:
            return False, f"2:4 needs the reduction size to be a multiple of {GROUP} (K={k}); left dense"
        return True, ""
    return False, f"{site.op_type} has no 2:4 form; left dense"


def _groups(matrix: np.ndarray) -> np.ndarray:
    m = np.asarray(matrix)
    if m.ndim != 2:
        raise ValueError(f"expected an (outputs x reduction) matrix, got shape {m.shape}")
    if m.shape[1] % GROUP:
        raise ValueError(f"the reduction size {m.shape[1]} is not a multiple of {GROUP}: no 2:4 pattern")
    return m.reshape(m.shape[0], m.shape[1] // GROUP, GROUP)


def mask_2_4(matrix: np.ndarray) -> np.ndarray:
    """Boolean keep-mask: the 2 largest |w| in each group of 4 consecutive columns.

    Ties go to the earlier column (stable sort), so the mask is deterministic; NaN counts as largest.
    """
    groups = _groups(matrix)
    mag = np.abs(groups.astype(np.float64))
    mag = np.where(np.isnan(mag), np.inf, mag)
    order = np.argsort(-mag, axis=-1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :KEEP], True, axis=-1)
    return keep.reshape(np.shape(matrix))


def prune_2_4(site, source: np.ndarray) -> np.ndarray:
    """The site's weight, 2:4 magnitude-pruned along its reduction axis, in the source's layout and dtype.

    Kept values are the source's own (the mask goes back through `from_matrix`; values never take a
    round trip through float32).
    """
    ok, why = eligible(site)
    if not ok:
        raise ValueError(f"site '{site.name}' cannot be made 2:4: {why}")
    source = np.asarray(source)
    keep = mask_2_4(site.to_matrix(source))
    keep_src = site.from_matrix(keep.astype(np.float32)) != 0
    if keep_src.shape != source.shape:
        raise ValueError(f"mask layout {keep_src.shape} does not match the weight {source.shape}")
    return np.where(keep_src, source, np.zeros((), dtype=source.dtype)).astype(source.dtype)


def satisfies_2_4(site, source: np.ndarray) -> bool:
    """True when every group of 4 consecutive weights along the site's reduction axis has >= 2 zeros."""
    if not eligible(site)[0]:
        return False
    groups = _groups(site.to_matrix(np.asarray(source)))
    return bool((np.count_nonzero(groups, axis=-1) <= KEEP).all())


def group_nonzeros(site, source: np.ndarray) -> np.ndarray:
    """Non-zeros per group of 4, shape (outputs, reduction / 4): for tests and diagnostics."""
    return np.count_nonzero(_groups(site.to_matrix(np.asarray(source))), axis=-1)
