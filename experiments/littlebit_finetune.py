"""Fine-tune all-MiniLM-L6-v2 on pydoc topics with its encoder kernels in LittleBit-2 form.

    python experiments/littlebit_finetune.py                   # 1.0 bpw, 2 epochs
    python experiments/littlebit_finetune.py --bpw 0.3 --steps 240
    python experiments/littlebit_finetune.py --quick           # a couple of minutes

Every attention (q, k, v, o) and MLP (up, down) kernel of the pretrained encoder becomes a
:class:`~subspace_jax.littlebit.BinaryLowRank` (Dual-SVID + Joint-ITQ + residual path, rank
from the bit budget); the latent factors and scales, biases, norms and the head train on
the task's cross-entropy (quantisation-aware training through SmoothSign), embeddings stay
frozen as in LittleBit. The reported numbers are for the training form; ``deploy`` packs
the same signs for inference (``experiments/littlebit_compress.py`` measures that path).
Writes ``results/minilm_finetune_littlebit[_quick].json`` and ``.png``; also accepts every
``minilm_finetune.py`` option.

References:
    LittleBit, arXiv 2506.13771; LittleBit-2, arXiv 2603.00042.
"""

from __future__ import annotations

import argparse
import sys

from subspace_jax import baselines, demo, experiment, littlebit, rules

BPW = 1.0
RECORDED_NAME = "minilm_finetune_littlebit.json"


def method(bpw: float = BPW) -> baselines.Method:
    """LittleBit-2 at ``bpw`` on MiniLM's encoder kernels; embeddings frozen."""
    kernels = rules.Rule(pattern=baselines.LORA_PATTERN)

    def convert(model, cfg, key):
        rule = littlebit.LittleBitRule(pattern=baselines.LORA_PATTERN, bpw=bpw)
        return littlebit.convert(model, rule, key=key)

    trained = (kernels, rules.Rule(pattern=r"bert/encoder/.*(bias|scale)"),
               rules.Rule(pattern=r"head/.*"))
    return baselines.Method(name="littlebit", convert=convert, train=trained, lr=1e-4,
                            quick_lr=2e-4)


def demo_rows(budget: demo.Budget, progress: bool) -> list[dict]:
    """The demo's live LittleBit-2 row (1.0 bpw) at the shared budget."""
    result = baselines.finetune_text_classifier(progress=progress, method=method(),
                                                **budget.finetune(mode="littlebit"))
    return recorded_rows(result)


def recorded_rows(result: dict) -> list[dict]:
    """A demo row from a result of this script."""
    return [demo._row(f"MiniLM LittleBit {BPW:g} bpw", result)]


RECORDED = {RECORDED_NAME: recorded_rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--bpw", type=float, default=BPW)
    args, rest = p.parse_known_args(argv)
    return experiment.load_script("minilm_finetune").main(rest, method=method(args.bpw))


if __name__ == "__main__":
    sys.exit(main())
