"""``subspace-jax bench``: the protocol of every registered experiment, the table and the JSON."""

import importlib.util
import json
import math
import pathlib

import pytest

from subspace_lab import bench, experiments
from subspace_lab.cli import main as cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results"


@pytest.mark.parametrize("name", list(bench.BENCHES))
def test_every_registered_script_follows_the_bench_protocol(name):
    module = experiments.load(bench.BENCHES[name])
    assert set(module.SIZES) == set(bench.SIZES), name
    assert callable(module.bench_rows) and callable(module.main)
    for size, argv in module.SIZES.items():
        assert all(isinstance(a, str) for a in argv), (name, size)
        args = module.parse([*argv, "--results-dir", "/tmp/x", "--name", "stem", "--no-progress"])
        assert str(args.results_dir) == "/tmp/x" and args.name == "stem", (name, size)
        # --size SIZE stands for exactly those flags
        sized = module.parse(["--size", size, "--results-dir", "/tmp/x", "--name", "stem",
                              "--no-progress"])
        assert {**vars(sized), "size": None} == {**vars(args), "size": None}, (name, size)


def _check_rows(rows):
    assert rows
    for row in rows:
        assert tuple(row) == bench.COLUMNS or set(row) == set(bench.COLUMNS)
        for key in ("memory_ratio", "flops_ratio", "time_ratio"):
            value = row[key]
            assert value is None or (isinstance(value, float) and math.isfinite(value)
                                     and value > 0), (key, value)
    # every report measures something: at least one ratio per report
    assert any(row[key] is not None for row in rows
               for key in ("memory_ratio", "flops_ratio", "time_ratio")), rows


@pytest.mark.parametrize("stem, result", [("lorapre_pretrain", "lorapre"),
                                          ("littlebit_compress", "littlebit"),
                                          ("littlebit_qat", "littlebit_qat"),
                                          ("gemma_eval", "gemma_eval")])
def test_bench_rows_of_the_recorded_runs(stem, result):
    data = json.loads((RESULTS / f"{result}.json").read_text())
    rows = experiments.load(stem).bench_rows(data)
    _check_rows(rows)
    print("\n" + bench.table({"size": "full", "rows": rows, "machine": {}}))
    if stem == "lorapre_pretrain":  # 8 low-rank/reference optimizers against AdamW or Muon
        assert len(rows) == len(data["optimizers"]) - 2
        r8 = next(r for r in rows if r["run"] == "LoRA-Pre rank 8")
        opts = data["optimizers"]
        assert r8["memory_ratio"] == pytest.approx(opts["lorapre_r8"]["optimizer_state_bytes"]
                                                   / opts["adamw"]["optimizer_state_bytes"])
        assert r8["memory_ratio"] < 0.5
    if stem == "gemma_eval":  # f32 per content against the unigram model, bf16 against f32
        assert [r["run"] for r in rows] == ["Gemma 3 270M f32, source",
                                            "Gemma 3 270M f32, docstrings", "Gemma 3 270M bf16"]
        assert "ppl 4.64 / 8.31" in rows[0]["quality"]
        assert rows[2]["time_ratio"] == pytest.approx(
            data["decode"]["float32"]["decode_tokens_per_s"]
            / data["decode"]["bfloat16"]["decode_tokens_per_s"])
    if stem == "littlebit_compress":  # a layer and the encoder per target; packed is smaller
        assert len(rows) == 2 * len(data["bpws"])
        assert all(r["memory_ratio"] < 1 for r in rows)


