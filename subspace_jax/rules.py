"""Path rules: select the leaves of a parameter tree by regexes on their paths.

A leaf's path is its key path joined by ``/``, e.g. ``encoder/layers/3/mlp/up/kernel``
(NNX state), ``params/Dense_0/kernel`` (linen variables) or ``blocks/0/attn/q/kernel``
(a pure dict). Rules are ordered; each rule's ``pattern`` is matched with
``re.fullmatch`` and the **first** matching rule claims the leaf. A rule that
claims nothing is an error (a typo in a regex must not silently train the wrong
model) unless the rule is ``optional`` or the call says ``allow_unused=True``.

The same functions work on an ``nnx.State`` (leaves are the ``nnx.Variable``
values; the Variable wrappers are kept), a pure nested dict / list, and a linen
variables dict (``FrozenDict`` included). Kernel forms are treated as single
leaves, so rules can select already-transformed kernels too.

Method modules subclass :class:`Rule` to add their settings (rank, eps, ...) and
call :func:`apply` with a function that rewrites one selected leaf.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx

from subspace_jax import forms

__all__ = [
    "MLP_PATTERN",
    "Rule",
    "Match",
    "Selection",
    "select",
    "apply",
    "map_with_path",
    "leaf_paths",
    "keypath_str",
]


#: The one default selection of every method: each kernel inside a module named ``mlp`` at
#: any depth (``mlp/up/kernel``, ``blocks/0/mlp/gate/kernel``, ``mlp/layers/0/kernel``), by
#: path segment, so ``mlp_norm`` and attention stay as they are.
MLP_PATTERN = r"(.*/)?mlp/(.*/)?kernel"


def _axes_tuple(value: Any, where: str) -> tuple[int, ...]:
    axes = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(axes, tuple) or not axes or not all(
            isinstance(a, int) and not isinstance(a, bool) for a in axes):
        raise ValueError(f"{where} must be an int or a non-empty tuple of ints, got {value!r}")
    return axes


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """One selection rule. Subclass it to attach method settings.

    Attributes:
        pattern: regex fully matched (``re.fullmatch``) against the ``/``-joined path.
        skip: claim the matching leaves but leave them untouched (an exclusion
            placed before broader rules, e.g. ``Rule(pattern='.*head.*', skip=True)``).
        optional: matching nothing is not an error for this rule.
        in_axes: for N-D kernels, the kernel axes that contract with the layer's input
            (see :class:`subspace_jax.forms.Fold`): one tuple for every matched kernel, or
            a mapping from kernel path to tuple (e.g. from
            :func:`subspace_jax.nn.kernel_axes`). None: a 2-D kernel is ``(in, out)``, and
            an N-D kernel uses the ``in_axes`` metadata that :func:`subspace_jax.nn.adopt`
            records on its Variable.

    Examples:
        >>> from subspace_jax import rules
        >>> r = rules.Rule(pattern=r".*/mlp/(up|down)/kernel")
        >>> r.matches("blocks/0/mlp/up/kernel"), r.matches("blocks/0/attn/q/kernel")
        (True, False)
    """

    # --- keys that match ---
    # Regex for re.fullmatch against the '/'-joined key path of a leaf.
    pattern: str
    # --- behaviour ---
    # Claim matching leaves but keep them as they are.
    skip: bool = False
    # Do not raise when this rule matches nothing.
    optional: bool = False
    # Kernel axes contracted with the input, for N-D kernels (a tuple, or {path: tuple}).
    in_axes: Any = None

    def __post_init__(self):
        if not isinstance(self.pattern, str):
            raise TypeError(f"Rule.pattern must be a str regex, got {type(self.pattern).__name__}")
        if isinstance(self.in_axes, Mapping):
            object.__setattr__(self, "in_axes", {
                str(k): _axes_tuple(v, f"in_axes[{k!r}]") for k, v in self.in_axes.items()})
        elif self.in_axes is not None:
            object.__setattr__(self, "in_axes", _axes_tuple(self.in_axes, "in_axes"))
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"Rule.pattern {self.pattern!r} is not a valid regex: {e}") from None

    def matches(self, path: str) -> bool:
        """Whether ``pattern`` fully matches ``path``."""
        return re.fullmatch(self.pattern, path) is not None

    def axes_for(self, path: str, metadata: Mapping[str, Any] | None = None
                 ) -> tuple[int, ...] | None:
        """The ``in_axes`` of the kernel at ``path``: the rule's, else the Variable's metadata.

        Examples:
            >>> from subspace_jax import rules
            >>> rules.Rule(pattern=".*", in_axes={"o/kernel": (0, 1)}).axes_for("o/kernel")
            (0, 1)
            >>> rules.Rule(pattern=".*").axes_for("q/kernel", {"in_axes": (0,)})
            (0,)
        """
        if isinstance(self.in_axes, Mapping):
            if path in self.in_axes:
                return self.in_axes[path]
        elif self.in_axes is not None:
            return self.in_axes
        return (metadata or {}).get("in_axes")

    def describe(self) -> str:
        """One-line description of what happens to a claimed leaf (for tables)."""
        if self.skip:
            return "keep (skip rule)"
        if type(self) is Rule:
            return "select"
        fields = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.name not in ("pattern", "skip", "optional")
            and not (f.name == "in_axes" and self.in_axes is None)
        ]
        return f"{type(self).__name__}({', '.join(fields)})"


@dataclasses.dataclass(frozen=True)
class Match:
    """A leaf of the tree and the rule that claimed it.

    Attributes:
        path: ``/``-joined key path of the leaf.
        shape: the leaf's shape (``()`` for non-arrays).
        dtype: the leaf's dtype as a string.
        rule_index: index of the claiming rule, or ``None``.
        rule: the claiming rule, or ``None`` when no rule matched.
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    rule_index: int | None
    rule: Rule | None

    @property
    def selected(self) -> bool:
        """Claimed by a rule that is not a skip rule."""
        return self.rule is not None and not self.rule.skip


