"""NSN training: learnable per-rank log-variances, anchor plus one sampled rank, a curriculum.

Each step computes the task loss twice on the same batch: at the anchor rank (the top of
the grid, ``R``) and at one variant rank drawn from the grid, and minimises

    L = exp(-s_R) CE_R + s_R + exp(-s_r) CE_r + s_r

(Kendall et al.'s uncertainty weighting), where ``s_k = log σ_k²`` is one learnable scalar
per rank of a fixed grid, indexed by the rank itself (not by its slot in the step). At a
fixed loss the optimum is ``s_k = log CE_k``, a weight ``1 / CE_k``: each rank's gradient
becomes ``∇ log CE_k``, so ranks with large losses do not drown the others.

The variant is uniform over a window of the grid that a curriculum widens toward low
ranks: only the highest variant at step 0, the whole grid after ``curriculum_steps``.
The rank is a traced int32 (it masks components, :class:`~subspace_jax.nested.NestedLinear`),
so one compiled step serves every sampled rank, and the parameter tree (hence the
optimizer state) never changes; the price is that the variant pass computes the full
width whatever its rank (a step costs two full-rank passes, forward and backward). The state lives on the model: an :class:`Objective`
module holding the ``s_k`` (an ``nnx.Param``, so the optimizer really updates them) and a
step counter (method state, threaded by :func:`subspace_jax.train.make_train_step`).

References:
    NSN, arXiv 2509.17874 (Sec. 2.2). Kendall, Gal and Cipolla, "Multi-task learning using
    uncertainty to weigh losses", CVPR 2018, arXiv 1705.07115.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from subspace_jax import nn, rules as rules_lib
from subspace_jax.nested import core
from subspace_jax.nested.layer import layers

__all__ = ["LogVariance", "ObjectiveStep", "Objective", "OBJECTIVE", "attach", "objective_of",
           "loss", "optimizer"]

#: The attribute under which :func:`attach` puts the :class:`Objective` on a model.
OBJECTIVE = "nsn"


class LogVariance(nnx.Param):
    """The learnable log-variances ``s_k``, one per rank of the grid (a trained parameter).

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax.nested import LogVariance
        >>> LogVariance(jnp.zeros(3)).shape
        (3,)
    """


class ObjectiveStep(nn.SubspaceState):
    """Steps taken by the objective (int32; drives the curriculum). Not trained.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax.nested import ObjectiveStep
        >>> int(ObjectiveStep(jnp.int32(0))[...])
        0
    """


class Objective(nnx.Module):
    """The NSN training state: rank grid (static), ``s_k`` (trained), step (method state).

    Args:
        grid: increasing global ranks ending at the anchor (the maximum rank).
        curriculum_steps: steps over which the variant window widens to the whole grid
            (0: whole grid from the start).

    Examples:
        >>> import jax
        >>> from subspace_jax.nested import Objective
        >>> obj = Objective((4, 8, 16), curriculum_steps=0)
        >>> obj.log_var.shape, obj.anchor
        ((3,), 16)
        >>> index, rank = obj.sample(jax.random.key(0))
        >>> int(rank) in (4, 8)
        True
    """

    def __init__(self, grid: Sequence[int], *, curriculum_steps: int = 0):
        self.grid = core.check_grid(grid, max(grid) if len(grid) else 1)
        if not isinstance(curriculum_steps, int) or curriculum_steps < 0:
            raise ValueError(f"Objective: curriculum_steps={curriculum_steps!r} must be an "
                             "int >= 0")
        self.curriculum_steps = curriculum_steps
        self.log_var = LogVariance(jnp.zeros(len(self.grid), jnp.float32))
        self.step = ObjectiveStep(jnp.zeros((), jnp.int32))

    @property
    def anchor(self) -> int:
        """The anchor rank, the top of the grid."""
        return self.grid[-1]

    def sample(self, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(grid index, rank)`` of this step's variant, uniform over the curriculum window."""
        variants = len(self.grid) - 1
        if variants == 0:
            return jnp.zeros((), jnp.int32), jnp.asarray(self.anchor, jnp.int32)
        low = core.window_low(self.step[...], variants, self.curriculum_steps)
        index = jax.random.randint(key, (), low, variants, dtype=jnp.int32)
        return index, jnp.asarray(self.grid, jnp.int32)[index]

    def weigh(self, ce: jax.Array, index: jax.Array | int) -> jax.Array:
        """``exp(-s_k) ce + s_k`` for grid index ``index``."""
        s = self.log_var[...][index]
        return jnp.exp(-s) * ce.astype(jnp.float32) + s


def objective_of(model: nnx.Module) -> Objective:
    """The :class:`Objective` attached to ``model`` (see :func:`attach`).

    Examples:
        >>> from flax import nnx
        >>> from subspace_jax import nested
        >>> objective_of(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
        Traceback (most recent call last):
        ...
        ValueError: no nested.Objective on Linear: call nested.attach(model) first
    """
    found = [m for _, m in nnx.iter_graph(model) if isinstance(m, Objective)]
    if len(found) != 1:
        raise ValueError(f"{'no' if not found else len(found)} nested.Objective on "
                         f"{type(model).__name__}: call nested.attach(model) first")
    return found[0]


