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
