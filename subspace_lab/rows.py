"""The rows of the demo table, and the shared budget of its live runs.

Every experiment that takes part in ``subspace-jax demo`` turns its results into rows with
:func:`row` (fine-tuning runs) or :func:`note_row` (a language model: a note instead of
accuracies), and runs live at the one :class:`Budget`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from subspace_lab import baselines

__all__ = ["Budget", "row", "note_row"]

_MIB = 2.0 ** 20


@dataclasses.dataclass(frozen=True, kw_only=True)
class Budget:
    """The shared quick fine-tuning budget of the live rows.

    Attributes:
        steps: training steps of every live fine-tuning run.
        settings: other :class:`~subspace_lab.baselines.FinetuneConfig` fields shared by
            every run (e.g. ``eval_limit``, ``batch_size``; tests shrink the model here).
        seed: seed of subsets, initialisation and batch order.
        quick: use the quick :class:`~subspace_lab.baselines.FinetuneConfig` defaults.
        gemma: the model of the ``gemma`` entry: ``"full"`` (Gemma 3 270M from the weights
            packages) or ``"tiny"`` (a random ``GemmaConfig.tiny()`` model with a toy
            vocabulary, for tests).

    Examples:
        >>> Budget().finetune(mode="lora")["steps"]
        40
    """

    steps: int | None = 40
    settings: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    quick: bool = True
    gemma: str = "full"

    def finetune(self, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments for :func:`~subspace_lab.baselines.finetune_text_classifier`."""
        steps = {} if self.steps is None else {"steps": self.steps}
        return {"quick": self.quick, "seed": self.seed, **steps, **self.settings, **overrides}

    @property
    def eval_limit(self) -> int | None:
        """The val/test subset size every row uses."""
        return baselines.FinetuneConfig.make(**self.finetune()).eval_limit



def row(name: str, result: Mapping[str, Any]) -> dict[str, Any]:
    """The demo row of a fine-tuning result (accuracies, step time, compiled memory, residual
    bytes, trainable parameters; absent ones are None).

    Examples:
        >>> row("x", {"val_accuracy": 0.5, "test_accuracy": 0.25})["test_accuracy"]
        0.25
    """
    memory = result.get("compiled_memory")
    return {
        "method": name, "val_accuracy": result["val_accuracy"],
        "test_accuracy": result["test_accuracy"],
        "step_seconds": result.get("median_step_seconds"),
        "memory_mib": memory["total"] / _MIB if memory else None,
        "residual_mib": result["residual_bytes"] / _MIB if "residual_bytes" in result else None,
        "trainable_params": result.get("trainable_params"),
    }


def note_row(name: str, note: str) -> dict[str, Any]:
    """A row without fine-tuning columns (a language-model entry): ``note`` says it all."""
    return {"method": name, "val_accuracy": None, "test_accuracy": None, "step_seconds": None,
            "memory_mib": None, "residual_mib": None, "trainable_params": None, "note": note}
