"""Dense matrix products and factorisations for the numerical core, on PyTorch's BLAS when installed.

numpy's wheel bundles an OpenBLAS that picks its kernels from the CPU model. On a virtual CPU it does
not recognise it falls back to a generic SSE kernel: on the Intel Xeon of commit 5371d2a's benchmark (AVX-512,
2 cores) it reported "Prescott" and ran a float32 GEMM at about a fifth of PyTorch's speed
(benchmarks/blas_speed.py, results in benchmarks/results/blas_speed_*). The OBS database, the Hessians and the layer-wise
refits are made of such products, so they go through here; the results are numpy arrays either way.
"""
from __future__ import annotations

import functools
import logging

import numpy as np

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _torch():
    try:
        import torch
    except ImportError:
        log.debug("PyTorch not installed: dense products run on numpy's BLAS")
        return None
    return torch


def backend() -> str:
    """'torch' or 'numpy': which library the products below run on."""
    return "torch" if _torch() is not None else "numpy"


def _as_tensor(torch, a: np.ndarray):
    a = np.asarray(a)
    if any(s < 0 for s in a.strides) or not a.flags.writeable:
        a = np.array(a)                   # torch.from_numpy takes neither negative strides nor read-only views
    return torch.from_numpy(a)


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b for 2-D arrays of one floating dtype; the result is a new numpy array of that dtype."""
    torch = _torch()
    a, b = np.asarray(a), np.asarray(b)
    if torch is None or a.dtype != b.dtype or a.dtype not in (np.float32, np.float64) or a.ndim != 2 or b.ndim != 2:
        return a @ b
    return torch.matmul(_as_tensor(torch, a), _as_tensor(torch, b)).numpy()


def gram(x: np.ndarray) -> np.ndarray:
    """x^T x (x: rows x features), in x's dtype."""
    return matmul(np.asarray(x).T, x)


def cholesky(a: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor; raises np.linalg.LinAlgError when a is not positive definite."""
    torch = _torch()
    a = np.asarray(a)
    if torch is None or a.dtype not in (np.float32, np.float64):
        return np.linalg.cholesky(a)
    lower, info = torch.linalg.cholesky_ex(_as_tensor(torch, a))
    if int(info) != 0:
        raise np.linalg.LinAlgError("matrix is not positive definite")
    return lower.numpy()


def inverse_lower(lower: np.ndarray) -> np.ndarray:
    """The inverse of a lower-triangular matrix."""
    torch = _torch()
    lower = np.asarray(lower)
    if torch is None or lower.dtype not in (np.float32, np.float64):
        return np.linalg.inv(lower)
    t = _as_tensor(torch, lower)
    eye = torch.eye(t.shape[0], dtype=t.dtype)
    return torch.linalg.solve_triangular(t, eye, upper=False).numpy()


def subtract_product(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """c -= a @ b in place (c: a writable float view, e.g. the columns still to sweep). On torch the GEMM
    accumulates into c in one pass instead of writing the product and then subtracting it."""
    torch = _torch()
    a, b = np.asarray(a), np.asarray(b)
    if (torch is None or not (c.dtype == a.dtype == b.dtype) or c.dtype not in (np.float32, np.float64)
            or not c.flags.writeable or min(c.strides) <= 0):
        c -= a @ b
        return
    torch.Tensor.addmm_(torch.from_numpy(c), _as_tensor(torch, a), _as_tensor(torch, b), alpha=-1)
