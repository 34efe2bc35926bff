"""Every notebook's code cells run top to bottom (notebooks are docs; docs must run)."""

import json
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, capsys):
    cells = json.loads(path.read_text())["cells"]
    code = [("".join(c["source"]), i) for i, c in enumerate(cells) if c["cell_type"] == "code"]
    assert code, f"{path.name} has no code cell"
    namespace = {}
    for source, index in code:
        exec(compile(source, f"{path.name}[cell {index}]", "exec"), namespace)
    assert capsys.readouterr().out.strip(), f"{path.name} printed nothing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_with_the_outputs_of_one_clean_run(path):
    """`make notebooks` stores each notebook's outputs: every code cell ran once, in order, in
    one kernel (execution counts 1..n), nothing failed or wrote to stderr, a notebook with a
    plotting call stores its figure, and no path of the machine that ran it leaks in."""
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    counts = [c["execution_count"] for c in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        f"{path.name}: execution counts {counts}; run `make notebooks` to store a clean run")
    outputs = [o for c in cells for o in c["outputs"]]
    assert outputs, f"{path.name} stores no output"
    bad = [o for o in outputs if o["output_type"] == "error" or o.get("name") == "stderr"]
    assert not bad, f"{path.name} stores an error or stderr output: {bad[0]}"
    source = "".join("".join(c["source"]) for c in cells)
    figures = sum("image/png" in o.get("data", {}) for o in outputs)
    if "plt." in source:
        assert figures, f"{path.name} plots but stores no figure"
    text = path.read_text()
    for machine_path in ("/site-packages/", "/tmp/", str(pathlib.Path.home()) + "/"):
        assert machine_path not in text, f"{path.name} stores a machine path ({machine_path})"