def test_bench_tiny_prints_the_table_of_its_json(tmp_path, capsys):
    status = bench.main(["littlebit", "--size", "tiny", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0
    report = json.loads((tmp_path / "bench_tiny.json").read_text())
    assert bench.table(report) in out  # the printed table is the JSON's
    script = json.loads((tmp_path / "tiny" / "littlebit_compress.json").read_text())
    module = experiments.load("littlebit_compress")
    assert report["rows"] == json.loads(json.dumps(module.bench_rows(script)))
    _check_rows(report["rows"])
    m = report["machine"]
    assert m["cpu_model"] and m["cores"] >= 1 and m["arch"] and m["python"]
    assert m["versions"]["jax"] and m["versions"]["jaxlib"] and m["versions"]["flax"]
    assert len(m["git_commit"] or "x" * 40) == 40
    run = report["runs"]["littlebit"]
    assert run["argv"][:2] == ["--size", "tiny"] and run["experiment"] == "littlebit_compress"
    print(f"\nlittlebit tiny: {run['seconds']:.1f} s wall, {run['cpu_seconds']:.1f} s CPU")


def test_bench_gemma_tiny_runs_a_random_tiny_model(tmp_path, capsys):
    status = bench.main(["gemma", "--size", "tiny", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert status == 0
    report = json.loads((tmp_path / "bench_tiny.json").read_text())
    assert bench.table(report) in out
    script = json.loads((tmp_path / "tiny" / "gemma_eval.json").read_text())
    assert script["model"] == "tiny random Gemma" and script["config"]["tiny"]
    assert script["model_params"] == 32_208  # GemmaConfig.tiny(), not the 270M model
    _check_rows(report["rows"])
    assert [r["run"] for r in report["rows"]] == [
        "tiny random Gemma f32, source", "tiny random Gemma f32, docstrings",
        "tiny random Gemma bf16"]
    assert report["rows"][2]["memory_ratio"] == 0.5  # bf16 parameters: half the bytes
    print(f"\ngemma tiny: {report['runs']['gemma']['seconds']:.1f} s wall")


def test_a_script_without_the_protocol_is_reported_and_the_others_still_run(
        tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(bench.BENCHES, "plain", "text_baselines")  # no SIZES, no bench_rows
    status = bench.main(["plain", "--size", "tiny", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "bench_tiny.json").read_text())
    assert status == 1 and report["rows"] == []
    assert "no SIZES, bench_rows" in report["errors"]["plain"]
    assert "FAILED plain" in out and bench.table(report) in out
    monkeypatch.setitem(bench.BENCHES, "plain", "littlebit_compress")
    monkeypatch.setitem(experiments.load("littlebit_compress").SIZES, "tiny", ["--bad"])
    report = bench.run(["plain"], size="tiny", out=tmp_path)  # argparse exits: reported too
    assert report["errors"]["plain"].startswith("SystemExit: 2")


def test_rows_with_wrong_keys_or_types_are_rejected():
    good = dict.fromkeys(bench.COLUMNS, "x") | dict(memory_ratio=0.5, flops_ratio=None,
                                                    time_ratio=1)
    assert bench._check_rows("m", [good]) == [good]
    with pytest.raises(ValueError, match="row keys"):
        bench._check_rows("m", [{**good, "extra": 1}])
    with pytest.raises(ValueError, match="time_ratio='1.0x'"):
        bench._check_rows("m", [{**good, "time_ratio": "1.0x"}])
    with pytest.raises(ValueError, match="non-empty list"):
        bench._check_rows("m", [])


def test_cli_lists_runs_one_experiment_and_rejects_unknown_names(capsys):
    assert cli(["bench"]) == 0 and cli(["bench", "--list"]) == 0
    listing = capsys.readouterr().out
    assert all(f"subspace-jax run {stem}" in listing for stem in bench.BENCHES.values())
    with pytest.raises(SystemExit) as e:  # run NAME ARGS...: the experiment's own parser
        cli(["run", "littlebit_compress", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--bpw" in out and "subspace-jax run littlebit_compress" in out
    assert cli(["run", "--list"]) == 0
    assert set(experiments.names()) <= {line.split()[0] for line in
                                        capsys.readouterr().out.splitlines()}
    with pytest.raises(SystemExit) as e:  # naming methods without a size runs nothing
        cli(["bench", "littlebit"])
    assert e.value.code == 2 and "give --size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli(["bench", "nope", "--size", "tiny"])
    assert e.value.code == 2 and "unknown methods ['nope']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="size='huge'"):
        bench.run(["littlebit"], size="huge")


def test_cpu_model_reads_proc_cpuinfo_of_x86_and_raspberry_pi(tmp_path, monkeypatch):
    real = pathlib.Path

    def fake(text):
        monkeypatch.setattr(bench, "Path", lambda p: tmp_path / "cpuinfo" if p == "/proc/cpuinfo"
                            else real(p))
        (tmp_path / "cpuinfo").write_text(text)
        return bench._cpu_model()

    assert fake("processor\t: 0\nmodel name\t: AMD EPYC 7B13\n") == "AMD EPYC 7B13"
    pi5 = ("processor\t: 0\nBogoMIPS\t: 108.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd0b\n\n"
           "Revision\t: d04170\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n")
    assert fake(pi5) == "Raspberry Pi 5 Model B Rev 1.0"
    assert "part 0xd0b" in fake("processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd0b\n")


def test_aarch64_smoke_compares_numbers_within_float32_tolerance():
    path = ROOT / "scripts" / "aarch64_smoke.py"
    spec = importlib.util.spec_from_file_location("aarch64_smoke", path)
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    native = {"values": {"a": [1.0, -2.0], "b": [3.0]}, "machine": "x86_64"}
    close = {"values": {"a": [1.0 + 1e-6, -2.0], "b": [3.0 - 1e-5]}, "machine": "aarch64"}
    assert all(line.endswith("ok") for line in smoke.compare(native, close))
    off = {"values": {"a": [1.0, -2.01], "b": [3.0]}}
    assert [line.endswith("FAIL") for line in smoke.compare(native, off)] == [True, False]
    missing = {"values": {"a": [1.0, -2.0]}}
    assert smoke.compare(native, missing)[1].endswith("FAIL")
