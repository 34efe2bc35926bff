"""Array maths shared by the subspace methods: truncated SVD, QR, subspace iteration, Tucker.

Layer 1 of the library (see DESIGN.md): plain functions, arrays in and arrays out, no pytrees
beyond the :class:`Tucker` named tuple and no Flax. Names follow the papers.

* Matrices: :func:`energy_rank` (explained-variance rank, WASI Eqs. 5-7),
  :func:`truncated_svd`, :func:`svd_rank`, :func:`qr_positive` (QR with diag(R) >= 0),
  :func:`subspace_iteration` (WASI's per-step weight update), :func:`range_finder`
  (randomized range finder) and :func:`procrustes` (orthogonal Procrustes).
* Tensors: :func:`unfold`, :func:`fold`, :func:`mode_product`, the :class:`Tucker` format with
  :func:`tucker_reconstruct` and :func:`tucker_size`, exact :func:`hosvd`, and the warm-started
  fixed-rank Tucker used by WASI for activations: :func:`hosvd_init` then :func:`hosvd_step`.

Conventions:

* All arithmetic runs in float32 whatever the input dtype (bfloat16 inputs are cast in);
  returned factors are float32. :func:`unfold` and :func:`fold` only move data and keep dtype.
  Matrix products use ``Precision.HIGHEST`` so GPUs/TPUs do not silently drop to TF32/bf16.
* Functions that *decide a rank from the data* (``eps``) run on the host: they need concrete
  arrays (a ``TypeError`` is raised for tracers), check finiteness and return Python ints.
* Fixed-rank functions are jittable with static ranks (ranks are Python ints or come from
  array shapes); they validate shapes only, never values. They are already wrapped in
  ``jax.jit`` here, so an eager call compiles once per shape and an outer ``jit`` inlines them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Tucker", "energy_rank", "fold", "hosvd", "hosvd_init", "hosvd_step", "mode_product",
    "procrustes", "qr_positive", "range_finder", "subspace_iteration", "svd_rank",
    "truncated_svd", "tucker_reconstruct", "tucker_size", "unfold",
]

_HI = jax.lax.Precision.HIGHEST
_jit_static = functools.partial(functools.partial, jax.jit)


def _mm(a, b):
    return jnp.matmul(a, b, precision=_HI)


def _f32(a) -> jax.Array:
    return jnp.asarray(a).astype(jnp.float32)


def _check_concrete(a, fn: str) -> None:
    if isinstance(a, jax.core.Tracer):
        raise TypeError(
            f"{fn} chooses a rank from the data and must run on the host with a concrete array, "
            "not under jit/vmap/grad (got a tracer); use the fixed-rank variant inside traced code")


def _check_finite(a: jax.Array) -> None:
    bad = int(a.size - np.count_nonzero(np.isfinite(np.asarray(a))))
    if bad:
        raise ValueError(f"matrix contains NaN or Inf ({bad} non-finite entries)")


def _check_matrix(a, name: str = "matrix") -> None:
    if jnp.ndim(a) != 2:
        raise ValueError(f"expected a 2-D {name}, got shape {tuple(jnp.shape(a))}")


def _check_rank(rank, shape: tuple[int, ...]) -> int:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise TypeError(f"rank must be a Python int, got {type(rank).__name__} {rank!r}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if rank > min(shape):
        raise ValueError(f"rank {rank} exceeds min(m, n) = {min(shape)} for a {shape} matrix")
    return int(rank)


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not hasattr(eps, "__float__"):
        raise TypeError(f"eps must be a Python float, got {type(eps).__name__} {eps!r}")
    value = float(eps)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"eps must be in (0, 1], got {eps!r}")
    return value


def _gram_apply(xm: jax.Array, u: jax.Array) -> jax.Array:
    """X X^T U with the cheaper matmul order (shapes are static, so this is decided at trace)."""
    m, n = xm.shape
    k = u.shape[1]
    if 2 * n * k <= m * (n + k):
        return _mm(xm, _mm(xm.T, u))
    return _mm(_mm(xm, xm.T), u)


def energy_rank(s, eps: float) -> int:
    """Smallest rank K whose leading singular values explain a fraction ``eps`` of the energy.

    K is the smallest k with ``c_k >= eps * c_n``, where ``c_k = sum_{j<=k} s_j**2`` is the
    float64 running sum over the values sorted descending. Because the threshold is compared
    with the same running sum that defines the total, ``eps = 1`` returns exactly the number of
    values that contribute to the energy: ``len(s)`` for a full-rank spectrum and the count of
    non-zero values when the tail is exactly zero. An all-zero spectrum gives 1.

    Args:
        s: 1-D singular values (non-negative, finite; any order, sorted internally).
        eps: Explained-variance threshold in (0, 1].

    Returns:
        K as a Python int in [1, len(s)].

    Raises:
        ValueError: ``eps`` outside (0, 1], ``s`` not 1-D/empty, negative or non-finite.
        TypeError: ``s`` is a tracer (this is a host-side function).

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import linalg
        >>> s = jnp.array([3.0, 2.0, 1.0, 0.0])
        >>> linalg.energy_rank(s, 0.9), linalg.energy_rank(s, 1.0)
        (2, 3)

    References:
        WASI, Eqs. 5-7, arXiv 2510.09160.
    """
    eps = _check_eps(eps)
    _check_concrete(s, "energy_rank")
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"expected a non-empty 1-D array of singular values, got shape {s.shape}")
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError("singular values must be finite and non-negative")
    c = np.cumsum(np.sort(s)[::-1] ** 2)
    if c[-1] == 0.0:
        return 1
    return int(np.searchsorted(c, eps * c[-1], side="left")) + 1


@_jit_static(static_argnames="rank")
def svd_rank(a, rank: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rank-``rank`` truncated thin SVD in float32; jittable with a static ``rank``.

    Validates shapes only (no finiteness check, so it works on tracers).

    Args:
        a: 2-D matrix (m, n), any float dtype.
        rank: Python int in [1, min(m, n)].

    Returns:
        ``(u, s, vt)`` float32 of shapes (m, rank), (rank,), (rank, n), s descending.

    Raises:
        ValueError: ``a`` not 2-D or ``rank`` out of range.
        TypeError: ``rank`` not an int.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import linalg
        >>> u, s, vt = linalg.svd_rank(jnp.ones((4, 3), jnp.bfloat16), 1)
        >>> u.shape, round(float(s[0]), 3), vt.shape, u.dtype
        ((4, 1), 3.464, (1, 3), dtype('float32'))
    """
    _check_matrix(a)
    rank = _check_rank(rank, tuple(a.shape))
    u, s, vt = jnp.linalg.svd(_f32(a), full_matrices=False)
    return u[:, :rank], s[:rank], vt[:rank]


