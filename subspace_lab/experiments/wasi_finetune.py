"""WASI against vanilla, vanilla + remat and LoRA r8: MiniLM on pydoc topics; one 4-D case.

    subspace-jax run wasi_finetune --recorded-baselines        # headline, full budget
    subspace-jax run wasi_finetune --quick --sweep 0.4 0.5 0.6 0.7 0.8 0.9 --vit-steps 300
    subspace-jax run wasi_finetune --quick                     # a few minutes

Every run fine-tunes the same pretrained all-MiniLM-L6-v2 with the same steps, seed, batches
and evaluation texts (:func:`subspace_lab.baselines.train_text_classifier`). WASI's headline
is eps 0.9 for the weights and the activations (``wasi``); ``wasi_knap`` takes the paper's
calibration table and knapsack under 5% of the full activation bytes instead,
``wasi_knap_min`` the paper's scripts' setting (a budget of 0, below every total, so every
layer gets its smallest option), and ``wasi_master`` the paper's algorithm (a master weight,
one subspace-iteration step a step). WASI trains at its own lr, 1e-4
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
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax

from subspace_jax import measure
from subspace_lab import analysis, baselines, records, rows, runner, wasi_eval
_MIB = 2**20


def methods(sweep: list[float], attention: bool, energies: list[float] = (),
            lrs: list[float] = ()) -> list[baselines.Method]:
    full = baselines.Method(name="full", lr=5e-5, quick_lr=2e-4)
    out = [full, wasi_eval.remat_method(), wasi_eval.remat_method(nonlinear=True), baselines.lora_method(),
           wasi_eval.wasi_method(name="wasi"), wasi_eval.wasi_method(activation_eps=None)]
    out += [wasi_eval.remat_method(out[4]), wasi_eval.remat_method(out[4], nonlinear=True)]
    if attention:
        out.append(wasi_eval.wasi_method(attention=True, name="wasi_attn"))
    out += [wasi_eval.wasi_method(activation_eps=e) for e in sweep if e != 0.9]
    out += [wasi_eval.wasi_method(energy=e, name=f"wasi_w{e:g}") for e in energies]
    # the paper's scripts' calibration: a budget below every total, so each layer its smallest
    out.append(wasi_eval.wasi_method(activation_eps=None, budget_fraction=0.0,
                                     name="wasi_knap_min"))
    out.append(wasi_eval.wasi_method(variant="master", name="wasi_master"))
    for lr in lrs:     # WASI's own learning rate (LoRA has its own too), picked on val
        if not lr > 0:
            raise ValueError(f"--wasi-lr {lr:g}: a learning rate must be positive")
        out += [wasi_eval.wasi_method(lr=lr, quick_lr=lr, name=f"wasi_lr{lr:g}"),
                wasi_eval.wasi_method(activation_eps=None, lr=lr, quick_lr=lr,
                            name=f"wasi_knap_lr{lr:g}"),
                wasi_eval.wasi_method(variant="master", lr=lr, quick_lr=lr,
                            name=f"wasi_master_lr{lr:g}")]
    return out


#: Recorded runs of the same full budget whose accuracy ``--recorded-baselines`` reuses.
RECORDED_BASELINES = {"full": "minilm_finetune_full.json", "remat": "minilm_finetune_full.json",
                      "remat_nonlinear": "minilm_finetune_full.json",
                      "lora": "minilm_finetune_lora.json"}
_SAME = ("steps", "batch_size", "max_length", "seed", "epochs", "lora_rank", "lora_alpha")


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
    every = methods(args.sweep, args.attention, args.energy, args.wasi_lr)
    unknown = sorted(set(args.only or ()) - {m.name for m in every} - {"vit"})
    if unknown:
        raise ValueError(f"--only {' '.join(unknown)}: no such run with these flags; the runs "
                         f"are {', '.join(m.name for m in every)}")
    chosen = [m for m in every if not args.only or m.name in args.only]
    runs, timing_fns, infer_fns = {}, {}, {}
    key = jax.random.key(args.seed)
    for method in chosen:
        cfg = baselines.FinetuneConfig.make(quick=args.quick, mode=method.name, **settings)
        start = time.perf_counter()
        recorded = args.recorded_baselines and method.name in RECORDED_BASELINES
        if recorded or "remat" in method.name:
            run = wasi_eval.measured_run(cfg, method, key)
        else:
            run = baselines.train_text_classifier(cfg, method=method,
                                                  progress=not args.no_progress)
        batch = wasi_eval.calibration_batch(cfg)
        result = dict(run.result)
        if recorded:
            _accuracy_from(result, _recorded(method.name, cfg, args.results_dir),
                           "recorded " + RECORDED_BASELINES[method.name])
        elif "remat" in method.name:
            base = method.name.replace("_remat_nonlinear", "").replace("_remat", "")
            base = "full" if base in ("remat", "remat_nonlinear") else base
            if base in runs:
                _accuracy_from(result, runs[base], f"{base} (same function, rematerialised)")
        result.update(wasi_eval.residual_report(run, method, cfg, batch, key))
        result.update(wasi_eval.analytic_mlp_bytes(run, batch))
        (step, step_args), (infer, infer_args) = wasi_eval.step_functions(run, method, cfg, batch, key)
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
        out["vit_4d"] = wasi_eval.vit_case(args.vit_steps, args.seed, args.repeats)
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
    "full": ["--recorded-baselines", "--repeats", "6", "--attention", "--wasi-lr", "5e-5",
             "2e-4", "--only", "full", "remat", "remat_nonlinear", "lora", "wasi", "wasi_knap",
             "wasi_knap_min", "wasi_master", "wasi_master_lr5e-05", "wasi_master_lr0.0002",
             "wasi_attn", "wasi_remat", "wasi_remat_nonlinear"],
}
_LABELS = {"full": "full fine-tuning", "remat": "full FT + remat (per layer)",
           "remat_nonlinear": "full FT + remat of the non-linear parts", "lora": "LoRA r8",
           "wasi": "WASI eps 0.9 (MLP; weights and activations)",
           "wasi_knap": "WASI eps 0.9 weights, knapsack activations (5%)",
           "wasi_knap_min": "WASI eps 0.9 weights, knapsack at the minimum budget (paper's "
                            "calibration)",
           "wasi_attn": "WASI eps 0.9 (MLP + attention)",
           "wasi_master": "WASI (paper): master weight, one subspace-iteration step a step",
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
    result = baselines.finetune_text_classifier(method=wasi_eval.wasi_method(name="wasi"), progress=progress,
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
