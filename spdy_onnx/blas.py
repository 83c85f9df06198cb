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
import warnings

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


def set_threads(n: int) -> None:
    """Threads of the products below (torch's intra-op pool); spdy_onnx.early_database narrows them while
    an engine compiles on the other core."""
    torch = _torch()
    if torch is not None:
        torch.set_num_threads(max(1, int(n)))


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b for 2-D arrays of one floating dtype; the result is a new numpy array of that dtype."""
    torch = _torch()
    a, b = np.asarray(a), np.asarray(b)
    if torch is None or a.dtype != b.dtype or a.dtype not in (np.float32, np.float64) or a.ndim != 2 or b.ndim != 2:
        return a @ b
    return torch.matmul(_as_tensor(torch, a), _as_tensor(torch, b)).numpy()


def gram(x: np.ndarray) -> np.ndarray:
    """x^T x (x: rows x features), in x's dtype, exactly symmetric.

    On torch, in column panels: each panel's products with itself and the columns after it, mirrored,
    so about 5/8 of the full product's arithmetic (torch has no symmetric rank-k update). On the AMD
    EPYC this took a 2,604 x 3,072 float32 gram from 253 to 155 ms and a 10,416 x 768 one from 60 to
    43 ms (8 and 4 panels; benchmarks/gram_panels.py); the Hessians of every site are made of these.
    """
    torch = _torch()
    x = np.asarray(x)
    k = x.shape[1] if x.ndim == 2 else 0
    if torch is None or x.dtype not in (np.float32, np.float64) or k < 2 * GRAM_PANEL_MIN:
        return matmul(x.T, x)
    t = _as_tensor(torch, x)
    panels = max(4, k // 384)
    width = max(GRAM_PANEL_MIN, -(-k // panels))
    out = torch.empty((k, k), dtype=t.dtype)
    for i in range(0, k, width):
        block = torch.matmul(t[:, i:i + width].T, t[:, i:])
        w = min(width, k - i)
        out[i:i + w, i + w:] = block[:, w:]
        out[i + w:, i:i + w] = block[:, w:].T
        diagonal = block[:, :w]                   # its own product is not exactly symmetric
        out[i:i + w, i:i + w] = torch.triu(diagonal) + torch.triu(diagonal, 1).T
    return out.numpy()


GRAM_PANEL_MIN = 128   # narrower inputs take one product: the panels' overhead is not worth it there


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


class KeptProduct:
    """x -> (P @ b) read at P's kept entries, where P is the rows x K matrix holding the values x at fixed
    kept entries (`kept`: row-major flat indices, ascending) and zeros elsewhere.

    For a least-squares refit on a mask: at 85% sparsity and beyond most of a dense GEMM multiplies
    zeros, and MKL's sparse x dense product (torch's CSR) does the same work in a fraction of the time
    (BERT-base's shapes, the AMD EPYC: 1.4-3.9x faster from 88.3% to 97%, about even at 84.6%, slower
    under about 80%; benchmarks/refit_sparse.py). numpy without torch: the dense product of the scattered matrix.
    """

    def __init__(self, kept: np.ndarray, shape: tuple[int, int], b: np.ndarray):
        self.kept = np.asarray(kept, dtype=np.int64)
        self.shape = (int(shape[0]), int(shape[1]))
        self.rows = self.kept // self.shape[1]
        self.torch = _torch()
        if self.torch is None:
            self.b = np.asarray(b)
            return
        torch = self.torch
        crow = np.searchsorted(self.rows, np.arange(self.shape[0] + 1)).astype(np.int64)
        self.crow = torch.from_numpy(crow)
        self.cols = torch.from_numpy(self.kept % self.shape[1])
        self.take = torch.from_numpy(self.kept)
        # a copy in torch's own (64-byte aligned) memory: MKL's sparse product ran 4.9x slower on the
        # 16-byte alignment numpy gave this matrix (the last line of benchmarks/refit_sparse.py)
        self.b = _as_tensor(torch, np.asarray(b)).clone()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x)
        if self.torch is None:
            full = np.zeros(self.shape[0] * self.shape[1], dtype=x.dtype)
            full[self.kept] = x
            return (full.reshape(self.shape) @ self.b).ravel()[self.kept]
        torch = self.torch
        with warnings.catch_warnings():   # "CSR support is in beta": the product used here is not
            warnings.simplefilter("ignore", UserWarning)
            p = torch.sparse_csr_tensor(self.crow, self.cols, torch.from_numpy(x), size=self.shape,
                                        check_invariants=False)   # from np.flatnonzero: sorted and in range
        return torch.sparse.mm(p, self.b).view(-1)[self.take].numpy()
