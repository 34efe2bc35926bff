"""WASI on MiniLM, the pieces of its experiment (``subspace-jax run wasi_finetune``).

* :func:`wasi_method` (WASI as a fine-tuning :class:`~subspace_lab.baselines.Method`, from
  :func:`subspace_jax.wasi.recipe`), :func:`rematerialised` (any layer class under
  ``nnx.remat``: the memory baseline WASI is compared with) and :func:`remat_method` (any
  method with every encoder layer rematerialised);
* the measurements: :func:`residual_report` (residual bytes by kind, and what the converted
  layers keep for backward, measured), :func:`analytic_mlp_bytes` (the paper's count),
  :func:`step_functions` and :func:`measured_run` (a step measured without training);
* :func:`vit_case`: the 4-D case, a digits ViT whose MLPs see a ``(B, H, W, C)`` grid.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from subspace_jax import data, forms, measure, rules, train, wasi
from subspace_jax import nn as sjnn
from subspace_lab import baselines
from subspace_jax.models import bert, vit

__all__ = ["MLP_RULE", "ATTN_RULE", "calibration_batch", "wasi_method", "rematerialised",
           "RematLayer",
           "RematNonLinear", "remat_method", "freeze", "tucker_bytes", "converted_bytes",
           "residual_report", "analytic_mlp_bytes",
           "step_functions", "measured_run", "GridMLP", "GridViT", "vit_case"]

MLP_RULE = r"bert/encoder/layers/\d+/mlp/(up|down)/kernel"
ATTN_RULE = r"bert/encoder/layers/\d+/attn/(q|k|v|o)/kernel"


def calibration_batch(cfg: baselines.FinetuneConfig) -> dict[str, jax.Array]:
    """The first ``batch_size`` training texts of the task as one batch: WASI's calibration
    sample (its weight and activation ranks are chosen on it) and the measured steps' batch."""
    topics = data.load_pydoc_topics()
    n = cfg.batch_size
    arrays = baselines.encode(list(topics.train.texts[:n]), topics.train.labels[:n],
                               cfg.max_length)
    return {k: jnp.asarray(v) for k, v in arrays.items()}


def wasi_method(*, energy: float = 0.9, activation_eps: float | None = 0.9,
                budget_fraction: float = 0.05, attention: bool = False,
                variant: str = "factored", name: str | None = None,
                lr: float = 1e-4, quick_lr: float = 2e-4) -> baselines.Method:
    """A :class:`~subspace_lab.baselines.Method` converting MiniLM's MLP (and optionally
    attention) Linears with :func:`subspace_jax.wasi.convert` (one
    :class:`~subspace_jax.wasi.WasiRule` per pattern, carrying the settings), calibrated on the first
    training texts; everything else trains as in full fine-tuning (as in the paper).

    Learning rate: WASI's own, as LoRA has its own (2e-3). 1e-4 was picked on validation
    accuracy from {5e-5 (vanilla's), 1e-4, 2e-4} at the full budget
    (``--wasi-lr 1e-4 2e-4 --name wasi_lr``, ``results/wasi_lr.json``); quick runs use 2e-4
    like every method.

    Activation ranks: one ``activation_eps`` for every layer (default 0.9, the issue's
    headline), or with ``activation_eps=None`` the paper's calibration table and knapsack
    under a budget of ``budget_fraction`` of the converted layers' full float32 inputs
    (0.05: at least 20x smaller)."""
    patterns = [MLP_RULE] + ([ATTN_RULE] if attention else [])
    rules_ = [wasi.WasiRule(pattern=p, energy=energy, activation_eps=activation_eps)
              for p in patterns]

    def recipe(cfg):
        batch = calibration_batch(cfg)
        b, t = batch["input_ids"].shape

        def budget(model):  # a share of the converted layers' full float32 inputs
            full = 0
            for layer in model.bert.encoder.layers:
                linears = [layer.mlp.up, layer.mlp.down]
                if attention:
                    linears += [getattr(layer.attn, n) for n in "qkvo"]
                full += sum(4 * b * t * lin.in_features for lin in linears)
            return int(budget_fraction * full)

        def sample(m):
            return train.cross_entropy(baselines.classifier_logits(m, batch), batch["labels"])

        return wasi.recipe(rules_, sample=sample, variant=variant,
                           budget_bytes=budget if activation_eps is None else None)

    label = name or (f"wasi_e{activation_eps:g}" if activation_eps is not None else "wasi_knap")
    return baselines.Method(name=label, recipe=recipe, lr=lr, quick_lr=quick_lr)


