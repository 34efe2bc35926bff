"""WASI on trees and NNX models: factorise, convert, refresh after each step, export.

* :func:`factorize` (pure tree): the matched ``(in, out)`` kernels become
  ``LowRank(a, b)`` with ``b`` orthonormal (``split=1``) at the smallest rank reaching an
  energy threshold; :func:`orthonormalize` (pure tree) is the factored variant's per-step
  refresh of such kernels.
* :class:`WasiLinear`: a :class:`subspace_jax.nn.Linear` whose call is
  :func:`subspace_jax.wasi.core.wasi_matmul`. Its method state lives on the module as
  :class:`~subspace_jax.nn.SubspaceState` variables (so it sits in the train step's
  ``rest``, is threaded through every step and never differentiated):
  :class:`ActivationBasis` (the previous Tucker factors of its input, refreshed by the
  forward of every training step) and, in the ``master`` variant, :class:`WeightBasis`
  (the ``LowRank`` factors derived from the trained full master kernel).
* :func:`convert` (NNX): calibrate on a sample, pick activation ranks, swap the matched
  Linears for :class:`WasiLinear`; :func:`post_update` (the shared step's hook) refreshes the
  weight factors of both variants; :func:`export` gives a plain factored inference model.

References:
    WASI, arXiv 2510.09160.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from subspace_jax import forms
from subspace_jax import nn as sjnn
from subspace_jax import rules as rules_lib
from subspace_jax.wasi import core

__all__ = ["ActivationBasis", "WeightBasis", "WasiKernel", "WasiLinear", "MLP_PATTERN", "ATTENTION_PATTERN",
           "factorize", "orthonormalize", "convert", "post_update", "export", "summary",
           "LayerPlan"]

#: The paper's default selection: the Linear layers of the MLP blocks.
MLP_PATTERN = r"(.*/)?mlp/[^/]+/kernel"
#: The attention projections (the paper's "all linear layers" variant adds these).
ATTENTION_PATTERN = r"(.*/)?attn/(q|k|v|o)/kernel"
VARIANTS = ("factored", "master")


class ActivationBasis(sjnn.SubspaceState):
    """The previous step's Tucker factors of a :class:`WasiLinear`'s input (a tuple of
    float32 ``(dim_n, r_n)`` matrices), refreshed by every training forward.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import wasi
        >>> basis = wasi.ActivationBasis((jnp.eye(4, 2), jnp.eye(8, 3)))
        >>> [u.shape for u in basis.get_value()]
        [(4, 2), (8, 3)]
    """


class WeightBasis(sjnn.SubspaceState):
    """The ``master`` variant's factors: a ``LowRank(a, b)`` re-derived from the master
    kernel after every step by :func:`subspace_jax.wasi.core.refresh_master`.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import forms, wasi
        >>> wasi.WeightBasis(forms.LowRank(jnp.ones((6, 2)), jnp.eye(2, 4))).get_value().rank
        2
    """


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WasiKernel(forms.LowRank):
    """WASI's factored kernel: a :class:`~subspace_jax.forms.LowRank` ``a @ b`` whose ``b``
    (``(K, out)``) keeps orthonormal rows (WASI's basis ``L^T``; ``a = R^T``).

    Same fields, maths and contract as ``LowRank``; its shape check accepts leaves of any
    rank, because optax maps over parameters (e.g. ``jax.tree.map(jnp.sum, params)`` in
    global-norm clipping) and rebuilds forms with scalar leaves.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import wasi
        >>> k = wasi.WasiKernel.from_dense(jax.random.normal(jax.random.key(0), (6, 4)), rank=2,
        ...                                split=1.0)
        >>> type(k).__name__, bool(jnp.allclose(k.b @ k.b.T, jnp.eye(2), atol=1e-5))
        ('WasiKernel', True)
        >>> jax.tree.map(jnp.sum, k).a.shape   # optax-style maps rebuild it with scalars
        ()
    """

    def __post_init__(self):
        a, b = (getattr(v, "shape", None) for v in (self.a, self.b))
        if a is not None and b is not None and len(a) == len(b) == 2 and a[1] != b[0]:
            raise ValueError(f"WasiKernel needs a (in, rank) and b (rank, out); got a {a} and b {b}")


def _default_rules(rules):
    if rules is None:
        return (rules_lib.Rule(pattern=MLP_PATTERN),)
    return (rules,) if isinstance(rules, rules_lib.Rule) else tuple(rules)


def _check_energy(energy) -> float:
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
        raise ValueError(f"energy (weight eps) must be a float in (0, 1], got {energy!r}")
    return float(energy)


def _factor_kernel(path: str, kernel: Any, energy: float) -> WasiKernel:
    if forms.is_form(kernel):
        raise TypeError(f"kernel is already a {type(kernel).__name__}; materialize it first")
    if getattr(kernel, "ndim", None) != 2:
        raise ValueError(f"WASI converts 2-D (in, out) kernels; {path!r} has shape "
                         f"{tuple(getattr(kernel, 'shape', ()))}")
    return WasiKernel.from_dense(kernel, eps=energy, split=1.0)


def factorize(tree: Any, rules: rules_lib.Rule | Sequence[rules_lib.Rule] | None = None, *,
              energy: float = 0.9) -> Any:
    """WASI's weight side on any tree: matched kernels become :class:`WasiKernel` ``(a, b)``
    (a ``LowRank``), ``b`` orthonormal, at the smallest rank whose squared singular values reach ``energy``.

    Args:
        tree: an ``nnx.State``, a nested dict or linen variables.
        rules: rules selecting kernels (default: the MLP kernels, :data:`MLP_PATTERN`).
        energy: the weight eps in ``(0, 1]``.

    Returns:
        The tree with :class:`~subspace_jax.forms.LowRank` kernels.

    Raises:
        ValueError: energy outside ``(0, 1]``, a rule matching nothing or a non-2-D leaf
            (the message names the path).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import wasi
        >>> params = {"mlp": {"up": {"kernel": jnp.diag(jnp.array([3.0, 2.0, 1.0]))}}}
        >>> k = wasi.factorize(params, energy=0.9)["mlp"]["up"]["kernel"]
        >>> k.rank, bool(jnp.allclose(k.b @ k.b.T, jnp.eye(2)))
        (2, True)

    References:
        WASI, Eqs. 5-7, arXiv 2510.09160.
    """
    energy = _check_energy(energy)
    return rules_lib.apply(tree, _default_rules(rules),
                           lambda path, k, rule: _factor_kernel(path, k, energy))


def orthonormalize(tree: Any, rules: rules_lib.Rule | Sequence[rules_lib.Rule] | None = None
                   ) -> Any:
    """The ``factored`` variant's per-step refresh on any tree: every matched ``LowRank``
    gets an orthonormal ``b`` again with its product unchanged
    (:func:`subspace_jax.wasi.core.refresh_factored`). Jittable.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import forms, wasi
        >>> tree = {"mlp": {"up": {"kernel": forms.LowRank(jnp.ones((3, 1)), 2 * jnp.ones((1, 2)))}}}
        >>> k = wasi.orthonormalize(tree)["mlp"]["up"]["kernel"]
        >>> bool(jnp.allclose(k.b, 0.5 ** 0.5)), bool(jnp.allclose(k.materialize(), 2.0))
        (True, True)
    """

    def one(path, k, rule):
        if not isinstance(k, forms.LowRank):
            raise TypeError(f"expected a LowRank kernel, got {type(k).__name__}")
        return type(k)(*core.refresh_factored(k.a, k.b))

    return rules_lib.apply(tree, _default_rules(rules), one)


class WasiLinear(sjnn.Linear):
    """A :class:`subspace_jax.nn.Linear` computing ``x @ a @ b + bias`` with WASI's backward.

    Built by :func:`convert` (not directly). ``kernel`` is the trained parameter: a
    ``LowRank(a, b)`` (``factored``) or the full master kernel (``master``, whose forward
    reads :class:`WeightBasis`). ``act_basis`` holds the previous Tucker factors of the
    input. Static attributes: ``wasi_variant``, ``wasi_order``, ``wasi_path``.

    The call goes through :func:`subspace_jax.wasi.core.wasi_matmul`: when differentiated
    (a training step) it refreshes ``act_basis`` and keeps only the compressed input for
    backward; otherwise (evaluation, any batch shape) it is two thin matmuls and leaves the
    state as it is.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from subspace_jax import wasi
        >>> mlp = nnx.Dict(mlp=nnx.Dict(up=nnx.Linear(8, 4, rngs=nnx.Rngs(0))))
        >>> x = jax.random.normal(jax.random.key(0), (2, 3, 8))
        >>> new = wasi.convert(mlp, sample=lambda m: m["mlp"]["up"](x), energy=1.0,
        ...                    activation_eps=1.0, verbose=False)
        >>> type(new["mlp"]["up"]).__name__, [u.shape for u in new["mlp"]["up"].act_basis.get_value()]
        ('WasiLinear', [(2, 2), (3, 3), (8, 6)])
    """

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        if out_sharding is not None or self.preferred_element_type is not None:
            raise ValueError(f"WASI layer {self.wasi_path!r}: out_sharding and "
                             "preferred_element_type are not supported")
        kernel = self.kernel.get_value()
        if self.wasi_variant == "master":
            form = self.weight_basis.get_value()
            w, a, b = kernel, jax.lax.stop_gradient(form.a), jax.lax.stop_gradient(form.b)
        else:
            w, a, b = None, kernel.a, kernel.b
        bias = self.bias[...] if self.bias is not None else None
        dtype = self.dtype
        if dtype is None:
            dtype = jnp.result_type(inputs, a, b, *([] if bias is None else [bias]))
        inputs, a, b, bias = self.promote_dtype((inputs, a, b, bias), dtype=dtype)
        cfg = core.OpConfig(variant=self.wasi_variant, order=self.wasi_order,
                            name=self.wasi_path, precision=self.precision,
                            dot_general=self.dot_general,
                            w_dtype=None if w is None else jnp.dtype(w.dtype))
        y, factors = core.wasi_matmul(cfg, inputs, w, a, b, self.act_basis.get_value())
        self.act_basis.set_value(factors)
        if bias is not None:
            y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


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
    options: tuple[core.RankOption, ...] = ()

    @property
    def full_bytes(self) -> int:
        """Analytic float32 bytes of the uncompressed input."""
        return core.activation_bytes(self.act_shape)

    @property
    def compressed_bytes(self) -> int:
        """Analytic float32 bytes of the core and factors."""
        return core.activation_bytes(self.act_shape, self.act_ranks)


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


def _swap(model: nnx.Module, make: Callable[[str, sjnn.Linear], Any], paths: set[str]):
    def fn(path, node):
        key = "/".join(str(k) for k in path)
        if key in paths and isinstance(node, nnx.Linear):
            return make(key, node)
        return node

    return nnx.recursive_map(fn, model)


def _shell(cls, old: nnx.Linear, **attrs):
    shell = nnx.eval_shape(lambda: cls(old.in_features, old.out_features,
                                       use_bias=old.use_bias, rngs=nnx.Rngs(0)))
    for name, value in vars(old).items():
        if not name.startswith("_") and not name.startswith(("wasi_", "act_basis", "weight_basis")):
            setattr(shell, name, value)
    for name, value in attrs.items():
        setattr(shell, name, value)
    return shell


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
    return core.eps_ranks(spectra, float(act_eps))


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
            budget_bytes: int | None = None, eps_grid: Sequence[float] = core.EPS_GRID,
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
    if order not in core.ORDERS:
        raise ValueError(f"order must be one of {core.ORDERS}, got {order!r}")
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
        spectra[path] = core.mode_spectra(x)
        if budget_bytes is None:
            eps = activation_eps if activation_ranks is None else None
            ranks = _choose_ranks(path, x, spectra[path],
                                  act_eps=0.4 if eps is None and activation_ranks is None
                                  else eps, act_ranks=activation_ranks)
            options = ()
        else:
            options = tuple(core.rank_options(x, gs[path], eps_grid, spectra=spectra[path]))
            eps, ranks = None, None
        plans[path] = LayerPlan(path, tuple(kernel.shape), 0, tuple(x.shape), ranks, eps, options)
    if budget_bytes is not None:
        picks = core.knapsack([p.options for p in plans.values()], budget_bytes)
        plans = {path: dataclasses.replace(p, act_ranks=p.options[j].ranks, eps=p.options[j].eps)
                 for (path, p), j in zip(plans.items(), picks)}

    def make(path, old):
        plan = plans[path]
        _check_ranks(path, plan.act_shape, plan.act_ranks)
        low = _factor_kernel(path, old.kernel.get_value(), energy)
        plans[path] = dataclasses.replace(plan, rank=low.rank)
        factors = core.truncate(xs[path], spectra[path], plan.act_ranks).factors
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


def post_update(params: Any, rest: Any) -> tuple[Any, Any]:
    """The shared train step's ``post_update`` for WASI models (both variants); jittable.

    Finds the WASI layers by their state in ``rest``: a layer with a :class:`WeightBasis`
    (``master``) gets its factors re-derived from its trained master kernel by one
    warm-started subspace-iteration step; any other layer with an :class:`ActivationBasis`
    and a ``LowRank`` kernel (``factored``) gets its basis re-orthonormalised, product kept.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from subspace_jax import train, wasi
        >>> model = nnx.Dict(mlp=nnx.Dict(up=nnx.Linear(8, 4, rngs=nnx.Rngs(0))))
        >>> x = jax.random.normal(jax.random.key(0), (2, 3, 8))
        >>> model = wasi.convert(model, sample=lambda m: m["mlp"]["up"](x), verbose=False)
        >>> _, params, rest = train.split_model(model)
        >>> p2, r2 = wasi.post_update(params, rest)
        >>> k = p2["mlp"]["up"]["kernel"].get_value()
        >>> bool(jnp.allclose(k.b @ k.b.T, jnp.eye(k.rank), atol=1e-5))
        True
    """
    state_paths, _ = rules_lib.leaf_paths(rest)
    master, factored = {}, set()
    for path, leaf in state_paths:
        module, _, name = path.rpartition("/")
        if isinstance(leaf, WeightBasis):
            master[module + "/kernel"] = path
        elif isinstance(leaf, ActivationBasis):
            factored.add(module + "/kernel")
    kernels = dict(rules_lib.leaf_paths(params)[0])
    new_bases = {}
    for kpath, spath in master.items():
        form = dict(state_paths)[spath].get_value()
        a, b = core.refresh_master(rules_lib._unwrap(kernels[kpath]), form.b)
        new_bases[spath] = WasiKernel(a, b)

    def refresh_kernel(path, value):
        if path in factored and path not in master and isinstance(value, forms.LowRank):
            return type(value)(*core.refresh_factored(value.a, value.b))
        return value

    params = rules_lib.map_with_path(refresh_kernel, params)
    rest = rules_lib.map_with_path(lambda p, v: new_bases.get(p, v), rest)
    return params, rest


def export(model: nnx.Module) -> nnx.Module:
    """A plain factored inference model: each :class:`WasiLinear` becomes a
    :class:`subspace_jax.nn.Linear` with a ``LowRank`` kernel (two thin matmuls, no dense
    kernel, no method state); saves and loads with :mod:`subspace_jax.checkpoint`.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from subspace_jax import wasi
        >>> model = nnx.Dict(mlp=nnx.Dict(up=nnx.Linear(8, 4, rngs=nnx.Rngs(0))))
        >>> x = jax.random.normal(jax.random.key(0), (2, 3, 8))
        >>> conv = wasi.convert(model, sample=lambda m: m["mlp"]["up"](x), verbose=False,
        ...                     variant="master")
        >>> plain = wasi.export(conv)
        >>> type(plain["mlp"]["up"].kernel.get_value()).__name__
        'LowRank'
        >>> bool(jnp.allclose(plain["mlp"]["up"](x), conv["mlp"]["up"](x), atol=1e-5))
        True
    """

    def fn(path, node):
        if not isinstance(node, WasiLinear):
            return node
        if node.wasi_variant == "master":
            form = node.weight_basis.get_value()
            dtype = node.kernel.get_value().dtype
            form = WasiKernel(form.a.astype(dtype), form.b.astype(dtype))
        else:
            form = node.kernel.get_value()
        plain = _shell(sjnn.Linear, node)
        plain.kernel = nnx.Param(form)
        return plain

    out = nnx.recursive_map(fn, nnx.clone(model))
    if hasattr(out, "wasi_plans"):
        del out.wasi_plans
    return out
