"""NSN trees: SVD factorisation of selected kernels, ranks, truncation (all pure).

* :func:`transform` (pure, tree to tree): the kernels its :class:`NestedRule`\\ s select in
  an ``nnx.State``, dict or linen tree (2-D, or N-D with ``in_axes``) become
  :class:`~subspace_jax.nested.Nested` forms; :func:`truncate` keeps the first ``r``
  components of each (a smaller tree to ship). ``factorize`` is its old name (an alias for
  one release).
* :func:`convert` (NNX convenience): :func:`subspace_jax.nn.adopt`, split, :func:`transform`,
  merge: a new model that shares no array with the input.
* :func:`set_rank` / :func:`ranks`: one global rank or per-layer ranks, on a tree or a
  model; a new tree or model is returned, the input is never changed.

A :class:`~subspace_jax.nested.Nested` form carries its active rank itself, in two parts:
``width``, a static Python int (in the graph), the number of components computed, so
inference at rank ``r`` costs ``r (in + out)`` multiply-adds per token and compiles once per
rank; and ``rank``, a traced int32 leaf that zeroes the components from ``rank`` to
``width - 1``, so one compiled training step serves every sampled rank and the tree's
structure never changes. ``set_rank(tree, r)`` sets both; ``static=False`` only the traced
one. The form runs in any Flax layer, NNX or linen, through the library's one call path.

References:
    Rauba and van der Schaar, "Deep Hierarchical Learning with Nested Subspace Networks",
    ICLR 2026, arXiv 2509.17874.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx

from subspace_jax import forms, nn, rules as rules_lib
from subspace_jax.nested.form import Nested, check_rank

__all__ = ["NestedRule", "MLP_PATTERN", "transform", "factorize", "truncate", "convert",
           "kernels", "set_rank", "ranks"]

#: The default selection, :data:`subspace_jax.rules.MLP_PATTERN`: every kernel inside a
#: module named ``mlp`` at any depth (BERT/ViT ``mlp/up``, ``mlp/down``; Llama ``mlp/gate``;
#: ``mlp/layers/0`` of an ``nnx.Sequential``), so ``mlp_norm`` and attention stay dense.
MLP_PATTERN = rules_lib.MLP_PATTERN


@dataclasses.dataclass(frozen=True, kw_only=True)
class NestedRule(rules_lib.Rule):
    """Turn the matched kernels into :class:`Nested` forms, with these settings.

    Attributes:
        pattern: regex fully matched against the ``/``-joined path (see
            :class:`subspace_jax.rules.Rule`; default :data:`MLP_PATTERN`).
        max_rank: ``R`` for these kernels (None: ``min(in, out)`` of each folded kernel, so
            the converted tree reproduces the dense one).
        split: exponent in ``[0, 1]`` of the singular values given to ``a`` (0.5: balanced).
        in_axes: for N-D kernels, the axes that contract with the input (see
            :class:`subspace_jax.rules.Rule`).

    Examples:
        >>> from subspace_jax.nested import NestedRule
        >>> NestedRule(pattern=".*/mlp/up/kernel", max_rank=64).describe()
        'NestedRule(max_rank=64, split=0.5)'
        >>> NestedRule(split=2.0)
        Traceback (most recent call last):
        ...
        ValueError: NestedRule: split=2.0 must be in [0, 1]
    """

    pattern: str = MLP_PATTERN
    # --- behaviour ---
    # Maximum rank of the matched kernels.
    max_rank: int | None = None
    # Exponent of the singular values given to the input-side factor.
    split: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if self.max_rank is not None and (isinstance(self.max_rank, bool) or not isinstance(
                self.max_rank, int) or self.max_rank < 1):
            raise ValueError(f"NestedRule: max_rank={self.max_rank!r} must be an int >= 1")
        if not 0.0 <= float(self.split) <= 1.0:
            raise ValueError(f"NestedRule: split={self.split!r} must be in [0, 1]")


def _layer_path(path: str) -> str:
    return path[: -len("/kernel")] if path.endswith("/kernel") else path


def _unwrap(leaf: Any) -> Any:
    return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


def _tree(target: Any) -> Any:
    return nnx.state(target) if isinstance(target, nnx.Module) else target


def kernels(target: Any) -> dict[str, Nested]:
    """The :class:`Nested` forms of a tree or NNX model, keyed by layer path.

    A layer path is the kernel's path without its ``/kernel`` suffix (``mlp/layers/0``,
    ``params/Dense_0``); these are the keys of :func:`set_rank`, :func:`ranks` and
    :func:`truncate`.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import nested
        >>> tree = nested.transform({"mlp": {"up": {"kernel": jnp.ones((8, 4))}}})
        >>> {p: k.max_rank for p, k in nested.kernels(tree).items()}
        {'mlp/up': 4}
    """
    pairs, _ = rules_lib.leaf_paths(_tree(target))
    found = {_layer_path(p): _unwrap(leaf) for p, leaf in pairs}
    return {p: k for p, k in found.items() if isinstance(k, Nested)}


def _one(path: str, kernel: Any, rule: rules_lib.Rule, max_rank: int | None,
         split: float) -> Nested:
    if forms.is_form(kernel):
        raise TypeError(f"kernel is already a {type(kernel).__name__}; materialize it first")
    if isinstance(rule, NestedRule):
        max_rank, split = rule.max_rank, rule.split
    return Nested.from_dense(kernel, max_rank=max_rank, split=split, in_axes=rule.in_axes)


def transform(tree: Any, rules: rules_lib.Rule | Sequence[rules_lib.Rule] | None = None, *,
              allow_unused: bool = False) -> Any:
    """Replace the selected kernels with SVD-initialised :class:`Nested` forms (pure).

    Each selected kernel (2-D ``(in, out)``, or N-D folded by its rule's ``in_axes`` or the
    ``in_axes`` metadata :func:`subspace_jax.nn.adopt` records) is factored in descending
    singular-value order, at full width and full traced rank. The result runs in the
    model's own code: an NNX model adopted by :func:`subspace_jax.nn.adopt` as it is, any
    other Flax model (linen ``model.apply``, Hugging Face, plain NNX layers) inside
    :func:`subspace_jax.nn.intercept` (the shared train step opens it itself).

    Args:
        tree: an ``nnx.State``, a nested dict or linen variables (not modified).
        rules: :class:`NestedRule`\\ s (settings on the rule), or plain
            :class:`~subspace_jax.rules.Rule`\\ s (default settings, or ``skip``
            exclusions); None: ``NestedRule()`` (:data:`MLP_PATTERN`, ``R = min(in, out)``).
        allow_unused: do not raise for rules that match nothing.

    Returns:
        A new tree of the same kind with :class:`Nested` leaves
        (``subspace_jax.materialize`` turns them back).

    Raises:
        ValueError: a rule matched nothing, a selected leaf is not a finite kernel, an N-D
            kernel has no ``in_axes``, or ``max_rank`` is above ``min(in, out)`` (the
            message names the path and shape).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import nested
        >>> params = {"mlp": {"up": {"kernel": jax.random.normal(jax.random.key(0), (8, 32))}},
        ...           "attn": {"q": {"kernel": jnp.ones((8, 2, 4))}}}
        >>> out = nested.transform(params)
        >>> type(out["mlp"]["up"]["kernel"]).__name__, out["mlp"]["up"]["kernel"].max_rank
        ('Nested', 8)
        >>> type(out["attn"]["q"]["kernel"]).__name__
        'ArrayImpl'
        >>> q = nested.transform(params, nested.NestedRule(pattern="attn/q/kernel",
        ...                                                max_rank=4, in_axes=(0,)))
        >>> q["attn"]["q"]["kernel"].shape, q["attn"]["q"]["kernel"].max_rank
        ((8, 2, 4), 4)

    References:
        NSN, arXiv 2509.17874 (SVD initialisation, balanced split).
    """
    rules = NestedRule() if rules is None else rules
    return rules_lib.apply(tree, rules, lambda p, k, r: _one(p, k, r, None, 0.5),
                           allow_unused=allow_unused)


def factorize(tree: Any, rules: rules_lib.Rule | Sequence[rules_lib.Rule] | None = None, *,
              max_rank: int | None = None, split: float = 0.5, allow_unused: bool = False) -> Any:
    """The old name of :func:`transform` (kept for one release; use :func:`transform`).

    ``max_rank`` and ``split`` apply to plain :class:`~subspace_jax.rules.Rule`\\ s and to
    the default rule; a :class:`NestedRule` carries its own.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import nested
        >>> tree = nested.factorize({"mlp": {"up": {"kernel": jnp.ones((8, 4))}}}, max_rank=2)
        >>> tree["mlp"]["up"]["kernel"].max_rank
        2
    """
    rules = rules_lib.Rule(pattern=MLP_PATTERN) if rules is None else rules
    return rules_lib.apply(tree, rules, lambda p, k, r: _one(p, k, r, max_rank, split),
                           allow_unused=allow_unused)


def convert(model: nnx.Module, rules: rules_lib.Rule | Sequence[rules_lib.Rule] | None = None,
            *, allow_unused: bool = False) -> nnx.Module:
    """A new NNX model whose selected kernels are SVD-initialised :class:`Nested` forms.

    The NNX convenience over :func:`transform`: :func:`subspace_jax.nn.adopt` (so
    ``nnx.Linear``, ``nnx.LinearGeneral`` and ``nnx.Einsum`` take forms, and N-D kernels
    know their ``in_axes``), split, :func:`transform`, merge. Every converted kernel starts
    at its maximum rank; with ``max_rank=None`` (``R = min(in, out)``) the model reproduces
    the dense one. Tied layers stay tied. The new model shares no array with the input,
    which is not modified (also after a train step donates the new model's buffers).

    Args:
        model: any NNX model with ``nnx.Linear``/``LinearGeneral``/``Einsum`` layers.
        rules: as :func:`transform` (default: the MLP kernels; attention stays dense, as
            in the paper).
        allow_unused: do not raise for rules that match nothing.

    Raises:
        ValueError: as :func:`transform`, or a model with no such layer.

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
        >>> nested.ranks(model), type(model.attn.kernel.get_value()).__name__
        ({'mlp/layers/0': 8}, 'ArrayImpl')
        >>> x = jnp.ones((2, 8))
        >>> bool(jnp.allclose(model(x), block(x), atol=1e-5))
        True
    """
    model = nn.adopt(model)
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, transform(state, rules, allow_unused=allow_unused))


def _per_layer(rank: int | Mapping[str, int], known: Mapping[str, int]) -> dict[str, int]:
    """Resolve ``rank`` (global int or {layer path: int}) against ``known`` {path: R}."""
    if not known:
        raise ValueError("no nested layers found: convert the model (nested.convert) or "
                         "transform the tree (nested.transform) first")
    if isinstance(rank, Mapping):
        unknown = sorted(set(rank) - set(known))
        if unknown:
            raise ValueError(f"rank dict names paths that are not converted: {unknown}; "
                             f"converted layers: {sorted(known)}")
        return {p: check_rank(r, known[p], f"rank of {p!r}") for p, r in rank.items()}
    top = max(known.values())
    check_rank(rank, top)
    return {p: min(int(rank), big) for p, big in known.items()}


def _map_forms(target: Any, fn) -> Any:
    """``fn(layer path, form)`` on every :class:`Nested` of a tree or model (pure)."""
    def one(path: str, value: Any) -> Any:
        return fn(_layer_path(path), value) if isinstance(value, Nested) else value

    if isinstance(target, nnx.Module):
        graphdef, state = nnx.split(target)
        return nnx.merge(graphdef, rules_lib.map_with_path(one, state))
    return rules_lib.map_with_path(one, target)


def truncate(tree: Any, rank: int | Mapping[str, int]) -> Any:
    """Keep the first ``rank`` components of every :class:`Nested` form of a tree (pure).

    The result is a smaller tree whose forms compute at that rank (a parameter tree to
    ship). Per-layer ranks are keyed by layer path (see :func:`kernels`); a global rank is
    capped at each form's ``R``.

    Raises:
        ValueError: a rank outside ``[1, R]`` or a path that holds no :class:`Nested`.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import nested
        >>> tree = nested.transform({"mlp": {"up": {"kernel": jnp.ones((8, 32))}}})
        >>> nested.truncate(tree, 3)["mlp"]["up"]["kernel"].a.shape
        (8, 3)
        >>> nested.truncate(tree, {"mlp/dn": 3})
        Traceback (most recent call last):
        ...
        ValueError: rank dict names paths that are not converted: ['mlp/dn']; converted ...
    """
    chosen = _per_layer(rank, {p: k.max_rank for p, k in kernels(tree).items()})
    return _map_forms(tree, lambda p, k: k.prefix(chosen[p]) if p in chosen else k)


def set_rank(target: Any, rank: int | Mapping[str, int], *, static: bool = True) -> Any:
    """One global rank, or per-layer ranks ``{layer path: r}``, on a tree or model (pure).

    ``static=True`` sets both the computed width and the traced rank, so the result
    computes ``r (in + out)`` multiply-adds per token (one compilation per rank);
    ``static=False`` sets only the traced rank (one compilation serves every rank, at the
    cost of the current width; this is what :func:`subspace_jax.nested.loss` does in
    every step). A global rank is capped at each layer's ``R``; layer paths are those of
    :func:`kernels` (``bert/encoder/layers/0/mlp/up``).

    Args:
        target: an ``nnx.State``, dict or linen tree, or an NNX model.
        rank: a Python int, or ``{layer path: int}`` (other layers unchanged).
        static: also set the static width.

    Returns:
        A new tree (or model, sharing the unchanged arrays with ``target``); the input is
        not modified.

    Raises:
        ValueError: a rank outside ``[1, R]``; a dict naming a path that is not converted;
            with ``static=False``, a rank above a layer's current width; no nested layer.

    Examples:
        >>> from flax import nnx
        >>> from subspace_jax import nested
        >>> model = nested.convert(nnx.Sequential(nnx.Linear(8, 16, rngs=nnx.Rngs(0)),
        ...                                       nnx.Linear(16, 4, rngs=nnx.Rngs(1))),
        ...                        nested.NestedRule(pattern="layers/.*/kernel"))
        >>> small = nested.set_rank(model, {"layers/0": 2})
        >>> nested.ranks(small), small.layers[0].kernel.get_value().width, nested.ranks(model)
        ({'layers/0': 2, 'layers/1': 4}, 2, {'layers/0': 8, 'layers/1': 4})
        >>> state = nested.set_rank(nnx.state(model), 3, static=False)  # a tree; capped at R
        >>> nested.ranks(state)
        {'layers/0': 3, 'layers/1': 3}
        >>> nested.set_rank(model, 9)
        Traceback (most recent call last):
        ...
        ValueError: rank=9 is outside [1, 8] (the maximum rank R)
    """
    found = kernels(target)
    chosen = _per_layer(rank, {p: k.max_rank for p, k in found.items()})
    if not static:
        for path, r in chosen.items():
            if r > found[path].active_width:
                raise ValueError(f"rank {r} of {path!r} is above its computed width "
                                 f"{found[path].active_width}; use static=True to widen it")

    def one(path: str, k: Nested) -> Nested:
        if path not in chosen:
            return k
        return k.at(jnp.int32(chosen[path]), width=chosen[path] if static else None)

    return _map_forms(target, one)


def ranks(target: Any) -> dict[str, int]:
    """The active (traced) rank of every nested layer of a tree or model, as ints.

    A form without a traced rank reports its width.

    Examples:
        >>> from flax import nnx
        >>> from subspace_jax import nested
        >>> nested.ranks(nested.convert(nnx.Sequential(nnx.Linear(8, 3, rngs=nnx.Rngs(0))),
        ...                             nested.NestedRule(pattern=".*kernel")))
        {'layers/0': 3}
    """
    return {p: min(int(k.rank), k.active_width) if k.rank is not None else k.active_width
            for p, k in kernels(target).items()}
