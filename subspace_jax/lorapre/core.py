"""LoRA-Pre array maths: low-rank moment factors and their closed-form updates.

Arrays in, arrays out, float32, any leading batch axes (``@`` broadcasts over them). A
moment of a ``p x q`` matrix is kept as :class:`Factors` ``B (p, r) @ A (r, q)``. The
exponential moving average ``m <- beta m + (1 - beta) g`` is one gradient step on
``0.5 ||m - g||^2``; restricted to ``m = B A`` and solved for one factor with the other
fixed, a Newton step of size ``gamma`` moves each factor toward its exact least-squares
value (:func:`newton_step`). Each factor decays by ``1 - gamma`` per step, so the product
decays by ``(1 - gamma)^2``: matching Adam's ``beta`` gives :func:`gamma_for`.

References:
    Wang, Liang, He, Wang, Tan, "Taming Momentum: Rethinking Optimizer States Through
    Low-Rank Approximation", ICLR 2026, arXiv 2602.24283 (Theorem 3.1, Appendix B.1).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["Factors", "init_factors", "reconstruct", "newton_step", "gamma_for",
           "unbiased_gamma", "adam_step", "row_chunk", "newton_schulz", "rebalance",
           "NS_COEFFS"]

# Quintic Newton-Schulz coefficients of Muon (Jordan et al., 2024): the slope at zero is
# pushed high so that five steps bring every singular value near 1.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
_FLOOR = 1e-30  # keeps the damped Gram invertible when a factor is exactly zero (step 1)


class Factors(NamedTuple):
    """A low-rank moment ``B @ A`` of a ``(..., p, q)`` matrix, in float32.

    Attributes:
        B: ``(..., p, r)`` left factor (starts at zero).
        A: ``(..., r, q)`` right factor (starts Gaussian).
    """

    B: jax.Array
    A: jax.Array


def _t(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def init_factors(key: jax.Array, shape: tuple[int, ...], rank: int,
                 init_std: float = 0.02) -> Factors:
    """Factors of a zero moment: ``B = 0``, ``A ~ N(0, init_std^2)``.

    ``A`` must be non-degenerate: the first ``B`` step projects the gradient onto its rows.

    Args:
        key: PRNG key for ``A``.
        shape: ``(..., p, q)``, the matrix (with leading batch axes) the moment stands for.
        rank: ``r``.
        init_std: standard deviation of ``A``.

    Returns:
        :class:`Factors` with ``B (..., p, r)`` and ``A (..., r, q)``.

    Examples:
        >>> import jax
        >>> f = init_factors(jax.random.key(0), (6, 5), 2)
        >>> f.B.shape, f.A.shape, float(abs(reconstruct(f)).max())
        ((6, 2), (2, 5), 0.0)
    """
    *batch, p, q = shape
    b = jnp.zeros((*batch, p, rank), jnp.float32)
    a = init_std * jax.random.normal(key, (*batch, rank, q), jnp.float32)
    return Factors(B=b, A=a)


def reconstruct(f: Factors) -> jax.Array:
    """The moment ``B @ A``, ``(..., p, q)``.

    Examples:
        >>> import jax.numpy as jnp
        >>> reconstruct(Factors(jnp.ones((3, 1)), 2 * jnp.ones((1, 4)))).sum()
        Array(24., dtype=float32)
    """
    return f.B @ f.A


def _damped_solve(gram: jax.Array, rhs: jax.Array, damping) -> jax.Array:
    """``(G + lambda I)^{-1} rhs`` with ``lambda = damping * mean(diag G) + floor``.

    The damping is relative to the Gram's scale, so the step is invariant under
    ``B -> c B, A -> A / c``; the floor keeps ``G = 0`` (a zero factor) solvable.
    """
    r = gram.shape[-1]
    diag = jnp.diagonal(gram, axis1=-2, axis2=-1)
    lam = damping * diag.mean(-1)[..., None, None] + _FLOOR
    return jnp.linalg.solve(gram + lam * jnp.eye(r, dtype=gram.dtype), rhs)


def newton_step(f: Factors, target: jax.Array, gamma, damping=1e-6, *,
                sequential: bool = True) -> Factors:
    """One damped-Newton step of both factors toward ``target``.

    ``B <- (1 - gamma) B + gamma T A^T (A A^T)^{-1}``, then
    ``A <- (1 - gamma) A + gamma (B^T B)^{-1} B^T T`` with the new ``B``: each factor moves
    toward its exact least-squares fit to ``T`` given the other. Only ``r x r`` solves; no
    SVD, no autodiff. Then :func:`rebalance` makes ``B`` orthonormal.

    The sequential (Gauss-Seidel) order makes the product an exact EMA,
    ``B'A' = beta BA + (1 - beta) T`` with ``beta = (1 - gamma)^2``, whenever ``T`` lies
    in the factors' row and column spaces. The simultaneous order (``sequential=False``,
    both right-hand sides from the old factors) adds ``gamma^2 T (BA)^+ T``, which is
    quadratic in the gradient: on zero-mean gradient noise it does not track the EMA.

    Args:
        f: current factors.
        target: ``(..., p, q)`` float32 matrix to fit (``g`` for the first moment,
            ``|g|`` for the second).
        gamma: step size in ``[0, 1]`` (:func:`gamma_for`).
        damping: relative Tikhonov damping of the ``r x r`` Gram matrices.
        sequential: update ``A`` from the new ``B`` (default) or from the old one.

    Returns:
        The new :class:`Factors`.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> t = jnp.outer(jnp.arange(1.0, 5.0), jnp.ones(3))  # rank 1
        >>> f = newton_step(init_factors(jax.random.key(0), t.shape, 1), t, gamma=1.0)
        >>> bool(jnp.allclose(reconstruct(f), t, rtol=1e-4))
        True
    """
    old = f.B
    return _newton_finish(f, f.A @ _t(target),
                          lambda b: _t(b if sequential else old) @ target, gamma, damping)


def _newton_finish(f: Factors, a_t: jax.Array, b_t, gamma, damping) -> Factors:
    """:func:`newton_step` given its two products with the target: ``a_t = A T^T``
    (``(..., r, p)``) and ``b_t(B_new) = B_new^T T`` (``(..., r, q)``)."""
    keep = 1 - gamma
    b = keep * f.B + gamma * _t(_damped_solve(f.A @ _t(f.A), a_t, damping))  # T A^T (AA^T)^-1
    a_ls = _damped_solve(_t(b) @ b, b_t(b), damping)  # (B^T B)^-1 B^T T
    return rebalance(Factors(B=b, A=keep * f.A + gamma * a_ls))


#: Elements of ``g`` one chunk of :func:`adam_step` holds (``rows * q``): 1 MiB of float32.
CHUNK_ELEMENTS = 2**18


def row_chunk(p: int, q: int, elements: int = CHUNK_ELEMENTS) -> int:
    """Rows per chunk of :func:`adam_step` for a ``p x q`` matrix: the largest divisor of
    ``p`` with ``rows * q <= elements`` (at least half that many rows; else that many rows,
    and the last chunk overlaps its neighbour), and never fewer than 16 rows (or ``p``).

    Examples:
        >>> row_chunk(640, 2048), row_chunk(64, 48), row_chunk(131, 4096)  # 131 is prime
        (128, 64, 64)
        >>> row_chunk(640, 262144)  # a vocabulary-wide matrix: 16 rows, not 1
        16
    """
    cap = min(p, max(16, elements // max(q, 1)))  # at least 16 rows (a vocabulary-wide q)
    best = max(d for d in range(1, cap + 1) if p % d == 0)
    return best if 2 * best >= cap else cap


def adam_step(g: jax.Array, mu: Factors, nu: Factors, *, w1, w2, b1, b2, count, eps,
              gamma1, gamma2, damping, rows: int | None = None, scale: Any = 1.0,
              ) -> tuple[jax.Array, Factors, Factors]:
    """LoRA-Pre Adam's step direction and both factor pairs' Newton steps, in row chunks.

    The same numbers as ``step = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)`` with
    ``m = w1 M + (1 - b1) g``, ``v = w2 P^2 + (1 - b2) g^2``, then
    ``newton_step(mu, g, gamma1)`` and ``newton_step(nu, |g|, gamma2)``, but with no
    ``p x q`` temporary: one pass over ``rows x q`` chunks of ``g`` builds the step rows and
    ``A g^T``, ``A_v |g|^T`` (their columns are ``g``'s rows); a second accumulates
    ``B'^T g`` and ``B_v'^T |g|`` with the new left factors. Adam's own update holds no
    ``p x q`` temporary either; the dense products ``M = m_B m_A`` and ``P`` exist one
    chunk at a time.

    Args:
        g: ``(p, q)`` float32 gradient.
        mu, nu: factors of ``g`` and of ``|g|``.
        w1, w2, b1, b2, count, eps: the step's weights, decays, step ``t`` and epsilon.
        gamma1, gamma2: the factor steps.
        damping: relative damping of the ``r x r`` solves.
        rows: rows per chunk (None: :func:`row_chunk`).
        scale: a scalar the gradient is multiplied by, chunk by chunk (a global-norm clip's
            factor: ``adam_step(g, ..., scale=s)`` is ``adam_step(s * g, ...)`` without the
            scaled copy of ``g``, which the chunk loop could not fuse).

    Returns:
        ``(step, new mu, new nu)``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
        >>> g = jax.random.normal(k1, (12, 10))
        >>> mu, nu = init_factors(k2, g.shape, 3), init_factors(k3, g.shape, 3)
        >>> kw = dict(w1=0.9, w2=0.95, b1=0.9, b2=0.95, count=1.0, eps=1e-8, gamma1=1.0,
        ...           gamma2=1.0, damping=1e-6)
        >>> step, mu1, nu1 = adam_step(g, mu, nu, rows=5, **kw)  # 12 rows: 3 chunks, overlapping
        >>> bool(jnp.allclose(step, g / jnp.abs(g), atol=1e-5))  # step 1 is Adam's
        True
        >>> bool(jnp.allclose(reconstruct(mu1), reconstruct(newton_step(mu, g, 1.0)), atol=1e-5))
        True
    """
    p, q = g.shape
    r = mu.B.shape[-1]
    rows = min(p, row_chunk(p, q) if rows is None else rows)
    n = -(-p // rows)
    # chunk i holds rows [start_i, start_i + rows); the last one is moved back to end at p
    # (it overlaps its neighbour, which writes the same step rows and columns again, and
    # whose rows it leaves out of the sums): no padded copy of g
    starts = jnp.minimum(jnp.arange(n) * rows, p - rows)
    take = lambda x, start: jax.lax.dynamic_slice_in_dim(x, start, rows, axis=0)  # noqa: E731
    scale = jnp.asarray(scale, g.dtype)
    take_g = lambda start: scale * take(g, start)  # noqa: E731

    def first(carry, start):
        step, a_g, a_abs = carry
        gi, bm, bv = take_g(start), take(mu.B, start), take(nu.B, start)
        m = w1 * (bm @ mu.A) + (1 - b1) * gi
        v = w2 * jnp.square(bv @ nu.A) + (1 - b2) * jnp.square(gi)
        rows_step = (m / (1 - b1 ** count)) / (jnp.sqrt(v / (1 - b2 ** count)) + eps)
        put = jax.lax.dynamic_update_slice_in_dim
        return (put(step, rows_step, start, 0), put(a_g, mu.A @ _t(gi), start, 1),
                put(a_abs, nu.A @ _t(jnp.abs(gi)), start, 1)), None

    zeros = (jnp.zeros_like(g), jnp.zeros((r, p), g.dtype), jnp.zeros((r, p), g.dtype))
    (step, a_g, a_abs), _ = jax.lax.scan(first, zeros, starts)

    def with_new(b: jax.Array, absolute: bool) -> jax.Array:
        def second(acc, xs):
            i, start = xs
            gi = take_g(start)
            fresh = (start + jnp.arange(rows) >= i * rows)[:, None]  # not in chunk i - 1
            bi = jnp.where(fresh, take(b, start), 0.0)
            return acc + _t(bi) @ (jnp.abs(gi) if absolute else gi), None
        return jax.lax.scan(second, jnp.zeros((r, q), g.dtype), (jnp.arange(n), starts))[0]

    return (step,
            _newton_finish(mu, a_g, lambda b: with_new(b, False), gamma1, damping),
            _newton_finish(nu, a_abs, lambda b: with_new(b, True), gamma2, damping))


def rebalance(f: Factors) -> Factors:
    """The same product with orthonormal ``B``: ``B = Q R -> (Q, R A)`` (when ``p >= r``).

    The Newton steps are equivariant under ``(B, A) -> (B M, M^{-1} A)``, so this gauge
    choice changes no product in exact arithmetic; it stops the factors' scales from
    drifting apart (one growing, the other collapsing) until the ``r x r`` solves fail.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> k1, k2 = jax.random.split(jax.random.key(0))
        >>> f = Factors(jax.random.normal(k1, (6, 2)), jax.random.normal(k2, (2, 5)))
        >>> g = rebalance(f)
        >>> bool(jnp.allclose(reconstruct(g), reconstruct(f), atol=1e-5))
        True
        >>> bool(jnp.allclose(g.B.T @ g.B, jnp.eye(2), atol=1e-5))
        True
    """
    if f.B.shape[-2] < f.B.shape[-1]:
        return f
    q, r = jnp.linalg.qr(f.B)
    return Factors(B=q, A=r @ f.A)


def gamma_for(beta, power: int = 2):
    """The factor step ``gamma = 1 - beta ** (1 / power)`` that makes the moment decay by ``beta``.

    ``power=2`` for a product ``B A`` (the first moment, Muon's momentum); ``power=4`` for
    the second moment ``(B A)^2``, whose factors fit ``|g|``.

    Examples:
        >>> round(float(gamma_for(0.9)), 4), round(float(gamma_for(0.95, power=4)), 4)
        (0.0513, 0.0127)
    """
    return 1 - jnp.asarray(beta, jnp.float32) ** (1.0 / power)


def unbiased_gamma(decay, count):
    """The factor step at step ``count`` that makes the product Adam's *bias-corrected* EMA.

    A zero-started EMA ``m_t = d m_{t-1} + (1 - d) g_t`` divided by ``1 - d^t`` is itself
    an EMA, ``mhat_t = mhat_{t-1} + eta_t (g_t - mhat_{t-1})``, with the step
    ``eta_t = (1 - d) / (1 - d^t)``: 1 at ``t = 1`` (``mhat_1 = g_1``), ``-> 1 - d``
    after. Factors whose product should decay by ``1 - eta_t`` keep ``sqrt(1 - eta_t)``
    each, so ``gamma_t = 1 - sqrt(1 - eta_t)``. At ``t = 1`` it is 1: the first step sets
    both factors to their least-squares fit of ``g_1``, and the random initial ``A``
    leaves no trace.

    Args:
        decay: the product's decay ``d`` per step (``beta1`` for the first moment,
            ``sqrt(beta2)`` for the ``|g|`` factors), in ``[0, 1)``.
        count: the step ``t >= 1`` (the count after this step's increment).

    Returns:
        float32 ``gamma_t``.

    Examples:
        >>> [round(float(unbiased_gamma(0.9, t)), 4) for t in (1, 2, 1000)]
        [1.0, 0.3118, 0.0513]
        >>> round(float(gamma_for(0.9)), 4)  # the constant step it tends to
        0.0513
    """
    d = jnp.asarray(decay, jnp.float32)
    t = jnp.asarray(count, jnp.float32)
    eta = jnp.where(d > 0, (1 - d) / (1 - d ** t), 1.0)
    return 1 - jnp.sqrt(jnp.clip(1 - eta, 0.0, 1.0))


def newton_schulz(x: jax.Array, steps: int = 5, eps: float = 1e-8) -> jax.Array:
    """Approximate polar factor ``U V^T`` of ``(..., p, q)`` by quintic Newton-Schulz.

    Frobenius-normalises, then iterates ``X <- a X + (b S + c S^2) X`` with ``S = X X^T``
    on the wide orientation (as optax's Muon does). Singular values end near 1 (within
    about 0.7-1.2, by design of :data:`NS_COEFFS`), directions exact.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> o = newton_schulz(jax.random.normal(jax.random.key(0), (16, 8)))
        >>> s = jnp.linalg.svd(o, compute_uv=False)
        >>> bool((s > 0.6).all() & (s < 1.3).all())
        True
    """
    tall = x.shape[-2] > x.shape[-1]
    x = _t(x) if tall else x
    x = x / (jnp.linalg.norm(x, axis=(-2, -1), keepdims=True) + eps)
    a, b, c = NS_COEFFS
    for _ in range(steps):
        s = x @ _t(x)
        x = a * x + (b * s + c * (s @ s)) @ x
    return _t(x) if tall else x
