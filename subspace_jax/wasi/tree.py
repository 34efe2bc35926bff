"""WASI on parameter trees: the per-step refresh, export, plans and the weight-only factoring.

Every function here is tree-level (an ``nnx.State``, a pure dict, linen variables) and finds
WASI's kernels by their form (:class:`~subspace_jax.wasi.form.WasiKernel`):

* :func:`post_update` (the shared train step's hook): the ``factored`` variant's basis is
  re-orthonormalised with its product kept, the ``master`` variant's factors are re-derived
  from the trained master matrix;
* :func:`export`: a plain factored inference tree (``LowRank`` kernels with the same fold);
* :func:`plans` and :func:`summary`: the per-layer table of a converted tree;
* :func:`orthonormalize` and :func:`factorize`: the weight side alone on ``LowRank`` kernels
  (``factorize`` is kept one release as the old name of the weight part of
  :func:`subspace_jax.wasi.transform`).

References:
    WASI, arXiv 2510.09160.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx

from subspace_jax import forms
from subspace_jax import rules as rules_lib
from subspace_jax.wasi import calibration, core
from subspace_jax.wasi.form import WasiKernel, WasiMasterKernel

__all__ = ["LayerPlan", "post_update", "export", "plans", "summary", "orthonormalize",
           "factorize"]


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What WASI decided for one kernel.

    Attributes:
        path: the kernel's path (its form's ``state_key``).
        shape: the folded ``(in, out)`` matrix.
        rank: the weight rank K.
        act_shape: the calibrated shape of the folded input ``(..., in)``.
        act_ranks: the Tucker rank of each of its modes.
        eps: the activation eps the ranks came from (None: given ranks, or unknown).
        options: the calibration table (empty unless a budget was used).
    """

    path: str
    shape: tuple[int, int]
    rank: int
    act_shape: tuple[int, ...]
    act_ranks: tuple[int, ...]
    eps: float | None = None
    options: tuple[calibration.RankOption, ...] = ()

    @property
    def full_bytes(self) -> int:
        """Analytic float32 bytes of the uncompressed input."""
        return calibration.activation_bytes(self.act_shape)

    @property
    def compressed_bytes(self) -> int:
        """Analytic float32 bytes of the core and factors."""
        return calibration.activation_bytes(self.act_shape, self.act_ranks)


def _state(target: Any) -> Any:
    return nnx.state(target) if isinstance(target, nnx.Module) else target


def _wasi_kernels(tree: Any) -> list[tuple[str, WasiKernel]]:
    return [(path, rules_lib._unwrap(leaf)) for path, leaf in rules_lib.leaf_paths(tree)[0]
            if isinstance(rules_lib._unwrap(leaf), WasiKernel)]


def _refresh(k: WasiKernel) -> WasiKernel:
    if isinstance(k, WasiMasterKernel):
        a, b = core.refresh_master(k.w, k.b)
    else:
        a, b = core.refresh_factored(k.a, k.b)
    return dataclasses.replace(k, a=a, b=b)


def post_update(params: Any, rest: Any = None) -> tuple[Any, Any]:
    """The shared train step's ``post_update`` for WASI (both variants); jittable.

    Every :class:`~subspace_jax.wasi.WasiKernel` of ``params`` gets an orthonormal ``b``
    again with ``a @ b`` unchanged (:func:`subspace_jax.wasi.core.refresh_factored`); every
    :class:`~subspace_jax.wasi.WasiMasterKernel` gets ``a``, ``b`` re-derived from its
    trained master matrix by one warm-started subspace-iteration step
    (:func:`subspace_jax.wasi.core.refresh_master`). The activation bases were already
    refreshed by the forward (the step absorbs what the forms emitted).

    Args:
        params: the parameter tree.
        rest: the model's other state, returned as it is.

    Returns:
        ``(params, rest)``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import forms, wasi
        >>> k = wasi.WasiKernel(jnp.ones((3, 1)), 2 * jnp.ones((1, 2)), (jnp.eye(3, 1),))
        >>> params, _ = wasi.post_update({"mlp": {"up": {"kernel": k}}})
        >>> k2 = params["mlp"]["up"]["kernel"]
        >>> bool(jnp.allclose(k2.b @ k2.b.T, 1.0)), bool(jnp.allclose(k2.matrix(), 2.0))
        (True, True)

    References:
        WASI, Algorithm 1, arXiv 2510.09160.
    """
    def one(path, value):
        return _refresh(value) if isinstance(value, WasiKernel) else value

    return rules_lib.map_with_path(one, params), rest