@dataclasses.dataclass(frozen=True)
class Selection:
    """The result of matching rules against a tree.

    Attributes:
        matches: one :class:`Match` per leaf, in tree order.
        rules: the rules, in order.
        counts: number of leaves each rule claimed.
        shadowed: for each rule, the number of leaves it matched that an earlier rule had claimed.
    """

    matches: tuple[Match, ...]
    rules: tuple[Rule, ...]
    counts: tuple[int, ...]
    shadowed: tuple[int, ...]

    @property
    def selected(self) -> tuple[Match, ...]:
        """Matches claimed by a non-skip rule: the leaves a transform will rewrite."""
        return tuple(m for m in self.matches if m.selected)

    @property
    def unused(self) -> tuple[Rule, ...]:
        """Rules that claimed no leaf."""
        return tuple(r for r, n in zip(self.rules, self.counts) if n == 0)

    def table(self, *, all_leaves: bool = False) -> str:
        """A text table: path, shape, dtype and what will happen, one row per leaf.

        Args:
            all_leaves: include leaves no rule claimed (shown as ``unchanged``).
        """
        rows = [
            (m.path, str(m.shape), m.dtype, m.rule.describe() if m.rule else "unchanged")
            for m in self.matches
            if all_leaves or m.rule is not None
        ]
        head = ("path", "shape", "dtype", "action")
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def keypath_str(keypath: Sequence[Any]) -> str:
    """Join a JAX key path (or a tuple of plain keys) with ``/``: the path rules match.

    Dict keys, sequence indices, attribute names (registered dataclasses, named
    tuples, ``nnx.State``) and flattened indices all appear bare, so a path reads
    ``encoder/layers/0/kernel``. This is ``jax.tree_util.keystr(keypath,
    simple=True, separator="/")``.

    Examples:
        >>> import jax
        >>> from subspace_jax import rules
        >>> (kp, _), = jax.tree_util.tree_leaves_with_path({"a": [None, {"w": 1}]})
        >>> rules.keypath_str(kp)
        'a/1/w'
    """
    return jax.tree_util.keystr(tuple(keypath), simple=True, separator="/")


def _is_leaf(x: Any) -> bool:
    return isinstance(x, nnx.Variable) or forms.is_form(x)


def _unwrap(x: Any) -> Any:
    return x.get_value() if isinstance(x, nnx.Variable) else x