def truncated_svd(a, rank: int | None = None, *, eps: float | None = None):
    """Truncated SVD at a fixed rank or at an explained-variance threshold (host-side).

    With ``eps`` the rank is ``energy_rank(s, eps)`` (WASI's initial factorisation: L = u,
    R = diag(s) vt). Checks that ``a`` is finite, so ``a`` must be concrete; inside ``jit`` use
    :func:`svd_rank`.

    Args:
        a: 2-D matrix (m, n), any float dtype (computed in float32).
        rank: Rank K in [1, min(m, n)]; exactly one of ``rank`` and ``eps``.
        eps: Explained-variance threshold in (0, 1].

    Returns:
        ``(u, s, vt)`` float32 of shapes (m, K), (K,), (K, n).

    Raises:
        ValueError: both or neither of rank/eps, bad eps or rank, ``a`` not 2-D, NaN/Inf in ``a``.
        TypeError: ``a`` is a tracer, or ``rank`` is not an int.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import linalg
        >>> a = jnp.diag(jnp.array([3.0, 2.0, 1.0]))
        >>> u, s, vt = linalg.truncated_svd(a, eps=0.9)
        >>> u.shape, s.round(4).tolist(), vt.shape
        ((3, 2), [3.0, 2.0], (2, 3))

    References:
        WASI, Sec. 3.2 (Eqs. 5-7), arXiv 2510.09160.
    """
    if (rank is None) == (eps is None):
        raise ValueError("pass exactly one of rank and eps")
    _check_matrix(a)
    if rank is not None:
        _check_rank(rank, tuple(a.shape))
    else:
        _check_eps(eps)
    _check_concrete(a, "truncated_svd")
    a = _f32(a)
    _check_finite(a)
    u, s, vt = jnp.linalg.svd(a, full_matrices=False)
    k = rank if rank is not None else energy_rank(s, eps)
    return u[:, :k], s[:k], vt[:k]


