"""The demo: every method on one task, live at a shared quick budget, beside recorded runs.

``subspace-jax demo`` fine-tunes pretrained all-MiniLM-L6-v2 on the pydoc-topics
task (classifying Python standard-library docstrings into 11 topics, split by module) and
prints one table: accuracy on val and test, median training-step time, compiled memory of
the step, residual bytes saved for backward, and trainable parameters. Each entry of
:data:`ENTRIES` contributes rows: the baselines (majority class, bag of words, full
fine-tuning, LoRA), then each method as it lands. Every live fine-tuning run shares one
:class:`Budget` (40 steps of 16 texts, 256-text val/test subsets by default), and below the
live table the recorded full-setting runs of each entry are printed with the commands
that made them. ``--methods`` picks entries.

The ``gemma`` entry is not a fine-tuning run: Gemma 3 270M (the float dequantization of
its 4-8-bit GGUF) scores a few hundred held-out standard-library source tokens and
continues a Python prompt greedily; its rows carry a ``note`` instead of accuracies.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from subspace_lab import baselines, experiments, records, runner
from subspace_lab.rows import Budget, row

__all__ = ["Budget", "Entry", "ENTRIES", "RESULTS_DIR", "run", "table", "recorded", "main"]

#: Where the recorded results are read from by default: ``./results``.
RESULTS_DIR = runner.RESULTS_DIR
_EXPLANATION = (
    "Rows share the same val/test texts. step = median seconds per training step; memory = "
    "XLA's compiled step (arguments + outputs - aliased + temporaries); residuals = "
    "activations saved for backward; trainable = parameters the optimizer updates.")
_NOTE_EXPLANATION = (
    "Gemma rows: Gemma 3 270M as the float dequantization of its 4-8-bit GGUF (the baseline "
    "every method on Gemma is compared with); ppl = held-out perplexity, BOS-led windows.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Entry:
    """One group of demo rows: a method (or the baselines).

    Attributes:
        name: the ``--methods`` key.
        live: ``live(budget, progress) -> rows`` runs at the shared budget.
        recorded: result files under ``results/`` and, for each, the function turning the
            JSON into rows.
    """

    name: str
    live: Callable[[Budget, bool], list[dict[str, Any]]]
    recorded: Mapping[str, Callable[[Mapping[str, Any]], list[dict[str, Any]]]]

    @classmethod
    def from_experiment(cls, name: str, stem: str) -> Entry:
        """The entry of a method whose experiment ``stem`` (a module of
        :mod:`subspace_lab.experiments`) defines ``demo_rows(budget, progress)`` and
        ``RECORDED`` (result file -> rows function); imported when the entry is first used.

        Examples:
            >>> Entry.from_experiment("x", "no_such_experiment").live(Budget(), False)
            Traceback (most recent call last):
            ...
            ValueError: no experiment 'no_such_experiment'; the experiments are: ...
        """

        def script() -> Any:
            return experiments.load(stem)

        return cls(name=name, live=lambda budget, progress: script().demo_rows(budget, progress),
                   recorded=_LazyRecorded(script))


class _LazyRecorded(Mapping):
    """``Entry.recorded`` read from a script's ``RECORDED`` on first use."""

    def __init__(self, script: Callable[[], Any]):
        self._script = script

    def _map(self) -> Mapping[str, Any]:
        return self._script().RECORDED

    def __getitem__(self, key: str) -> Any:
        return self._map()[key]

    def __iter__(self):
        return iter(self._map())

    def __len__(self) -> int:
        return len(self._map())


def _baseline_rows(budget: Budget, progress: bool) -> list[dict[str, Any]]:
    base = baselines.text_baselines(quick=budget.quick, seed=budget.seed,
                                    eval_limit=budget.eval_limit)
    full = baselines.finetune_text_classifier(progress=progress, **budget.finetune(mode="full"))
    lora = baselines.finetune_text_classifier(progress=progress, **budget.finetune(mode="lora"))
    return [row("majority class", base["majority"]), row("bag of words", base["bag_of_words"]),
            row("MiniLM full FT", full), row(f"MiniLM LoRA r{lora['config']['lora_rank']}", lora)]


#: The demo's entries in table order; a method adds one ``Entry`` here (usually
#: ``Entry.from_experiment``, naming the experiment that holds its rows).
ENTRIES: dict[str, Entry] = {
    "baselines": Entry(name="baselines", live=_baseline_rows, recorded={
        "text_baselines.json": lambda d: [row("majority class", d["majority"]),
                                          row("bag of words", d["bag_of_words"])],
        "minilm_finetune_full.json": lambda d: [row("MiniLM full FT", d)],
        "minilm_finetune_lora.json": lambda d: [row(f"MiniLM LoRA r{d['config']['lora_rank']}", d)],
    }),
    "lorapre": Entry.from_experiment("lorapre", "lorapre_finetune"),
    "littlebit": Entry.from_experiment("littlebit", "littlebit_finetune"),
    "wasi": Entry.from_experiment("wasi", "wasi_finetune"),
    "nested": Entry.from_experiment("nested", "nested_finetune"),
    "gemma": Entry.from_experiment("gemma", "gemma_eval"),
}


def _entries(methods: Sequence[str] | None) -> list[Entry]:
    names = list(ENTRIES) if methods is None else list(methods)
    unknown = [n for n in names if n not in ENTRIES]
    if unknown:
        raise ValueError(f"demo: unknown methods {unknown}; choose from {sorted(ENTRIES)}")
    return [ENTRIES[n] for n in names]


