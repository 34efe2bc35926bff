"""Flax integration: kernel forms run inside any Flax model, linen or NNX, ours or not.

One call path, :func:`subspace_jax.contraction.form_call`, computes a layer's output when
its kernel slot holds a :class:`~subspace_jax.forms.KernelForm`; two routes lead to it:

* **NNX, no context needed:** :func:`adopt` returns a copy of a model whose
  ``nnx.Linear``, ``nnx.LinearGeneral`` and ``nnx.Einsum`` modules (so
  ``nnx.MultiHeadAttention`` too) are the form-aware subclasses :class:`Linear`,
  :class:`LinearGeneral` and :class:`Einsum` (dense outputs bit-identical), and records each
  kernel's input axes as its ``in_axes`` metadata, which the tree transforms read.
* **Any model, within** :func:`intercept`: linen ``Dense``, ``DenseGeneral`` and ``Einsum``
  (so ``MultiHeadDotProductAttention`` and Hugging Face's Flax models) are rerouted with
  ``flax.linen.intercept_methods``, and plain ``nnx.Linear``/``LinearGeneral``/``Einsum``
  likewise, whenever their kernel holds a form; a dense kernel runs the module's own code.
  The shared train step (:func:`subspace_jax.train.make_train_step`) always runs inside it.

Why this design: qwix intercepts ``dot_general``/``einsum`` inside any model, which also
catches the activations' contractions and couples to flax internals; qax/lorax's implicit
arrays silently materialise the dense weight on unhandled primitives; flax's ``nnx.LoRA``
only wraps its own layers. A form stands where a kernel stood, so intercepting the *layer*
(its kernel is a parameter we can see) is enough, and is the only place the layer's axes are
known. :func:`kernel_axes` reports those axes for any model.

:class:`SubspaceState` is the base ``nnx.Variable`` type for method state that is not a
trainable parameter.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen, nnx

from subspace_jax import contraction as contraction_lib
from subspace_jax import forms

__all__ = ["Linear", "LinearGeneral", "Einsum", "SubspaceState", "adopt", "copy_model",
           "intercept", "kernel_axes", "linears"]


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


def _refuse(module: Any, kernel: Any, **settings: Any) -> None:
    for name, value in settings.items():
        if value is not None:
            raise ValueError(
                f"{type(module).__name__} holds a {type(kernel).__name__} kernel: {name}="
                f"{value!r} is not supported on the kernel-form path (it would also apply to "
                "the intermediate products of the form's thin matmuls); leave it None or "
                "materialize the kernel")


def _nnx_contraction(module: nnx.Module, ndim: int, einsum_str: str | None):
    if isinstance(module, nnx.Linear):
        return contraction_lib.dense(ndim), None
    if isinstance(module, nnx.LinearGeneral):
        if module.batch_axis:
            raise ValueError(f"LinearGeneral with batch_axis={dict(module.batch_axis)} cannot "
                             "hold a kernel form (a batched contraction)")
        return contraction_lib.general(module.axis, ndim), tuple(module.out_features)
    eq = (einsum_str or module.einsum_str).replace(" ", "")
    return contraction_lib.einsum(eq, ndim), eq


def _nnx_call(module: nnx.Module, inputs: jax.Array, *, einsum_str: str | None = None,
              out_sharding: Any = None) -> jax.Array:
    kernel = module.kernel.get_value()
    _refuse(module, kernel, preferred_element_type=module.preferred_element_type,
            out_sharding=out_sharding)
    c, extra = _nnx_contraction(module, inputs.ndim, einsum_str)
    bias = module.bias[...] if module.bias is not None else None
    bias_shape, dot_general = None, None
    if isinstance(module, nnx.Einsum):
        if bias is not None:
            bias_shape = module._infer_broadcasted_bias_shape(
                extra, inputs, jax.ShapeDtypeStruct(kernel.shape, kernel.dtype))
    elif isinstance(module, nnx.LinearGeneral):
        bias_shape = extra
        dot_general = (module.dot_general_cls() if module.dot_general_cls is not None
                       else module.dot_general)
    else:
        dot_general = module.dot_general
    return contraction_lib.form_call(
        kernel, inputs, c, bias=bias, bias_shape=bias_shape, dtype=module.dtype,
        promote=lambda xs, dtype: module.promote_dtype(xs, dtype=dtype),
        precision=module.precision, dot_general=dot_general, where=type(module).__name__)


class Linear(nnx.Linear):
    """``nnx.Linear`` whose ``kernel`` may hold any kernel form.

    Constructor and attributes are those of ``flax.nnx.Linear``. With a dense kernel the
    call is ``nnx.Linear``'s own. With a :class:`~subspace_jax.forms.KernelForm` in
    ``kernel`` the call is :func:`subspace_jax.contraction.form_call`, honouring the
    module's ``dtype``, ``promote_dtype``, ``precision`` and ``dot_general`` (which computes
    every contraction of the form). ``preferred_element_type`` and ``out_sharding`` have no
    single meaning for a form's chain of thin matmuls, so setting them on the form path
    raises ``ValueError`` rather than being dropped silently.

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
        if not forms.is_form(self.kernel.get_value()):
            return super().__call__(inputs, out_sharding=out_sharding)
        return _nnx_call(self, inputs, out_sharding=out_sharding)


