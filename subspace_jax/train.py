"""Training utilities shared by every method: jitted step, eval loop, fit loop, measures.

The hot loop follows the library's convention: the model is split once with
:func:`split_model` into ``(graphdef, params, rest)`` and a pure function of the state is
jitted (about 4x less per-call overhead than ``nnx.jit``). Shapes are static: :func:`fit`
feeds fixed-shape batches and :func:`evaluate` pads the last batch with weight 0, so each
function compiles once.

* :func:`make_train_step`: ``step(params, opt_state, rest, batch, key)`` from
  ``loss_fn(model, batch, key)`` and an optax transform, donating ``params`` and
  ``opt_state``; a boolean ``mask`` stops the gradient of frozen leaves (pair it with
  :func:`subspace_jax.lora.freeze`), so JAX neither computes nor keeps residuals for them.
* :func:`fit`: the loop, with a tqdm bar, loss and wall-clock time of every step and
  periodic evaluations in a :class:`History`; :func:`make_eval_step` / :func:`evaluate`.
* :func:`measure_step`: compiled memory, residuals, FLOPs, trainable parameters and
  optimizer bytes of a step, without running it; :func:`fit_measured` measures, then fits.
  Every method reports these same numbers, so the rows of one table compare like for like.

optax's Adam bias correction mixes int32 and float32, so optimizer ``init``/``update``
run under ``jax.numpy_dtype_promotion("standard")`` here; callers may use strict promotion.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from subspace_jax import measure

__all__ = [
    "History", "split_model", "stop_frozen", "count_params", "init_optimizer", "adamw",
    "make_train_step", "make_eval_step", "evaluate", "fit", "measure_step", "fit_measured",
    "cross_entropy", "accuracy", "check_positive",
]


def check_positive(owner: str, config: Any, names: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the field if any of ``names`` on ``config`` is set and <= 0.

    Examples:
        >>> import types
        >>> check_positive("Cfg", types.SimpleNamespace(steps=None, lr=0.1), ("steps", "lr"))
        >>> check_positive("Cfg", types.SimpleNamespace(steps=0), ("steps",))
        Traceback (most recent call last):
        ...
        ValueError: Cfg: steps=0 must be > 0
    """
    for name in names:
        value = getattr(config, name)
        if value is not None and (not isinstance(value, (int, float)) or value <= 0):
            raise ValueError(f"{owner}: {name}={value!r} must be > 0")


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``nnx.split(model, nnx.Param, ...)``: graph, trainable parameters, everything else.

    Examples:
        >>> from flax import nnx
        >>> graphdef, params, rest = split_model(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
        >>> sorted(params.keys()), len(rest)
        (['bias', 'kernel'], 0)
    """
    return nnx.split(model, nnx.Param, ...)


def stop_frozen(params: Any, mask: Any | None) -> Any:
    """``jax.lax.stop_gradient`` on every leaf whose ``mask`` leaf is False.

    Args:
        params: a pytree of arrays (kernel forms are flattened into their fields).
        mask: a bool pytree of the same structure (e.g. :func:`subspace_jax.lora.trainable_mask`),
            or None (everything trains).

    Returns:
        ``params`` with frozen leaves cut from autodiff.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> f = lambda p: sum(stop_frozen(p, {"a": True, "b": False}).values()).sum()
        >>> grads = jax.grad(f)({"a": jnp.ones(2), "b": jnp.ones(2)})
        >>> grads["a"].tolist(), grads["b"].tolist()
        ([1.0, 1.0], [0.0, 0.0])
    """
    if mask is None:
        return params
    return jax.tree.map(lambda m, x: x if m else jax.lax.stop_gradient(x), mask, params)


def count_params(params: Any, mask: Any | None = None) -> int:
    """Number of scalars in ``params`` (only where ``mask`` is True, if given).

    Examples:
        >>> import jax.numpy as jnp
        >>> count_params({"w": jnp.ones((3, 4)), "b": jnp.ones(4)}, {"w": False, "b": True})
        4
    """
    if mask is None:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    sizes = jax.tree.map(lambda m, x: int(np.prod(x.shape)) if m else 0, mask, params)
    return sum(jax.tree.leaves(sizes))


def init_optimizer(tx: optax.GradientTransformation, params: Any) -> Any:
    """``tx.init(params)`` under standard dtype promotion (optax mixes int32 and float).

    Examples:
        >>> import jax.numpy as jnp, optax
        >>> state = init_optimizer(optax.adam(1e-3), {"w": jnp.ones(3)})
        >>> state[0].mu["w"].shape
        (3,)
    """
    with jax.numpy_dtype_promotion("standard"):
        return tx.init(params)


def adamw(lr: float, steps: int, *, warmup: int = 0, weight_decay: float = 0.01,
          b2: float = 0.999, clip: float | None = 1.0) -> optax.GradientTransformation:
    """AdamW with linear warm-up, cosine decay to ``lr / 10`` and global-norm clipping.

    Weight decay applies to leaves with two or more dimensions only (not to biases and
    norm scales).

    Args:
        lr: peak learning rate.
        steps: total number of steps (the schedule's length).
        warmup: linear warm-up steps from 0.
        weight_decay: decoupled weight decay.
        b2: Adam's second-moment decay.
        clip: global gradient-norm clip (None: no clipping).

    Returns:
        The optax transform.

    Examples:
        >>> import jax.numpy as jnp
        >>> tx = adamw(1e-3, 100, warmup=10)
        >>> opt_state = init_optimizer(tx, {"w": jnp.ones((2, 2))})
    """
    for name, value in (("lr", lr), ("steps", steps)):
        if not value > 0:
            raise ValueError(f"adamw: {name}={value!r} must be > 0")
    if not 0 <= warmup < steps:
        raise ValueError(f"adamw: warmup={warmup!r} must lie in [0, steps={steps})")
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=lr / 10)
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    opt = optax.adamw(schedule, b2=b2, weight_decay=weight_decay, mask=decay_mask)
    return opt if clip is None else optax.chain(optax.clip_by_global_norm(clip), opt)


def make_train_step(graphdef: nnx.GraphDef, loss_fn: Callable, tx: optax.GradientTransformation,
                    *, mask: Any | None = None, donate: bool = True) -> Callable:
    """A jitted ``step(params, opt_state, rest, batch, key) -> (params, opt_state, loss)``.

    Args:
        graphdef: from :func:`split_model`.
        loss_fn: ``loss_fn(model, batch, key) -> scalar`` (``key`` drives dropout).
        tx: the optax transform (wrap it in :func:`subspace_jax.lora.freeze` for a mask).
        mask: bool pytree of the params' structure; False leaves get no gradient.
        donate: donate ``params`` and ``opt_state`` (their old buffers are invalid after).

    Returns:
        The jitted step; it compiles once per batch shape.

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> from flax import nnx
        >>> graphdef, params, rest = split_model(nnx.Linear(2, 1, rngs=nnx.Rngs(0)))
        >>> loss = lambda model, batch, key: ((model(batch["x"]) - batch["y"]) ** 2).mean()
        >>> step = make_train_step(graphdef, loss, optax.sgd(0.1))
        >>> batch = {"x": jnp.ones((4, 2)), "y": jnp.zeros((4, 1))}
        >>> params, opt_state, value = step(params, init_optimizer(optax.sgd(0.1), params),
        ...                                 rest, batch, jax.random.key(0))
        >>> value.shape
        ()
    """

    def step(params, opt_state, rest, batch, key):
        def objective(p):
            return loss_fn(nnx.merge(graphdef, stop_frozen(p, mask), rest), batch, key)

        loss, grads = jax.value_and_grad(objective)(params)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def make_eval_step(graphdef: nnx.GraphDef, metric_fn: Callable) -> Callable:
    """A jitted ``eval_step(params, rest, batch) -> metric_fn(model, batch)``.

    ``metric_fn`` returns a dict of **sums** over the batch, weighted by ``batch["weight"]``
    (0 on the padding rows that :func:`evaluate` adds), so they add up across batches.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> graphdef, params, rest = split_model(nnx.Linear(2, 1, rngs=nnx.Rngs(0)))
        >>> metric = lambda model, b: {"count": b["weight"].sum()}
        >>> float(make_eval_step(graphdef, metric)(params, rest, {"weight": jnp.ones(3)})["count"])
        3.0
    """

    def eval_step(params, rest, batch):
        return metric_fn(nnx.merge(graphdef, params, rest), batch)

    return jax.jit(eval_step)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    if len(x) == rows:
        return x
    return np.concatenate([x, np.repeat(x[:1], rows - len(x), axis=0)])


def evaluate(eval_step: Callable, params: Any, rest: Any, arrays: Mapping[str, np.ndarray], *,
             batch_size: int) -> dict[str, float]:
    """Sum ``eval_step``'s metrics over ``arrays`` in fixed-size batches (one compile).

    The last batch is padded by repeating a row, with ``weight`` 0 on the padding.

    Args:
        eval_step: from :func:`make_eval_step`.
        params: parameters.
        rest: the non-parameter state.
        arrays: name -> array with a leading example axis (no ``"weight"`` key).
        batch_size: rows per call.

    Returns:
        name -> summed metric, as Python floats.

    Examples:
        >>> import numpy as np
        >>> from flax import nnx
        >>> graphdef, params, rest = split_model(nnx.Linear(2, 1, rngs=nnx.Rngs(0)))
        >>> step = make_eval_step(graphdef, lambda model, b: {"n": b["weight"].sum()})
        >>> evaluate(step, params, rest, {"x": np.ones((5, 2))}, batch_size=2)
        {'n': 5.0}
    """
    n = len(next(iter(arrays.values())))
    totals: dict[str, Any] = {}
    for start in range(0, n, batch_size):
        chunk = {k: _pad_rows(np.asarray(v[start:start + batch_size]), batch_size)
                 for k, v in arrays.items()}
        weight = np.zeros(batch_size, np.float32)
        weight[:min(batch_size, n - start)] = 1.0
        out = eval_step(params, rest, {**chunk, "weight": weight})
        totals = out if not totals else jax.tree.map(jnp.add, totals, out)
    return {k: float(v) for k, v in totals.items()}


@dataclasses.dataclass(kw_only=True)
class History:
    """What :func:`fit` records.

    Attributes:
        losses: training loss of every step.
        step_times: wall-clock seconds of every step (the first includes compilation).
        evals: ``{"step": s, **metrics}`` for each evaluation.
    """

    losses: list[float] = dataclasses.field(default_factory=list)
    step_times: list[float] = dataclasses.field(default_factory=list)
    evals: list[dict[str, float]] = dataclasses.field(default_factory=list)

    def median_step_time(self) -> float:
        """Median seconds per step, leaving out the first (compiling) step."""
        times = self.step_times[1:] or self.step_times
        return statistics.median(times) if times else float("nan")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready lists plus ``first_step_seconds`` and ``median_step_seconds``."""
        return {"losses": self.losses, "step_times": self.step_times, "evals": self.evals,
                "first_step_seconds": self.step_times[0] if self.step_times else None,
                "median_step_seconds": self.median_step_time()}


def fit(step: Callable, params: Any, opt_state: Any, rest: Any, batches: Iterable, *,
        num_steps: int, key: jax.Array, progress: bool = True, desc: str = "train",
        eval_fn: Callable[[Any], Mapping[str, float]] | None = None, eval_every: int = 0,
        ) -> tuple[Any, Any, History]:
    """Run ``num_steps`` steps of ``step`` over ``batches``, timing each one.

    Args:
        step: from :func:`make_train_step` (``params``/``opt_state`` are donated).
        params: initial parameters.
        opt_state: initial optimizer state.
        rest: non-parameter state, passed unchanged.
        batches: iterator of fixed-shape batches (at least ``num_steps`` of them).
        num_steps: steps to run.
        key: base PRNG key; step ``i`` gets ``fold_in(key, i)``.
        progress: show a tqdm bar.
        desc: the bar's label.
        eval_fn: ``eval_fn(params) -> metrics``, run every ``eval_every`` steps and after
            the last one (not timed as training).
        eval_every: steps between evaluations (0: only after the last step).

    Returns:
        ``(params, opt_state, history)``.

    Raises:
        ValueError: ``batches`` runs out before ``num_steps``.

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> from flax import nnx
        >>> graphdef, params, rest = split_model(nnx.Linear(2, 1, rngs=nnx.Rngs(0)))
        >>> loss = lambda model, b, key: ((model(b["x"]) - 1.0) ** 2).mean()
        >>> tx = optax.sgd(0.1)
        >>> params, _, hist = fit(make_train_step(graphdef, loss, tx), params,
        ...                       init_optimizer(tx, params), rest,
        ...                       ({"x": jnp.ones((4, 2))} for _ in range(20)), num_steps=20,
        ...                       key=jax.random.key(0), progress=False)
        >>> hist.losses[-1] < hist.losses[0]
        True
    """
    history = History()
    iterator = iter(batches)
    with tqdm(total=num_steps, desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for i in range(num_steps):
            try:
                batch = next(iterator)
            except StopIteration:
                raise ValueError(f"fit: batches ran out after {i} of num_steps={num_steps}")
            start = time.perf_counter()
            key_i = jax.random.fold_in(key, i)
            params, opt_state, loss = step(params, opt_state, rest, batch, key_i)
            history.losses.append(float(loss))  # blocks until the step is done
            history.step_times.append(time.perf_counter() - start)
            bar.update(1)
            bar.set_postfix(loss=f"{history.losses[-1]:.4f}", refresh=False)
            last = i + 1 == num_steps
            if eval_fn is not None and (last or (eval_every and (i + 1) % eval_every == 0)):
                history.evals.append({"step": i + 1, **eval_fn(params)})
    return params, opt_state, history


def cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None,
                  ) -> jax.Array:
    """Mean softmax cross-entropy with integer labels (weighted mean if ``weights``).

    Examples:
        >>> import jax.numpy as jnp
        >>> round(float(cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))), 4)  # log 4
        1.3863
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if weights is None:
        return losses.mean()
    return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def accuracy(logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Share of rows whose arg-max logit is the label (weighted if ``weights``).

    Examples:
        >>> import jax.numpy as jnp
        >>> float(accuracy(jnp.array([[2.0, 1.0], [0.0, 1.0]]), jnp.array([0, 0])))
        0.5
    """
    hits = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    if weights is None:
        return hits.mean()
    return (hits * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def measure_step(step: Callable, loss_of_params: Callable, params: Any, opt_state: Any,
                 rest: Any, batch: Any, key: jax.Array, *, mask: Any | None = None,
                 ) -> dict[str, Any]:
    """Compiled memory, residuals, FLOPs and sizes of one training step; nothing is run.

    The step is compiled here (``jax.jit``'s cache then serves the training loop).
    ``residual_bytes`` leaves out arguments and ``stop_gradient`` outputs (LoRA's frozen
    base, masked leaves: the same buffers as arguments); ``residual_bytes_total`` keeps all.

    Args:
        step: from :func:`make_train_step`.
        loss_of_params: ``loss_of_params(params, batch) -> scalar``, the step's objective.
        params, opt_state, rest, batch, key: the step's arguments.
        mask: the trainable mask (None: everything trains).

    Returns:
        JSON-ready dict: ``compiled_memory`` (bytes), ``residual_bytes``,
        ``residual_bytes_total``, ``residual_arrays``, ``flops_matmul``, ``flops_xla``,
        ``optimizer_state_bytes``, ``trainable_params``, ``model_params``.

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> from flax import nnx
        >>> graphdef, params, rest = split_model(nnx.Linear(4, 2, rngs=nnx.Rngs(0)))
        >>> loss = lambda model, b, key: (model(b) ** 2).mean()
        >>> tx = optax.sgd(0.1)
        >>> step, x = make_train_step(graphdef, loss, tx), jnp.ones((8, 4))
        >>> m = measure_step(step, lambda p, b: loss(nnx.merge(graphdef, p, rest), b, None),
        ...                  params, init_optimizer(tx, params), rest, x, jax.random.key(0))
        >>> m["flops_matmul"] == 2 * (2 * 8 * 4 * 2), m["trainable_params"]  # x @ W and dW
        (True, 10)
    """
    memory = measure.compiled_memory(step, params, opt_state, rest, batch, key)
    residuals = measure.saved_residuals(loss_of_params, params, batch, argnums=0)
    flops = measure.flops(step, params, opt_state, rest, batch, key)
    return {"compiled_memory": dataclasses.asdict(memory),
            "residual_bytes": residuals.nbytes_excluding_arguments,
            "residual_bytes_total": residuals.nbytes, "residual_arrays": len(residuals),
            "flops_matmul": flops.matmul, "flops_xla": flops.xla,
            "optimizer_state_bytes": measure.tree_nbytes(opt_state),
            "trainable_params": count_params(params, mask), "model_params": count_params(params)}


def fit_measured(graphdef: nnx.GraphDef, params: Any, rest: Any, loss_fn: Callable,
                 tx: optax.GradientTransformation, batches: Iterable, *, num_steps: int,
                 key: jax.Array, mask: Any | None = None, evals: int = 1,
                 eval_fn: Callable[[Any], Mapping[str, float]] | None = None,
                 progress: bool = True, desc: str = "train") -> tuple[Any, History, dict]:
    """Build the step, :func:`measure_step` it on the first batch, then :func:`fit`.

    Args:
        graphdef, params, rest: from :func:`split_model` (``params`` are donated).
        loss_fn, tx, mask: as in :func:`make_train_step` (``tx`` already frozen if masked).
        batches, num_steps, key, eval_fn, progress, desc: as in :func:`fit`.
        evals: number of ``eval_fn`` calls, evenly spaced, the last after the last step.

    Returns:
        ``(params, history, measures)``; ``measures`` is :func:`measure_step`'s dict plus
        ``train_seconds`` (the fit loop's wall clock, evaluations included).

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> from flax import nnx
        >>> graphdef, params, rest = split_model(nnx.Linear(4, 1, rngs=nnx.Rngs(0)))
        >>> loss = lambda model, b, key: ((model(b) - 1.0) ** 2).mean()
        >>> _, hist, m = fit_measured(graphdef, params, rest, loss, optax.sgd(0.1),
        ...                           (jnp.ones((8, 4)) for _ in range(5)), num_steps=5,
        ...                           key=jax.random.key(0), progress=False)
        >>> len(hist.losses), m["model_params"]
        (5, 5)
    """
    step = make_train_step(graphdef, loss_fn, tx, mask=mask)
    opt_state = init_optimizer(tx, params)
    iterator = iter(batches)
    first = next(iterator)

    def loss_of_params(p, batch):
        return loss_fn(nnx.merge(graphdef, stop_frozen(p, mask), rest), batch, key)

    measures = measure_step(step, loss_of_params, params, opt_state, rest, first, key, mask=mask)
    stream = (b for part in ([first], iterator) for b in part)
    start = time.perf_counter()
    params, _, history = fit(step, params, opt_state, rest, stream, num_steps=num_steps, key=key,
                             progress=progress, desc=desc, eval_fn=eval_fn,
                             eval_every=max(num_steps // evals, 1))
    measures["train_seconds"] = time.perf_counter() - start
    return params, history, measures
