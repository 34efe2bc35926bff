"""Fine-tune pretrained all-MiniLM-L6-v2 on pydoc topics, fully or with LoRA.

    subspace-jax run minilm_finetune --mode full
    subspace-jax run minilm_finetune --mode lora
    subspace-jax run minilm_finetune --mode lora --quick      # a couple of minutes

Writes ``results/minilm_finetune_<mode>[_quick].json`` (accuracies, step measurements,
history, environment) and the matching ``.png`` (training loss, validation accuracy).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from subspace_lab import analysis, baselines, records, runner


def parser(module: str = __name__, doc: str = __doc__) -> argparse.ArgumentParser:
    """The flags (a method's own experiment adds its flags and its ``doc``)."""
    p = runner.parser(module, doc, quick="short run on subsets", seed=None)
    p.add_argument("--mode", choices=sorted(baselines.METHODS), default="full")
    p.add_argument("--epochs", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--lora-rank", type=int)
    p.add_argument("--train-limit", type=int)
    p.add_argument("--eval-limit", type=int)
    p.add_argument("--evals", type=int, help="validation evaluations during training")
    p.add_argument("--num-layers", type=int, help="keep only the first encoder layers")
    return p


def parse(argv=None) -> argparse.Namespace:
    return runner.parse(parser(), argv)


def smooth(values, window: int = 10) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    window = max(1, min(window, len(values)))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def main(argv=None, *, method: baselines.Method | None = None,
         args: argparse.Namespace | None = None) -> int:
    """Run, write and print; ``method`` replaces ``--mode`` (a method's own experiment passes
    it, and ``args`` when it parsed flags of its own)."""
    args = parse(argv) if args is None else args
    if method is not None:
        args.mode = method.name
    fields = {f for f in baselines.FinetuneConfig.__dataclass_fields__ if f != "quick"}
    settings = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    result = baselines.finetune_text_classifier(quick=args.quick, progress=not args.no_progress,
                                                method=method, **settings)
    name = args.name or f"minilm_finetune_{args.mode}" + ("_quick" if args.quick else "")
    path = records.write_result(name, result, results_dir=args.results_dir)
    hist = result["history"]
    losses = hist["losses"]
    curves = {"train": (range(1, len(losses) + 1), losses)}
    if len(losses) >= 10:
        curves["train (10-step mean)"] = (range(10, len(losses) + 1), smooth(losses))
    evals = hist["evals"]
    analysis.plot_curves(path.with_suffix(".png"), {
        "training loss": curves,
        "validation accuracy": {"val": ([e["step"] for e in evals],
                                        [e["val_accuracy"] for e in evals])},
    }, title=f"MiniLM {args.mode} fine-tuning on pydoc topics")
    mem = result["compiled_memory"]
    print(f"\nMiniLM {args.mode}: {result['steps']} steps of {result['config']['batch_size']} "
          f"({result['epochs_seen']:.2f} epochs), lr {result['lr']:g}")
    rows = [("val accuracy", f"{result['val_accuracy']:.4f}"),
            ("test accuracy", f"{result['test_accuracy']:.4f}"),
            ("median step", f"{result['median_step_seconds']:.3f} s"),
            ("compiled step memory", f"{mem['total'] / 2**20:.1f} MiB (temp "
                                     f"{mem['temp'] / 2**20:.1f} MiB)"),
            ("residuals", f"{result['residual_bytes'] / 2**20:.1f} MiB"),
            ("matmul FLOPs / step", f"{result['flops_matmul']:.3e}"),
            ("trainable params", f"{result['trainable_params']:,} of {result['model_params']:,}"),
            ("optimizer state", f"{result['optimizer_state_bytes'] / 2**20:.2f} MiB"),
            ("val loss", f"{result['val_loss_initial']:.4f} before -> {result['val_loss']:.4f}"),
            ("total time", f"{result['total_seconds']:.0f} s")]
    for key, value in rows:
        print(f"  {key:<22} {value}")
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