class LinearGeneral(nnx.LinearGeneral):
    """``nnx.LinearGeneral`` whose ``kernel`` may hold any kernel form (see :class:`Linear`).

    The form's ``fold`` must contract the kernel's leading ``len(in_features)`` axes.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from subspace_jax import forms, nn as sjnn
        >>> layer = sjnn.LinearGeneral(8, (2, 4), rngs=nnx.Rngs(0))
        >>> x = jnp.ones((3, 8))
        >>> dense_out = layer(x)
        >>> layer.kernel.set_value(forms.LowRank.from_dense(layer.kernel[...], rank=8, in_axes=0))
        >>> bool(jnp.allclose(layer(x), dense_out, atol=1e-5)), layer(x).shape
        (True, (3, 2, 4))
    """

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        if not forms.is_form(self.kernel.get_value()):
            return super().__call__(inputs, out_sharding=out_sharding)
        return _nnx_call(self, inputs, out_sharding=out_sharding)


class Einsum(nnx.Einsum):
    """``nnx.Einsum`` whose ``kernel`` may hold any kernel form (see :class:`Linear`).

    The equation must be a plain contraction of the input with the kernel (no axis shared
    by input, kernel and output); the form's ``fold`` must contract the kernel axes the
    equation contracts.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from subspace_jax import forms, nn as sjnn
        >>> layer = sjnn.Einsum("btd,ndh->btnh", (4, 8, 6), rngs=nnx.Rngs(0))
        >>> x = jnp.ones((2, 3, 8))
        >>> dense_out = layer(x)
        >>> layer.kernel.set_value(forms.LowRank.from_dense(layer.kernel[...], rank=8, in_axes=1))
        >>> bool(jnp.allclose(layer(x), dense_out, atol=1e-4)), layer(x).shape
        (True, (2, 3, 4, 6))
    """

    def __call__(self, inputs: jax.Array, einsum_str: str | None = None,
                 out_sharding: Any = None) -> jax.Array:
        if not forms.is_form(self.kernel.get_value()):
            return super().__call__(inputs, einsum_str, out_sharding=out_sharding)
        return _nnx_call(self, inputs, einsum_str=einsum_str, out_sharding=out_sharding)


#: Flax NNX layer -> its form-aware subclass (what :func:`adopt` swaps in).
_NNX_LAYERS = {nnx.Linear: Linear, nnx.LinearGeneral: LinearGeneral, nnx.Einsum: Einsum}


def _linen_contraction(module: linen.Module, args, kwargs
                       ) -> tuple[contraction_lib.Contraction, str | None]:
    """A linen layer's contraction for this call (and an Einsum's equation)."""
    ndim = args[0].ndim
    if isinstance(module, linen.Einsum):
        eq = args[1] if len(args) > 1 else kwargs.get("einsum_str")
        eq = (eq or module.einsum_str).replace(" ", "")
        return contraction_lib.einsum(eq, ndim), eq
    if isinstance(module, linen.DenseGeneral):
        if module.batch_dims:
            raise ValueError(f"DenseGeneral {module.name!r} with batch_dims cannot hold a "
                             "kernel form (a batched contraction)")
        return contraction_lib.general(module.axis, ndim), None
    return contraction_lib.dense(ndim), None


