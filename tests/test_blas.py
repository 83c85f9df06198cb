"""The dense products the numerical core runs on PyTorch's BLAS match numpy's, with or without PyTorch."""
import numpy as np
import pytest

from spdy_onnx import blas, obs


@pytest.fixture(params=["torch", "numpy"])
def backend(request, monkeypatch):
    if request.param == "numpy":
        monkeypatch.setattr(blas, "_torch", lambda: None)
    elif blas.backend() != "torch":
        pytest.skip("PyTorch not installed")
    return request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matmul_matches_numpy_on_views(backend, dtype):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((37, 53)).astype(dtype)
    b = rng.standard_normal((53, 29)).astype(dtype)
    ro = b.copy()
    ro.flags.writeable = False
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for x, y in [(a, b), (a.T.T, ro), (a[:, ::-1], b[::-1]), (np.asfortranarray(a), b[:, 3:17])]:
        got = blas.matmul(x, y)
        assert got.dtype == dtype
        np.testing.assert_allclose(got, x @ y, rtol=tol, atol=tol)
    np.testing.assert_allclose(blas.gram(a), a.T @ a, rtol=tol, atol=tol * 10)


def test_factorisations(backend):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 40))
    h = x.T @ x
    lower = blas.cholesky(h)
    np.testing.assert_allclose(lower @ lower.T, h, rtol=1e-9, atol=1e-9)
    assert np.allclose(np.triu(lower, 1), 0)
    np.testing.assert_allclose(blas.inverse_lower(lower) @ lower, np.eye(40), atol=1e-9)
    with pytest.raises(np.linalg.LinAlgError):
        blas.cholesky(-h)


def test_obs_database_same_on_both_backends(monkeypatch):
    """The OBS sweep and refit give the same pruned weights whichever library multiplies."""
    if blas.backend() != "torch":
        pytest.skip("PyTorch not installed")
    rng = np.random.default_rng(2)
    x = rng.standard_normal((512, 48)) @ rng.standard_normal((48, 48))
    h = x.T @ x / 512
    w = rng.standard_normal((24, 48)).astype(np.float32)
    chol, dead = obs.inverse_cholesky(h)
    fast = obs.best_reconstruction_levels(w, h, chol, dead, [0.5, 0.9])
    monkeypatch.setattr(blas, "_torch", lambda: None)
    chol2, dead2 = obs.inverse_cholesky(h)
    slow = obs.best_reconstruction_levels(w, h, chol2, dead2, [0.5, 0.9])
    assert ((fast == 0) == (slow == 0)).mean() > 0.99         # same masks up to float ties
    errs = [obs.reconstruction_error(w, f, h) for f in fast], [obs.reconstruction_error(w, s, h) for s in slow]
    np.testing.assert_allclose(errs[0], errs[1], rtol=1e-3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_subtract_product_in_place_on_a_column_view(backend, dtype):
    rng = np.random.default_rng(3)
    whole = rng.standard_normal((40, 30)).astype(dtype)
    a = rng.standard_normal((40, 6)).astype(dtype)
    b = rng.standard_normal((6, 30)).astype(dtype)
    expected = whole.copy()
    expected[:, 12:] -= a @ b[:, 12:]
    blas.subtract_product(whole[:, 12:], a, b[:, 12:])      # the view's rows are strided in `whole`
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(whole, expected, rtol=tol, atol=tol)


def test_kept_product_reads_the_product_at_the_kept_entries(backend):
    """The refit's sparse product: (P @ B) at P's kept entries, with rows that keep nothing and a B in
    numpy's own (not 64-byte aligned) memory."""
    rng = np.random.default_rng(4)
    rows, k = 9, 31
    mask = rng.random((rows, k)) < 0.15
    mask[3] = False                                   # a row with no kept weight
    mask[5, :] = True                                 # a row that keeps everything
    b = rng.standard_normal((k + 1, k)).astype(np.float32)[1:]   # an offset view
    kept = np.flatnonzero(mask.ravel())
    product = blas.KeptProduct(kept, (rows, k), b)
    for _ in range(2):                                # the same structure, new values
        x = rng.standard_normal(kept.size).astype(np.float32)
        p = np.zeros((rows, k), dtype=np.float32)
        p.ravel()[kept] = x
        np.testing.assert_allclose(product(x), (p @ b).ravel()[kept], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_wide_gram_in_panels_is_exact_and_symmetric(backend, dtype):
    """Inputs wide enough for the panelled gram (and a width the panels do not divide), on views."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((700, 389)).astype(dtype)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for view in (x, x[:, ::-1], np.asfortranarray(x), x[::2]):
        got = blas.gram(view)
        assert got.dtype == dtype and got.shape == (389, 389)
        np.testing.assert_array_equal(got, got.T)
        ref = view.astype(np.float64).T @ view.astype(np.float64)
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * np.abs(ref).max())
