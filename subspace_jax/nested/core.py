"""NSN array maths: prefix matmuls, rank masks, grids, curriculum, energies, principal angles.

Arrays in, arrays out; no pytrees, no Flax. Factors follow the library's Flax layout:
``a`` is ``(in, R)`` and ``b`` is ``(R, out)``, so ``x @ W_r = (x @ a[:, :r]) @ b[:r]``:
component ``i`` is the rank-one term ``outer(a[:, i], b[i])`` and rank ``r`` keeps the
first ``r`` of them. Energies and image bases are computed in float32 and principal
angles in float64, on the host.

References:
    Rauba and van der Schaar, "Deep Hierarchical Learning with Nested Subspace Networks",
    ICLR 2026, arXiv 2509.17874. Knyazev and Argentati, "Principal angles between subspaces
    in an A-based scalar product", SIAM J. Sci. Comput. 23 (2002) (sine-based angles).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subspace_jax import forms

__all__ = ["prefix_matmul", "rank_grid", "check_grid", "window_low", "component_energy",
           "image_basis", "principal_angles"]

def prefix_matmul(x: jax.Array, a: jax.Array, b: jax.Array, width: int,
                  rank: jax.Array | int | None = None, *, precision: Any = None,
                  dot_general: Callable | None = None) -> jax.Array:
    """``x @ a[:, :width] @ b[:width]`` with components ``>= rank`` zeroed: two thin matmuls.

    ``width`` is a Python int (static: it sets the shapes, hence the cost
    ``width * (in + out)`` multiply-adds per row). ``rank`` may be traced: components
    ``rank .. width-1`` are zeroed between the two matmuls (``jnp.where``), so their factors
    get exactly zero gradient and one compiled function serves every ``rank <= width``.
    The inputs must share a dtype (see :func:`subspace_jax.forms.promote`).

    Args:
        x: ``(..., in)`` input.
        a: ``(in, R)`` input-side factor.
        b: ``(R, out)`` output-side factor.
        width: components computed, ``1 <= width <= R``.
        rank: active components (None: ``width``); values above ``width`` act as ``width``.
        precision: passed to both contractions.
        dot_general: the contraction (see :func:`subspace_jax.forms.dot`).

    Returns:
        ``(..., out)`` array.

    Examples:
        >>> import jax.numpy as jnp
        >>> a, b = jnp.eye(3), jnp.diag(jnp.array([3.0, 2.0, 1.0]))
        >>> prefix_matmul(jnp.ones((1, 3)), a, b, width=3, rank=2).tolist()
        [[3.0, 2.0, 0.0]]
        >>> prefix_matmul(jnp.ones((1, 3)), a, b, width=1).tolist()
        [[3.0, 0.0, 0.0]]
    """
    big = a.shape[1]
    if not isinstance(width, int) or not 1 <= width <= big:
        raise ValueError(f"width={width!r} must be an int in [1, {big}]")
    if width < big:
        a, b = a[:, :width], b[:width]
    h = forms.dot(x, a, precision=precision, dot_general=dot_general)
    if rank is not None:
        keep = jnp.arange(width, dtype=jnp.int32) < jnp.asarray(rank, jnp.int32)
        h = jnp.where(keep, h, jnp.zeros((), h.dtype))
    return forms.dot(h, b, precision=precision, dot_general=dot_general)


def rank_grid(max_rank: int, *, low: int | None = None, steps: int = 8) -> tuple[int, ...]:
    """A default training grid: ``steps`` evenly spaced ranks up to ``max_rank`` plus halvings.

    The grid is ``max_rank * k / steps`` for ``k = 1..steps`` (rounded) and, below the
    first of those, repeated halvings down to ``low`` (default ``max(1, max_rank // 32)``).
    The last entry is always ``max_rank`` (the anchor).

    Examples:
        >>> rank_grid(384)
        (12, 24, 48, 96, 144, 192, 240, 288, 336, 384)
        >>> rank_grid(4)
        (1, 2, 3, 4)
    """
    if not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"rank_grid: max_rank={max_rank!r} must be an int >= 1")
    low = max(1, max_rank // 32) if low is None else low
    ranks = {max(1, round(max_rank * k / steps)) for k in range(1, steps + 1)}
    r = min(ranks)
    while r // 2 >= low:
        r //= 2
        ranks.add(r)
    return tuple(sorted(x for x in ranks if x >= min(low, max_rank)))


def check_grid(grid: Sequence[int], max_rank: int) -> tuple[int, ...]:
    """Validate a rank grid: increasing ints in ``[1, max_rank]`` ending at ``max_rank``.

    Examples:
        >>> check_grid([8, 16, 32], 32)
        (8, 16, 32)
        >>> check_grid([8, 64], 32)
        Traceback (most recent call last):
        ...
        ValueError: rank grid (8, 64) must be increasing ints in [1, 32] ending at the anchor 32
    """
    grid = tuple(grid)
    ok = (len(grid) >= 1 and all(isinstance(r, int) and not isinstance(r, bool) for r in grid)
          and all(1 <= r <= max_rank for r in grid) and list(grid) == sorted(set(grid))
          and grid[-1] == max_rank)
    if not ok:
        raise ValueError(f"rank grid {grid} must be increasing ints in [1, {max_rank}] ending "
                         f"at the anchor {max_rank}")
    return grid


def window_low(step: jax.Array, num_variants: int, curriculum_steps: int) -> jax.Array:
    """Lowest grid index a variant rank may take at ``step``: the curriculum.

    Variants are the grid's ranks below the anchor, indices ``0 .. num_variants - 1``. At
    step 0 only the highest variant is allowed; the window's lower end then moves down
    linearly and reaches index 0 at ``curriculum_steps`` (0: the full window from the
    start). Traceable (``step`` may be an int32 tracer).

    Examples:
        >>> import jax.numpy as jnp
        >>> [int(window_low(jnp.int32(t), 5, 8)) for t in (0, 2, 4, 6, 8, 100)]
        [4, 3, 2, 1, 0, 0]
        >>> int(window_low(jnp.int32(0), 5, 0))
        0
    """
    if curriculum_steps <= 0 or num_variants <= 1:
        return jnp.zeros((), jnp.int32)
    left = 1.0 - jnp.minimum(step.astype(jnp.float32) / curriculum_steps, 1.0)
    return jnp.ceil(left * (num_variants - 1) - 1e-6).astype(jnp.int32)


def component_energy(a: jax.Array, b: jax.Array) -> dict[str, np.ndarray]:
    """Per-component norms ``‖a_i‖``, ``‖b_i‖`` and ``‖a_i‖ ‖b_i‖`` (``= ‖a_i b_iᵀ‖_F``).

    After the balanced SVD initialisation ``‖a_i‖ ‖b_i‖`` is the ``i``-th singular value,
    so it decreases with ``i``; the paper's energy-decay assumption is that training
    keeps it decreasing.

    Examples:
        >>> import jax.numpy as jnp
        >>> e = component_energy(jnp.eye(3) * 2.0, jnp.diag(jnp.array([3.0, 2.0, 1.0])))
        >>> e["product"].tolist()
        [6.0, 4.0, 2.0]
    """
    a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
    na, nb = np.linalg.norm(a32, axis=0), np.linalg.norm(b32, axis=1)
    return {"a": na, "b": nb, "product": na * nb}


def image_basis(kernel: jax.Array, rank: int | None = None, *, rtol: float = 1e-5) -> np.ndarray:
    """Orthonormal basis ``(out, k)`` of the image of ``x -> x @ kernel`` (its row space).

    Computed numerically from the dense ``(in, out)`` matrix by SVD (float32): the right
    singular vectors whose singular values exceed ``rtol`` times the largest, at most
    ``rank`` of them.

    Examples:
        >>> import jax.numpy as jnp
        >>> image_basis(jnp.array([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])).shape
        (3, 1)
    """
    _, s, vt = np.linalg.svd(np.asarray(kernel, np.float32), full_matrices=False)
    k = int(np.sum(s > rtol * s[0])) if s.size and s[0] > 0 else 0
    k = k if rank is None else min(k, rank)
    return vt[:k].T


def principal_angles(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Principal angles (radians, ascending) between ``span(u)`` and ``span(v)``.

    Requires ``dim u <= dim v``.

    Sine-based (Knyazev and Argentati): ``sin θ`` are the singular values of
    ``(I - Q_v Q_vᵀ) Q_u``, accurate for small angles, where the cosine formula loses half
    the digits. ``span(u) ⊆ span(v)`` exactly when every angle is zero.

    Args:
        u: ``(n, p)`` spanning vectors (full column rank).
        v: ``(n, q)`` spanning vectors, ``q >= p``.

    Returns:
        ``(p,)`` angles in ``[0, π/2]``.

    Examples:
        >>> import numpy as np
        >>> e = np.eye(3)
        >>> principal_angles(e[:, :1], e[:, :2]).tolist()
        [0.0]
        >>> round(float(principal_angles(e[:, 2:], e[:, :2])[0]), 4)   # orthogonal
        1.5708
    """
    qu, _ = np.linalg.qr(np.asarray(u, np.float64))
    qv, _ = np.linalg.qr(np.asarray(v, np.float64))
    if qu.shape[1] > qv.shape[1]:
        raise ValueError(f"principal_angles: dim u = {qu.shape[1]} exceeds dim v = {qv.shape[1]}")
    rest = qu - qv @ (qv.T @ qu)
    sines = np.linalg.svd(rest, compute_uv=False)
    return np.sort(np.arcsin(np.clip(sines, 0.0, 1.0)))
