"""One runner for every experiment: the shared flags, ``--size``, ``subspace-jax run`` and the
commands recorded results are reproduced with."""

import json
from pathlib import Path

import pytest

from subspace_lab import cli, experiments, records, runner

SHARED = {"quick", "seed", "results_dir", "name", "no_progress"}


@pytest.mark.parametrize("name", experiments.names())
def test_every_experiment_has_the_shared_flags(name):
    module = experiments.load(name)
    args = module.parse([])
    assert SHARED <= set(vars(args)) and "_sizes" not in vars(args), name
    assert args.results_dir == Path("results") and args.no_progress is False
    moved = module.parse(["--results-dir", "/tmp/r", "--seed", "3", "--no-progress"])
    assert (moved.results_dir, moved.seed, moved.no_progress) == (Path("/tmp/r"), 3, True)
    if hasattr(module, "SIZES"):  # --size stands for its flags; flags given still win
        assert set(module.SIZES) == set(runner.SIZE_NAMES)
        assert module.parse(["--size", "small"]).size == "small"
        assert module.parse(["--size", "small"]).quick == ("--quick" in module.SIZES["small"])
        assert module.parse(["--size", "tiny", "--seed", "5"]).seed == 5
    else:
        with pytest.raises(SystemExit):
            module.parse(["--size", "tiny"])


@pytest.mark.parametrize("size", runner.SIZE_NAMES)
def test_lorapre_settings_take_every_size(size):
    module = experiments.load("lorapre_pretrain")  # its flags become the run's Settings
    settings = module.settings_from(module.parse(["--size", size, "--seed", "2"]))
    assert settings.lm.seed == 2
    if size == "full":  # the paper's protocol: width 256, r = 8 against GaLore at 8 r = 64
        assert settings.lm.preset == "5m" and settings.optimizers is None
        assert [c.name for c in module.candidates(settings)] == [
            "adamw", "lorapre_r8", "galore_r64", "galore_r8", "lorapre_r64", "muon",
            "lorapre_muon_r64", "adafactor", "adamw_split"]
        assert settings.sweep_steps < settings.lm.steps and settings.grid_points == 3


def test_sizes_must_name_the_three_budgets():
    with pytest.raises(ValueError, match="must have exactly"):
        runner.parser("x", "doc", quick="q", sizes={"tiny": [], "full": []})


def test_run_is_the_experiment_main(monkeypatch):
    seen = []
    module = experiments.load("text_baselines")
    monkeypatch.setattr(module, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["run", "text_baselines", "--quick", "--seed", "2"]) == 0
    assert seen == [["--quick", "--seed", "2"]]


def test_validate_parses_without_running_and_rejects_what_the_command_would(capsys):
    cli.validate(["run", "nested_finetune", "--epochs", "4", "--name", "nested_4ep"])
    cli.validate(["bench", "wasi", "nested", "--size", "small"])
    cli.validate(["demo", "--methods", "baselines,wasi", "--steps", "10"])
    cli.validate(["select", "--model", "llama-1m", "--pattern", "blocks/0/.*"])
    for bad in (["run", "nested_finetune", "--epoch", "4"], ["run", "no_such"],
                ["bench", "wasi"], ["demo", "--methods", "nope"], ["frobnicate"],
                ["run", "gemma_eval", "--size", "huge"]):
        with pytest.raises(SystemExit) as e:
            cli.validate(bad)
        assert e.value.code == 2, bad
    capsys.readouterr()


def test_recorded_commands_read_as_todays(tmp_path):
    old = {"environment": {"command": "python experiments/nested_finetune.py --epochs 4"}}
    assert records.command(old) == "subspace-jax run nested_finetune --epochs 4"
    cli.validate(records.command(old).split()[1:])  # and today's command parses
    for path in sorted(Path(__file__).resolve().parents[2].glob("results/*.json")):
        line = records.command(json.loads(path.read_text()))
        if line.startswith("subspace-jax run "):
            cli.validate(line.split()[1:])  # every recorded run's command still parses
