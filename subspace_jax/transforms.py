"""Tree transforms shared by every method: factor kernels into ``LowRank``, and back.

:func:`factorize` replaces the kernels selected by path rules with
:class:`~subspace_jax.forms.LowRank` forms (truncated SVD at a fixed rank or an
energy threshold); :func:`materialize` turns every kernel form in a tree back
into a dense array, so any transformed tree can be exported to code that knows
nothing about this library. Both are pure: trees in, trees out, the input is
untouched, and they accept an ``nnx.State``, a pure dict or linen variables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax

from subspace_jax import forms
from subspace_jax import rules as rules_lib  # `rules` is factorize's argument

__all__ = ["LowRankRule", "factorize", "materialize"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LowRankRule(rules_lib.Rule):
    """Factor the matched ``(in, out)`` kernels by truncated SVD.

    Attributes:
        rank: keep this many singular triplets (capped at ``min(in, out)`` only if
            ``clip_rank``; otherwise a larger rank is an error naming the path).
        eps: instead of ``rank``, the energy threshold in ``(0, 1]`` (per kernel).
        split: exponent of the singular values given to the input-side factor
            ``a`` (0.5 balanced, 1 all in ``a``, 0 all in ``b``).
        clip_rank: cap ``rank`` at ``min(in, out)`` instead of raising.

    Examples:
        >>> from subspace_jax import transforms
        >>> transforms.LowRankRule(pattern=".*kernel", rank=8).describe()
        'LowRankRule(rank=8, eps=None, split=0.5, clip_rank=False)'
    """

    # --- behaviour ---
    # Fixed rank of every matched kernel.
    rank: int | None = None
    # Energy threshold: smallest rank whose squared-singular-value share reaches eps.
    eps: float | None = None
    # Exponent of the singular values given to the input-side factor ``a``.
    split: float = 0.5
    # Cap ``rank`` at min(in, out) instead of raising.
    clip_rank: bool = False

    def __post_init__(self):
        super().__post_init__()
        if (self.rank is None) == (self.eps is None) and not self.skip:
            raise ValueError(f"LowRankRule({self.pattern!r}) needs exactly one of rank and eps")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"LowRankRule({self.pattern!r}).rank must be an int >= 1, got {self.rank!r}")
        if self.eps is not None and not 0.0 < self.eps <= 1.0:
            raise ValueError(f"LowRankRule({self.pattern!r}).eps must be in (0, 1], got {self.eps}")


def _factor_one(path: str, kernel: Any, rule: rules_lib.Rule) -> forms.LowRank:
    if not isinstance(rule, LowRankRule):
        raise TypeError(f"factorize needs LowRankRule rules, got {type(rule).__name__}")
    if forms.is_form(kernel):
        raise TypeError(f"kernel is already a {type(kernel).__name__}; materialize it first")
    if getattr(kernel, "ndim", 0) < 2:
        raise ValueError(
            f"expected an (in, out) or N-D kernel, got shape {tuple(getattr(kernel, 'shape', ()))}"
        )
    rank = rule.rank
    if rank is not None and rule.clip_rank:
        rank = min(rank, *forms.fold_kernel(kernel, rule.in_axes)[0].shape)
    return forms.LowRank.from_dense(kernel, rank=rank, eps=rule.eps, split=rule.split,
                                    in_axes=rule.in_axes)


def factorize(
    tree: Any, rules: rules_lib.Rule | Sequence[rules_lib.Rule], *, allow_unused: bool = False
) -> Any:
    """Replace the kernels selected by ``rules`` with ``LowRank`` forms.

    Args:
        tree: an ``nnx.State``, a nested dict, or linen variables.
        rules: :class:`LowRankRule` objects (and plain skip rules), ordered; first match wins.
        allow_unused: do not raise for rules that match nothing.

    Returns:
        A tree of the same kind with :class:`~subspace_jax.forms.LowRank` leaves
        where rules matched.

    Raises:
        ValueError: a rule matched nothing, or a matched leaf is not a finite 2-D
            kernel, or its rank is out of range (messages name the path).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import transforms
        >>> params = {"up": {"kernel": jax.random.normal(jax.random.key(0), (16, 32))}}
        >>> low = transforms.factorize(params, transforms.LowRankRule(pattern=".*kernel", rank=4))
        >>> low["up"]["kernel"].a.shape, low["up"]["kernel"].b.shape
        ((16, 4), (4, 32))
        >>> transforms.materialize(low)["up"]["kernel"].shape
        (16, 32)
    """
    return rules_lib.apply(tree, rules, _factor_one, allow_unused=allow_unused)


def materialize(tree: Any) -> Any:
    """A whole tree with every kernel form replaced by its dense matrix (inverts transforms).

    This is the tree-to-tree function, also exported as ``subspace_jax.materialize``.
    For one kernel (a form or a dense array in, a dense array out) use
    :func:`subspace_jax.forms.materialize`, which this applies to each form leaf.

    Works on any pytree (``nnx.State``, dicts, a single form); ``nnx.Variable``
    wrappers keep their type and metadata; non-form leaves are left as they are.

    Args:
        tree: an ``nnx.State``, a nested dict / list, linen variables or a form.

    Returns:
        A tree of the same kind and structure with dense ``(in, out)`` kernels.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import forms, transforms
        >>> tree = {"k": forms.LowRank(jnp.ones((3, 1)), jnp.ones((1, 2))), "b": jnp.zeros(2)}
        >>> jax.tree.map(jnp.shape, transforms.materialize(tree))
        {'b': (2,), 'k': (3, 2)}
    """
    return jax.tree_util.tree_map(forms.materialize, tree, is_leaf=forms.is_form)
