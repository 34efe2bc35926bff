"""Numerical tests for subspace_jax.linalg: exactness, optimality, convergence and errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subspace_jax.linalg
from subspace_jax import linalg


def _normal(seed, *shape):
    """Gaussian float64 numpy array from jax.random.key(seed) (one compile for every shape)."""
    flat = np.asarray(jax.random.normal(jax.random.key(seed), (4096,)), np.float64)
    return flat[: math.prod(shape)].reshape(shape)


def _orth(seed, m, k):
    return np.linalg.qr(_normal(seed, m, k))[0]


def _with_spectrum(seed, s, m, n):
    """float32 U diag(s) V^T with random orthonormal U (m, k), V (n, k)."""
    s = np.asarray(s, np.float64)
    return jnp.asarray((_orth(seed, m, s.size) * s) @ _orth(seed + 1000, n, s.size).T, jnp.float32)


def _tucker_np(core, factors):
    for n, u in enumerate(factors):
        core = np.moveaxis(np.tensordot(u, core, axes=(1, n)), 0, n)
    return core


def _tucker_tensor(seed, shape, ranks):
    """float32 tensor of exact multilinear rank `ranks`."""
    factors = [_orth(seed + 1 + n, d, r) for n, (d, r) in enumerate(zip(shape, ranks))]
    return jnp.asarray(_tucker_np(_normal(seed, *ranks), factors), jnp.float32)


def _decaying_tensor(seed, shape, decay=0.6, noise=1e-3):
    """float32 tensor whose mode spectra decay geometrically (core scaled by decay**i) + noise."""
    core = _normal(seed, *shape)
    for n, d in enumerate(shape):
        core = core * (decay ** np.arange(d)).reshape((-1,) + (1,) * (len(shape) - n - 1))
    x = _tucker_np(core, [_orth(seed + 1 + n, d, d) for n, d in enumerate(shape)])
    return jnp.asarray(x + noise * _normal(seed + 99, *shape), jnp.float32)


def _np(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


def _rel(a, b):
    a, b = _np(a), _np(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _assert_orthonormal(q, atol=1e-5):
    q = _np(q)
    np.testing.assert_allclose(q.T @ q, np.eye(q.shape[1]), atol=atol)


def _projector_distance(q, u):
    q, u = _np(q), _np(u)
    return float(np.linalg.norm(q @ q.T - u @ u.T, ord=2))


# --- energy rank and truncated SVD ------------------------------------------------------------

SPECTRUM = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])


@pytest.mark.parametrize("eps", [0.1, 0.4, 0.7, 0.9, 0.95, 0.99, 0.999])
def test_energy_rank_is_smallest_k_reaching_eps(eps):
    ratio = np.cumsum(SPECTRUM**2) / np.sum(SPECTRUM**2)
    k = linalg.energy_rank(jnp.asarray(SPECTRUM, jnp.float32), eps)
    assert ratio[k - 1] >= eps
    assert k == 1 or ratio[k - 2] < eps
    u, s, vt = linalg.truncated_svd(_with_spectrum(1, SPECTRUM, 12, 9), eps=eps)
    assert u.shape == (12, k) and s.shape == (k,) and vt.shape == (k, 9)
    np.testing.assert_allclose(s, SPECTRUM[:k], rtol=1e-5)


def test_energy_rank_eps_one_counts_all_contributing_values():
    # A spectrum where a naive float32 cumsum / sum never reaches 1.0 (it would return 65).
    s = np.sort(0.1 + 10 * np.abs(_normal(4, 64)))[::-1].astype(np.float32)
    naive = np.cumsum(s * s) / np.sum(s * s)
    assert naive.dtype == np.float32 and naive[-1] < 1.0
    assert linalg.energy_rank(s, 1.0) == 64
    assert linalg.energy_rank(jnp.asarray(s), 1.0) == 64
    # Same in float64: pairwise np.sum exceeds the sequential cumsum for this spectrum.
    s = np.sort(0.1 + 10 * np.abs(_normal(4, 200)))[::-1].astype(np.float32).astype(np.float64)
    assert np.sum(s**2) > np.cumsum(s**2)[-1]
    assert linalg.energy_rank(s, 1.0) == 200
    assert linalg.energy_rank(np.array([3.0, 2.0, 1.0, 0.0, 0.0]), 1.0) == 3
    assert linalg.energy_rank(np.zeros(4), 0.5) == 1
    assert linalg.energy_rank(np.array([1.0, 3.0, 2.0]), 0.6) == 1  # sorted internally
    sv = jnp.linalg.svd(jnp.asarray(_normal(3, 20, 16), jnp.float32), compute_uv=False)
    assert linalg.energy_rank(sv, 1.0) == 16


def test_truncated_svd_full_rank_reconstructs():
    a = jnp.asarray(_normal(4, 12, 9), jnp.float32)
    u, s, vt = linalg.truncated_svd(a, 9)
    assert u.dtype == s.dtype == vt.dtype == jnp.float32
    assert _rel((_np(u) * _np(s)) @ _np(vt), a) < 1e-5
    _assert_orthonormal(u)
    _assert_orthonormal(_np(vt).T)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_truncation_error_equals_discarded_energy(k):
    a = _with_spectrum(5, SPECTRUM, 12, 9)
    u, s, vt = linalg.truncated_svd(a, k)
    err2 = np.sum((_np(a) - (_np(u) * _np(s)) @ _np(vt)) ** 2)
    np.testing.assert_allclose(err2, np.sum(SPECTRUM[k:] ** 2), rtol=1e-4)


def test_svd_rank_jits_and_matches_truncated_svd():
    a = jnp.asarray(_normal(6, 12, 9), jnp.bfloat16)
    u, s, vt = jax.jit(linalg.svd_rank, static_argnums=1)(a, 3)
    assert u.dtype == s.dtype == vt.dtype == jnp.float32 and u.shape == (12, 3)
    u2, s2, vt2 = linalg.truncated_svd(a, 3)
    np.testing.assert_allclose((_np(u) * _np(s)) @ _np(vt), (_np(u2) * _np(s2)) @ _np(vt2),
                               atol=1e-5)


# --- QR with positive diagonal ----------------------------------------------------------------

def test_qr_positive_properties_and_uniqueness():
    a = _normal(7, 30, 5)
    q, r = map(_np, linalg.qr_positive(jnp.asarray(a, jnp.float32)))
    assert np.all(np.diag(r) >= 0)
    _assert_orthonormal(q)
    np.testing.assert_allclose(q @ r, a, atol=1e-5)
    np.testing.assert_array_equal(np.tril(r, -1), 0.0)
    # The unique positive-diagonal QR: R = chol(a^T a)^T, Q = a R^{-1}.
    r_ref = np.linalg.cholesky(a.T @ a).T
    np.testing.assert_allclose(r, r_ref, atol=1e-4)
    np.testing.assert_allclose(q, np.linalg.solve(r_ref.T, a.T).T, atol=1e-4)


def test_qr_positive_fixes_signs_of_plain_qr():
    a = jnp.array([[3.0, 1.0], [4.0, 2.0]])
    _, r_plain = jnp.linalg.qr(a)
    assert bool(jnp.any(jnp.diag(r_plain) < 0))  # Householder convention: r_11 = -5
    q, r = linalg.qr_positive(a)
    np.testing.assert_allclose(r, [[5.0, 2.2], [0.0, 0.4]], atol=1e-5)
    np.testing.assert_allclose(q, [[0.6, -0.8], [0.8, 0.6]], atol=1e-6)
    # Flipping an input column flips the same column of q; diag(r) stays positive.
    q2, r2 = linalg.qr_positive(a * jnp.array([-1.0, 1.0]))
    np.testing.assert_allclose(r2, [[5.0, -2.2], [0.0, 0.4]], atol=1e-5)
    np.testing.assert_allclose(q2, [[-0.6, -0.8], [-0.8, 0.6]], atol=1e-6)


def test_qr_positive_batched_and_jit_bf16():
    a = jnp.asarray(_normal(8, 3, 30, 5), jnp.bfloat16)
    q, r = jax.jit(linalg.qr_positive)(a)
    assert q.shape == (3, 30, 5) and r.shape == (3, 5, 5) and q.dtype == r.dtype == jnp.float32
    assert np.all(np.diagonal(_np(r), axis1=-2, axis2=-1) >= 0)
    np.testing.assert_allclose(_np(q) @ _np(r), _np(a), atol=1e-5)
    for i in range(3):
        q_i, _ = np.linalg.qr(_np(a)[i])
        q_i = q_i * np.sign(np.diag(np.linalg.qr(_np(a)[i])[1]))
        np.testing.assert_allclose(_np(q)[i], q_i, atol=1e-5)


# --- subspace iteration -----------------------------------------------------------------------

GAP_SPECTRUM = np.array([10.0, 9.0, 8.0, 7.0, 6.0, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.2])


def test_subspace_iteration_converges_to_top_k():
    k = 5
    a = _with_spectrum(9, GAP_SPECTRUM, 30, 20)
    u = _np(a) @ np.linalg.svd(_np(a))[2][:k].T / GAP_SPECTRUM[:k]
    best = math.sqrt(np.sum(GAP_SPECTRUM[k:] ** 2))
    q = jnp.asarray(_orth(10, 30, k), jnp.float32)
    dists, errs = [], []
    for _ in range(15):
        q, r = linalg.subspace_iteration(a, q)
        dists.append(_projector_distance(q, u))
        errs.append(float(np.linalg.norm(_np(a) - _np(q) @ _np(r))))
    print("projector distance:", [f"{d:.1e}" for d in dists])
    print("error / optimal:", [f"{e / best:.4f}" for e in errs])
    assert all(d1 <= d0 + 1e-6 for d0, d1 in zip(dists, dists[1:]))
    assert dists[0] > 0.1 and dists[-1] < 1e-4
    _assert_orthonormal(q)
    np.testing.assert_allclose(errs[-1], best, rtol=1e-4)


def test_subspace_iteration_after_svd_start_has_no_sign_flip_spike():
    k = 5
    w = _with_spectrum(11, GAP_SPECTRUM, 30, 20)
    u, s, vt = linalg.truncated_svd(w, k)
    trunc = _rel((_np(u) * _np(s)) @ _np(vt), w)
    # A small training update, then the first subspace-iteration step from the SVD basis.
    w1 = _np(w) + 1e-3 * _normal(12, 30, 20)
    q, r = linalg.subspace_iteration(jnp.asarray(w1, jnp.float32), u)
    ours = _rel(_np(q) @ _np(r), w1)
    best = math.sqrt(np.sum(np.linalg.svd(w1, compute_uv=False)[k:] ** 2) / np.sum(w1**2))
    # Reference-code variant: R from the previous basis, plain (sign-free) Householder QR.
    r_old = _np(u).T @ w1
    l_plain = np.linalg.qr(w1 @ r_old.T)[0]
    naive = _rel(l_plain @ r_old, w1)
    print(f"truncation {trunc:.4f}, ours {ours:.4f}, optimal {best:.4f}, reference {naive:.4f}")
    np.testing.assert_allclose(ours, best, rtol=1e-3)
    np.testing.assert_allclose(ours, trunc, rtol=2e-2)
    assert naive > 2 * ours  # the spike that recomputing r after the QR removes


def test_subspace_iteration_jit_bf16_and_gram_order():
    a = jnp.asarray(_normal(13, 30, 20), jnp.bfloat16)
    q0 = jnp.asarray(_orth(14, 30, 3), jnp.float32)
    q, r = jax.jit(linalg.subspace_iteration)(a, q0)
    assert q.dtype == r.dtype == jnp.float32 and q.shape == (30, 3) and r.shape == (3, 20)
    _assert_orthonormal(q)
    # Both matmul orders of the Gram product give orth(a a^T q0): a (a^T q) for the (30, 20)
    # matrix with k = 3, (a a^T) q for a (6, 20) matrix with k = 5 (fewer flops there).
    for mat, basis in [(_np(a), _np(q0)), (_np(a)[:6], _orth(15, 6, 5))]:
        got, _ = linalg.subspace_iteration(jnp.asarray(mat, jnp.float32), basis)
        ref_q, ref_r = np.linalg.qr(mat @ (mat.T @ basis))
        np.testing.assert_allclose(_np(got), ref_q * np.sign(np.diag(ref_r)), atol=1e-4)


# --- randomized range finder ------------------------------------------------------------------

def test_range_finder_captures_exact_low_rank():
    a = jnp.asarray(_normal(15, 30, 4) @ _normal(16, 4, 20), jnp.float32)
    q = linalg.range_finder(jax.random.key(16), a, 4)
    assert q.shape == (30, 4)
    _assert_orthonormal(q)
    assert _rel(_np(q) @ (_np(q).T @ _np(a)), a) < 1e-5


def test_range_finder_oversampling_and_power_iterations_near_optimal():
    s = 0.7 ** np.arange(20)
    a = _with_spectrum(17, s, 30, 20)
    optimal = math.sqrt(np.sum(s[5:] ** 2))
    key = jax.random.key(18)

    def err(q):
        return float(np.linalg.norm(_np(a) - _np(q) @ (_np(q).T @ _np(a))))

    plain = err(linalg.range_finder(key, a, 5))
    oversampled = err(linalg.range_finder(key, a, 5, oversample=10))
    q = linalg.range_finder(key, a.astype(jnp.bfloat16), 5, oversample=5, power_iters=2)
    assert q.shape == (30, 5) and q.dtype == jnp.float32
    _assert_orthonormal(q)
    print(f"optimal {optimal:.4f}, plain {plain:.4f}, oversampled {oversampled:.4f}, "
          f"oversampled+power {err(q):.4f}")
    assert optimal <= oversampled < 0.8 * plain
    assert err(q) < 1.02 * optimal


# --- procrustes -------------------------------------------------------------------------------

def test_procrustes_recovers_rotation():
    a = _normal(19, 30, 5)
    r_true = _orth(20, 5, 5)
    b = jnp.asarray(a @ r_true, jnp.float32)
    r = jax.jit(linalg.procrustes)(jnp.asarray(a, jnp.float32), b)
    assert r.dtype == jnp.float32
    np.testing.assert_allclose(r, r_true, atol=1e-5)
    _assert_orthonormal(r)


# --- unfold / fold / mode product -------------------------------------------------------------

def test_unfold_fold_mode_product_definitions():
    xn = _normal(21, 4, 5, 6, 7)
    x = jnp.asarray(xn, jnp.float32)
    for n in range(4):
        m = linalg.unfold(x, n)
        np.testing.assert_allclose(m, np.moveaxis(xn, n, 0).reshape(x.shape[n], -1), atol=1e-6)
        np.testing.assert_array_equal(linalg.fold(m, n, x.shape), x)
    assert linalg.unfold(x, -1).shape == (7, 120)
    mat = _normal(22, 3, 6)
    y = linalg.mode_product(x, jnp.asarray(mat, jnp.float32), 2)
    assert y.shape == (4, 5, 3, 7)
    np.testing.assert_allclose(y, np.einsum("abcd,jc->abjd", xn, mat), atol=1e-4)


# --- HOSVD / Tucker ---------------------------------------------------------------------------

SHAPES = [((6, 8, 10), (2, 3, 4)), ((4, 5, 6, 7), (2, 2, 3, 3))]


@pytest.mark.parametrize("shape,_", SHAPES)
def test_hosvd_full_rank_is_exact(shape, _):
    x = jnp.asarray(_normal(23, *shape), jnp.float32)
    t = linalg.hosvd(x, ranks=shape)
    assert _rel(linalg.tucker_reconstruct(t), x) < 1e-5
    for u, d in zip(t.factors, shape):
        assert u.shape == (d, d)
        _assert_orthonormal(u)


@pytest.mark.parametrize("shape,ranks", SHAPES)
def test_hosvd_low_multilinear_rank_is_exact(shape, ranks):
    x = _tucker_tensor(24, shape, ranks)
    t = linalg.hosvd(x, ranks=ranks)
    assert t.core.shape == ranks
    assert _rel(linalg.tucker_reconstruct(t), x) < 1e-5
    assert _rel(_tucker_np(_np(t.core), [_np(u) for u in t.factors]), x) < 1e-5


def test_hosvd_caps_ranks_and_tucker_size():
    x = jnp.asarray(_normal(25, 2, 3, 20), jnp.float32)
    t = linalg.hosvd(x, ranks=[5, 5, 50])
    assert [u.shape for u in t.factors] == [(2, 2), (3, 3), (20, 6)]
    assert t.core.shape == (2, 3, 6)
    assert _rel(linalg.tucker_reconstruct(t), x) < 1e-5
    assert linalg.tucker_size(t) == 2 * 3 * 6 + 2 * 2 + 3 * 3 + 20 * 6
    abstract = jax.eval_shape(lambda v: linalg.hosvd(v, ranks=(1, 2, 3)), x)
    assert linalg.tucker_size(abstract) == 6 + 2 + 6 + 60
    t0 = linalg.hosvd_init(jax.random.key(0), x, (5, 5, 50))
    assert [u.shape for u in t0.factors] == [(2, 2), (3, 3), (20, 6)]
    assert _rel(linalg.tucker_reconstruct(t0), x) < 1e-5


@pytest.mark.parametrize("eps,ranks", [(0.5, (1, 1, 2, 1)), (0.9, (3, 3, 4, 4)),
                                       (0.98, (4, 5, 5, 6))])
def test_hosvd_eps_ranks_are_per_mode_energy_ranks(eps, ranks):
    shape = (4, 5, 6, 7)
    x = _decaying_tensor(26, shape, decay=0.7)
    t = linalg.hosvd(x, eps=eps)
    expected = []
    for n in range(4):
        s = np.linalg.svd(np.moveaxis(_np(x), n, 0).reshape(shape[n], -1), compute_uv=False)
        ratio = np.cumsum(s**2) / np.sum(s**2)
        expected.append(int(np.argmax(ratio >= eps)) + 1)
    print(f"eps {eps}: ranks {t.core.shape}")
    assert t.core.shape == tuple(expected) == ranks
    assert [u.shape for u in t.factors] == list(zip(shape, expected))
    for u in t.factors:
        _assert_orthonormal(u)


@pytest.mark.parametrize("shape,ranks", SHAPES)
def test_hosvd_step_converges_to_exact_hosvd(shape, ranks):
    x = _decaying_tensor(27, shape, decay=0.5)
    exact = _rel(linalg.tucker_reconstruct(linalg.hosvd(x, ranks=ranks)), x)
    t = linalg.hosvd_init(jax.random.key(29), x, ranks)
    errs = [_rel(linalg.tucker_reconstruct(t), x)]
    for _ in range(10):
        t = linalg.hosvd_step(x, t.factors)
        errs.append(_rel(linalg.tucker_reconstruct(t), x))
    print(f"exact HOSVD {exact:.5f}; warm steps:", [f"{e:.5f}" for e in errs])
    assert all(e1 <= e0 + 1e-5 for e0, e1 in zip(errs, errs[1:]))
    assert errs[0] > 1.05 * exact  # the random start is clearly worse ...
    assert errs[-1] <= 1.01 * exact  # ... and warm steps reach the exact HOSVD error
    assert t.core.shape == ranks
    for u in t.factors:
        _assert_orthonormal(u)


def test_hosvd_step_jit_bf16_no_retrace():
    traces = []

    def f(x, factors):
        traces.append(1)
        return linalg.hosvd_step(x, factors)

    step = jax.jit(f)
    x = jnp.asarray(_normal(30, 6, 8, 10), jnp.bfloat16)
    t = linalg.hosvd_init(jax.random.key(31), x.astype(jnp.float32), (2, 3, 4))
    for i in range(3):
        t = step(x * (i + 1.0), t.factors)
    assert len(traces) == 1
    assert t.core.dtype == jnp.float32 and all(u.dtype == jnp.float32 for u in t.factors)
    for u in t.factors:
        _assert_orthonormal(u)


# --- errors -----------------------------------------------------------------------------------

M = np.ones((4, 6), np.float32)


def _with(value, *idx):
    m = M.copy()
    for i in idx:
        m[i] = value
    return m


@pytest.mark.parametrize("call,match", [
    (lambda: linalg.energy_rank(M[0], 0.0), r"eps must be in \(0, 1\], got 0.0"),
    (lambda: linalg.energy_rank(M[0], 1.5), r"eps must be in \(0, 1\], got 1.5"),
    (lambda: linalg.energy_rank(M, 0.5), r"1-D array of singular values, got shape \(4, 6\)"),
    (lambda: linalg.truncated_svd(M, eps=1.5), r"eps must be in \(0, 1\], got 1.5"),
    (lambda: linalg.truncated_svd(M, 5), r"rank 5 exceeds min\(m, n\) = 4 for a \(4, 6\) matrix"),
    (lambda: linalg.truncated_svd(M, 0), r"rank must be >= 1, got 0"),
    (lambda: linalg.truncated_svd(np.ones((2, 3, 4)), 1), r"2-D matrix, got shape \(2, 3, 4\)"),
    (lambda: linalg.truncated_svd(_with(np.nan, (0, 0), (1, 1)), 1),
     r"NaN or Inf \(2 non-finite entries\)"),
    (lambda: linalg.truncated_svd(_with(np.inf, (2, 3)), eps=0.5), r"\(1 non-finite entries\)"),
    (lambda: linalg.truncated_svd(M, 2, eps=0.5), "exactly one of rank and eps"),
    (lambda: linalg.truncated_svd(M), "exactly one of rank and eps"),
    (lambda: linalg.svd_rank(M, 7), r"rank 7 exceeds"),
    (lambda: linalg.qr_positive(M), r"m >= k, got shape \(4, 6\)"),
    (lambda: linalg.subspace_iteration(M, np.ones((5, 2))), r"basis shape \(5, 2\)"),
    (lambda: linalg.range_finder(jax.random.key(0), M, 9), r"rank 9 exceeds"),
    (lambda: linalg.range_finder(jax.random.key(0), M, 2, oversample=-1), "must be >= 0"),
    (lambda: linalg.procrustes(M, M.T), r"same 2-D shape"),
    (lambda: linalg.hosvd(np.ones((2, 3, 4)), ranks=(1, 2)), r"expected 3 ranks .* got 2"),
    (lambda: linalg.hosvd(np.ones((2, 3, 4)), ranks=(1, 0, 2)), "positive ints"),
    (lambda: linalg.hosvd(np.ones((2, 3, 4))), "exactly one of eps and ranks"),
    (lambda: linalg.hosvd(np.ones((2, 3, 4)), eps=0.0), r"eps must be in \(0, 1\]"),
    (lambda: linalg.hosvd(_with(np.inf, (0, 0)), eps=0.9), "1 non-finite"),
    (lambda: linalg.hosvd_init(jax.random.key(0), M, (1, 1, 1)), "expected 2 ranks"),
    (lambda: linalg.hosvd_step(M, (np.ones((4, 1)),)), "expected 2 factors"),
    (lambda: linalg.hosvd_step(M, (np.ones((4, 1)), np.ones((5, 1)))),
     r"factor 1 has shape \(5, 1\)"),
    (lambda: linalg.unfold(M, 2), "mode 2 out of range for a 2-D tensor"),
    (lambda: linalg.fold(np.ones((3, 3)), 0, (3, 4)), r"cannot fold a \(3, 3\) matrix"),
    (lambda: linalg.mode_product(M, np.ones((4, 2)), 1), r"matrix \(4, 2\) cannot multiply"),
])
def test_bad_input_raises_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_host_side_functions_reject_tracers_and_bad_types():
    with pytest.raises(TypeError, match="concrete array"):
        jax.jit(lambda a: linalg.truncated_svd(a, eps=0.9))(M)
    with pytest.raises(TypeError, match="concrete array"):
        jax.jit(lambda x: linalg.hosvd(x, eps=0.9))(np.ones((2, 3, 4)))
    with pytest.raises(TypeError, match="concrete array"):
        jax.jit(lambda s: linalg.energy_rank(s, 0.9))(M[0])
    with pytest.raises(TypeError, match="rank must be a Python int, got float"):
        linalg.truncated_svd(M, 2.0)
    with pytest.raises(TypeError, match="eps must be a Python float"):
        linalg.energy_rank(M[0], "0.5")
