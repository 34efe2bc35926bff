"""Nested Subspace Networks (NSN): one model, any rank at test time.

Each selected kernel (by default the MLP kernels, :data:`subspace_jax.rules.MLP_PATTERN`;
attention stays dense; N-D kernels fold) becomes one pair of SVD-initialised factors of maximum rank ``R``; rank ``r`` uses the first ``r``
components, two thin matmuls on prefix slices, so ``Im W_1 ⊆ Im W_2 ⊆ ... ⊆ Im W_R`` by
construction and rank ``r`` costs ``r (in + out)`` multiply-adds per token. Training runs
the anchor rank and one sampled rank per step, weighed by learned per-rank
log-variances, with a curriculum toward low ranks. After training, ``set_rank`` picks
any rank (or per-layer ranks) without retraining, and ``rank_for_budget`` the largest
rank within a FLOP budget. The :class:`Nested` form carries its active rank, so a
transformed tree runs in any Flax model (linen, Hugging Face, NNX) through the library's
one call path; every verb is pure and the objective's state is returned, never attached.

* :mod:`~subspace_jax.nested.core`: array maths (prefix matmul, grid, curriculum, energy,
  principal angles).
* :mod:`~subspace_jax.nested.form`: the :class:`Nested` kernel form.
* :mod:`~subspace_jax.nested.layer`: :class:`NestedRule`, :func:`transform` /
  :func:`truncate` / :func:`set_rank` / :func:`ranks` / :func:`kernels` (pure, trees or
  models), :func:`convert` (the NNX convenience).
* :mod:`~subspace_jax.nested.training`: :func:`objective` (the method's own state, returned),
  :func:`loss`, :func:`advance`, :func:`optimizer`.
* :mod:`~subspace_jax.nested.cost`: per-layer costs, three denominators,
  :func:`rank_for_budget`.

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
    >>> small = nested.set_rank(model, r)                 # a new model; `model` unchanged
    >>> r, small.mlp.layers[0].kernel.get_value().width, nested.ranks(model)["mlp/layers/0"]
    (6, 6, 16)

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
from subspace_jax.nested.layer import NestedRule as NestedRule
from subspace_jax.nested.layer import convert as convert
from subspace_jax.nested.layer import factorize as factorize
from subspace_jax.nested.layer import kernels as kernels
from subspace_jax.nested.layer import ranks as ranks
from subspace_jax.nested.layer import set_rank as set_rank
from subspace_jax.nested.layer import transform as transform
from subspace_jax.nested.layer import truncate as truncate
from subspace_jax.nested.training import MODEL as MODEL
from subspace_jax.nested.training import OBJECTIVE as OBJECTIVE
from subspace_jax.nested.training import Objective as Objective
from subspace_jax.nested.training import advance as advance
from subspace_jax.nested.training import at_traced_rank as at_traced_rank
from subspace_jax.nested.training import loss as loss
from subspace_jax.nested.training import objective as objective
from subspace_jax.nested.training import optimizer as optimizer
from subspace_jax.nested.training import recipe as recipe

__all__ = [
    "DENOMINATORS", "LayerCost", "MLP_PATTERN", "MODEL", "Nested", "NestedRule", "OBJECTIVE",
    "Objective", "advance", "at_traced_rank", "convert", "core", "factorize", "flop_fractions",
    "kernels", "layer_costs", "loss", "objective", "optimizer", "other_linear_macs",
    "rank_for_budget", "ranks", "recipe", "set_rank", "transform", "truncate",
]
