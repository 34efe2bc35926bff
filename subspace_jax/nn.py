"""Flax NNX integration: a ``Linear`` that accepts any kernel form, and model surgery.

* :class:`Linear` is a drop-in subclass of ``flax.nnx.Linear``: same constructor,
  same ``kernel (in, out)`` / ``bias`` names and layout, same dtype handling.
  When ``kernel`` holds a dense array it runs exactly ``nnx.Linear``'s code
  (bit-identical outputs); when it holds a :class:`~subspace_jax.forms.KernelForm`
  it calls the form's ``matmul`` and never forms the dense matrix.
* :func:`adopt` returns a copy of any NNX model whose ``nnx.Linear`` modules are
  replaced by :class:`Linear` (outputs unchanged), so tree transforms can then put
  kernel forms in their ``kernel`` slots.
* :class:`SubspaceState` is the base ``nnx.Variable`` type for method state that
  is not a trainable parameter (WASI's activation bases, NSN's active rank), so
  ``nnx.split(model, nnx.Param, ...)`` keeps training clean.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from subspace_jax import forms

__all__ = ["Linear", "SubspaceState", "adopt", "linears"]


class SubspaceState(nnx.Variable):
    """Base type of non-trainable method state stored on a model.

    Subclass it per method (e.g. an activation basis) so filters can select it:
    ``nnx.split(model, nnx.Param, SubspaceState)`` gives trainable parameters and
    method state as separate states.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from subspace_jax import nn as sjnn
        >>> class Basis(sjnn.SubspaceState): pass
        >>> layer = sjnn.Linear(4, 3, rngs=nnx.Rngs(0))
        >>> layer.basis = Basis(jnp.eye(3))
        >>> _, params, state = nnx.split(layer, nnx.Param, sjnn.SubspaceState)
        >>> sorted(params.keys()), sorted(state.keys())
        (['bias', 'kernel'], ['basis'])
    """


class Linear(nnx.Linear):
    """``nnx.Linear`` whose ``kernel`` may hold any kernel form.

    Constructor and attributes are those of ``flax.nnx.Linear``. With a dense kernel the
    call is ``nnx.Linear``'s own. After a tree transform has put a
    :class:`~subspace_jax.forms.KernelForm` in ``kernel``, the call computes
    ``form.matmul(x) + bias`` and honours the module's settings:

    * ``dtype`` (the compute dtype; None: promoted from input, form and bias),
    * ``promote_dtype`` (called on the input and bias, as ``nnx.Linear`` does),
    * ``precision``, and ``dot_general``, which computes every contraction of the form
      (so a library that swaps ``dot_general``, e.g. for quantisation, sees them).

    ``preferred_element_type`` and ``out_sharding`` have no single meaning for a form's
    chain of thin matmuls (they would apply to intermediate products too), so setting
    them on the form path raises ``ValueError`` rather than being dropped silently.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from subspace_jax import forms, nn as sjnn
        >>> layer = sjnn.Linear(6, 4, rngs=nnx.Rngs(0))
        >>> x = jnp.ones((2, 6))
        >>> dense_out = layer(x)
        >>> layer.kernel.set_value(forms.LowRank.from_dense(layer.kernel[...], rank=4))
        >>> bool(jnp.allclose(layer(x), dense_out, atol=1e-5))
        True
    """

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        kernel = self.kernel.get_value()
        if not forms.is_form(kernel):
            return super().__call__(inputs, out_sharding=out_sharding)
        for name, value in (("preferred_element_type", self.preferred_element_type),
                            ("out_sharding", out_sharding)):
            if value is not None:
                raise ValueError(
                    f"Linear({self.in_features}, {self.out_features}) holds a "
                    f"{type(kernel).__name__} kernel: {name}={value!r} is not supported on "
                    "the kernel-form path (it would also apply to the intermediate products "
                    "of the form's thin matmuls); leave it None or materialize the kernel")
        bias = self.bias[...] if self.bias is not None else None
        dtype = self.dtype
        if dtype is None:
            dtype = jnp.result_type(inputs, kernel.dtype, *([] if bias is None else [bias]))
        inputs, bias = self.promote_dtype((inputs, bias), dtype=dtype)
        y = kernel.matmul(inputs, dtype=dtype, precision=self.precision,
                          dot_general=self.dot_general)
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


def linears(model: nnx.Module) -> list[tuple[str, nnx.Linear]]:
    """All ``nnx.Linear`` modules of a model (including :class:`Linear`) with ``/``-joined paths.

    Examples:
        >>> from flax import nnx
        >>> from subspace_jax import nn as sjnn
        >>> mlp = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Linear(3, 1, rngs=nnx.Rngs(1)))
        >>> [path for path, _ in sjnn.linears(mlp)]
        ['layers/0', 'layers/1']
    """
    return [
        ("/".join(str(k) for k in path), node)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, nnx.Linear)
    ]


def _as_subspace_linear(old: nnx.Linear) -> Linear:
    """A :class:`Linear` carrying ``old``'s Variables and attributes (no new parameters)."""
    shell = nnx.eval_shape(
        lambda: Linear(old.in_features, old.out_features, use_bias=old.use_bias, rngs=nnx.Rngs(0))
    )
    for name, value in vars(old).items():
        if not name.startswith("_"):
            setattr(shell, name, value)
    return shell


def adopt(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` whose ``nnx.Linear`` modules are :class:`Linear`.

    Only modules whose type is exactly ``nnx.Linear`` are swapped (a user
    subclass keeps its own behaviour). Parameters, dtypes, precision and any
    other attribute are carried over, so outputs are bit-identical; shared
    (tied) Linear modules stay shared. The input model is not modified.

    Args:
        model: any Flax NNX module.

    Returns:
        A new model of the same structure.

    Raises:
        ValueError: if the model has no ``nnx.Linear`` (nor :class:`Linear`) at all,
            or an ``nnx.Linear`` sits in a container that cannot be updated (a
            tuple: hold sub-modules in ``nnx.List``); the message names its path.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from subspace_jax import nn as sjnn
        >>> mlp = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.Linear(3, 1, rngs=nnx.Rngs(1)))
        >>> new = sjnn.adopt(mlp)
        >>> type(new.layers[0]).__module__, type(mlp.layers[0]).__module__
        ('subspace_jax.nn', 'flax.nnx.nn.linear')
        >>> bool((new(jnp.ones((1, 2))) == mlp(jnp.ones((1, 2)))).all())
        True
    """
    swapped: list[tuple[Any, ...]] = []
    adopted = False

    def swap(path: tuple[Any, ...], node: Any) -> Any:
        nonlocal adopted
        adopted = adopted or isinstance(node, Linear)
        if type(node) is not nnx.Linear:
            return node
        swapped.append(path)
        return _as_subspace_linear(node)

    # recursive_map calls ``swap`` once per shared node and puts its one result at
    # every path (tied Linears stay tied). Clone first: the copy recursive_map makes
    # itself shares the Variables with ``model``.
    try:
        new = nnx.recursive_map(swap, nnx.clone(model))
    except ValueError as err:  # a Linear inside an immutable container (a tuple)
        where = "/".join(map(str, swapped[-1])) if swapped else "?"
        raise ValueError(f"adopt: cannot put a Linear at {where!r} in "
                         f"{type(model).__name__}: {err}") from None
    if not swapped and not adopted:
        raise ValueError(f"adopt: {type(model).__name__} contains no nnx.Linear module")
    return new