def export(target: Any) -> Any:
    """A plain factored inference tree: every WASI kernel becomes a
    :class:`~subspace_jax.forms.LowRank` with the same fold (two thin matmuls, no dense
    kernel, no activation basis); the ``master`` variant's float32 factors are cast to the
    master matrix's dtype. An NNX model gives a new NNX model.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import forms, wasi
        >>> k = wasi.WasiKernel(jnp.ones((3, 1)), jnp.ones((1, 2)), (jnp.eye(3, 1),))
        >>> plain = wasi.export({"up": {"kernel": k}})["up"]["kernel"]
        >>> type(plain).__name__, plain.shape
        ('LowRank', (3, 2))
    """
    if isinstance(target, nnx.Module):
        graphdef, state = nnx.split(target)
        return nnx.merge(graphdef, export(state))

    def one(path, value):
        if not isinstance(value, WasiKernel):
            return value
        a, b = value.a, value.b
        if isinstance(value, WasiMasterKernel):
            a, b = a.astype(value.w.dtype), b.astype(value.w.dtype)
        return forms.LowRank(a, b, fold=value.fold)

    return rules_lib.map_with_path(one, target)


def plans(target: Any) -> tuple[LayerPlan, ...]:
    """The :class:`LayerPlan` of every WASI kernel of a tree (or NNX model), read from the
    forms: path, folded shape, weight rank and activation shape and ranks (no eps, no
    calibration table: :func:`subspace_jax.wasi.transform` with ``return_plans=True`` gives
    those).

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import wasi
        >>> k = wasi.WasiKernel(jnp.ones((8, 2)), jnp.ones((2, 4)), (jnp.eye(6, 2), jnp.eye(8, 3)),
        ...                     key="mlp/up/kernel")
        >>> p, = wasi.plans({"mlp": {"up": {"kernel": k}}})
        >>> p.path, p.shape, p.rank, p.act_shape, p.act_ranks
        ('mlp/up/kernel', (8, 4), 2, (6, 8), (2, 3))
    """
    return tuple(LayerPlan(k.key, k.matrix_shape, k.rank, k.act_shape, k.act_ranks)
                 for _, k in _wasi_kernels(_state(target)))


