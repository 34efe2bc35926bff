"""How a Flax layer contracts its input with its kernel, and the one call path for forms.

Every Flax layer this library supports computes one contraction of its input ``x`` with a
kernel: ``Dense``/``nnx.Linear`` the last axis of ``x`` with kernel axis 0,
``DenseGeneral``/``nnx.LinearGeneral`` some axes of ``x`` with the leading kernel axes, and
``Einsum`` whatever its equation says. A :class:`Contraction` records that once (which axes
of ``x``, which kernel axes, how the output is laid out), so one function,
:func:`form_call`, runs any :class:`~subspace_jax.forms.KernelForm` in any of those layers:
the contracted axes of ``x`` are folded into one, the form's ``matmul`` runs on its
``(in, out)`` matrix (never forming the dense kernel), and the result is unfolded to the
layer's output layout. The form's :class:`~subspace_jax.forms.Fold` must say the same kernel
axes contract as the layer does; if not, the error names the layer and both.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from subspace_jax import forms

__all__ = ["Contraction", "dense", "general", "einsum", "form_call"]


@dataclasses.dataclass(frozen=True)
class Contraction:
    """One layer's contraction of ``x`` with its kernel.

    Attributes:
        x_axes: non-negative axes of ``x`` that contract, paired in order with ``in_axes``.
        in_axes: the kernel axes they contract with (the form's ``fold.in_axes``).
        out_perm: a permutation applied to ``(x's free axes..., kernel's out axes...)`` to
            give the layer's output layout, or None when that order is the output's.

    Examples:
        >>> from subspace_jax import contraction
        >>> contraction.einsum("BTD,NDH->BTNH", x_ndim=3)
        Contraction(x_axes=(2,), in_axes=(1,), out_perm=None)
        >>> contraction.general((-2, -1), x_ndim=4)
        Contraction(x_axes=(2, 3), in_axes=(0, 1), out_perm=None)
    """

    x_axes: tuple[int, ...]
    in_axes: tuple[int, ...]
    out_perm: tuple[int, ...] | None = None


def dense(x_ndim: int) -> Contraction:
    """``Dense`` / ``nnx.Linear``: the last axis of ``x`` with kernel axis 0.

    Examples:
        >>> from subspace_jax import contraction
        >>> contraction.dense(x_ndim=3)
        Contraction(x_axes=(2,), in_axes=(0,), out_perm=None)
    """
    return Contraction((x_ndim - 1,), (0,))


def general(axis: int | Sequence[int], x_ndim: int) -> Contraction:
    """``DenseGeneral`` / ``nnx.LinearGeneral`` (no batch axes): ``axis`` of ``x`` with the
    leading kernel axes; the output is ``x``'s other axes, then the features.

    Examples:
        >>> from subspace_jax import contraction
        >>> contraction.general(-1, x_ndim=3)                  # q/k/v: (d, heads, head_dim)
        Contraction(x_axes=(2,), in_axes=(0,), out_perm=None)
    """
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    axes = tuple(int(a) % x_ndim for a in axes)
    return Contraction(axes, tuple(range(len(axes))))


def einsum(equation: str, x_ndim: int) -> Contraction:
    """An ``Einsum`` layer's equation ``"<x>,<kernel>-><out>"`` (an ellipsis on ``x`` allowed).

    Raises:
        ValueError: an equation this library cannot fold: a letter shared by ``x``, the
            kernel and the output (a batched contraction), or a letter summed away on one
            side only.

    Examples:
        >>> from subspace_jax import contraction
        >>> contraction.einsum("...D,NDH->...NH", x_ndim=3)
        Contraction(x_axes=(2,), in_axes=(1,), out_perm=None)
        >>> contraction.einsum("BTD,DNH->BHTN", x_ndim=3).out_perm    # output reordered
        (0, 3, 1, 2)
        >>> contraction.einsum("BND,NDH->BNH", x_ndim=3)
        Traceback (most recent call last):
        ...
        ValueError: Einsum equation 'BND,NDH->BNH': 'N' is a batch axis of both x and the kernel; a kernel form needs a plain contraction
    """
    eq = equation.replace(" ", "")
    if "->" not in eq or eq.count(",") != 1:
        raise ValueError(f"Einsum equation {equation!r} must read '<x>,<kernel>-><out>'")
    lhs, rest = eq.split(",")
    rhs, out = rest.split("->")
    spare = "".join(c for c in string.ascii_uppercase + string.ascii_lowercase
                    if c not in eq)
    if "..." in rhs:
        raise ValueError(f"Einsum equation {equation!r}: an ellipsis on the kernel side is "
                         "not supported")
    if "..." in lhs:
        letters = spare[: x_ndim - (len(lhs) - 3)]
        lhs, out = lhs.replace("...", letters), out.replace("...", letters)
    contracted = [c for c in rhs if c in lhs and c not in out]
    batched = [c for c in rhs if c in lhs and c in out]
    if batched:
        raise ValueError(f"Einsum equation {equation!r}: {''.join(batched)!r} is a batch axis "
                         "of both x and the kernel; a kernel form needs a plain contraction")
    kernel_out = [c for c in rhs if c not in contracted]
    x_free = [c for c in lhs if c not in contracted]
    lost = [c for c in kernel_out + x_free if c not in out]
    if not contracted or lost:
        raise ValueError(f"Einsum equation {equation!r} does not contract x with the kernel "
                         "into the output (summed-away or missing axes)")
    x_axes = tuple(lhs.index(c) for c in contracted)
    in_axes = tuple(rhs.index(c) for c in contracted)
    order = x_free + kernel_out
    perm = tuple(order.index(c) for c in out)
    return Contraction(x_axes, in_axes, None if perm == tuple(range(len(perm))) else perm)


def _kernel_in_axes(form: forms.KernelForm) -> tuple[int, ...]:
    return form.fold.in_axes if form.fold is not None else (0,)


def _out_shape(form: forms.KernelForm) -> tuple[int, ...]:
    return form.fold.out_shape if form.fold is not None else (form.matrix_shape[1],)


def _in_shape(form: forms.KernelForm) -> tuple[int, ...]:
    return form.fold.in_shape if form.fold is not None else (form.matrix_shape[0],)


def form_call(form: forms.KernelForm, x: jax.Array, contraction: Contraction, *,
              bias: jax.Array | None = None, bias_shape: Sequence[int] | None = None,
              dtype: Any = None, promote: Callable | None = None, precision: Any = None,
              dot_general: Callable | None = None, where: str = "layer") -> jax.Array:
    """A layer's output with a kernel form in its kernel slot: the one call path.

    ``x``'s contracted axes are moved last and folded into one, ``form.matmul`` computes
    the product with the form's ``(in, out)`` matrix, the result is unfolded into the
    kernel's output axes and laid out as the layer lays out its output; then the bias.

    Args:
        form: the kernel form.
        x: the layer's input.
        contraction: the layer's :class:`Contraction`.
        bias: the layer's bias, or None.
        bias_shape: the shape the bias is reshaped to before it is added (None: it is
            broadcast against the trailing axes of the output).
        dtype: the layer's compute dtype (None: promoted from ``x``, the form and the bias).
        promote: the layer's ``promote_dtype`` as ``promote((x, bias), dtype) -> (x, bias)``
            (None: :func:`subspace_jax.forms.promote`).
        precision: passed to every contraction of the form.
        dot_general: computes every contraction of the form (None: ``jax.lax.dot_general``).
        where: the layer's name, for errors.

    Raises:
        ValueError: the form's fold does not contract the kernel axes the layer contracts,
            or ``x``'s contracted axes do not have the kernel's sizes.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import contraction, forms
        >>> w = jax.random.normal(jax.random.key(0), (4, 8, 6))          # (heads, d, head_dim)
        >>> k = forms.LowRank.from_dense(w, rank=8, in_axes=(1,))         # full rank: exact
        >>> x = jax.random.normal(jax.random.key(1), (2, 5, 8))
        >>> y = contraction.form_call(k, x, contraction.einsum("BTD,NDH->BTNH", 3))
        >>> bool(jnp.allclose(y, jnp.einsum("BTD,NDH->BTNH", x, w), atol=1e-4)), y.shape
        (True, (2, 5, 4, 6))
    """
    if tuple(_kernel_in_axes(form)) != tuple(contraction.in_axes):
        raise ValueError(
            f"{where}: the {type(form).__name__} kernel (shape {form.shape}) was folded with "
            f"in_axes={_kernel_in_axes(form)}, but this layer contracts kernel axes "
            f"{contraction.in_axes} with its input; convert it with in_axes="
            f"{contraction.in_axes} on the rule")
    want = _in_shape(form)
    got = tuple(x.shape[a] for a in contraction.x_axes)
    if got != want:
        raise ValueError(f"{where}: input axes {contraction.x_axes} of x {tuple(x.shape)} have "
                         f"sizes {got}, the {type(form).__name__} kernel expects {want}")
    if dtype is None:
        dtype = jnp.result_type(x, form.dtype, *([] if bias is None else [bias]))
    if promote is None:
        x, bias = forms.promote((x, bias), dtype)
    else:
        x, bias = promote((x, bias), dtype)
    free = tuple(a for a in range(x.ndim) if a not in contraction.x_axes)
    perm = free + tuple(contraction.x_axes)
    if perm != tuple(range(x.ndim)):
        x = jnp.transpose(x, perm)
    lead = x.shape[: len(free)]
    y = form.matmul(x.reshape(lead + (int(np.prod(want)),)), dtype=dtype, precision=precision,
                    dot_general=dot_general)
    y = y.reshape(lead + _out_shape(form))
    if contraction.out_perm is not None:
        y = jnp.transpose(y, contraction.out_perm)
    if bias is not None:
        shape = tuple(bias_shape) if bias_shape is not None else bias.shape
        y = y + jnp.reshape(bias, (1,) * (y.ndim - len(shape)) + shape)
    return y
