"""The flags every experiment shares, and how a command line becomes an experiment's run.

Every experiment (``subspace-jax run NAME``) builds its parser with :func:`parser`, which
adds the shared flags, and parses with :func:`parse`:

* ``--size tiny|small|full``: a named budget; it stands for the flags in the experiment's
  ``SIZES`` (``full`` is the recorded run, ``tiny`` what the tests run); the other flags
  given override them. Only experiments with ``SIZES`` have it.
* ``--quick``: the experiment's own short run (what it shrinks is in its ``--help``).
* ``--seed``: the seed (``None``: the experiment's configuration decides).
* ``--results-dir``: where ``<name>.json`` (and figures) go; default ``./results``.
* ``--name``: the result file stem (default: the experiment's).
* ``--no-progress``: hide progress bars.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["RESULTS_DIR", "SIZE_NAMES", "SHARED", "parser", "parse"]

#: Default ``--results-dir``: ``results/`` under the current directory.
RESULTS_DIR = Path("results")
#: The budgets of ``--size`` (and of ``subspace-jax bench --size``).
SIZE_NAMES = ("tiny", "small", "full")
#: The namespace fields of the shared flags (an experiment that forwards its own flags as
#: settings leaves these out).
SHARED = ("size", "quick", "seed", "results_dir", "name", "no_progress")


def parser(module: str, doc: str, *, quick: str, seed: int | None = 0, seed_help: str = "seed",
           name: str | None = None,
           sizes: Mapping[str, Sequence[str]] | None = None) -> argparse.ArgumentParser:
    """An experiment's argument parser with the shared flags already added.

    Args:
        module: the experiment's ``__name__`` (its last part names it in ``--help``).
        doc: the experiment's module docstring (its first paragraph is the description).
        quick: what ``--quick`` does in this experiment (its help text).
        seed: the default ``--seed``.
        seed_help: what the seed seeds.
        name: the default ``--name`` (None: the experiment names its own file).
        sizes: the experiment's ``SIZES`` (``tiny``/``small``/``full`` -> flags); adds
            ``--size``, expanded by :func:`parse`.

    Returns:
        The parser; add the experiment's own flags to it, then call :func:`parse`.

    Raises:
        ValueError: ``sizes`` lacks one of :data:`SIZE_NAMES` or has another key.

    Examples:
        >>> p = parser("demo_experiment", "Demo.\\n\\nMore.", quick="fewer steps", sizes={
        ...     "tiny": ["--quick", "--steps", "2"], "small": ["--quick"], "full": []})
        >>> _ = p.add_argument("--steps", type=int, default=100)
        >>> args = parse(p, ["--size", "tiny", "--seed", "3"])
        >>> args.quick, args.steps, args.seed, args.results_dir, args.no_progress
        (True, 2, 3, PosixPath('results'), False)
        >>> parse(p, ["--size", "tiny", "--steps", "5"]).steps  # later flags win
        5
    """
    if sizes is not None and set(sizes) != set(SIZE_NAMES):
        raise ValueError(f"sizes has {sorted(sizes)}; it must have exactly {list(SIZE_NAMES)}")
    p = argparse.ArgumentParser(prog=f"subspace-jax run {module.rsplit('.', 1)[-1]}",
                                allow_abbrev=False,  # a recorded command means one thing
                                description=doc.split("\n\n")[0].strip())
    shared = p.add_argument_group("shared flags (every experiment)")
    if sizes is not None:
        shared.add_argument("--size", choices=SIZE_NAMES,
                            help="a named budget: " + "; ".join(
                                f"{k} = [{' '.join(v) or 'the recorded run'}]"
                                for k, v in sizes.items()))
    shared.add_argument("--quick", action="store_true", help=quick)
    shared.add_argument("--seed", type=int, default=seed, help=seed_help)
    shared.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                        help="where the result JSON and figures go (default: ./results)")
    shared.add_argument("--name", default=name, help="result file stem")
    shared.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.sizes = dict(sizes) if sizes is not None else None  # read by parse, not a flag
    return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with an experiment's parser, expanding ``--size`` into its flags.

    Args:
        p: a parser from :func:`parser`.
        argv: the arguments (None: ``sys.argv[1:]``).

    Returns:
        The namespace (``size`` is the budget named, or None).
    """
    args = p.parse_args(argv)
    sizes = getattr(p, "sizes", None)
    if getattr(args, "size", None) is not None and sizes is not None:
        argv = list(argv if argv is not None else sys.argv[1:])
        i = max(j for j, a in enumerate(argv) if a == "--size" or a.startswith("--size="))
        rest = argv[:i] + argv[i + (1 if "=" in argv[i] else 2):]
        args = p.parse_args([*sizes[args.size], *rest])
        args.size = argv[i].split("=", 1)[1] if "=" in argv[i] else argv[i + 1]
    return args
