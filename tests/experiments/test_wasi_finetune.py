"""The WASI experiment (``subspace-jax run wasi_finetune``): its methods and a tiny run."""

import json

import pytest

from subspace_lab import experiments


def test_wasi_lr_runs_carry_their_lr_and_bad_lr_is_refused():
    script = experiments.load("wasi_finetune")
    runs = {m.name: m for m in script.methods([], False, (), [1e-4])}
    for name in ("wasi_lr0.0001", "wasi_knap_lr0.0001", "wasi_master_lr0.0001"):
        assert runs[name].lr == runs[name].quick_lr == 1e-4
    assert runs["wasi"].lr == 1e-4 and runs["full"].lr == 5e-5   # picked on val; vanilla's
    assert "lr 0.0001" in script._label("wasi_knap_lr0.0001")
    with pytest.raises(ValueError, match=r"--wasi-lr 0: a learning rate must be positive"):
        script.methods([], False, (), [0.0])


def test_experiment_smoke(tmp_path):
    script = experiments.load("wasi_finetune")
    argv = ["--steps", "2", "--num-layers", "1", "--batch-size", "4", "--max-length", "16",
            "--train-limit", "32", "--eval-limit", "8", "--evals", "1", "--repeats", "1",
            "--only", "full", "wasi_knap", "--no-progress", "--results-dir", str(tmp_path)]
    assert script.main(argv) == 0
    result = json.loads((tmp_path / "wasi.json").read_text())
    full, low = result["runs"]["full"], result["runs"]["wasi_knap"]   # activations at 5%
    print({k: (full[k], low[k]) for k in ("mlp_activation_bytes_measured",
                                          "mlp_activation_bytes_analytic", "residual_bytes")})
    assert low["mlp_activation_bytes_measured"] == low["mlp_activation_bytes_analytic"]
    assert full["mlp_activation_bytes_measured"] == full["mlp_activation_bytes_analytic"]
    assert low["mlp_activation_bytes_measured"] < full["mlp_activation_bytes_measured"] / 5
    assert low["residual_bytes"] < full["residual_bytes"]
    assert (tmp_path / "wasi.png").stat().st_size > 0
    rows = script.bench_rows(result)
    assert [set(r) for r in rows] == [{"method", "run", "baseline", "quality", "memory_ratio",
                                       "flops_ratio", "time_ratio", "what"}]
    assert rows[0]["method"] == "wasi"
    assert rows[0]["time_ratio"] == low["train_step_ratio_vs_full"]   # measured side by side
    assert rows[0]["memory_ratio"] == (low["compiled_memory"]["total"]
                                       / full["compiled_memory"]["total"]) < 1
    assert set(script.SIZES) == {"tiny", "small", "full"}
    (row,) = script.recorded_rows(result)  # the WASI run; its baselines are the demo's own rows
    assert row["method"].startswith("WASI") and row["method"].endswith("(2 steps)")
    assert row["test_accuracy"] == low["test_accuracy"]