def _linen_call(module: linen.Module, kernel: forms.KernelForm, args, kwargs) -> jax.Array:
    inputs = args[0]
    c, eq = _linen_contraction(module, args, kwargs)
    bias = module.get_variable("params", "bias") if module.use_bias else None
    bias_shape, dot_general = None, None
    if isinstance(module, linen.Einsum):
        if bias is not None:
            bias_shape = module._get_bias_shape(
                eq, inputs, jax.ShapeDtypeStruct(kernel.shape, kernel.dtype))[1]
    else:
        dot_general = (module.dot_general_cls() if module.dot_general_cls is not None
                       else module.dot_general)
    return contraction_lib.form_call(
        kernel, inputs, c, bias=bias, bias_shape=bias_shape, dtype=module.dtype,
        promote=lambda xs, dtype: tuple(module.promote_dtype(*xs, dtype=dtype)),
        precision=module.precision, dot_general=dot_general,
        where=f"{type(module).__name__} {'/'.join(module.path) or module.name!r}")


_LINEN_LAYERS = (linen.Dense, linen.DenseGeneral, linen.Einsum)


def _linen_interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name == "__call__" and isinstance(module, _LINEN_LAYERS)
            and module.has_variable("params", "kernel")):
        kernel = module.get_variable("params", "kernel")
        if forms.is_form(kernel):
            return _linen_call(module, kernel, args, kwargs)
    return next_fun(*args, **kwargs)


def _patched(cls: type, original: Any) -> Any:
    if cls is nnx.Einsum:
        def call(self, inputs, einsum_str=None, out_sharding=None):
            if forms.is_form(self.kernel.get_value()):
                return _nnx_call(self, inputs, einsum_str=einsum_str, out_sharding=out_sharding)
            return original(self, inputs, einsum_str, out_sharding=out_sharding)
    else:
        def call(self, inputs, out_sharding=None):
            if forms.is_form(self.kernel.get_value()):
                return _nnx_call(self, inputs, out_sharding=out_sharding)
            return original(self, inputs, out_sharding=out_sharding)
    call.__doc__, call.__wrapped__ = original.__doc__, original
    return call


_PATCH_LOCK = threading.Lock()
_PATCH_DEPTH = [0]
_ORIGINALS: dict[type, Any] = {}


@contextlib.contextmanager
def intercept():
    """Run kernel forms inside Flax layers the library did not write, for the block's length.

    Inside the block, a linen ``Dense``, ``DenseGeneral`` or ``Einsum`` (and so
    ``MultiHeadDotProductAttention``, Hugging Face's Flax models, any linen model) whose
    ``kernel`` variable holds a :class:`~subspace_jax.forms.KernelForm` computes its output
    by :func:`subspace_jax.contraction.form_call`; so do plain ``nnx.Linear``,
    ``nnx.LinearGeneral`` and ``nnx.Einsum``. Layers with dense kernels run their own code,
    untouched. Trace (``jax.jit``) inside the block; a compiled function keeps the routing.
    Re-entrant; the NNX part is shared by every thread while any block is open (it only
    changes layers whose kernel is a form, which would otherwise fail).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import flax.linen as nn
        >>> import subspace_jax as sj
        >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
        >>> x = jnp.ones((2, 8))
        >>> params = model.init(jax.random.key(0), x)["params"]
        >>> low = sj.factorize(params, sj.LowRankRule(pattern=".*kernel", rank=8, clip_rank=True))
        >>> with sj.nn.intercept():
        ...     y = jax.jit(model.apply)({"params": low}, x)
        >>> bool(jnp.allclose(y, model.apply({"params": params}, x), atol=1e-5))
        True
    """
    with _PATCH_LOCK:
        if _PATCH_DEPTH[0] == 0:
            for cls in _NNX_LAYERS:
                _ORIGINALS[cls] = cls.__dict__["__call__"]
                cls.__call__ = _patched(cls, _ORIGINALS[cls])
        _PATCH_DEPTH[0] += 1
    try:
        with linen.intercept_methods(_linen_interceptor):
            yield
    finally:
        with _PATCH_LOCK:
            _PATCH_DEPTH[0] -= 1
            if _PATCH_DEPTH[0] == 0:
                for cls, original in _ORIGINALS.items():
                    cls.__call__ = original
                _ORIGINALS.clear()


def _nnx_in_axes(module: nnx.Module) -> tuple[int, ...] | None:
    if isinstance(module, nnx.Linear):
        return (0,)
    if isinstance(module, nnx.LinearGeneral):
        return None if module.batch_axis else tuple(range(len(module.in_features)))
    if isinstance(module, nnx.Einsum) and module.einsum_str:
        lhs = module.einsum_str.replace(" ", "").split(",")[0].replace("...", "")
        try:
            return contraction_lib.einsum(module.einsum_str, len(lhs) + 1).in_axes
        except ValueError:
            return None
    return None


