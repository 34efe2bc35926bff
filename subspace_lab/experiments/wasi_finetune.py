"""WASI against vanilla, vanilla + remat and LoRA r8: MiniLM on pydoc topics; one 4-D case.

    subspace-jax run wasi_finetune --recorded-baselines        # headline, full budget
    subspace-jax run wasi_finetune --quick --sweep 0.4 0.5 0.6 0.7 0.8 0.9 --vit-steps 300
    subspace-jax run wasi_finetune --quick                     # a few minutes

Every run fine-tunes the same pretrained all-MiniLM-L6-v2 with the same steps, seed, batches
and evaluation texts (:func:`subspace_lab.baselines.train_text_classifier`). WASI's headline
is eps 0.9 for the weights and the activations (``wasi``); ``wasi_knap`` takes the paper's
calibration table and knapsack under 5% of the full activation bytes instead, and
``wasi_master`` the paper code's master-weight variant. WASI trains at its own lr, 1e-4
(picked on validation); ``--wasi-lr`` adds ``wasi_lr<LR>``, ``wasi_knap_lr<LR>`` and
``wasi_master_lr<LR>`` at other learning rates. Per run it
records accuracy, the whole-step compiled memory and the residuals saved for backward with
a breakdown by kind (Tucker cores and factors, (B, T, 1536) MLP hidden, (B, T, 384) hidden,
attention scores, other), the converted layers' activation memory both measured (residual
bytes that exist for their weight gradient) and analytic (the paper's count), train and
inference FLOPs, and train-step and inference times measured alternately in one process
(:func:`subspace_jax.measure.compare`) as ratios to vanilla. ``--recorded-baselines`` does
not retrain vanilla, remat and LoRA: their step is compiled and timed here, and their
accuracy is read from the recorded ``results/minilm_finetune_{full,lora}.json`` of the same
budget (remat computes the same function as vanilla). Runs whose name ends in ``_remat``
are measured, not trained (remat changes memory and time, not the maths). ``--vit-steps``
adds the 4-D case: a digits ViT whose MLPs see a ``(B, H, W, C)`` patch grid, WASI against
vanilla. Writes ``results/<name>.json`` and ``.png`` (memory-time plane with accuracy
labels; accuracy against activation memory).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from subspace_jax import data, forms, measure, rules, train, wasi
from subspace_jax import nn as sjnn
from subspace_lab import analysis, baselines, records, rows, runner
from subspace_jax.models import bert, vit

MLP_RULE = r"bert/encoder/layers/\d+/mlp/(up|down)/kernel"
ATTN_RULE = r"bert/encoder/layers/\d+/attn/(q|k|v|o)/kernel"
_MIB = 2**20


# --- methods ------------------------------------------------------------------------------------

def _calibration_batch(cfg: baselines.FinetuneConfig) -> dict[str, jax.Array]:
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
        batch = _calibration_batch(cfg)
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


class RematLayer(bert.Layer):
    """A BERT layer whose forward is rematerialised in backward (``nnx.remat``, with the
    class attribute ``policy``: None recomputes everything but the layer's inputs).

    The state that WASI's forms emit inside (their refreshed activation bases) is collected
    inside the rematerialised function and returned by it, then emitted again outside: a
    value may not leave ``jax.checkpoint`` by a side channel."""

    policy = None

    def __call__(self, x, mask, *, deterministic, rngs):
        def body(layer, x, mask, rngs):
            with forms.collect() as emitted:
                y = bert.Layer.__call__(layer, x, mask, deterministic=deterministic, rngs=rngs)
            return y, dict(emitted)

        y, emitted = nnx.remat(body, policy=self.policy)(self, x, mask, rngs)
        for key, value in emitted.items():
            forms.emit(key, value)
        return y


class RematNonLinear(RematLayer):
    """Remat of the non-linear parts only: every matmul output without batch dimensions is
    saved, so GELU, LayerNorm, softmax and the attention products are recomputed."""

    policy = staticmethod(jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


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


def methods(sweep: list[float], attention: bool, energies: list[float] = (),
            lrs: list[float] = ()) -> list[baselines.Method]:
    full = baselines.Method(name="full", lr=5e-5, quick_lr=2e-4)
    out = [full, remat_method(), remat_method(nonlinear=True), baselines.lora_method(),
           wasi_method(name="wasi"), wasi_method(activation_eps=None)]
    out += [remat_method(out[4]), remat_method(out[4], nonlinear=True)]
    if attention:
        out.append(wasi_method(attention=True, name="wasi_attn"))
    out += [wasi_method(activation_eps=e) for e in sweep if e != 0.9]
    out += [wasi_method(energy=e, name=f"wasi_w{e:g}") for e in energies]
    out.append(wasi_method(variant="master", name="wasi_master"))
    for lr in lrs:     # WASI's own learning rate (LoRA has its own too), picked on val
        if not lr > 0:
            raise ValueError(f"--wasi-lr {lr:g}: a learning rate must be positive")
        out += [wasi_method(lr=lr, quick_lr=lr, name=f"wasi_lr{lr:g}"),
                wasi_method(activation_eps=None, lr=lr, quick_lr=lr,
                            name=f"wasi_knap_lr{lr:g}"),
                wasi_method(variant="master", lr=lr, quick_lr=lr,
                            name=f"wasi_master_lr{lr:g}")]
    return out


#: Recorded runs of the same full budget whose accuracy ``--recorded-baselines`` reuses.
RECORDED_BASELINES = {"full": "minilm_finetune_full.json", "remat": "minilm_finetune_full.json",
                      "remat_nonlinear": "minilm_finetune_full.json",
                      "lora": "minilm_finetune_lora.json"}
_SAME = ("steps", "batch_size", "max_length", "seed", "epochs", "lora_rank", "lora_alpha")


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


def _freeze_mlp(mask):
    pattern = rules.Rule(pattern=MLP_RULE)
    return rules.map_with_path(
        lambda path, v: jax.tree.map(lambda _: False, v) if pattern.matches(path) else v, mask)


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
    tucker = kinds.get("tucker (WASI core + factors)", 0)
    if tucker:
        mlp_measured = tucker
    else:
        mlp_measured = res.nbytes_excluding_arguments - residuals(
            _freeze_mlp(mask)).nbytes_excluding_arguments
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


# --- the experiment -----------------------------------------------------------------------------

def parse(argv=None) -> argparse.Namespace:
    p = runner.parser(__name__, __doc__, quick="short runs on subsets", name="wasi", sizes=SIZES)
    p.add_argument("--steps", type=int, help="training steps of every run")
    p.add_argument("--epochs", type=int)
    p.add_argument("--eval-limit", type=int)
    p.add_argument("--evals", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--train-limit", type=int)
    p.add_argument("--num-layers", type=int, help="keep only the first encoder layers")
    p.add_argument("--sweep", type=float, nargs="*", default=[],
                   help="extra WASI runs at one activation eps each (weight eps stays 0.9)")
    p.add_argument("--energy", type=float, nargs="*", default=[],
                   help="extra WASI runs at these weight eps (activation budget stays 5%%)")
    p.add_argument("--wasi-lr", type=float, nargs="*", default=[],
                   help="add WASI runs at these peak learning rates (wasi_lr<LR>, "
                        "wasi_knap_lr<LR>, wasi_master_lr<LR>; the default is 1e-4)")
    p.add_argument("--attention", action="store_true",
                   help="also a WASI run converting the attention projections")
    p.add_argument("--recorded-baselines", action="store_true",
                   help="measure full/remat/LoRA here but take their accuracy from the recorded "
                        "full-budget results instead of retraining them")
    p.add_argument("--vit-steps", type=int, default=0,
                   help="also the 4-D case (digits ViT, MLP on a patch grid) for this many steps")
    p.add_argument("--only", nargs="*", help="run only these method names")
    p.add_argument("--repeats", type=int, default=8, help="timed rounds of measure.compare")
    return runner.parse(p, argv)


def measured_run(cfg: baselines.FinetuneConfig, method: baselines.Method, key) -> baselines.Run:
    """The converted model and its step measured (:func:`subspace_jax.train.measure_step`)
    without training: for runs whose accuracy is that of another run (remat) or recorded."""
    model = baselines.build_classifier(cfg, data.load_pydoc_topics().num_classes)
    ready = method.prepare(model, cfg, cfg.steps or 100)
    # donated like the training loop's step (its compiled memory is comparable); not run
    measures = train.measure_step(ready.step(donate=True), ready.loss, ready.step_graphdef,
                                  ready.params, ready.init_optimizer(), ready.rest,
                                  _calibration_batch(cfg), key, mask=ready.mask)
    result = {"mode": method.name, "trained": False, "lr": method.learning_rate(cfg),
              "config": dataclasses.asdict(cfg), **measures}
    return baselines.Run(result=result, graphdef=ready.graphdef, params=ready.params,
                         rest=ready.rest)


def _accuracy_from(result: dict[str, Any], source: dict[str, Any], label: str) -> None:
    for k in ("steps", "val_accuracy", "test_accuracy", "val_loss", "test_loss",
              "median_step_seconds"):
        if k in source:
            result[k] = source[k]
    result["accuracy_from"] = label


def _recorded(name: str, cfg: baselines.FinetuneConfig, results_dir) -> dict[str, Any]:
    path = results_dir / RECORDED_BASELINES[name]
    rec = json.loads(path.read_text())
    want = dataclasses.asdict(cfg)
    steps = baselines.num_steps(cfg)
    diff = {k: (rec["config"].get(k), want[k]) for k in _SAME
            if k != "steps" and rec["config"].get(k) != want[k]}
    if diff or rec["steps"] != steps:
        raise ValueError(f"--recorded-baselines: {path.name} differs from this budget: {diff}, "
                         f"steps {rec['steps']} vs {steps}")
    return rec


def run_all(args) -> dict[str, Any]:
    keys = ("steps", "epochs", "eval_limit", "evals", "seed", "batch_size", "max_length",
            "train_limit", "num_layers")
    settings = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    chosen = [m for m in methods(args.sweep, args.attention, args.energy, args.wasi_lr)
              if not args.only or m.name in args.only]
    runs, timing_fns, infer_fns = {}, {}, {}
    key = jax.random.key(args.seed)
    for method in chosen:
        cfg = baselines.FinetuneConfig.make(quick=args.quick, mode=method.name, **settings)
        start = time.perf_counter()
        recorded = args.recorded_baselines and method.name in RECORDED_BASELINES
        if recorded or "remat" in method.name:
            run = measured_run(cfg, method, key)
        else:
            run = baselines.train_text_classifier(cfg, method=method,
                                                  progress=not args.no_progress)
        batch = _calibration_batch(cfg)
        result = dict(run.result)
        if recorded:
            _accuracy_from(result, _recorded(method.name, cfg, args.results_dir),
                           "recorded " + RECORDED_BASELINES[method.name])
        elif "remat" in method.name:
            base = method.name.replace("_remat_nonlinear", "").replace("_remat", "")
            base = "full" if base in ("remat", "remat_nonlinear") else base
            if base in runs:
                _accuracy_from(result, runs[base], f"{base} (same function, rematerialised)")
        result.update(residual_report(run, method, cfg, batch, key))
        result.update(analytic_mlp_bytes(run, batch))
        (step, step_args), (infer, infer_args) = step_functions(run, method, cfg, batch, key)
        result["flops_inference_matmul"] = measure.flops(infer, *infer_args).matmul
        result["run_seconds"] = time.perf_counter() - start
        timing_fns[method.name], infer_fns[method.name] = (step, step_args), (infer, infer_args)
        runs[method.name] = result
        records.write_result(args.name, {"runs": runs, "partial": True},  # if cut short
                                results_dir=args.results_dir)
        print(f"{method.name}: test acc {result.get('test_accuracy', float('nan')):.4f} "
              f"({result.get('accuracy_from', 'trained here')}), "
              f"{result['run_seconds']:.0f} s", flush=True)
    out = {"runs": runs, "baseline": next(iter(runs), None),
           "settings": {**settings, "quick": args.quick,
                        "recorded_baselines": args.recorded_baselines},
           "command": "subspace-jax run wasi_finetune " + " ".join(sys.argv[1:])}
    if args.vit_steps:
        out["vit_4d"] = vit_case(args.vit_steps, args.seed, args.repeats)
    if not runs:    # e.g. --only vit: the 4-D case alone
        return out
    names = list(runs)
    steps_cmp = measure.compare(timing_fns, warmup=2, repeats=args.repeats)
    infer_cmp = measure.compare(infer_fns, warmup=2, repeats=2 * args.repeats)
    print(steps_cmp.table(), infer_cmp.table(), sep="\n")
    base = names[0]
    for name in names:
        runs[name]["train_step_seconds_compare"] = steps_cmp.median(name)
        runs[name]["train_step_ratio_vs_" + base] = steps_cmp.ratio(name, base)
        runs[name]["inference_seconds_compare"] = infer_cmp.median(name)
        runs[name]["inference_ratio_vs_" + base] = infer_cmp.ratio(name, base)
    return out


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
        tucker = sum(r.nbytes for r in measure.saved_residuals(
            lambda p: loss(nnx.merge(graphdef, p, rest, copy=True), calib, key), params).items
            if "'compress'" in r.source)
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


def table(result: dict[str, Any]) -> str:
    base = result["baseline"]
    rows = [("run", "test acc", "val acc", "step MiB", "resid MiB", "MLP act meas.",
             "MLP act paper", "train GFLOP", "infer GFLOP", "step x", "infer x")]
    for name, r in result["runs"].items():
        rows.append((name, f"{r['test_accuracy']:.3f}", f"{r['val_accuracy']:.3f}",
                     f"{r['compiled_memory']['total'] / _MIB:.0f}",
                     f"{r['residual_bytes'] / _MIB:.1f}",
                     f"{r['mlp_activation_bytes_measured'] / _MIB:.2f}",
                     f"{r['mlp_activation_bytes_analytic'] / _MIB:.2f}",
                     f"{r['flops_matmul'] / 1e9:.1f}", f"{r['flops_inference_matmul'] / 1e9:.2f}",
                     f"{r['train_step_ratio_vs_' + base]:.2f}",
                     f"{r['inference_ratio_vs_' + base]:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(" | ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)


def plot(path: Path, result: dict[str, Any]) -> None:
    plt = analysis.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    base = result["baseline"]
    for name, r in result["runs"].items():
        mem = r["compiled_memory"]["total"] / _MIB
        axes[0].scatter(mem, r["train_step_ratio_vs_" + base])
        axes[0].annotate(f"{name}\nacc {r['test_accuracy']:.3f}",
                         (mem, r["train_step_ratio_vs_" + base]), fontsize=8)
        axes[1].scatter(r["residual_bytes"] / _MIB, r["test_accuracy"])
        axes[1].annotate(name, (r["residual_bytes"] / _MIB, r["test_accuracy"]), fontsize=8)
    axes[0].set(xlabel="compiled train-step memory (MiB)",
                ylabel=f"train-step time / {base} (measure.compare)",
                title="memory-time plane (labels: test accuracy)")
    axes[1].set(xlabel="residuals saved for backward (MiB)", ylabel="test accuracy",
                title="accuracy against activation memory")
    fig.tight_layout()
    analysis.save(fig, path)


def main(argv=None) -> int:
    args = parse(argv)
    result = run_all(args)
    path = records.write_result(args.name, result, results_dir=args.results_dir)
    if result["runs"]:
        plot(path.with_suffix(".png"), result)
        print(table(result))
    print(f"wrote {path}")
    return 0


# --- bench protocol and demo rows -----------------------------------------------------------

_TINY = ["--steps", "2", "--num-layers", "1", "--batch-size", "4", "--max-length", "16",
         "--train-limit", "32", "--eval-limit", "8", "--evals", "1", "--repeats", "1"]
#: ``subspace-jax bench wasi`` argv per size ("full": the recorded headline of README).
SIZES: dict[str, list[str]] = {
    "tiny": _TINY + ["--only", "full", "wasi"],
    "small": ["--quick", "--repeats", "3", "--only", "full", "remat", "lora", "wasi"],
    "full": ["--recorded-baselines", "--repeats", "6", "--only", "full", "remat",
             "remat_nonlinear", "lora", "wasi", "wasi_knap", "wasi_remat",
             "wasi_remat_nonlinear"],
}
_LABELS = {"full": "full fine-tuning", "remat": "full FT + remat (per layer)",
           "remat_nonlinear": "full FT + remat of the non-linear parts", "lora": "LoRA r8",
           "wasi": "WASI eps 0.9 (MLP; weights and activations)",
           "wasi_knap": "WASI eps 0.9 weights, knapsack activations (5%)",
           "wasi_attn": "WASI eps 0.9 (MLP + attention)",
           "wasi_master": "WASI eps 0.9, master-weight variant",
           "wasi_remat": "WASI eps 0.9 + remat (per layer)",
           "wasi_remat_nonlinear": "WASI eps 0.9 + remat of the non-linear parts"}


def _label(name: str) -> str:
    if name in _LABELS:
        return _LABELS[name]
    if name.startswith("wasi_e"):
        return f"WASI weights 0.9, activations eps {name[6:]}"
    for prefix in ("wasi_knap", "wasi_master", "wasi"):  # --wasi-lr runs
        if name.startswith(prefix + "_lr"):
            return f"{_LABELS[prefix]}, lr {name[len(prefix) + 3:]}"
    return name


def bench_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per run against the result's baseline run (vanilla full fine-tuning)."""
    base = result["baseline"]
    b = result["runs"][base]
    rows = []
    for name, r in result["runs"].items():
        if name == base:
            continue
        acc = r.get("test_accuracy")
        quality = (f"test acc {acc:.3f} vs {b['test_accuracy']:.3f}" if acc is not None
                   else "not trained")
        if r.get("accuracy_from"):
            quality += f" ({r['accuracy_from']})"
        rows.append({"method": name.split("_")[0] if name.startswith(("wasi", "lora")) else
                     "baseline", "run": _label(name), "baseline": _label(base),
                     "quality": quality,
                     "memory_ratio": r["compiled_memory"]["total"] / b["compiled_memory"]["total"],
                     "flops_ratio": r["flops_matmul"] / b["flops_matmul"],
                     "time_ratio": r.get("train_step_ratio_vs_" + base),
                     "what": "train step compiled memory; train-step matmul FLOPs; step time "
                             "(measure.compare)"})
    return rows


def demo_rows(budget, progress: bool) -> list[dict[str, Any]]:
    """The live demo row: WASI (weight and activation eps 0.9, MLP Linears) at the shared
    quick budget."""
    result = baselines.finetune_text_classifier(method=wasi_method(name="wasi"), progress=progress,
                                                **budget.finetune())
    return [rows.row("WASI eps 0.9 (MLP)", result)]


def recorded_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The trained WASI rows of ``results/wasi.json`` in the demo's format (its baselines are
    the demo's own rows), labelled with the steps they trained."""
    return [rows.row(f"{_label(name)} ({r['steps']} steps)", r)
            for name, r in result["runs"].items()
            if name.startswith("wasi") and "remat" not in name and "test_accuracy" in r]


RECORDED = {"wasi.json": recorded_rows}


if __name__ == "__main__":
    sys.exit(main())
