"""The Gemma experiments (``subspace-jax run gemma_eval`` / ``gemma_finetune``) on a tiny
random model, and the demo's Gemma rows."""

import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from subspace_jax.models import gemma, gemma_loading, gemma_tokenizer
from subspace_lab import demo, experiments
from subspace_lab.rows import Budget

TINY = gemma.GemmaConfig.tiny()
RESULTS = Path(__file__).resolve().parents[2] / "results"
TOKENS = jnp.array([[2, 17, 40, 9, 33, 21, 8, 90, 64, 5, 71]], jnp.int32)


@pytest.fixture(scope="module")
def tiny():
    return gemma.Gemma(TINY, rngs=nnx.Rngs(1))


def test_eval_helpers_on_a_tiny_model(tiny):
    script = experiments.load("gemma_eval")
    windows = np.asarray(TOKENS[:, :9]).repeat(3, axis=0)
    nll, tps = script.score(tiny, windows)
    np.testing.assert_allclose(nll, np.asarray(gemma.token_nll(tiny, jnp.asarray(windows))),
                               rtol=1e-5)
    assert tps > 0
    speed = script.decode_speed(tiny, windows[:1, :4], (2, 6), repeats=1)
    assert speed["new_tokens"] == [2, 6] and len(speed["seconds"]) == 2
    assert script._self_unigram(np.array([1, 1, 2, 2])) == pytest.approx(2.0)
    args = script.parse(["--quick"])
    assert args.seq_len == 256 and args.windows == 2
    args = script.parse(["--tiny", "--no-progress"])  # the bench's tiny size fits max_len 64
    assert args.seq_len + 1 <= TINY.max_len and args.prompt_len + max(args.decode_tokens) <= 64


def test_eval_tiny_model_is_cast_not_redrawn_in_bfloat16():
    script = experiments.load("gemma_eval")
    f32, tok = script.load(tiny=True)
    bf16, _ = script.load(tiny=True, dtype=jnp.bfloat16)
    assert tok.encode("ab").ids[0] == 2 and f32.config.vocab_size == TINY.vocab_size
    kernel = bf16.blocks[0].mlp.gate.kernel[...]
    assert kernel.dtype == jnp.bfloat16 and bf16.config.dtype == jnp.bfloat16
    np.testing.assert_array_equal(kernel, f32.blocks[0].mlp.gate.kernel[...].astype(jnp.bfloat16))
    assert script.param_bytes(bf16) * 2 == script.param_bytes(f32)


def test_demo_rows_tiny_recorded_and_without_the_weights(monkeypatch):
    script = experiments.load("gemma_eval")
    rows = script.demo_rows(Budget(gemma="tiny"), progress=False)
    assert [r["method"] for r in rows] == ["Gemma tiny", "Gemma tiny"]
    assert rows[0]["note"].startswith("ppl ") and "32 held-out source tokens" in rows[0]["note"]
    assert "greedy 8 tokens" in rows[1]["note"] and "'def f(n):\\n' -> " in rows[1]["note"]
    lines = demo.table(rows).splitlines()
    assert len(lines) == 3 and lines[1].endswith(rows[0]["note"])
    recorded, sources = demo.recorded(RESULTS, ["gemma"])
    assert "ppl 4.64 / 8.31 source val / test" in recorded[0]["note"]
    assert "11.8 tokens/s f32, 19.8 bf16" in recorded[1]["note"]
    assert sources and all("`subspace-jax run gemma_eval" in s for s in sources)

    def missing(**kw):
        raise ModuleNotFoundError("no gguf")

    monkeypatch.setattr(script, "load", missing)  # the real weights, not installed
    (row,) = script.demo_rows(Budget(), progress=False)
    assert row["method"] == "Gemma 270M" and row["note"] == "skipped: no gguf"


