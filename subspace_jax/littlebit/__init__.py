"""LittleBit-2: binary low-rank kernels with scales, Dual-SVID + Joint-ITQ, packed inference.

A kernel ``(in, out)`` becomes ``sum_p diag(g_p) sign(V_p) diag(l_p) sign(U_p)^T diag(h_p)``
over a primary and a residual path, at a rank chosen from a bits-per-weight target; an N-D
kernel (``DenseGeneral``/``LinearGeneral``/``Einsum``, attention q/k/v/o) is folded into its
``(in, out)`` matrix first. The settings live on :class:`LittleBitRule` (bpw, residual,
Joint-ITQ iterations, strictness, sign gradient, ``in_axes``), and the verbs have the
library's one shape:

* :func:`transform` (pure, tree to tree: training forms, :class:`BinaryLowRank`, ready for
  QAT) and :func:`convert` (the NNX convenience),
* :func:`deploy` (packed signs and 16-bit scales, :class:`PackedBinaryLowRank`),
* :func:`accounting` (exact bits of every layer and of what stays uncompressed),
* :func:`distill_loss` and :mod:`~subspace_jax.littlebit.qat` (the QAT objective and step).

Converted trees run in the model's own code: under :func:`subspace_jax.nn.intercept` for
linen, Hugging Face and plain NNX layers, or after :func:`subspace_jax.nn.adopt`.
:func:`compress` and :func:`compress_model` are the previous names, kept for one release.
The array maths (rank rule, sign gradients, bit packing, Dual-SVID, Joint-ITQ) is in
:mod:`subspace_jax.littlebit.core`.

Examples:
    >>> import jax, jax.numpy as jnp
    >>> from subspace_jax import littlebit
    >>> params = {"mlp": {"up": {"kernel": jax.random.normal(jax.random.key(0), (256, 512))},
    ...                   "bias": jnp.zeros(512)}}
    >>> rule = littlebit.LittleBitRule(pattern=".*kernel", bpw=0.55)
    >>> packed = littlebit.deploy(littlebit.transform(params, rule))
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
from subspace_jax.littlebit.transform import Accounting as Accounting
from subspace_jax.littlebit.transform import LayerBits as LayerBits
from subspace_jax.littlebit.transform import LeafBits as LeafBits
from subspace_jax.littlebit.transform import LittleBitRule as LittleBitRule
from subspace_jax.littlebit.transform import accounting as accounting
from subspace_jax.littlebit.transform import compress as compress
from subspace_jax.littlebit.transform import compress_model as compress_model
from subspace_jax.littlebit.transform import convert as convert
from subspace_jax.littlebit.transform import deploy as deploy
from subspace_jax.littlebit.transform import recipe as recipe
from subspace_jax.littlebit.transform import transform as transform

__all__ = [
    "Accounting", "BinaryLowRank", "LayerBits", "LeafBits", "LittleBitRule",
    "PackedBinaryLowRank", "accounting", "compress", "compress_model", "convert", "core",
    "deploy", "distill_loss", "qat", "recipe", "transform",
]
