"""Honest FLOP accounting for nested layers: per-layer costs, three denominators, budget to rank.

Costs are multiply-adds (MACs) per token (FLOPs are twice that). A dense ``(in, out)``
layer costs ``in * out``; a nested layer at rank ``r`` costs ``r (in + out)``, which is
cheaper only below the break-even rank ``in * out / (in + out)``: at its full rank
``R = min(in, out)`` a nested layer costs *more* than the dense one (1.25x for BERT's
``384 x 1536`` MLP). So a fraction of "the FLOPs" needs its denominator:

* ``"mlp"``: the converted layers at rank ``r`` over the same layers dense;
* ``"model"``: the whole model at rank ``r`` over the whole dense model;
* ``"max"``: the whole model at rank ``r`` over the whole model at its maximum rank.

"The whole model" is the converted layers plus ``other_macs``: by default the other
Linear layers of the model (attention projections, head); pass ``other_macs`` to add what
is not a Linear (attention's ``T d`` score and value products per token and layer).

References:
    NSN, arXiv 2509.17874 (cost linear in the rank; its break-even point is noted as a
    limitation).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from subspace_jax import forms
from subspace_jax.nested.form import Nested, check_rank
from subspace_jax.nested.layer import _per_layer, kernels

__all__ = ["LayerCost", "DENOMINATORS", "layer_costs", "other_linear_macs", "flop_fractions",
           "rank_for_budget"]

DENOMINATORS = ("mlp", "model", "max")


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """Per-token cost of one nested layer.

    Attributes:
        path: the layer's path.
        d_in: input features.
        d_out: output features.
        max_rank: ``R``.
        dense: ``d_in * d_out`` MACs per token of the dense layer.
        per_rank: ``d_in + d_out`` MACs per token for each component.
        break_even: ``d_in d_out / (d_in + d_out)``: below this rank nested is cheaper.
    """

    path: str
    d_in: int
    d_out: int
    max_rank: int

    @property
    def dense(self) -> int:
        return self.d_in * self.d_out

    @property
    def per_rank(self) -> int:
        return self.d_in + self.d_out

    @property
    def break_even(self) -> float:
        return self.dense / self.per_rank

    def at(self, rank: int) -> int:
        """MACs per token at ``rank`` (capped at ``R``)."""
        return min(int(rank), self.max_rank) * self.per_rank


def layer_costs(target: Any) -> list[LayerCost]:
    """The :class:`LayerCost` of every :class:`Nested` form of a tree or NNX model.

    An N-D kernel counts as its folded ``(in, out)`` matrix.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import nested
        >>> tree = nested.transform({"mlp": {"up": {"kernel": jnp.ones((384, 1536))}}})
        >>> (c,) = nested.layer_costs(tree)
        >>> c.dense, c.at(192), c.break_even
        (589824, 368640, 307.2)
    """
    return [LayerCost(p, *k.matrix_shape, k.max_rank) for p, k in kernels(target).items()]


def other_linear_macs(model: nnx.Module) -> int:
    """MACs per token of the model's linear layers that are not nested (dense or other forms).

    Counts ``nnx.Linear``, ``nnx.LinearGeneral`` and ``nnx.Einsum`` kernels (one MAC per
    kernel entry and token; an N-D kernel as its folded matrix).

    Examples:
        >>> from flax import nnx
        >>> from subspace_jax import nested
        >>> other_linear_macs(nnx.Sequential(nnx.Linear(4, 3, rngs=nnx.Rngs(0))))
        12
    """
    total = 0
    for _, module in nnx.iter_graph(model):
        if isinstance(module, (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)):
            kernel = module.kernel.get_value()
            if not isinstance(kernel, Nested):
                total += forms.flops(kernel, 1) // 2
    return total


def _resolve(target: Any, other_macs: int | None) -> tuple[list[LayerCost], int]:
    costs = layer_costs(target)
    if not costs:
        raise ValueError("no nested layers found: convert the model (nested.convert) first")
    if other_macs is None:
        other_macs = other_linear_macs(target) if isinstance(target, nnx.Module) else 0
    if other_macs < 0:
        raise ValueError(f"other_macs={other_macs!r} must be >= 0")
    return costs, int(other_macs)


def flop_fractions(target: Any, rank: int | Mapping[str, int], *,
                   other_macs: int | None = None) -> dict[str, float]:
    """Per-token MACs at ``rank`` and the cost fraction under each denominator.

    Args:
        target: a converted model, or a tree with :class:`Nested` forms.
        rank: a global rank (capped at each layer's ``R``) or ``{layer path: rank}``
            (unnamed layers at their ``R``).
        other_macs: MACs per token outside the nested layers (default: the model's other
            Linears; 0 for a tree).

    Returns:
        ``nested``, ``dense_mlp``, ``max_rank``, ``other`` (MACs per token) and the
        fractions ``mlp``, ``model`` and ``max``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import nested
        >>> tree = nested.transform({"mlp": {"up": {"kernel": jnp.ones((384, 1536))}}})
        >>> f = nested.flop_fractions(tree, 192, other_macs=589824)
        >>> f["mlp"], f["model"], round(f["max"], 4)
        (0.625, 0.8125, 0.7222)
    """
    costs, other = _resolve(target, other_macs)
    chosen = _per_layer(rank, {c.path: c.max_rank for c in costs})
    nested = sum(c.at(chosen.get(c.path, c.max_rank)) for c in costs)
    dense = sum(c.dense for c in costs)
    top = sum(c.at(c.max_rank) for c in costs)
    return {"nested": nested, "dense_mlp": dense, "max_rank": top, "other": other,
            "mlp": nested / dense, "model": (other + nested) / (other + dense),
            "max": (other + nested) / (other + top)}


def rank_for_budget(target: Any, fraction: float, denominator: str = "mlp", *,
                    other_macs: int | None = None) -> int:
    """The largest global rank whose cost fraction is within ``fraction``.

    The cost grows with the rank, so this is the largest ``r`` in ``[1, R]`` with
    ``flop_fractions(target, r)[denominator] <= fraction``; a budget at or above the cost
    of ``R`` gives ``R``.

    Args:
        target: a converted model, or a tree with :class:`Nested` forms.
        fraction: the budget, a positive fraction of ``denominator`` (see the module doc).
        denominator: ``"mlp"``, ``"model"`` or ``"max"``.
        other_macs: as in :func:`flop_fractions`.

    Raises:
        ValueError: an unknown denominator, a non-positive or non-finite fraction, or a
            budget below the cost of rank 1.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import nested
        >>> tree = nested.transform({"mlp": {"up": {"kernel": jnp.ones((384, 1536))}}})
        >>> nested.rank_for_budget(tree, 0.5), nested.rank_for_budget(tree, 1.0)  # 1.0: break-even
        (153, 307)
        >>> nested.rank_for_budget(tree, 1e-4)
        Traceback (most recent call last):
        ...
        ValueError: budget fraction=0.0001 of the 'mlp' cost is below the cost of rank 1 ...
    """
    if denominator not in DENOMINATORS:
        raise ValueError(f"denominator={denominator!r} must be one of {DENOMINATORS}")
    if (isinstance(fraction, bool) or not isinstance(fraction, numbers.Real)
            or not math.isfinite(fraction) or fraction <= 0):
        raise ValueError(f"fraction={fraction!r} must be a finite number > 0")
    costs, other = _resolve(target, other_macs)
    top = max(c.max_rank for c in costs)
    r = np.arange(1, top + 1, dtype=np.int64)
    nested = sum(np.minimum(r, c.max_rank) * c.per_rank for c in costs)
    extra = 0 if denominator == "mlp" else other
    denom = {"mlp": sum(c.dense for c in costs), "model": other + sum(c.dense for c in costs),
             "max": other + sum(c.at(c.max_rank) for c in costs)}[denominator]
    # integer numerators against the float budget, with a relative slack of 1e-12 so that a
    # budget computed as cost(r) / denominator gives back r
    feasible = (extra + nested) <= fraction * denom * (1 + 1e-12)
    if not feasible[0]:
        raise ValueError(f"budget fraction={fraction!r} of the {denominator!r} cost is below "
                         f"the cost of rank 1 ({(extra + nested[0]) / denom:.6g})")
    return check_rank(int(np.flatnonzero(feasible)[-1]) + 1, top)
