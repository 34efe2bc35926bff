"""Pretrain a small Llama decoder on the standard library's source; perplexity vs unigram.

    subspace-jax run lm_pretrain [--preset 1m] [--steps N] [--quick]

Writes ``results/lm_pretrain[_quick].json`` and ``.png`` (training and validation loss,
unigram baseline), and the trained parameters, ``config.json`` and ``tokenizer.json`` under
``results/checkpoints/lm_pretrain[_quick]/`` (git-ignored; reload with
``subspace_lab.pretrain.load_lm``).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from subspace_lab import analysis, pretrain, records, runner


def parse(argv=None) -> argparse.Namespace:
    p = runner.parser(__name__, __doc__, quick="short run on a 300 kB corpus", seed=None)
    p.add_argument("--preset", help="model size: 1m, 5m, 20m, 100m")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--max-bytes", type=int)
    p.add_argument("--eval-batches", type=int)
    p.add_argument("--evals", type=int)
    p.add_argument("--checkpoint-dir", type=Path, help="default: <results>/checkpoints/<name>")
    return runner.parse(p, argv)


def main(argv=None) -> int:
    args = parse(argv)
    fields = {f for f in pretrain.LMConfig.__dataclass_fields__ if f != "quick"}
    settings = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    name = args.name or "lm_pretrain" + ("_quick" if args.quick else "")
    ckpt = args.checkpoint_dir or args.results_dir / "checkpoints" / name
    result = pretrain.pretrain_lm(quick=args.quick, progress=not args.no_progress,
                                   checkpoint_dir=ckpt, **settings)
    path = records.write_result(name, result, results_dir=args.results_dir)
    hist, steps = result["history"], result["config"]["steps"]
    unigram = math.log(result["unigram_perplexity"])
    analysis.plot_curves(path.with_suffix(".png"), {"loss (nats / token)": {
        "train": (range(1, len(hist["losses"]) + 1), hist["losses"]),
        "validation": ([e["step"] for e in hist["evals"]], [e["val_loss"] for e in hist["evals"]]),
        "unigram (validation)": ([1, steps], [unigram, unigram]),
    }}, title=f"Llama {result['config']['preset']} on stdlib source", logy=())
    cfg = result["model_config"]
    print(f"\nLlama preset {result['config']['preset']}: dim {cfg['dim']}, depth {cfg['depth']}, "
          f"{result['model_params']:,} params, vocab {cfg['vocab_size']}")
    rows = [("tokens seen", f"{result['tokens_seen']:,} (train split "
                            f"{result['tokens']['train']:,})"),
            ("val perplexity", f"{result['val_perplexity']:.2f}"),
            ("unigram perplexity", f"{result['unigram_perplexity']:.2f} (same tokens)"),
            ("median step", f"{result['median_step_seconds']:.3f} s"),
            ("compiled step memory", f"{result['compiled_memory']['total'] / 2**20:.1f} MiB"),
            ("residuals", f"{result['residual_bytes'] / 2**20:.1f} MiB"),
            ("total time", f"{result['total_seconds']:.0f} s"),
            ("checkpoint", result["checkpoint"])]
    for key, value in rows:
        print(f"  {key:<22} {value}")
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
