"""Pretrain the small Llama decoder with LoRA-Pre against AdamW, Adafactor, GaLore and Muon.

    subspace-jax run lorapre_pretrain [--quick] [--steps N] [--preset 1m] [--only a,b]

Every optimizer gets the same data, steps, seed, gradient clipping (global norm 1) and
schedule (linear warm-up, cosine decay to a tenth; Muon's own peak rate for the Muon
pair). Weight decay is decoupled and applies to matrices only. The token embedding
(tied to the output head) stays on full AdamW in the low-rank optimizers, as in the
paper's protocol. Reported per optimizer: validation loss and perplexity curves, the
persistent optimizer-state bytes, the compiled memory of the optimizer update alone
(its ``temp`` is the transient peak), and the time of a full training step and of the
update alone as ratios to AdamW, measured round-robin in one process
(:func:`subspace_jax.measure.compare`).

Writes ``results/lorapre[_quick].json``, ``.png`` (validation curves) and
``_memory.png`` (state and transient bytes). :func:`run` is importable
(``run(Settings.make(quick=True))``: AdamW and LoRA-Pre rank 8, about one CPU-minute).
"""

from __future__ import annotations

import os

# jax's CPU LAPACK kernels (LoRA-Pre's r x r solves and QR, GaLore's SVD) run on scipy's
# OpenBLAS, whose threads spin against XLA's own pool: on two shared cores that made
# LoRA-Pre's update 100x slower (2.3 s instead of 19 ms at rank 32). One BLAS thread.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from subspace_jax import data, measure, train  # noqa: E402
from subspace_lab import analysis, pretrain, records, runner
from subspace_jax.lorapre import lorapre, lorapre_muon  # noqa: E402
from subspace_jax.models import llama  # noqa: E402

_QUICK = dict(optimizers=("adamw", "lorapre_r8"), timing_repeats=2)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """What :func:`run` trains and measures.

    Attributes:
        lm: the shared :class:`subspace_lab.pretrain.LMConfig` (model, data, steps, lr).
        muon_lr: peak learning rate of the Muon branch of the Muon pair.
        ranks: LoRA-Pre (Adam) ranks.
        galore_ranks: ``optax.contrib.galore`` ranks (update_proj_gap 200, scale 1).
        muon_rank: LoRA-Pre-Muon rank.
        optimizers: names to run (None: all); see :func:`optimizers`.
        timing_repeats: round-robin rounds of :func:`subspace_jax.measure.compare`.
    """

    lm: pretrain.LMConfig
    muon_lr: float = 0.02
    ranks: tuple[int, ...] = (4, 8, 16, 32)
    galore_ranks: tuple[int, ...] = (8, 32)
    muon_rank: int = 16
    optimizers: tuple[str, ...] | None = None
    timing_repeats: int = 6

    @classmethod
    def make(cls, *, quick: bool = False, **overrides: Any) -> Settings:
        """Quick settings (tiny corpus, AdamW and LoRA-Pre rank 8) or full ones, overridden."""
        own = {f.name for f in dataclasses.fields(cls)} - {"lm"}
        mine = {**(_QUICK if quick else {}), **{k: v for k, v in overrides.items() if k in own}}
        lm = pretrain.LMConfig.make(quick=quick, **{k: v for k, v in overrides.items()
                                                     if k not in own})
        return cls(lm=lm, **mine)


def _is_embedding(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda path, x: "embed" in jax.tree_util.keystr(path), params)