def run(*, methods: Sequence[str] | None = None, budget: Budget | None = None,
        progress: bool = True) -> dict[str, Any]:
    """Run the live rows of the chosen entries at one shared budget.

    Args:
        methods: :data:`ENTRIES` names (None: all, in order).
        budget: the shared quick budget (None: :class:`Budget` defaults).
        progress: show tqdm bars.

    Returns:
        ``{"rows": [...], "seconds": {entry: s}, "budget": {...}}``; each row has
        ``method``, ``entry``, ``val_accuracy``, ``test_accuracy``, ``step_seconds``,
        ``memory_mib``, ``residual_mib`` and ``trainable_params`` (None where it does not
        apply).

    Raises:
        ValueError: an unknown method name.

    Examples:
        >>> out = run(methods=["baselines"], progress=False)  # doctest: +SKIP
        >>> [row["method"] for row in out["rows"]]  # doctest: +SKIP
        ['majority class', 'bag of words', 'MiniLM full FT', 'MiniLM LoRA r8']
    """
    budget = budget or Budget()
    rows, seconds = [], {}
    for entry in _entries(methods):
        start = time.perf_counter()
        rows += [{**row, "entry": entry.name} for row in entry.live(budget, progress)]
        seconds[entry.name] = time.perf_counter() - start
    return {"rows": rows, "seconds": seconds, "budget": dataclasses.asdict(budget)}


def recorded(results_dir: str | Path = RESULTS_DIR, methods: Sequence[str] | None = None,
             ) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of the full-setting runs recorded in ``results_dir`` by the experiments (``subspace-jax run``).

    Returns:
        ``(rows, sources)``: table rows as in :func:`run` (none for a missing file) and
        one line per file naming the command, machine and date that made it.

    Examples:
        >>> import tempfile
        >>> recorded(tempfile.mkdtemp())
        ([], [])
    """
    directory = Path(results_dir)
    rows, sources = [], []
    for entry in _entries(methods):
        for name, to_rows in entry.recorded.items():
            path = directory / name
            if path.is_file():
                data = json.loads(path.read_text())
                rows += [{**row, "entry": entry.name} for row in to_rows(data)]
                sources.append(_source(path, data))
    return rows, sources


def _source(path: Path, data: Mapping[str, Any]) -> str:
    env = data.get("environment", {})
    return (f"{path.name}: `{records.command(data)}` on {env.get('machine', '?')} "
            f"({env.get('cpu_count', '?')} CPUs, jax {env.get('versions', {}).get('jax', '?')}), "
            f"{env.get('timestamp', '?')[:10]}")


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Format demo rows as a text table; rows with a ``note`` (the Gemma entry's) get it in
    a last column.

    Examples:
        >>> print(table([{"method": "majority class", "val_accuracy": 0.15,
        ...               "test_accuracy": 0.14}]))  # doctest: +NORMALIZE_WHITESPACE
        method          val acc  test acc  step s  memory MiB  residual MiB  trainable
        majority class    0.150     0.140       -           -             -          -
        >>> print(table([{"method": "Gemma 270M", "val_accuracy": None, "test_accuracy": None,
        ...               "note": "ppl 10.6"}]).splitlines()[1])  # doctest: +NORMALIZE_WHITESPACE
        Gemma 270M            -         -       -           -             -          -  ppl 10.6
    """
    head = (f"{'method':<15} {'val acc':>7} {'test acc':>9} {'step s':>7} {'memory MiB':>11} "
            f"{'residual MiB':>13} {'trainable':>10}")
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['method']:<15} {_cell(r['val_accuracy'], '.3f'):>7} "
            f"{_cell(r['test_accuracy'], '.3f'):>9} {_cell(r.get('step_seconds'), '.3f'):>7} "
            f"{_cell(r.get('memory_mib'), '.1f'):>11} {_cell(r.get('residual_mib'), '.1f'):>13} "
            f"{_cell(r.get('trainable_params'), ',d'):>10}"
            + (f"  {r['note']}" if r.get("note") else ""))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="subspace-jax demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(ENTRIES),
                        help=f"comma-separated entries (default: all of {','.join(ENTRIES)})")
    parser.add_argument("--steps", type=int, default=Budget().steps,
                        help="fine-tuning steps of every live run (shared budget)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                        help="where the recorded full-setting results are read")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The demo's arguments, checked (argparse exits with status 2 on a bad one); ``methods``
    becomes the list of entry names."""
    parser = _parser()
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        _entries(args.methods)
    except ValueError as e:
        parser.error(str(e))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """``subspace-jax demo [--methods a,b] [--steps N] [--seed S] [--no-progress]``."""
    args = parse(argv)
    methods = args.methods
    budget = Budget(steps=args.steps, seed=args.seed)
    gemma = ("; gemma: Gemma 3 270M held-out perplexity and greedy decoding"
             if "gemma" in methods else "")
    print(f"pydoc topics, MiniLM: {', '.join(methods)} at a shared budget of {budget.steps} "
          f"steps (seed {budget.seed}){gemma}", flush=True)
    out = run(methods=methods, budget=budget, progress=not args.no_progress)
    print()
    print(table(out["rows"]))
    print(_EXPLANATION)
    if any(row.get("note") for row in out["rows"]):
        print(_NOTE_EXPLANATION)
    print("Live time: " + ", ".join(f"{k} {v:.0f} s" for k, v in out["seconds"].items()))
    rows, sources = recorded(args.results_dir, methods)
    if rows:
        print(f"\nRecorded full-setting runs, from {args.results_dir}:")
        print(table(rows))
        print("\n".join(f"  {line}" for line in sources))
    return 0