def kernel_axes(model: Any, *args: Any, **kwargs: Any) -> dict[str, tuple[int, ...]]:
    """The kernel axes each layer contracts with its input: ``{kernel path: in_axes}``.

    These are what a tree transform needs to fold an N-D kernel (``in_axes`` on a rule, or
    the ``in_axes`` metadata that :func:`adopt` records). For an NNX model they are read
    from its layers; a linen model is traced abstractly on ``args``/``kwargs`` (as for
    ``model.init``; nothing is computed), and its paths are relative to ``params``.

    Examples:
        >>> import jax.numpy as jnp
        >>> import flax.linen as nn
        >>> from flax import nnx
        >>> from subspace_jax import nn as sjnn
        >>> mha = nnx.MultiHeadAttention(2, 8, qkv_features=8, decode=False, rngs=nnx.Rngs(0))
        >>> sjnn.kernel_axes(mha)["query/kernel"], sjnn.kernel_axes(mha)["out/kernel"]
        ((0,), (0, 1))
        >>> sjnn.kernel_axes(nn.Einsum((4, 8, 6), "btd,ndh->btnh"), jnp.ones((1, 2, 8)))
        {'kernel': (1,)}
    """
    found: dict[str, tuple[int, ...]] = {}
    if isinstance(model, nnx.Module):
        for path, node in nnx.iter_graph(model):
            if isinstance(node, tuple(_NNX_LAYERS)):
                axes = _nnx_in_axes(node)
                if axes is not None:
                    found["/".join(map(str, path + ("kernel",)))] = axes
        return found
    if not isinstance(model, linen.Module):
        raise TypeError(f"kernel_axes takes an NNX or linen module, got {type(model).__name__}")

    def record(next_fun, a, k, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, _LINEN_LAYERS):
            batched = isinstance(module, linen.DenseGeneral) and module.batch_dims
            axes = None if batched else _linen_contraction(module, a, k)[0].in_axes
            if axes is not None:
                found["/".join(module.path + ("kernel",))] = axes
        return next_fun(*a, **k)

    with linen.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
    return found


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


def _copy_arrays(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.array(x, copy=True) if isinstance(x, jax.Array) else x,
                        tree)


def copy_model(model: nnx.Module) -> nnx.Module:
    """A copy of an NNX model that shares no array with it (safe under donation).

    ``nnx.clone`` shares the arrays: after a train step donates them, the original model
    would raise "Array has been deleted". Tied modules stay tied in the copy.

    Examples:
        >>> from flax import nnx
        >>> from subspace_jax import nn as sjnn
        >>> layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
        >>> sjnn.copy_model(layer).kernel.get_value() is layer.kernel.get_value()
        False
    """
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, _copy_arrays(state))


def adopt(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` whose Flax linear layers accept kernel forms.

    ``nnx.Linear``, ``nnx.LinearGeneral`` and ``nnx.Einsum`` modules (exactly those types;
    a user subclass keeps its own behaviour) become :class:`Linear`, :class:`LinearGeneral`
    and :class:`Einsum`, with every attribute carried over, so dense outputs are
    bit-identical; tied layers stay tied. Each layer's kernel Variable records the kernel
    axes it contracts as ``in_axes`` metadata, which tree transforms use to fold N-D
    kernels. The copy shares no array with the input, which is not modified (also after a
    train step donates the copy's buffers).

    Args:
        model: any Flax NNX module.

    Returns:
        A new model of the same structure.

    Raises:
        ValueError: the model has no ``nnx.Linear``, ``nnx.LinearGeneral`` or ``nnx.Einsum``.

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
    new = copy_model(model)
    found = False
    for _, node in nnx.iter_graph(new):
        cls = _NNX_LAYERS.get(type(node))
        if cls is not None:
            object.__setattr__(node, "__class__", cls)
        if isinstance(node, tuple(_NNX_LAYERS.values())):
            found = True
            axes = _nnx_in_axes(node)
            if axes is not None and isinstance(node.kernel, nnx.Variable):
                node.kernel.set_metadata(in_axes=axes)
    if not found:
        raise ValueError(f"adopt: {type(model).__name__} contains no nnx.Linear, "
                         "nnx.LinearGeneral or nnx.Einsum module")
    return new
