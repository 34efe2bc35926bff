"""WASI against vanilla, vanilla + per-layer remat and LoRA r8: MiniLM on pydoc topics.

    python experiments/wasi_finetune.py                      # headline: 4 runs, same budget
    python experiments/wasi_finetune.py --sweep 0.4 0.6 0.8  # + WASI at other activation eps
    python experiments/wasi_finetune.py --quick              # a few minutes

Every run fine-tunes the same pretrained all-MiniLM-L6-v2 with the same steps, seed, batches
and evaluation texts (:func:`subspace_jax.baselines.train_text_classifier`). Per run it
records accuracy, the whole-step compiled memory and the residuals saved for backward with
a breakdown by kind (Tucker cores and factors, (B, T, 1536) MLP hidden, (B, T, 384) hidden,
attention scores, other), the converted layers' activation memory both measured (residual
bytes that exist for their weight gradient) and analytic (the paper's count), train and
inference FLOPs, and, after training, train-step and inference times measured alternately in
one process (:func:`subspace_jax.measure.compare`) as ratios to vanilla. Writes
``results/wasi.json`` and ``results/wasi.png`` (memory-time plane, accuracy labels).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from subspace_jax import baselines, data, experiment, measure, rules, train, wasi
from subspace_jax.models import bert

RESULTS = Path(__file__).resolve().parents[1] / "results"
MLP_RULE = r"bert/encoder/layers/\d+/mlp/(up|down)/kernel"
ATTN_RULE = r"bert/encoder/layers/\d+/attn/(q|k|v|o)/kernel"
_MIB = 2**20


# --- methods ------------------------------------------------------------------------------------

def _calibration_batch(cfg: baselines.FinetuneConfig) -> dict[str, jax.Array]:
    topics = data.load_pydoc_topics()
    n = cfg.batch_size
    arrays = baselines._encode(list(topics.train.texts[:n]), topics.train.labels[:n],
                               cfg.max_length)
    return {k: jnp.asarray(v) for k, v in arrays.items()}


def wasi_method(*, energy: float = 0.9, activation_eps: float | None = None,
                budget_fraction: float | None = 0.05, attention: bool = False,
                variant: str = "factored", name: str | None = None) -> baselines.Method:
    """A :class:`~subspace_jax.baselines.Method` converting MiniLM's MLP (and optionally
    attention) Linears with :func:`subspace_jax.wasi.convert`, calibrated on the first
    training texts; everything else trains as in full fine-tuning (as in the paper).

    Activation ranks: one ``activation_eps`` for every layer, or (default) the paper's
    calibration table and knapsack under a budget of ``budget_fraction`` of the converted
    layers' full float32 inputs (0.05: at least 20x smaller)."""
    patterns = [MLP_RULE] + ([ATTN_RULE] if attention else [])

    def convert(model, cfg, key):
        batch = _calibration_batch(cfg)
        b, t = batch["input_ids"].shape
        budget = None
        if activation_eps is None:
            full = 0
            for layer in model.bert.encoder.layers:
                linears = [layer.mlp.up, layer.mlp.down]
                if attention:
                    linears += [getattr(layer.attn, n) for n in "qkvo"]
                full += sum(4 * b * t * lin.in_features for lin in linears)
            budget = int(budget_fraction * full)

        def sample(m):
            return train.cross_entropy(baselines._logits(m, batch), batch["labels"])

        return wasi.convert(model, [rules.Rule(pattern=p) for p in patterns], energy,
                            sample=sample, activation_eps=activation_eps,
                            budget_bytes=budget, variant=variant)

    label = name or (f"wasi_e{activation_eps:g}" if activation_eps is not None else "wasi")
    return baselines.Method(name=label, convert=convert, post_update=wasi.post_update,
                            lr=5e-5, quick_lr=2e-4)


class RematLayer(bert.Layer):
    """A BERT layer whose forward is rematerialised in backward (``nnx.remat``)."""

    def __call__(self, x, mask, *, deterministic, rngs):
        def body(layer, x, mask, rngs):
            return bert.Layer.__call__(layer, x, mask, deterministic=deterministic, rngs=rngs)

        return nnx.remat(body)(self, x, mask, rngs)


def remat_method() -> baselines.Method:
    """Full fine-tuning with every encoder layer under ``jax.checkpoint``."""

    def convert(model, cfg, key):
        model = nnx.clone(model)
        for layer in model.bert.encoder.layers:
            layer.__class__ = RematLayer
        return model

    return baselines.Method(name="remat", convert=convert, lr=5e-5, quick_lr=2e-4)


def methods(sweep: list[float], attention: bool, energies: list[float] = ()
            ) -> list[baselines.Method]:
    out = [baselines.Method(name="full", lr=5e-5, quick_lr=2e-4), remat_method(),
           baselines.lora_method(), wasi_method(name="wasi")]
    out += [wasi_method(activation_eps=e) for e in sweep]
    out += [wasi_method(energy=e, name=f"wasi_w{e:g}") for e in energies]
    if attention:
        out.append(wasi_method(attention=True, name="wasi_attn"))
    return out


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


