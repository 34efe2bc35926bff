"""Statistics and figures for experiment results.

* :func:`mcnemar` and :func:`largest_decline`: exact paired tests of two classifiers on the
  same texts, and the worst accuracy fall of a rank sweep.
* :func:`plot_curves`, :func:`plot_bars`: PNG figures with matplotlib (Agg backend, imported
  only when called); :func:`pyplot` and :func:`save` for a custom one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["mcnemar", "largest_decline", "plot_curves", "plot_bars", "pyplot", "save"]


def mcnemar(a: str, b: str) -> dict[str, float]:
    """Exact two-sided McNemar test of two classifiers on the same texts (0/1 strings):
    texts only ``a`` gets right, only ``b`` gets right, and the binomial p-value of that
    split under "equally accurate".

    Examples:
        >>> mcnemar("1100", "0111")
        {'only_a': 1, 'only_b': 2, 'p_value': 1.0}
    """
    only_a = sum(x == "1" and y == "0" for x, y in zip(a, b, strict=True))
    only_b = sum(x == "0" and y == "1" for x, y in zip(a, b, strict=True))
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return {"only_a": only_a, "only_b": only_b, "p_value": p}


def largest_decline(section: dict) -> dict | None:
    """The largest fall in test accuracy from a lower to a higher rank of one sweep, any two
    ranks apart (not only neighbours), with McNemar's exact test of the two ranks on the
    same texts when the section keeps per-text records; None if accuracy never falls. The
    pair is the worst of ``pairs`` compared, so ``p_bonferroni`` (p times pairs, at most 1)
    is the p-value that accounts for having picked it.

    Examples:
        >>> sweep = [{"rank": 1, "test_accuracy": 0.5}, {"rank": 2, "test_accuracy": 0.75},
        ...          {"rank": 4, "test_accuracy": 0.5}, {"rank": 8, "test_accuracy": 1.0}]
        >>> fall = largest_decline({"sweep": sweep, "test_correct": {"2": "1110", "4": "1100"}})
        >>> fall["low"], fall["high"], fall["points"], fall["pairs"]
        (2, 4, 25.0, 6)
        >>> fall["only_low"], fall["only_high"], fall["p_value"], fall["p_bonferroni"]
        (1, 0, 1.0, 1.0)
    """
    acc = {row["rank"]: row["test_accuracy"] for row in section["sweep"]}
    ranks = sorted(acc)
    falls = [(acc[lo] - acc[hi], lo, hi) for i, lo in enumerate(ranks) for hi in ranks[i + 1:]]
    fall, low, high = max(falls, default=(0.0, None, None))
    if fall <= 0:
        return None
    out = {"low": low, "high": high, "points": 100 * fall, "pairs": len(falls)}
    correct = {int(r): v for r, v in section.get("test_correct", {}).items()}  # str in JSON
    if low in correct and high in correct:
        test = mcnemar(correct[low], correct[high])
        out.update(only_low=test["only_a"], only_high=test["only_b"], p_value=test["p_value"],
                   p_bonferroni=min(1.0, test["p_value"] * len(falls)))
    return out


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(path: str | Path, panels: Mapping[str, Mapping[str, tuple[Sequence, Sequence]]],
                *, title: str | None = None, xlabel: str = "step",
                logy: Sequence[str] = ()) -> Path:
    """One subplot per panel, one labelled line per curve, saved as a PNG.

    Args:
        path: output file.
        panels: panel title -> {curve label -> (xs, ys)}.
        title: figure title.
        xlabel: x-axis label of every panel.
        logy: titles of the panels drawn with a log y-axis.

    Returns:
        The path written.

    Examples:
        >>> import tempfile
        >>> out = plot_curves(tempfile.mkdtemp() + "/loss.png",
        ...                   {"loss": {"train": ([1, 2, 3], [2.0, 1.0, 0.5])}})
        >>> out.suffix, out.stat().st_size > 0
        ('.png', True)
    """
    if not panels:
        raise ValueError("plot_curves: panels is empty")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (panel, curves) in zip(axes[0], panels.items()):
        for label, (xs, ys) in curves.items():
            ax.plot(list(xs), list(ys), label=label, marker="o" if len(xs) <= 12 else None)
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        if panel in logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    return save(fig, path)


def plot_bars(path: str | Path, groups: Mapping[str, Mapping[str, float]], *,
              title: str | None = None, ylabel: str = "") -> Path:
    """Grouped bar chart: x groups (e.g. methods), one bar per series (e.g. val, test).

    Args:
        path: output file.
        groups: group label -> {series label -> value}.
        title: figure title.
        ylabel: y-axis label.

    Returns:
        The path written.

    Examples:
        >>> import tempfile
        >>> groups = {"majority": {"val": 0.15, "test": 0.14}, "bow": {"val": 0.5, "test": 0.6}}
        >>> out = plot_bars(tempfile.mkdtemp() + "/acc.png", groups)
        >>> out.exists()
        True
    """
    if not groups:
        raise ValueError("plot_bars: groups is empty")
    plt = pyplot()
    series = list(dict.fromkeys(s for values in groups.values() for s in values))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(groups)), 4))
    for i, name in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ys = [values.get(name, 0.0) for values in groups.values()]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend()
    return save(fig, path)


def save(fig: Any, path: str | Path) -> Path:
    """Lay out, write (creating folders) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