@jax.jit
def qr_positive(a) -> tuple[jax.Array, jax.Array]:
    """Reduced QR in float32 with a non-negative diagonal of R (unique for full column rank).

    Householder QR returns R with diagonal entries of either sign; flipping the matching columns
    of Q and rows of R makes the factorisation unique, so a basis refreshed by QR keeps the sign
    convention of the previous one (the WASI sign-flip pitfall). Jittable.

    Args:
        a: Array (..., m, k) with m >= k; leading dims are batch dims.

    Returns:
        ``(q, r)`` float32 of shapes (..., m, k) and (..., k, k) with ``q @ r == a``,
        orthonormal columns in ``q`` and ``diag(r) >= 0``.

    Raises:
        ValueError: fewer than 2 dims or m < k.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import linalg
        >>> q, r = linalg.qr_positive(jnp.array([[3.0, 1.0], [4.0, 2.0]]))
        >>> print(r.round(3))
        [[5.  2.2]
         [0.  0.4]]

    References:
        WASI, Algorithm 1 (orthogonalisation step), arXiv 2510.09160.
    """
    if jnp.ndim(a) < 2 or a.shape[-2] < a.shape[-1]:
        raise ValueError(f"expected an (..., m, k) array with m >= k, got shape {jnp.shape(a)}")
    q, r = jnp.linalg.qr(_f32(a), mode="reduced")
    sign = jnp.where(jnp.diagonal(r, axis1=-2, axis2=-1) < 0, -1.0, 1.0).astype(jnp.float32)
    return q * sign[..., None, :], r * sign[..., :, None]


@jax.jit
def subspace_iteration(a, q_prev) -> tuple[jax.Array, jax.Array]:
    """One warm-started subspace-iteration step on the left subspace of ``a``; jittable.

    ``q = orth(a a^T q_prev)`` (via :func:`qr_positive`) and ``r = q^T a``, so ``q @ r`` is the
    projection of ``a`` onto the tracked k-dim subspace. Recomputing ``r`` after
    orthonormalising (instead of ``r = q_prev^T a`` as in the reference code) removes the
    sign-flip error spike at the SVD -> iteration hand-over.

    Args:
        a: Matrix (m, n), e.g. a weight in (out, in) layout; any float dtype.
        q_prev: Previous orthonormal basis (m, k), k <= m.

    Returns:
        ``(q, r)`` float32 of shapes (m, k) and (k, n).

    Raises:
        ValueError: shapes not (m, n) and (m, k) with k <= m.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import linalg
        >>> a = jnp.diag(jnp.array([3.0, 2.0, 1.0]))
        >>> q, r = linalg.subspace_iteration(a, jnp.eye(3)[:, :2])
        >>> best_rank_2 = jnp.diag(jnp.array([3.0, 2.0, 0.0]))
        >>> q.shape, r.shape, bool(jnp.allclose(q @ r, best_rank_2, atol=1e-5))
        ((3, 2), (2, 3), True)

    References:
        WASI, Algorithm 1 and Sec. 3.2, arXiv 2510.09160.
    """
    _check_matrix(a)
    _check_matrix(q_prev, "basis")
    if q_prev.shape[0] != a.shape[0] or q_prev.shape[1] > a.shape[0]:
        raise ValueError(f"basis shape {q_prev.shape} does not fit a {a.shape} matrix "
                         f"(need ({a.shape[0]}, k) with k <= {a.shape[0]})")
    a = _f32(a)
    q, _ = qr_positive(_gram_apply(a, _f32(q_prev)))
    return q, _mm(q.T, a)


