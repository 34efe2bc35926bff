"""LittleBit-2: binary low-rank kernels with scales, Dual-SVID + Joint-ITQ, packed inference.

A Linear kernel ``(in, out)`` becomes ``sum_p diag(g_p) sign(V_p) diag(l_p) sign(U_p)^T
diag(h_p)`` over a primary and a residual path, at a rank chosen from a bits-per-weight
target. The workflow is three pure tree transforms and one report:

* :func:`compress` (training forms, :class:`BinaryLowRank`, ready for QAT),
* :func:`deploy` (packed signs and 16-bit scales, :class:`PackedBinaryLowRank`),
* :func:`accounting` (exact bits of every layer and of what stays uncompressed),
* :func:`distill_loss` (the QAT objective), and :func:`compress_model` for NNX models.

The array maths (rank rule, sign gradients, bit packing, Dual-SVID, Joint-ITQ) is in
:mod:`subspace_jax.littlebit.core`.

Examples:
    >>> import jax, jax.numpy as jnp
    >>> from subspace_jax import littlebit, rules
    >>> params = {"mlp": {"up": {"kernel": jax.random.normal(jax.random.key(0), (256, 512))},
    ...                   "bias": jnp.zeros(512)}}
    >>> packed = littlebit.deploy(littlebit.compress(params, rules.Rule(pattern=".*kernel"), bpw=0.55))
    >>> acc = littlebit.accounting(packed)
    >>> acc.layers[0].rank, round(acc.layers[0].bpw, 3), acc.by_kind()
    (24, 0.475, {'bias': 16384})

References:
    LittleBit, arXiv 2506.13771; LittleBit-2, arXiv 2603.00042.
"""

from subspace_jax.littlebit import core as core
from subspace_jax.littlebit import qat as qat
from subspace_jax.littlebit.distill import distill_loss as distill_loss
from subspace_jax.littlebit.form import BinaryLowRank as BinaryLowRank
from subspace_jax.littlebit.form import PackedBinaryLowRank as PackedBinaryLowRank
from subspace_jax.littlebit.form import contract_factories as contract_factories
from subspace_jax.littlebit.transform import Accounting as Accounting
from subspace_jax.littlebit.transform import LayerBits as LayerBits
from subspace_jax.littlebit.transform import LeafBits as LeafBits
from subspace_jax.littlebit.transform import accounting as accounting
from subspace_jax.littlebit.transform import compress as compress
from subspace_jax.littlebit.transform import compress_model as compress_model
from subspace_jax.littlebit.transform import deploy as deploy

__all__ = [
    "Accounting", "BinaryLowRank", "LayerBits", "LeafBits", "PackedBinaryLowRank", "accounting",
    "compress", "compress_model", "contract_factories", "core", "deploy", "distill_loss", "qat",
]
