"""Fine-tune all-MiniLM-L6-v2 on pydoc topics with its encoder kernels in LittleBit-2 form.

    subspace-jax run littlebit_finetune                   # 1.0 bpw, 2 epochs
    subspace-jax run littlebit_finetune --bpw 0.3 --steps 240
    subspace-jax run littlebit_finetune --quick           # a couple of minutes

Every attention (q, k, v, o) and MLP (up, down) kernel of the pretrained encoder becomes a
:class:`~subspace_jax.littlebit.BinaryLowRank` (Dual-SVID + Joint-ITQ + residual path, rank
from the bit budget); the latent factors and scales, biases, norms and the head train on
the task's cross-entropy (quantisation-aware training through SmoothSign), embeddings stay
frozen as in LittleBit. The reported numbers are for the training form; ``deploy`` packs
the same signs for inference (``subspace-jax run littlebit_compress`` measures that path).
Writes ``results/minilm_finetune_littlebit[_quick].json`` and ``.png``; also accepts every
``minilm_finetune.py`` option.

References:
    LittleBit, arXiv 2506.13771; LittleBit-2, arXiv 2603.00042.
"""

from __future__ import annotations

import argparse
import sys

from subspace_jax import littlebit, rules
from subspace_lab import baselines, rows, runner
from subspace_lab.experiments import minilm_finetune

BPW = 1.0
RECORDED_NAME = "minilm_finetune_littlebit.json"


def method(bpw: float = BPW) -> baselines.Method:
    """LittleBit-2 at ``bpw`` on MiniLM's encoder kernels; embeddings frozen."""
    rule = littlebit.LittleBitRule(pattern=baselines.LORA_PATTERN, bpw=bpw)
    also = (rules.Rule(pattern=r"bert/encoder/.*(bias|scale)"), baselines.HEAD)
    return baselines.Method(name="littlebit", lr=1e-4, quick_lr=2e-4,
                            recipe=lambda cfg: littlebit.recipe(rule, train_also=also))


def demo_rows(budget: rows.Budget, progress: bool) -> list[dict]:
    """The demo's live LittleBit-2 row (1.0 bpw) at the shared budget."""
    result = baselines.finetune_text_classifier(progress=progress, method=method(),
                                                **budget.finetune(mode="littlebit"))
    return recorded_rows(result)


def recorded_rows(result: dict) -> list[dict]:
    """A demo row from a result of this script."""
    return [rows.row(f"MiniLM LittleBit {BPW:g} bpw", result)]


RECORDED = {RECORDED_NAME: recorded_rows}


def parse(argv=None) -> argparse.Namespace:
    p = minilm_finetune.parser(__name__, __doc__)
    p.add_argument("--bpw", type=float, default=BPW, help=f"bits per weight (default {BPW})")
    return runner.parse(p, argv)


def main(argv=None) -> int:
    args = parse(argv)
    return minilm_finetune.main(method=method(args.bpw), args=args)


if __name__ == "__main__":
    sys.exit(main())