@_jit_static(static_argnames=("rank", "oversample", "power_iters"))
def range_finder(key, a, rank: int, *, oversample: int = 0, power_iters: int = 0) -> jax.Array:
    """Randomized range finder: an orthonormal basis (m, rank) for the range of ``a``.

    Draws a Gaussian test matrix with ``rank + oversample`` columns (capped at min(m, n)),
    applies ``power_iters`` power steps with re-orthonormalisation, and, when oversampling,
    keeps the best ``rank`` directions via a small SVD of ``q^T a``. Jittable (static ints).

    Args:
        key: ``jax.random`` key.
        a: Matrix (m, n), any float dtype.
        rank: Number of columns returned, in [1, min(m, n)].
        oversample: Extra random columns (>= 0).
        power_iters: Power iterations (>= 0).

    Returns:
        Float32 (m, rank) with orthonormal columns.

    Raises:
        ValueError: ``a`` not 2-D, rank out of range, negative oversample/power_iters.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import linalg
        >>> a = jnp.outer(jnp.arange(30.0), jnp.arange(20.0))  # rank 1
        >>> q = linalg.range_finder(jax.random.key(0), a, 5)
        >>> q.shape, bool(jnp.allclose(q @ (q.T @ a), a, rtol=1e-5, atol=1e-2))
        ((30, 5), True)

    References:
        Halko, Martinsson, Tropp, Algorithms 4.1 and 4.4, arXiv 0909.4061.
    """
    _check_matrix(a)
    rank = _check_rank(rank, tuple(a.shape))
    if oversample < 0 or power_iters < 0:
        raise ValueError(
            f"oversample and power_iters must be >= 0, got {oversample} and {power_iters}")
    a = _f32(a)
    ell = min(rank + oversample, *a.shape)
    q, _ = qr_positive(_mm(a, jax.random.normal(key, (a.shape[1], ell), jnp.float32)))
    for _ in range(power_iters):
        z, _ = qr_positive(_mm(a.T, q))
        q, _ = qr_positive(_mm(a, z))
    if ell > rank:
        u, _, _ = jnp.linalg.svd(_mm(q.T, a), full_matrices=False)
        q = _mm(q, u[:, :rank])
    return q


@jax.jit
def procrustes(a, b) -> jax.Array:
    """Orthogonal Procrustes: the orthogonal R minimising ``||a @ R - b||_F``; jittable.

    ``R = U V^T`` from the SVD ``a^T b = U S V^T``.

    Args:
        a: Matrix (m, k).
        b: Matrix (m, k).

    Returns:
        Float32 orthogonal (k, k).

    Raises:
        ValueError: ``a`` and ``b`` not 2-D of the same shape.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import linalg
        >>> a = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
        >>> print(linalg.procrustes(a, a[:, ::-1]).round(3) + 0.0)
        [[0. 1.]
         [1. 0.]]

    References:
        Schoenemann, "A generalized solution of the orthogonal Procrustes problem",
        Psychometrika 1966.
    """
    _check_matrix(a)
    if jnp.shape(b) != jnp.shape(a):
        raise ValueError(f"a and b must have the same 2-D shape, got {a.shape} and {jnp.shape(b)}")
    u, _, vt = jnp.linalg.svd(_mm(_f32(a).T, _f32(b)), full_matrices=False)
    return _mm(u, vt)


# ---------------------------------------------------------------------------------------------
# Tensors: unfolding, n-mode product, Tucker / HOSVD.


def _mode(mode: int, ndim: int) -> int:
    if not -ndim <= mode < ndim:
        raise ValueError(f"mode {mode} out of range for a {ndim}-D tensor")
    return mode % ndim


