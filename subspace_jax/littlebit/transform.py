"""LittleBit tree transforms: compress kernels, deploy (pack) them, and count every bit.

The verbs have the library's one shape: settings live on :class:`LittleBitRule` objects
(bits per weight, residual path, Joint-ITQ iterations, strictness, sign gradient,
``in_axes`` for N-D kernels), and

* :func:`transform` replaces the kernels those rules select with
  :class:`~subspace_jax.littlebit.BinaryLowRank` training forms whose rank comes from the
  bits-per-weight target (pure, tree to tree);
* :func:`deploy` packs their signs (:class:`~subspace_jax.littlebit.PackedBinaryLowRank`);
* :func:`accounting` reports the exact storage of each compressed layer and of everything
  left uncompressed (embeddings, norms, biases, heads);
* :func:`convert` is the NNX convenience (adopt, split, transform, merge).

The tree functions take an ``nnx.State``, a pure dict or linen variables and return the same
kind; N-D kernels (``DenseGeneral``/``LinearGeneral``/``Einsum``, attention q/k/v/o) are
folded into their ``(in, out)`` matrix, which is what the rank rule and the bit counts use.
Converted trees run inside the model's own code under :func:`subspace_jax.nn.intercept`
(linen, Hugging Face, plain NNX layers) or after :func:`subspace_jax.nn.adopt`.
:func:`compress` and :func:`compress_model` are the previous names (keyword settings), kept
for one release.

References:
    LittleBit, arXiv 2506.13771; LittleBit-2, arXiv 2603.00042.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from subspace_jax import forms, nn as sjnn
from subspace_jax import rules as rules_lib
from subspace_jax.littlebit import core
from subspace_jax.littlebit.form import _SIGNS, BinaryLowRank, PackedBinaryLowRank

__all__ = ["LittleBitRule", "transform", "convert", "deploy", "accounting", "compress",
           "compress_model", "Accounting", "LayerBits", "LeafBits", "recipe"]

_FORMS = (BinaryLowRank, PackedBinaryLowRank)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LittleBitRule(rules_lib.Rule):
    """Compress the matched kernels into LittleBit-2 binary low-rank forms.

    Each matched kernel (folded to its ``(in, out)`` matrix when N-D) gets the rank
    :func:`~subspace_jax.littlebit.core.rank_for_bpw` gives for ``bpw`` (rounded down to a
    multiple of 8, at least 8) and is initialised by Dual-SVID, then Joint-ITQ, with the
    residual path fitted to what the binarised primary path leaves.

    Attributes:
        bpw: target bits per weight of each matched kernel (> 0).
        residual: two paths per kernel (primary + residual).
        itq_iters: Joint-ITQ alternations (LittleBit-2); 0 is LittleBit's plain Dual-SVID.
        strict: raise when rank 8 does not fit in ``bpw``; False uses rank 8 anyway (the
            official code's floor; the layer then stores more than ``bpw``).
        grad: surrogate gradient of the signs, ``"smooth"`` (SmoothSign) or ``"clipped"``
            (straight-through).

    Examples:
        >>> from subspace_jax import littlebit
        >>> littlebit.LittleBitRule(pattern=".*mlp/.*kernel", bpw=0.55).describe()
        "LittleBitRule(bpw=0.55, residual=True, itq_iters=50, strict=True, grad='smooth')"
        >>> littlebit.LittleBitRule(pattern=".*", bpw=0)
        Traceback (most recent call last):
        ...
        ValueError: LittleBitRule('.*').bpw must be a finite number > 0, got 0
    """

    # --- behaviour ---
    # Target bits per weight of every matched kernel.
    bpw: float
    # Primary + residual path (two paths of the same rank).
    residual: bool = True
    # Joint-ITQ alternations; 0 = plain Dual-SVID (LittleBit).
    itq_iters: int = 50
    # Raise when rank 8 does not fit in bpw (else use rank 8 anyway).
    strict: bool = True
    # Surrogate gradient of the signs.
    grad: str = "smooth"

    def __post_init__(self):
        super().__post_init__()
        where = f"LittleBitRule({self.pattern!r})"
        bpw = self.bpw
        if isinstance(bpw, bool) or not isinstance(bpw, (int, float)) or not math.isfinite(bpw) \
                or bpw <= 0:
            raise ValueError(f"{where}.bpw must be a finite number > 0, got {bpw!r}")
        if isinstance(self.itq_iters, bool) or not isinstance(self.itq_iters, int) \
                or self.itq_iters < 0:
            raise ValueError(f"{where}.itq_iters must be an int >= 0, got {self.itq_iters!r}")
        if self.grad not in _SIGNS:
            raise ValueError(f"{where}.grad must be one of {sorted(_SIGNS)}, got {self.grad!r}")


def _rules(rules: rules_lib.Rule | Sequence[rules_lib.Rule]) -> tuple[rules_lib.Rule, ...]:
    rules = (rules,) if isinstance(rules, rules_lib.Rule) else tuple(rules)
    for i, rule in enumerate(rules):
        if isinstance(rule, rules_lib.Rule) and not rule.skip \
                and not isinstance(rule, LittleBitRule):
            raise TypeError(
                f"rule #{i} {rule!r} is a {type(rule).__name__}: littlebit.transform needs "
                "LittleBitRule rules (settings such as bpw live on the rule), or plain Rule "
                "objects with skip=True")
    return rules


def transform(
    tree: Any,
    rules: LittleBitRule | Sequence[rules_lib.Rule],
    *,
    key: jax.Array | None = None,
    allow_unused: bool = False,
) -> Any:
    """Replace the kernels selected by ``rules`` with LittleBit training forms (pure).

    Args:
        tree: an ``nnx.State``, a nested dict or linen variables (not modified).
        rules: :class:`LittleBitRule` objects, and plain :class:`~subspace_jax.rules.Rule`
            skip rules; ordered, first match wins. There is no default: LittleBit has no
            default bits-per-weight (``LittleBitRule(pattern=rules.MLP_PATTERN, bpw=...)``
            selects every MLP kernel).
        key: PRNG key of ITQ's random starts; the ``i``-th selected kernel (in tree order)
            uses ``fold_in(key, i)`` (default ``jax.random.key(0)``).
        allow_unused: do not raise for rules that match nothing.

    Returns:
        A tree of the same kind with :class:`BinaryLowRank` leaves where rules matched (an
        N-D kernel's form records its :class:`~subspace_jax.forms.Fold`); unselected leaves
        are the input's own arrays.

    Raises:
        ValueError: a kernel that is not 2-D and has no ``in_axes`` (on the rule or recorded
            by :func:`subspace_jax.nn.adopt`), NaN/Inf weights, or a ``bpw`` that does not
            fit (messages name the path and shape).
        TypeError: a selected leaf is already a kernel form, or a non-skip rule is not a
            :class:`LittleBitRule`.

    Examples:
        >>> import jax
        >>> from subspace_jax import littlebit
        >>> params = {"mlp": {"up": {"kernel": jax.random.normal(jax.random.key(0), (128, 256))}}}
        >>> out = littlebit.transform(params, littlebit.LittleBitRule(pattern=".*kernel", bpw=1.0))
        >>> k = out["mlp"]["up"]["kernel"]
        >>> type(k).__name__, k.rank, k.paths
        ('BinaryLowRank', 24, 2)
        >>> littlebit.transform(params, littlebit.LittleBitRule(pattern=".*kernel", bpw=0.1))
        Traceback (most recent call last):
        ...
        ValueError: at 'mlp/up/kernel' (shape (128, 256)): bpw=0.1 is too low ...

        An N-D kernel (here an ``Einsum`` weight ``(heads, d, head_dim)``) is folded:

        >>> w = {"q": {"kernel": jax.random.normal(jax.random.key(1), (4, 64, 32))}}
        >>> rule = littlebit.LittleBitRule(pattern=".*", bpw=1.5, in_axes=(1,), itq_iters=5)
        >>> q = littlebit.transform(w, rule)["q"]["kernel"]
        >>> q.shape, q.matrix_shape, q.rank
        ((4, 64, 32), (64, 128), 8)
    """
    rules = _rules(rules)
    key = jax.random.key(0) if key is None else key
    counter = itertools.count()

    def one(path: str, kernel: Any, rule: rules_lib.Rule) -> BinaryLowRank:
        if forms.is_form(kernel):
            raise TypeError(f"kernel is already a {type(kernel).__name__}; transform dense kernels")
        if getattr(kernel, "ndim", 0) < 2:
            raise ValueError(f"expected a 2-D (in, out) or an N-D kernel, got shape "
                             f"{tuple(np.shape(kernel))}")
        matrix, fold = forms.fold_kernel(kernel, rule.in_axes)
        try:
            rank = core.rank_for_bpw(*matrix.shape, rule.bpw, residual=rule.residual,
                                     strict=rule.strict)
        except ValueError as e:
            if fold is None:
                raise
            raise ValueError(f"{e} (the {fold.shape} kernel folded with in_axes="
                             f"{fold.in_axes})") from None
        return BinaryLowRank.from_dense(
            kernel, rank=rank, residual=rule.residual, itq_iters=rule.itq_iters,
            key=jax.random.fold_in(key, next(counter)), grad=rule.grad, in_axes=rule.in_axes)

    return rules_lib.apply(tree, rules, one, allow_unused=allow_unused)


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
    """Deprecated name of :func:`transform` with keyword settings (kept for one release).

    Every plain non-skip :class:`~subspace_jax.rules.Rule` becomes a :class:`LittleBitRule`
    with these settings (``itq=False`` is ``itq_iters=0``); :class:`LittleBitRule` objects
    keep their own. The result is exactly :func:`transform`'s.

    Examples:
        >>> import jax
        >>> from subspace_jax import littlebit, rules
        >>> params = {"up": {"kernel": jax.random.normal(jax.random.key(0), (128, 256))}}
        >>> old = littlebit.compress(params, rules.Rule(pattern=".*kernel"), bpw=1.0)
        >>> new = littlebit.transform(params, littlebit.LittleBitRule(pattern=".*kernel", bpw=1.0))
        >>> bool((old["up"]["kernel"].u == new["up"]["kernel"].u).all())
        True
    """
    settings = dict(bpw=bpw, residual=residual, itq_iters=itq_iters if itq else 0,
                    strict=strict, grad=grad)
    rules = (rules,) if isinstance(rules, rules_lib.Rule) else tuple(rules)
    rules = tuple(
        LittleBitRule(pattern=r.pattern, optional=r.optional, in_axes=r.in_axes, **settings)
        if type(r) is rules_lib.Rule and not r.skip else r for r in rules)
    return transform(tree, rules, key=key, allow_unused=allow_unused)


def deploy(tree: Any, *, word: Any = np.uint8, scale_dtype: Any = np.float16) -> Any:
    """Pack every :class:`BinaryLowRank` in ``tree`` (see :meth:`BinaryLowRank.deploy`).

    Args:
        tree: a tree with training forms (``nnx.State``, dict, linen variables).
        word: ``uint8`` or ``uint32`` packing words.
        scale_dtype: ``float16`` or ``bfloat16`` for ``h``, ``g`` and the fused ``l``.

    Returns:
        The tree with :class:`PackedBinaryLowRank` leaves (an N-D kernel's form keeps its
        fold); everything else is untouched.

    Raises:
        ValueError: the tree is already deployed (a packed form is found; the message names
            its path), or it holds no LittleBit form at all.

    Examples:
        >>> import jax
        >>> from subspace_jax import littlebit
        >>> params = {"up": {"kernel": jax.random.normal(jax.random.key(0), (128, 256))}}
        >>> small = littlebit.transform(params, littlebit.LittleBitRule(pattern=".*", bpw=1.0))
        >>> packed = littlebit.deploy(small)
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
        raise ValueError("deploy: the tree holds no BinaryLowRank form "
                         "(run littlebit.transform first)")
    return out


@dataclasses.dataclass(frozen=True)
class LayerBits:
    """Storage of one compressed kernel, in bits.

    Attributes:
        path: ``/``-joined path of the kernel.
        shape: ``(in, out)`` of the matrix the form factors (an N-D kernel folded).
        rank: rank per path.
        paths: 1, or 2 with the residual path.
        word: packing word size in bits (8 or 32).
        formula: the papers' count (signs + one 16-bit ``h``, ``g``, ``l`` per path).
        padding: bits added by packing to whole words.
        bits: stored bits when deployed: ``formula + padding``.
        bpw: ``bits / (in * out)``.
        kernel_shape: the kernel's own (N-D) shape; ``shape`` for a 2-D kernel.
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
    kernel_shape: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.kernel_shape is None:
            object.__setattr__(self, "kernel_shape", tuple(self.shape))


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
            >>> from subspace_jax import littlebit
            >>> params = {"up": {"kernel": jax.random.normal(jax.random.key(0), (128, 256))}}
            >>> small = littlebit.transform(params, littlebit.LittleBitRule(pattern=".*", bpw=1.0))
            >>> acc = littlebit.accounting(small)
            >>> print(acc.table().splitlines()[2])
            up/kernel  (128, 256)    24      2     8    31488        0  31488  0.9609
        """
        head = ("path", "shape", "rank", "paths", "word", "formula", "padding", "bits", "bpw")
        rows = [(lay.path, _shape_str(lay), str(lay.rank), str(lay.paths), str(lay.word),
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


def _shape_str(lay: LayerBits) -> str:
    if tuple(lay.kernel_shape) == tuple(lay.shape):
        return str(lay.shape)
    return f"{lay.kernel_shape}->{lay.shape}"


def _layer_bits(path: str, form: Any, word: Any) -> LayerBits:
    fan_in, fan_out = form.matrix_shape
    residual = form.paths == 2
    if isinstance(form, PackedBinaryLowRank):
        word = form.v_bits.dtype
    formula = core.formula_bits(fan_in, fan_out, form.rank, residual=residual)
    padding = core.padded_bits(fan_in, fan_out, form.rank, word, residual=residual)
    bits = formula + padding
    if form.paths not in (1, 2) or (isinstance(form, PackedBinaryLowRank) and form.bits != bits):
        raise ValueError(f"{path!r}: stored bits {form.bits} differ from the count {bits}")
    return LayerBits(path, (fan_in, fan_out), form.rank, form.paths, 8 * np.dtype(word).itemsize,
                     formula, padding, bits, bits / (fan_in * fan_out), tuple(form.shape))


def accounting(tree: Any, *, word: Any = np.uint8) -> Accounting:
    """Exact bits of every compressed kernel and of every uncompressed leaf of ``tree``.

    A deployed kernel counts its stored bits (checked against formula + padding); a training
    kernel counts what :func:`deploy` with ``word`` will store. Uncompressed leaves count
    ``8 * nbytes`` at their current dtype. An N-D kernel counts as its folded ``(in, out)``
    matrix (the same number of weights).

    Args:
        tree: a tree with LittleBit forms (training or deployed).
        word: the packing word assumed for training forms.

    Returns:
        An :class:`Accounting`; ``print`` it for the table.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import littlebit
        >>> params = {"up": {"kernel": jax.random.normal(jax.random.key(0), (256, 256))},
        ...           "norm": {"scale": jnp.ones(256)}}
        >>> rule = littlebit.LittleBitRule(pattern="up/.*", bpw=0.8)
        >>> acc = littlebit.accounting(littlebit.transform(params, rule))
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


def convert(
    model: nnx.Module,
    rules: LittleBitRule | Sequence[rules_lib.Rule],
    *,
    key: jax.Array | None = None,
    deployed: bool = False,
    allow_unused: bool = False,
) -> nnx.Module:
    """A new NNX model whose selected kernels are LittleBit forms (the NNX convenience).

    :func:`subspace_jax.nn.adopt` (a copy whose ``nnx.Linear``/``LinearGeneral``/``Einsum``
    layers accept forms and record their kernels' ``in_axes``), then ``nnx.split``,
    :func:`transform` (and :func:`deploy` when ``deployed``) and ``nnx.merge``. The new model
    shares no array with ``model``, which is not modified (also after a train step donates
    the new model's buffers); nothing is attached to either.

    Args:
        model: any Flax NNX module with Linear, LinearGeneral or Einsum layers.
        rules: as for :func:`transform`, on the paths of ``nnx.state(model)``.
        key: as for :func:`transform`.
        deployed: return the packed model (inference only).
        allow_unused: do not raise for rules that match nothing.

    Returns:
        The new model.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from subspace_jax import littlebit
        >>> mlp = nnx.Sequential(nnx.Linear(256, 256, rngs=nnx.Rngs(0)),
        ...                      nnx.Linear(256, 4, rngs=nnx.Rngs(1)))
        >>> rule = littlebit.LittleBitRule(pattern="layers/0/kernel", bpw=1.0)
        >>> small = littlebit.convert(mlp, rule, deployed=True)
        >>> type(small.layers[0].kernel.get_value()).__name__, small(jnp.ones((2, 256))).shape
        ('PackedBinaryLowRank', (2, 4))
        >>> small.layers[1].kernel.get_value() is mlp.layers[1].kernel.get_value()
        False
    """
    graphdef, state = nnx.split(sjnn.adopt(model))
    state = transform(state, rules, key=key, allow_unused=allow_unused)
    if deployed:
        state = deploy(state)
    return nnx.merge(graphdef, state)


def compress_model(
    model: nnx.Module,
    rules: rules_lib.Rule | Sequence[rules_lib.Rule],
    bpw: float,
    *,
    deployed: bool = False,
    **kwargs: Any,
) -> nnx.Module:
    """Deprecated name of :func:`convert` with keyword settings (kept for one release).

    Plain rules get the settings as in :func:`compress` (``**kwargs`` are its keywords).

    Examples:
        >>> from flax import nnx
        >>> from subspace_jax import littlebit, rules
        >>> layer = nnx.Linear(256, 256, rngs=nnx.Rngs(0))
        >>> small = littlebit.compress_model(layer, rules.Rule(pattern="kernel"), 1.0)
        >>> type(small.kernel.get_value()).__name__
        'BinaryLowRank'
    """
    graphdef, state = nnx.split(sjnn.adopt(model))
    state = compress(state, rules, bpw, **kwargs)
    if deployed:
        state = deploy(state)
    return nnx.merge(graphdef, state)


def recipe(rules: LittleBitRule | Sequence[rules_lib.Rule], *, train_also: Sequence[rules_lib.Rule] = (),
           ) -> Any:
    """LittleBit-2 QAT as a :class:`~subspace_jax.train.Recipe`: the selected kernels
    become binary low-rank forms (:func:`convert`, Joint-ITQ initialised with the recipe's
    key) whose latent factors and scales train through the sign's straight-through
    estimator; ``train_also`` rules train too (e.g. biases and norms), the rest is frozen.

    Examples:
        >>> from subspace_jax import littlebit
        >>> r = littlebit.recipe(littlebit.LittleBitRule(pattern="mlp/.*/kernel", bpw=1.0))
        >>> r.name, [x.pattern for x in r.train]
        ('littlebit', ['mlp/.*/kernel'])
    """
    from subspace_jax import train

    chosen = _rules(rules)

    def convert_model(model: nnx.Module, key: jax.Array) -> nnx.Module:
        return convert(model, chosen, key=key)

    trained = tuple(rules_lib.Rule(pattern=r.pattern) for r in chosen
                    if isinstance(r, LittleBitRule))
    return train.Recipe(name="littlebit", convert=convert_model,
                        train=(*trained, *train_also))
