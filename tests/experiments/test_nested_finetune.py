"""The NSN experiment (``subspace-jax run nested_finetune``) and its demo rows."""

import argparse
import json
from pathlib import Path

import pytest

from subspace_lab import experiments, nested_eval
from subspace_lab.rows import Budget


def test_experiment_and_demo_rows_smoke(tmp_path):
    script = experiments.load("nested_finetune")
    assert set(script.SIZES) == {"tiny", "small", "full"} and script.SIZES["full"] == ["--epochs", "4"]
    argv = script.SIZES["tiny"] + ["--results-dir", str(tmp_path), "--name", "nested",
                                   "--no-progress", "--warm-start", "0.34"]
    assert script.main(argv) == 0  # (subspace-jax bench runs it without --warm-start)
    result = json.loads((tmp_path / "nested.json").read_text())
    # 1 of the 3 steps fine-tunes the dense model, NSN trains the other 2 from it
    assert result["nested"]["warm_start_steps"] == 1 and result["nested"]["steps"] == 2
    assert [row["rank"] for row in result["nested"]["sweep"]] == [1, 48, 153, 384]
    assert result["svd_truncation"]["max_abs_logit_difference_at_R"] < 1e-4
    assert result["headline"]["rank"] == 153 and set(result["specialists"]) == {"4"}
    fall = result["headline"]["largest_decline"]  # paired from the in-process records
    acc = _by_rank_acc(result["nested"]["sweep"])
    falls = [acc[lo] - acc[hi] for lo in acc for hi in acc if lo < hi]
    if max(falls) > 0:                           # a fall in this tiny run: found and paired
        assert fall["pairs"] == 6 and "p_value" in fall
        assert fall["points"] == pytest.approx(100 * max(falls))
    else:
        assert fall is None
    assert all(a < 1e-3 for a in result["nesting"]["max_angle_degrees"][
        "bert/encoder/layers/0/mlp/up"].values())
    assert (tmp_path / "nested.png").stat().st_size > 0 and (tmp_path / "nested.md").exists()
    paired, n = result["headline"]["paired_vs_svd"], len(result["nested"]["test_correct"]["1"])
    assert set(paired) == {"1", "48", "153"}
    nsn, svd = (_by_rank_acc(result[k]["sweep"]) for k in ("nested", "svd_truncation"))
    for r, m in paired.items():  # the per-text record agrees with the accuracies
        assert m["only_a"] - m["only_b"] == round(n * (nsn[int(r)] - svd[int(r)]))
    keys = {"method", "run", "baseline", "quality", "memory_ratio", "flops_ratio", "time_ratio",
            "what"}
    rows = script.bench_rows(result)
    assert [set(r) for r in rows] == [keys] * 4 and rows[0]["run"].startswith("NSN r153")
    assert 0 < rows[-1]["memory_ratio"] and rows[-1]["flops_ratio"] > 1  # two passes a step
    assert rows[1]["time_ratio"] > 0 and rows[0]["time_ratio"] is None  # r153 not timed
    assert script.RECORDED["nested_4ep.json"] is nested_eval.recorded_rows
    rows = nested_eval.recorded_rows(result)
    assert [r["method"] for r in rows] == [  # 1 warm-start step + 2 NSN steps; dense: 3
        "NSN r384 (3 steps)", "NSN r153 (3 steps)", "NSN r48 (3 steps)",
        "SVD trunc. r153 (3 steps)"]
    budget = Budget(steps=2, settings=dict(num_layers=1, batch_size=4, max_length=16,
                                                train_limit=32, eval_limit=8, evals=1))
    live = script.demo_rows(budget, progress=False)
    assert [r["method"] for r in live] == ["NSN r384 (max)", "NSN r153 (50% MLP)", "NSN r48"]
    # accuracies over the 8 test texts, every row read from the one training run
    assert all(float(r["test_accuracy"] * 8).is_integer() for r in live)
    assert len({r["step_seconds"] for r in live}) == 1


def _by_rank_acc(rows):
    return {row["rank"]: row["test_accuracy"] for row in rows}


def test_warm_start_outside_its_range_is_a_clear_error(tmp_path):
    script = experiments.load("nested_finetune")
    argv = script.SIZES["tiny"] + ["--results-dir", str(tmp_path), "--no-progress"]
    with pytest.raises(ValueError, match=r"--warm-start 1.0: .* must be in \[0, 1\)"):
        script.main(argv + ["--warm-start", "1.0"])          # refused before any training
    with pytest.raises(ValueError, match=r"--warm-start 0.9: 3 of the 3 steps"):
        script.main(argv + ["--warm-start", "0.9"])          # rounds to every step


def test_reuse_refuses_other_settings():
    script = experiments.load("nested_finetune")
    reused = {"command": "x", "dense": {"lr": 2e-4, "steps": 5}, "specialists": {},
              "svd_truncation": {"sweep": [{"rank": 8}, {"rank": 16}]}}
    args = argparse.Namespace(lr=2e-4, reuse=Path("old.json"))
    out = script._reuse(args, reused, (8, 16))
    assert out["dense"] is reused["dense"] and out["reused"]["from"] == "old.json"
    with pytest.raises(ValueError, match=r"lr 0.0002 != 0.001"):
        script._reuse(argparse.Namespace(lr=1e-3, reuse=Path("old.json")), reused, (8,))
    with pytest.raises(ValueError, match=r"rank 32 not in its SVD sweep"):
        script._reuse(args, reused, (8, 32))
