"""LittleBit tree transforms: compress kernels, deploy (pack) them, and count every bit.

:func:`compress` replaces the kernels selected by path rules with
:class:`~subspace_jax.littlebit.BinaryLowRank` forms whose rank comes from a bits-per-weight
target; :func:`deploy` packs their signs (:class:`~subspace_jax.littlebit.PackedBinaryLowRank`);
:func:`accounting` reports the exact storage of each compressed layer and of everything left
uncompressed (embeddings, norms, biases, heads). All three are pure tree-to-tree functions on an
``nnx.State``, a pure dict or linen variables; :func:`compress_model` is the NNX convenience.

References:
    LittleBit, arXiv 2506.13771; LittleBit-2, arXiv 2603.00042.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from subspace_jax import forms, nn as sjnn
from subspace_jax import rules as rules_lib
from subspace_jax.littlebit import core
from subspace_jax.littlebit.form import BinaryLowRank, PackedBinaryLowRank

__all__ = ["compress", "deploy", "accounting", "compress_model", "Accounting", "LayerBits", "LeafBits"]

_FORMS = (BinaryLowRank, PackedBinaryLowRank)


def compress(
    tree: Any,
    rules: rules_lib.Rule | Sequence[rules_lib.Rule],
    bpw: float,
    *,
    residual: bool = True,
    itq: bool = True,
    itq_iters: int = 50,
    key: jax.Array | None = None,
    strict: bool = True,
    grad: str = "smooth",
    allow_unused: bool = False,
) -> Any:
    """Replace the selected ``(in, out)`` kernels with LittleBit training forms.

    Each kernel gets the rank :func:`~subspace_jax.littlebit.core.rank_for_bpw` gives for
    ``bpw`` (rounded down to a multiple of 8, at least 8) and is initialised by Dual-SVID, then
    Joint-ITQ, with the residual path fitted to what the binarised primary path leaves.

    Args:
        tree: an ``nnx.State``, a nested dict or linen variables.
        rules: plain :class:`~subspace_jax.rules.Rule` objects (skip rules allowed); first
            match wins.
        bpw: target bits per weight of each selected kernel.
        residual: two paths per kernel (primary + residual).
        itq: rotate by Joint-ITQ (LittleBit-2); False is LittleBit's Dual-SVID.
        itq_iters: Joint-ITQ alternations.
        key: PRNG key for ITQ's random starts; kernel ``i`` uses ``fold_in(key, i)``.
        strict: raise when rank 8 does not fit in ``bpw``; False uses rank 8 anyway.
        grad: surrogate gradient of the signs, ``"smooth"`` or ``"clipped"``.
        allow_unused: do not raise for rules that match nothing.

    Returns:
        The tree with :class:`BinaryLowRank` leaves where rules matched.

    Raises:
        ValueError: a non-2-D kernel, NaN/Inf weights, or a ``bpw`` that does not fit
            (messages name the path and shape).
        TypeError: a selected leaf is already a kernel form.

    Examples:
        >>> import jax
        >>> from subspace_jax import littlebit, rules
        >>> params = {"up": {"kernel": jax.random.normal(jax.random.key(0), (128, 256))}}
        >>> out = littlebit.compress(params, rules.Rule(pattern=".*kernel"), bpw=1.0)
        >>> k = out["up"]["kernel"]
        >>> type(k).__name__, k.rank, k.paths
        ('BinaryLowRank', 24, 2)
        >>> littlebit.compress(params, rules.Rule(pattern=".*kernel"), bpw=0.1)
        Traceback (most recent call last):
        ...
        ValueError: at 'up/kernel' (shape (128, 256)): bpw=0.1 is too low ...
    """
    key = jax.random.key(0) if key is None else key
    counter = itertools.count()

    def one(path: str, kernel: Any, rule: rules_lib.Rule) -> BinaryLowRank:
        if forms.is_form(kernel):
            raise TypeError(f"kernel is already a {type(kernel).__name__}; compress dense kernels")
        if getattr(kernel, "ndim", None) != 2:
            raise ValueError(f"expected a 2-D (in, out) kernel, got shape {tuple(np.shape(kernel))}")
        rank = core.rank_for_bpw(*kernel.shape, bpw, residual=residual, strict=strict)
        return BinaryLowRank.from_dense(
            kernel, rank=rank, residual=residual, itq_iters=itq_iters if itq else 0,
            key=jax.random.fold_in(key, next(counter)), grad=grad)

    return rules_lib.apply(tree, rules, one, allow_unused=allow_unused)


def deploy(tree: Any, *, word: Any = np.uint8, scale_dtype: Any = np.float16) -> Any:
    """Pack every :class:`BinaryLowRank` in ``tree`` (see :meth:`BinaryLowRank.deploy`).

    Args:
        tree: a tree with training forms (``nnx.State``, dict, linen variables).
        word: ``uint8`` or ``uint32`` packing words.
        scale_dtype: ``float16`` or ``bfloat16`` for ``h``, ``g`` and the fused ``l``.

    Returns:
        The tree with :class:`PackedBinaryLowRank` leaves; everything else is untouched.

    Raises:
        ValueError: the tree is already deployed (a packed form is found; the message names
            its path), or it holds no LittleBit form at all.

    Examples:
        >>> import jax
        >>> from subspace_jax import littlebit, rules
        >>> params = {"up": {"kernel": jax.random.normal(jax.random.key(0), (128, 256))}}
        >>> packed = littlebit.deploy(littlebit.compress(params, rules.Rule(pattern=".*"), bpw=1.0))
        >>> type(packed["up"]["kernel"]).__name__
        'PackedBinaryLowRank'
        >>> littlebit.deploy(packed)
        Traceback (most recent call last):
        ...
        ValueError: 'up/kernel' is already deployed (a PackedBinaryLowRank); deploy a tree ...
    """
    found = []

    def one(path: str, leaf: Any) -> Any:
        if isinstance(leaf, PackedBinaryLowRank):
            raise ValueError(f"{path!r} is already deployed (a PackedBinaryLowRank); "
                             "deploy a tree of BinaryLowRank forms")
        if not isinstance(leaf, BinaryLowRank):
            return leaf
        found.append(path)
        try:
            return leaf.deploy(word=word, scale_dtype=scale_dtype)
        except (ValueError, TypeError) as e:
            raise type(e)(f"at {path!r} (shape {leaf.shape}): {e}") from e

    out = rules_lib.map_with_path(one, tree)
    if not found:
        raise ValueError("deploy: the tree holds no BinaryLowRank form (run compress first)")
    return out


@dataclasses.dataclass(frozen=True)
class LayerBits:
    """Storage of one compressed kernel, in bits.

    Attributes:
        path: ``/``-joined path of the kernel.
        shape: ``(in, out)``.
        rank: rank per path.
        paths: 1, or 2 with the residual path.
        word: packing word size in bits (8 or 32).
        formula: the papers' count (signs + one 16-bit ``h``, ``g``, ``l`` per path).
        padding: bits added by packing to whole words.
        bits: stored bits when deployed: ``formula + padding``.
        bpw: ``bits / (in * out)``.
    """

    path: str
    shape: tuple[int, int]
    rank: int
    paths: int
    word: int
    formula: int
    padding: int
    bits: int
    bpw: float


@dataclasses.dataclass(frozen=True)
class LeafBits:
    """An uncompressed array leaf: ``kind`` is embedding, norm, head, bias, kernel or other.

    Attributes:
        path: ``/``-joined path.
        shape: the array's shape.
        dtype: its dtype name.
        kind: what it is, guessed from the path.
        bits: ``8 * nbytes``.
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    kind: str
    bits: int


