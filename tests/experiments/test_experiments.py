"""Smoke tests of the baselines' quick paths, the experiments (tiny settings) and the demo."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from subspace_jax import data, train
from subspace_lab import baselines, demo, experiments, pretrain, records
from subspace_jax.models import bert

RESULTS = Path(__file__).resolve().parents[2] / "results"  # the repository's recorded runs
# One encoder layer, a few steps on short texts: the code path of the real runs, in seconds.
TINY = dict(num_layers=1, steps=3, batch_size=4, max_length=16, train_limit=32, eval_limit=8,
            eval_batch_size=8, evals=1)


def _read(path):
    result = json.loads(Path(path).read_text())
    env = result["environment"]
    assert {"command", "hostname", "cpu_count", "python", "devices", "timestamp"} <= set(env)
    assert env["versions"]["jax"] == jax.__version__
    assert len(env["git_commit"]) == 40 and isinstance(env["git_dirty"], bool)
    return result


def test_write_result_adds_environment_and_cleans_values(tmp_path):
    path = records.write_result("x", {"a": np.float32(0.5), "b": float("nan"),
                                         "c": np.arange(2)}, results_dir=tmp_path)
    result = _read(path)
    assert (result["name"], result["a"], result["b"], result["c"]) == ("x", 0.5, None, [0, 1])
    with pytest.raises(ValueError, match="name='a/b'"):
        records.write_result("a/b", {}, results_dir=tmp_path)


def test_text_baselines_cli_majority_is_train_majority_share(tmp_path):
    pytest.importorskip("sklearn")
    assert experiments.load("text_baselines").main(["--quick", "--results-dir", str(tmp_path)]) == 0
    result = _read(tmp_path / "text_baselines_quick.json")
    assert (tmp_path / "text_baselines_quick.png").stat().st_size > 0
    topics = data.load_pydoc_topics()  # independent count
    majority = np.bincount(topics.train.labels).argmax()
    test_share = np.bincount(topics.test.labels, minlength=topics.num_classes) / len(topics.test)
    print(result["majority"], result["bag_of_words"]["test_accuracy"])
    assert result["majority"]["class"] == topics.label_names[majority]
    assert result["majority"]["test_accuracy"] == pytest.approx(test_share[majority], abs=1e-12)
    assert result["majority"]["test_accuracy"] <= test_share.max()
    assert result["bag_of_words"]["test_accuracy"] > result["majority"]["test_accuracy"] + 0.2


def _leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in
            jax.tree_util.tree_leaves_with_path(tree)}


def test_lora_finetune_trains_only_adapters_and_head():
    cfg = baselines.FinetuneConfig.make(quick=True, mode="lora", **TINY)
    run = baselines.train_text_classifier(cfg, progress=False, keep_initial=True)
    before, after = _leaves(run.initial_params), _leaves(run.params)
    moved = {path for path in after if not np.array_equal(before[path], after[path])}
    adapters = {p for p in after if p.endswith((".a", ".b"))}
    assert len(adapters) == 2 * 6  # q, k, v, o, up, down of the one layer
    assert moved - adapters == {"['head']['kernel'].value", "['head']['bias'].value"}
    assert {p for p in adapters if p.endswith(".b")} <= moved
    pretrained, _ = bert.from_pretrained()  # the frozen base kernels are MiniLM's, bit for bit
    layer = pretrained.encoder.layers[0]
    for name, module in [("q", layer.attn.q), ("o", layer.attn.o), ("down", layer.mlp.down)]:
        part = "mlp" if name == "down" else "attn"
        key = f"['bert']['encoder']['layers'][0]['{part}']['{name}']['kernel'].value.w"
        np.testing.assert_array_equal(after[key], np.asarray(module.kernel[...]))
    r = run.result
    per_layer = 4 * 8 * (384 + 384) + 2 * 8 * (384 + 1536)
    assert r["trainable_params"] == per_layer + 384 * 11 + 11
    assert 8 * r["trainable_params"] <= r["optimizer_state_bytes"] <= 8 * r["trainable_params"] + 64
    print(f"val loss {r['val_loss_initial']:.4f} -> {r['val_loss']:.4f}")
    assert r["val_loss"] < r["val_loss_initial"]  # TINY is seeded: deterministic
    assert 0 < r["residual_bytes"] < r["residual_bytes_total"]  # the frozen base is excluded
    assert r["compiled_memory"]["argument"] >= 4 * r["model_params"]  # float32 params in
    # more than the forward of the layer's six dense kernels on 4 x 16 tokens
    assert r["flops_matmul"] > 2 * 64 * (4 * 384 * 384 + 2 * 384 * 1536)


def test_full_finetune_cli_writes_result_and_plot(tmp_path):
    args = ["--quick", "--mode", "full", "--no-progress", "--results-dir", str(tmp_path)]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "eval_batch_size"]
    assert experiments.load("minilm_finetune").main(args) == 0
    result = _read(tmp_path / "minilm_finetune_full_quick.json")
    assert (tmp_path / "minilm_finetune_full_quick.png").stat().st_size > 0
    assert result["mode"] == "full" and result["steps"] == 3
    assert len(result["history"]["losses"]) == 3 and result["history"]["evals"][-1]["step"] == 3
    assert result["trainable_params"] == result["model_params"]
    assert result["optimizer_state_bytes"] >= 8 * result["model_params"]


def test_lm_quick_reduces_loss_and_checkpoint_restores_exactly(tmp_path):
    cfg = pretrain.LMConfig.make(quick=True, steps=30)
    run = pretrain.train_lm(cfg, progress=False, checkpoint_dir=tmp_path / "lm")
    losses, r = run.result["history"]["losses"], run.result
    print(f"loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f}, val ppl {r['val_perplexity']:.1f}"
          f" vs unigram {r['unigram_perplexity']:.1f}")
    assert np.mean(losses[-5:]) < 0.85 * losses[0]
    assert r["val_perplexity"] == pytest.approx(np.exp(r["val_loss"]))
    model, config = pretrain.load_lm(tmp_path / "lm")
    assert config.vocab_size == 512 and (tmp_path / "lm" / "tokenizer.json").exists()
    restored = _leaves(train.split_model(model)[1])
    trained = _leaves(run.params)
    assert restored.keys() == trained.keys()
    for path, value in trained.items():
        np.testing.assert_array_equal(restored[path], value, err_msg=path)
    # LittleBit-2 on this decoder (subspace-jax run littlebit_lm), smoke size: the packed model
    # evaluates to the trained one's perplexity, and QAT moves the compressed decoder.
    out = tmp_path / "out"
    assert experiments.load("littlebit_lm").main([
        "--quick", "--checkpoint-dir", str(tmp_path / "lm"), "--bpw", "1.0", "--steps", "4",
        "--eval-batches", "1", "--itq-iters", "2", "--no-progress",
        "--results-dir", str(out)]) == 0
    point = json.loads((out / "littlebit_lm_quick.json").read_text())["points"]["1.0"]
    assert point["perplexity_deployed"] == pytest.approx(point["perplexity_after"], rel=1e-4)
    assert point["perplexity_after"] != point["perplexity_before"]
    assert set(point["errors"]) == {"dual_svid", "joint_itq", "fp16_low_rank", "sign_rows"}
    assert (out / "littlebit_lm_quick.png").stat().st_size > 0


def test_every_registered_demo_entry_has_live_and_recorded_rows():
    budget = demo.Budget(steps=TINY["steps"], settings={k: v for k, v in TINY.items()
                                                        if k != "steps"},
                         gemma="tiny")  # a random tiny Gemma: no weights packages, seconds
    out = demo.run(budget=budget, progress=False)
    entries = [row["entry"] for row in out["rows"]]
    assert set(entries) == set(demo.ENTRIES) and set(out["seconds"]) == set(demo.ENTRIES)
    names = [row["method"] for row in out["rows"] if row["entry"] == "baselines"]
    assert names == ["majority class", "bag of words", "MiniLM full FT", "MiniLM LoRA r8"]
    by_name = {row["method"]: row for row in out["rows"]}
    assert by_name["MiniLM LoRA r8"]["trainable_params"] < by_name["MiniLM full FT"]["trainable_params"]
    # the bag of words beats the majority class on the same (seeded) texts
    assert by_name["bag of words"]["test_accuracy"] > by_name["majority class"]["test_accuracy"]
    lines = demo.table(out["rows"]).splitlines()
    assert len(lines) == 1 + len(out["rows"]) and lines[3].startswith("MiniLM full FT")
    gemma_rows = [row for row in out["rows"] if row["entry"] == "gemma"]
    assert [row["method"] for row in gemma_rows] == ["Gemma tiny"] * 2
    assert gemma_rows[0]["note"].startswith("ppl ") and "greedy 8 tokens" in gemma_rows[1]["note"]
    rows, sources = demo.recorded(RESULTS)
    recorded_entries = {row["entry"] for row in rows}
    assert recorded_entries == set(demo.ENTRIES), "every entry needs a recorded full run"
    assert sources and all("`subspace-jax run " in s for s in sources)  # today's commands
    with pytest.raises(ValueError, match="unknown methods \\['nope'\\]"):
        demo.run(methods=["nope"], budget=budget)


def test_demo_cli_passes_seed_and_methods(capsys, monkeypatch):
    seen = {}
    monkeypatch.setattr(demo, "run", lambda **kw: seen.update(kw) or {"rows": [], "seconds": {}})
    from subspace_lab.cli import main
    assert main(["demo", "--methods", "baselines", "--seed", "7", "--steps", "5",
                 "--no-progress"]) == 0
    assert seen["budget"].seed == 7 and seen["budget"].steps == 5
    assert seen["methods"] == ["baselines"] and seen["progress"] is False
