"""WASI's Tucker maths: compressing an activation and contracting the kernel gradient.

Arrays in, arrays out; no Flax. Used by the linear op in :mod:`subspace_jax.wasi.core`.

* :func:`compress`: one warm-started subspace-iteration step per mode from the previous
  step's factors (no full-size unfolding or transpose of ``x``), then the core.
* :func:`core_gradient` and :func:`tucker_weight_grad`: the kernel gradient from the
  compressed activation, in the paper's contraction order (3-D and 4-D) or projecting the
  output gradient first; :func:`grad_flops` and :func:`choose_order` count and pick.
* :func:`orth`: the sign-fixed orthonormalisation (shifted CholeskyQR3, Householder
  fallback) the refreshes use.

References:
    Nguyen, Tartaglione, Nguyen, "Efficient Resource-Constrained Training of Transformers via
    Subspace Optimization" (WASI), arXiv 2510.09160; Nguyen et al., ASI, arXiv 2505.05086.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from subspace_jax import linalg

__all__ = ["orth", "compress", "core_gradient", "tucker_weight_grad", "grad_flops",
           "choose_order", "ORDERS"]


_HI = jax.lax.Precision.HIGHEST
ORDERS = ("auto", "paper", "project")


def _ein(spec: str, *xs: jax.Array) -> jax.Array:
    return jnp.einsum(spec, *xs, precision=_HI)


# ---------------------------------------------------------------------------------------------
# Weight gradient from a Tucker-compressed activation.


def _paper_3d(core, factors, g):
    u1, u2, u3 = factors
    z1 = _ein("bno,ba->noa", g, u1)        # project g on the batch basis: (N, O, r1)
    z2 = _ein("apq,np->aqn", core, u2)     # expand the token mode: (r1, r3, N)
    z3 = _ein("aqn,iq->ain", z2, u3)       # expand the feature mode: (r1, I, N)
    return _ein("noa,ain->io", z1, z3)     # (I, O)


def _paper_4d(core, factors, g):
    u1, u2, u3, u4 = factors
    z1 = _ein("ba,bhwd->ahwd", u1, g)      # (r1, H, W, D)
    z2 = _ein("hp,apqs->ahqs", u2, core)   # (r1, H, r3, r4)
    z3 = _ein("wq,ahwd->ahqd", u3, z1)     # (r1, H, r3, D)
    z4 = _ein("cs,ahqs->ahcq", u4, z2)     # (r1, H, C, r3)
    return _ein("ahqd,ahcq->cd", z3, z4)   # (C, D)


def _project(core, factors, g):
    gp = g
    for n, u in enumerate(factors[:-1]):   # g x_n U_n^T for every non-feature mode
        gp = linalg.mode_product(gp, u.T, n)
    lead = tuple(range(core.ndim - 1))
    m = jnp.tensordot(core, gp, axes=(lead, lead), precision=_HI)   # (r_d, O)
    return jnp.matmul(factors[-1], m, precision=_HI)                # (I, O)


def grad_flops(shape: Sequence[int], ranks: Sequence[int], out: int, order: str) -> int:
    """Multiply-add FLOPs (x2) of :func:`tucker_weight_grad` for an input ``shape``.

    Args:
        shape: activation shape, feature axis last.
        ranks: Tucker ranks, one per mode.
        out: columns of ``g`` (output features).
        order: ``"paper"`` (3-D and 4-D only) or ``"project"``.

    Examples:
        >>> from subspace_jax.wasi import core
        >>> core.grad_flops((16, 64, 384), (4, 8, 32), 1536, "project") < 2 * 16 * 64 * 384 * 1536
        True

    References:
        WASI, Sec. 3.3 and App. A (FLOP model of f_LR), arXiv 2510.09160.
    """
    shape, r = tuple(shape), tuple(ranks)
    if order == "paper" and len(shape) == 3:
        (b, n, i), (r1, r2, r3) = shape, r
        macs = b * n * out * r1 + r1 * r2 * r3 * n + r1 * r3 * i * n + i * out * n * r1
    elif order == "paper" and len(shape) == 4:
        (b, h, w, c), (r1, r2, r3, r4) = shape, r
        macs = (b * r1 * h * w * out + h * r2 * r1 * r3 * r4 + w * r3 * r1 * h * out
                + c * r4 * r1 * h * r3 + r1 * r3 * h * c * out)
    elif order == "project":
        macs, dims = 0, list(shape[:-1])
        for n in range(len(shape) - 1):   # each projection contracts one mode of g
            macs += math.prod(dims) * out * r[n]
            dims[n] = r[n]
        macs += math.prod(r) * out + shape[-1] * r[-1] * out
    else:
        raise ValueError(f"order {order!r} needs a 3-D or 4-D input for 'paper', got {shape}")
    return 2 * int(macs)


def choose_order(shape: Sequence[int], ranks: Sequence[int], out: int) -> str:
    """The cheaper contraction order for these shapes (``"paper"`` only for 3-D/4-D inputs).

    Examples:
        >>> from subspace_jax.wasi import core
        >>> core.choose_order((8, 32), (4, 8), 16)
        'project'
    """
    if len(shape) not in (3, 4):
        return "project"
    costs = {o: grad_flops(shape, ranks, out, o) for o in ("paper", "project")}
    return min(costs, key=costs.get)


def tucker_weight_grad(core: jax.Array, factors: Sequence[jax.Array], g: jax.Array, *,
                       order: str = "auto") -> jax.Array:
    """``sum over every non-feature axis of x~ (x) g`` for a Tucker activation ``x~``; never
    rebuilds ``x~``.

    With ``x~ = core x_1 U_1 ... x_d U_d`` of shape ``(dim_1, ..., dim_{d-1}, I)`` and ``g``
    of shape ``(dim_1, ..., dim_{d-1}, O)`` this is the ``(I, O)`` kernel gradient of
    ``x~ @ kernel``. ``order="paper"`` follows the contraction order of the WASI code for 3-D
    ``(B, N, I)`` and 4-D ``(B, H, W, C)`` inputs; ``"project"`` projects ``g`` onto every
    non-feature basis first, contracts with the core, then expands the feature mode (any
    order ``d >= 2``, cheaper when the ranks are small); ``"auto"`` picks the cheaper one.

    Args:
        core: ``(r_1, ..., r_d)``.
        factors: ``d`` matrices ``(dim_n, r_n)``.
        g: output gradient ``(dim_1, ..., dim_{d-1}, O)``.
        order: ``"auto"``, ``"paper"`` or ``"project"``.

    Returns:
        Float32 ``(I, O)``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import linalg
        >>> from subspace_jax.wasi import core
        >>> x = jax.random.normal(jax.random.key(0), (3, 4, 5))
        >>> g = jax.random.normal(jax.random.key(1), (3, 4, 2))
        >>> t = linalg.hosvd(x, ranks=(3, 4, 5))                      # full ranks: exact
        >>> dense = jnp.einsum("bni,bno->io", x, g)
        >>> bool(jnp.allclose(core.tucker_weight_grad(t.core, t.factors, g), dense, atol=1e-4))
        True

    References:
        WASI, Sec. 3.3 (f_LR), arXiv 2510.09160.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    factors = tuple(jnp.asarray(u, jnp.float32) for u in factors)
    core, g = jnp.asarray(core, jnp.float32), jnp.asarray(g, jnp.float32)
    shape = tuple(u.shape[0] for u in factors)
    if order == "auto":
        order = choose_order(shape, core.shape, g.shape[-1])
    if order == "paper" and core.ndim == 3:
        return _paper_3d(core, factors, g)
    if order == "paper" and core.ndim == 4:
        return _paper_4d(core, factors, g)
    if order == "paper":
        raise ValueError(f"order='paper' needs a 3-D or 4-D activation, got {core.ndim}-D")
    return _project(core, factors, g)


