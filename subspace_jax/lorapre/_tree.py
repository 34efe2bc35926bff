"""Tree plumbing of LoRA-Pre: which leaves are matrices, how they fold, where they shard.

A leaf's :class:`DimensionNumbers` (reduction and output axes, as optax's Muon and GaLore
use them; the rest are batch axes) fold it into a ``(batch?, p, q)`` matrix (:func:`view`).
Specs and masks may be ``None``, one value, a pytree prefix of the parameters, or a
callable of the parameters (optax's convention); :func:`flat_specs` and
:func:`flat_mask` resolve them to one entry per leaf, in ``jax.tree.leaves`` order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec

from subspace_jax.lorapre import core

class DimensionNumbers(NamedTuple):
    """Which axes of a leaf form the matrix; the others are batch axes (one matrix each).

    The same convention as optax's ``MuonDimensionNumbers`` and ``GaLoreDimensionNumbers``
    (both also accepted): a kernel used as ``x @ W`` has ``reduction_axis=0``,
    ``output_axis=1``.

    Attributes:
        reduction_axis: axis or axes merged into the matrix's rows ``p``.
        output_axis: axis or axes merged into its columns ``q``.

    Examples:
        >>> DimensionNumbers(reduction_axis=0, output_axis=(1, 2))  # (embed, heads, head_dim)
        DimensionNumbers(reduction_axis=0, output_axis=(1, 2))
    """

    reduction_axis: int | tuple[int, ...] = 0
    output_axis: int | tuple[int, ...] = 1


_SPEC_TYPES = (DimensionNumbers, optax.contrib.MuonDimensionNumbers,
               optax.contrib.GaLoreDimensionNumbers)


class View(NamedTuple):
    """How a leaf folds into a ``batch + (p, q)`` matrix (``batch`` is ``()`` or ``(n,)``)."""

    perm: tuple[int, ...]
    shape: tuple[int, ...]
    unflat: tuple[int, ...]
    batch_axes: tuple[int, ...]
    reduction_axes: tuple[int, ...]
    output_axes: tuple[int, ...]

    def to_matrix(self, x: jax.Array) -> jax.Array:
        return x.transpose(self.perm).reshape(self.shape)

    def from_matrix(self, m: jax.Array) -> jax.Array:
        inverse = sorted(range(len(self.perm)), key=self.perm.__getitem__)
        return m.reshape(self.unflat).transpose(inverse)


def path_str(path) -> str:
    return jax.tree_util.keystr(tuple(path), simple=True, separator="/") or "<root>"


def view(owner: str, path: str, shape: tuple[int, ...], spec: DimensionNumbers) -> View:
    """Fold ``shape`` by ``spec``; ``ValueError`` naming ``path`` and ``shape`` if it misfits."""
    ndim = len(shape)

    def axes(value) -> tuple[int, ...]:
        value = (value,) if isinstance(value, int) else tuple(value)
        if not value or any(not isinstance(a, int) or not -ndim <= a < ndim for a in value):
            raise ValueError(f"{owner}: {spec} does not fit leaf {path!r} of shape {shape}: "
                             f"axes {value} are empty or out of range for {ndim} dimensions")
        return tuple(a % ndim for a in value)

    red, out = axes(spec.reduction_axis), axes(spec.output_axis)
    if len(set(red + out)) < len(red + out):
        raise ValueError(f"{owner}: {spec} does not fit leaf {path!r} of shape {shape}: "
                         f"reduction axes {red} and output axes {out} overlap")
    batch = tuple(a for a in range(ndim) if a not in red + out)
    size = lambda ax: math.prod(shape[a] for a in ax)  # noqa: E731
    flat = ((size(batch),) if batch else ()) + (size(red), size(out))
    unflat = tuple(shape[a] for a in batch + red + out)
    return View(batch + red + out, flat, unflat, batch, red, out)


def _broadcast(owner: str, tree: Any, prefix: Any, is_leaf: Callable[[Any], bool]) -> list:
    """One entry of the prefix tree ``prefix`` per leaf of ``tree``."""
    entries, treedef = jax.tree.flatten(prefix, is_leaf=is_leaf)
    try:
        subtrees = treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{owner}: the spec/mask tree is not a prefix of the parameters: "
                         f"{e}") from None
    return [e for e, sub in zip(entries, subtrees) for _ in jax.tree.leaves(sub)]


def _is_spec(x) -> bool:
    return x is None or isinstance(x, _SPEC_TYPES)


def flat_specs(owner: str, tree: Any, dim_nums: Any, default: Callable[[Any], Any]) -> list:
    """Dimension numbers (or None) per leaf; ``default(leaf)`` when ``dim_nums`` is None."""
    if callable(dim_nums):
        dim_nums = dim_nums(tree)
    if dim_nums is None:
        return [default(x) for x in jax.tree.leaves(tree)]
    return _broadcast(owner, tree, dim_nums, _is_spec)


def flat_mask(owner: str, tree: Any, mask: Any) -> list[bool]:
    """A bool per leaf (False everywhere when ``mask`` is None)."""
    if callable(mask):
        mask = mask(tree)
    if mask is None:
        return [False] * len(jax.tree.leaves(tree))
    return [bool(m) for m in _broadcast(owner, tree, mask, lambda x: isinstance(x, bool))]


def _merged(entries: tuple, axes: tuple[int, ...]):
    """Mesh axes of a dimension merged from ``axes``: kept when only the major one is sharded."""
    names = [entries[a] for a in axes]
    return names[0] if all(n is None for n in names[1:]) else None


def place_like(f: core.Factors, x: Any, v: View) -> core.Factors:
    """Shard ``B`` along ``p`` and ``A`` along ``q`` as the concrete parameter ``x`` is."""
    if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
        return f
    sharding = x.sharding
    if not isinstance(sharding, NamedSharding):
        return f
    entries = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
    batch = (_merged(entries, v.batch_axes),) if v.batch_axes else ()
    p, q = _merged(entries, v.reduction_axes), _merged(entries, v.output_axes)

    def put(a: jax.Array, *spec) -> jax.Array:
        return jax.device_put(a, NamedSharding(sharding.mesh, PartitionSpec(*spec)))

    return core.Factors(B=put(f.B, *batch, p, None), A=put(f.A, *batch, None, q))


def partition_safe(mask: Any) -> Any:
    """``mask`` usable inside ``optax.partition`` (whose trees carry ``MaskedNode``)."""
    if mask is None or callable(mask):
        return mask
    is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    return lambda tree: jax.tree.map(lambda m, x: x if is_masked(x) else m, mask, tree,
                                     is_leaf=is_masked)
