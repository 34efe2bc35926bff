"""subspace_jax: keep transformers in low-dimensional subspaces, as pure JAX/Flax transforms.

The package is layered (see DESIGN.md): array maths (:mod:`subspace_jax.linalg`),
kernel forms (:mod:`subspace_jax.forms`), path rules and tree transforms
(:mod:`subspace_jax.rules`, :mod:`subspace_jax.transforms`), Flax NNX integration
(:mod:`subspace_jax.nn`), measurement (:mod:`subspace_jax.measure`), checkpoints
(:mod:`subspace_jax.checkpoint`), baselines (:mod:`subspace_jax.lora`), reference
models (:mod:`subspace_jax.models`) and offline data (:mod:`subspace_jax.data`).

Examples:
    >>> import jax, jax.numpy as jnp
    >>> import subspace_jax as sj
    >>> params = {"mlp": {"up": {"kernel": jax.random.normal(jax.random.key(0), (64, 256))}}}
    >>> low = sj.factorize(params, sj.LowRankRule(pattern=".*/kernel", rank=16))
    >>> low["mlp"]["up"]["kernel"].nbytes, sj.materialize(low)["mlp"]["up"]["kernel"].shape
    (20480, (64, 256))
"""

from subspace_jax import checkpoint as checkpoint
from subspace_jax import forms as forms
from subspace_jax import linalg as linalg
from subspace_jax import littlebit as littlebit
from subspace_jax import lora as lora
from subspace_jax import lorapre as lorapre
from subspace_jax import measure as measure
from subspace_jax import nested as nested
from subspace_jax import nn as nn
from subspace_jax import rules as rules
from subspace_jax import transforms as transforms
from subspace_jax import wasi as wasi
from subspace_jax.forms import KernelForm as KernelForm
from subspace_jax.forms import LowRank as LowRank
from subspace_jax.forms import matmul as matmul
from subspace_jax.lora import LoRA as LoRA
from subspace_jax.lora import LoRARule as LoRARule
from subspace_jax.lora import add_lora as add_lora
from subspace_jax.nn import Linear as Linear
from subspace_jax.nn import SubspaceState as SubspaceState
from subspace_jax.nn import adopt as adopt
from subspace_jax.rules import Rule as Rule
from subspace_jax.rules import Selection as Selection
from subspace_jax.rules import select as select
from subspace_jax.transforms import LowRankRule as LowRankRule
from subspace_jax.transforms import factorize as factorize
from subspace_jax.transforms import materialize as materialize

__version__ = "0.1.0"

__all__ = (
    "KernelForm",
    "LoRA",
    "LoRARule",
    "Linear",
    "LowRank",
    "LowRankRule",
    "Rule",
    "Selection",
    "SubspaceState",
    "add_lora",
    "adopt",
    "checkpoint",
    "factorize",
    "forms",
    "linalg",
    "littlebit",
    "lora",
    "lorapre",
    "materialize",
    "matmul",
    "measure",
    "nested",
    "nn",
    "rules",
    "select",
    "transforms",
    "wasi",
)