def rematerialised(cls: type, policy: Any = None) -> type:
    """A subclass of the module class ``cls`` whose ``__call__`` is rematerialised in
    backward (``nnx.remat`` with ``policy``: None recomputes everything but the call's
    inputs): the memory baseline WASI is compared with, for any layer class.

    Array (and module) arguments, positional or keyword, go through ``nnx.remat``; other
    keyword arguments (flags such as ``deterministic``) stay static. The state that WASI's
    forms emit inside (their refreshed activation bases) is collected inside the
    rematerialised function and returned by it, then emitted again outside: a value may
    not leave ``jax.checkpoint`` by a side channel.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> layer = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
        >>> x = jnp.ones((4, 3))
        >>> want = layer(x)
        >>> layer.__class__ = rematerialised(nnx.Linear)
        >>> type(layer).__name__, bool(jnp.allclose(layer(x), want))
        ('RematLinear', True)
    """
    def static(value):
        return value is None or isinstance(value, (bool, int, float, str))

    def __call__(self, *args, **kwargs):
        fixed = {k: v for k, v in kwargs.items() if static(v)}
        moving = {k: v for k, v in kwargs.items() if k not in fixed}

        def body(module, args, moving):
            with forms.collect() as emitted:
                out = cls.__call__(module, *args, **fixed, **moving)
            return out, dict(emitted)

        out, emitted = nnx.remat(body, policy=policy)(self, args, moving)
        for key, value in emitted.items():
            forms.emit(key, value)
        return out

    return type(f"Remat{cls.__name__}", (cls,), {"__call__": __call__,
                                                  "__doc__": f"{cls.__name__}, rematerialised."})


