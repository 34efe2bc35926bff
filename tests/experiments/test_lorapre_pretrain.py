"""The LoRA-Pre pretraining protocol end to end at its tiny size: sweep, picks, headline."""

import json
import math

import jax
import pytest

from subspace_lab import experiments

MODULE = experiments.load("lorapre_pretrain")


def test_sweep_then_headline_records_picks_test_loss_and_exact_state_bytes(tmp_path, capsys):
    args = ["--size", "tiny", "--no-progress", "--results-dir", str(tmp_path)]
    assert MODULE.main(args) == 0
    sweep = json.loads((tmp_path / "lorapre_quick_sweep.json").read_text())
    result = json.loads((tmp_path / "lorapre_quick.json").read_text())
    assert sweep["pending"] == [] and set(sweep["picks"]) == {"adamw", "lorapre_r8"}
    for name, pick in sweep["picks"].items():  # one grid point at the tiny size: the middle
        assert pick["lr"] == MODULE.GRIDS["adamw" if name == "adamw" else "lorapre"][1]
        assert pick["edge"] is False
    opts = result["optimizers"]
    assert result["sweep"]["picks"] == sweep["picks"]
    for name, r in opts.items():
        assert r["lr"] == sweep["picks"][name]["lr"] and r["steps"] == 16
        # it learned, on text it never saw: below the uniform guess's log(vocab)
        assert r["test_loss"] < 0.9 * math.log(result["model_config"]["vocab_size"])
        assert 0 < r["matrix_state_bytes"] < r["optimizer_state_bytes"]
    # the matrices' state is exactly AdamW's 2 p q against LoRA-Pre's 2 r (p + q) floats
    s = MODULE.Settings.make(quick=True)
    graphdef, params, rest, batch, _ = MODULE._model(s.lm)
    shapes = [x.shape for x, emb in zip(jax.tree.leaves(params),
                                        jax.tree.leaves(MODULE._is_embedding(params)))
              if x.ndim == 2 and not emb]
    counts = {"adamw": 4 * 4, "lorapre_r8": 4 * 8}  # the int32 step counts in each state
    adam = sum(2 * p * q for p, q in shapes) * 4
    low = sum(2 * 8 * (p + q) for p, q in shapes if min(p, q) > 8) * 4
    small = sum(2 * p * q for p, q in shapes if min(p, q) <= 8) * 4
    assert opts["adamw"]["matrix_state_bytes"] == pytest.approx(adam + counts["adamw"], abs=64)
    assert opts["lorapre_r8"]["matrix_state_bytes"] == pytest.approx(
        low + small + counts["lorapre_r8"], abs=64)
    print(MODULE.summary(result))
    # --resume keeps every run of a matching sweep, and refuses one of other settings
    capsys.readouterr()
    assert MODULE.main([*args, "--phase", "sweep", "--resume"]) == 0
    assert "sweep adamw" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="other settings"):
        MODULE.main([*args, "--phase", "sweep", "--resume", "--muon-adam-lr", "1e-3"])
    with pytest.raises(SystemExit, match="other settings"):
        MODULE.main([*args, "--phase", "headline", "--grid-points", "3"])


def test_cost_tiny_measures_both_updates_with_exact_state_bytes(tmp_path):
    cost = experiments.load("lorapre_cost")
    assert cost.main(["--size", "tiny", "--results-dir", str(tmp_path), "--no-progress"]) == 0
    result = json.loads((tmp_path / "lorapre_cost_quick.json").read_text())
    shapes = cost.block_shapes(cost.gemma_config.GemmaConfig(), 1)
    update = result["update"]
    assert result["matrices"] == 7 and "step" not in result
    # AdamW: two float32 moments per weight; LoRA-Pre r8: 2 r (p + q) per matrix
    assert update["adamw"]["state_bytes"] == pytest.approx(
        8 * sum(p * q for p, q in shapes.values()), abs=64)
    assert update["lorapre_r8"]["state_bytes"] == pytest.approx(
        4 * sum(2 * 8 * (p + q) for p, q in shapes.values()), abs=64)


@pytest.mark.parametrize("optimum, pick, extended, edge", [
    (5e-3, 3e-3, [], False),          # inside the grid: no extra trial
    (2e-2, 3.3e-2, [3.3e-2, 0.11], False),  # past the top: out by the grid's spacing
    (1.0, 0.11, [3.3e-2, 0.11], True),      # far past it: still on the edge, flagged
    (1e-4, 1.1e-4, [3.3e-4, 1.1e-4], True),  # below the bottom: stepping down
])
def test_sweep_steps_past_an_edge_of_the_grid(monkeypatch, optimum, pick, extended, edge):
    tried = []

    def fake_train(s, c, peak, steps, *, progress, test=False):
        tried.append(peak)
        return {"val_loss": abs(math.log(peak / optimum)), "extras": {}}

    monkeypatch.setattr(MODULE, "_train", fake_train)
    s = MODULE.Settings.make(quick=True, optimizers=("adamw",))
    out = MODULE.sweep(s)
    got = out["picks"]["adamw"]
    assert got["lr"] == pytest.approx(pick) and got["edge"] is edge
    assert got["extended"] == pytest.approx(extended)
    assert tried == pytest.approx([1e-3, 3e-3, 1e-2, *extended])