@pytest.mark.parametrize("mode", ["full", "lora", "lorapre", "galore"])
def test_finetune_smoke(mode, tmp_path):
    script = experiments.load("gemma_finetune")
    tokens, types = gemma_loading.toy_vocab(TINY.vocab_size)
    tok = gemma_tokenizer.build_tokenizer(tokens, types)
    model = gemma.Gemma(TINY, rngs=nnx.Rngs(0))
    args = script.parse(["--mode", mode, "--steps", "3", "--seq-len", "16", "--batch-size", "2",
                         "--eval-windows", "2", "--evals", "1", "--max-bytes", "40000",
                         "--no-progress"])
    result = script.finetune(model, tok, args)
    assert len(result["history"]["losses"]) == 3
    assert math.isfinite(result["val_loss"]) and math.isfinite(result["val_loss_before"])
    non_embedding = TINY.num_params(embeddings=False)
    if mode != "lora":
        assert result["trainable_params"] == non_embedding  # embeddings frozen
        full = 2 * 4 * non_embedding  # AdamW's two float32 moments of what trains
        state = result["optimizer_state_bytes"]
        print(mode, result["optimizer"], "state bytes", state, "AdamW's", full)
        if mode == "full":
            assert full <= state < full + 1024
        else:  # low-rank moments of the block matrices
            assert state < 0.8 * full
    else:  # rank-8 adapters on the 7 projections of each block
        d, hd, f = TINY.dim, TINY.head_dim, TINY.mlp_hidden
        shapes = [(d, 4 * hd), (d, 2 * hd), (d, 2 * hd), (4 * hd, d), (d, f), (d, f), (f, d)]
        assert result["trainable_params"] == TINY.depth * sum(8 * (a + b) for a, b in shapes)


@pytest.mark.parametrize("variant", ["factored", "master"])
def test_finetune_wasi_smoke(variant):
    script = experiments.load("gemma_finetune")
    tokens, types = gemma_loading.toy_vocab(TINY.vocab_size)
    tok = gemma_tokenizer.build_tokenizer(tokens, types)
    model = gemma.Gemma(TINY, rngs=nnx.Rngs(0))
    args = script.parse(["--mode", "wasi", "--wasi-variant", variant, "--steps", "3",
                         "--seq-len", "16", "--batch-size", "2", "--eval-windows", "2",
                         "--evals", "1", "--max-bytes", "40000", "--no-progress"])
    result = script.finetune(model, tok, args)
    w = result["wasi"]
    print(variant, w["activation_bytes_full"], w["activation_bytes_kept"], result["val_loss"])
    assert len(result["history"]["losses"]) == 3 and math.isfinite(result["val_loss"])
    assert w["layers"] == 7 * TINY.depth and w["variant"] == variant  # every projection
    assert w["activation_bytes_kept"] < w["activation_bytes_full"]


def test_wasi_gemma_smoke(tmp_path, capsys):
    """The same-process measurement on the tiny model: remat keeps only the blocks' inputs,
    WASI's converted layers keep exactly their Tucker cores and factors."""
    script = experiments.load("wasi_gemma")
    assert script.main(["--tiny", "--only", "vanilla", "remat", "wasi", "--repeats", "1",
                        "--truncation", "1.0", "0.5", "--no-progress", "--results-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "wasi_gemma_tiny.json").read_text())
    rows = result["variants"]
    print(capsys.readouterr().out)
    assert list(rows) == ["vanilla", "remat", "wasi"]
    assert rows["remat"]["residual_bytes"] < rows["vanilla"]["residual_bytes"] / 5
    assert rows["remat"]["converted_activation_bytes"] == 0  # nothing kept inside a block
    assert rows["vanilla"]["converted_activation_bytes"] > 0
    assert rows["wasi"]["converted_activation_bytes"] == result["activation_bytes_kept_analytic"]
    assert rows["wasi"]["step_ratio_vs_vanilla"] > 0 and rows["vanilla"]["flops_inference"] > 0
    assert (tmp_path / "wasi_gemma_tiny.png").exists()
    dense, full_rank, *truncated = result["truncation"]
    assert full_rank["energy"] == 1.0 and full_rank["layers"] == "all"
    assert full_rank["val_loss"] == pytest.approx(dense["val_loss"], rel=1e-5)
    assert [r["layers"] for r in truncated] == ["all", "mlp", "attention"]