#: A BERT layer rematerialised whole.
RematLayer = rematerialised(bert.Layer)
#: Remat of the non-linear parts only: every matmul output without batch dimensions is
#: saved, so GELU, LayerNorm, softmax and the attention products are recomputed.
RematNonLinear = rematerialised(bert.Layer, jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


def remat_method(base: baselines.Method | None = None, *, nonlinear: bool = False
                 ) -> baselines.Method:
    """``base`` (default: full fine-tuning) with every encoder layer under ``jax.checkpoint``
    (``nonlinear``: only the non-linear parts are recomputed)."""
    base = base or baselines.Method(name="full", lr=5e-5, quick_lr=2e-4)
    cls = RematNonLinear if nonlinear else RematLayer
    prefix = "" if base.name == "full" else base.name + "_"
    name = prefix + ("remat_nonlinear" if nonlinear else "remat")

    def recipe(cfg):
        inner = base.recipe(cfg)
        convert = inner.convert or (lambda model, key: sjnn.copy_model(model))

        def remat(model, key):
            model = convert(model, key)
            for layer in model.bert.encoder.layers:
                layer.__class__ = cls
            return model

        return dataclasses.replace(inner, name=name, convert=remat)

    return dataclasses.replace(base, name=name, recipe=recipe)


# --- measurements -------------------------------------------------------------------------------

def _kind(shape: tuple[int, ...], source: str, b: int, t: int) -> str:
    if "'compress'" in source:
        return "tucker (WASI core + factors)"
    if shape == (b, t, 1536):
        return "(B,T,1536) MLP hidden / GELU"
    if shape == (b, t, 384):
        return "(B,T,384) hidden / norms"
    if len(shape) == 4 and shape[-2:] == (t, t):
        return "(B,H,T,T) attention"
    return "other"


def _objective(graphdef, loss_fn, key):
    def objective(t, f, r, b):
        out = loss_fn(nnx.merge(graphdef, train.combine(t, f), r, copy=True), b, key)
        return out[0] if isinstance(out, tuple) else out
    return objective


def freeze(mask: Any, patterns: list[str]) -> Any:
    """``mask`` with every leaf under a path matching one of ``patterns`` frozen."""
    selected = [rules.Rule(pattern=p) for p in patterns]
    return rules.map_with_path(
        lambda path, v: jax.tree.map(lambda _: False, v)
        if any(r.matches(path) for r in selected) else v, mask)


def tucker_bytes(residuals: measure.Residuals) -> int:
    """Bytes of WASI's Tucker residuals (cores and factors) among ``residuals``."""
    return sum(r.nbytes for r in residuals.items if "'compress'" in r.source)


def converted_bytes(residuals: measure.Residuals, frozen: Callable[[], measure.Residuals]
                    ) -> int:
    """The converted layers' saved activations, measured: WASI's Tucker residuals, else
    what freezing their kernels removes (``frozen()``: the residuals with them frozen,
    called only then)."""
    return tucker_bytes(residuals) or (residuals.nbytes_excluding_arguments
                                       - frozen().nbytes_excluding_arguments)


def residual_report(run: baselines.Run, method: baselines.Method, cfg, batch,
                    key) -> dict[str, Any]:
    """Residual bytes by kind, and the converted (MLP) layers' activation bytes measured: the
    Tucker residuals for WASI, else the residual bytes that freezing the MLP kernels removes
    (what their weight gradients keep)."""
    b, t = batch["input_ids"].shape
    loss = method.loss or baselines.classifier_loss
    objective = _objective(run.graphdef, loss, key)
    mask = train.trainable_mask(run.params, train=method.recipe(cfg).train)

    def residuals(m):
        trainable, frozen = train.partition(run.params, m)
        return measure.saved_residuals(objective, trainable, frozen, run.rest, batch, argnums=0)

    res = residuals(mask)
    kinds: dict[str, int] = {}
    for r in res.items:
        if not r.is_input:
            kind = _kind(r.shape, r.source, b, t)
            kinds[kind] = kinds.get(kind, 0) + r.nbytes
    mlp_measured = converted_bytes(res, lambda: residuals(freeze(mask, [MLP_RULE])))
    return {"residual_bytes_by_kind": kinds, "mlp_activation_bytes_measured": mlp_measured}


def analytic_mlp_bytes(run: baselines.Run, batch) -> dict[str, int]:
    """The paper's count over the MLP Linears: full inputs, or Tucker core + factors."""
    b, t = batch["input_ids"].shape
    model = nnx.merge(run.graphdef, run.params, run.rest)
    plans = wasi.plans(run.params)
    full = 0
    for layer in model.bert.encoder.layers:
        full += wasi.calibration.activation_bytes((b, t, layer.mlp.up.in_features))
        full += wasi.calibration.activation_bytes((b, t, layer.mlp.down.in_features))
    mlp = [p for p in plans if "/mlp/" in f"/{p.path}/"]
    kept = sum(p.compressed_bytes for p in mlp) if mlp else full
    return {"mlp_activation_bytes_analytic": kept, "mlp_activation_bytes_analytic_full": full}


def step_functions(run: baselines.Run, method: baselines.Method, cfg, batch, key):
    """Non-donating train step with its arguments, and the inference forward with its."""
    recipe = method.recipe(cfg)
    optimizer = recipe.optimizer or functools.partial(baselines.adamw_for, cfg)
    tx = optimizer(method.learning_rate(cfg), cfg.steps or 100)
    mask = train.trainable_mask(run.params, train=recipe.train)
    step = train.make_train_step(run.graphdef, method.loss or baselines.classifier_loss, tx,
                                 mask=mask, post_update=recipe.post_update, donate=False)
    opt = train.init_optimizer(tx, run.params, mask)
    graphdef = run.graphdef

    @jax.jit
    def infer(params, rest, batch):
        return baselines.classifier_logits(nnx.merge(graphdef, params, rest, copy=True), batch,
                                 deterministic=True)

    return (step, (run.params, opt, run.rest, batch, key)), (infer, (run.params, run.rest, batch))


def measured_run(cfg: baselines.FinetuneConfig, method: baselines.Method, key) -> baselines.Run:
    """The converted model and its step measured (:func:`subspace_jax.train.measure_step`)
    without training: for runs whose accuracy is that of another run (remat) or recorded."""
    model = baselines.build_classifier(cfg, data.load_pydoc_topics().num_classes)
    ready = method.prepare(model, cfg, cfg.steps or 100)
    # donated like the training loop's step (its compiled memory is comparable); not run
    measures = train.measure_step(ready.step(donate=True), ready.loss, ready.step_graphdef,
                                  ready.params, ready.init_optimizer(), ready.rest,
                                  calibration_batch(cfg), key, mask=ready.mask)
    result = {"mode": method.name, "trained": False, "lr": method.learning_rate(cfg),
              "config": dataclasses.asdict(cfg), **measures}
    return baselines.Run(result=result, graphdef=ready.graphdef, params=ready.params,
                         rest=ready.rest)


# --- the 4-D case -------------------------------------------------------------------------------

class GridMLP(vit.MLP):
    """The ViT MLP applied to the patch tokens kept as a ``(B, H, W, C)`` grid."""

    def __call__(self, x, *, deterministic, rngs):
        b, n, c = x.shape
        side = math.isqrt(n)
        y = super().__call__(x.reshape(b, side, side, c), deterministic=deterministic, rngs=rngs)
        return y.reshape(b, n, -1)


class GridViT(vit.ViT):
    """The digits ViT without a class token (mean-pooled head), so its tokens form a grid."""

    def __call__(self, images, *, deterministic=True, rngs=None):
        cfg = self.config
        x = self.patch_embed(vit.patchify(images.astype(cfg.dtype), cfg.patch_size))
        x = x + self.pos_embed[...][:, 1:].astype(cfg.dtype)
        for block in self.blocks:
            x = block(x, deterministic=deterministic, rngs=rngs)
        return self.head(self.final_norm(jnp.mean(x, axis=1))).astype(jnp.float32)


def vit_case(steps: int, seed: int, repeats: int, batch_size: int = 64) -> dict[str, Any]:
    """Digits ViT from one random initialisation, vanilla against WASI (weight and activation
    eps 0.9 on the MLP Linears, whose inputs are 4-D ``(B, 4, 4, C)``), same batches."""
    digits = data.load_digits(seed=seed)
    arrays = {"x": digits.train.x, "y": digits.train.y}
    model = GridViT(vit.ViTConfig.digits(), rngs=nnx.Rngs(seed))
    for block in model.blocks:
        block.mlp.__class__ = GridMLP
    first = next(data.batches(arrays, batch_size, seed=seed))
    calib = {k: jnp.asarray(v) for k, v in first.items()}

    def loss(m, b, key):
        return train.cross_entropy(m(b["x"]), b["y"])

    rule = wasi.WasiRule(pattern=wasi.MLP_PATTERN, energy=0.9, activation_eps=0.9)
    models = {"vit_full": model,
              "vit_wasi": wasi.convert(model, rule, sample=lambda m: loss(m, calib, None))}
    out, fns = {}, {}
    for name, m in models.items():
        graphdef, params, rest = train.split_model(m)
        tx = optax.adamw(1e-3)
        post = wasi.post_update if name == "vit_wasi" else None
        step = train.make_train_step(graphdef, loss, tx, post_update=post, donate=False)
        opt = train.init_optimizer(tx, params)
        key = jax.random.key(seed)
        res = train.measure_step(step, loss, graphdef, params, opt, rest, calib, key)
        fns[name] = (step, (params, opt, rest, calib, key))
        epochs = -(-steps // (len(digits.train.y) // batch_size))
        batches = ({k: jnp.asarray(v) for k, v in b.items()}
                   for b in data.batches(arrays, batch_size, seed=seed, epochs=epochs))
        params, _, rest, _ = train.fit(step, params, opt, rest, batches, num_steps=steps,
                                       key=key, progress=False)
        logits = nnx.merge(graphdef, params, rest, copy=True)(jnp.asarray(digits.test.x))
        tucker = tucker_bytes(measure.saved_residuals(
            lambda p: loss(nnx.merge(graphdef, p, rest, copy=True), calib, key), params))
        plans = wasi.plans(m)
        out[name] = {"test_accuracy": float(jnp.mean(jnp.argmax(logits, -1) == digits.test.y)),
                     "compiled_memory": res["compiled_memory"],
                     "residual_bytes": res["residual_bytes"], "tucker_residual_bytes": tucker,
                     "flops_matmul": res["flops_matmul"],
                     "layers": [{"path": p.path, "act_shape": p.act_shape, "rank": p.rank,
                                 "act_ranks": p.act_ranks, "full_bytes": p.full_bytes,
                                 "kept_bytes": p.compressed_bytes} for p in plans]}
    cmp = measure.compare(fns, warmup=2, repeats=repeats)
    out["vit_wasi"]["train_step_ratio_vs_vit_full"] = cmp.ratio("vit_wasi", "vit_full")
    out["steps"], out["batch_size"] = steps, batch_size
    print("4-D case:", {k: v["test_accuracy"] for k, v in out.items() if isinstance(v, dict)},
          cmp.table(), sep="\n", flush=True)
    return out
