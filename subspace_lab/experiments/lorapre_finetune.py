"""Fine-tune pretrained all-MiniLM-L6-v2 on pydoc topics with the LoRA-Pre optimizer.

    subspace-jax run lorapre_finetune                 # 2 epochs, rank 8 (83 min recorded, 2 shared cores)
    subspace-jax run lorapre_finetune --quick         # a couple of minutes

Every weight trains (as in full fine-tuning); LoRA-Pre keeps the Adam moments of each
matrix with min(in, out) > rank as rank-``r`` factors and gives the other leaves AdamW.
Same schedule, clipping, weight decay, data and seed as the AdamW full fine-tuning
baseline (``subspace-jax run minilm_finetune --mode full``), so the optimizer state lands
between full AdamW and LoRA adapters. Writes ``results/minilm_finetune_lorapre[_quick].json``
and ``.png``; also accepts every ``minilm_finetune.py`` option (``--steps``, ``--lr``, ...).

References:
    LoRA-Pre, arXiv 2602.24283.
"""

from __future__ import annotations

import sys


from subspace_jax import lorapre
from subspace_lab import baselines, rows, runner
from subspace_lab.experiments import minilm_finetune

RANK = 8
RECORDED_NAME = "minilm_finetune_lorapre.json"


def method(rank: int = RANK) -> baselines.Method:
    """LoRA-Pre rank ``rank`` on MiniLM with the AdamW baseline's schedule and clipping."""

    def recipe(cfg: baselines.FinetuneConfig):
        return lorapre.recipe(rank, b2=0.999, weight_decay=cfg.weight_decay,
                              warmup_fraction=cfg.warmup_fraction, clip=1.0, key=cfg.seed)

    return baselines.Method(name="lorapre", recipe=recipe, lr=5e-5, quick_lr=2e-4)


def demo_rows(budget: rows.Budget, progress: bool) -> list[dict]:
    """The demo's live LoRA-Pre row at the shared budget."""
    result = baselines.finetune_text_classifier(progress=progress, method=method(),
                                                **budget.finetune(mode="lorapre"))
    return recorded_rows(result)


def recorded_rows(result: dict) -> list[dict]:
    """A demo row from a result of this script."""
    return [rows.row(f"MiniLM LoRA-Pre r{RANK}", result)]


RECORDED = {RECORDED_NAME: recorded_rows}


def parse(argv=None):
    return runner.parse(minilm_finetune.parser(__name__, __doc__), argv)


def main(argv=None) -> int:
    return minilm_finetune.main(method=method(), args=parse(argv))


if __name__ == "__main__":
    sys.exit(main())
