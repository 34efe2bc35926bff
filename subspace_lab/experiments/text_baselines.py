"""Majority-class and bag-of-words (TF-IDF + logistic regression) baselines on pydoc topics.

    subspace-jax run text_baselines [--quick] [--eval-limit N]

Writes ``results/text_baselines[_quick].json`` and a bar chart ``.png``.
"""

from __future__ import annotations

import argparse
import sys

from subspace_lab import analysis, baselines, records, runner


def parse(argv=None) -> argparse.Namespace:
    p = runner.parser(__name__, __doc__,
                      quick="one C instead of a search on val", seed_help="seed of the eval subsets")
    p.add_argument("--eval-limit", type=int, help="evaluate on seeded val/test subsets")
    return runner.parse(p, argv)


def main(argv=None) -> int:
    args = parse(argv)
    result = baselines.text_baselines(quick=args.quick, seed=args.seed, eval_limit=args.eval_limit)
    name = args.name or "text_baselines" + ("_quick" if args.quick else "")
    path = records.write_result(name, result, results_dir=args.results_dir)
    groups = {label: {"val": result[key]["val_accuracy"], "test": result[key]["test_accuracy"]}
              for key, label in (("majority", "majority class"), ("bag_of_words", "bag of words"))}
    analysis.plot_bars(path.with_suffix(".png"), groups, ylabel="accuracy",
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
