"""WASI's transform: calibrate on a sample, choose activation ranks, put WASI kernels in.

:func:`transform` is pure, tree to tree, for any Flax model (linen, NNX, Hugging Face): the
kernels its :class:`WasiRule`\\ s select become :class:`~subspace_jax.wasi.WasiKernel` forms,
which the model's own layers run (inside :func:`subspace_jax.nn.intercept`, which the shared
train step opens). Calibration runs the user's model on a sample with a temporary probe
form at each selected kernel: it computes the dense product, emits its folded input
(:func:`subspace_jax.forms.emit`) and adds a zero output probe whose gradient is the
layer's output gradient (for the knapsack). :func:`convert` is the NNX convenience.

References:
    WASI, Sec. 3 and App. A.2, arXiv 2510.09160.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from subspace_jax import forms
from subspace_jax import nn as sjnn
from subspace_jax import rules as rules_lib
from subspace_jax.wasi import calibration
from subspace_jax.wasi import core as core_lib
from subspace_jax.wasi.form import VARIANTS, WasiKernel, WasiMasterKernel
from subspace_jax.wasi.tree import LayerPlan, check_energy, factor_kernel, summary

__all__ = ["MLP_PATTERN", "ATTENTION_PATTERN", "WasiRule", "transform", "convert", "recipe"]

#: The paper's default selection, the MLP kernels: :data:`subspace_jax.rules.MLP_PATTERN`.
MLP_PATTERN = rules_lib.MLP_PATTERN
#: The attention projections of the library's models (the paper's "all linear layers"
#: variant adds these).
ATTENTION_PATTERN = r"(.*/)?attn/(q|k|v|o)/kernel"
#: The activation eps of a layer whose rule sets neither eps nor ranks, without a budget
#: (the per-layer minimum-memory option the paper's scripts end up with).
DEFAULT_ACTIVATION_EPS = 0.4


def _check_eps(value: Any, where: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not 0 < value <= 1):
        raise ValueError(f"{where}: activation_eps must be in (0, 1], got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WasiRule(rules_lib.Rule):
    """A WASI selection rule with its settings.

    Attributes:
        pattern: regex fully matched against kernel paths (see :class:`subspace_jax.rules.Rule`).
        energy: the weight eps in ``(0, 1]``: the rank K is the smallest whose squared
            singular values reach it.
        activation_eps: one activation eps in ``(0, 1]`` for the matched layers: each mode's
            Tucker rank is the smallest reaching it.
        activation_ranks: instead, the ranks: one tuple (one rank per mode of the folded
            input) or a mapping from kernel path to tuple.
        in_axes: for N-D kernels, the kernel axes that contract with the input (see
            :class:`subspace_jax.rules.Rule`).
        skip, optional: as in :class:`subspace_jax.rules.Rule`.

    With neither ``activation_eps`` nor ``activation_ranks`` the layer's ranks come from
    the knapsack when :func:`transform` has a ``budget_bytes``, else from eps 0.4.

    Examples:
        >>> from subspace_jax import wasi
        >>> wasi.WasiRule(pattern=wasi.MLP_PATTERN, energy=0.9, activation_eps=0.6).energy
        0.9
        >>> wasi.WasiRule(pattern=".*", energy=1.5)
        Traceback (most recent call last):
        ...
        ValueError: WasiRule '.*': energy (weight eps) must be a float in (0, 1], got 1.5
    """

    energy: float = 0.9
    activation_eps: float | None = None
    activation_ranks: Any = None

    def __post_init__(self):
        super().__post_init__()
        where = f"WasiRule {self.pattern!r}"
        object.__setattr__(self, "energy", check_energy(self.energy, f"{where}: energy"))
        _check_eps(self.activation_eps, where)
        ranks = self.activation_ranks
        if ranks is not None:
            if self.activation_eps is not None:
                raise ValueError(f"{where}: set activation_eps or activation_ranks, not both")
            if isinstance(ranks, Mapping):
                ranks = {str(k): tuple(v) for k, v in ranks.items()}
            else:
                ranks = tuple(ranks)
            object.__setattr__(self, "activation_ranks", ranks)

    def ranks_for(self, path: str) -> tuple[int, ...] | None:
        """The activation ranks this rule sets for the kernel at ``path`` (or None)."""
        if isinstance(self.activation_ranks, Mapping):
            return self.activation_ranks.get(path)
        return self.activation_ranks


def _rules(rules: Any) -> tuple[WasiRule, ...]:
    if rules is None:
        return (WasiRule(pattern=MLP_PATTERN),)
    rules = (rules,) if isinstance(rules, rules_lib.Rule) else tuple(rules)
    out = []
    for i, r in enumerate(rules):
        if not isinstance(r, rules_lib.Rule):
            raise TypeError(f"rule #{i} must be a WasiRule (or a subspace_jax.rules.Rule), "
                            f"got {r!r}")
        if not isinstance(r, WasiRule):
            r = WasiRule(pattern=r.pattern, skip=r.skip, optional=r.optional, in_axes=r.in_axes)
        out.append(r)
    return tuple(out)


# --- calibration capture ------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Probe(forms.KernelForm):
    """A dense kernel that emits its folded input and adds ``probe`` (zeros) to its output,
    so the gradient with respect to ``probe`` is the layer's output gradient."""

    w: jax.Array
    probe: jax.Array | None = None
    key: str = dataclasses.field(default="", metadata=dict(static=True))

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return (int(self.w.shape[0]), int(self.w.shape[1]))

    @property
    def dtype(self) -> Any:
        return self.w.dtype

    def matrix(self) -> jax.Array:
        return self.w

    def matmul(self, x, *, dtype=None, precision=None, dot_general=None):
        x, w = forms.promote((x, self.w), dtype)
        forms.emit(self.key, x)
        y = forms.dot(x, w, precision=precision, dot_general=dot_general)
        return y if self.probe is None else y + self.probe.astype(y.dtype)

    @property
    def nbytes(self) -> int:
        return forms.nbytes(self.w)

    def flops(self, tokens: int) -> int:
        return forms.flops(self.w, tokens)


