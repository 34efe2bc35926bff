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
import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np

from subspace_jax import linalg

Array = jax.Array

__all__ = ["KernelForm", "Fold", "fold_kernel", "collect", "emit", "absorb", "checkpoint", "LowRank", "matmul", "materialize", "nbytes", "flops", "is_form",
           "dot", "promote", "stop_gradient", "FROZEN_NAME"]

#: ``checkpoint_name`` given to frozen parameters that a form reads behind
#: ``stop_gradient`` (and to non-differentiated arguments in :mod:`subspace_jax.measure`).
FROZEN_NAME = "frozen parameter"


@dataclasses.dataclass(frozen=True)
class Fold:
    """How an N-D kernel folds into the ``(in, out)`` matrix a form factors.

    ``in_axes`` are the kernel axes that contract with the input, in the order they are
    merged into the matrix's rows; the other axes, in kernel order, are merged into its
    columns. A ``DenseGeneral``/``LinearGeneral`` kernel ``(in, heads, head_dim)`` folds with
    ``in_axes=(0,)`` into ``(in, heads * head_dim)``; its output projection
    ``(heads, head_dim, out)`` with ``in_axes=(0, 1)``; a Gemma-style ``Einsum`` weight
    ``(heads, d, head_dim)`` (``"BTD,NDH->BTNH"``) with ``in_axes=(1,)``.

    Attributes:
        shape: the N-D kernel's shape.
        in_axes: non-negative kernel axes that contract with the input.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import forms
        >>> f = forms.Fold(shape=(4, 6, 3), in_axes=(1,))
        >>> f.matrix_shape, f.out_axes
        ((6, 12), (0, 2))
        >>> w = jnp.arange(72.0).reshape(4, 6, 3)
        >>> bool((f.unfold(f.fold(w)) == w).all())
        True
    """

    shape: tuple[int, ...]
    in_axes: tuple[int, ...]

    def __post_init__(self):
        shape = tuple(int(d) for d in self.shape)
        if isinstance(self.in_axes, (int, np.integer)):
            object.__setattr__(self, "in_axes", (int(self.in_axes),))
        axes = tuple(int(a) % len(shape) if -len(shape) <= int(a) < len(shape) else None
                     for a in self.in_axes) if shape else ()
        if not shape or None in axes or len(set(axes)) != len(axes) or not axes \
                or len(axes) == len(shape):
            raise ValueError(f"in_axes={tuple(self.in_axes)!r} must name distinct axes of a "
                             f"kernel of shape {shape}, at least one and not all")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "in_axes", axes)

    @property
    def out_axes(self) -> tuple[int, ...]:
        """The kernel axes merged into the columns, in kernel order."""
        return tuple(a for a in range(len(self.shape)) if a not in self.in_axes)

    @property
    def in_shape(self) -> tuple[int, ...]:
        """The sizes of ``in_axes``."""
        return tuple(self.shape[a] for a in self.in_axes)

    @property
    def out_shape(self) -> tuple[int, ...]:
        """The sizes of ``out_axes``."""
        return tuple(self.shape[a] for a in self.out_axes)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(prod(in_shape), prod(out_shape))``."""
        return (int(np.prod(self.in_shape)), int(np.prod(self.out_shape)))

    @property
    def trivial(self) -> bool:
        """A 2-D ``(in, out)`` kernel: folding changes nothing."""
        return len(self.shape) == 2 and self.in_axes == (0,)

    def fold(self, kernel: Array) -> Array:
        """The ``(in, out)`` matrix of an N-D ``kernel`` of :attr:`shape`."""
        if tuple(kernel.shape) != self.shape:
            raise ValueError(f"kernel of shape {tuple(kernel.shape)} does not fold as {self}")
        return jnp.transpose(kernel, self.in_axes + self.out_axes).reshape(self.matrix_shape)

    def unfold(self, matrix: Array) -> Array:
        """The N-D kernel of an ``(in, out)`` ``matrix`` (inverse of :meth:`fold`)."""
        perm = self.in_axes + self.out_axes
        inverse = tuple(sorted(range(len(perm)), key=perm.__getitem__))
        return jnp.reshape(matrix, self.in_shape + self.out_shape).transpose(inverse)


def fold_kernel(kernel: Array, in_axes: int | tuple[int, ...] | None) -> tuple[Array, Fold | None]:
    """``(matrix, fold)``: the ``(in, out)`` matrix of a kernel and how to unfold it.

    A 2-D kernel with ``in_axes`` None or ``(0,)`` is its own matrix (``fold`` None). An
    N-D kernel needs ``in_axes`` (see :class:`Fold`).

    Raises:
        ValueError: an N-D kernel without ``in_axes``, or ``in_axes`` that do not fit.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import forms
        >>> m, f = forms.fold_kernel(jnp.ones((8, 2, 4)), in_axes=(0,))
        >>> m.shape, f.shape
        ((8, 8), (8, 2, 4))
        >>> forms.fold_kernel(jnp.ones((8, 4)), None)[1] is None
        True
    """
    shape = tuple(int(d) for d in getattr(kernel, "shape", ()))
    if in_axes is None:
        if len(shape) != 2:
            raise ValueError(
                f"a {len(shape)}-D kernel of shape {shape} needs in_axes (the kernel axes "
                "that contract with the input): set in_axes on the rule, e.g. (0,) for a "
                "DenseGeneral/LinearGeneral q/k/v kernel (in, heads, head_dim), (0, 1) for "
                "its output projection (heads, head_dim, out), or let adopt()/convert() "
                "record them from the model (subspace_jax.nn.kernel_axes)")
        in_axes = (0,)
    fold = Fold(shape, in_axes if isinstance(in_axes, tuple) else (in_axes,))
    if fold.trivial:
        return kernel, None
    return fold.fold(kernel), fold


@dataclasses.dataclass(frozen=True)
class KernelForm(abc.ABC):
    """The protocol every kernel form follows (see the module docstring).

    Subclasses are frozen dataclasses registered with
    ``jax.tree_util.register_dataclass``; their array fields are pytree leaves. A form
    factors an ``(in, out)`` matrix (:attr:`matrix_shape`, :meth:`matrix`, :meth:`matmul`);
    when it stands for an N-D kernel (``DenseGeneral``/``LinearGeneral``/``Einsum``) its
    static :attr:`fold` says how that kernel folds into the matrix, :attr:`shape` is the
    kernel's N-D shape and :meth:`materialize` returns the N-D kernel.

    Attributes:
        fold: None for a plain 2-D ``(in, out)`` kernel, else the :class:`Fold` of the
            N-D kernel this form stands for (static, keyword-only).

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import forms
        >>> k = forms.LowRank(a=jnp.ones((6, 2)), b=jnp.ones((2, 4)))
        >>> isinstance(k, forms.KernelForm), k.shape
        (True, (6, 4))
        >>> k3 = forms.LowRank(jnp.ones((6, 2)), jnp.ones((2, 4)), fold=forms.Fold((6, 2, 2), (0,)))
        >>> k3.shape, k3.matrix_shape, k3.materialize().shape
        ((6, 2, 2), (6, 4), (6, 2, 2))
    """

    fold: Fold | None = dataclasses.field(default=None, kw_only=True,
                                          metadata=dict(static=True))

    @property
    @abc.abstractmethod
    def matrix_shape(self) -> tuple[int, int]:
        """``(in, out)`` of the matrix the form factors (the folded kernel)."""

    @property
    def shape(self) -> tuple[int, ...]:
        """The kernel's logical shape: :attr:`matrix_shape`, or the N-D shape of :attr:`fold`."""
        return self.fold.shape if self.fold is not None else self.matrix_shape

    @abc.abstractmethod
    def matrix(self) -> Array:
        """The dense ``(in, out)`` matrix (the folded kernel)."""

    def materialize(self) -> Array:
        """The dense kernel this form stands for, in its original (N-D) shape."""
        m = self.matrix()
        return m if self.fold is None else self.fold.unfold(m)

    @property
    @abc.abstractmethod
    def dtype(self) -> Any:
        """The dtype of ``materialize()`` and of ``matmul`` outputs for same-dtype inputs."""

    #: Names of array fields that are carried but never trained (no gradient, no
    #: optimizer state). Integer and bool fields never train whatever this says.
    frozen_fields: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def matmul(self, x: Array, *, dtype: Any = None, precision: Any = None,
               dot_general: Callable | None = None) -> Array:
        """``x @ matrix`` over the last axis of ``x``, never forming the dense matrix.

        An N-D kernel's input axes are folded into the last axis of ``x`` by the caller
        (:func:`subspace_jax.nn.form_call`), and the output's last axis is the folded
        output axes.

        Args:
            x: ``(..., in)`` input (``in = matrix_shape[0]``).
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

    @property
    def state_key(self) -> str | None:
        """The key under which a form that refreshes state in its forward :func:`emit`-s it
        (WASI's activation bases); None for forms without such state."""
        return None

    def absorb(self, value: Any) -> "KernelForm":
        """This form with the state it emitted under :attr:`state_key` put back."""
        raise TypeError(f"{type(self).__name__} carries no per-step state")


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
        in_axes: int | tuple[int, ...] | None = None,
    ) -> "LowRank":
        """Factor a dense ``(in, out)`` (or N-D, folded) kernel by truncated SVD.

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
            in_axes: for an N-D kernel, the axes that contract with the input (see
                :class:`Fold`); the folded matrix is factored and ``fold`` recorded.

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
        matrix, fold = fold_kernel(kernel, in_axes)
        u, s, vt = linalg.truncated_svd(matrix, rank, eps=eps)
        out_dtype = jnp.dtype(dtype) if dtype is not None else jnp.dtype(kernel.dtype)
        a = (u * s[None, :] ** split).astype(out_dtype)
        b = (s[:, None] ** (1.0 - split) * vt).astype(out_dtype)
        return cls(a=a, b=b, fold=fold)

    @property
    def rank(self) -> int:
        """The number of columns of ``a`` (rows of ``b``)."""
        return int(self.a.shape[1])

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return (int(self.a.shape[0]), int(self.b.shape[1]))

    @property
    def dtype(self) -> Any:
        return jnp.result_type(self.a.dtype, self.b.dtype)

    def matrix(self) -> Array:
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
        fan_in, fan_out = self.matrix_shape
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
    return 2 * int(tokens) * int(np.prod(kernel.shape))


_EMITTED = threading.local()


@contextlib.contextmanager
def collect() -> Iterator[dict[str, Any]]:
    """Collect what forms :func:`emit` during the block: ``{state_key: value}``.

    A form whose forward refreshes state (WASI's activation bases) cannot return it through
    the model's own code, so it emits it; the shared train step collects it inside the
    differentiated function, returns it alongside the loss and :func:`absorb`-s it into the
    new parameters. Outside any block, :func:`emit` does nothing (evaluation).

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import forms
        >>> with forms.collect() as got:
        ...     forms.emit("mlp/up/kernel", jnp.ones(2))
        >>> sorted(got)
        ['mlp/up/kernel']
    """
    stack = _EMITTED.__dict__.setdefault("stack", [])
    found: dict[str, Any] = {}
    stack.append(found)
    try:
        yield found
    finally:
        stack.pop()


def emit(key: str, value: Any) -> None:
    """Hand refreshed per-step state to the innermost :func:`collect` block, if any.

    Raises:
        ValueError: a second emission under the same key in one block.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import forms
        >>> forms.emit("ignored", jnp.ones(2))          # outside collect(): nothing happens
        >>> with forms.collect() as got:
        ...     forms.emit("a", 1)
        ...     forms.emit("a", 2)
        Traceback (most recent call last):
        ...
        ValueError: two forms emitted state under 'a': give each its own state_key (one layer called twice in one step is not supported)
    """
    stack = getattr(_EMITTED, "stack", None)
    if stack:
        if key in stack[-1]:
            raise ValueError(f"two forms emitted state under {key!r}: give each its own "
                             "state_key (one layer called twice in one step is not supported)")
        stack[-1][key] = value


def absorb(tree: Any, emitted: dict[str, Any]) -> Any:
    """``tree`` with every form whose :attr:`KernelForm.state_key` is in ``emitted`` updated.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import forms
        >>> forms.absorb({"k": jnp.ones(2)}, {})["k"].shape
        (2,)
    """
    if not emitted:
        return tree

    def one(leaf):
        key = leaf.state_key if is_form(leaf) else None
        return leaf.absorb(emitted[key]) if key in emitted else leaf

    return jax.tree_util.tree_map(one, tree, is_leaf=is_form)


def checkpoint(fn: Callable, **kwargs: Any) -> Callable:
    """``jax.checkpoint(fn, **kwargs)`` that carries the state forms :func:`emit` inside it.

    A value may not leave ``jax.checkpoint`` (nor ``scan``) by a side channel, so a form that
    emits refreshed state (WASI) inside a rematerialised function would leak a tracer. This
    collects the emissions inside, returns them as outputs of the checkpointed function and
    emits them again outside. Forms that emit nothing need no help: plain
    ``jax.checkpoint`` works for them.

    Args:
        fn: the function to rematerialise (positional array/pytree arguments).
        **kwargs: for ``jax.checkpoint`` (``policy``, ``prevent_cse``, ``static_argnums``).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import forms
        >>> def f(x):
        ...     forms.emit("seen", x.sum())
        ...     return jnp.sin(x)
        >>> def loss(x):                         # as the train step does: collected inside
        ...     with forms.collect() as got:
        ...         y = forms.checkpoint(f)(x).sum()
        ...     return y, got["seen"]
        >>> (_, seen), g = jax.value_and_grad(loss, has_aux=True)(jnp.ones(3))
        >>> float(seen), g.shape
        (3.0, (3,))
    """
    def inner(*args):
        with collect() as found:
            out = fn(*args)
        return out, dict(found)

    remat = jax.checkpoint(inner, **kwargs)

    def outer(*args):
        out, found = remat(*args)
        for key, value in found.items():
            emit(key, value)
        return out

    return outer