def residual_report(run: baselines.Run, method: baselines.Method, batch, key) -> dict[str, Any]:
    """Residual bytes by kind, and the converted (MLP) layers' activation bytes measured: the
    Tucker residuals for WASI, else the residual bytes that freezing the MLP kernels removes
    (what their weight gradients keep)."""
    b, t = batch["input_ids"].shape
    loss = method.loss or baselines.classifier_loss
    objective = _objective(run.graphdef, loss, key)
    mask = train.trainable_mask(run.params, train=method.train)

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
    plans = getattr(model, "wasi_plans", ())
    full = 0
    for layer in model.bert.encoder.layers:
        full += wasi.calibration.activation_bytes((b, t, layer.mlp.up.in_features))
        full += wasi.calibration.activation_bytes((b, t, layer.mlp.down.in_features))
    mlp = [p for p in plans if "/mlp/" in f"/{p.path}/"]
    kept = sum(p.compressed_bytes for p in mlp) if mlp else full
    return {"mlp_activation_bytes_analytic": kept, "mlp_activation_bytes_analytic_full": full}


def step_functions(run: baselines.Run, method: baselines.Method, cfg, batch, key):
    """Non-donating train step with its arguments, and the inference forward with its."""
    lr = method.learning_rate(cfg)
    tx = method.optimizer(cfg, lr, cfg.steps or 100)
    mask = train.trainable_mask(run.params, train=method.train)
    step = train.make_train_step(run.graphdef, method.loss or baselines.classifier_loss, tx,
                                 mask=mask, post_update=method.post_update, donate=False)
    opt = train.init_optimizer(tx, run.params, mask)
    graphdef = run.graphdef

    @jax.jit
    def infer(params, rest, batch):
        return baselines._logits(nnx.merge(graphdef, params, rest, copy=True), batch,
                                 deterministic=True)

    return (step, (run.params, opt, run.rest, batch, key)), (infer, (run.params, run.rest, batch))


# --- the experiment -----------------------------------------------------------------------------

def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs on subsets")
    p.add_argument("--steps", type=int, help="training steps of every run")
    p.add_argument("--epochs", type=int)
    p.add_argument("--eval-limit", type=int)
    p.add_argument("--evals", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--train-limit", type=int)
    p.add_argument("--num-layers", type=int, help="keep only the first encoder layers")
    p.add_argument("--sweep", type=float, nargs="*", default=[],
                   help="extra WASI runs at one activation eps each (weight eps stays 0.9)")
    p.add_argument("--energy", type=float, nargs="*", default=[],
                   help="extra WASI runs at these weight eps (activation budget stays 5%%)")
    p.add_argument("--attention", action="store_true",
                   help="also a WASI run converting the attention projections")
    p.add_argument("--only", nargs="*", help="run only these method names")
    p.add_argument("--repeats", type=int, default=8, help="timed rounds of measure.compare")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--name", default="wasi")
    return p.parse_args(argv)


def run_all(args) -> dict[str, Any]:
    keys = ("steps", "epochs", "eval_limit", "evals", "seed", "batch_size", "max_length",
            "train_limit", "num_layers")
    settings = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    chosen = [m for m in methods(args.sweep, args.attention, args.energy)
              if not args.only or m.name in args.only]
    runs, timing_fns, infer_fns = {}, {}, {}
    key = jax.random.key(args.seed)
    for method in chosen:
        cfg = baselines.FinetuneConfig.make(quick=args.quick, mode=method.name, **settings)
        start = time.perf_counter()
        run = baselines.train_text_classifier(cfg, method=method, progress=not args.no_progress)
        batch = _calibration_batch(cfg)
        result = dict(run.result)
        result.update(residual_report(run, method, batch, key))
        result.update(analytic_mlp_bytes(run, batch))
        (step, step_args), (infer, infer_args) = step_functions(run, method, cfg, batch, key)
        result["flops_inference_matmul"] = measure.flops(infer, *infer_args).matmul
        result["run_seconds"] = time.perf_counter() - start
        timing_fns[method.name], infer_fns[method.name] = (step, step_args), (infer, infer_args)
        runs[method.name] = result
        print(f"{method.name}: test acc {result['test_accuracy']:.4f}, step "
              f"{result['median_step_seconds']:.3f} s, {result['run_seconds']:.0f} s", flush=True)
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
    return {"runs": runs, "baseline": base, "settings": {**settings, "quick": args.quick},
            "command": "python experiments/wasi_finetune.py " + " ".join(sys.argv[1:])}


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
    plt = experiment._pyplot()
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
    experiment._save(fig, path)


def main(argv=None) -> int:
    args = parse(argv)
    result = run_all(args)
    path = experiment.write_result(args.name, result, results_dir=args.results_dir)
    plot(path.with_suffix(".png"), result)
    print(table(result))
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return 0


# --- demo rows ----------------------------------------------------------------------------------

def demo_rows(budget, progress: bool) -> list[dict[str, Any]]:
    """The live demo row: WASI (weight eps 0.9, MLP Linears, activation ranks calibrated
    under 5% of the full activation bytes) at the shared quick budget."""
    from subspace_jax import demo
    result = baselines.finetune_text_classifier(method=wasi_method(name="wasi"), progress=progress,
                                                **budget.finetune())
    return [demo._row("WASI eps 0.9 (MLP, act. 5%)", result)]


def recorded_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The WASI rows of ``results/wasi.json`` in the demo's format (its baselines are the
    demo's own rows), labelled with the steps they trained."""
    from subspace_jax import demo
    return [demo._row(f"WASI ({r['steps']} steps)", r) for name, r in result["runs"].items()
            if name.startswith("wasi")]


RECORDED = {"wasi.json": recorded_rows}


if __name__ == "__main__":
    sys.exit(main())
