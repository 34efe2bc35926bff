"""``subspace-jax bench``: every method's standard benchmark at one size, one table, one JSON.

Each method is measured by an experiment (:data:`BENCHES`: name -> a module of
:mod:`subspace_lab.experiments`) that follows the bench protocol:

* ``SIZES``: the experiment's flags for ``"tiny"`` (well under a minute on two cores),
  ``"small"`` (a few minutes) and ``"full"`` (the recorded configuration), which its
  shared ``--size`` flag stands for (:mod:`subspace_lab.runner`);
* ``main(argv)`` writes ``DIR/STEM.json`` (:func:`subspace_lab.records.write_result`) for
  ``--size SIZE --results-dir DIR --name STEM --no-progress``;
* ``bench_rows(result)`` turns that JSON into rows with the keys of :data:`COLUMNS`.

:func:`run` runs every named experiment at one size, collects its rows and returns one
report (the :func:`machine` it ran on and all rows); :func:`table` renders a report, so
the printed table is the JSON's. Every ratio is run / baseline, measured side by side in
the same process (``memory_ratio``, ``flops_ratio`` and ``time_ratio``: below 1 the run
is smaller, cheaper or faster; None where the experiment does not measure it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from subspace_lab import experiments, records, runner

__all__ = ["BENCHES", "SIZES", "COLUMNS", "machine", "run", "table", "main"]

#: ``bench`` names -> the experiment that measures them.
BENCHES: dict[str, str] = {"lorapre": "lorapre_pretrain", "littlebit": "littlebit_compress",
                           "littlebit-qat": "littlebit_qat", "littlebit-lm": "littlebit_lm",
                           "wasi": "wasi_finetune", "nested": "nested_finetune",
                           "gemma": "gemma_eval"}
#: ``--size`` values, smallest first.
SIZES = runner.SIZE_NAMES
#: The keys of every row, in table order.
COLUMNS = ("method", "run", "baseline", "quality", "memory_ratio", "flops_ratio",
           "time_ratio", "what")
_RATIOS = ("memory_ratio", "flops_ratio", "time_ratio")
#: Default ``--out``: ``results/bench`` under the current directory.
OUT_DIR = runner.RESULTS_DIR / "bench"


def _cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo (x86 ``model name``, Raspberry Pi ``Model``)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and value.strip():
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    for key in ("model name", "Model", "Hardware", "cpu model", "Processor"):
        if key in fields:
            return fields[key]
    if "CPU part" in fields:  # aarch64 without a name: the implementer and part numbers
        return f"{platform.machine()} implementer {fields.get('CPU implementer', '?')} " \
               f"part {fields['CPU part']}"
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """CPU model, cores, platform, Python, library versions and git commit of this run.

    Examples:
        >>> m = machine()
        >>> m["cores"] >= 1, m["versions"]["jax"] is not None
        (True, True)
        >>> sorted(m)[:4]
        ['arch', 'cores', 'cores_usable', 'cpu_model']
    """
    env = records.environment()
    return {"cpu_model": _cpu_model(), "cores": os.cpu_count(),
            "cores_usable": env["cpu_affinity"], "arch": platform.machine(),
            "platform": env["platform"], "python": env["python"],
            "versions": {k: env["versions"].get(k) for k in ("jax", "jaxlib", "flax", "optax")},
            "jax_backend": env["jax_backend"], "devices": env["devices"],
            "git_commit": env["git_commit"], "git_dirty": env["git_dirty"],
            "hostname": env["hostname"], "timestamp": env["timestamp"]}


def _script(name: str) -> Any:
    """The experiment of ``name``, checked against the bench protocol."""
    module = experiments.load(BENCHES[name])
    missing = [a for a in ("SIZES", "bench_rows", "main") if not hasattr(module, a)]
    if missing:
        raise AttributeError(f"bench {name!r}: experiment {BENCHES[name]} does not follow "
                             f"the bench protocol: no {', '.join(missing)}")
    if set(module.SIZES) != set(SIZES):
        raise ValueError(f"bench {name!r}: experiment {BENCHES[name]} SIZES has keys "
                         f"{sorted(module.SIZES)}, expected {list(SIZES)}")
    return module


def _check_rows(name: str, rows: Any) -> list[dict[str, Any]]:
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"bench {name!r}: bench_rows returned {rows!r}, expected a non-empty list")
    for row in rows:
        if set(row) != set(COLUMNS):
            raise ValueError(f"bench {name!r}: row keys {sorted(row)} differ from {list(COLUMNS)}")
        for key in _RATIOS:
            if row[key] is not None and not isinstance(row[key], (int, float)):
                raise ValueError(f"bench {name!r}: {key}={row[key]!r} is not a number or None")
    return [{k: row[k] for k in COLUMNS} for row in rows]


def run(names: Sequence[str] | None = None, *, size: str = "tiny",
        out: str | Path = OUT_DIR) -> dict[str, Any]:
    """Run the benchmark of every method (or of ``names``) at ``size``; the report.

    Each experiment writes its own result to ``out/<size>/<stem>.json``. One that fails
    is reported in ``errors`` (with its exception) and the others still run.

    Args:
        names: keys of :data:`BENCHES` (None: all, in registry order).
        size: one of :data:`SIZES`.
        out: folder of the experiments' result files.

    Returns:
        ``{"size", "machine", "rows", "runs", "errors", "seconds"}``; ``runs`` gives each
        experiment's arguments, result file, wall seconds and CPU seconds (all threads).

    Raises:
        ValueError: an unknown name or size.

    Examples:
        >>> import tempfile
        >>> report = run(["lorapre"], size="tiny", out=tempfile.mkdtemp())  # doctest: +SKIP
        >>> report["rows"][0]["baseline"]  # doctest: +SKIP
        'AdamW'
    """
    names = list(BENCHES) if not names else list(names)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        raise ValueError(f"bench: unknown names {unknown}; choose from {list(BENCHES)}")
    if size not in SIZES:
        raise ValueError(f"bench: size={size!r} not in {list(SIZES)}")
    directory = Path(out) / size
    report: dict[str, Any] = {"size": size, "machine": machine(), "rows": [], "runs": {},
                              "errors": {}}
    start = time.perf_counter()
    for name in names:
        t0, cpu0 = time.perf_counter(), time.process_time()
        try:
            module = _script(name)
            stem = BENCHES[name]
            argv = ["--size", size, "--results-dir", str(directory), "--name", stem,
                    "--no-progress"]
            print(f"== bench {name}: subspace-jax run {stem} {' '.join(argv)}", flush=True)
            status = module.main(argv)
            if status:
                raise RuntimeError(f"subspace-jax run {stem} exited with status {status}")
            path = directory / f"{stem}.json"
            rows = _check_rows(name, module.bench_rows(json.loads(path.read_text())))
        except (Exception, SystemExit) as e:  # noqa: BLE001  (reported; the others still run)
            report["errors"][name] = f"{type(e).__name__}: {e}"
            print(f"== bench {name}: FAILED: {report['errors'][name]}", file=sys.stderr, flush=True)
            continue
        report["rows"].extend(rows)
        report["runs"][name] = {"experiment": stem, "argv": argv,
                                "result": str(path), "seconds": time.perf_counter() - t0,
                                "cpu_seconds": time.process_time() - cpu0}
    report["seconds"] = time.perf_counter() - start
    return report


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def table(report: Mapping[str, Any]) -> str:
    """The report as text: the machine, then one line per row (ratios are run / baseline).

    Examples:
        >>> row = dict(method="m", run="r", baseline="b", quality="acc 0.5 vs 0.6",
        ...            memory_ratio=0.25, flops_ratio=None, time_ratio=1.5, what="step")
        >>> print(table({"size": "tiny", "rows": [row], "machine": {
        ...     "cpu_model": "cpu", "cores": 2, "arch": "x86_64", "python": "3.11",
        ...     "versions": {"jax": "0.10.2", "jaxlib": "0.10.2", "flax": "0.12.8"},
        ...     "git_commit": "abcdef123456"}}))  # doctest: +NORMALIZE_WHITESPACE
        bench --size tiny on cpu (2 cores, x86_64), python 3.11, jax 0.10.2, jaxlib 0.10.2,
        flax 0.12.8, commit abcdef12
        method  run  baseline  quality         memory x  flops x  time x  what
        ------  ---  --------  --------------  --------  -------  ------  ----
        m       r    b         acc 0.5 vs 0.6  0.250     -        1.500   step
    """
    m, v = report.get("machine", {}), report.get("machine", {}).get("versions", {})
    commit = (m.get("git_commit") or "?")[:8] + ("+dirty" if m.get("git_dirty") else "")
    head = (f"bench --size {report.get('size', '?')} on {m.get('cpu_model', '?')} "
            f"({m.get('cores', '?')} cores, {m.get('arch', '?')}), python {m.get('python', '?')}, "
            f"jax {v.get('jax')}, jaxlib {v.get('jaxlib')},\nflax {v.get('flax')}, commit {commit}")
    titles = {"memory_ratio": "memory x", "flops_ratio": "flops x", "time_ratio": "time x"}
    header = [titles.get(c, c) for c in COLUMNS]
    cells = [[_cell(row.get(c)) for c in COLUMNS] for row in report.get("rows", [])]
    widths = [max(len(x) for x in col) for col in zip(header, *cells)]
    lines = [head, "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines += [f"FAILED {name}: {err}" for name, err in report.get("errors", {}).items()]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="subspace-jax bench",
        description="Run the standard benchmark of every method (or of the named ones) at "
                    "one size: one table of ratios to each method's baseline, one JSON.",
        epilog="One experiment with its own flags: subspace-jax run NAME [FLAGS] "
               "(subspace-jax run --list).")
    p.add_argument("names", nargs="*", help=f"methods (default all): {', '.join(BENCHES)}")
    p.add_argument("--size", choices=SIZES, help="tiny, small or full (the recorded runs)")
    p.add_argument("--out", type=Path, default=OUT_DIR,
                   help="folder of the results (default: ./results/bench)")
    p.add_argument("--list", action="store_true", help="list the methods and their experiments")
    return p


def _list() -> int:
    for name, stem in BENCHES.items():
        print(f"{name:<14} subspace-jax run {stem}")
    return 0


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``bench``'s arguments, checked (argparse exits with status 2 on a bad one)."""
    p = _parser()
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHES]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(BENCHES)} (one experiment "
                f"with its own flags: subspace-jax run NAME [FLAGS])")
    if args.names and args.size is None and not args.list:
        p.error("give --size tiny|small|full to run the named methods")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """``subspace-jax bench [NAME ...] [--size tiny|small|full] [--out DIR]``.

    Without ``--size``: ``bench`` (or ``bench --list``) lists the methods. With ``--size``:
    runs the named methods (default all), each as ``subspace-jax run STEM --size SIZE``,
    prints :func:`table` and writes ``DIR/bench_<size>.json``; the status is 1 if any
    experiment failed.

    Examples:
        >>> main(["--list"])  # doctest: +ELLIPSIS
        lorapre        subspace-jax run lorapre_pretrain
        ...
        0
    """
    args = parse(argv)
    if args.list or args.size is None:
        return _list()
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see the Makefile's demo target
    report = run(args.names, size=args.size, out=args.out)
    path = records.write_result(f"bench_{args.size}", report, results_dir=args.out)
    print(table(json.loads(path.read_text())))
    print(f"wrote {path} ({report['seconds']:.0f} s)")
    return 1 if report["errors"] else 0
