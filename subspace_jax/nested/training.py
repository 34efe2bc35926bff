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
The rank is set on the tree as the forms' traced int32 (``set_rank(static=False)``), so
one compiled step serves every sampled rank, and the parameter tree (hence the optimizer
state) never changes; the price is that the variant pass computes the full width whatever
its rank (a step costs two full-rank passes, forward and backward).

The method's state is returned, never attached to the model: :func:`objective` gives an
:class:`Objective` (the ``s_k``, trained, and a step counter, an int that never trains)
that lives beside the model's parameters, ``{"model": params, "nsn": objective}``; the
loss of :func:`loss` takes that dict, :func:`advance` (the step's ``post_update``) counts
the steps, and :func:`optimizer` gives the ``s_k`` their own learning rate. The same three
serve an NNX model (``graphdef=``) and any other Flax model (linen, Hugging Face) through
``train.make_train_step(None, ...)``.

Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import flax.linen as nn
    >>> from subspace_jax import nested, train
    >>> model = nn.Sequential([nn.Dense(32, name="up"), nn.Dense(8, name="down")])
    >>> x = jax.random.normal(jax.random.key(0), (4, 8))
    >>> params = model.init(jax.random.key(1), x)["params"]
    >>> tree = nested.transform(params, nested.NestedRule(pattern=".*kernel"))
    >>> state = {"model": tree, "nsn": nested.objective(tree, (2, 4, 8))}
    >>> mse = lambda p, batch, key: jnp.mean((model.apply({"params": p}, batch) - 1.0) ** 2)
    >>> tx = nested.optimizer(optax.adam(1e-3))
    >>> step = train.make_train_step(None, nested.loss(mse), tx, post_update=nested.advance)
    >>> state, _, _, metrics = step(state, train.init_optimizer(tx, state), {}, x,
    ...                             jax.random.key(2))
    >>> int(state["nsn"].step), int(metrics["variant_rank"]) in (2, 4)
    (1, True)

References:
    NSN, arXiv 2509.17874 (Sec. 2.2). Kendall, Gal and Cipolla, "Multi-task learning using
    uncertainty to weigh losses", CVPR 2018, arXiv 1705.07115.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from subspace_jax import rules as rules_lib
from subspace_jax.nested import core
from subspace_jax.nested.layer import _map_forms, kernels

__all__ = ["OBJECTIVE", "MODEL", "Objective", "objective", "loss", "advance", "optimizer",
           "at_traced_rank", "recipe"]

#: The key of the :class:`Objective` in the training dict ``{MODEL: params, OBJECTIVE: obj}``.
OBJECTIVE = "nsn"
#: The key of the model's parameter tree in the training dict.
MODEL = "model"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Objective:
    """The NSN objective's own state: ``s_k`` (trained), a step counter, the grid (static).

    Build it with :func:`objective`. A registered pytree: ``log_var`` is a float32 leaf that
    the optimizer updates, ``step`` an int32 leaf that never trains
    (:func:`subspace_jax.train.trainable_mask`) and that :func:`advance` counts.

    Attributes:
        log_var: ``(len(grid),)`` float32, the log-variances ``s_k``, one per grid rank.
        step: int32 scalar, steps taken (drives the curriculum).
        grid: increasing global ranks ending at the anchor (the maximum rank); static.
        curriculum_steps: steps over which the variant window widens to the whole grid
            (0: whole grid from the start); static.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax.nested import Objective
        >>> obj = Objective(jnp.zeros(3), jnp.int32(0), grid=(4, 8, 16))
        >>> obj.log_var.shape, obj.anchor
        ((3,), 16)
        >>> index, rank = obj.sample(jax.random.key(0))
        >>> int(rank) in (4, 8), int(obj.advance().step)
        (True, 1)
    """

    log_var: Any
    step: Any
    grid: tuple[int, ...] = dataclasses.field(default=(1,), metadata=dict(static=True))
    curriculum_steps: int = dataclasses.field(default=0, metadata=dict(static=True))

    def __post_init__(self):
        # Static fields only: tree maps rebuild this with other leaves (None, bools).
        object.__setattr__(self, "grid", core.check_grid(
            tuple(self.grid), max(self.grid) if len(self.grid) else 1))
        if isinstance(self.curriculum_steps, bool) or not isinstance(
                self.curriculum_steps, int) or self.curriculum_steps < 0:
            raise ValueError(f"Objective: curriculum_steps={self.curriculum_steps!r} must be "
                             "an int >= 0")

    @property
    def anchor(self) -> int:
        """The anchor rank, the top of the grid."""
        return self.grid[-1]

    def sample(self, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(grid index, rank)`` of this step's variant, uniform over the curriculum window."""
        variants = len(self.grid) - 1
        if variants == 0:
            return jnp.zeros((), jnp.int32), jnp.asarray(self.anchor, jnp.int32)
        low = core.window_low(jnp.asarray(self.step, jnp.int32), variants,
                              self.curriculum_steps)
        index = jax.random.randint(key, (), low, variants, dtype=jnp.int32)
        return index, jnp.asarray(self.grid, jnp.int32)[index]

    def weigh(self, ce: jax.Array, index: jax.Array | int) -> jax.Array:
        """``exp(-s_k) ce + s_k`` for grid index ``index``."""
        s = self.log_var[index]
        return jnp.exp(-s) * ce.astype(jnp.float32) + s

    def advance(self) -> Objective:
        """This state one step later."""
        return dataclasses.replace(self, step=jnp.asarray(self.step, jnp.int32) + 1)


def objective(target: Any, grid: Sequence[int] | None = None, *,
              curriculum_steps: int = 0) -> Objective:
    """A fresh :class:`Objective` for a converted tree or model (``s_k = 0``, step 0).

    Put it beside the model's parameters, ``{"model": params, "nsn": objective}``, the
    dict that :func:`loss`, :func:`advance` and :func:`optimizer` take.

    Args:
        target: a tree with :class:`~subspace_jax.nested.Nested` forms, or an NNX model
            from :func:`~subspace_jax.nested.convert` (only read, for the largest ``R``).
        grid: training ranks, increasing, ending at the anchor (default:
            :func:`~subspace_jax.nested.core.rank_grid` of the largest ``R``).
        curriculum_steps: see :class:`Objective`.

    Raises:
        ValueError: no nested form, or a grid not ending at the largest ``R``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import nested
        >>> tree = nested.transform({"mlp": {"up": {"kernel": jnp.ones((8, 64))}}})
        >>> nested.objective(tree).grid
        (1, 2, 3, 4, 5, 6, 7, 8)
        >>> nested.objective(tree, (2, 4))
        Traceback (most recent call last):
        ...
        ValueError: rank grid (2, 4) must be increasing ints in [1, 8] ending at the anchor 8
    """
    found = kernels(target)
    if not found:
        raise ValueError("objective: no Nested form found; call nested.transform (or "
                         "nested.convert) first")
    top = max(k.max_rank for k in found.values())
    grid = core.rank_grid(top) if grid is None else core.check_grid(grid, top)
    return Objective(jnp.zeros(len(grid), jnp.float32), jnp.zeros((), jnp.int32), grid=grid,
                     curriculum_steps=curriculum_steps)


def _task(out: Any) -> jax.Array:
    return out[0] if isinstance(out, tuple) else out


def _split(params: Any) -> tuple[Any, Objective]:
    if not isinstance(params, Mapping) or MODEL not in params or OBJECTIVE not in params \
            or not isinstance(params[OBJECTIVE], Objective):
        got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
        raise TypeError(f"nested.loss takes {{{MODEL!r}: params, {OBJECTIVE!r}: "
                        f"nested.objective(...)}}, got {got}")
    return params[MODEL], params[OBJECTIVE]


def at_traced_rank(tree: Any, rank: jax.Array) -> Any:
    """``tree`` with every form's traced rank set to ``min(rank, R)`` (``rank`` may be traced).

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import nested
        >>> tree = nested.transform({"mlp": {"up": {"kernel": jnp.ones((8, 4))}}})
        >>> nested.ranks(nested.at_traced_rank(tree, jnp.int32(9)))
        {'mlp/up': 4}
    """
    return _map_forms(tree, lambda p, k: k.at(jnp.minimum(rank, k.max_rank)))


def loss(task_loss: Callable[[Any, Any, jax.Array], Any], *, graphdef: Any = None,
         rest: Any = None) -> Callable:
    """The NSN loss ``loss_fn(params, batch, key)`` for ``train.make_train_step(None, ...)``.

    ``params`` is ``{"model": tree, "nsn": objective}``. Runs ``task_loss`` at the anchor
    rank and at one variant rank sampled from the objective (same batch, same dropout key;
    the ranks are set on the tree with ``set_rank(static=False)``, traced) and weighs both
    by the learned log-variances. Use :func:`advance` as the step's ``post_update`` to
    count steps (the curriculum reads the count).

    Args:
        task_loss: ``task_loss(tree, batch, key) -> scalar`` (or ``(scalar, aux)``; the aux
            is dropped), e.g. ``lambda p, b, k: ce(model.apply({"params": p}, b["x"]), ...)``;
            with ``graphdef``, ``task_loss(model, batch, key)`` on the merged NNX model
            (e.g. a classifier's cross-entropy on the batch).
        graphdef: an NNX model's graph (:func:`subspace_jax.train.split_model`): the tree
            is merged with it (and ``rest``) before ``task_loss``.
        rest: the NNX model's non-parameter state, read (not updated) at each merge (a
            copy is kept; the train step's own ``rest`` argument passes through untouched).

    Returns:
        ``loss_fn`` returning ``(loss, aux)`` with ``ce_anchor``, ``ce_variant``,
        ``variant_rank``, ``s_anchor`` and ``s_variant``.

    Raises:
        TypeError: ``params`` is not that dict.
        ValueError: a form computes fewer components than the anchor needs.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from subspace_jax import nested, train
        >>> model = nested.convert(nnx.Sequential(nnx.Linear(8, 64, rngs=nnx.Rngs(0))),
        ...                        nested.NestedRule(pattern=".*kernel"))
        >>> graphdef, params, rest = train.split_model(model)
        >>> state = {"model": params, "nsn": nested.objective(params)}
        >>> mse = lambda m, batch, key: jnp.mean((m(batch) - 1.0) ** 2)
        >>> value, aux = nested.loss(mse, graphdef=graphdef, rest=rest)(
        ...     state, jnp.ones((4, 8)), jax.random.key(0))
        >>> sorted(aux)
        ['ce_anchor', 'ce_variant', 's_anchor', 's_variant', 'variant_rank']
    """

    if rest is not None:  # its own buffers: the step may donate the caller's copy
        rest = jax.tree.map(jnp.copy, rest)

    def run(tree: Any, batch: Any, key: jax.Array) -> jax.Array:
        if graphdef is not None:
            tree = nnx.merge(graphdef, tree, rest) if rest is not None else \
                nnx.merge(graphdef, tree)
        return _task(task_loss(tree, batch, key))

    def loss_fn(params: Any, batch: Any, key: jax.Array):
        tree, obj = _split(params)
        for path, k in kernels(tree).items():
            if k.active_width < min(obj.anchor, k.max_rank):
                raise ValueError(f"nested.loss: {path!r} computes only {k.active_width} "
                                 "components; train at full width (nested.set_rank(tree, R))")
        sample_key, task_key = jax.random.split(key)
        index, rank = obj.sample(sample_key)
        top = len(obj.grid) - 1
        ce_anchor = run(at_traced_rank(tree, jnp.asarray(obj.anchor, jnp.int32)), batch,
                        task_key)
        ce_variant = run(at_traced_rank(tree, rank), batch, task_key)
        total = obj.weigh(ce_anchor, top) + obj.weigh(ce_variant, index)
        s = obj.log_var
        return total, {"ce_anchor": ce_anchor, "ce_variant": ce_variant, "variant_rank": rank,
                       "s_anchor": s[top], "s_variant": s[index]}

    return loss_fn


def _is_objective(x: Any) -> bool:
    return isinstance(x, Objective)


def advance(params: Any, rest: Any) -> tuple[Any, Any]:
    """The train step's ``post_update``: every :class:`Objective` in ``params`` one step on.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import nested
        >>> obj = nested.Objective(jnp.zeros(2), jnp.int32(4), grid=(2, 4))
        >>> int(nested.advance({"nsn": obj}, None)[0]["nsn"].step)
        5
    """
    return jax.tree.map(lambda x: x.advance() if _is_objective(x) else x, params,
                        is_leaf=_is_objective), rest


def _is_log_var(path: str) -> bool:
    return rules_lib.Rule(pattern=rf"(.*/)?{OBJECTIVE}/log_var(/value)?").matches(path)


def optimizer(tx: optax.GradientTransformation, *, log_var_lr: float = 1e-2,
              ) -> optax.GradientTransformation:
    """``tx`` for the model, plain Adam at ``log_var_lr`` for the log-variances ``s_k``.

    The ``s_k`` move on the scale of ``log CE`` (order 1): at a fine-tuning learning rate
    (5e-5) they would stay near 0 for a whole run. They get their own Adam, without weight
    decay or clipping, and ``tx`` (with its schedule and gradient clipping) sees the rest.
    The ``s_k`` are found by path: ``nsn/log_var`` at any depth.

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


def recipe(rules: rules_lib.Rule | Sequence[rules_lib.Rule] | None = None, *,
           grid: Sequence[int] | None = None, curriculum: float = 0.0,
           log_var_lr: float = 1e-2, lr: float | None = None) -> Any:
    """NSN as a :class:`~subspace_jax.train.Recipe`: :func:`subspace_jax.nested.convert`
    (SVD-initialised nested factors at full rank), the two-rank uncertainty-weighted
    :func:`loss` with its :class:`Objective` trained beside the model, :func:`optimizer`
    (the caller's optimizer for the model, Adam at ``log_var_lr`` for the log-variances)
    and :func:`advance` after every step.

    Args:
        rules: :class:`~subspace_jax.nested.NestedRule` objects (None: the MLP Linears).
        grid: the training ranks (None: :func:`~subspace_jax.nested.core.rank_grid`).
        curriculum: share of the ``steps`` (given to :meth:`~subspace_jax.train.Recipe.prepare`)
            over which the variant window widens.
        log_var_lr: Adam learning rate of the log-variances.
        lr: the method's suggested peak learning rate.

    Examples:
        >>> from subspace_jax import nested
        >>> r = nested.recipe(curriculum=0.3)
        >>> r.name, r.post_update is nested.advance, r.objective is not None
        ('nested', True, True)
    """
    from subspace_jax import train
    from subspace_jax.nested import layer

    def convert_model(model: nnx.Module, key: jax.Array) -> nnx.Module:
        del key  # deterministic: SVDs of the pretrained kernels
        return layer.convert(model, rules)

    def beside(graphdef, params, rest, task_loss, *, steps: int):
        state = objective(params, grid, curriculum_steps=int(curriculum * steps))
        return ({MODEL: params, OBJECTIVE: state},
                loss(task_loss, graphdef=graphdef, rest=rest))

    return train.Recipe(name="nested", convert=convert_model, objective=beside,
                        wrap_optimizer=lambda tx: optimizer(tx, log_var_lr=log_var_lr),
                        post_update=advance, lr=lr)
