"""WASI on trees and NNX models: factorise, convert, refresh after each step, export.

* :func:`factorize` (pure tree): the matched ``(in, out)`` kernels become
  ``LowRank(a, b)`` with ``b`` orthonormal (``split=1``) at the smallest rank reaching an
  energy threshold; :func:`orthonormalize` (pure tree) is the factored variant's per-step
  refresh of such kernels.
* :class:`WasiLinear`: a :class:`subspace_jax.nn.Linear` whose call is
  :func:`subspace_jax.wasi.core.wasi_matmul`. Its method state lives on the module as
  :class:`~subspace_jax.nn.SubspaceState` variables (so it sits in the train step's
  ``rest``, is threaded through every step and never differentiated):
  :class:`ActivationBasis` (the previous Tucker factors of its input, refreshed by the
  forward of every training step) and, in the ``master`` variant, :class:`WeightBasis`
  (the ``LowRank`` factors derived from the trained full master kernel).
* :func:`post_update` (the shared step's hook) refreshes the weight factors of both variants;
  :func:`export` gives a plain factored inference model. Conversion of a model is in
  :mod:`subspace_jax.wasi.convert`.

References:
    WASI, arXiv 2510.09160.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from subspace_jax import forms
from subspace_jax import nn as sjnn
from subspace_jax import rules as rules_lib
from subspace_jax.wasi import core

__all__ = ["ActivationBasis", "WeightBasis", "WasiKernel", "WasiLinear", "MLP_PATTERN",
           "ATTENTION_PATTERN", "factorize", "orthonormalize", "post_update", "export"]

#: The paper's default selection: the Linear layers of the MLP blocks.
MLP_PATTERN = r"(.*/)?mlp/[^/]+/kernel"
#: The attention projections (the paper's "all linear layers" variant adds these).
ATTENTION_PATTERN = r"(.*/)?attn/(q|k|v|o)/kernel"
VARIANTS = ("factored", "master")


class ActivationBasis(sjnn.SubspaceState):
    """The previous step's Tucker factors of a :class:`WasiLinear`'s input (a tuple of
    float32 ``(dim_n, r_n)`` matrices), refreshed by every training forward.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import wasi
        >>> basis = wasi.ActivationBasis((jnp.eye(4, 2), jnp.eye(8, 3)))
        >>> [u.shape for u in basis.get_value()]
        [(4, 2), (8, 3)]
    """


class WeightBasis(sjnn.SubspaceState):
    """The ``master`` variant's factors: a ``LowRank(a, b)`` re-derived from the master
    kernel after every step by :func:`subspace_jax.wasi.core.refresh_master`.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import forms, wasi
        >>> wasi.WeightBasis(forms.LowRank(jnp.ones((6, 2)), jnp.eye(2, 4))).get_value().rank
        2
    """


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WasiKernel(forms.LowRank):
    """WASI's factored kernel: a :class:`~subspace_jax.forms.LowRank` ``a @ b`` whose ``b``
    (``(K, out)``) keeps orthonormal rows (WASI's basis ``L^T``; ``a = R^T``).

    Same fields, maths and contract as ``LowRank``; its shape check accepts leaves of any
    rank, because optax maps over parameters (e.g. ``jax.tree.map(jnp.sum, params)`` in
    global-norm clipping) and rebuilds forms with scalar leaves.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import wasi
        >>> k = wasi.WasiKernel.from_dense(jax.random.normal(jax.random.key(0), (6, 4)), rank=2,
        ...                                split=1.0)
        >>> type(k).__name__, bool(jnp.allclose(k.b @ k.b.T, jnp.eye(2), atol=1e-5))
        ('WasiKernel', True)
        >>> jax.tree.map(jnp.sum, k).a.shape   # optax-style maps rebuild it with scalars
        ()
    """

    def __post_init__(self):
        a, b = (getattr(v, "shape", None) for v in (self.a, self.b))
        if a is not None and b is not None and len(a) == len(b) == 2 and a[1] != b[0]:
            raise ValueError(f"WasiKernel needs a (in, rank) and b (rank, out); got a {a} "
                             f"and b {b}")


def _default_rules(rules):
    if rules is None:
        return (rules_lib.Rule(pattern=MLP_PATTERN),)
    return (rules,) if isinstance(rules, rules_lib.Rule) else tuple(rules)


def _check_energy(energy) -> float:
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
        raise ValueError(f"energy (weight eps) must be a float in (0, 1], got {energy!r}")
    return float(energy)


def _factor_kernel(path: str, kernel: Any, energy: float) -> WasiKernel:
    if forms.is_form(kernel):
        raise TypeError(f"kernel is already a {type(kernel).__name__}; materialize it first")
    if getattr(kernel, "ndim", None) != 2:
        raise ValueError(f"WASI converts 2-D (in, out) kernels; {path!r} has shape "
                         f"{tuple(getattr(kernel, 'shape', ()))}")
    return WasiKernel.from_dense(kernel, eps=energy, split=1.0)


def factorize(tree: Any, rules: rules_lib.Rule | Sequence[rules_lib.Rule] | None = None, *,
              energy: float = 0.9) -> Any:
    """WASI's weight side on any tree: matched kernels become :class:`WasiKernel` ``(a, b)``
    (a ``LowRank``), ``b`` orthonormal, at the smallest rank whose squared singular values
    reach ``energy``.

    Args:
        tree: an ``nnx.State``, a nested dict or linen variables.
        rules: rules selecting kernels (default: the MLP kernels, :data:`MLP_PATTERN`).
        energy: the weight eps in ``(0, 1]``.

    Returns:
        The tree with :class:`~subspace_jax.forms.LowRank` kernels.

    Raises:
        ValueError: energy outside ``(0, 1]``, a rule matching nothing or a non-2-D leaf
            (the message names the path).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import wasi
        >>> params = {"mlp": {"up": {"kernel": jnp.diag(jnp.array([3.0, 2.0, 1.0]))}}}
        >>> k = wasi.factorize(params, energy=0.9)["mlp"]["up"]["kernel"]
        >>> k.rank, bool(jnp.allclose(k.b @ k.b.T, jnp.eye(2)))
        (2, True)

    References:
        WASI, Eqs. 5-7, arXiv 2510.09160.
    """
    energy = _check_energy(energy)
    return rules_lib.apply(tree, _default_rules(rules),
                           lambda path, k, rule: _factor_kernel(path, k, energy))


def orthonormalize(tree: Any, rules: rules_lib.Rule | Sequence[rules_lib.Rule] | None = None
                   ) -> Any:
    """The ``factored`` variant's per-step refresh on any tree: every matched ``LowRank``
    gets an orthonormal ``b`` again with its product unchanged
    (:func:`subspace_jax.wasi.core.refresh_factored`). Jittable.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import forms, wasi
        >>> k = forms.LowRank(jnp.ones((3, 1)), 2 * jnp.ones((1, 2)))
        >>> tree = {"mlp": {"up": {"kernel": k}}}
        >>> k = wasi.orthonormalize(tree)["mlp"]["up"]["kernel"]
        >>> bool(jnp.allclose(k.b, 0.5 ** 0.5)), bool(jnp.allclose(k.materialize(), 2.0))
        (True, True)
    """

    def one(path, k, rule):
        if not isinstance(k, forms.LowRank):
            raise TypeError(f"expected a LowRank kernel, got {type(k).__name__}")
        return type(k)(*core.refresh_factored(k.a, k.b))

    return rules_lib.apply(tree, _default_rules(rules), one)


class WasiLinear(sjnn.Linear):
    """A :class:`subspace_jax.nn.Linear` computing ``x @ a @ b + bias`` with WASI's backward.

    Built by :func:`convert` (not directly). ``kernel`` is the trained parameter: a
    ``LowRank(a, b)`` (``factored``) or the full master kernel (``master``, whose forward
    reads :class:`WeightBasis`). ``act_basis`` holds the previous Tucker factors of the
    input. Static attributes: ``wasi_variant``, ``wasi_order``, ``wasi_path``.

    The call goes through :func:`subspace_jax.wasi.core.wasi_matmul`: when differentiated
    (a training step) it refreshes ``act_basis`` and keeps only the compressed input for
    backward; otherwise (evaluation, any batch shape) it is two thin matmuls and leaves the
    state as it is.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from subspace_jax import wasi
        >>> mlp = nnx.Dict(mlp=nnx.Dict(up=nnx.Linear(8, 4, rngs=nnx.Rngs(0))))
        >>> x = jax.random.normal(jax.random.key(0), (2, 3, 8))
        >>> new = wasi.convert(mlp, sample=lambda m: m["mlp"]["up"](x), energy=1.0,
        ...                    activation_eps=1.0, verbose=False)
        >>> layer = new["mlp"]["up"]
        >>> type(layer).__name__, [u.shape for u in layer.act_basis.get_value()]
        ('WasiLinear', [(2, 2), (3, 3), (8, 6)])
    """

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        if out_sharding is not None or self.preferred_element_type is not None:
            raise ValueError(f"WASI layer {self.wasi_path!r}: out_sharding and "
                             "preferred_element_type are not supported")
        kernel = self.kernel.get_value()
        if self.wasi_variant == "master":
            form = self.weight_basis.get_value()
            w, a, b = kernel, jax.lax.stop_gradient(form.a), jax.lax.stop_gradient(form.b)
        else:
            w, a, b = None, kernel.a, kernel.b
        bias = self.bias[...] if self.bias is not None else None
        dtype = self.dtype
        if dtype is None:
            dtype = jnp.result_type(inputs, a, b, *([] if bias is None else [bias]))
        inputs, a, b, bias = self.promote_dtype((inputs, a, b, bias), dtype=dtype)
        cfg = core.OpConfig(variant=self.wasi_variant, order=self.wasi_order,
                            name=self.wasi_path, precision=self.precision,
                            dot_general=self.dot_general,
                            w_dtype=None if w is None else jnp.dtype(w.dtype))
        y, factors = core.wasi_matmul(cfg, inputs, w, a, b, self.act_basis.get_value())
        self.act_basis.set_value(factors)
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


def _swap(model: nnx.Module, make: Callable[[str, sjnn.Linear], Any], paths: set[str]):
    def fn(path, node):
        key = "/".join(str(k) for k in path)
        if key in paths and isinstance(node, nnx.Linear):
            return make(key, node)
        return node

    return nnx.recursive_map(fn, model)


def _shell(cls, old: nnx.Linear, **attrs):
    shell = nnx.eval_shape(lambda: cls(old.in_features, old.out_features,
                                       use_bias=old.use_bias, rngs=nnx.Rngs(0)))
    for name, value in vars(old).items():
        if not name.startswith("_") and not name.startswith(("wasi_", "act_basis", "weight_basis")):
            setattr(shell, name, value)
    for name, value in attrs.items():
        setattr(shell, name, value)
    return shell


def post_update(params: Any, rest: Any) -> tuple[Any, Any]:
    """The shared train step's ``post_update`` for WASI models (both variants); jittable.

    Finds the WASI layers by their state in ``rest``: a layer with a :class:`WeightBasis`
    (``master``) gets its factors re-derived from its trained master kernel by one
    warm-started subspace-iteration step; any other layer with an :class:`ActivationBasis`
    and a ``LowRank`` kernel (``factored``) gets its basis re-orthonormalised, product kept.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from subspace_jax import train, wasi
        >>> model = nnx.Dict(mlp=nnx.Dict(up=nnx.Linear(8, 4, rngs=nnx.Rngs(0))))
        >>> x = jax.random.normal(jax.random.key(0), (2, 3, 8))
        >>> model = wasi.convert(model, sample=lambda m: m["mlp"]["up"](x), verbose=False)
        >>> _, params, rest = train.split_model(model)
        >>> p2, r2 = wasi.post_update(params, rest)
        >>> k = p2["mlp"]["up"]["kernel"].get_value()
        >>> bool(jnp.allclose(k.b @ k.b.T, jnp.eye(k.rank), atol=1e-5))
        True
    """
    state_paths, _ = rules_lib.leaf_paths(rest)
    master, factored = {}, set()
    for path, leaf in state_paths:
        module, _, name = path.rpartition("/")
        if isinstance(leaf, WeightBasis):
            master[module + "/kernel"] = path
        elif isinstance(leaf, ActivationBasis):
            factored.add(module + "/kernel")
    kernels = dict(rules_lib.leaf_paths(params)[0])
    new_bases = {}
    for kpath, spath in master.items():
        form = dict(state_paths)[spath].get_value()
        a, b = core.refresh_master(rules_lib._unwrap(kernels[kpath]), form.b)
        new_bases[spath] = WasiKernel(a, b)

    def refresh_kernel(path, value):
        if path in factored and path not in master and isinstance(value, forms.LowRank):
            return type(value)(*core.refresh_factored(value.a, value.b))
        return value

    params = rules_lib.map_with_path(refresh_kernel, params)
    rest = rules_lib.map_with_path(lambda p, v: new_bases.get(p, v), rest)
    return params, rest


def export(model: nnx.Module) -> nnx.Module:
    """A plain factored inference model: each :class:`WasiLinear` becomes a
    :class:`subspace_jax.nn.Linear` with a ``LowRank`` kernel (two thin matmuls, no dense
    kernel, no method state); saves and loads with :mod:`subspace_jax.checkpoint`.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from subspace_jax import forms, wasi
        >>> model = nnx.Dict(mlp=nnx.Dict(up=nnx.Linear(8, 4, rngs=nnx.Rngs(0))))
        >>> x = jax.random.normal(jax.random.key(0), (2, 3, 8))
        >>> conv = wasi.convert(model, sample=lambda m: m["mlp"]["up"](x), verbose=False,
        ...                     variant="master")
        >>> plain = wasi.export(conv)
        >>> isinstance(plain["mlp"]["up"].kernel.get_value(), forms.LowRank)
        True
        >>> bool(jnp.allclose(plain["mlp"]["up"](x), conv["mlp"]["up"](x), atol=1e-5))
        True
    """

    def fn(path, node):
        if not isinstance(node, WasiLinear):
            return node
        if node.wasi_variant == "master":
            form = node.weight_basis.get_value()
            dtype = node.kernel.get_value().dtype
            form = WasiKernel(form.a.astype(dtype), form.b.astype(dtype))
        else:
            form = node.kernel.get_value()
        plain = _shell(sjnn.Linear, node)
        plain.kernel = nnx.Param(form)
        return plain

    out = nnx.recursive_map(fn, nnx.clone(model))
    if hasattr(out, "wasi_plans"):
        del out.wasi_plans
    return out