def attach(model: nnx.Module, grid: Sequence[int] | None = None, *,
           curriculum_steps: int = 0) -> nnx.Module:
    """Put an :class:`Objective` on a converted model (in place, as ``model.nsn``); return it.

    Args:
        model: a model from :func:`subspace_jax.nested.convert`.
        grid: training ranks, increasing, ending at the anchor (default:
            :func:`~subspace_jax.nested.core.rank_grid` of the largest ``R``).
        curriculum_steps: see :class:`Objective`.

    Raises:
        ValueError: no nested layer, or a grid not ending at the largest ``R``.

    Examples:
        >>> from flax import nnx
        >>> from subspace_jax import nested
        >>> model = nested.convert(nnx.Sequential(nnx.Linear(8, 64, rngs=nnx.Rngs(0))),
        ...                        nested.NestedRule(pattern=".*kernel"))
        >>> nested.attach(model).nsn.grid
        (1, 2, 3, 4, 5, 6, 7, 8)
    """
    found = layers(model)
    if not found:
        raise ValueError("attach: the model has no nested layer; call nested.convert first")
    top = max(m.kernel.get_value().max_rank for _, m in found)
    grid = core.rank_grid(top) if grid is None else core.check_grid(grid, top)
    setattr(model, OBJECTIVE, Objective(grid, curriculum_steps=curriculum_steps))
    return model


def _set_traced_rank(found: list, rank: jax.Array) -> None:
    for _, layer in found:
        layer.rank.set_value(jnp.minimum(rank, layer.kernel.get_value().max_rank).astype(jnp.int32))


def _task(out: Any) -> jax.Array:
    return out[0] if isinstance(out, tuple) else out


def loss(task_loss: Callable[[nnx.Module, Any, jax.Array], Any]) -> Callable:
    """The NSN loss ``loss_fn(model, batch, key)`` for :func:`subspace_jax.train.make_train_step`.

    Runs ``task_loss(model, batch, key)`` at the anchor rank and at one variant rank (same
    batch, same dropout key), weighs both by the learned log-variances, restores the anchor
    rank and advances the step counter.

    Args:
        task_loss: ``task_loss(model, batch, key) -> scalar`` (or ``(scalar, aux)``; the
            aux is dropped), e.g. :func:`subspace_jax.baselines.classifier_loss`.

    Returns:
        ``loss_fn`` returning ``(loss, aux)`` with ``ce_anchor``, ``ce_variant``,
        ``variant_rank``, ``s_anchor`` and ``s_variant``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from subspace_jax import nested
        >>> model = nested.attach(nested.convert(
        ...     nnx.Sequential(nnx.Linear(8, 64, rngs=nnx.Rngs(0))),
        ...     nested.NestedRule(pattern=".*kernel")))
        >>> mse = lambda m, batch, key: jnp.mean((m(batch) - 1.0) ** 2)
        >>> value, aux = nested.loss(mse)(model, jnp.ones((4, 8)), jax.random.key(0))
        >>> sorted(aux), int(model.nsn.step[...])
        (['ce_anchor', 'ce_variant', 's_anchor', 's_variant', 'variant_rank'], 1)
    """

    def loss_fn(model: nnx.Module, batch: Any, key: jax.Array):
        objective, found = objective_of(model), layers(model)
        for path, layer in found:
            if layer.width < min(objective.anchor, layer.kernel.get_value().max_rank):
                raise ValueError(f"nested.loss: {path!r} computes only {layer.width} components;"
                                 " train at full width (nested.set_rank(model, R))")
        sample_key, task_key = jax.random.split(key)
        index, rank = objective.sample(sample_key)
        top = len(objective.grid) - 1
        _set_traced_rank(found, jnp.asarray(objective.anchor, jnp.int32))
        ce_anchor = _task(task_loss(model, batch, task_key))
        _set_traced_rank(found, rank)
        ce_variant = _task(task_loss(model, batch, task_key))
        _set_traced_rank(found, jnp.asarray(objective.anchor, jnp.int32))
        objective.step.set_value(objective.step[...] + 1)
        total = objective.weigh(ce_anchor, top) + objective.weigh(ce_variant, index)
        s = objective.log_var[...]
        return total, {"ce_anchor": ce_anchor, "ce_variant": ce_variant, "variant_rank": rank,
                       "s_anchor": s[top], "s_variant": s[index]}

    return loss_fn


def _is_log_var(path: str) -> bool:
    return rules_lib.Rule(pattern=rf"(.*/)?{OBJECTIVE}/log_var(/value)?").matches(path)


def optimizer(tx: optax.GradientTransformation, *, log_var_lr: float = 1e-2,
              ) -> optax.GradientTransformation:
    """``tx`` for the model, plain Adam at ``log_var_lr`` for the log-variances ``s_k``.

    The ``s_k`` move on the scale of ``log CE`` (order 1): at a fine-tuning learning rate
    (5e-5) they would stay near 0 for a whole run. They get their own Adam, without weight
    decay or clipping, and ``tx`` (with its schedule and gradient clipping) sees the rest.

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> from subspace_jax import nested, train
        >>> tx = nested.optimizer(optax.sgd(0.1), log_var_lr=0.5)
        >>> params = {"w": jnp.ones(2), "nsn": {"log_var": jnp.zeros(3)}}
        >>> state = train.init_optimizer(tx, params)
        >>> grads = {"w": jnp.ones(2), "nsn": {"log_var": jnp.ones(3)}}
        >>> with jax.numpy_dtype_promotion(train.OPTIMIZER_PROMOTION):
        ...     updates, _ = tx.update(grads, state, params)
        >>> [round(float(u), 4) for u in (updates["w"][0], updates["nsn"]["log_var"][0])]
        [-0.1, -0.5]
    """
    if not log_var_lr > 0:
        raise ValueError(f"optimizer: log_var_lr={log_var_lr!r} must be > 0")

    def labels(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda kp, _: "log_var" if _is_log_var(rules_lib.keypath_str(kp)) else "model",
            params)

    return optax.partition({"model": tx, "log_var": optax.adam(log_var_lr)}, labels)
