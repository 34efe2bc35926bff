"""WASI array maths: the linear op with Tucker-compressed activations, its contractions,
the per-step weight refresh, analytic counters and rank calibration.

Arrays in, arrays out; no Flax. Layout follows Flax: a kernel is ``(in, out)`` and, for WASI,
``kernel = a @ b`` with ``a = R^T`` (``(in, K)``, singular values folded in) and ``b = L^T``
(``(K, out)``, orthonormal rows, WASI's basis).

* :func:`wasi_matmul`: ``y = (x @ a) @ b`` as a ``jax.custom_vjp``. On the differentiated
  path its forward refreshes the activation's Tucker factors by one warm-started
  subspace-iteration step per mode (:func:`compress`) and saves only
  the core and the factors for backward, never ``x``; its backward gets the kernel gradient
  from that compressed activation (:func:`tucker_weight_grad`). Undifferentiated (evaluation)
  it is two thin matmuls and returns the factors unchanged.
* :func:`refresh_factored` and :func:`refresh_master`: the two weight-side variants' per-step
  update of ``(a, b)``.
* the Tucker compression and gradient contractions live in :mod:`subspace_jax.wasi.tucker`
  (re-exported here); the analytic memory count and rank calibration in
  :mod:`subspace_jax.wasi.calibration`.

References:
    Nguyen, Tartaglione, Nguyen, "Efficient Resource-Constrained Training of Transformers via
    Subspace Optimization" (WASI), arXiv 2510.09160; Nguyen et al., ASI, arXiv 2505.05086.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from subspace_jax import forms, linalg
from subspace_jax.wasi.tucker import (  # noqa: F401  (re-exported: the op's maths)
    _HI, ORDERS, _chol_qr, _gram_apply, _orth_or_keep, choose_order, compress, core_gradient,
    grad_flops, orth, tucker_weight_grad)

__all__ = ["orth", "compress", "core_gradient", "OpConfig", "wasi_matmul", "tucker_weight_grad",
           "grad_flops",
           "choose_order", "refresh_factored", "refresh_master"]

# ---------------------------------------------------------------------------------------------
# The custom-VJP linear op.


@dataclasses.dataclass(frozen=True)
class OpConfig:
    """Static settings of :func:`wasi_matmul` (hashable; part of the trace).

    Attributes:
        variant: ``"factored"`` (gradients for ``a`` and ``b``) or ``"master"`` (a gradient
            for the full master kernel ``w``; ``a`` and ``b`` get zeros).
        order: contraction order of the weight gradient: ``"paper"`` follows the reference
            code (:func:`tucker_weight_grad`, for the factored variant after forming
            ``g @ b^T``); ``"auto"`` and ``"project"`` compute one :func:`core_gradient`
            ``m`` and get ``da``, ``db`` (or ``dw``) from it by thin matmuls.
        name: the layer's path, for error messages.
        precision: of the forward and input-gradient matmuls.
        dot_general: computes the forward and input-gradient matmuls (None: lax's).
        w_dtype: dtype of the master kernel's gradient.
    """

    variant: str = "factored"
    order: str = "auto"
    name: str = "wasi"
    precision: Any = None
    dot_general: Callable | None = None
    w_dtype: Any = None


def _matmul(cfg: OpConfig, x, a, b):
    kw = dict(precision=cfg.precision, dot_general=cfg.dot_general)
    return forms.dot(forms.dot(x, a, **kw), b, **kw)


def _check_batch(cfg: OpConfig, x, factors) -> None:
    want = tuple(int(u.shape[0]) for u in factors)
    if tuple(x.shape) != want:
        raise ValueError(
            f"WASI layer {cfg.name!r}: training input of shape {tuple(x.shape)} differs from the "
            f"calibrated activation shape {want} (the Tucker factors, batch mode included, have "
            "fixed shapes: use the calibrated batch size and sequence length, drop the last "
            "partial batch, or convert again)")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def wasi_matmul(cfg: OpConfig, x: jax.Array, w: jax.Array | None, a: jax.Array, b: jax.Array,
                factors: tuple[jax.Array, ...]) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """``((x @ a) @ b, new_factors)`` with a backward that keeps only a Tucker-compressed ``x``.

    Differentiated (training), the forward runs one warm-started subspace-iteration step per
    mode of ``x`` (under ``stop_gradient``) from ``factors``, returns the refreshed factors and
    saves only the core, the factors and ``a``, ``b``. The backward computes

    * ``dx = (g @ b^T) @ a^T`` (exact);
    * ``factored``: ``da = sum x~^T (g @ b^T)`` and ``db = sum (x~ @ a)^T g``, both by
      :func:`tucker_weight_grad` (the dense ``(in, out)`` gradient is never formed);
    * ``master``: ``dw = sum x~^T g``, ``(in, out)``;

    and zero cotangents for the factors. Undifferentiated (evaluation) it is two thin
    matmuls and returns ``factors`` unchanged, whatever the batch shape.

    Args:
        cfg: an :class:`OpConfig` (static).
        x: ``(..., in)`` activation, in the compute dtype of ``a`` and ``b``.
        w: the master ``(in, out)`` kernel (only receives a gradient), or None (factored).
        a: ``(in, K)``.
        b: ``(K, out)``.
        factors: previous Tucker factors, one ``(dim_n, r_n)`` matrix per mode of ``x``.

    Returns:
        ``(y, factors)``: ``y`` of shape ``(..., out)`` and the refreshed (training) or
        unchanged (evaluation) float32 factors.

    Raises:
        ValueError: when differentiated with an ``x`` whose shape differs from the factors'
            (the calibrated shape); the message names the layer.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import linalg
        >>> from subspace_jax.wasi import core
        >>> x = jax.random.normal(jax.random.key(0), (2, 3, 4))
        >>> a, b = jnp.eye(4, 2), jnp.eye(2, 4)
        >>> factors = linalg.hosvd(x, ranks=(2, 3, 4)).factors
        >>> y, new = core.wasi_matmul(core.OpConfig(), x, None, a, b, factors)
        >>> y.shape, new[1].shape
        ((2, 3, 4), (3, 3))

    References:
        WASI, Sec. 3.3-3.4 and Algorithm 1, arXiv 2510.09160.
    """
    del w
    return _matmul(cfg, x, a, b), tuple(factors)


def _fwd(cfg, x, w, a, b, factors):
    del w
    _check_batch(cfg, x, factors)
    t = compress(jax.lax.stop_gradient(x), factors)
    return (_matmul(cfg, x, a, b), t.factors), (t.core, t.factors, a, b)


def _bwd(cfg, res, cts):
    core, factors, a, b = res
    g = cts[0]
    kw = dict(precision=cfg.precision, dot_general=cfg.dot_general)
    dx = forms.dot(forms.dot(g, b.T, **kw), a.T, **kw)
    zeros = tuple(jnp.zeros_like(u) for u in factors)  # the state is float32, like these
    g32, a32, b32 = (jnp.asarray(v, jnp.float32) for v in (g, a, b))
    if cfg.order == "paper":   # the reference code's contraction order, for comparison
        if cfg.variant == "master":
            dw = tucker_weight_grad(core, factors, g32, order="paper").astype(cfg.w_dtype)
            return dx, dw, jnp.zeros_like(a), jnp.zeros_like(b), zeros
        h = jnp.matmul(g32, b32.T, precision=_HI)
        da = tucker_weight_grad(core, factors, h, order="paper")
        feat = jnp.matmul(a32.T, factors[-1], precision=_HI)      # (K, r_d): x~ @ a's basis
        db = tucker_weight_grad(core, factors[:-1] + (feat,), g32, order="paper")
        return dx, None, da.astype(a.dtype), db.astype(b.dtype), zeros
    m = core_gradient(core, factors, g32)                            # (r_d, O), shared
    u_d = factors[-1]
    if cfg.variant == "master":
        dw = jnp.matmul(u_d, m, precision=_HI).astype(cfg.w_dtype)
        return dx, dw, jnp.zeros_like(a), jnp.zeros_like(b), zeros
    da = jnp.matmul(u_d, jnp.matmul(m, b32.T, precision=_HI), precision=_HI)
    db = jnp.matmul(jnp.matmul(a32.T, u_d, precision=_HI), m, precision=_HI)
    return dx, None, da.astype(a.dtype), db.astype(b.dtype), zeros


wasi_matmul.defvjp(_fwd, _bwd)


# ---------------------------------------------------------------------------------------------
# Weight side: the per-step refresh of (a, b).


def _orth_near_orthonormal(p):
    """One CholeskyQR pass: exact to float32 for the well-conditioned basis an optimizer step
    leaves (``p^T p`` close to the identity, so the orthogonality error is about
    ``cond(p)^2 * eps``). No data-dependent branch: where the Cholesky factorisation breaks
    down (a rank-deficient ``p``), ``p`` is returned unchanged with ``r = I``."""
    q, r = _chol_qr(p)
    ok = jnp.all(jnp.isfinite(r))
    return jnp.where(ok, q, p), jnp.where(ok, r, jnp.eye(r.shape[0], dtype=r.dtype))


@jax.jit
def refresh_factored(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Re-orthonormalise the basis of ``a @ b`` after an optimizer step; the product is kept.

    ``b^T = q r`` (sign-fixed QR, ``diag(r) >= 0``, by :func:`orth`), ``b' = q^T``,
    ``a' = a r^T``. This is the
    warm-started subspace-iteration step of WASI applied to the rank-K product itself: one
    power step from ``b^T`` on ``(a b)^T`` spans exactly ``range(b^T)``, so only the
    orthonormalisation remains, at ``O(out K^2)`` instead of ``O(in out K)`` and without
    forming the dense kernel. Positive diagonals keep ``b'`` close to ``b``, so optimizer
    moments stay aligned with their coordinates and no rank-1 term flips sign.

    Args:
        a: ``(in, K)``.
        b: ``(K, out)``.

    Returns:
        ``(a', b')`` in the input dtypes with ``a' @ b' == a @ b`` (float32 round-off) and
        orthonormal rows in ``b'``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax.wasi import core
        >>> a, b = jnp.ones((5, 2)), jnp.array([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
        >>> a2, b2 = core.refresh_factored(a, b)
        >>> bool(jnp.allclose(a2 @ b2, a @ b, atol=1e-5))
        True
        >>> bool(jnp.allclose(b2 @ b2.T, jnp.eye(2), atol=1e-6))
        True

    References:
        WASI, Algorithm 1 and Sec. 3.2, arXiv 2510.09160.
    """
    q, r = _orth_near_orthonormal(jnp.asarray(b, jnp.float32).T)
    a2 = jnp.matmul(jnp.asarray(a, jnp.float32), r.T, precision=_HI)
    return a2.astype(a.dtype), q.T.astype(b.dtype)


@jax.jit
def refresh_master(w: jax.Array, b_prev: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Re-derive ``(a, b)`` from the master kernel by one warm-started subspace-iteration step.

    In WASI's layout ``W = w^T`` (out, in) and ``L_prev = b_prev^T``: ``L = orth(W W^T L_prev)``
    with the sign-fixed QR (:func:`orth`; the result of
    :func:`subspace_jax.linalg.subspace_iteration`), then ``R = L^T W`` (recomputed after
    orthonormalising, which removes the reference code's sign flip at the SVD -> iteration
    hand-over). Never an SVD.

    Args:
        w: master ``(in, out)`` kernel.
        b_prev: previous basis ``(K, out)``.

    Returns:
        ``(a, b)`` float32: ``a = R^T`` ``(in, K)``, ``b = L^T`` ``(K, out)``; ``a @ b`` is
        ``w`` projected on the tracked K-dim output subspace.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax.wasi import core
        >>> w = jnp.diag(jnp.array([3.0, 2.0, 1.0]))
        >>> a, b = core.refresh_master(w, jnp.eye(3)[:2])
        >>> bool(jnp.allclose(a @ b, jnp.diag(jnp.array([3.0, 2.0, 0.0])), atol=1e-5))
        True

    References:
        WASI, Algorithm 1, arXiv 2510.09160.
    """
    wt = jnp.asarray(w, jnp.float32).T
    prev = jnp.asarray(b_prev, jnp.float32).T
    q = _orth_or_keep(_gram_apply(wt, 0, prev), prev)
    return jnp.matmul(wt.T, q, precision=_HI), q.T
