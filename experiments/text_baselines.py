"""Majority-class and bag-of-words (TF-IDF + logistic regression) baselines on pydoc topics.

    python experiments/text_baselines.py [--quick] [--eval-limit N]

Writes ``results/text_baselines[_quick].json`` and a bar chart ``.png``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from subspace_jax import baselines, experiment

RESULTS = Path(__file__).resolve().parents[1] / "results"


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one C instead of a search on val")
    p.add_argument("--seed", type=int, default=0, help="seed of the eval subsets")
    p.add_argument("--eval-limit", type=int, help="evaluate on seeded val/test subsets")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--name", help="result file stem")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    result = baselines.text_baselines(quick=args.quick, seed=args.seed, eval_limit=args.eval_limit)
    name = args.name or "text_baselines" + ("_quick" if args.quick else "")
    path = experiment.write_result(name, result, results_dir=args.results_dir)
    groups = {label: {"val": result[key]["val_accuracy"], "test": result[key]["test_accuracy"]}
              for key, label in (("majority", "majority class"), ("bag_of_words", "bag of words"))}
    experiment.plot_bars(path.with_suffix(".png"), groups, ylabel="accuracy",
                         title="pydoc topics: text baselines")
    print(f"\npydoc topics: {result['num_train']} train, {result['num_val']} val, "
          f"{result['num_test']} test texts, {len(result['label_names'])} classes")
    print(f"  {'baseline':<16} {'val acc':>8} {'test acc':>9}")
    for label, accs in groups.items():
        print(f"  {label:<16} {accs['val']:>8.4f} {accs['test']:>9.4f}")
    bow = result["bag_of_words"]
    print(f"  (majority class: {result['majority']['class']}; bag of words: C={bow['C']:g}, "
          f"{bow['features']:,} features)")
    print(f"wrote {path} and {path.with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
