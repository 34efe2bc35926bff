"""WASI rank calibration (host-side): the paper's analytic activation count, the
per-layer table of options (exact per-mode HOSVD at a grid of eps, each option's memory and
weight-gradient error) and the knapsack that picks one option per layer under a budget.

Host numpy in float64: calibration runs once, before training, on concrete arrays, and
compiles nothing per shape.

References:
    WASI, Sec. 3.3 and App. A.2, arXiv 2510.09160; ASI, arXiv 2505.05086.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from subspace_jax import linalg

__all__ = ["EPS_GRID", "activation_bytes", "RankOption", "mode_spectra", "truncate",
           "eps_ranks", "rank_options", "knapsack"]

#: The eps grid of the paper's calibration ("perplexity") table.
EPS_GRID = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def activation_bytes(shape: Sequence[int], ranks: Sequence[int] | None = None,
                     itemsize: int = 4) -> int:
    """The paper's analytic activation memory of one layer: the full input, or its Tucker
    core plus factors (``prod(r) + sum(dim_n r_n)`` elements) when ``ranks`` are given.

    Examples:
        >>> from subspace_jax.wasi import calibration as core
        >>> core.activation_bytes((16, 64, 384)), core.activation_bytes((16, 64, 384), (2, 4, 8))
        (1572864, 13696)

    References:
        WASI, Sec. 3.3 (memory), arXiv 2510.09160.
    """
    if ranks is None:
        return math.prod(shape) * itemsize
    return (math.prod(ranks) + sum(d * r for d, r in zip(shape, ranks))) * itemsize


@dataclasses.dataclass(frozen=True)
class RankOption:
    """One row of the calibration table: per-mode ``ranks`` reached at ``eps``, the
    ``nbytes`` of core + factors and the weight-gradient error against the exact gradient,
    relative (``error = ||dW - dW~||_F / ||dW||_F``) and absolute
    (``abs_error = ||dW - dW~||_F``, the paper's knapsack metric; None if not measured)."""

    eps: float
    ranks: tuple[int, ...]
    nbytes: int
    error: float
    abs_error: float | None = None


def _np_unfold(x: np.ndarray, n: int) -> np.ndarray:
    return np.moveaxis(x, n, 0).reshape(x.shape[n], -1)


def mode_spectra(x) -> list[tuple[np.ndarray, np.ndarray]]:
    """Left singular vectors and values of every mode unfolding of ``x`` (host-side numpy).

    From the eigen-decomposition (float64) of the smaller Gram matrix of each unfolding
    (``X X^T`` or ``X^T X``), several times cheaper than an SVD of a wide or tall unfolding;
    columns of ``u`` past the numerical rank are not reliable (callers keep leading ones and
    re-orthonormalise). Host numpy, so calibrating many layers compiles nothing.

    Returns:
        Per mode, ``(u, s)``: ``u`` ``(dim_n, m)`` and ``s`` ``(m,)`` descending, float64,
        with ``m = min(dim_n, prod(other dims))``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax.wasi import calibration as core
        >>> x = jax.random.normal(jax.random.key(0), (3, 4, 5))
        >>> [(u.shape, s.shape) for u, s in core.mode_spectra(x)]
        [((3, 3), (3,)), ((4, 4), (4,)), ((5, 5), (5,))]
    """
    x = np.asarray(x, np.float64)
    out = []
    for n in range(x.ndim):
        xm = _np_unfold(x, n)
        if xm.shape[0] <= xm.shape[1]:
            evals, u = np.linalg.eigh(xm @ xm.T)
            s, u = np.sqrt(np.maximum(evals[::-1], 0.0)), u[:, ::-1]
        else:
            evals, v = np.linalg.eigh(xm.T @ xm)
            s, v = np.sqrt(np.maximum(evals[::-1], 0.0)), v[:, ::-1]
            u = (xm @ v) / np.maximum(s, 1e-300)[None, :]
        out.append((u, s))
    return out


def _np_truncate(x: np.ndarray, spectra, ranks):
    factors = []
    for (u, _), r in zip(spectra, ranks):
        q, rr = np.linalg.qr(u[:, :r])
        factors.append(q * np.where(np.diag(rr) < 0, -1.0, 1.0)[None, :])
    core = x
    for n, u in enumerate(factors):
        core = np.moveaxis(np.tensordot(u.T, core, axes=(1, n)), 0, n)
    return core, factors


def truncate(x, spectra, ranks: Sequence[int]) -> linalg.Tucker:
    """The HOSVD of ``x`` at ``ranks`` from :func:`mode_spectra` (factors re-orthonormalised,
    ``diag(R) >= 0``), as a float32 :class:`~subspace_jax.linalg.Tucker`.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import linalg
        >>> from subspace_jax.wasi import calibration as core
        >>> x = jax.random.normal(jax.random.key(0), (3, 4, 5))
        >>> t = core.truncate(x, core.mode_spectra(x), (3, 4, 5))
        >>> bool(jnp.allclose(linalg.tucker_reconstruct(t), x, atol=1e-4))
        True
    """
    core, factors = _np_truncate(np.asarray(x, np.float64), spectra, ranks)
    return linalg.Tucker(jnp.asarray(core, jnp.float32),
                         tuple(jnp.asarray(u, jnp.float32) for u in factors))


def eps_ranks(spectra, eps: float) -> tuple[int, ...]:
    """Per-mode explained-variance ranks at ``eps`` (host-side), as ``linalg.hosvd(eps=)``.

    Examples:
        >>> import jax
        >>> from subspace_jax.wasi import calibration as core
        >>> x = jax.random.normal(jax.random.key(0), (3, 4, 5))
        >>> core.eps_ranks(core.mode_spectra(x), 1.0)
        (3, 4, 5)
    """
    return tuple(linalg.energy_rank(s, eps) for _, s in spectra)


def rank_options(x, g, eps_grid: Sequence[float] = EPS_GRID, *,
                 spectra=None) -> list[RankOption]:
    """Exact per-mode HOSVD of an activation at every eps of a grid, with its memory and the
    relative and absolute errors of the kernel gradient it gives (host-side numpy, float64). The
    decomposition of each mode is computed once (:func:`mode_spectra`) and truncated at
    every eps.

    Args:
        x: concrete activation ``(dim_1, ..., in)``.
        g: concrete output gradient ``(dim_1, ..., out)`` of the same layer.
        eps_grid: explained-variance thresholds in ``(0, 1]``.
        spectra: :func:`mode_spectra` of ``x`` if already computed.

    Returns:
        One :class:`RankOption` per eps, in grid order.

    Examples:
        >>> import jax
        >>> from subspace_jax.wasi import calibration as core
        >>> x = jax.random.normal(jax.random.key(0), (4, 6, 8))
        >>> g = jax.random.normal(jax.random.key(1), (4, 6, 3))
        >>> opts = core.rank_options(x, g, (0.5, 1.0))
        >>> opts[-1].ranks, opts[-1].error < 1e-5, opts[0].nbytes < opts[-1].nbytes
        ((4, 6, 8), True, True)

    References:
        WASI, Sec. 3.3 and App. A.2 (rank selection), arXiv 2510.09160; ASI, arXiv 2505.05086.
    """
    x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
    xm, gm = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    exact = xm.T @ gm
    norm = float(np.linalg.norm(exact)) or 1.0
    spectra = mode_spectra(x) if spectra is None else spectra
    out = []
    for eps in eps_grid:
        ranks = eps_ranks(spectra, eps)
        core, factors = _np_truncate(x, spectra, ranks)
        gp = g
        for n, u in enumerate(factors[:-1]):          # the "project" contraction order
            gp = np.moveaxis(np.tensordot(u.T, gp, axes=(1, n)), 0, n)
        lead = tuple(range(core.ndim - 1))
        approx = factors[-1] @ np.tensordot(core, gp, axes=(lead, lead))
        err = float(np.linalg.norm(approx - exact))
        out.append(RankOption(float(eps), ranks, activation_bytes(x.shape, ranks), err / norm,
                              err))
    return out


ERRORS = ("absolute", "relative")


def knapsack(options: Sequence[Sequence[RankOption]], budget_bytes: int, *,
             unit: int = 1024, error: str = "absolute") -> list[int]:
    """Pick one option per layer minimising the summed gradient error under a memory budget.

    ``error="absolute"`` sums ``||dW - dW~||_F`` over layers, as the paper does: a layer
    with a large gradient weighs more. ``"relative"`` sums each layer's error divided by
    its own ``||dW||_F`` (every layer alike), which shares the memory differently.

    A multiple-choice knapsack solved by dynamic programming over memory in ``unit`` bytes
    (each option's bytes rounded up). A budget at or below the smallest achievable total is
    raised to it, as in the paper's code, so a tiny budget gives every layer its
    smallest-memory option.

    Args:
        options: per layer, its :class:`RankOption` list.
        budget_bytes: total activation memory allowed.
        unit: memory discretisation in bytes.
        error: ``"absolute"`` (default, the paper's) or ``"relative"``.

    Returns:
        The chosen option index per layer.

    Raises:
        ValueError: an unknown ``error``, or ``"absolute"`` on options without
            ``abs_error``.

    Examples:
        >>> from subspace_jax.wasi.calibration import RankOption, knapsack
        >>> a = [RankOption(0.4, (1,), 1024, 0.5, 0.5), RankOption(0.9, (2,), 4096, 0.1, 0.1)]
        >>> b = [RankOption(0.4, (1,), 1024, 0.5, 5.0), RankOption(0.9, (2,), 4096, 0.4, 4.0)]
        >>> knapsack([a, b], 5 * 1024), knapsack([a, b], 0), knapsack([a, b], 10**6)
        ([0, 1], [0, 0], [1, 1])
        >>> knapsack([a, b], 5 * 1024, error="relative")  # b's gradient is 10x a's
        [1, 0]

    References:
        WASI, App. A.2 (linear-time rank search), arXiv 2510.09160.
    """
    if error not in ERRORS:
        raise ValueError(f"knapsack: error={error!r} must be one of {ERRORS}")
    if error == "absolute" and any(o.abs_error is None for opts in options for o in opts):
        raise ValueError("knapsack: error='absolute' needs every option's abs_error "
                         "(rank_options measures it); pass error='relative' otherwise")
    value = (lambda o: o.abs_error) if error == "absolute" else (lambda o: o.error)
    smallest = [min(range(len(opts)), key=lambda j: opts[j].nbytes) for opts in options]
    if budget_bytes <= sum(opts[j].nbytes for opts, j in zip(options, smallest)):
        return smallest
    costs = [[-(-o.nbytes // unit) for o in opts] for opts in options]
    cap = min(-(-int(budget_bytes) // unit), sum(max(c) for c in costs))
    inf = float("inf")
    best = np.full(cap + 1, inf)
    best[0] = 0.0
    picks = []
    for opts, cost in zip(options, costs):
        new = np.full(cap + 1, inf)
        pick = np.full(cap + 1, -1, dtype=np.int64)
        for j, (o, c) in enumerate(zip(opts, cost)):
            if c > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[c:] = best[:cap + 1 - c] + value(o)
            better = cand < new
            new[better], pick[better] = cand[better], j
        best = new
        picks.append(pick)
    m = int(np.argmin(best))
    chosen = []
    for opts, cost, pick in zip(reversed(options), reversed(costs), reversed(picks)):
        j = int(pick[m])
        chosen.append(j)
        m -= cost[j]
    return chosen[::-1]
