"""The :class:`Nested` kernel form: one pair of factors of maximum rank R, any prefix rank.

References:
    Rauba and van der Schaar, "Deep Hierarchical Learning with Nested Subspace Networks",
    ICLR 2026, arXiv 2509.17874.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subspace_jax import forms
from subspace_jax.nested import core

__all__ = ["Nested"]


def check_rank(rank: Any, max_rank: int, what: str = "rank") -> int:
    """``rank`` as an int in ``[1, max_rank]``, else ``ValueError`` naming the bound."""
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
        raise TypeError(f"{what} must be a Python int, got {type(rank).__name__} {rank!r}")
    if not 1 <= int(rank) <= max_rank:
        raise ValueError(f"{what}={int(rank)} is outside [1, {max_rank}] (the maximum rank R)")
    return int(rank)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Nested(forms.KernelForm):
    """A kernel stored as nested factors: rank ``r`` is ``a[:, :r] @ b[:r]``, for any ``r <= R``.

    One pair of factors of maximum rank ``R`` holds every rank at once: component ``i`` is
    ``outer(a[:, i], b[i])`` and rank ``r`` keeps the first ``r`` components, so the image
    at rank ``r`` lies inside the image at rank ``r + 1`` by construction. As a form (in
    :func:`subspace_jax.forms.matmul`) it computes at its full rank ``R``;
    :meth:`matmul_at` and :meth:`prefix` give any lower rank as two thin matmuls on prefix
    slices, never a dense ``W_r``. The active rank of a model is method state on its layers
    (:class:`subspace_jax.nested.NestedLinear`), not a field here: the form stays a plain
    parameter container whose structure does not depend on the rank.

    Attributes:
        a: ``(in_features, R)`` input-side factor ("down" projection, the paper's ``Aᵀ``).
        b: ``(R, out_features)`` output-side factor ("up" projection, the paper's ``Bᵀ``).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax.nested import Nested
        >>> w = jax.random.normal(jax.random.key(0), (8, 6))
        >>> k = Nested.from_dense(w)                       # R = min(8, 6): exact
        >>> k.max_rank, bool(jnp.allclose(k.materialize(), w, atol=1e-5))
        (6, True)
        >>> x = jnp.ones((3, 8))
        >>> bool(jnp.allclose(k.matmul_at(x, 2), x @ k.prefix(2).materialize(), atol=1e-5))
        True
        >>> k.flops(tokens=10), k.prefix(2).flops(tokens=10)     # 2 r (in + out) per token
        (1680, 560)

    References:
        NSN, arXiv 2509.17874 (nested factors, SVD initialisation).
    """

    a: jax.Array
    b: jax.Array

    def __post_init__(self):
        # Only two matrices are checked: tree maps (optax's norms, jnp.sum per leaf) rebuild
        # forms with other leaves, which must pass.
        shapes = [getattr(x, "shape", None) for x in (self.a, self.b)]
        if all(s is not None and len(s) == 2 for s in shapes) and shapes[0][1] != shapes[1][0]:
            raise ValueError("Nested needs a (in, R) and b (R, out); got a "
                             f"{tuple(shapes[0])} and b {tuple(shapes[1])}")

    @classmethod
    def from_dense(cls, kernel: jax.Array, *, max_rank: int | None = None, split: float = 0.5,
                   dtype: Any = None) -> Nested:
        """Nested factors of a dense ``(in, out)`` kernel from its SVD, descending order.

        With ``kernel = U diag(s) Vᵀ``, ``a = U diag(s**split)`` and
        ``b = diag(s**(1-split)) Vᵀ`` keep the top ``R`` singular triplets in descending
        order, so every prefix rank ``r`` starts as the best rank-``r`` approximation
        (Eckart–Young). ``split=0.5`` (balanced) keeps the factors' scales alike.

        Args:
            kernel: finite dense ``(in, out)`` matrix.
            max_rank: ``R`` in ``[1, min(in, out)]``; None: ``min(in, out)`` (exact).
            split: exponent in ``[0, 1]`` of the singular values given to ``a``.
            dtype: factor dtype (default: the kernel's); the SVD runs in float32.

        Raises:
            ValueError: a non-2-D or non-finite kernel, ``max_rank`` outside
                ``[1, min(in, out)]``, or ``split`` outside ``[0, 1]``.

        Examples:
            >>> import jax.numpy as jnp
            >>> from subspace_jax.nested import Nested
            >>> Nested.from_dense(jnp.ones((4, 3)), max_rank=5)
            Traceback (most recent call last):
            ...
            ValueError: max_rank=5 is above min(in, out) = 3 for a (4, 3) kernel
        """
        if getattr(kernel, "ndim", None) != 2:
            raise ValueError("expected a 2-D (in, out) kernel, got shape "
                             f"{tuple(jnp.shape(kernel))}")
        full = min(kernel.shape)
        if max_rank is None:
            max_rank = full
        if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
            raise ValueError(f"max_rank={max_rank!r} must be an int >= 1")
        if max_rank > full:
            raise ValueError(f"max_rank={max_rank} is above min(in, out) = {full} for a "
                             f"{tuple(kernel.shape)} kernel")
        low = forms.LowRank.from_dense(kernel, rank=max_rank, split=split, dtype=dtype)
        return cls(a=low.a, b=low.b)

    @property
    def max_rank(self) -> int:
        """``R``: the number of components stored."""
        return int(self.a.shape[1])

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return (int(self.a.shape[0]), int(self.b.shape[1]))

    @property
    def dtype(self) -> Any:
        return jnp.result_type(self.a.dtype, self.b.dtype)

    def prefix(self, rank: int) -> Nested:
        """The first ``rank`` components as a smaller :class:`Nested` (static slices).

        Examples:
            >>> import jax.numpy as jnp
            >>> from subspace_jax.nested import Nested
            >>> Nested(jnp.ones((5, 4)), jnp.ones((4, 3))).prefix(2).a.shape
            (5, 2)
        """
        rank = check_rank(rank, self.max_rank)
        if rank == self.max_rank:
            return self
        return dataclasses.replace(self, a=self.a[:, :rank], b=self.b[:rank])

    def matrix(self) -> jax.Array:
        return jnp.matmul(self.a, self.b)

    def matmul_at(self, x: jax.Array, width: int, rank: jax.Array | int | None = None, *,
                  dtype: Any = None, precision: Any = None,
                  dot_general: Callable | None = None) -> jax.Array:
        """``x @ W_r``: two thin matmuls on the first ``width`` components, the rest unread.

        Args:
            x: ``(..., in_features)`` input.
            width: static Python int; the cost is ``2 width (in + out)`` FLOPs per row.
            rank: optional traced active rank ``<= width``: components ``rank..width-1``
                are zeroed (one compilation serves every rank; see
                :func:`subspace_jax.nested.core.prefix_matmul`).
            dtype, precision, dot_general: as :meth:`KernelForm.matmul`.

        Examples:
            >>> import jax.numpy as jnp
            >>> from subspace_jax.nested import Nested
            >>> k = Nested(jnp.eye(3), jnp.diag(jnp.array([3.0, 2.0, 1.0])))
            >>> k.matmul_at(jnp.ones((1, 3)), 3, rank=jnp.int32(1)).tolist()
            [[3.0, 0.0, 0.0]]
        """
        x, a, b = forms.promote((x, self.a, self.b), dtype)
        return core.prefix_matmul(x, a, b, width, rank, precision=precision,
                                  dot_general=dot_general)

    def matmul(self, x: jax.Array, *, dtype: Any = None, precision: Any = None,
               dot_general: Callable | None = None) -> jax.Array:
        return self.matmul_at(x, self.max_rank, dtype=dtype, precision=precision,
                              dot_general=dot_general)

    @property
    def nbytes(self) -> int:
        return forms.nbytes(self.a) + forms.nbytes(self.b)

    def flops(self, tokens: int) -> int:
        fan_in, fan_out = self.matrix_shape
        return 2 * int(tokens) * self.max_rank * (fan_in + fan_out)
