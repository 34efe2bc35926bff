"""Training utilities shared by every method: one jitted step, eval loop, fit loop, measures.

The hot loop follows the library's convention: the model is split once with
:func:`split_model` into ``(graphdef, params, rest)`` and a pure function of the state is
jitted (about 4x less per-call overhead than ``nnx.jit``). Shapes are static: :func:`fit`
feeds fixed-shape batches and :func:`evaluate` pads the last batch with weight 0, so each
function compiles once.

* :func:`make_train_step`: ``step(params, opt_state, rest, batch, key) -> (params,
  opt_state, rest, metrics)``. ``rest`` is the model's non-parameter state (a method's
  :class:`~subspace_jax.nn.SubspaceState`, counters, batch statistics): the step merges
  it into the model, lets ``loss_fn`` change it, and returns the new value. ``loss_fn``
  returns a scalar or ``(loss, aux)`` with a dict of metrics. An optional pure
  ``post_update(params, rest) -> (params, rest)`` runs after the optimizer, inside the
  same jitted step (WASI's re-orthonormalisation). All three states are donated.
* One freeze mechanism, :func:`trainable_mask`: kernel forms declare the fields that never
  train (``KernelForm.frozen_fields``), integer and bool leaves (packed bits) never train,
  and an optional rule set limits training to some paths. Frozen leaves are not
  differentiated (no ``dW`` is computed) and get no optimizer state: the optimizer sees
  only the trainable part (:func:`partition`), so any optax transform works unchanged.
* :func:`fit`: the loop, with a tqdm bar; metrics are fetched from the device every
  ``log_every`` steps (one host sync per block, not per step) into a :class:`History`.
  :func:`make_eval_step` / :func:`evaluate` for sums of metrics over a split.
* :class:`Recipe`: what a method brings to training (conversion, optimizer, trainable
  rules, post-update, loss wrapper); :meth:`Recipe.prepare` applies it to a model and a task
  loss. Every method exports one.
* :func:`measure_step`: compiled memory, residuals, FLOPs, trainable parameters and
  optimizer bytes of a step, without running it; :func:`fit_measured` measures, then fits.
  Every method reports these same numbers, so the rows of one table compare like for like.

Strict dtype promotion: the library's own code (models, forms, losses, this module) runs
under ``jax_numpy_dtype_promotion="strict"`` in the tests. Only the optimizer's ``init`` and
``update`` run under ``"standard"`` (:data:`OPTIMIZER_PROMOTION`): optax's Adam computes
``b1 ** count`` with a Python float and an int32 count, which strict promotion rejects.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from subspace_jax import forms, measure, nn, rules

__all__ = [
    "History", "split_model", "trainable_mask", "partition", "combine", "init_optimizer",
    "adamw", "make_train_step", "make_eval_step", "evaluate", "fit", "step_residuals",
    "measure_step", "fit_measured", "cross_entropy", "accuracy", "check_positive", "OPTIMIZER_PROMOTION",
    "Recipe", "Prepared",
]

#: The dtype-promotion mode optimizer ``init``/``update`` run under (see the module doc).
OPTIMIZER_PROMOTION = "standard"


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


def _trains(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jnp.inexact)


def _form_mask(form: forms.KernelForm, selected: bool) -> forms.KernelForm:
    frozen = type(form).frozen_fields

    def field(path, x):
        return selected and path[0].name not in frozen and _trains(x)

    return jax.tree_util.tree_map_with_path(field, form)


def trainable_mask(params: Any, *, train: rules.Rule | Sequence[rules.Rule] | None = None,
                   ) -> Any:
    """The one freeze mechanism: a bool pytree, True where a leaf trains.

    A leaf trains when all of these hold:

    * it is floating point (integer and bool leaves, e.g. packed sign bits, never train);
    * it is not a field that its kernel form lists in ``frozen_fields`` (LoRA's ``w``);
    * ``train`` is None, or its path (the kernel's path, for a form) matches a rule of
      ``train``. An unmatched rule raises, as :func:`subspace_jax.rules.select` does.

    Args:
        params: an ``nnx.State``, dict or linen tree; forms are handled field by field.
        train: rules naming the leaves that train (None: all that may).

    Returns:
        A tree of Python bools with the structure of ``params`` (forms keep their type).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import lora, rules
        >>> params = lora.add_lora({"q": jnp.ones((4, 4)), "head": jnp.ones((4, 2)),
        ...                         "ids": jnp.zeros(3, jnp.int32)},
        ...                        lora.LoRARule(pattern="q", rank=1), key=jax.random.key(0))
        >>> trainable_mask(params)
        {'head': True, 'ids': False, 'q': LoRA(fold=None, w=False, a=True, b=True, scale=1.0)}
        >>> trainable_mask(params, train=rules.Rule(pattern="q"))["head"]
        False
    """
    chosen = None
    if train is not None:
        chosen = {m.path for m in rules.select(params, train).selected}

    def label(path: str, leaf: Any) -> Any:
        selected = chosen is None or path in chosen
        if forms.is_form(leaf):
            return _form_mask(leaf, selected)
        return selected and _trains(leaf)

    return rules.map_with_path(label, params)


def partition(params: Any, mask: Any) -> tuple[Any, Any]:
    """Split ``params`` by ``mask`` into ``(trainable, frozen)``, None in place of the other.

    ``combine(*partition(params, mask))`` rebuilds ``params``. Optax transforms and
    ``jax.grad`` treat the None leaves as absent: no gradient, no optimizer state.

    Examples:
        >>> import jax.numpy as jnp
        >>> t, f = partition({"w": jnp.ones(2), "n": jnp.zeros(1, jnp.int32)},
        ...                  {"w": True, "n": False})
        >>> t["n"], f["w"], combine(t, f)["w"].tolist()
        (None, None, [1.0, 1.0])
    """
    trainable = jax.tree.map(lambda m, x: x if m else None, mask, params)
    frozen = jax.tree.map(lambda m, x: None if m else x, mask, params)
    return trainable, frozen


def combine(trainable: Any, frozen: Any) -> Any:
    """Inverse of :func:`partition`: take each leaf from whichever tree is not None.

    Examples:
        >>> import jax.numpy as jnp
        >>> combine({"w": jnp.ones(1), "n": None}, {"w": None, "n": jnp.zeros(1)})["n"].tolist()
        [0.0]
    """
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen,
                        is_leaf=lambda x: x is None)


def init_optimizer(tx: optax.GradientTransformation, params: Any, mask: Any | None = None,
                   ) -> Any:
    """``tx.init`` of the trainable part of ``params`` (see :func:`trainable_mask`).

    Args:
        tx: any optax transform.
        params: all parameters.
        mask: from :func:`trainable_mask`; None: ``trainable_mask(params)``.

    Examples:
        >>> import jax.numpy as jnp, optax
        >>> state = init_optimizer(optax.adam(1e-3), {"w": jnp.ones(3), "n": jnp.ones(2, jnp.int32)})
        >>> state[0].mu["w"].shape, state[0].mu["n"]
        ((3,), None)
    """
    trainable, _ = partition(params, trainable_mask(params) if mask is None else mask)
    with jax.numpy_dtype_promotion(OPTIMIZER_PROMOTION):
        return tx.init(trainable)


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


def _split_loss(out: Any) -> tuple[jax.Array, dict[str, Any]]:
    if isinstance(out, tuple):
        if len(out) != 2 or not isinstance(out[1], Mapping):
            raise TypeError("loss_fn must return a scalar or (loss, aux) with a dict aux, got a "
                            f"tuple of {len(out)}")
        return out[0], dict(out[1])
    return out, {}


def make_train_step(graphdef: nnx.GraphDef, loss_fn: Callable, tx: optax.GradientTransformation,
                    *, mask: Any | None = None,
                    post_update: Callable[[Any, Any], tuple[Any, Any]] | None = None,
                    donate: bool = True) -> Callable:
    """A jitted ``step(params, opt_state, rest, batch, key) -> (params, opt_state, rest, metrics)``.

    Inside the step: the model is merged from ``params`` and ``rest``; ``loss_fn`` runs
    (it may change the model's non-parameter state, which becomes the new ``rest``); the
    trainable part of ``params`` is differentiated and updated by ``tx``; the state that
    forms emitted in the forward (:func:`subspace_jax.forms.collect`) is absorbed into the
    new parameters; then ``post_update`` runs. ``metrics`` is ``{"loss": loss, **aux}``.
    The loss runs inside :func:`subspace_jax.nn.intercept`, so converted trees of models the
    library did not write (linen, plain NNX layers) train as they are.

    Args:
        graphdef: from :func:`split_model`; or None for any other model (linen, Hugging
            Face): then ``loss_fn(params, batch, key)`` gets the parameter tree itself (e.g.
            ``model.apply({"params": params}, ...)``) and ``rest`` passes through unchanged.
        loss_fn: ``loss_fn(model, batch, key)`` returning a scalar or ``(loss, aux)`` where
            ``aux`` is a dict of arrays (``key`` drives dropout and sampling).
        tx: any optax transform; its state must come from :func:`init_optimizer` with the
            same ``mask``.
        mask: from :func:`trainable_mask` (None: ``trainable_mask(params)``, computed from
            the structure and dtypes when the step is traced).
        post_update: pure ``(params, rest) -> (params, rest)`` run after the update.
        donate: donate ``params``, ``opt_state`` and ``rest`` (their old buffers are
            invalid after the call).

    Returns:
        The jitted step; it compiles once per batch shape.

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> from flax import nnx
        >>> graphdef, params, rest = split_model(nnx.Linear(2, 1, rngs=nnx.Rngs(0)))
        >>> def loss(model, batch, key):
        ...     err = model(batch["x"]) - batch["y"]
        ...     return (err ** 2).mean(), {"max_err": jnp.abs(err).max()}
        >>> step = make_train_step(graphdef, loss, optax.sgd(0.1))
        >>> batch = {"x": jnp.ones((4, 2)), "y": jnp.zeros((4, 1))}
        >>> params, opt_state, rest, metrics = step(
        ...     params, init_optimizer(optax.sgd(0.1), params), rest, batch, jax.random.key(0))
        >>> sorted(metrics)
        ['loss', 'max_err']
    """

    def step(params, opt_state, rest, batch, key):
        trainable, frozen = partition(params, trainable_mask(params) if mask is None else mask)

        def objective(t):
            with nn.intercept(), forms.collect() as emitted:
                if graphdef is None:
                    loss, aux = _split_loss(loss_fn(combine(t, frozen), batch, key))
                    new_rest = rest
                else:
                    model = nnx.merge(graphdef, combine(t, frozen), rest, copy=True)
                    loss, aux = _split_loss(loss_fn(model, batch, key))
                    _, _, new_rest = split_model(model)
            return loss, (aux, new_rest, dict(emitted))

        (loss, (aux, new_rest, emitted)), grads = jax.value_and_grad(
            objective, has_aux=True)(trainable)
        with jax.numpy_dtype_promotion(OPTIMIZER_PROMOTION):
            updates, opt_state = tx.update(grads, opt_state, trainable)
        params = forms.absorb(combine(optax.apply_updates(trainable, updates), frozen), emitted)
        if post_update is not None:
            params, new_rest = post_update(params, new_rest)
        return params, opt_state, new_rest, {"loss": loss, **aux}

    return jax.jit(step, donate_argnums=(0, 1, 2) if donate else ())


def make_eval_step(graphdef: nnx.GraphDef, metric_fn: Callable) -> Callable:
    """A jitted ``eval_step(params, rest, batch) -> metric_fn(model, batch)``.

    ``metric_fn(model, batch)`` (``metric_fn(params, batch)`` when ``graphdef`` is None, as
    in :func:`make_train_step`) returns a dict of **sums** over the batch, weighted by ``batch["weight"]``
    (0 on the padding rows that :func:`evaluate` adds), so they add up across batches.
    Evaluation reads ``rest`` (e.g. a method's active rank) and does not change it.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> graphdef, params, rest = split_model(nnx.Linear(2, 1, rngs=nnx.Rngs(0)))
        >>> metric = lambda model, b: {"count": b["weight"].sum()}
        >>> float(make_eval_step(graphdef, metric)(params, rest, {"weight": jnp.ones(3)})["count"])
        3.0
    """

    def eval_step(params, rest, batch):
        with nn.intercept():
            if graphdef is None:
                return metric_fn(params, batch)
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
        rest: the non-parameter state (method state included).
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
    return {k: float(v) for k, v in jax.device_get(totals).items()}


@dataclasses.dataclass(kw_only=True)
class History:
    """What :func:`fit` records.

    Attributes:
        losses: training loss of every step.
        metrics: every other metric of the step (``aux`` of ``loss_fn``), one value per step.
        step_times: wall-clock seconds per step. The first step (compilation) is timed on
            its own; after it, steps run asynchronously and are timed in blocks of
            ``log_every`` (one host sync per block), each step of a block getting the
            block's mean.
        evals: ``{"step": s, **metrics}`` for each evaluation.
    """

    losses: list[float] = dataclasses.field(default_factory=list)
    metrics: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    step_times: list[float] = dataclasses.field(default_factory=list)
    evals: list[dict[str, float]] = dataclasses.field(default_factory=list)

    def median_step_time(self) -> float:
        """Median seconds per step, leaving out the first (compiling) step."""
        times = self.step_times[1:] or self.step_times
        return statistics.median(times) if times else float("nan")

    def record(self, metrics: Sequence[Mapping[str, Any]], seconds: float) -> None:
        """Append host copies of a block of per-step ``metrics`` that took ``seconds``."""
        for m in metrics:
            self.losses.append(float(m["loss"]))
            for name, value in m.items():
                if name != "loss" and np.ndim(value) == 0:
                    self.metrics.setdefault(name, []).append(float(value))
        self.step_times.extend([seconds / len(metrics)] * len(metrics))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready lists plus ``first_step_seconds`` and ``median_step_seconds``."""
        return {"losses": self.losses, "metrics": self.metrics, "step_times": self.step_times,
                "evals": self.evals,
                "first_step_seconds": self.step_times[0] if self.step_times else None,
                "median_step_seconds": self.median_step_time()}


def fit(step: Callable, params: Any, opt_state: Any, rest: Any, batches: Iterable, *,
        num_steps: int, key: jax.Array, progress: bool = True, desc: str = "train",
        eval_fn: Callable[[Any, Any], Mapping[str, float]] | None = None, eval_every: int = 0,
        log_every: int = 10) -> tuple[Any, Any, Any, History]:
    """Run ``num_steps`` steps of ``step`` over ``batches``, threading method state through.

    Steps are dispatched without waiting for their results; the metrics of the last
    ``log_every`` steps are fetched in one transfer (the only host sync), which also
    updates the bar's loss. The first step is synced on its own so that its time
    (compilation) is recorded apart.

    Args:
        step: from :func:`make_train_step` (``params``/``opt_state``/``rest`` are donated).
        params: initial parameters.
        opt_state: initial optimizer state.
        rest: initial non-parameter state; each step's output feeds the next step.
        batches: iterator of fixed-shape batches (at least ``num_steps`` of them).
        num_steps: steps to run.
        key: base PRNG key; step ``i`` gets ``fold_in(key, i)``.
        progress: show a tqdm bar.
        desc: the bar's label.
        eval_fn: ``eval_fn(params, rest) -> metrics``, run every ``eval_every`` steps and
            after the last one (not timed as training).
        eval_every: steps between evaluations (0: only after the last step).
        log_every: steps between host syncs (metrics fetch, bar postfix).

    Returns:
        ``(params, opt_state, rest, history)``.

    Raises:
        ValueError: ``batches`` runs out before ``num_steps``, or a count is < 1.

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> from flax import nnx
        >>> graphdef, params, rest = split_model(nnx.Linear(2, 1, rngs=nnx.Rngs(0)))
        >>> loss = lambda model, b, key: ((model(b["x"]) - 1.0) ** 2).mean()
        >>> tx = optax.sgd(0.1)
        >>> params, _, rest, hist = fit(make_train_step(graphdef, loss, tx), params,
        ...                             init_optimizer(tx, params), rest,
        ...                             ({"x": jnp.ones((4, 2))} for _ in range(20)),
        ...                             num_steps=20, key=jax.random.key(0), progress=False)
        >>> len(hist.losses), hist.losses[-1] < hist.losses[0]
        (20, True)
    """
    if num_steps < 1 or log_every < 1:
        raise ValueError(f"fit: num_steps={num_steps!r} and log_every={log_every!r} must be >= 1")
    history = History()
    iterator = iter(batches)
    pending: list[Any] = []
    with tqdm(total=num_steps, desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        block_start = time.perf_counter()
        for i in range(num_steps):
            try:
                batch = next(iterator)
            except StopIteration:
                raise ValueError(f"fit: batches ran out after {i} of num_steps={num_steps}")
            params, opt_state, rest, metrics = step(params, opt_state, rest, batch,
                                                    jax.random.fold_in(key, i))
            pending.append(metrics)
            bar.update(1)
            last = i + 1 == num_steps
            evaluate_now = eval_fn is not None and (
                last or (eval_every and (i + 1) % eval_every == 0))
            if i == 0 or last or evaluate_now or len(pending) == log_every:
                history.record(jax.device_get(pending), time.perf_counter() - block_start)
                pending = []
                bar.set_postfix(loss=f"{history.losses[-1]:.4f}", refresh=False)
            if evaluate_now:
                history.evals.append({"step": i + 1, **eval_fn(params, rest)})
            if not pending:
                block_start = time.perf_counter()
    return params, opt_state, rest, history


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


def step_residuals(loss_fn: Callable, graphdef: nnx.GraphDef | None, params: Any, rest: Any,
                   batch: Any, key: jax.Array, *, mask: Any | None = None) -> measure.Residuals:
    """What the training step's backward keeps of ``loss_fn``: its residuals differentiated
    with respect to the trainable part of ``params`` only (frozen leaves are
    non-differentiated arguments, as in :func:`make_train_step`); nothing is run.

    Freezing a set of kernels in ``mask`` and taking the difference measures what their
    weight gradients keep (their layers' saved inputs).

    Args:
        loss_fn, graphdef, params, rest, batch, key: as in :func:`measure_step`.
        mask: the trainable mask (None: :func:`trainable_mask` of ``params``).

    Returns:
        :class:`subspace_jax.measure.Residuals`.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> graphdef, params, rest = split_model(nnx.Linear(4, 2, rngs=nnx.Rngs(0)))
        >>> loss = lambda model, b, key: (model(b) ** 2).mean()
        >>> x, key = jnp.ones((8, 4)), jax.random.key(0)
        >>> r = step_residuals(loss, graphdef, params, rest, x, key)
        >>> frozen = jax.tree.map(lambda _: False, params)
        >>> r.nbytes_excluding_arguments > step_residuals(loss, graphdef, params, rest, x, key,
        ...                                               mask=frozen).nbytes_excluding_arguments
        True
    """
    mask = trainable_mask(params) if mask is None else mask
    trainable, frozen = partition(params, mask)

    def objective(t, f, r, b):
        with nn.intercept():
            model = combine(t, f) if graphdef is None else nnx.merge(graphdef, combine(t, f), r)
            return _split_loss(loss_fn(model, b, key))[0]

    return measure.saved_residuals(objective, trainable, frozen, rest, batch, argnums=0)


def measure_step(step: Callable, loss_fn: Callable, graphdef: nnx.GraphDef, params: Any,
                 opt_state: Any, rest: Any, batch: Any, key: jax.Array, *,
                 mask: Any | None = None) -> dict[str, Any]:
    """Compiled memory, residuals, FLOPs and sizes of one training step; nothing is run.

    The step is compiled here (``jax.jit``'s cache then serves the training loop).
    Residuals are those of ``loss_fn`` differentiated with respect to the trainable part
    of ``params`` only, as in the step: frozen leaves are non-differentiated arguments,
    tagged so that ``residual_bytes`` leaves them out (it also leaves out the other
    arguments); ``residual_bytes_total`` keeps everything.

    Args:
        step: from :func:`make_train_step`.
        loss_fn: the step's ``loss_fn(model, batch, key)``.
        graphdef: the model's graph (None: ``loss_fn`` takes the parameter tree, as in
            :func:`make_train_step`).
        params, opt_state, rest, batch, key: the step's arguments.
        mask: the trainable mask (None: :func:`trainable_mask` of ``params``).

    Returns:
        JSON-ready dict: ``compiled_memory`` (bytes), ``residual_bytes``,
        ``residual_bytes_total``, ``residual_arrays``, ``flops_matmul``, ``flops_xla``,
        ``optimizer_state_bytes``, ``trainable_params``, ``model_params`` (stored scalars,
        ``optax.tree.size``).

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> from flax import nnx
        >>> graphdef, params, rest = split_model(nnx.Linear(4, 2, rngs=nnx.Rngs(0)))
        >>> loss = lambda model, b, key: (model(b) ** 2).mean()
        >>> tx = optax.sgd(0.1)
        >>> step, x = make_train_step(graphdef, loss, tx), jnp.ones((8, 4))
        >>> m = measure_step(step, loss, graphdef, params, init_optimizer(tx, params), rest,
        ...                  x, jax.random.key(0))
        >>> m["flops_matmul"] == 2 * (2 * 8 * 4 * 2), m["trainable_params"]  # x @ W and dW
        (True, 10)
    """
    mask = trainable_mask(params) if mask is None else mask
    trainable, _ = partition(params, mask)
    memory = measure.compiled_memory(step, params, opt_state, rest, batch, key)
    residuals = step_residuals(loss_fn, graphdef, params, rest, batch, key, mask=mask)
    flops = measure.flops(step, params, opt_state, rest, batch, key)
    return {"compiled_memory": dataclasses.asdict(memory),
            "residual_bytes": residuals.nbytes_excluding_arguments,
            "residual_bytes_total": residuals.nbytes, "residual_arrays": len(residuals),
            "flops_matmul": flops.matmul, "flops_xla": flops.xla,
            "optimizer_state_bytes": measure.tree_nbytes(opt_state),
            "trainable_params": optax.tree.size(trainable),
            "model_params": optax.tree.size(params)}


def fit_measured(graphdef: nnx.GraphDef, params: Any, rest: Any, loss_fn: Callable,
                 tx: optax.GradientTransformation, batches: Iterable, *, num_steps: int,
                 key: jax.Array, mask: Any | None = None,
                 post_update: Callable[[Any, Any], tuple[Any, Any]] | None = None,
                 evals: int = 1, eval_fn: Callable[[Any, Any], Mapping[str, float]] | None = None,
                 progress: bool = True, desc: str = "train", log_every: int = 10,
                 ) -> tuple[Any, Any, History, dict]:
    """Build the step, :func:`measure_step` it on the first batch, then :func:`fit`.

    Args:
        graphdef, params, rest: from :func:`split_model` (``params`` and ``rest`` are donated).
        loss_fn, tx, mask, post_update: as in :func:`make_train_step`.
        batches, num_steps, key, eval_fn, progress, desc, log_every: as in :func:`fit`.
        evals: number of ``eval_fn`` calls, evenly spaced, the last after the last step.

    Returns:
        ``(params, rest, history, measures)``; ``measures`` is :func:`measure_step`'s dict
        plus ``train_seconds`` (the fit loop's wall clock, evaluations included).

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> from flax import nnx
        >>> graphdef, params, rest = split_model(nnx.Linear(4, 1, rngs=nnx.Rngs(0)))
        >>> loss = lambda model, b, key: ((model(b) - 1.0) ** 2).mean()
        >>> _, _, hist, m = fit_measured(graphdef, params, rest, loss, optax.sgd(0.1),
        ...                              (jnp.ones((8, 4)) for _ in range(5)), num_steps=5,
        ...                              key=jax.random.key(0), progress=False)
        >>> len(hist.losses), m["model_params"]
        (5, 5)
    """
    mask = trainable_mask(params) if mask is None else mask
    step = make_train_step(graphdef, loss_fn, tx, mask=mask, post_update=post_update)
    opt_state = init_optimizer(tx, params, mask)
    iterator = iter(batches)
    first = next(iterator)
    measures = measure_step(step, loss_fn, graphdef, params, opt_state, rest, first, key,
                            mask=mask)
    stream = (b for part in ([first], iterator) for b in part)
    start = time.perf_counter()
    params, _, rest, history = fit(step, params, opt_state, rest, stream, num_steps=num_steps,
                                   key=key, progress=progress, desc=desc, eval_fn=eval_fn,
                                   eval_every=max(num_steps // evals, 1), log_every=log_every)
    measures["train_seconds"] = time.perf_counter() - start
    return params, rest, history, measures


class Prepared(NamedTuple):
    """A model made ready to train by :meth:`Recipe.prepare`.

    Attributes:
        graphdef: the converted model's graph (evaluation, export, ``nnx.merge``).
        step_graphdef: what :func:`make_train_step` takes: ``graphdef``, or None when the
            method's own state trains beside the model (then ``params`` is a dict with the
            model's parameters under ``"model"``).
        params: the parameters to train (donated by the step).
        rest: the model's non-parameter state.
        loss: the loss for :func:`make_train_step` (the task loss, or the method's wrapper).
        tx: the optimizer.
        mask: from :func:`trainable_mask` with the recipe's rules.
        post_update: the recipe's ``post_update`` (or None).
    """

    graphdef: nnx.GraphDef
    step_graphdef: nnx.GraphDef | None
    params: Any
    rest: Any
    loss: Callable
    tx: optax.GradientTransformation
    mask: Any
    post_update: Callable[[Any, Any], tuple[Any, Any]] | None

    def model_params(self, params: Any) -> Any:
        """The model's part of ``params`` (all of it unless a method state trains beside)."""
        return params if self.step_graphdef is not None else params["model"]

    def step(self, *, donate: bool = True) -> Callable:
        """The jitted train step (:func:`make_train_step` of these pieces)."""
        return make_train_step(self.step_graphdef, self.loss, self.tx, mask=self.mask,
                               post_update=self.post_update, donate=donate)

    def init_optimizer(self) -> Any:
        """The optimizer state of the trainable part of ``params``."""
        return init_optimizer(self.tx, self.params, self.mask)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
    """How one method trains a model: its conversion, optimizer, trainable rules,
    post-update and loss wrapper, the pieces :func:`make_train_step` takes besides the task.

    Each method exports one (:func:`subspace_jax.wasi.recipe`, :func:`subspace_jax.nested.recipe`,
    :func:`subspace_jax.littlebit.recipe`, :func:`subspace_jax.lorapre.recipe`,
    :func:`subspace_jax.lora.recipe`); :meth:`prepare` applies it to a model and a task
    loss. Full fine-tuning is ``Recipe(name="full")``.

    Attributes:
        name: the method's label.
        convert: ``convert(model, key) -> model`` before training (None: unchanged).
        optimizer: ``optimizer(lr, steps) -> optax transform`` (None: the caller's default,
            :func:`adamw`); LoRA-Pre's replaces it.
        wrap_optimizer: ``wrap_optimizer(tx) -> tx`` around whichever optimizer runs (NSN
            gives its log-variances their own Adam).
        train: rules of the leaves that train (None: every leaf that may, see
            :func:`trainable_mask`); :meth:`with_train` adds the task's own (a new head).
        post_update: ``(params, rest) -> (params, rest)`` inside the step, after the update.
        objective: for a method whose own state trains beside the model and is returned,
            not stored on it (NSN's): ``objective(graphdef, params, rest, task_loss, *,
            steps) -> (train_params, loss)`` wraps the task loss; ``train_params`` holds
            the model's parameters under ``"model"``.
        lr: the method's suggested peak learning rate (None: no suggestion).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from subspace_jax import lora
        >>> recipe = lora.recipe(lora.LoRARule(pattern=".*kernel", rank=2))
        >>> loss = lambda m, b, key: ((m(b["x"]) - b["y"]) ** 2).mean()
        >>> ready = recipe.prepare(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), loss, lr=0.1, steps=5,
        ...                        key=jax.random.key(0))
        >>> batch = {"x": jnp.ones((8, 4)), "y": jnp.zeros((8, 3))}
        >>> params, opt_state, rest, metrics = ready.step()(
        ...     ready.params, ready.init_optimizer(), ready.rest, batch, jax.random.key(1))
        >>> type(params["kernel"].get_value()).__name__, bool(metrics["loss"] >= 0)
        ('LoRA', True)
    """

    name: str
    convert: Callable[[Any, jax.Array], Any] | None = None
    optimizer: Callable[[float, int], optax.GradientTransformation] | None = None
    wrap_optimizer: Callable[[optax.GradientTransformation],
                             optax.GradientTransformation] | None = None
    train: tuple[rules.Rule, ...] | None = None
    post_update: Callable[[Any, Any], tuple[Any, Any]] | None = None
    objective: Callable[[Any, Any, Any, Callable], tuple[Any, Callable]] | None = None
    lr: float | None = None

    def __post_init__(self):
        if isinstance(self.train, rules.Rule):
            object.__setattr__(self, "train", (self.train,))
        elif self.train is not None:
            object.__setattr__(self, "train", tuple(self.train))

    def with_train(self, *extra: rules.Rule) -> Recipe:
        """The recipe with ``extra`` rules training too (e.g. a task head); unchanged when
        everything trains already (``train`` None).

        Examples:
            >>> from subspace_jax import rules
            >>> r = Recipe(name="x", train=rules.Rule(pattern="a/.*"))
            >>> [x.pattern for x in r.with_train(rules.Rule(pattern="head/.*")).train]
            ['a/.*', 'head/.*']
        """
        if self.train is None:
            return self
        return dataclasses.replace(self, train=(*self.train, *extra))

    def prepare(self, model: nnx.Module, loss_fn: Callable, *, lr: float, steps: int,
                key: jax.Array,
                default_optimizer: Callable[[float, int], optax.GradientTransformation] = adamw,
                ) -> Prepared:
        """Convert ``model``, split it, wrap ``loss_fn`` and build the optimizer and mask.

        Args:
            model: the NNX model to train (not modified, and it shares no buffer with the
                prepared state).
            loss_fn: the task loss, ``loss_fn(model, batch, key)`` (see
                :func:`make_train_step`).
            lr: peak learning rate; ``steps`` the schedule's length.
            key: the conversion's key (random initialisations, e.g. LoRA's ``a``).
            default_optimizer: the optimizer when the recipe has none.

        Returns:
            A :class:`Prepared`; ``.step()`` and ``.init_optimizer()`` start training.
        """
        # the step donates its buffers: the input model must keep its own (conversions copy)
        model = self.convert(model, key) if self.convert is not None else nn.copy_model(model)
        graphdef, params, rest = split_model(model)
        loss, step_graphdef = loss_fn, graphdef
        if self.objective is not None:
            params, loss = self.objective(graphdef, params, rest, loss_fn, steps=steps)
            step_graphdef = None
        tx = (self.optimizer or default_optimizer)(lr, steps)
        if self.wrap_optimizer is not None:
            tx = self.wrap_optimizer(tx)
        mask = trainable_mask(params, train=self.train)
        return Prepared(graphdef=graphdef, step_graphdef=step_graphdef, params=params,
                        rest=rest, loss=loss, tx=tx, mask=mask, post_update=self.post_update)
