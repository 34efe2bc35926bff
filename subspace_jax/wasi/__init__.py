"""WASI: fine-tune inside a fixed weight subspace with Tucker-compressed activations.

Each selected kernel becomes a :class:`WasiKernel` form: ``a @ b`` at the smallest rank K
reaching an energy threshold (``b`` orthonormal: WASI's basis, re-orthonormalised after
every step), plus the Tucker factors of its layer's input (the activation basis, refreshed
by one warm-started step per mode in every training forward). Its ``matmul`` is a
``jax.custom_vjp`` that keeps only the Tucker core and factors for backward; inference stays
factored. The form runs in any Flax model through the library's one call path, so one API
serves linen, NNX and Hugging Face models:

* :func:`transform` (pure, tree to tree; settings on :class:`WasiRule`), :func:`convert`
  (the NNX convenience), :func:`post_update` (the train step's hook), :func:`export`
  (plain ``LowRank`` inference tree), :func:`plans` / :func:`summary` (the rank table).

Array maths in :mod:`subspace_jax.wasi.core` (the op, refreshes),
:mod:`subspace_jax.wasi.tucker` (compression, gradient contractions, orthonormalisation)
and :mod:`subspace_jax.wasi.calibration` (rank table, knapsack); the form in
:mod:`subspace_jax.wasi.form`; trees in :mod:`subspace_jax.wasi.tree` and
:mod:`subspace_jax.wasi.convert`.

Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from subspace_jax import wasi
    >>> model = nnx.Dict(mlp=nnx.Dict(up=nnx.Linear(16, 8, rngs=nnx.Rngs(0))))
    >>> x = jax.random.normal(jax.random.key(0), (4, 5, 16))
    >>> model = wasi.convert(model, sample=lambda m: m["mlp"]["up"](x), verbose=False)
    >>> model["mlp"]["up"](x).shape
    (4, 5, 8)

References:
    Nguyen, Tartaglione, Nguyen, "Efficient Resource-Constrained Training of Transformers via
    Subspace Optimization", ICLR 2026, arXiv 2510.09160.
"""

from subspace_jax.wasi import calibration as calibration
from subspace_jax.wasi import core as core
from subspace_jax.wasi import tucker as tucker
from subspace_jax.wasi.calibration import EPS_GRID, RankOption, knapsack, rank_options
from subspace_jax.wasi.convert import (ATTENTION_PATTERN, MLP_PATTERN, WasiRule, convert,
                                       recipe, transform)
from subspace_jax.wasi.core import tucker_weight_grad, wasi_matmul
from subspace_jax.wasi.form import VARIANTS, WasiKernel, WasiMasterKernel
from subspace_jax.wasi.tree import (LayerPlan, export, factorize, orthonormalize, plans,
                                    post_update, summary)

__all__ = ["calibration", "core", "tucker", "EPS_GRID", "RankOption", "knapsack", "rank_options",
           "tucker_weight_grad", "wasi_matmul", "ATTENTION_PATTERN", "MLP_PATTERN", "VARIANTS",
           "WasiRule", "WasiKernel", "WasiMasterKernel", "LayerPlan", "transform", "convert",
           "post_update", "export", "plans", "summary", "orthonormalize", "factorize", "recipe"]