def unfold(x, mode: int) -> jax.Array:
    """Mode-n unfolding X_(n): mode moved to the front, the others flattened in order.

    Args:
        x: Tensor of any order >= 1.
        mode: Axis (negative counts from the end).

    Returns:
        Matrix (x.shape[mode], prod(other dims)) of x's dtype.

    Raises:
        ValueError: mode out of range.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import linalg
        >>> linalg.unfold(jnp.zeros((2, 3, 4)), 1).shape
        (3, 8)
    """
    mode = _mode(mode, jnp.ndim(x))
    return jnp.moveaxis(jnp.asarray(x), mode, 0).reshape(x.shape[mode], -1)


def fold(m, mode: int, shape: Sequence[int]) -> jax.Array:
    """Inverse of :func:`unfold`: ``fold(unfold(x, n), n, x.shape) == x``.

    Args:
        m: Matrix (shape[mode], prod(other dims)).
        mode: Axis the rows of ``m`` belong to.
        shape: Shape of the tensor to rebuild.

    Returns:
        Tensor of ``shape`` and m's dtype.

    Raises:
        ValueError: mode out of range or ``m`` of the wrong shape.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import linalg
        >>> x = jnp.arange(24.0).reshape(2, 3, 4)
        >>> bool((linalg.fold(linalg.unfold(x, 2), 2, x.shape) == x).all())
        True
    """
    shape = tuple(int(d) for d in shape)
    mode = _mode(mode, len(shape))
    rest = shape[:mode] + shape[mode + 1:]
    if jnp.shape(m) != (shape[mode], math.prod(rest)):
        raise ValueError(f"cannot fold a {jnp.shape(m)} matrix along mode {mode} into {shape}")
    return jnp.moveaxis(jnp.reshape(m, (shape[mode],) + rest), 0, mode)


def mode_product(x, m, mode: int) -> jax.Array:
    """n-mode product ``x ×_n m`` in float32: axis ``mode`` (size I_n) is replaced by J.

    Args:
        x: Tensor of any order.
        m: Matrix (J, I_n).
        mode: Axis of ``x`` to contract.

    Returns:
        Float32 tensor with ``shape[mode] = J``.

    Raises:
        ValueError: mode out of range, ``m`` not 2-D or ``m.shape[1] != x.shape[mode]``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import linalg
        >>> linalg.mode_product(jnp.ones((2, 3, 4)), jnp.ones((5, 3)), 1).shape
        (2, 5, 4)

    References:
        De Lathauwer, De Moor, Vandewalle, "A multilinear singular value decomposition",
        SIAM J. Matrix Anal. Appl. 21(4), 2000.
    """
    mode = _mode(mode, jnp.ndim(x))
    _check_matrix(m)
    if m.shape[1] != x.shape[mode]:
        raise ValueError(f"matrix {m.shape} cannot multiply mode {mode} of size {x.shape[mode]}")
    return jnp.moveaxis(jnp.tensordot(_f32(m), _f32(x), axes=(1, mode), precision=_HI), 0, mode)


class Tucker(NamedTuple):
    """Tucker tensor ``core ×_1 U_1 ×_2 ... ×_d U_d`` (a pytree; float32 fields).

    Attributes:
        core: Core tensor (r_1, ..., r_d).
        factors: Tuple of d orthonormal factors, ``factors[n]`` of shape (dim_n, r_n).
    """

    core: jax.Array
    factors: tuple[jax.Array, ...]


@jax.jit
def tucker_reconstruct(t: Tucker) -> jax.Array:
    """Dense tensor ``core ×_1 U_1 ... ×_d U_d`` in float32.

    Args:
        t: A :class:`Tucker`.

    Returns:
        Float32 tensor (dim_1, ..., dim_d).

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import linalg
        >>> t = linalg.Tucker(jnp.ones((1, 1)), (jnp.ones((2, 1)), jnp.ones((3, 1))))
        >>> linalg.tucker_reconstruct(t).shape
        (2, 3)
    """
    x = t.core
    for n, u in enumerate(t.factors):
        x = mode_product(x, u, n)
    return _f32(x)