_KINDS = (("embedding", r"embed"), ("norm", r"norm|(^|/)ln"), ("head", r"head|pooler|classifier"),
          ("bias", r"bias$"), ("kernel", r"kernel$"))


def _kind(path: str) -> str:
    return next((k for k, pat in _KINDS if re.search(pat, path.lower())), "other")


@dataclasses.dataclass(frozen=True)
class Accounting:
    """Exact storage of a LittleBit tree: compressed kernels and every uncompressed leaf.

    Attributes:
        layers: one :class:`LayerBits` per compressed kernel.
        others: one :class:`LeafBits` per uncompressed array (not compressed: embeddings,
            norms, biases, heads and any kernel no rule selected).
    """

    layers: tuple[LayerBits, ...]
    others: tuple[LeafBits, ...]

    @property
    def linear_bits(self) -> int:
        """Stored bits of the compressed kernels."""
        return sum(lay.bits for lay in self.layers)

    @property
    def linear_weights(self) -> int:
        """Weights the compressed kernels stand for."""
        return sum(lay.shape[0] * lay.shape[1] for lay in self.layers)

    @property
    def linear_bpw(self) -> float:
        """Bits per weight over the compressed kernels."""
        return self.linear_bits / max(self.linear_weights, 1)

    @property
    def total_bits(self) -> int:
        """Everything stored: compressed kernels plus uncompressed leaves."""
        return self.linear_bits + sum(o.bits for o in self.others)

    @property
    def total_weights(self) -> int:
        """Parameters of the original model (compressed kernels counted densely)."""
        return self.linear_weights + sum(int(np.prod(o.shape)) for o in self.others)

    @property
    def model_bpw(self) -> float:
        """Bits per parameter of the whole tree, uncompressed leaves included."""
        return self.total_bits / max(self.total_weights, 1)

    def by_kind(self) -> dict[str, int]:
        """Bits of uncompressed leaves grouped by kind (embedding, norm, head, bias, ...)."""
        out: dict[str, int] = {}
        for o in self.others:
            out[o.kind] = out.get(o.kind, 0) + o.bits
        return out

    def table(self) -> str:
        """A text table: one row per compressed kernel, then the totals and what is not compressed.

        Examples:
            >>> import jax
            >>> from subspace_jax import littlebit, rules
            >>> params = {"up": {"kernel": jax.random.normal(jax.random.key(0), (128, 256))}}
            >>> small = littlebit.compress(params, rules.Rule(pattern=".*"), bpw=1.0)
            >>> acc = littlebit.accounting(small)
            >>> print(acc.table().splitlines()[2])
            up/kernel  (128, 256)    24      2     8    31488        0  31488  0.9609
        """
        head = ("path", "shape", "rank", "paths", "word", "formula", "padding", "bits", "bpw")
        rows = [(lay.path, str(lay.shape), str(lay.rank), str(lay.paths), str(lay.word),
                 str(lay.formula), str(lay.padding), str(lay.bits), f"{lay.bpw:.4f}")
                for lay in self.layers]
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
        just = [str.ljust, str.ljust] + [str.rjust] * 7
        lines = ["  ".join(j(c, w) for j, c, w in zip(just, r, widths)).rstrip() for r in [head] + rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        kinds = ", ".join(f"{k} {b / 8:,.0f} B" for k, b in sorted(self.by_kind().items()))
        lines += [
            f"compressed kernels: {self.linear_bits / 8:,.0f} B for {self.linear_weights:,} "
            f"weights = {self.linear_bpw:.4f} bpw",
            f"not compressed: {kinds or 'nothing'}",
            f"whole tree: {self.total_bits / 8:,.0f} B for {self.total_weights:,} parameters "
            f"= {self.model_bpw:.4f} bpw",
        ]
        return "\n".join(lines)

    __str__ = table


def _layer_bits(path: str, form: Any, word: Any) -> LayerBits:
    fan_in, fan_out = form.shape
    residual = form.paths == 2
    if isinstance(form, PackedBinaryLowRank):
        word = form.v_bits.dtype
    formula = core.formula_bits(fan_in, fan_out, form.rank, residual=residual)
    padding = core.padded_bits(fan_in, fan_out, form.rank, word, residual=residual)
    bits = formula + padding
    if form.paths not in (1, 2) or (isinstance(form, PackedBinaryLowRank) and form.bits != bits):
        raise ValueError(f"{path!r}: stored bits {form.bits} differ from the count {bits}")
    return LayerBits(path, (fan_in, fan_out), form.rank, form.paths, 8 * np.dtype(word).itemsize,
                     formula, padding, bits, bits / (fan_in * fan_out))


def accounting(tree: Any, *, word: Any = np.uint8) -> Accounting:
    """Exact bits of every compressed kernel and of every uncompressed leaf of ``tree``.

    A deployed kernel counts its stored bits (checked against formula + padding); a training
    kernel counts what :func:`deploy` with ``word`` will store. Uncompressed leaves count
    ``8 * nbytes`` at their current dtype.

    Args:
        tree: a tree with LittleBit forms (training or deployed).
        word: the packing word assumed for training forms.

    Returns:
        An :class:`Accounting`; ``print`` it for the table.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import littlebit, rules
        >>> params = {"up": {"kernel": jax.random.normal(jax.random.key(0), (256, 256))},
        ...           "norm": {"scale": jnp.ones(256)}}
        >>> acc = littlebit.accounting(littlebit.compress(params, rules.Rule(pattern="up/.*"), bpw=0.8))
        >>> acc.layers[0].rank, round(acc.linear_bpw, 4), acc.by_kind()
        (32, 0.7656, {'norm': 8192})
    """
    layers, others = [], []
    for path, leaf in rules_lib.leaf_paths(tree)[0]:
        value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
        if isinstance(value, _FORMS):
            layers.append(_layer_bits(path, value, word))
        elif forms.is_form(value):
            others.append(LeafBits(path, value.shape, str(value.dtype), "form", value.bits))
        elif hasattr(value, "shape") and hasattr(value, "dtype"):
            shape = tuple(int(d) for d in value.shape)
            others.append(LeafBits(path, shape, str(value.dtype), _kind(path), 8 * forms.nbytes(value)))
    return Accounting(tuple(layers), tuple(others))


def compress_model(
    model: nnx.Module,
    rules: rules_lib.Rule | Sequence[rules_lib.Rule],
    bpw: float,
    *,
    deployed: bool = False,
    **kwargs: Any,
) -> nnx.Module:
    """A copy of an NNX model whose selected Linear kernels are LittleBit forms.

    ``nnx.Linear`` modules are first swapped for :class:`subspace_jax.nn.Linear`
    (:func:`subspace_jax.nn.adopt`); the model's state is then compressed with
    :func:`compress` (and packed with :func:`deploy` when ``deployed``).

    Args:
        model: any Flax NNX module.
        rules: rules on the paths of ``nnx.state(model)`` (e.g. ``r".*mlp/(up|down)/kernel"``).
        bpw: target bits per weight.
        deployed: return the packed model (inference only).
        **kwargs: passed to :func:`compress`.

    Returns:
        The new model; the input is not modified.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from subspace_jax import littlebit, rules
        >>> mlp = nnx.Sequential(nnx.Linear(256, 256, rngs=nnx.Rngs(0)),
        ...                      nnx.Linear(256, 4, rngs=nnx.Rngs(1)))
        >>> rule = rules.Rule(pattern="layers/0/kernel")
        >>> small = littlebit.compress_model(mlp, rule, 1.0, deployed=True)
        >>> type(small.layers[0].kernel.get_value()).__name__, small(jnp.ones((2, 256))).shape
        ('PackedBinaryLowRank', (2, 4))
    """
    graphdef, state = nnx.split(sjnn.adopt(model))
    state = compress(state, rules, bpw, **kwargs)
    if deployed:
        state = deploy(state)
    return nnx.merge(graphdef, state)
