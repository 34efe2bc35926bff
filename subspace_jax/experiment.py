"""Recording experiments: the environment, result files and plots.

Every script under ``experiments/`` writes ``results/<name>.json`` with
:func:`write_result`, which adds the :func:`environment` block (command line, machine,
versions, devices, time), so a number in a result file can always be traced to the run
that produced it. :func:`plot_curves` and :func:`plot_bars` write PNG figures with
matplotlib (Agg backend, imported only when called).
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["environment", "write_result", "plot_curves", "plot_bars", "load_script", "EXPERIMENTS_DIR"]


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001  (not installed, or no metadata)
        return None


def environment() -> dict[str, Any]:
    """Command line, machine, versions, JAX backend and devices, git commit and the time.

    ``git_commit`` is the checked-out commit of the repository that holds the package and
    ``git_dirty`` whether tracked files differ from it (both None outside a git checkout),
    so a recorded number can be traced to the code that produced it.

    Returns:
        A JSON-ready dict.

    Examples:
        >>> env = environment()
        >>> {"command", "hostname", "cpu_count", "versions", "devices"} <= set(env)
        True
        >>> env["jax_backend"] in ("cpu", "gpu", "tpu")
        True
        >>> len(env["git_commit"] or "x" * 40), env["git_dirty"] in (True, False, None)
        (40, True)
    """
    import jax

    return {
        "argv": list(sys.argv),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cwd": os.getcwd(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in (
            "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "scikit-learn")},
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **_git(),
    }


def _git() -> dict[str, Any]:
    """``git_commit`` of the repository holding this package and ``git_dirty`` (None: no git)."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                 text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def _jsonable(value: Any) -> Any:
    """Numpy scalars/arrays and other stragglers to plain JSON types; NaN/inf to None."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy / jax arrays and scalars
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_result(name: str, payload: Mapping[str, Any], *,
                 results_dir: str | Path = "results") -> Path:
    """Write ``{"name", "environment", **payload}`` to ``results_dir/<name>.json``.

    Args:
        name: file stem (letters, digits, ``-``, ``_`` and ``.``).
        payload: JSON-ready data (numpy values are converted; NaN becomes null).
        results_dir: directory, created if missing.

    Returns:
        The path written.

    Raises:
        ValueError: ``name`` is empty or has other characters.

    Examples:
        >>> import json, tempfile
        >>> path = write_result("demo", {"accuracy": 0.5}, results_dir=tempfile.mkdtemp())
        >>> data = json.loads(path.read_text())
        >>> data["accuracy"], "jax" in data["environment"]["versions"]
        (0.5, True)
    """
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"write_result: name={name!r} must be non-empty and use only letters, "
                         "digits, '-', '_' and '.'")
    directory = Path(results_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    body = {"name": name, "environment": environment(), **_jsonable(dict(payload))}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    tmp.replace(path)
    return path


def _pyplot():
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
    plt = _pyplot()
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
    return _save(fig, path)


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
    plt = _pyplot()
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
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    """Lay out, write (creating folders) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


#: The repository's ``experiments/`` folder (scripts of a source checkout).
EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"


def load_script(stem: str, *, owner: str = "experiment") -> Any:
    """Import ``experiments/<stem>.py`` of the source checkout as a module (cached).

    Raises:
        FileNotFoundError: naming ``owner`` and the path, outside a source checkout.

    Examples:
        >>> load_script("text_baselines").__name__
        'experiments.text_baselines'
    """
    name = f"experiments.{stem}"
    if name in sys.modules:
        return sys.modules[name]
    path = EXPERIMENTS_DIR / f"{stem}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{owner}: {path} not found (run from a source checkout)")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
