"""Kernel forms: small pytrees that stand where a dense ``kernel (in, out)`` stood.

A Flax ``Linear`` computes ``y = x @ kernel + bias`` with ``kernel`` of shape
``(in_features, out_features)``. Every method of this library replaces that dense
matrix by a structured *form* (two low-rank factors, nested factors, binary
factors with scales, ...). Each form is a frozen dataclass registered as a JAX
pytree, so it flows through ``jax.jit``, ``jax.grad``, optax and orbax like any
array, and it follows one protocol, :class:`KernelForm`:

* ``shape`` and ``dtype`` of the dense kernel it stands for,
* ``materialize()``: the dense ``(in, out)`` matrix (for checks and export),
* ``matmul(x)``: ``x @ kernel`` for ``x`` with any leading batch dims, computed
  from the factors without ever forming the dense matrix,
* ``nbytes``/``bits``: what it stores, and ``flops(tokens)``: the multiply-add
  FLOPs (counted as 2 per multiply-add) of ``matmul`` on ``tokens`` rows,
* ``frozen_fields``: the array fields it carries but never trains (LoRA's base
  kernel). Together with integer and bool leaves (packed bits), which never train
  either, they are the one freeze mechanism of :func:`subspace_jax.train.trainable_mask`.

Every contraction inside a form goes through :func:`dot`, which calls the
``dot_general`` it is given (``nnx.Linear.dot_general`` when the form sits in a
:class:`subspace_jax.nn.Linear`), so libraries that intercept ``dot_general``
(quantisation, sharding hints) see each matmul. :func:`promote` casts floating inputs
to the compute dtype and leaves integer storage alone. A frozen array that a form
reads behind :func:`stop_gradient` is tagged with :data:`FROZEN_NAME`, so
:func:`subspace_jax.measure.saved_residuals` counts it as a parameter, not as an
activation.

The free functions :func:`matmul`, :func:`materialize`, :func:`nbytes` and
:func:`flops` accept a form *or* a plain array (a dense kernel), so code that
consumes kernels never needs to branch on their type.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np

from subspace_jax import linalg

Array = jax.Array

__all__ = ["KernelForm", "LowRank", "matmul", "materialize", "nbytes", "flops", "is_form",
           "dot", "promote", "stop_gradient", "FROZEN_NAME"]

#: ``checkpoint_name`` given to frozen parameters that a form reads behind
#: ``stop_gradient`` (and to non-differentiated arguments in :mod:`subspace_jax.measure`).
FROZEN_NAME = "frozen parameter"


class KernelForm(abc.ABC):
    """The protocol every kernel form follows (see the module docstring).

    Subclasses are frozen dataclasses registered with
    ``jax.tree_util.register_dataclass``; their array fields are pytree leaves.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import forms
        >>> k = forms.LowRank(a=jnp.ones((6, 2)), b=jnp.ones((2, 4)))
        >>> isinstance(k, forms.KernelForm), k.shape
        (True, (6, 4))
    """

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, int]:
        """Logical ``(in_features, out_features)`` of the dense kernel."""

    @property
    @abc.abstractmethod
    def dtype(self) -> Any:
        """The dtype of ``materialize()`` and of ``matmul`` outputs for same-dtype inputs."""

    @abc.abstractmethod
    def materialize(self) -> Array:
        """The dense ``(in, out)`` kernel this form stands for."""

    #: Names of array fields that are carried but never trained (no gradient, no
    #: optimizer state). Integer and bool fields never train whatever this says.
    frozen_fields: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def matmul(self, x: Array, *, dtype: Any = None, precision: Any = None,
               dot_general: Callable | None = None) -> Array:
        """``x @ kernel`` over the last axis of ``x``, never forming the dense kernel.

        Args:
            x: ``(..., in_features)`` input.
            dtype: compute dtype (None: the common dtype of ``x`` and the factors).
            precision: passed to every contraction.
            dot_general: called for every contraction (see :func:`dot`); None means
                ``jax.lax.dot_general``.
        """

    @property
    @abc.abstractmethod
    def nbytes(self) -> int:
        """Bytes this form stores."""

    @abc.abstractmethod
    def flops(self, tokens: int) -> int:
        """FLOPs (2 per multiply-add) of ``matmul`` applied to ``tokens`` rows."""

    @property
    def bits(self) -> int:
        """Bits this form stores: ``8 * nbytes``; a form that packs bits overrides it."""
        return 8 * self.nbytes


def _leaf_nbytes(x: Any) -> int:
    return int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize


def _has_shape(*xs: Any) -> bool:
    return all(hasattr(x, "shape") and hasattr(x, "dtype") for x in xs)


def _is_inexact(x: Any) -> bool:
    return jnp.issubdtype(jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype,
                          jnp.inexact)


def promote(xs: tuple[Any, ...], dtype: Any = None) -> tuple[Any, ...]:
    """Cast the floating arrays of ``xs`` to ``dtype``, or to their common dtype.

    Integer and bool arrays (packed bits, indices) pass through untouched, and they
    take no part in choosing the common dtype. ``None`` entries pass through (an
    absent bias). Strict dtype promotion rules apply to the common dtype.

    Args:
        xs: arrays (or None).
        dtype: the target dtype; None means ``jnp.result_type`` of the floating arrays.

    Returns:
        A tuple in the order of ``xs``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import forms
        >>> x, bits, none = forms.promote((jnp.ones(2, jnp.bfloat16), jnp.ones(2, jnp.uint8), None),
        ...                               jnp.float32)
        >>> x.dtype, bits.dtype, none
        (dtype('float32'), dtype('uint8'), None)
    """
    floats = [x for x in xs if x is not None and _is_inexact(x)]
    if dtype is not None:
        target = jnp.dtype(dtype)
    elif floats:
        target = jnp.result_type(*floats)
    else:
        return tuple(xs)
    return tuple(jnp.asarray(x, target) if x is not None and _is_inexact(x) else x for x in xs)


def dot(x: Array, w: Array, *, precision: Any = None, dot_general: Callable | None = None,
        **kwargs: Any) -> Array:
    """``x @ w`` contracting the last axis of ``x`` with the first axis of ``w``.

    The contraction is ``dot_general(x, w, dimension_numbers, precision=precision,
    **kwargs)``, so a module's own ``dot_general`` (which a quantisation library may
    have replaced) computes it. Inputs must already share a dtype (see :func:`promote`).

    Args:
        x: ``(..., k)`` array.
        w: ``(k, n)`` array.
        precision: passed on.
        dot_general: the contraction; None means ``jax.lax.dot_general``.
        **kwargs: extra keywords for ``dot_general`` (``preferred_element_type``,
            ``out_sharding``).

    Returns:
        ``(..., n)`` array.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import forms
        >>> forms.dot(jnp.ones((2, 5, 3)), jnp.ones((3, 4))).shape
        (2, 5, 4)
        >>> calls = []
        >>> def spy(*args, **kwargs):
        ...     calls.append(args[2]); return jax.lax.dot_general(*args, **kwargs)
        >>> import jax; _ = forms.dot(jnp.ones((2, 3)), jnp.ones((3, 4)), dot_general=spy)
        >>> calls
        [(((1,), (0,)), ((), ()))]
    """
    fn = jax.lax.dot_general if dot_general is None else dot_general
    return fn(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision, **kwargs)


def stop_gradient(x: Array) -> Array:
    """``jax.lax.stop_gradient`` for a frozen parameter, tagged :data:`FROZEN_NAME`.

    The tag (``jax.ad_checkpoint.checkpoint_name``) lets
    :func:`subspace_jax.measure.saved_residuals` recognise a saved copy as the
    parameter itself. Use ``jax.lax.stop_gradient`` for activations: those are counted.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import forms
        >>> jax.grad(lambda w: (forms.stop_gradient(w) * w).sum())(jnp.ones(2)).tolist()
        [1.0, 1.0]
    """
    return jax.ad_checkpoint.checkpoint_name(jax.lax.stop_gradient(x), FROZEN_NAME)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowRank(KernelForm):
    """A kernel stored as two factors: ``kernel = a @ b``.

    ``a`` has shape ``(in, rank)`` and ``b`` has shape ``(rank, out)`` (Flax
    layout), so ``x @ kernel == (x @ a) @ b``. How the singular values are
    split between the factors is up to the caller (:meth:`from_dense`).

    Attributes:
        a: ``(in_features, rank)`` input-side factor.
        b: ``(rank, out_features)`` output-side factor.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import forms
        >>> w = jax.random.normal(jax.random.key(0), (8, 6))
        >>> k = forms.LowRank.from_dense(w, rank=6)          # full rank: exact
        >>> bool(jnp.allclose(k.materialize(), w, atol=1e-5))
        True
        >>> k2 = forms.LowRank.from_dense(w, rank=2)
        >>> k2.a.shape, k2.b.shape, k2.rank, k2.flops(tokens=10)
        ((8, 2), (2, 6), 2, 560)
        >>> k2.matmul(jnp.ones((3, 5, 8))).shape
        (3, 5, 6)
        >>> jax.tree.map(jnp.sum, k2).a.shape   # optax-style maps to scalars rebuild it
        ()
    """

    a: Array
    b: Array

    def __post_init__(self):
        # Light check only: pytree maps rebuild forms with other leaves (bools of a mask,
        # None of train.partition, and scalars: optax's global norm maps jnp.sum(x * x)).
        if _has_shape(self.a, self.b) and (len(self.a.shape), len(self.b.shape)) != (0, 0):
            if len(self.a.shape) != 2 or len(self.b.shape) != 2 or self.a.shape[1] != self.b.shape[0]:
                raise ValueError(
                    "LowRank needs a (in, rank) and b (rank, out); got a "
                    f"{tuple(self.a.shape)} and b {tuple(self.b.shape)}"
                )

    @classmethod
    def from_dense(
        cls,
        kernel: Array,
        *,
        rank: int | None = None,
        eps: float | None = None,
        split: float = 0.5,
        dtype: Any = None,
    ) -> "LowRank":
        """Factor a dense ``(in, out)`` kernel by truncated SVD.

        With ``kernel = U diag(s) V^T`` truncated to ``K`` terms,
        ``a = U diag(s**split)`` and ``b = diag(s**(1 - split)) V^T``. ``split=0.5``
        is the balanced split (NSN), ``split=1`` puts all singular values in ``a``
        so ``b`` has orthonormal rows (WASI's orthonormal output-side basis),
        ``split=0`` puts them in ``b``.

        Args:
            kernel: dense ``(in, out)`` matrix; must be finite.
            rank: keep exactly this many singular triplets (``1 <= rank <= min(in, out)``).
            eps: instead of ``rank``, keep the smallest rank whose share of the
                squared singular values reaches ``eps`` in ``(0, 1]``.
            split: exponent in ``[0, 1]`` of the singular values given to ``a``.
            dtype: dtype of the factors (default: the kernel's dtype). The SVD is
                computed in float32.

        Returns:
            A :class:`LowRank` whose product is the best rank-``K`` approximation
            of ``kernel`` (Eckart–Young).

        Raises:
            ValueError: for a non-2-D kernel, NaN/Inf entries, a rank out of range,
                ``eps`` outside ``(0, 1]``, both or neither of ``rank``/``eps``, or
                ``split`` outside ``[0, 1]``.

        Examples:
            >>> import jax, jax.numpy as jnp
            >>> from subspace_jax import forms
            >>> w = jnp.diag(jnp.array([3.0, 2.0, 1.0]))
            >>> forms.LowRank.from_dense(w, eps=0.9).rank    # (9 + 4) / 14 >= 0.9
            2

        References:
            Eckart & Young (1936); WASI, arXiv 2510.09160; NSN, arXiv 2509.17874.
        """
        if not 0.0 <= float(split) <= 1.0:
            raise ValueError(f"split must be in [0, 1], got {split}")
        u, s, vt = linalg.truncated_svd(kernel, rank, eps=eps)
        out_dtype = jnp.dtype(dtype) if dtype is not None else jnp.dtype(kernel.dtype)
        a = (u * s[None, :] ** split).astype(out_dtype)
        b = (s[:, None] ** (1.0 - split) * vt).astype(out_dtype)
        return cls(a=a, b=b)

    @property
    def rank(self) -> int:
        """The number of columns of ``a`` (rows of ``b``)."""
        return int(self.a.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.a.shape[0]), int(self.b.shape[1]))

    @property
    def dtype(self) -> Any:
        return jnp.result_type(self.a.dtype, self.b.dtype)

    def materialize(self) -> Array:
        return jnp.matmul(self.a, self.b)

    def matmul(self, x: Array, *, dtype: Any = None, precision: Any = None,
               dot_general: Callable | None = None) -> Array:
        x, a, b = promote((x, self.a, self.b), dtype)
        h = dot(x, a, precision=precision, dot_general=dot_general)
        return dot(h, b, precision=precision, dot_general=dot_general)

    @property
    def nbytes(self) -> int:
        return _leaf_nbytes(self.a) + _leaf_nbytes(self.b)

    def flops(self, tokens: int) -> int:
        fan_in, fan_out = self.shape
        return 2 * int(tokens) * self.rank * (fan_in + fan_out)


def is_form(x: Any) -> bool:
    """Whether ``x`` is a kernel form (a :class:`KernelForm` instance).

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import forms
        >>> forms.is_form(jnp.ones((2, 2))), forms.is_form(forms.LowRank(jnp.ones((2, 1)), jnp.ones((1, 2))))
        (False, True)
    """
    return isinstance(x, KernelForm)


def matmul(x: Array, kernel: Any, *, dtype: Any = None, precision: Any = None,
           dot_general: Callable | None = None) -> Array:
    """``x @ kernel`` for a dense kernel or any kernel form.

    Args:
        x: input with any leading batch dims; last axis is ``in_features``.
        kernel: a dense ``(in, out)`` array or a :class:`KernelForm`.
        dtype: compute dtype (default: the common dtype of ``x`` and the kernel).
        precision: passed to the matmuls.
        dot_general: the contraction (see :func:`dot`); None means ``jax.lax.dot_general``.

    Returns:
        ``(..., out_features)`` array.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import forms
        >>> forms.matmul(jnp.ones((2, 3)), jnp.ones((3, 4))).shape
        (2, 4)
    """
    if is_form(kernel):
        return kernel.matmul(x, dtype=dtype, precision=precision, dot_general=dot_general)
    x, kernel = promote((x, kernel), dtype)
    return dot(x, kernel, precision=precision, dot_general=dot_general)


def materialize(kernel: Any) -> Array:
    """The dense ``(in, out)`` matrix of a single kernel; a dense kernel is returned as is.

    This takes one kernel (a form or an array), not a tree. To turn every
    form in a parameter tree back into dense arrays use
    :func:`subspace_jax.transforms.materialize` (exported as
    ``subspace_jax.materialize``), which maps this function over the tree.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import forms
        >>> forms.materialize(forms.LowRank(jnp.ones((3, 1)), jnp.ones((1, 2)))).shape
        (3, 2)
    """
    return kernel.materialize() if is_form(kernel) else kernel


def nbytes(kernel: Any) -> int:
    """Bytes stored by a form or a dense array (works on ``jax.ShapeDtypeStruct`` too).

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import forms
        >>> forms.nbytes(jnp.ones((3, 4))), forms.nbytes(forms.LowRank(jnp.ones((3, 1)), jnp.ones((1, 4))))
        (48, 28)
    """
    return kernel.nbytes if is_form(kernel) else _leaf_nbytes(kernel)


def flops(kernel: Any, tokens: int) -> int:
    """FLOPs (2 per multiply-add) of ``x @ kernel`` on ``tokens`` rows.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import forms
        >>> forms.flops(jnp.ones((3, 4)), tokens=5)
        120
    """
    if is_form(kernel):
        return kernel.flops(tokens)
    fan_in, fan_out = kernel.shape
    return 2 * int(tokens) * int(fan_in) * int(fan_out)