def leaf_paths(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    """Flatten a tree into ``(path, leaf)`` pairs and the treedef to rebuild it.

    ``nnx.Variable`` wrappers and kernel forms count as single leaves; the
    returned leaf is the Variable itself (use its value) or the form.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import rules
        >>> pairs, _ = rules.leaf_paths({"l1": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}})
        >>> [p for p, _ in pairs]
        ['l1/bias', 'l1/kernel']
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
    return [(keypath_str(kp), leaf) for kp, leaf in flat], treedef


def _normalize(rules: Rule | Sequence[Rule]) -> tuple[Rule, ...]:
    rules = (rules,) if isinstance(rules, Rule) else tuple(rules)
    for i, r in enumerate(rules):
        if not isinstance(r, Rule):
            raise TypeError(f"rule #{i} must be a subspace_jax.rules.Rule, got {r!r}")
    return rules


def _shape_dtype(value: Any) -> tuple[tuple[int, ...], str]:
    shape = tuple(int(d) for d in getattr(value, "shape", ()))
    dtype = getattr(value, "dtype", None)
    return shape, (str(dtype) if dtype is not None else type(value).__name__)


def select(tree: Any, rules: Rule | Sequence[Rule], *, allow_unused: bool = False) -> Selection:
    """Match ordered rules against every leaf path of ``tree`` (first match wins).

    Args:
        tree: an ``nnx.State``, a nested dict/list of arrays, or linen variables.
        rules: one :class:`Rule` or an ordered sequence of them.
        allow_unused: do not raise for rules that claim nothing.

    Returns:
        A :class:`Selection`; ``print(selection)`` shows the table.

    Raises:
        ValueError: a non-optional rule claimed no leaf (the message names the
            rule, says whether earlier rules shadowed it, and lists known paths).

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import rules
        >>> params = {"up": {"kernel": jnp.ones((4, 8))}, "down": {"kernel": jnp.ones((8, 4))}}
        >>> sel = rules.select(params, [rules.Rule(pattern="up/kernel")])
        >>> [m.path for m in sel.selected]
        ['up/kernel']
        >>> rules.select(params, [rules.Rule(pattern="mlp/.*")])
        Traceback (most recent call last):
        ...
        ValueError: rule #0 Rule(pattern='mlp/.*', ...) matched no path...
    """
    rules = _normalize(rules)
    pairs, _ = leaf_paths(tree)
    counts, shadowed, matches = [0] * len(rules), [0] * len(rules), []
    for path, leaf in pairs:
        hits = [i for i, r in enumerate(rules) if r.matches(path)]
        for i in hits[1:]:
            shadowed[i] += 1
        if hits:
            counts[hits[0]] += 1
        idx = hits[0] if hits else None
        shape, dtype = _shape_dtype(_unwrap(leaf))
        matches.append(Match(path, shape, dtype, idx, rules[idx] if hits else None))
    sel = Selection(tuple(matches), rules, tuple(counts), tuple(shadowed))
    if not allow_unused:
        _raise_unused(sel, [p for p, _ in pairs])
    return sel


def _raise_unused(sel: Selection, paths: list[str]) -> None:
    for i, (rule, n) in enumerate(zip(sel.rules, sel.counts)):
        if n or rule.optional:
            continue
        why = (
            f" (it matched {sel.shadowed[i]} path(s) that earlier rules claimed first)"
            if sel.shadowed[i]
            else ""
        )
        shown = "\n  ".join(paths[:40]) + ("\n  ..." if len(paths) > 40 else "")
        raise ValueError(
            f"rule #{i} {rule!r} matched no path{why}; patterns are fully matched against "
            f"'/'-joined paths. The tree has {len(paths)} leaves:\n  {shown}"
        )


def apply(
    tree: Any,
    rules: Rule | Sequence[Rule],
    fn: Callable[[str, Any, Rule], Any],
    *,
    allow_unused: bool = False,
) -> Any:
    """Rewrite the leaves selected by ``rules`` with ``fn(path, value, rule)``.

    The result has the same kind and structure as ``tree``; Variables keep their
    type and metadata with the new value; unselected leaves are the same objects. The rule
    ``fn`` receives has its ``in_axes`` resolved for that leaf (:meth:`Rule.axes_for`: the
    rule's own, else the ``in_axes`` metadata of the leaf's ``nnx.Variable``).
    A ``ValueError`` or ``TypeError`` raised by ``fn`` is re-raised with the path.

    Args:
        tree: an ``nnx.State``, a nested dict/list, or linen variables.
        rules: one :class:`Rule` or an ordered sequence of them.
        fn: called once per selected leaf with its path, its value (unwrapped
            from any ``nnx.Variable``) and the rule that claimed it.
        allow_unused: do not raise for rules that claim nothing.

    Returns:
        The rewritten tree.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import rules
        >>> params = {"up": {"kernel": jnp.ones((2, 2))}, "down": {"kernel": jnp.ones((2, 2))}}
        >>> out = rules.apply(params, rules.Rule(pattern="up/.*"), lambda path, x, rule: 2 * x)
        >>> float(out["up"]["kernel"][0, 0]), float(out["down"]["kernel"][0, 0])
        (2.0, 1.0)
    """
    sel = select(tree, rules, allow_unused=allow_unused)
    claimed = {m.path: m for m in sel.matches if m.selected}
    metadata = {path: leaf.get_metadata() for path, leaf in leaf_paths(tree)[0]
                if path in claimed and isinstance(leaf, nnx.Variable)}

    def rewrite(path: str, value: Any) -> Any:
        if path not in claimed:
            return value
        rule = claimed[path].rule
        axes = rule.axes_for(path, metadata.get(path))
        if axes != rule.in_axes:
            rule = dataclasses.replace(rule, in_axes=axes)
        try:
            return fn(path, value, rule)
        except (ValueError, TypeError) as e:
            raise type(e)(f"at {path!r} (shape {claimed[path].shape}): {e}") from e

    return map_with_path(rewrite, tree)


def map_with_path(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    """Map ``fn(path, value)`` over every leaf, keeping ``nnx.Variable`` wrappers.

    Kernel forms and Variable values are passed whole; a Variable keeps its type
    and metadata with the new value. Leaves for which ``fn`` returns its input
    unchanged stay the same objects.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import rules
        >>> rules.map_with_path(lambda path, x: path, {"a": {"b": jnp.ones(2)}})
        {'a': {'b': 'a/b'}}
    """
    pairs, treedef = leaf_paths(tree)
    leaves = []
    for path, leaf in pairs:
        value = _unwrap(leaf)
        new = fn(path, value)
        if new is not value:
            leaf = leaf.replace(new) if isinstance(leaf, nnx.Variable) else new
        leaves.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, leaves)
