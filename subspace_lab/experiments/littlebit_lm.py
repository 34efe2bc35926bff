"""LittleBit-2 on the small Llama-style decoder: reconstruction error, QAT, perplexity.

    subspace-jax run littlebit_lm [--quick] [--bpw 1.0 0.55 0.3 0.1] [--steps N]

The decoder is the one ``subspace-jax run lm_pretrain`` pretrains on the standard library's
source (``results/checkpoints/lm_pretrain``; pretrained here first when missing, about 14
minutes on 2 cores). For every bits-per-weight target all Linear kernels of the blocks
(attention q/k/v/o, MLP gate/up/down) are compressed (Dual-SVID + Joint-ITQ; the residual
path at 1 bpw only, see :func:`settings`), then distilled from the frozen
full-precision decoder with the paper's recipe (:func:`subspace_jax.littlebit.qat.lm_loss_fn`:
logit KL + 10 x per-layer hidden MSE; AdamW without weight decay, cosine schedule; the
token embedding, tied to the output head, stays frozen and float32).

Reported per target: each kernel's relative reconstruction error for Dual-SVID, Dual-SVID +
Joint-ITQ, a float16 low-rank factorisation of the same storage and sign + row scale; the
validation perplexity of the compressed decoder before and after QAT and of the deployed
(bit-packed) model, next to the full-precision decoder and the add-one unigram model on the
same target tokens; exact bits (accounting) and checkpoint bytes.

The decoder's kernels are small (128 x 128 to 128 x 384), so LittleBit's 16-bit scales and
the minimum rank 8 weigh more than on MiniLM: the low targets are not reached and keep rank
8 (``strict=False``); the achieved bits are what the tables and plots use.

Writes ``results/littlebit_lm[_quick].json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import time

import jax
import numpy as np
from flax import nnx

from subspace_jax import data, littlebit, rules, train
from subspace_lab import analysis, pretrain, records, runner
from subspace_lab.experiments import littlebit_compress
from subspace_jax.littlebit import qat
from subspace_jax.models import llama

BPWS = (1.0, 0.55, 0.3, 0.1)
KERNELS = r"blocks/\d+/(attn|mlp)/\w+/kernel"
#: ``subspace-jax bench littlebit-lm`` sizes (the script's own flags).
SIZES = {"tiny": ["--quick", "--bpw", "0.55", "--steps", "5", "--eval-batches", "2",
                  "--itq-iters", "5"],
         "small": ["--quick"], "full": []}




def settings(bpw: float) -> dict:
    """``LittleBitRule`` settings: the residual path only at 1 bpw, rank >= 8 everywhere.

    On kernels this small two paths of rank 8 already cost 0.77 bpw (128 x 128), so below
    1 bpw the decoder uses one path, and ``strict=False`` keeps rank 8 where the target is
    lower still; the achieved bits are reported.
    """
    return dict(residual=bpw >= 1.0, strict=False)


def perplexity(graphdef: nnx.GraphDef, params, rest, windows: np.ndarray,
               batch_size: int) -> float:
    """exp(mean next-token NLL) over ``windows`` (``(N, T + 1)``), as pretraining measures it."""
    sums = train.evaluate(train.make_eval_step(graphdef, pretrain.lm_metrics), params, rest,
                          {"tokens": windows}, batch_size=batch_size)
    return math.exp(float(sums["loss"]) / float(sums["count"]))


def _corpus(checkpoint_dir: pathlib.Path, config: llama.LlamaConfig, *,
            quick: bool) -> data.LMCorpus:
    """The pretraining corpus, checked to be tokenized exactly as the checkpoint was."""
    settings = pretrain.LMConfig.make(quick=quick)
    corpus = data.load_lm_corpus(vocab_size=config.vocab_size, max_bytes=settings.max_bytes,
                                 seed=settings.seed)
    if pathlib.Path(corpus.tokenizer_path).read_bytes() != (
            checkpoint_dir / "tokenizer.json").read_bytes():
        raise ValueError(f"{checkpoint_dir}/tokenizer.json differs from the corpus tokenizer "
                         f"{corpus.tokenizer_path}: the checkpoint was trained on other data")
    return corpus


def ensure_checkpoint(checkpoint_dir: pathlib.Path, *, quick: bool, progress: bool) -> dict | None:
    """Pretrain the decoder into ``checkpoint_dir`` when it holds none; its result or None."""
    if (checkpoint_dir / "config.json").exists():
        return None
    print(f"no decoder in {checkpoint_dir}: pretraining it (subspace-jax run lm_pretrain"
          f"{' --quick' if quick else ''})")
    return pretrain.pretrain_lm(quick=quick, progress=progress, checkpoint_dir=checkpoint_dir)


def run(*, checkpoint_dir: pathlib.Path, quick: bool = False, bpws=BPWS, steps: int | None = None,
        batch_size: int = 16, lr: float = 1e-3, itq_iters: int = 50,
        eval_batches: int | None = None, seed: int = 0, progress: bool = True,
        on_point=None) -> dict:
    """Compress, distil and evaluate the decoder at every target; the JSON-ready result."""
    start = time.perf_counter()
    steps = steps or (30 if quick else 600)
    eval_batches = eval_batches or (8 if quick else 40)
    pretrained = ensure_checkpoint(checkpoint_dir, quick=quick, progress=progress)
    teacher, config = pretrain.load_lm(checkpoint_dir)
    corpus = _corpus(checkpoint_dir, config, quick=quick)
    seq_len = config.max_len
    windows = data.lm_windows(corpus.val, seq_len)[:eval_batches * batch_size]
    tgraph, tparams, trest = train.split_model(teacher)
    qgraph, tstate = nnx.split(teacher)  # the teacher as QAT's loss reads it (whole state)
    rule = rules.Rule(pattern=KERNELS)
    paths = [m.path for m in rules.select(nnx.state(teacher), rule).selected]
    result = dict(
        model=dict(preset="lm_pretrain", dim=config.dim, depth=config.depth,
                   vocab_size=config.vocab_size, seq_len=seq_len, checkpoint=str(checkpoint_dir)),
        quick=quick, bpws=list(bpws), steps=steps, batch_size=batch_size, lr=lr,
        itq_iters=itq_iters, eval_tokens=int(windows.shape[0] * seq_len),
        pretrained_here=pretrained is not None,
        teacher_perplexity=perplexity(tgraph, tparams, trest, windows, batch_size),
        unigram_perplexity=data.unigram_perplexity(corpus.train, windows[:, 1:].ravel(),
                                                   corpus.vocab_size),
        points={})
    print(f"full-precision decoder: perplexity {result['teacher_perplexity']:.2f}; "
          f"unigram {result['unigram_perplexity']:.2f} ({result['eval_tokens']} tokens)")
    per_epoch = data.num_lm_batches(corpus.train, batch_size=batch_size, seq_len=seq_len)
    for bpw in bpws:
        t0 = time.perf_counter()
        opts = settings(bpw)
        student = littlebit.convert(teacher, littlebit.LittleBitRule(
            pattern=KERNELS, bpw=bpw, itq_iters=itq_iters, **opts))
        svid = littlebit.transform(nnx.state(teacher), littlebit.LittleBitRule(
            pattern=KERNELS, bpw=bpw, itq_iters=0, **opts))  # Dual-SVID: no ITQ
        errors = littlebit_compress.layer_errors(nnx.state(teacher), nnx.state(student), svid,
                                               paths)
        step, params, opt_state, rest, _, graphdef = qat.setup(
            student, qat.lm_loss_fn(qgraph),
            train.adamw(lr, steps, warmup=steps // 20, weight_decay=0.0))
        before = perplexity(graphdef, params, rest, windows, batch_size)
        # the LM windows carry seq_len + 1 tokens (inputs and targets); distillation needs
        # no targets and the decoder takes at most max_len = seq_len positions
        batches = ({"tokens": b[:, :seq_len]} for b in data.lm_batches(
            corpus.train, batch_size=batch_size, seq_len=seq_len, seed=seed,
            epochs=math.ceil(steps / per_epoch)))
        params, opt_state, rest, history = train.fit(
            step, params, opt_state, rest, qat.with_teacher(batches, tstate), num_steps=steps,
            key=jax.random.key(seed), progress=progress, desc=f"QAT {bpw} bpw")
        after = perplexity(graphdef, params, rest, windows, batch_size)
        trained = nnx.state(nnx.merge(graphdef, params, rest))
        deployed = littlebit.deploy(trained)
        dgraph, dparams, drest = train.split_model(nnx.merge(graphdef, deployed))
        packed = perplexity(dgraph, dparams, drest, windows, batch_size)
        acc = littlebit.accounting(deployed)
        result["points"][str(bpw)] = dict(
            settings=opts, layers=errors,
            errors={m: float(np.mean([r[m] for r in errors]))
                    for m in littlebit_compress.METHODS},
            linear_bpw=acc.linear_bpw, model_bpw=acc.model_bpw, model_bits=acc.total_bits,
            model_params=acc.total_weights,
            not_compressed_bytes={k: b // 8 for k, b in acc.by_kind().items()},
            checkpoint_bytes=None if quick else littlebit_compress.checkpoint_bytes(deployed),
            predicted_bytes=acc.total_bits // 8,
            perplexity_before=before, perplexity_after=after, perplexity_deployed=packed,
            history=history.as_dict(), seconds=time.perf_counter() - t0)
        print(f"{bpw} bpw (linear {acc.linear_bpw:.3f}): perplexity {before:.2f} -> {after:.2f} "
              f"after {steps} QAT steps (deployed {packed:.2f}); errors "
              f"{result['points'][str(bpw)]['errors']}  ({time.perf_counter() - t0:.0f} s)")
        if on_point is not None:
            on_point(result)
    result["seconds"] = time.perf_counter() - start
    return result


def plot(result: dict, path: pathlib.Path) -> pathlib.Path:
    """Perplexity (with full-precision and unigram references) and kernel error vs bits."""
    pts = [result["points"][str(b)] for b in result["bpws"]]
    xs = [p["linear_bpw"] for p in pts]
    flat = lambda v: [v] * len(xs)  # noqa: E731
    ppl = {"LittleBit-2 after QAT": (xs, [p["perplexity_after"] for p in pts]),
           "LittleBit-2 before QAT": (xs, [p["perplexity_before"] for p in pts]),
           "full precision": (xs, flat(result["teacher_perplexity"])),
           "unigram": (xs, flat(result["unigram_perplexity"]))}
    labels = dict(dual_svid="Dual-SVID", joint_itq="Dual-SVID + Joint-ITQ",
                  fp16_low_rank="FP16 low rank, same bits", sign_rows="sign + row scale")
    err = {labels[m]: (xs, [p["errors"][m] for p in pts]) for m in labels if m != "sign_rows"}
    sign_bpw = float(np.mean([r["sign_rows_bpw"] for r in pts[0]["layers"]]))
    err[f"{labels['sign_rows']} ({sign_bpw:.2f} bpw)"] = ([sign_bpw], [pts[0]["errors"]["sign_rows"]])
    return analysis.plot_curves(
        path, {"validation perplexity": ppl, "mean relative kernel error": err},
        xlabel="bits per weight (achieved, linear layers)", logy=("validation perplexity",),
        title="Llama-style decoder (stdlib source), LittleBit-2")


def bench_rows(result: dict) -> list[dict]:
    """``subspace-jax bench`` rows: perplexity after QAT against the full-precision decoder."""
    return [dict(method="littlebit-lm", run=f"LittleBit-2 {b} bpw QAT ({p['linear_bpw']:.2f})",
                 baseline="float32 decoder",
                 quality=f"val ppl {p['perplexity_after']:.1f} vs "
                         f"{result['teacher_perplexity']:.1f} (unigram "
                         f"{result['unigram_perplexity']:.0f})",
                 memory_ratio=p["model_bits"] / (32 * p["model_params"]),
                 flops_ratio=None, time_ratio=None, what="model storage bits")
            for b, p in ((b, result["points"][str(b)]) for b in result["bpws"])]


def parse(argv=None) -> argparse.Namespace:
    p = runner.parser(__name__, __doc__,
                      quick="0.55 and 0.1 bpw, 30 QAT steps, 8 eval batches", seed_help="QAT batch order and key", sizes=SIZES)
    p.add_argument("--bpw", type=float, nargs="+", default=list(BPWS))
    p.add_argument("--steps", type=int, help="QAT steps at every target (default 600)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-batches", type=int, help="validation batches (default 40)")
    p.add_argument("--itq-iters", type=int, default=50)
    p.add_argument("--checkpoint-dir", type=pathlib.Path,
                   help="pretrained decoder (default <results>/checkpoints/lm_pretrain)")
    return runner.parse(p, argv)


def main(argv=None) -> int:
    args = parse(argv)
    name = args.name or "littlebit_lm" + ("_quick" if args.quick else "")
    ckpt = args.checkpoint_dir or args.results_dir / "checkpoints" / (
        "lm_pretrain" + ("_quick" if args.quick else ""))
    bpws = (0.55, 0.1) if args.quick and tuple(args.bpw) == BPWS else tuple(args.bpw)

    def write(partial: dict) -> pathlib.Path:
        return records.write_result(name, partial, results_dir=args.results_dir)

    result = run(checkpoint_dir=ckpt, quick=args.quick, bpws=bpws, steps=args.steps,
                 batch_size=args.batch_size, lr=args.lr, itq_iters=args.itq_iters,
                 eval_batches=args.eval_batches, seed=args.seed,
                 progress=not args.no_progress, on_point=write)
    path = write(result)
    plot(result, path.with_suffix(".png"))
    print(f"\nfull precision {result['teacher_perplexity']:.2f}, "
          f"unigram {result['unigram_perplexity']:.2f}")
    print(f"{'bpw':>5} {'linear bpw':>10} {'ppl before':>10} {'ppl after':>10} "
          f"{'deployed':>9} {'ITQ err':>8} {'SVID err':>8} {'FP16 err':>8}")
    for b in result["bpws"]:
        p = result["points"][str(b)]
        e = p["errors"]
        print(f"{b:>5} {p['linear_bpw']:>10.3f} {p['perplexity_before']:>10.2f} "
              f"{p['perplexity_after']:>10.2f} {p['perplexity_deployed']:>9.2f} "
              f"{e['joint_itq']:>8.3f} {e['dual_svid']:>8.3f} {e['fp16_low_rank']:>8.3f}")
    print(f"wrote {path} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
