"""WASI conversion of NNX models: calibrate on a sample, choose activation ranks, swap the
selected Linears for :class:`~subspace_jax.wasi.layers.WasiLinear`, print the rank table.

References:
    WASI, Sec. 3 and App. A.2, arXiv 2510.09160.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx

from subspace_jax import forms
from subspace_jax import nn as sjnn
from subspace_jax import rules as rules_lib
from subspace_jax.wasi import calibration
from subspace_jax.wasi import core as core_lib
from subspace_jax.wasi.layers import (VARIANTS, ActivationBasis, WasiKernel, WasiLinear,
                                      WeightBasis, _check_energy, _default_rules,
                                      _factor_kernel, _shell, _swap)

__all__ = ["LayerPlan", "convert", "summary"]


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What :func:`convert` decided for one layer: ``path``, kernel ``shape`` (in, out),
    weight ``rank`` K, activation ``act_shape`` and ``act_ranks``, the calibration
    ``options`` (empty unless a budget was used) and the chosen ``eps``."""

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


class _Probe(nnx.Variable):
    pass


class _Captured(nnx.Variable):
    pass


class _Recorder(sjnn.Linear):
    """Sows its input (first pass) or adds a zero probe to its output (gradient pass)."""

    def __call__(self, inputs, out_sharding=None):
        y = super().__call__(inputs, out_sharding=out_sharding)
        if self.probe is not None:
            return y + self.probe[...].astype(y.dtype)
        self.captured.set_value(inputs)
        return y


def _module_path(kernel_path: str) -> str:
    if not kernel_path.endswith("kernel"):
        raise ValueError(f"WASI rules select kernels ('.../kernel'); {kernel_path!r} is not one")
    return kernel_path[: -len("kernel")].rstrip("/")


def _capture(model, targets, sample, need_grads):
    """Inputs (and, with ``need_grads``, output gradients) of the target Linears on the
    calibration sample; both passes are jitted."""
    rec = _swap(nnx.clone(model), lambda p, old: _shell(
        _Recorder, old, probe=None, captured=_Captured(jnp.zeros((0,)))), targets)

    @nnx.jit
    def forward(m):
        sample(m)
        return nnx.state(m, _Captured)

    xs = {path.rsplit("/", 1)[0]: leaf.get_value()
          for path, leaf in rules_lib.leaf_paths(forward(rec))[0]}
    xs = {path: x for path, x in xs.items() if x.size}
    missing = sorted(targets - set(xs))
    if missing:
        raise ValueError(f"WASI calibration: sample() never called the layers {missing}")
    grads = {}
    if need_grads:
        by_path = dict(nnx.iter_graph(rec))
        for path, x in xs.items():
            module = by_path[tuple(int(k) if k.isdigit() else k for k in path.split("/"))]
            module.probe = nnx.data(_Probe(jnp.zeros(x.shape[:-1] + (module.out_features,),
                                                     jnp.float32)))

        @nnx.jit
        def backward(m):
            return nnx.grad(lambda m: jnp.sum(jnp.asarray(sample(m))),
                            argnums=nnx.DiffState(0, _Probe))(m)

        grads = {path.rsplit("/", 1)[0]: leaf.get_value()
                 for path, leaf in rules_lib.leaf_paths(backward(rec))[0]}
    return xs, grads


def _choose_ranks(path, x, spectra, *, act_eps, act_ranks):
    shape = tuple(x.shape)
    if act_ranks is not None:
        ranks = act_ranks.get(path) if isinstance(act_ranks, Mapping) else act_ranks
        ranks = tuple(ranks)
        if len(ranks) != len(shape):
            raise ValueError(f"WASI layer {path!r}: {len(ranks)} activation ranks for a "
                             f"{len(shape)}-D input of shape {shape}")
        return ranks
    if isinstance(act_eps, bool) or not isinstance(act_eps, (int, float)) or not 0 < act_eps <= 1:
        raise ValueError(f"WASI layer {path!r}: activation_eps must be in (0, 1], got {act_eps!r}")
    return calibration.eps_ranks(spectra, float(act_eps))


