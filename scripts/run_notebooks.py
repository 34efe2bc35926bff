"""Execute the notebooks in place and store their outputs (text and inline matplotlib PNGs).

    python scripts/run_notebooks.py                 # every notebooks/*.ipynb
    python scripts/run_notebooks.py wasi nested     # the named ones (stem, file name or path)

`make notebooks` runs it with OPENBLAS_NUM_THREADS=1. Each notebook runs top to bottom in a
fresh ``python3`` kernel of this interpreter (ipykernel), with notebooks/ as the working
directory and a timeout per cell. A failing cell stops the run with the notebook's name and
the cell's index, and that notebook is left as it was. Volatile metadata (execution
timestamps) is not stored, so a rerun's diff shows only what changed. Prints the seconds each
notebook took.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"


def resolve(names: list[str]) -> list[pathlib.Path]:
    """The notebooks named (stem, file name or path); every notebook when none is named."""
    if not names:
        return sorted(NOTEBOOKS.glob("*.ipynb"))
    paths = []
    for name in names:
        path = pathlib.Path(name)
        if not path.suffix:
            path = path.with_suffix(".ipynb")
        if not path.exists():
            path = NOTEBOOKS / path.name
        if not path.exists():
            known = ", ".join(p.stem for p in sorted(NOTEBOOKS.glob("*.ipynb")))
            raise SystemExit(f"run_notebooks: no notebook {name!r} (known: {known})")
        paths.append(path.resolve())
    return paths


def strip_volatile(nb: nbformat.NotebookNode) -> None:
    """Drop what changes on every run without the notebook changing."""
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # nbclient's timestamps
        cell.metadata.pop("ExecuteTime", None)  # jupyterlab-execute-time's
        if cell.cell_type == "code":
            for output in cell.outputs:
                output.get("metadata", {}).pop("execution", None)


class Client(NotebookClient):
    """A NotebookClient that remembers which cell it is running (for the error message)."""

    current: int | None = None

    async def async_execute_cell(self, cell, cell_index, *args, **kwargs):
        self.current = cell_index
        return await super().async_execute_cell(cell, cell_index, *args, **kwargs)


def run(path: pathlib.Path, timeout: int, kernel: str) -> float:
    """Execute ``path`` in place; returns the seconds it took. Raises SystemExit on failure."""
    nb = nbformat.read(path, as_version=4)
    client = Client(nb, timeout=timeout, kernel_name=kernel, record_timing=False,
                    coalesce_streams=True,  # one stdout block per cell, not one per flush
                    resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as err:
        index = client.current
        source = nb.cells[index].source if index is not None else ""
        head = "\n".join("    " + line for line in source.splitlines()[:6])
        kind = {CellTimeoutError: f"timed out after {timeout} s",
                DeadKernelError: "killed the kernel"}.get(type(err), "failed")
        raise SystemExit(f"run_notebooks: {path.name}: cell {index} {kind} "
                         f"(notebook left unchanged)\n{head}\n\n{err}") from None
    seconds = time.perf_counter() - start
    strip_volatile(nb)
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", help="stems, file names or paths (default: all)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    parser.add_argument("--kernel", default="python3",
                        help="kernel name (default python3: ipykernel of this interpreter)")
    args = parser.parse_args(argv)
    # The kernel inherits this environment: one OpenBLAS thread (see the Makefile's demo) and
    # matplotlib's inline backend, so figures are stored as PNGs (a headless MPLBACKEND=Agg
    # would store none), and no tqdm warning that ipywidgets is missing (progress bars are off
    # in the notebooks; the warning would store this machine's site-packages path).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    os.environ["PYTHONWARNINGS"] = ",".join(
        filter(None, [os.environ.get("PYTHONWARNINGS"), "ignore:IProgress not found"]))
    paths = resolve(args.notebooks)
    total = 0.0
    for path in paths:
        seconds = run(path, args.timeout, args.kernel)
        total += seconds
        print(f"{path.name:24s} {seconds:6.1f} s", flush=True)
    if len(paths) > 1:
        print(f"{'all ' + str(len(paths)):24s} {total:6.1f} s")


if __name__ == "__main__":
    sys.exit(main())