# ---------------------------------------------------------------------------------------------
# Orthonormalisation and the per-step activation compression.


def _chol_qr(p, shift=None):
    g = jnp.matmul(p.T, p, precision=_HI)
    if shift is not None:
        g = g + shift * jnp.eye(g.shape[0], dtype=g.dtype)
    low = jnp.linalg.cholesky(g)
    # q = p low^-T through the explicit k x k inverse: one GEMM, and several times faster to
    # compile on CPU than a triangular solve with the (k, m) right-hand side
    inv = jax.scipy.linalg.solve_triangular(low, jnp.eye(g.shape[0], dtype=g.dtype), lower=True)
    return jnp.matmul(p, inv.T, precision=_HI), low.T


def _cholqr3(p):
    """Column-scaled shifted CholeskyQR3: ``(q, r, ok)``, ``ok`` False where it broke down."""
    p = jnp.asarray(p, jnp.float32)
    m, k = p.shape
    norms = jnp.sqrt(jnp.sum(p * p, axis=0))
    norms = jnp.where(norms > 0, norms, 1.0)
    ps = p / norms          # QR(p D^-1) = Q (R D^-1): same Q, better-conditioned Gram
    shift = 11.0 * (m * k + k * (k + 1)) * float(jnp.finfo(jnp.float32).eps) * k
    q, r1 = _chol_qr(ps, shift)
    q, r2 = _chol_qr(q)
    q, r3 = _chol_qr(q)
    r = jnp.matmul(r3, jnp.matmul(r2, r1, precision=_HI), precision=_HI) * norms[None, :]
    ok = jnp.all(jnp.isfinite(q)) & jnp.all(jnp.isfinite(r))
    return q, r, ok


