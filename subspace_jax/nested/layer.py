"""NSN trees and layers: SVD factorisation of selected kernels, the rank-aware Linear, ranks.

* :func:`factorize` (pure, tree to tree): the selected kernels of an ``nnx.State``, dict or
  linen tree become :class:`~subspace_jax.nested.Nested` forms; :func:`truncate` keeps
  the first ``r`` components of each (a smaller tree to ship).
* :func:`convert` (NNX): factorises a model's MLP Linears and swaps them for
  :class:`NestedLinear`, which carries its active rank as method state.
* :func:`set_rank` / :func:`ranks`: one global rank or per-layer ranks, on a model or on a
  state tree.

The active rank has two parts. ``NestedLinear.width`` is a static Python int (in the
graph): the number of components the layer computes, so inference at rank ``r`` costs
``r (in + out)`` multiply-adds per token and compiles once per rank. ``NestedLinear.rank``
is a traced int32 (:class:`NestedRank`, in the model's non-parameter state): it zeroes the
components from ``rank`` to ``width - 1``, so one compiled training step serves every
sampled rank and the parameter tree never changes shape. ``set_rank(model, r)`` sets both;
``static=False`` (and a state tree) sets only the traced one.

References:
    Rauba and van der Schaar, "Deep Hierarchical Learning with Nested Subspace Networks",
    ICLR 2026, arXiv 2509.17874.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from subspace_jax import forms, nn, rules as rules_lib
from subspace_jax.nested.form import Nested, check_rank

__all__ = ["NestedRule", "NestedRank", "NestedLinear", "MLP_PATTERN", "factorize", "truncate",
           "convert", "layers", "set_rank", "ranks"]

#: Default selection: every Linear kernel inside a module named ``mlp`` (BERT/ViT
#: ``mlp/up``, ``mlp/down``; Llama ``mlp/gate`` too), matched by path segment, so
#: ``mlp_norm`` and attention (``attn/q``, ``attention.dense``) stay dense.
MLP_PATTERN = r"(.*/)?mlp/(.*/)?kernel"


@dataclasses.dataclass(frozen=True, kw_only=True)
class NestedRule(rules_lib.Rule):
    """Turn the matched ``(in, out)`` kernels into :class:`Nested` forms.

    Attributes:
        max_rank: ``R`` for these kernels (None: the call's ``max_rank``, else
            ``min(in, out)``).
        split: exponent of the singular values given to ``a`` (0.5: balanced).

    Examples:
        >>> from subspace_jax.nested import NestedRule
        >>> NestedRule(pattern=".*/mlp/up/kernel", max_rank=64).describe()
        'NestedRule(max_rank=64, split=0.5)'
    """

    # --- behaviour ---
    # Maximum rank of the matched kernels.
    max_rank: int | None = None
    # Exponent of the singular values given to the input-side factor.
    split: float = 0.5


def _layer_path(path: str) -> str:
    return path[: -len("/kernel")] if path.endswith("/kernel") else path


def factorize(tree: Any, rules: rules_lib.Rule | Sequence[rules_lib.Rule] | None = None, *,
              max_rank: int | None = None, split: float = 0.5, allow_unused: bool = False) -> Any:
    """Replace the selected kernels with SVD-initialised :class:`Nested` forms (pure).

    Args:
        tree: an ``nnx.State``, a nested dict or linen variables.
        rules: rules selecting kernels (plain :class:`~subspace_jax.rules.Rule` or
            :class:`NestedRule`); None: ``Rule(pattern=MLP_PATTERN)``.
        max_rank: ``R`` of every selected kernel (a :class:`NestedRule` may override it);
            None: ``min(in, out)``, so the converted tree reproduces the dense one.
        split: exponent of the singular values given to ``a`` (0.5: balanced).
        allow_unused: do not raise for rules that match nothing.

    Returns:
        The tree with :class:`Nested` leaves; ``subspace_jax.materialize`` turns them back.

    Raises:
        ValueError: a rule matched nothing, a selected leaf is not a finite 2-D kernel, or
            its ``max_rank`` is above ``min(in, out)`` (the message names the path).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import nested
        >>> params = {"mlp": {"up": {"kernel": jax.random.normal(jax.random.key(0), (8, 32))}},
        ...           "attn": {"q": {"kernel": jnp.ones((8, 8))}}}
        >>> out = nested.factorize(params)
        >>> type(out["mlp"]["up"]["kernel"]).__name__, out["mlp"]["up"]["kernel"].max_rank
        ('Nested', 8)
        >>> type(out["attn"]["q"]["kernel"]).__name__
        'ArrayImpl'
    """
    rules = rules_lib.Rule(pattern=MLP_PATTERN) if rules is None else rules

    def one(path: str, kernel: Any, rule: rules_lib.Rule) -> Nested:
        if forms.is_form(kernel):
            raise TypeError(f"kernel is already a {type(kernel).__name__}; materialize it first")
        rank, how = max_rank, split
        if isinstance(rule, NestedRule):
            rank = rule.max_rank if rule.max_rank is not None else max_rank
            how = rule.split
        return Nested.from_dense(kernel, max_rank=rank, split=how)

    return rules_lib.apply(tree, rules, one, allow_unused=allow_unused)


def _per_layer(rank: int | Mapping[str, int], known: Mapping[str, int]) -> dict[str, int]:
    """Resolve ``rank`` (global int or {layer path: int}) against ``known`` {path: R}."""
    if not known:
        raise ValueError("no nested layers found: convert the model (nested.convert) or "
                         "factorize the tree first")
    if isinstance(rank, Mapping):
        unknown = sorted(set(rank) - set(known))
        if unknown:
            raise ValueError(f"rank dict names paths that are not converted: {unknown}; "
                             f"converted layers: {sorted(known)}")
        return {p: check_rank(r, known[p], f"rank of {p!r}") for p, r in rank.items()}
    top = max(known.values())
    check_rank(rank, top)
    return {p: min(int(rank), big) for p, big in known.items()}


def truncate(tree: Any, rank: int | Mapping[str, int]) -> Any:
    """Keep the first ``rank`` components of every :class:`Nested` form of a tree (pure).

    The result is a smaller tree whose forms compute at that rank with plain
    :func:`subspace_jax.forms.matmul` (a parameter tree to ship or to use without
    :class:`NestedLinear`). Per-layer ranks are keyed by the kernel's path without its
    ``/kernel`` suffix; a global rank is capped at each form's ``R``.

    Raises:
        ValueError: a rank outside ``[1, R]`` or a path that holds no :class:`Nested`.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import nested
        >>> tree = nested.factorize({"mlp": {"up": {"kernel": jnp.ones((8, 32))}}})
        >>> nested.truncate(tree, 3)["mlp"]["up"]["kernel"].a.shape
        (8, 3)
        >>> nested.truncate(tree, {"mlp/dn": 3})
        Traceback (most recent call last):
        ...
        ValueError: rank dict names paths that are not converted: ['mlp/dn']; converted ...
    """
    pairs, _ = rules_lib.leaf_paths(tree)
    known = {_layer_path(p): leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
             for p, leaf in pairs}
    known = {p: k.max_rank for p, k in known.items() if isinstance(k, Nested)}
    chosen = _per_layer(rank, known)
    return rules_lib.map_with_path(
        lambda p, x: x.prefix(chosen[_layer_path(p)])
        if isinstance(x, Nested) and _layer_path(p) in chosen else x, tree)


class NestedRank(nn.SubspaceState):
    """The traced active rank of a :class:`NestedLinear` (int32 scalar; metadata ``max_rank``).

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax.nested import NestedRank
        >>> r = NestedRank(jnp.int32(4), max_rank=8)
        >>> int(r[...]), r.max_rank
        (4, 8)
    """


class NestedLinear(nn.Linear):
    """A :class:`subspace_jax.nn.Linear` holding a :class:`Nested` kernel and its active rank.

    Attributes (besides ``nnx.Linear``'s):
        width: static int, the components computed (cost ``width (in + out)`` per token).
        rank: :class:`NestedRank`, the traced active rank (``<= width``).

    The call is ``kernel.matmul_at(x, width, rank) + bias`` with ``nnx.Linear``'s dtype
    handling (``dtype``, ``promote_dtype``, ``precision``, ``dot_general``). Built by
    :func:`convert`; use :func:`set_rank` to change the rank.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from subspace_jax import nested
        >>> mlp = nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)))
        >>> model = nested.convert(mlp, nested.NestedRule(pattern="layers/0/kernel"))
        >>> layer = model.layers[0]
        >>> type(layer).__name__, layer.width, int(layer.rank[...])
        ('NestedLinear', 8, 8)
    """

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        kernel = self.kernel.get_value()
        if not isinstance(kernel, Nested):
            raise TypeError(f"NestedLinear holds a {type(kernel).__name__} kernel, not Nested")
        for name, value in (("preferred_element_type", self.preferred_element_type),
                            ("out_sharding", out_sharding)):
            if value is not None:
                raise ValueError(f"NestedLinear: {name}={value!r} is not supported (it would "
                                 "also apply to the intermediate product)")
        bias = self.bias[...] if self.bias is not None else None
        dtype = self.dtype
        if dtype is None:
            dtype = jnp.result_type(inputs, kernel.dtype, *([] if bias is None else [bias]))
        inputs, bias = self.promote_dtype((inputs, bias), dtype=dtype)
        y = kernel.matmul_at(inputs, self.width, self.rank[...], dtype=dtype,
                             precision=self.precision, dot_general=self.dot_general)
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


def _as_nested_linear(old: nn.Linear, path: str) -> NestedLinear:
    kernel = old.kernel.get_value()
    if not isinstance(kernel, Nested):
        raise ValueError(f"convert: {path!r} is not a Linear with a Nested kernel")
    shell = nnx.eval_shape(
        lambda: NestedLinear(old.in_features, old.out_features, use_bias=old.use_bias,
                             rngs=nnx.Rngs(0)))
    for name, value in vars(old).items():
        if not name.startswith("_"):
            setattr(shell, name, value)
    shell.width = kernel.max_rank
    shell.rank = NestedRank(jnp.int32(kernel.max_rank), max_rank=kernel.max_rank)
    return shell


def convert(model: nnx.Module, rules: rules_lib.Rule | Sequence[rules_lib.Rule] | None = None,
            max_rank: int | None = None, *, split: float = 0.5) -> nnx.Module:
    """A copy of ``model`` whose selected Linears are SVD-initialised :class:`NestedLinear`.

    The selected kernels are factorised by :func:`factorize` (default: the MLP Linears,
    :data:`MLP_PATTERN`; attention stays dense, as in the paper) in descending
    singular-value order with the balanced split, so rank ``r`` starts as the best
    rank-``r`` approximation of each kernel. Every converted layer starts at its maximum
    rank; with ``max_rank=None`` (``R = min(in, out)``) the model reproduces the dense one.
    Tied Linears stay tied; the input model is not modified.

    Args:
        model: any NNX model with ``nnx.Linear`` (or :class:`subspace_jax.nn.Linear`) layers.
        rules: rules selecting kernels (see :func:`factorize`).
        max_rank: ``R`` (None: ``min(in, out)`` per layer).
        split: exponent of the singular values given to ``a``.

    Raises:
        ValueError: as :func:`factorize`, or a rule selecting a leaf that is not the
            kernel of a Linear.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from subspace_jax import nested
        >>> class Block(nnx.Module):
        ...     def __init__(self):
        ...         self.attn = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
        ...         self.mlp = nnx.Sequential(nnx.Linear(8, 32, rngs=nnx.Rngs(1)))
        ...     def __call__(self, x):
        ...         return self.mlp(self.attn(x))
        >>> block = Block()
        >>> model = nested.convert(block)
        >>> sorted(nested.ranks(model).items()), type(model.attn).__name__
        ([('mlp/layers/0', 8)], 'Linear')
        >>> x = jnp.ones((2, 8))
        >>> bool(jnp.allclose(model(x), block(x), atol=1e-5))
        True
    """
    model = nn.adopt(model)
    graphdef, state = nnx.split(model)
    state = factorize(state, rules, max_rank=max_rank, split=split)
    pairs, _ = rules_lib.leaf_paths(state)
    chosen = {_layer_path(p) for p, leaf in pairs
              if isinstance(leaf, nnx.Variable) and isinstance(leaf.get_value(), Nested)}
    model = nnx.merge(graphdef, state)

    def swap(path: tuple[Any, ...], node: Any) -> Any:
        where = "/".join(map(str, path))
        if where not in chosen:
            return node
        if not isinstance(node, nn.Linear) or isinstance(node, NestedLinear):
            raise ValueError(f"convert: {where!r} ({type(node).__name__}) is not a Linear; "
                             "select only kernels of Linear layers")
        chosen.discard(where)
        return _as_nested_linear(node, where)

    new = nnx.recursive_map(swap, model)
    if chosen:
        raise ValueError(f"convert: selected kernels outside any Linear: {sorted(chosen)}")
    return new


def layers(model: nnx.Module) -> list[tuple[str, NestedLinear]]:
    """The :class:`NestedLinear` modules of a model with their ``/``-joined paths.

    Examples:
        >>> from flax import nnx
        >>> from subspace_jax import nested
        >>> nested.layers(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
        []
    """
    return [("/".join(map(str, p)), m) for p, m in nnx.iter_graph(model)
            if isinstance(m, NestedLinear)]


def _rank_vars(tree: Any) -> dict[str, NestedRank]:
    pairs, _ = rules_lib.leaf_paths(tree)
    return {p[: -len("/rank")] if p.endswith("/rank") else p: leaf for p, leaf in pairs
            if isinstance(leaf, NestedRank)}


def set_rank(target: Any, rank: int | Mapping[str, int], *, static: bool = True) -> Any:
    """Set one global rank, or per-layer ranks ``{layer path: r}``, on a model or state tree.

    On an NNX model (changed in place and returned) ``static=True`` sets both the computed
    width and the traced rank, so the model computes ``r (in + out)`` multiply-adds per
    token (one compilation per rank); ``static=False`` sets only the traced rank (one
    compilation serves every rank, at the cost of the current width). On a state tree
    (``nnx.state(model)`` or the ``rest`` of :func:`subspace_jax.train.split_model`) the
    traced ranks are set and a new tree is returned (a state tree does not hold the
    widths: a rank above a layer's width acts as the width).

    A global rank is capped at each layer's ``R`` when layers differ; layer paths are
    module paths such as ``bert/encoder/layers/0/mlp/up``.

    Raises:
        ValueError: a rank outside ``[1, R]``; a dict naming a path that is not converted;
            with ``static=False``, a rank above a layer's current width; no nested layer.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from subspace_jax import nested
        >>> model = nested.convert(nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)),
        ...                                       nnx.Linear(16, 4, rngs=nnx.Rngs(1))),
        ...                        nested.NestedRule(pattern="layers/.*/kernel"))
        >>> _ = nested.set_rank(model, {"layers/0": 2})
        >>> nested.ranks(model), model.layers[0].width
        ({'layers/0': 2, 'layers/1': 4}, 2)
        >>> state = nested.set_rank(nnx.state(model), 3)      # a new tree; capped at R
        >>> nested.ranks(state)
        {'layers/0': 3, 'layers/1': 3}
        >>> nested.set_rank(model, 9)
        Traceback (most recent call last):
        ...
        ValueError: rank=9 is outside [1, 8] (the maximum rank R)
    """
    if isinstance(target, nnx.Module):
        found = dict(layers(target))
        chosen = _per_layer(rank, {p: m.kernel.get_value().max_rank for p, m in found.items()})
        for path, r in chosen.items():
            layer = found[path]
            if static:
                layer.width = r
            elif r > layer.width:
                raise ValueError(f"rank {r} of {path!r} is above its computed width "
                                 f"{layer.width}; use static=True to widen it")
            layer.rank.set_value(jnp.int32(r))
        return target
    found = _rank_vars(target)
    chosen = _per_layer(rank, {p: v.max_rank for p, v in found.items()})
    return rules_lib.map_with_path(
        lambda path, value: jnp.int32(chosen[path[: -len("/rank")]])
        if path.endswith("/rank") and path[: -len("/rank")] in chosen else value, target)


def ranks(target: Any) -> dict[str, int]:
    """The active (traced) rank of every nested layer of a model or state tree, as ints.

    Examples:
        >>> from flax import nnx
        >>> from subspace_jax import nested
        >>> nested.ranks(nested.convert(nnx.Sequential(nnx.Linear(8, 3, rngs=nnx.Rngs(0))),
        ...                             nested.NestedRule(pattern=".*kernel")))
        {'layers/0': 3}
    """
    if isinstance(target, nnx.Module):
        return {p: int(m.rank[...]) for p, m in layers(target)}
    return {p: int(v.get_value()) for p, v in _rank_vars(target).items()}
