"""LoRA-Pre: optax optimizers whose Adam and Muon moments are low-rank factors.

Momentum is the weight of a linear regressor trained online on the gradients; LoRA-Pre
keeps it as a product ``B @ A`` of rank ``r`` and advances both factors every step by a
closed-form damped-Newton step (``r x r`` solves, no SVD). :mod:`.core` holds the array
maths, :mod:`.transform` the ``scale_by_*`` transforms, :mod:`.alias` the optimizers
:func:`lorapre` and :func:`lorapre_muon` (AdamW for non-matrix leaves).

Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from subspace_jax.lorapre import lorapre
    >>> params = {"w": jnp.ones((64, 32)), "b": jnp.zeros(32)}
    >>> tx = lorapre(1e-3, rank=4)
    >>> low = moments(tx.init(params))  # {path: Moments}; AdamW's leaves are absent
    >>> low["w"].first.B.shape, low["w"].first.A.shape  # 2 r (p + q) numbers, not 2 p q
    ((64, 4), (4, 32))

References:
    Wang, Liang, He, Wang, Tan, "Taming Momentum: Rethinking Optimizer States Through
    Low-Rank Approximation", ICLR 2026, arXiv 2602.24283.
"""

from subspace_jax.lorapre import alias as alias
from subspace_jax.lorapre import core as core
from subspace_jax.lorapre import transform as transform
from subspace_jax.lorapre.alias import kernel_dimension_numbers as kernel_dimension_numbers
from subspace_jax.lorapre.alias import labels as labels
from subspace_jax.lorapre.alias import lorapre as lorapre
from subspace_jax.lorapre.alias import lorapre_muon as lorapre_muon
from subspace_jax.lorapre.alias import recipe as recipe
from subspace_jax.lorapre.core import Factors as Factors
from subspace_jax.lorapre.transform import DimensionNumbers as DimensionNumbers
from subspace_jax.lorapre.transform import LoRAPreMuonState as LoRAPreMuonState
from subspace_jax.lorapre.transform import CLOCKS as CLOCKS
from subspace_jax.lorapre.transform import LoRAPreState as LoRAPreState
from subspace_jax.lorapre.transform import Moments as Moments
from subspace_jax.lorapre.transform import moments as moments
from subspace_jax.lorapre.transform import scale_by_lorapre as scale_by_lorapre
from subspace_jax.lorapre.transform import scale_by_lorapre_muon as scale_by_lorapre_muon

__all__ = (
    "CLOCKS",
    "DimensionNumbers",
    "Factors",
    "LoRAPreMuonState",
    "LoRAPreState",
    "Moments",
    "alias",
    "core",
    "kernel_dimension_numbers",
    "labels",
    "recipe",
    "lorapre",
    "lorapre_muon",
    "moments",
    "scale_by_lorapre",
    "scale_by_lorapre_muon",
    "transform",
)
