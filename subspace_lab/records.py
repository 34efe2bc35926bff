"""Recording experiments: the environment and result files.

Every experiment (``subspace-jax run NAME``) writes ``<results-dir>/<name>.json`` with
:func:`write_result`, which adds the :func:`environment` block (command line, machine,
versions, devices, git commit, time), so a number in a result file can always be traced to
the run and the code that produced it. Figures: :mod:`subspace_lab.analysis`.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["environment", "write_result", "command"]


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
        "command": _command_line(),
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


def _command_line() -> str:
    """This process's command line, as ``subspace-jax ...`` when it is the CLI (the console
    script or ``python -m subspace_lab``)."""
    argv0 = Path(sys.argv[0]) if sys.argv else Path("?")
    if argv0.name == "subspace-jax" or argv0.parts[-2:] == ("subspace_lab", "__main__.py"):
        return shlex.join(["subspace-jax", *sys.argv[1:]])
    return shlex.join([Path(sys.executable).name, *sys.argv])


def command(record: Mapping[str, Any]) -> str:
    """The command that reproduces a result record (its ``environment``), in today's form:
    results recorded as ``python experiments/STEM.py FLAGS`` (before the experiments moved
    into :mod:`subspace_lab.experiments`, with the same flags) read as
    ``subspace-jax run STEM FLAGS``.

    Examples:
        >>> command({"environment": {"command": "python experiments/wasi_finetune.py --quick"}})
        'subspace-jax run wasi_finetune --quick'
        >>> command({"environment": {"command": "subspace-jax run text_baselines"}})
        'subspace-jax run text_baselines'
        >>> command({})
        '?'
    """
    line = record.get("environment", {}).get("command") or "?"
    words = line.split(" ")
    if len(words) >= 2 and words[0].startswith("python") and words[1].startswith("experiments/") \
            and words[1].endswith(".py"):
        return " ".join(["subspace-jax", "run", words[1][len("experiments/"):-3], *words[2:]])
    return line


def _git() -> dict[str, Any]:
    """``git_commit`` of the checkout holding this package (the code that ran) and ``git_dirty`` (None: no git)."""
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
