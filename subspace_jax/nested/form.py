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
    at rank ``r`` lies inside the image at rank ``r + 1`` by construction. The form carries
    its active rank itself, so it runs in any Flax layer through the shared call path
    (:func:`subspace_jax.contraction.form_call`, :func:`subspace_jax.nn.intercept`):
    ``matmul`` computes the first :attr:`width` components (a static int: the cost) with
    components from :attr:`rank` on zeroed (a traced int32 leaf: one compilation serves
    every rank up to the width, and, being an integer, it never trains; see
    :func:`subspace_jax.train.trainable_mask`). :func:`subspace_jax.nested.set_rank` sets
    both or only the traced one; :meth:`prefix` keeps a smaller copy of the factors.

    Attributes:
        a: ``(in_features, R)`` input-side factor ("down" projection, the paper's ``Aᵀ``).
        b: ``(R, out_features)`` output-side factor ("up" projection, the paper's ``Bᵀ``).
        rank: int32 scalar, the traced active rank (``<= width``; values above act as the
            width); None: no mask (the width).
        width: static int, the components computed (None: ``R``).
        fold: see :class:`~subspace_jax.forms.KernelForm` (N-D kernels).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax.nested import Nested
        >>> w = jax.random.normal(jax.random.key(0), (8, 6))
        >>> k = Nested.from_dense(w)                       # R = min(8, 6): exact
        >>> k.max_rank, k.width, int(k.rank), bool(jnp.allclose(k.materialize(), w, atol=1e-5))
        (6, 6, 6, True)
        >>> x = jnp.ones((3, 8))
        >>> bool(jnp.allclose(k.matmul_at(x, 2), x @ k.prefix(2).materialize(), atol=1e-5))
        True
        >>> k.flops(tokens=10), k.prefix(2).flops(tokens=10)     # 2 width (in + out) per token
        (1680, 560)
        >>> k3 = Nested.from_dense(jnp.ones((8, 2, 4)), max_rank=3, in_axes=(0,))  # N-D kernel
        >>> k3.shape, k3.matrix_shape, k3.materialize().shape
        ((8, 2, 4), (8, 8), (8, 2, 4))

    References:
        NSN, arXiv 2509.17874 (nested factors, SVD initialisation).
    """

    a: jax.Array
    b: jax.Array
    rank: Any = None
    width: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    def __post_init__(self):
        # Light checks only: tree maps (optax's norms, jnp.sum per leaf, the bools of a mask,
        # the Nones of train.partition) rebuild forms with other leaves, which must pass.
        shapes = [getattr(x, "shape", None) for x in (self.a, self.b)]
        if all(s is not None and len(s) == 2 for s in shapes):
            if shapes[0][1] != shapes[1][0]:
                raise ValueError("Nested needs a (in, R) and b (R, out); got a "
                                 f"{tuple(shapes[0])} and b {tuple(shapes[1])}")
            if self.width is not None:
                check_rank(self.width, int(shapes[0][1]), "width")
        if isinstance(self.width, np.integer):
            object.__setattr__(self, "width", int(self.width))

    @classmethod
    def from_dense(cls, kernel: jax.Array, max_rank: int | None = None, split: float = 0.5,
                   in_axes: int | tuple[int, ...] | None = None, *, dtype: Any = None) -> Nested:
        """Nested factors of a dense kernel from its SVD, descending order, at full width.

        With ``kernel = U diag(s) Vᵀ``, ``a = U diag(s**split)`` and
        ``b = diag(s**(1-split)) Vᵀ`` keep the top ``R`` singular triplets in descending
        order, so every prefix rank ``r`` starts as the best rank-``r`` approximation
        (Eckart–Young). ``split=0.5`` (balanced) keeps the factors' scales alike. An N-D
        kernel (``DenseGeneral``/``LinearGeneral``/``Einsum``) is folded into its
        ``(in, out)`` matrix by :func:`subspace_jax.forms.fold_kernel` and ``fold`` recorded.

        Args:
            kernel: finite dense ``(in, out)`` matrix, or an N-D kernel with ``in_axes``.
            max_rank: ``R`` in ``[1, min(in, out)]``; None: ``min(in, out)`` (exact).
            split: exponent in ``[0, 1]`` of the singular values given to ``a``.
            in_axes: for an N-D kernel, the axes that contract with the input.
            dtype: factor dtype (default: the kernel's); the SVD runs in float32.

        Returns:
            A :class:`Nested` with ``width = R`` and ``rank = R``.

        Raises:
            ValueError: an N-D kernel without ``in_axes``, a non-finite kernel, ``max_rank``
                outside ``[1, min(in, out)]``, or ``split`` outside ``[0, 1]``.

        Examples:
            >>> import jax.numpy as jnp
            >>> from subspace_jax.nested import Nested
            >>> Nested.from_dense(jnp.ones((4, 3)), max_rank=5)
            Traceback (most recent call last):
            ...
            ValueError: max_rank=5 is above min(in, out) = 3 for a (4, 3) kernel
        """
        matrix, fold = forms.fold_kernel(kernel, in_axes)
        full = min(matrix.shape)
        if max_rank is None:
            max_rank = full
        if isinstance(max_rank, bool) or not isinstance(max_rank, (int, np.integer)) \
                or max_rank < 1:
            raise ValueError(f"max_rank={max_rank!r} must be an int >= 1")
        max_rank = int(max_rank)
        if max_rank > full:
            what = (f"{tuple(kernel.shape)} kernel" if fold is None else
                    f"{tuple(kernel.shape)} kernel folded to {tuple(matrix.shape)}")
            raise ValueError(f"max_rank={max_rank} is above min(in, out) = {full} for a {what}")
        low = forms.LowRank.from_dense(matrix, rank=max_rank, split=split, dtype=dtype)
        return cls(a=low.a, b=low.b, rank=jnp.int32(max_rank), width=max_rank, fold=fold)

    @property
    def max_rank(self) -> int:
        """``R``: the number of components stored."""
        return int(self.a.shape[1])

    @property
    def active_width(self) -> int:
        """:attr:`width`, or ``R`` when it is None."""
        return self.max_rank if self.width is None else int(self.width)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return (int(self.a.shape[0]), int(self.b.shape[1]))

    @property
    def dtype(self) -> Any:
        return jnp.result_type(self.a.dtype, self.b.dtype)

    def at(self, rank: Any, width: int | None = None) -> Nested:
        """This form with the traced ``rank`` (and, if given, the static ``width``) replaced.

        No check is made on ``rank`` (it may be a tracer); ``width`` must lie in ``[1, R]``.

        Examples:
            >>> import jax.numpy as jnp
            >>> from subspace_jax.nested import Nested
            >>> k = Nested.from_dense(jnp.eye(4)).at(jnp.int32(2), width=3)
            >>> int(k.rank), k.width
            (2, 3)
        """
        if width is not None:
            width = check_rank(width, self.max_rank, "width")
        return dataclasses.replace(self, rank=jnp.asarray(rank, jnp.int32),
                                   width=self.width if width is None else width)

    def prefix(self, rank: int) -> Nested:
        """The first ``rank`` components as a smaller :class:`Nested` (static slices).

        The result computes at that rank with any plain call (``width = rank``, and the
        traced rank, if any, capped at ``rank``).

        Examples:
            >>> import jax.numpy as jnp
            >>> from subspace_jax.nested import Nested
            >>> Nested(jnp.ones((5, 4)), jnp.ones((4, 3))).prefix(2).a.shape
            (5, 2)
        """
        rank = check_rank(rank, self.max_rank)
        if rank == self.max_rank and self.width in (None, rank):
            return self
        traced = None if self.rank is None else jnp.minimum(
            jnp.asarray(self.rank, jnp.int32), jnp.int32(rank))
        return dataclasses.replace(self, a=self.a[:, :rank], b=self.b[:rank], rank=traced,
                                   width=rank)

    def matrix(self) -> jax.Array:
        """The dense ``(in, out)`` matrix at the current width and traced rank."""
        w = self.active_width
        a, b = self.a[:, :w], self.b[:w]
        if self.rank is not None:
            keep = jnp.arange(w, dtype=jnp.int32) < jnp.asarray(self.rank, jnp.int32)
            a = jnp.where(keep, a, jnp.zeros((), a.dtype))
        return jnp.matmul(a, b)

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
        """``matmul_at(x, width, rank)``: the form at its own width and traced rank."""
        return self.matmul_at(x, self.active_width, self.rank, dtype=dtype,
                              precision=precision, dot_general=dot_general)

    @property
    def nbytes(self) -> int:
        """Bytes of the two factors (the 4-byte rank scalar is not counted)."""
        return forms.nbytes(self.a) + forms.nbytes(self.b)

    def flops(self, tokens: int) -> int:
        """``2 tokens width (in + out)``: the cost at the computed width."""
        fan_in, fan_out = self.matrix_shape
        return 2 * int(tokens) * self.active_width * (fan_in + fan_out)
