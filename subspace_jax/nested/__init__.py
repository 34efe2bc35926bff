"""Nested Subspace Networks (NSN): one model, any rank at test time.

Each selected Linear (by default the MLP Linears; attention stays dense) becomes one pair
of SVD-initialised factors of maximum rank ``R``; rank ``r`` uses the first ``r``
components, two thin matmuls on prefix slices, so ``Im W_1 ⊆ Im W_2 ⊆ ... ⊆ Im W_R`` by
construction and rank ``r`` costs ``r (in + out)`` multiply-adds per token. Training runs
the anchor rank and one sampled rank per step, weighed by learned per-rank
log-variances, with a curriculum toward low ranks. After training, ``set_rank`` picks
any rank (or per-layer ranks) without retraining, and ``rank_for_budget`` the largest
rank within a FLOP budget.

* :mod:`~subspace_jax.nested.core`: array maths (prefix matmul, grid, curriculum, energy,
  principal angles).
* :mod:`~subspace_jax.nested.form`: the :class:`Nested` kernel form.
* :mod:`~subspace_jax.nested.layer`: :func:`factorize` / :func:`truncate` (pure trees),
  :func:`convert`, :class:`NestedLinear`, :func:`set_rank`, :func:`ranks` (NNX).
* :mod:`~subspace_jax.nested.objective`: :class:`Objective`, :func:`attach`, :func:`loss`,
  :func:`optimizer`.
* :mod:`~subspace_jax.nested.cost`: per-layer costs, three denominators,
  :func:`rank_for_budget`.
* :mod:`~subspace_jax.nested.bench`: the MiniLM benchmark's building blocks and demo rows.

Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from subspace_jax import nested
    >>> class Block(nnx.Module):
    ...     def __init__(self):
    ...         self.attn = nnx.Linear(16, 16, rngs=nnx.Rngs(0))
    ...         self.mlp = nnx.Sequential(nnx.Linear(16, 64, rngs=nnx.Rngs(1)), jax.nn.gelu,
    ...                                   nnx.Linear(64, 16, rngs=nnx.Rngs(2)))
    ...     def __call__(self, x):
    ...         return self.mlp(self.attn(x))
    >>> block = Block()
    >>> model = nested.convert(block)                       # R = 16 in both MLP Linears
    >>> x = jax.random.normal(jax.random.key(2), (4, 16))
    >>> bool(jnp.allclose(model(x), block(x), atol=1e-4))  # full rank reproduces dense
    True
    >>> r = nested.rank_for_budget(model, 0.5)            # largest rank within 50% MLP FLOPs
    >>> r, nested.set_rank(model, r).mlp.layers[0].width, type(model.attn).__name__
    (6, 6, 'Linear')

References:
    Rauba and van der Schaar, "Deep Hierarchical Learning with Nested Subspace Networks",
    ICLR 2026, arXiv 2509.17874.
"""

from subspace_jax.nested import core as core
from subspace_jax.nested.cost import DENOMINATORS as DENOMINATORS
from subspace_jax.nested.cost import LayerCost as LayerCost
from subspace_jax.nested.cost import flop_fractions as flop_fractions
from subspace_jax.nested.cost import layer_costs as layer_costs
from subspace_jax.nested.cost import other_linear_macs as other_linear_macs
from subspace_jax.nested.cost import rank_for_budget as rank_for_budget
from subspace_jax.nested.form import Nested as Nested
from subspace_jax.nested.layer import MLP_PATTERN as MLP_PATTERN
from subspace_jax.nested.layer import NestedLinear as NestedLinear
from subspace_jax.nested.layer import NestedRank as NestedRank
from subspace_jax.nested.layer import NestedRule as NestedRule
from subspace_jax.nested.layer import convert as convert
from subspace_jax.nested.layer import factorize as factorize
from subspace_jax.nested.layer import layers as layers
from subspace_jax.nested.layer import ranks as ranks
from subspace_jax.nested.layer import set_rank as set_rank
from subspace_jax.nested.layer import truncate as truncate
from subspace_jax.nested.objective import OBJECTIVE as OBJECTIVE
from subspace_jax.nested.objective import LogVariance as LogVariance
from subspace_jax.nested.objective import Objective as Objective
from subspace_jax.nested.objective import ObjectiveStep as ObjectiveStep
from subspace_jax.nested.objective import attach as attach
from subspace_jax.nested.objective import loss as loss
from subspace_jax.nested.objective import objective_of as objective_of
from subspace_jax.nested.objective import optimizer as optimizer

__all__ = [
    "DENOMINATORS", "LayerCost", "LogVariance", "MLP_PATTERN", "Nested", "NestedLinear",
    "NestedRank", "NestedRule", "OBJECTIVE", "Objective", "ObjectiveStep", "attach", "convert",
    "core", "factorize", "flop_fractions", "layer_costs", "layers", "loss", "objective_of",
    "optimizer", "other_linear_macs", "rank_for_budget", "ranks", "set_rank", "truncate",
]