def _check_ranks(path, shape, ranks):
    total = 1
    for d in shape:
        total *= d
    for n, (d, r) in enumerate(zip(shape, ranks)):
        cap = min(d, total // d)
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= cap:
            raise ValueError(f"WASI layer {path!r}: activation rank {r!r} of mode {n} must be "
                             f"an int in [1, {cap}] (the mode's size {d}, capped by the product "
                             f"of the other modes) for an input of shape {shape}")


def convert(model: nnx.Module, rules: rules_lib.Rule | Sequence[rules_lib.Rule] | None = None,
            energy: float = 0.9, *, sample: Callable[[nnx.Module], Any],
            activation_eps: float | None = None,
            activation_ranks: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
            budget_bytes: int | None = None, eps_grid: Sequence[float] = calibration.EPS_GRID,
            variant: str = "factored", order: str = "auto", verbose: bool = True,
            ) -> nnx.Module:
    """Convert an NNX model for WASI fine-tuning; returns a new model.

    Every Linear whose kernel path a rule matches becomes a :class:`WasiLinear`: its kernel is
    factored at the smallest rank K reaching ``energy`` (fixed afterwards), and its input is
    kept for backward as a Tucker tensor at fixed per-mode ranks. ``sample(model)`` runs the
    model on a calibration batch whose shapes training must keep (batch size and length):
    the input of each layer gives its activation shape, ranks and initial factors (exact
    HOSVD). Activation ranks come, in order of precedence, from ``activation_ranks``, from
    ``budget_bytes`` (the paper's calibration: an exact HOSVD per eps of ``eps_grid``, each
    option's memory and weight-gradient error, then a knapsack under the budget; then
    ``sample`` must return a scalar loss), or from one ``activation_eps`` (default 0.4, the
    per-layer minimum-memory option that the paper's scripts end up with).

    Train with :func:`subspace_jax.train.make_train_step` and ``post_update=post_update``.

    Args:
        model: any NNX model (its ``nnx.Linear`` modules are adopted first).
        rules: rules selecting kernels (default :data:`MLP_PATTERN`; add
            :data:`ATTENTION_PATTERN` for the attention projections).
        energy: the weight eps in ``(0, 1]``.
        sample: ``sample(model) -> outputs or loss`` on the calibration batch.
        activation_eps: one activation eps in ``(0, 1]`` for every layer.
        activation_ranks: ranks for every layer, or a dict from module path to ranks.
        budget_bytes: total compressed-activation budget for the knapsack.
        eps_grid: the calibration grid.
        variant: ``"factored"`` (only the factors are parameters; default) or ``"master"``
            (a full master kernel trains; the factors follow it, as in the paper's code).
        order: weight-gradient contraction order (``"auto"``, ``"paper"``, ``"project"``).
        verbose: print :func:`summary`.

    Returns:
        The converted model (the input is not modified).

    Raises:
        ValueError: energy or activation eps outside ``(0, 1]``, an activation rank above its
            mode's size, a rule matching nothing or a non-2-D kernel, an unknown variant;
            messages name the layer.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from subspace_jax import wasi
        >>> model = nnx.Dict(mlp=nnx.Dict(up=nnx.Linear(8, 4, rngs=nnx.Rngs(0))))
        >>> x = jax.random.normal(jax.random.key(0), (2, 3, 8))
        >>> new = wasi.convert(model, sample=lambda m: m["mlp"]["up"](x), energy=2.0)
        Traceback (most recent call last):
        ...
        ValueError: energy (weight eps) must be a float in (0, 1], got 2.0

    References:
        WASI, Sec. 3 and App. A.2, arXiv 2510.09160.
    """
    energy = _check_energy(energy)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if order not in core_lib.ORDERS:
        raise ValueError(f"order must be one of {core_lib.ORDERS}, got {order!r}")
    model = sjnn.adopt(model)
    _, params = nnx.split(model, nnx.Param)
    kernels = {}

    def pick(path, kernel, rule):
        if forms.is_form(kernel) or getattr(kernel, "ndim", None) != 2:
            raise ValueError(f"WASI converts 2-D (in, out) kernels, got "
                             f"{type(kernel).__name__} of shape {tuple(jnp.shape(kernel))}")
        kernels[_module_path(path)] = kernel
        return kernel

    rules_lib.apply(params, _default_rules(rules), pick)
    xs, gs = _capture(model, set(kernels), sample, need_grads=budget_bytes is not None)
    plans, spectra = {}, {}
    for path, kernel in kernels.items():
        x = xs[path]
        spectra[path] = calibration.mode_spectra(x)
        if budget_bytes is None:
            eps = activation_eps if activation_ranks is None else None
            ranks = _choose_ranks(path, x, spectra[path],
                                  act_eps=0.4 if eps is None and activation_ranks is None
                                  else eps, act_ranks=activation_ranks)
            options = ()
        else:
            options = tuple(calibration.rank_options(x, gs[path], eps_grid, spectra=spectra[path]))
            eps, ranks = None, None
        plans[path] = LayerPlan(path, tuple(kernel.shape), 0, tuple(x.shape), ranks, eps, options)
    if budget_bytes is not None:
        picks = calibration.knapsack([p.options for p in plans.values()], budget_bytes)
        plans = {path: dataclasses.replace(p, act_ranks=p.options[j].ranks, eps=p.options[j].eps)
                 for (path, p), j in zip(plans.items(), picks)}

    def make(path, old):
        plan = plans[path]
        _check_ranks(path, plan.act_shape, plan.act_ranks)
        low = _factor_kernel(path, old.kernel.get_value(), energy)
        plans[path] = dataclasses.replace(plan, rank=low.rank)
        factors = calibration.truncate(xs[path], spectra[path], plan.act_ranks).factors
        attrs = dict(wasi_variant=variant, wasi_order=order, wasi_path=path,
                     act_basis=ActivationBasis(tuple(factors)))
        new = _shell(WasiLinear, old, **attrs)
        if variant == "factored":
            new.kernel = nnx.Param(low.__class__(a=low.a, b=low.b))
        else:
            f32 = WasiKernel(jnp.asarray(low.a, jnp.float32), jnp.asarray(low.b, jnp.float32))
            new.weight_basis = WeightBasis(f32)
        return new

    out = _swap(model, make, set(kernels))
    out.wasi_plans = tuple(plans.values())  # static metadata for summary()
    if verbose:
        print(summary(out))
    return out


def summary(model: nnx.Module) -> str:
    """The per-layer table of a converted model: kernel shape, weight rank K, activation
    shape and ranks, analytic activation bytes (full and compressed) and their ratio.

    Examples:
        >>> import jax
        >>> from flax import nnx
        >>> from subspace_jax import wasi
        >>> model = nnx.Dict(mlp=nnx.Dict(up=nnx.Linear(8, 4, rngs=nnx.Rngs(0))))
        >>> x = jax.random.normal(jax.random.key(0), (2, 3, 8))
        >>> print(wasi.summary(wasi.convert(model, sample=lambda m: m["mlp"]["up"](x),
        ...                                 activation_ranks=(1, 2, 2), verbose=False)))
        ... # doctest: +NORMALIZE_WHITESPACE
        layer   in x out  K  activation  ranks      full B  kept B  ratio
        mlp/up  8 x 4     3  (2, 3, 8)   (1, 2, 2)  192     112     1.7x
        total                                       192     112     1.7x
    """
    plans = getattr(model, "wasi_plans", ())
    rows = [("layer", "in x out", "K", "activation", "ranks", "full B", "kept B", "ratio")]
    for p in plans:
        rows.append((p.path, f"{p.shape[0]} x {p.shape[1]}", str(p.rank), str(p.act_shape),
                     str(p.act_ranks), str(p.full_bytes), str(p.compressed_bytes),
                     f"{p.full_bytes / p.compressed_bytes:.1f}x"))
    full, kept = sum(p.full_bytes for p in plans), sum(p.compressed_bytes for p in plans)
    rows.append(("total", "", "", "", "", str(full), str(kept), f"{full / max(kept, 1):.1f}x"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


