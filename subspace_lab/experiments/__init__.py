"""The experiments: one module per experiment, run by ``subspace-jax run NAME [FLAGS]``.

Each module has ``main(argv) -> int`` (its flags: :func:`subspace_lab.runner.parser`) and
writes ``<results-dir>/<name>.json`` with :func:`subspace_lab.records.write_result`. Those
that take part in the benchmark and the demo also have ``SIZES`` (``tiny``/``small``/``full``
-> flags), ``bench_rows(result)``, ``demo_rows(budget, progress)`` and ``RECORDED`` (result
file -> rows function); see :mod:`subspace_lab.bench` and :mod:`subspace_lab.demo`.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

__all__ = ["names", "load"]


def names() -> list[str]:
    """The experiments' names (module stems), sorted.

    Examples:
        >>> "wasi_finetune" in names() and "nested_finetune" in names()
        True
    """
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load(name: str) -> ModuleType:
    """Import the experiment ``name`` (a module of this package).

    Raises:
        ValueError: no experiment has that name (the message lists them).

    Examples:
        >>> load("text_baselines").__name__
        'subspace_lab.experiments.text_baselines'
        >>> load("nope")
        Traceback (most recent call last):
        ...
        ValueError: no experiment 'nope'; the experiments are: gemma_eval, ...
    """
    if name not in names():
        raise ValueError(f"no experiment {name!r}; the experiments are: {', '.join(names())}")
    return importlib.import_module(f"{__name__}.{name}")
