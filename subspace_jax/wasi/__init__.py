"""WASI: fine-tune inside a fixed weight subspace with Tucker-compressed activations.

Each selected Linear keeps its kernel as ``LowRank(a, b)`` at the smallest rank K reaching
an energy threshold (``b`` orthonormal: WASI's basis, refreshed every step by one
warm-started subspace-iteration step) and, for backward, keeps only a Tucker core and
per-mode factors of its input (refreshed every step by one warm-started step per mode) in a
``jax.custom_vjp``; the weight gradient is contracted from that compressed activation.
Inference stays factored. Array maths in :mod:`subspace_jax.wasi.core` (the op, refreshes),
:mod:`subspace_jax.wasi.tucker` (compression, gradient contractions, orthonormalisation)
and :mod:`subspace_jax.wasi.calibration` (rank table, knapsack); trees and NNX in
:mod:`subspace_jax.wasi.layers` (state, layer, tree functions, post-update, export) and
:mod:`subspace_jax.wasi.convert` (calibrate and convert a model).

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
from subspace_jax.wasi.convert import LayerPlan, convert, summary
from subspace_jax.wasi.core import tucker_weight_grad, wasi_matmul
from subspace_jax.wasi.layers import (ATTENTION_PATTERN, MLP_PATTERN, ActivationBasis,
                                      WasiKernel, WasiLinear, WeightBasis, export, factorize,
                                      orthonormalize, post_update)

__all__ = ["calibration", "core", "tucker", "EPS_GRID", "RankOption", "knapsack", "rank_options",
           "tucker_weight_grad", "wasi_matmul", "ATTENTION_PATTERN", "MLP_PATTERN",
           "ActivationBasis", "LayerPlan", "WasiKernel", "WasiLinear", "WeightBasis", "convert",
           "export", "factorize", "orthonormalize", "post_update", "summary"]