def _decay_mask(params: Any) -> Any:
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def _muon_dims(params: Any) -> Any:
    """optax Muon's dimension numbers: 2-D non-embedding kernels, the rest to AdamW."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: None if x.ndim != 2 or "embed" in jax.tree_util.keystr(path)
        else optax.contrib.MuonDimensionNumbers(), params)


def optimizers(s: Settings) -> dict[str, optax.GradientTransformation]:
    """Every optimizer of the comparison, keyed by name (clipped, same schedule)."""
    cfg = s.lm
    warmup = int(cfg.warmup_fraction * cfg.steps)
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, cfg.steps, cfg.lr / 10)
    muon_sched = optax.warmup_cosine_decay_schedule(0.0, s.muon_lr, warmup, cfg.steps,
                                                    s.muon_lr / 10)
    wd = cfg.weight_decay
    clip = lambda tx: optax.chain(optax.clip_by_global_norm(1.0), tx)  # noqa: E731
    out = {"adamw": pretrain.lm_optimizer(cfg),  # the repository's baseline, clip included
           # optax.adafactor adds its weight decay after the learning rate: scale it by the
           # schedule to get the same decoupled lr * wd decay as the others
           "adafactor": clip(optax.adafactor(sched, multiply_by_parameter_scale=False,
                                             weight_decay_rate=lambda c: wd * sched(c),
                                             weight_decay_mask=_decay_mask))}
    for r in s.galore_ranks:
        galore_dims = lambda p: jax.tree.map(  # noqa: E731
            lambda emb, x: None if emb or x.ndim != 2 else optax.contrib.GaLoreDimensionNumbers(),
            _is_embedding(p), p)
        out[f"galore_r{r}"] = clip(optax.contrib.galore(
            sched, rank=r, base_optimizer=optax.scale_by_adam(b2=0.95), weight_decay=wd,
            mask=_decay_mask, weight_dimension_numbers=galore_dims))
    for r in s.ranks:
        out[f"lorapre_r{r}"] = clip(lorapre(sched, rank=r, b1=0.9, b2=0.95, weight_decay=wd,
                                            weight_decay_mask=_decay_mask,
                                            adamw_mask=_is_embedding))
    muon_common = dict(beta=0.95, weight_decay=wd, adam_b2=0.95, adam_learning_rate=sched)
    out["muon"] = clip(optax.contrib.muon(muon_sched, muon_weight_dimension_numbers=_muon_dims,
                                          **muon_common))
    out[f"lorapre_muon_r{s.muon_rank}"] = clip(lorapre_muon(
        muon_sched, rank=s.muon_rank, adamw_mask=_is_embedding, **muon_common))
    first = ["adamw", "lorapre_r8", "galore_r8", "lorapre_r32", "galore_r32", "muon",
             f"lorapre_muon_r{s.muon_rank}"]  # the key pairs first, if a run is cut short
    out = {k: out[k] for k in sorted(out, key=lambda k: first.index(k) if k in first else 99)}
    if s.optimizers is not None:
        unknown = set(s.optimizers) - set(out)
        if unknown:
            raise ValueError(f"optimizers: unknown names {sorted(unknown)}; known {list(out)}")
        out = {k: v for k, v in out.items() if k in s.optimizers}
    return out


def _model(cfg: pretrain.LMConfig):
    corpus = data.load_lm_corpus(vocab_size=cfg.vocab_size, max_bytes=cfg.max_bytes,
                                 seed=cfg.seed)
    config = llama.LlamaConfig.preset(cfg.preset, vocab_size=corpus.vocab_size,
                                      max_len=cfg.seq_len)
    graphdef, params, rest = train.split_model(llama.Llama(config, rngs=nnx.Rngs(cfg.seed)))
    batch = jnp.asarray(next(data.lm_batches(corpus.train, batch_size=cfg.batch_size,
                                             seq_len=cfg.seq_len, seed=cfg.seed)))
    return graphdef, params, rest, batch


def measure_optimizers(s: Settings, txs: dict[str, optax.GradientTransformation],
                       ) -> dict[str, dict[str, Any]]:
    """State bytes, compiled memory of the update, step and update times (ratio to AdamW)."""
    graphdef, params, rest, batch = _model(s.lm)
    loss = lambda model, b, key: llama.lm_loss(model, b)  # noqa: E731
    grads = jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest), batch, None))(params)
    key, out, steps, updates = jax.random.key(0), {}, {}, {}
    for name, tx in txs.items():
        update = jax.jit(lambda g, st, p, tx=tx: _std(tx.update, g, st, p))
        # time and size the update at step 2: GaLore's projector refresh (an SVD every
        # update_proj_gap steps, at step 1 among them) is left out of the ratios
        state = update(grads, train.init_optimizer(tx, params), params)[1]
        memory = measure.compiled_memory(update, grads, state, params)
        out[name] = {"optimizer_state_bytes": measure.tree_nbytes(state),
                     "update_memory": dataclasses.asdict(memory)}
        steps[name] = (train.make_train_step(graphdef, loss, tx, donate=False),
                       (params, state, rest, batch, key))
        step_fn, step_args = steps[name]
        out[name]["step_flops"] = dataclasses.asdict(measure.flops(step_fn, *step_args))
        updates[name] = (update, (grads, state, params))
    for label, fns in (("step", steps), ("update", updates)):
        comparison = measure.compare(fns, warmup=2, repeats=s.timing_repeats)
        print(comparison.table())
        first = next(iter(fns))
        for name in fns:
            out[name][f"{label}_seconds"] = comparison.median(name)
            out[name][f"{label}_time_ratio_vs_{first}"] = comparison.ratio(name, first)
            out[name][f"{label}_min_ratio_vs_{first}"] = (comparison.timings[name].min
                                                          / comparison.timings[first].min)
    return out


def _std(fn, *args):
    with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32
        return fn(*args)


def run(settings: Settings | None = None, *, progress: bool = False,
        on_result: Any = None) -> dict[str, Any]:
    """Train every optimizer of ``settings`` and measure it; a JSON-ready dict.

    ``on_result(partial)``, if given, receives the result so far after each optimizer.

    Examples:
        >>> out = run(Settings.make(quick=True))  # doctest: +SKIP
        >>> sorted(out["optimizers"])  # doctest: +SKIP
        ['adamw', 'lorapre_r8']
    """
    s = settings or Settings.make()
    start = time.perf_counter()
    txs = optimizers(s)
    measures = measure_optimizers(s, txs)
    results = {}
    for name, tx in txs.items():
        t0 = time.perf_counter()
        r = pretrain.train_lm(s.lm, tx=tx, progress=progress).result
        evals = r["history"]["evals"]
        results[name] = {
            **measures[name], "val_loss": r["val_loss"], "val_perplexity": r["val_perplexity"],
            "curve": {"step": [e["step"] for e in evals],
                      "val_loss": [e["val_loss"] for e in evals],
                      "val_perplexity": [math.exp(e["val_loss"]) for e in evals]},
            "train_loss_last50": sum(r["history"]["losses"][-50:]) / min(
                50, len(r["history"]["losses"])),
            "train_step_compiled_memory": r["compiled_memory"],
            "train_seconds": r["train_seconds"], "median_step_seconds": r["median_step_seconds"]}
        print(f"{name:<18} val loss {r['val_loss']:.4f}  ppl {r['val_perplexity']:.2f}  "
              f"state {measures[name]['optimizer_state_bytes'] / 2**20:.2f} MiB  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        extras = {k: r[k] for k in ("model_config", "tokens", "eval_tokens", "tokens_seen",
                                    "unigram_perplexity", "model_params")}
        threads = {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                  "XLA_FLAGS")}
        out = {"settings": {**dataclasses.asdict(s), "lm": dataclasses.asdict(s.lm)},
               **extras, "thread_env": threads, "load_average": os.getloadavg(),
               "galore_available": hasattr(optax.contrib, "galore"), "optimizers": results,
               "pending": [n for n in txs if n not in results],
               "total_seconds": time.perf_counter() - start}
        if on_result is not None:
            on_result(out)
    return out


def summary(result: dict[str, Any]) -> str:
    """A table: val loss, perplexity, state bytes, update memory, time ratios."""
    rows = [f"{'optimizer':<18} {'val loss':>8} {'ppl':>7} {'state MiB':>9} "
            f"{'upd temp MiB':>12} {'upd total MiB':>13} {'step x':>7} {'update x':>8}"]
    for name, r in result["optimizers"].items():
        step = next(v for k, v in r.items() if k.startswith("step_time_ratio"))
        upd = next(v for k, v in r.items() if k.startswith("update_time_ratio"))
        rows.append(f"{name:<18} {r['val_loss']:>8.4f} {r['val_perplexity']:>7.2f} "
                    f"{r['optimizer_state_bytes'] / 2**20:>9.3f} "
                    f"{r['update_memory']['temp'] / 2**20:>12.3f} "
                    f"{r['update_memory']['total'] / 2**20:>13.3f} {step:>7.3f} {upd:>8.3f}")
    return "\n".join(rows)


def parse(argv=None) -> argparse.Namespace:
    p = runner.parser(__name__, __doc__, quick="tiny corpus, AdamW and LoRA-Pre rank 8", seed=None,
                      seed_help="model init and data seed (default: the LM config's)", sizes=SIZES)
    for name, kind in (("preset", str), ("steps", int), ("batch-size", int), ("seq-len", int),
                       ("lr", float), ("muon-lr", float), ("max-bytes", int),
                       ("warmup-fraction", float), ("weight-decay", float),
                       ("eval-batches", int), ("evals", int),
                       ("timing-repeats", int)):
        p.add_argument(f"--{name}", type=kind)
    p.add_argument("--only", help="comma-separated optimizer names")
    return runner.parse(p, argv)


#: ``subspace-jax bench --size``: this script's arguments (``full``: the recorded run).
SIZES = {
    "tiny": ["--quick", "--steps", "16", "--eval-batches", "2", "--timing-repeats", "2"],
    "small": ["--quick", "--steps", "200", "--timing-repeats", "4",
              "--only", "adamw,lorapre_r8,galore_r8,muon,lorapre_muon_r16"],
    "full": ["--steps", "300", "--batch-size", "8", "--warmup-fraction", "0.1",
             "--eval-batches", "10", "--evals", "5", "--timing-repeats", "4", "--only",
             "adamw,lorapre_r8,galore_r8,lorapre_r32,muon,lorapre_muon_r16,lorapre_r4,"
             "lorapre_r16,adafactor"],
}


def bench_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """``subspace-jax bench`` rows: each low-rank optimizer against its full-state baseline
    (AdamW; Muon for LoRA-Pre-Muon), all measured in the same run.

    Examples:
        >>> r = lambda b, t, p: {"optimizer_state_bytes": b, "step_seconds": t,
        ...                      "val_perplexity": p, "step_flops": {"xla": 10.0}}
        >>> rows = bench_rows({"optimizers": {"adamw": r(100, 2.0, 30.0),
        ...                                   "lorapre_r8": r(25, 3.0, 31.0)}})
        >>> rows[0]["run"], rows[0]["memory_ratio"], rows[0]["time_ratio"], rows[0]["quality"]
        ('LoRA-Pre rank 8', 0.25, 1.5, 'val ppl 31.00 vs 30.00')
    """
    opts = result["optimizers"]
    labels = {"adamw": "AdamW", "muon": "Muon", "adafactor": "Adafactor"}

    def label(name: str) -> str:
        kind, _, rank = name.rpartition("_r")
        kind = {"lorapre": "LoRA-Pre", "lorapre_muon": "LoRA-Pre-Muon", "galore": "GaLore"}.get(
            kind)
        return f"{kind} rank {rank}" if kind and rank.isdigit() else labels.get(name, name)

    def ratio(a: Any, b: Any) -> float | None:
        return None if a is None or not b else a / b

    rows = []
    for name, r in opts.items():
        base = "muon" if name.startswith("lorapre_muon") else "adamw"
        if name in ("adamw", "muon") or base not in opts:
            continue
        b = opts[base]
        rows.append(dict(
            method="lorapre",
            run=label(name), baseline=labels[base],
            quality=f"val ppl {r['val_perplexity']:.2f} vs {b['val_perplexity']:.2f}",
            memory_ratio=ratio(r["optimizer_state_bytes"], b["optimizer_state_bytes"]),
            flops_ratio=ratio(r.get("step_flops", {}).get("xla"),
                              b.get("step_flops", {}).get("xla")),
            time_ratio=ratio(r["step_seconds"], b["step_seconds"]),
            what="optimizer state bytes; train step FLOPs (XLA) and time"))
    return rows


def settings_from(args: argparse.Namespace) -> Settings:
    """The run's :class:`Settings` from its flags (the shared flags aside, ``seed`` kept)."""
    skip = {*runner.SHARED, "only"} - {"seed"}
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in skip}
    if args.only:
        overrides["optimizers"] = tuple(args.only.split(","))
    return Settings.make(quick=args.quick, **overrides)