def summary(target: Any) -> str:
    """The per-layer table: kernel (folded) shape, weight rank K, activation shape and
    ranks, analytic activation bytes (full and compressed) and their ratio.

    Args:
        target: a sequence of :class:`LayerPlan` (from ``transform(..., return_plans=True)``),
            or a converted tree or NNX model (read with :func:`plans`).

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import wasi
        >>> k = wasi.WasiKernel(jnp.ones((8, 3)), jnp.ones((3, 4)),
        ...                     (jnp.eye(2, 1), jnp.eye(3, 2), jnp.eye(8, 2)), key="mlp/up/kernel")
        >>> print(wasi.summary({"mlp": {"up": {"kernel": k}}}))
        ... # doctest: +NORMALIZE_WHITESPACE
        layer          in x out  K  activation  ranks      full B  kept B  ratio
        mlp/up/kernel  8 x 4     3  (2, 3, 8)   (1, 2, 2)  192     112     1.7x
        total                                              192     112     1.7x
    """
    is_plans = isinstance(target, Sequence) and all(isinstance(p, LayerPlan) for p in target)
    rows_in = tuple(target) if is_plans else plans(target)
    rows = [("layer", "in x out", "K", "activation", "ranks", "full B", "kept B", "ratio")]
    for p in rows_in:
        rows.append((p.path, f"{p.shape[0]} x {p.shape[1]}", str(p.rank), str(p.act_shape),
                     str(p.act_ranks), str(p.full_bytes), str(p.compressed_bytes),
                     f"{p.full_bytes / p.compressed_bytes:.1f}x"))
    full, kept = sum(p.full_bytes for p in rows_in), sum(p.compressed_bytes for p in rows_in)
    rows.append(("total", "", "", "", "", str(full), str(kept), f"{full / max(kept, 1):.1f}x"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _default_rules(rules):
    if rules is None:
        return (rules_lib.Rule(pattern=rules_lib.MLP_PATTERN),)
    return (rules,) if isinstance(rules, rules_lib.Rule) else tuple(rules)


def orthonormalize(tree: Any, rules: rules_lib.Rule | Sequence[rules_lib.Rule] | None = None
                   ) -> Any:
    """The ``factored`` refresh on any tree: every matched ``LowRank`` (or ``WasiKernel``)
    gets an orthonormal ``b`` again with its product unchanged
    (:func:`subspace_jax.wasi.core.refresh_factored`). Jittable.

    Args:
        tree: the tree.
        rules: rules selecting the kernels (default :data:`subspace_jax.rules.MLP_PATTERN`).

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import forms, wasi
        >>> k = forms.LowRank(jnp.ones((3, 1)), 2 * jnp.ones((1, 2)))
        >>> tree = {"mlp": {"up": {"kernel": k}}}
        >>> k = wasi.orthonormalize(tree)["mlp"]["up"]["kernel"]
        >>> bool(jnp.allclose(k.b, 0.5 ** 0.5)), bool(jnp.allclose(k.materialize(), 2.0))
        (True, True)
    """

    def one(path, k, rule):
        if not isinstance(k, (forms.LowRank, WasiKernel)):
            raise TypeError(f"expected a LowRank or WasiKernel kernel, got {type(k).__name__}")
        return dataclasses.replace(k, **dict(zip("ab", core.refresh_factored(k.a, k.b))))

    return rules_lib.apply(tree, _default_rules(rules), one)


def check_energy(energy: Any, where: str = "energy") -> float:
    """``energy`` as a float in ``(0, 1]``, else ``ValueError`` naming it.

    Examples:
        >>> from subspace_jax.wasi import tree
        >>> tree.check_energy(1)
        1.0
    """
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
        raise ValueError(f"{where} (weight eps) must be a float in (0, 1], got {energy!r}")
    return float(energy)


def factor_kernel(kernel: Any, energy: float, in_axes: Any = None) -> forms.LowRank:
    """WASI's weight factoring of one dense kernel: ``LowRank(a, b)`` with ``b`` orthonormal
    (``split=1``) at the smallest rank whose squared singular values reach ``energy``; an
    N-D kernel is folded with ``in_axes`` first.

    Raises:
        TypeError: ``kernel`` is already a form.
        ValueError: an N-D kernel without ``in_axes``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax.wasi import tree
        >>> tree.factor_kernel(jnp.diag(jnp.array([3.0, 2.0, 1.0])), 0.9).rank
        2
    """
    if forms.is_form(kernel):
        raise TypeError(f"WASI converts dense kernels, got a {type(kernel).__name__} form; "
                        "materialize it first")
    if not hasattr(kernel, "shape") or len(kernel.shape) < 2:
        raise ValueError(f"WASI converts (in, out) or N-D kernels, got shape "
                         f"{tuple(getattr(kernel, 'shape', ()))}")
    return forms.LowRank.from_dense(jnp.asarray(kernel), eps=energy, split=1.0,
                                    in_axes=in_axes)


def factorize(tree: Any, rules: rules_lib.Rule | Sequence[rules_lib.Rule] | None = None, *,
              energy: float = 0.9) -> Any:
    """Deprecated (one release): the weight part of :func:`subspace_jax.wasi.transform` alone.

    Matched kernels become ``LowRank(a, b)`` with ``b`` orthonormal at the smallest rank
    reaching ``energy`` (an N-D kernel folded with its rule's ``in_axes``); no activation
    basis. Use ``wasi.transform`` with :class:`~subspace_jax.wasi.WasiRule` for WASI.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import wasi
        >>> params = {"mlp": {"up": {"kernel": jnp.diag(jnp.array([3.0, 2.0, 1.0]))}}}
        >>> k = wasi.factorize(params, energy=0.9)["mlp"]["up"]["kernel"]
        >>> k.rank, bool(jnp.allclose(k.b @ k.b.T, jnp.eye(2)))
        (2, True)
    """
    energy = check_energy(energy)
    return rules_lib.apply(tree, _default_rules(rules),
                           lambda path, k, rule: factor_kernel(k, energy, rule.in_axes))