def tucker_size(t: Tucker) -> int:
    """Stored elements of a Tucker tensor: ``prod(r_n) + sum(dim_n * r_n)``.

    Args:
        t: A :class:`Tucker` (arrays or ``jax.ShapeDtypeStruct``s).

    Returns:
        Python int.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import linalg
        >>> t = linalg.Tucker(jnp.ones((2, 3)), (jnp.ones((10, 2)), jnp.ones((20, 3))))
        >>> linalg.tucker_size(t)
        86

    References:
        WASI, Sec. 3.3 (activation memory), arXiv 2510.09160.
    """
    return math.prod(t.core.shape) + sum(u.shape[0] * u.shape[1] for u in t.factors)


@jax.jit
def _project_core(x: jax.Array, factors: Sequence[jax.Array]) -> jax.Array:
    for n, u in enumerate(factors):
        x = mode_product(x, u.T, n)
    return x


def _mode_caps(shape: tuple[int, ...]) -> list[int]:
    total = math.prod(shape)
    return [min(d, total // d) if d else 0 for d in shape]


def _check_ranks(ranks, shape: tuple[int, ...]) -> list[int]:
    ranks = list(ranks)
    if len(ranks) != len(shape):
        raise ValueError(f"expected {len(shape)} ranks (one per mode of a {shape} tensor), "
                         f"got {len(ranks)}: {tuple(ranks)}")
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
            raise ValueError(f"ranks must be positive ints, got {tuple(ranks)}")
    return [min(int(r), c) for r, c in zip(ranks, _mode_caps(shape))]


def hosvd(x, *, eps: float | None = None, ranks: Sequence[int] | None = None) -> Tucker:
    """Exact (truncated) HOSVD: U_n = leading left singular vectors of X_(n) of the original x.

    Pass exactly one of ``ranks`` (one per mode; jittable) or ``eps`` (rank per mode is
    ``energy_rank`` of the mode-n singular values; host-side, ``x`` must be concrete and
    finite). Ranks are capped at ``min(dim_n, prod(other dims))``. Core
    ``G = x ×_1 U_1^T ... ×_d U_d^T``.

    Args:
        x: Tensor of order d >= 1, any float dtype (computed in float32).
        eps: Per-mode explained-variance threshold in (0, 1].
        ranks: Sequence of d positive ints.

    Returns:
        A float32 :class:`Tucker`.

    Raises:
        ValueError: both/neither of eps and ranks, wrong number of ranks, bad eps, NaN/Inf.
        TypeError: ``eps`` given and ``x`` is a tracer.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import linalg
        >>> x = jnp.arange(480.0).reshape(6, 8, 10) % 7
        >>> t = linalg.hosvd(x, ranks=(6, 8, 10))
        >>> t.core.shape, bool(jnp.allclose(linalg.tucker_reconstruct(t), x, atol=1e-4))
        ((6, 8, 10), True)

    References:
        De Lathauwer, De Moor, Vandewalle, SIAM J. Matrix Anal. Appl. 21(4), 2000;
        WASI rank calibration, Sec. 3.3, arXiv 2510.09160.
    """
    if (eps is None) == (ranks is None):
        raise ValueError("pass exactly one of eps and ranks")
    if ranks is not None:
        return _hosvd_fixed(x, tuple(_check_ranks(ranks, tuple(jnp.shape(x)))))
    eps = _check_eps(eps)
    _check_concrete(x, "hosvd(eps=...)")
    x = _f32(x)
    _check_finite(x)
    factors = tuple(u[:, :energy_rank(s, eps)] for u, s in _mode_svds(x))
    return Tucker(_project_core(x, factors), factors)


@jax.jit
def _mode_svds(x: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
    return [jnp.linalg.svd(unfold(x, n), full_matrices=False)[:2] for n in range(x.ndim)]


@_jit_static(static_argnames="ranks")
def _hosvd_fixed(x, ranks: tuple[int, ...]) -> Tucker:
    x = _f32(x)
    factors = tuple(u[:, :r] for (u, _), r in zip(_mode_svds(x), ranks))
    return Tucker(_project_core(x, factors), factors)


@jax.jit
def hosvd_step(x, factors_prev: Sequence[jax.Array]) -> Tucker:
    """Warm-started fixed-rank Tucker: one subspace-iteration step per mode; jittable.

    ``U_n = orth(X_(n) X_(n)^T U_n_prev)`` (sign-fixed QR), each from the original x (plain
    HOSVD, not sequential), then ``G = x ×_1 U_1^T ... ×_d U_d^T``. Ranks come from the shapes
    of ``factors_prev``. This is WASI's per-step activation compression.

    Args:
        x: Tensor (dim_1, ..., dim_d), any float dtype.
        factors_prev: d matrices, ``factors_prev[n]`` of shape (dim_n, r_n), r_n <= dim_n.

    Returns:
        A float32 :class:`Tucker` with the same ranks.

    Raises:
        ValueError: wrong number or shapes of factors.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import linalg
        >>> x = jnp.arange(480.0).reshape(6, 8, 10) % 7
        >>> t = linalg.hosvd_init(jax.random.key(1), x, (2, 3, 4))
        >>> t = linalg.hosvd_step(x, t.factors)  # jitted; call it once per step
        >>> t.core.shape, [u.shape for u in t.factors]
        ((2, 3, 4), [(6, 2), (8, 3), (10, 4)])

    References:
        WASI, Sec. 3.3 (activation subspace iteration), arXiv 2510.09160.
    """
    shape = tuple(jnp.shape(x))
    if len(factors_prev) != len(shape):
        raise ValueError(f"expected {len(shape)} factors for a {shape} tensor, "
                         f"got {len(factors_prev)}")
    for n, u in enumerate(factors_prev):
        if jnp.ndim(u) != 2 or u.shape[0] != shape[n] or u.shape[1] > shape[n]:
            raise ValueError(f"factor {n} has shape {jnp.shape(u)}, expected ({shape[n]}, r) "
                             f"with r <= {shape[n]}")
    x = _f32(x)
    factors = tuple(qr_positive(_gram_apply(unfold(x, n), _f32(u)))[0]
                    for n, u in enumerate(factors_prev))
    return Tucker(_project_core(x, factors), factors)


def hosvd_init(key, x, ranks: Sequence[int]) -> Tucker:
    """First warm-start Tucker step: a randomized range finder per mode (no power step).

    ``U_n = orth(X_(n) Omega_n)`` with a Gaussian ``Omega_n`` (one key per mode via
    ``fold_in``); ranks are capped at ``min(dim_n, prod(other dims))``. Jittable with static
    ``ranks``. Follow with :func:`hosvd_step`.

    Args:
        key: ``jax.random`` key.
        x: Tensor (dim_1, ..., dim_d), any float dtype.
        ranks: Sequence of d positive ints.

    Returns:
        A float32 :class:`Tucker`.

    Raises:
        ValueError: wrong number of ranks or non-positive ranks.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import linalg
        >>> x = jnp.arange(480.0).reshape(6, 8, 10) % 7
        >>> t = linalg.hosvd_init(jax.random.key(0), x, (2, 3, 4))
        >>> t.core.shape, [u.shape for u in t.factors]
        ((2, 3, 4), [(6, 2), (8, 3), (10, 4)])

    References:
        Halko, Martinsson, Tropp, arXiv 0909.4061; WASI, Sec. 3.3, arXiv 2510.09160.
    """
    return _hosvd_init(key, x, tuple(_check_ranks(ranks, tuple(jnp.shape(x)))))


@_jit_static(static_argnames="ranks")
def _hosvd_init(key, x, ranks: tuple[int, ...]) -> Tucker:
    x = _f32(x)
    factors = tuple(range_finder(jax.random.fold_in(key, n), unfold(x, n), r)
                    for n, r in enumerate(ranks))
    return Tucker(_project_core(x, factors), factors)