def _with_probes(tree: Any, probes: Mapping[str, jax.Array]) -> Any:
    def one(path, value):
        if isinstance(value, _Probe) and path in probes:
            return dataclasses.replace(value, probe=probes[path])
        return value
    return rules_lib.map_with_path(one, tree)


def _capture(probed: Any, outs: Mapping[str, int], sample: Callable, need_grads: bool):
    """Folded inputs (and, with ``need_grads``, output gradients) of the probed kernels on
    the calibration sample, both passes jitted."""

    @jax.jit
    def forward(tree):
        with sjnn.intercept(), forms.collect() as got:
            sample(tree)
        return {k: v for k, v in got.items() if k in outs}

    xs = forward(probed)
    missing = sorted(set(outs) - set(xs))
    if missing:
        raise ValueError(f"WASI calibration: sample() never called the layers of the kernels "
                         f"{missing} (sample(tree) must run the model on the tree it is given)")
    if not need_grads:
        return xs, {}

    def loss(probes, tree):
        with sjnn.intercept(), forms.collect():
            return jnp.sum(jnp.asarray(sample(_with_probes(tree, probes))))

    probes = {k: jnp.zeros(x.shape[:-1] + (outs[k],), jnp.float32) for k, x in xs.items()}
    return xs, jax.jit(jax.grad(loss))(probes, probed)


# --- ranks -----------------------------------------------------------------------------------