def main(argv=None) -> int:
    args = parse(argv)
    settings = settings_from(args)
    name = args.name or "lorapre" + ("_quick" if args.quick else "")
    path = args.results_dir / f"{name}.json"
    save = lambda partial: (records.write_result(name, partial,  # noqa: E731
                                                    results_dir=args.results_dir),
                            plot(path, partial))
    result = run(settings, progress=not args.no_progress, on_result=save)
    print(summary(result))
    print(f"total {result['total_seconds']:.0f} s; wrote {path} and plots")
    return 0


def plot(path: Path, result: dict[str, Any]) -> None:
    """Validation curves (``<path>.png``) and state/transient bytes (``<path>_memory.png``)."""
    curves = result["optimizers"]
    panels = {f"validation {m}": {n: (r["curve"]["step"], r["curve"][f"val_{m}"])
                                  for n, r in curves.items()} for m in ("loss", "perplexity")}
    lm = result["settings"]["lm"]
    title = f"Llama {lm['preset']}, {lm['steps']} steps: LoRA-Pre vs baselines"
    analysis.plot_curves(path.with_suffix(".png"), panels, logy=("validation perplexity",),
                           title=title)
    analysis.plot_bars(path.with_name(path.stem + "_memory.png"), {
        n: {"state MiB": r["optimizer_state_bytes"] / 2**20,
            "update temp MiB": r["update_memory"]["temp"] / 2**20} for n, r in curves.items()},
        title="persistent optimizer state and transient update memory", ylabel="MiB")


if __name__ == "__main__":
    sys.exit(main())