def _orth_or_keep(p, prev):
    """The orthonormal factor of ``p`` (:func:`_cholqr3`), or ``prev`` where that broke down
    (a rank-deficient ``p``): no data-dependent branch in the step."""
    q, _, ok = _cholqr3(p)
    return jnp.where(ok, q, prev)


@jax.jit
def orth(p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Reduced QR with ``diag(r) > 0`` by column-scaled shifted CholeskyQR3, falling back to a
    Householder QR (:func:`subspace_jax.linalg.qr_positive`) if it breaks down; float32,
    jittable. (Inside the training step, :func:`compress` and :func:`refresh_master` use the
    same CholeskyQR3 without the branch: where it breaks down they keep the previous basis.)

    The QR with a positive diagonal is unique, so this returns what ``qr_positive`` returns
    (same sign convention, no flipped columns) for any full-column-rank ``p`` with condition
    number up to about 1e6, from three small Cholesky factorisations of ``k x k`` Gram
    matrices: on CPU it is one to two orders of magnitude faster than XLA's Householder QR.

    Args:
        p: ``(m, k)`` with ``m >= k``.

    Returns:
        ``(q, r)``: ``q`` ``(m, k)`` orthonormal columns, ``r`` ``(k, k)`` upper triangular.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import linalg
        >>> from subspace_jax.wasi import core
        >>> p = jax.random.normal(jax.random.key(0), (50, 6))
        >>> q, r = core.orth(p)
        >>> bool(jnp.allclose(q, linalg.qr_positive(p)[0], atol=1e-4))
        True
        >>> bool(jnp.allclose(q @ r, p, atol=1e-4))
        True

    References:
        Fukaya, Kannan, Nakatsukasa, Yamamoto, Yanagisawa, "Shifted Cholesky QR for computing
        the QR factorization of ill-conditioned matrices", SIAM J. Sci. Comput. 2020
        (arXiv 1809.11085).
    """
    q, r, ok = _cholqr3(p)
    return jax.lax.cond(ok, lambda: (q, r), lambda: linalg.qr_positive(p))


def _view3(x, n):
    """``x`` seen as ``(prod(dims before n), dim_n, prod(dims after n))``: a reshape, no copy."""
    s = x.shape
    return x.reshape(math.prod(s[:n]), s[n], math.prod(s[n + 1:]))


def _gram_apply(x, n, u):
    """``X_(n) X_(n)^T u`` without forming the unfolding (no transpose of the full ``x``).

    The first and last modes are plain matrices of ``x`` (a reshape); the cheaper of
    ``(X X^T) u`` and ``X (X^T u)`` is used. A middle mode goes through its Gram matrix as a
    batched product over the leading axes, which needs no transpose either.
    """
    pre, d, post = _view3(x, n).shape
    k = u.shape[1]
    if pre == 1 or post == 1:
        xm = x.reshape(d, post) if pre == 1 else x.reshape(pre, d)
        other = post if pre == 1 else pre
        gram_first = d * d * other + d * d * k <= 2 * d * other * k
        if pre == 1:
            if gram_first:
                return jnp.matmul(jnp.matmul(xm, xm.T, precision=_HI), u, precision=_HI)
            return jnp.matmul(xm, jnp.matmul(xm.T, u, precision=_HI), precision=_HI)
        if gram_first:
            return jnp.matmul(jnp.matmul(xm.T, xm, precision=_HI), u, precision=_HI)
        return jnp.matmul(xm.T, jnp.matmul(xm, u, precision=_HI), precision=_HI)
    x3 = _view3(x, n)
    gram = jnp.sum(jnp.matmul(x3, jnp.swapaxes(x3, 1, 2), precision=_HI), axis=0)
    return jnp.matmul(gram, u, precision=_HI)


def _mode_dot(x, m, n):
    """``x x_n m`` for ``m`` ``(J, dim_n)`` without moving axes of ``x``: a matrix product for
    the first and last modes, a batched one (``m`` broadcast) for middle modes."""
    s = x.shape
    pre, d, post = _view3(x, n).shape
    if pre == 1:
        y = jnp.matmul(m, x.reshape(d, post), precision=_HI)
    elif post == 1:
        y = jnp.matmul(x.reshape(pre, d), m.T, precision=_HI)
    else:
        y = jnp.matmul(m[None], _view3(x, n), precision=_HI)
    return y.reshape(s[:n] + (m.shape[0],) + s[n + 1:])


def _cheapest_order(shape, ranks, modes):
    """The order of ``modes`` in which successive mode products ``dim_n -> r_n`` cost the
    fewest multiply-adds (host-side, over all permutations; at most 4 modes)."""
    def cost(order):
        dims, total = list(shape), 0
        for n in order:
            total += math.prod(dims) * ranks[n]
            dims[n] = ranks[n]
        return total
    return min(itertools.permutations(modes), key=cost)


def _project_modes(x, factors, modes):
    """``x x_n U_n^T`` over ``modes``, in the cheapest order."""
    ranks = {n: factors[n].shape[1] for n in modes}
    for n in _cheapest_order(x.shape, ranks, modes):
        x = _mode_dot(x, factors[n].T, n)
    return x


@jax.jit
def compress(x: jax.Array, factors_prev: Sequence[jax.Array]) -> linalg.Tucker:
    """WASI's per-step activation compression: per mode one warm-started subspace-iteration
    step ``U_n = orth(X_(n) X_(n)^T U_n_prev)`` from the original ``x``, then the core.

    The same maths and sign convention as :func:`subspace_jax.linalg.hosvd_step`, with the
    orthonormalisation done by :func:`orth` (fast on CPU), no unfolding of ``x`` ever
    materialised (no full-size transposes) and the core's mode products in their cheapest
    order. Jittable; ranks from the shapes.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import linalg
        >>> from subspace_jax.wasi import core
        >>> x = jax.random.normal(jax.random.key(0), (6, 8, 10))
        >>> prev = linalg.hosvd(x, ranks=(2, 3, 4)).factors
        >>> t, ref = core.compress(x, prev), linalg.hosvd_step(x, prev)
        >>> bool(jnp.allclose(t.core, ref.core, atol=1e-3)), t.core.shape
        (True, (2, 3, 4))

    References:
        WASI, Sec. 3.3 (activation subspace iteration), arXiv 2510.09160.
    """
    x = jnp.asarray(x, jnp.float32)
    factors = tuple(_orth_or_keep(_gram_apply(x, n, u), u)
                    for n, u in enumerate(jnp.asarray(u, jnp.float32) for u in factors_prev))
    return linalg.Tucker(_project_modes(x, factors, tuple(range(x.ndim))), factors)


def core_gradient(core: jax.Array, factors: Sequence[jax.Array], g: jax.Array) -> jax.Array:
    """``m = G_(d) (g x_1 U_1^T ... x_{d-1} U_{d-1}^T)_(d)^T``, ``(r_d, O)``: the Tucker
    activation's kernel gradient is ``U_d @ m``, and for a factored kernel ``a @ b`` the
    gradients are ``da = U_d (m b^T)`` and ``db = (a^T U_d) m``; all three share ``m``.

    ``g`` is projected onto every non-feature basis (cheapest order first), then contracted
    with the core: ``O(numel(g) r_1)`` instead of the ``O(numel(g) K)`` of forming
    ``g @ b^T``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import linalg
        >>> from subspace_jax.wasi import core
        >>> x = jax.random.normal(jax.random.key(0), (3, 4, 5))
        >>> g = jax.random.normal(jax.random.key(1), (3, 4, 2))
        >>> t = linalg.hosvd(x, ranks=(3, 4, 5))                      # full ranks: exact
        >>> m = core.core_gradient(t.core, t.factors, g)
        >>> bool(jnp.allclose(t.factors[-1] @ m, jnp.einsum("bni,bno->io", x, g), atol=1e-4))
        True
    """
    gp = _project_modes(jnp.asarray(g, jnp.float32), tuple(factors), tuple(range(core.ndim - 1)))
    r_d = core.shape[-1]
    return jnp.matmul(core.reshape(-1, r_d).T, gp.reshape(-1, gp.shape[-1]), precision=_HI)