def _check_ranks(path, shape, ranks):
    total = math.prod(shape)
    if len(ranks) != len(shape):
        raise ValueError(f"WASI layer {path!r}: {len(ranks)} activation ranks for a "
                         f"{len(shape)}-D input of shape {shape}")
    for n, (d, r) in enumerate(zip(shape, ranks)):
        cap = min(d, total // d)
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= cap:
            raise ValueError(f"WASI layer {path!r}: activation rank {r!r} of mode {n} must be "
                             f"an int in [1, {cap}] (the mode's size {d}, capped by the product "
                             f"of the other modes) for an input of shape {shape}")


def _plans(selected, xs, gs, budget_bytes, eps_grid, knapsack_error):
    """One plan per kernel: fixed ranks (rule ranks or eps), or the knapsack's under the
    budget that the fixed layers leave."""
    plans, spectra, free = {}, {}, []
    for path, (rule, fold_shape) in selected.items():
        x = xs[path]
        spectra[path] = calibration.mode_spectra(x)
        ranks, eps, options = rule.ranks_for(path), rule.activation_eps, ()
        if ranks is None and eps is None:
            if budget_bytes is None:
                eps = DEFAULT_ACTIVATION_EPS
            else:
                options = tuple(calibration.rank_options(x, gs[path], eps_grid,
                                                         spectra=spectra[path]))
                free.append(path)
        if ranks is None and eps is not None:
            ranks = calibration.eps_ranks(spectra[path], float(eps))
        plans[path] = LayerPlan(path, fold_shape, 0, tuple(x.shape),
                                None if ranks is None else tuple(ranks), eps, options)
    if free:
        fixed = sum(p.compressed_bytes for path, p in plans.items() if path not in free)
        picks = calibration.knapsack([plans[p].options for p in free], budget_bytes - fixed,
                                     error=knapsack_error)
        for path, j in zip(free, picks):
            o = plans[path].options[j]
            plans[path] = dataclasses.replace(plans[path], act_ranks=o.ranks, eps=o.eps)
    for path, p in plans.items():
        _check_ranks(path, p.act_shape, p.act_ranks)
    return plans, spectra


# --- the transform ---------------------------------------------------------------------------

_MOVED = ("energy", "activation_eps", "activation_ranks")


def _refuse_moved(where: str, kwargs: Mapping[str, Any]) -> None:
    if kwargs:
        moved = [k for k in kwargs if k in _MOVED]
        if moved:
            raise TypeError(f"{where}: {', '.join(moved)} moved to the rules: pass "
                            f"rules=wasi.WasiRule(pattern=..., {moved[0]}=...)")
        raise TypeError(f"{where}() got unexpected keyword arguments {sorted(kwargs)}")


def transform(tree: Any, rules: WasiRule | Sequence[rules_lib.Rule] | None = None, *,
              sample: Callable[[Any], Any], budget_bytes: int | None = None,
              eps_grid: Sequence[float] = calibration.EPS_GRID, variant: str = "factored",
              order: str = "auto", knapsack_error: str = "absolute",
              return_plans: bool = False, verbose: bool = False, **moved: Any) -> Any:
    """WASI on any parameter tree: the selected kernels become WASI kernels; pure.

    Each kernel a rule selects is factored at the smallest rank K reaching the rule's
    ``energy`` (fixed afterwards; an N-D kernel is folded with the rule's ``in_axes``), and
    its layer's input is kept for backward as a Tucker tensor at fixed per-mode ranks.
    ``sample(tree)`` runs the model on a calibration batch whose shapes training must keep
    (batch size and length), e.g. ``lambda p: model.apply({"params": p}, x)``; it runs
    inside :func:`subspace_jax.nn.intercept`, with a probe form at each selected kernel, so
    any linen or NNX model works. Each layer's folded input ``(..., in)`` gives its
    activation shape, ranks and initial factors (exact HOSVD). Activation ranks come from
    the rule's ``activation_ranks`` or ``activation_eps``; for the layers whose rule sets
    neither, from the paper's calibration under ``budget_bytes`` (an exact HOSVD per eps of
    ``eps_grid``, each option's memory and weight-gradient error, then a knapsack under what
    the other layers leave of the budget; ``sample`` must then return a scalar loss), or
    else from eps 0.4.

    Train with :func:`subspace_jax.train.make_train_step` and
    ``post_update=wasi.post_update`` (``graphdef=None`` and ``loss_fn(params, batch, key)``
    for a non-NNX model).

    Args:
        tree: an ``nnx.State``, a nested dict, linen params, a Hugging Face params dict.
        rules: :class:`WasiRule` s (plain ``Rule`` s get the defaults; default: one rule with
            :data:`MLP_PATTERN`).
        sample: ``sample(tree) -> outputs or loss`` on the calibration batch.
        budget_bytes: total compressed-activation budget for the knapsack.
        eps_grid: the calibration grid.
        variant: ``"factored"`` (only the factors train; default) or ``"master"`` (a full
            master matrix trains; the factors follow it, as in the paper's code).
        order: weight-gradient contraction order (``"auto"``, ``"paper"``, ``"project"``).
        knapsack_error: what the knapsack sums over layers: ``"absolute"`` weight-gradient
            errors ``||dW - dW~||_F`` (default, the paper's) or ``"relative"`` ones.
        return_plans: also return the :class:`~subspace_jax.wasi.LayerPlan` s.
        verbose: print :func:`~subspace_jax.wasi.summary`.

    Returns:
        The new tree (unselected leaves are the input's own), or ``(tree, plans)``.

    Raises:
        ValueError: an activation rank above its mode's size, a rule matching nothing, an
            N-D kernel without ``in_axes``, a layer ``sample`` never calls, an unknown
            variant or order; messages name the kernel's path.
        TypeError: a selected kernel that is already a form; settings passed as keywords
            (they live on :class:`WasiRule`).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import flax.linen as nn
        >>> import subspace_jax as sj
        >>> from subspace_jax import wasi
        >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
        >>> x = jax.random.normal(jax.random.key(0), (2, 5, 8))
        >>> params = model.init(jax.random.key(1), x)["params"]
        >>> rule = wasi.WasiRule(pattern=".*kernel", energy=1.0, activation_eps=1.0)
        >>> new, plans = wasi.transform(params, rule, return_plans=True,
        ...                             sample=lambda p: model.apply({"params": p}, x))
        >>> type(new["layers_0"]["kernel"]).__name__, plans[0].act_shape
        ('WasiKernel', (2, 5, 8))
        >>> with sj.nn.intercept():
        ...     y = model.apply({"params": new}, x)
        >>> bool(jnp.allclose(y, model.apply({"params": params}, x), atol=1e-4))
        True

    References:
        WASI, Sec. 3 and App. A.2, arXiv 2510.09160.
    """
    _refuse_moved("wasi.transform", moved)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if order not in core_lib.ORDERS:
        raise ValueError(f"order must be one of {core_lib.ORDERS}, got {order!r}")
    rules = _rules(rules)
    selected, outs = {}, {}

    def probe(path, kernel, rule):
        if forms.is_form(kernel):
            raise TypeError(f"WASI converts dense kernels, got a {type(kernel).__name__} "
                            "form; materialize it first")
        matrix, fold = forms.fold_kernel(kernel, rule.in_axes)
        selected[path] = (rule, tuple(int(d) for d in matrix.shape))
        outs[path] = int(matrix.shape[1])
        return _Probe(matrix, key=path, fold=fold)

    probed = rules_lib.apply(tree, rules, probe)
    xs, gs = _capture(probed, outs, sample, need_grads=budget_bytes is not None)
    if knapsack_error not in calibration.ERRORS:
        raise ValueError(f"wasi: knapsack_error={knapsack_error!r} must be one of "
                         f"{calibration.ERRORS}")
    plans, spectra = _plans(selected, xs, gs, budget_bytes, eps_grid, knapsack_error)

    def make(path, kernel, rule):
        plan = plans[path]
        low = factor_kernel(kernel, rule.energy, rule.in_axes)
        plans[path] = dataclasses.replace(plan, rank=low.rank)
        basis = tuple(calibration.truncate(xs[path], spectra[path], plan.act_ranks).factors)
        if variant == "factored":
            return WasiKernel(low.a, low.b, basis, key=path, order=order, fold=low.fold)
        w = jnp.array(forms.fold_kernel(kernel, rule.in_axes)[0], copy=True)
        return WasiMasterKernel(jnp.asarray(low.a, jnp.float32), jnp.asarray(low.b, jnp.float32),
                                basis, w=w, key=path, order=order, fold=low.fold)

    out = rules_lib.apply(tree, rules, make)
    plans = tuple(plans.values())
    if verbose:
        print(summary(plans))
    return (out, plans) if return_plans else out


def convert(model: nnx.Module, rules: WasiRule | Sequence[rules_lib.Rule] | None = None, *,
            sample: Callable[[nnx.Module], Any], budget_bytes: int | None = None,
            eps_grid: Sequence[float] = calibration.EPS_GRID, variant: str = "factored",
            order: str = "auto", knapsack_error: str = "absolute", return_plans: bool = False,
            verbose: bool = True, **moved: Any) -> Any:
    """:func:`transform` for an NNX model: a new model with WASI kernels in its layers.

    The model is adopted (:func:`subspace_jax.adopt`: its ``nnx.Linear``,
    ``nnx.LinearGeneral`` and ``nnx.Einsum`` take forms and record their kernels'
    ``in_axes``, so N-D kernels fold without ``in_axes`` on the rules), split, transformed
    with ``sample(model)`` run on the merged model, and merged again. The new model shares
    no array with the input, which is not modified (also after a train step donates the new
    one's buffers). Nothing is stored on the module: plans come back with
    ``return_plans=True`` (or from :func:`subspace_jax.wasi.plans`).

    Args:
        model: any NNX model.
        rules, budget_bytes, eps_grid, variant, order, knapsack_error, return_plans: as in
            :func:`transform`.
        sample: ``sample(model) -> outputs or loss`` on the calibration batch.
        verbose: print :func:`~subspace_jax.wasi.summary`.

    Returns:
        The converted model, or ``(model, plans)``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from subspace_jax import wasi
        >>> model = nnx.Dict(mlp=nnx.Dict(up=nnx.Linear(8, 4, rngs=nnx.Rngs(0))))
        >>> x = jax.random.normal(jax.random.key(0), (2, 3, 8))
        >>> new = wasi.convert(model, wasi.WasiRule(pattern=wasi.MLP_PATTERN, activation_ranks=(1, 2, 2)),
        ...                    sample=lambda m: m["mlp"]["up"](x))
        ... # doctest: +NORMALIZE_WHITESPACE
        layer          in x out  K  activation  ranks      full B  kept B  ratio
        mlp/up/kernel  8 x 4     3  (2, 3, 8)   (1, 2, 2)  192     112     1.7x
        total                                              192     112     1.7x
        >>> new["mlp"]["up"](x).shape, type(new["mlp"]["up"].kernel.get_value()).__name__
        ((2, 3, 4), 'WasiKernel')

    References:
        WASI, Sec. 3 and App. A.2, arXiv 2510.09160.
    """
    _refuse_moved("wasi.convert", moved)
    graphdef, state = nnx.split(sjnn.adopt(model))
    out, plans = transform(state, rules, sample=lambda s: sample(nnx.merge(graphdef, s)),
                           budget_bytes=budget_bytes, eps_grid=eps_grid, variant=variant,
                           order=order, knapsack_error=knapsack_error, return_plans=True,
                           verbose=verbose)
    new = nnx.merge(graphdef, out)
    return (new, plans) if return_plans else new


def recipe(rules: WasiRule | Sequence[rules_lib.Rule] | None = None, *,
           sample: Callable[[nnx.Module], Any],
           budget_bytes: int | Callable[[nnx.Module], int] | None = None,
           variant: str = "factored", knapsack_error: str = "absolute",
           lr: float | None = None) -> Any:
    """WASI as a :class:`~subspace_jax.train.Recipe`: :func:`convert` (kernels factored and
    activation bases calibrated on ``sample(model)``), every leaf trains as in full
    fine-tuning (as in the paper), and :func:`subspace_jax.wasi.post_update` keeps the
    factored basis orthonormal (or re-derives the factors from the master) after each step.

    Args:
        rules, sample, variant, knapsack_error: as in :func:`convert`.
        budget_bytes: as in :func:`convert`, or a function of the model to convert (a
            share of its layers' full inputs).
        lr: the method's suggested peak learning rate (picked on validation for a task).

    Examples:
        >>> from subspace_jax import wasi
        >>> r = wasi.recipe(wasi.WasiRule(pattern="mlp/.*/kernel"), sample=lambda m: 0.0)
        >>> r.name, r.train, r.post_update is wasi.post_update
        ('wasi', None, True)
    """
    from subspace_jax import train
    from subspace_jax.wasi.tree import post_update

    def convert_model(model: nnx.Module, key: jax.Array) -> nnx.Module:
        del key  # deterministic: SVDs and HOSVDs of the pretrained kernels and activations
        budget = budget_bytes(model) if callable(budget_bytes) else budget_bytes
        return convert(model, rules, sample=sample, budget_bytes=budget, variant=variant,
                       knapsack_error=knapsack_error, verbose=False)

    return train.Recipe(name="wasi" if variant == "factored" else f"wasi_{variant}",
                        convert=convert_model, post_update=post_update, lr=lr)
