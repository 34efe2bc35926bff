"""LoRA-Pre's pretraining claim, tuned: LoRA-Pre at rank r against GaLore at 8r, AdamW & co.

    subspace-jax run lorapre_pretrain [--phase sweep|headline|all] [--size tiny|small|full]

The paper's "1/8" claim is that LoRA-Pre at rank r matches GaLore at rank 8r (its Table 1
runs use r = width/4, GaLore's protocol: scale 0.25, projection gap 200). The comparison
here, on a Llama decoder pretrained on the standard library's source (``--preset 5m``:
width 256, so r = 8 = width/32 and 8r = width/4 = 64):

* AdamW; Adafactor; Muon (its AdamW branch at a fixed ``--muon-adam-lr``);
* AdamW with the low-rank optimizers' learning-rate split (``adamw_split``: the block
  matrices at 0.25x the rate of the embedding and norms, as GaLore's and LoRA-Pre's
  ``scale`` makes it), to tell the split's effect from the low-rank state's;
* GaLore at r and 8r (``optax.contrib.galore``, scale 0.25, gap 200, Adam b2 0.95);
* LoRA-Pre (Adam) at r and at width/4 (scale 0.25, as the paper follows GaLore);
* LoRA-Pre-Muon at width/4.

Every optimizer gets the same data, seed, gradient clipping (global norm 1), schedule
(linear warm-up, cosine decay to a tenth) and decoupled weight decay on matrices; the
token embedding (tied to the head) stays on AdamW in the low-rank optimizers.

**Protocol.** ``--phase sweep`` trains each optimizer at every learning rate of its grid
(:data:`GRIDS`, three values a factor of about 3 apart) for ``--sweep-steps`` and picks the
one with the lowest validation loss; a best value on an edge of the grid is followed by up
to two more trials past it, at the grid's spacing; it writes ``<name>_sweep.json`` after every run, and
``--resume`` skips the runs a matching file already holds. ``--phase headline`` trains each
optimizer at its picked rate for ``--steps`` (reading the picks from the sweep file) and
reports validation *and test* loss (the pick saw only validation), the persistent state of
the matrices and of everything, the compiled memory of the update alone (its ``temp`` is
the transient peak) and the times of the update and of the whole step, each against AdamW
measured round-robin in one process (:func:`subspace_jax.measure.compare`). ``--phase all``
runs both. A pick still at an edge after that is flagged.

Writes ``results/<name>_sweep.json`` and ``results/<name>.json`` (default name
``lorapre``), ``.png`` (validation curves) and ``_memory.png`` (state and transient bytes).
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
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from subspace_jax import data, measure, train  # noqa: E402
from subspace_jax.lorapre import lorapre, lorapre_muon  # noqa: E402
from subspace_jax.models import llama  # noqa: E402
from subspace_lab import analysis, pretrain, records, runner  # noqa: E402

#: Peak learning rates tried per optimizer family (GaLore and LoRA-Pre at scale 0.25, so
#: their matrices move at a quarter of the rate; GaLore's own protocol searches 1e-4 to
#: 1e-2 and uses 1e-2). The middle value is the run's default with ``--grid-points 1``.
GRIDS: dict[str, tuple[float, ...]] = {
    "adamw": (1e-3, 3e-3, 1e-2),
    "adafactor": (1e-3, 3e-3, 1e-2),
    "galore": (3e-3, 1e-2, 3e-2),
    "lorapre": (3e-3, 1e-2, 3e-2),
    "muon": (5e-3, 2e-2, 5e-2),
}

PHASES = ("sweep", "headline", "all")
EXTEND = 2  # trials past an edge of a grid when the best value sits on it


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """What :func:`sweep` and :func:`headline` train and measure.

    Attributes:
        lm: the shared :class:`subspace_lab.pretrain.LMConfig` (model, data, the headline's
            ``steps``; its ``lr`` is unused: each optimizer has its grid).
        sweep_steps: steps of each learning-rate trial.
        grid_points: values of each grid tried (1: the middle one; 3: all).
        rank: the small rank ``r`` (LoRA-Pre and GaLore); GaLore also runs at ``8 r``.
        galore_gap: GaLore's projection refresh period.
        galore_scale: GaLore's update scale.
        lorapre_scale: LoRA-Pre's (the paper follows GaLore's protocol).
        muon_adam_lr: peak rate of the AdamW branch (embeddings, norms) of the Muon pair.
        optimizers: names to run (None: all; see :func:`candidates`).
        timing_repeats: round-robin rounds of :func:`subspace_jax.measure.compare`.
    """

    lm: pretrain.LMConfig
    sweep_steps: int = 200
    grid_points: int = 3
    rank: int = 8
    galore_gap: int = 200
    galore_scale: float = 0.25
    lorapre_scale: float = 0.25
    muon_adam_lr: float = 3e-3
    optimizers: tuple[str, ...] | None = None
    timing_repeats: int = 6

    def __post_init__(self):
        if self.grid_points not in (1, 3):
            raise ValueError(f"Settings: grid_points={self.grid_points!r} must be 1 or 3")
        train.check_positive("Settings", self, ("sweep_steps", "rank", "galore_gap",
                                                 "galore_scale", "lorapre_scale",
                                                 "muon_adam_lr", "timing_repeats"))

    @classmethod
    def make(cls, *, quick: bool = False, **overrides: Any) -> Settings:
        """Quick settings (the tiny corpus, the 1m decoder) or full ones (the 5m decoder,
        width 256), overridden field by field."""
        own = {f.name for f in dataclasses.fields(cls)} - {"lm"}
        overrides = {"preset": "1m" if quick else "5m", **overrides}
        lm = pretrain.LMConfig.make(quick=quick, **{k: v for k, v in overrides.items()
                                                     if k not in own})
        return cls(lm=lm, **{k: v for k, v in overrides.items() if k in own})

    @property
    def width(self) -> int:
        return llama.PRESETS[self.lm.preset][0]

    def grid(self, family: str) -> tuple[float, ...]:
        values = GRIDS[family]
        return values if self.grid_points == 3 else (values[len(values) // 2],)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One optimizer of the comparison: ``build(peak_lr, steps)`` and its grid family."""

    name: str
    family: str
    build: Callable[[float, int], optax.GradientTransformation]


def _is_embedding(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda path, x: "embed" in jax.tree_util.keystr(path), params)


def _decay_mask(params: Any) -> Any:
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def _matrix_dims(kind: Any) -> Callable[[Any], Any]:
    """Dimension numbers ``kind()`` for 2-D non-embedding kernels, None for the rest."""
    return lambda params: jax.tree.map(
        lambda emb, x: None if emb or x.ndim != 2 else kind(), _is_embedding(params), params)


def candidates(s: Settings) -> list[Candidate]:
    """Every optimizer of the comparison, the key pairs first (a run cut short has them)."""
    cfg, r, wide = s.lm, s.rank, s.width // 4
    wd = cfg.weight_decay

    def schedule(peak: float, steps: int) -> optax.Schedule:
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, int(cfg.warmup_fraction * steps), steps, peak / 10)

    clip = lambda tx: optax.chain(optax.clip_by_global_norm(1.0), tx)  # noqa: E731

    def adamw(peak, steps):
        return clip(optax.adamw(schedule(peak, steps), b2=0.95, weight_decay=wd,
                                mask=_decay_mask))

    def adamw_split(peak, steps):
        # AdamW with the low-rank optimizers' learning-rate split: their ``scale`` moves
        # the block matrices at lorapre_scale x the rate of the rest (embedding, norms)
        sched = schedule(peak, steps)
        matrices = lambda params: jax.tree.map(  # noqa: E731
            lambda emb, x: "matrix" if x.ndim == 2 and not emb else "rest",
            _is_embedding(params), params)
        decayed = lambda lr: optax.adamw(lr, b2=0.95, weight_decay=wd,  # noqa: E731
                                         mask=_decay_mask)
        return clip(optax.multi_transform(
            {"matrix": decayed(lambda c: s.lorapre_scale * sched(c)), "rest": decayed(sched)},
            matrices))

    def adafactor(peak, steps):
        sched = schedule(peak, steps)
        # optax.adafactor adds its weight decay after the learning rate: scale it by the
        # schedule to get the same decoupled lr * wd decay as the others
        return clip(optax.adafactor(sched, multiply_by_parameter_scale=False,
                                    weight_decay_rate=lambda c: wd * sched(c),
                                    weight_decay_mask=_decay_mask))

    def galore(rank):
        def build(peak, steps):
            return clip(optax.contrib.galore(
                schedule(peak, steps), rank=rank, update_proj_gap=s.galore_gap,
                scale=s.galore_scale, base_optimizer=optax.scale_by_adam(b2=0.95),
                weight_decay=wd, mask=_decay_mask,
                weight_dimension_numbers=_matrix_dims(optax.contrib.GaLoreDimensionNumbers)))
        return build

    def lorapre_adam(rank):
        def build(peak, steps):
            return clip(lorapre(schedule(peak, steps), rank=rank, b1=0.9, b2=0.95,
                                weight_decay=wd, weight_decay_mask=_decay_mask,
                                scale=s.lorapre_scale, adamw_mask=_is_embedding))
        return build

    muon_common = dict(beta=0.95, weight_decay=wd, adam_b2=0.95)

    def muon(peak, steps):
        return clip(optax.contrib.muon(
            schedule(peak, steps), adam_learning_rate=schedule(s.muon_adam_lr, steps),
            muon_weight_dimension_numbers=_matrix_dims(optax.contrib.MuonDimensionNumbers),
            **muon_common))

    def lorapre_muon_(peak, steps):
        return clip(lorapre_muon(schedule(peak, steps), rank=wide, adamw_mask=_is_embedding,
                                 adam_learning_rate=schedule(s.muon_adam_lr, steps),
                                 **muon_common))

    out = [Candidate("adamw", "adamw", adamw),
           Candidate(f"lorapre_r{r}", "lorapre", lorapre_adam(r)),
           Candidate(f"galore_r{8 * r}", "galore", galore(8 * r)),
           Candidate(f"galore_r{r}", "galore", galore(r)),
           Candidate(f"lorapre_r{wide}", "lorapre", lorapre_adam(wide)),
           Candidate("muon", "muon", muon),
           Candidate(f"lorapre_muon_r{wide}", "muon", lorapre_muon_),
           Candidate("adafactor", "adafactor", adafactor),
           Candidate("adamw_split", "galore", adamw_split)]
    out = list({c.name: c for c in out}.values())  # r = width/4 would name one twice
    if s.optimizers is not None:
        known = [c.name for c in out]
        unknown = sorted(set(s.optimizers) - set(known))
        if unknown:
            raise ValueError(f"optimizers: unknown names {unknown}; known {known}")
        out = [c for c in out if c.name in s.optimizers]
    return out


def _model(cfg: pretrain.LMConfig):
    corpus = data.load_lm_corpus(vocab_size=cfg.vocab_size, max_bytes=cfg.max_bytes,
                                 seed=cfg.seed)
    config = llama.LlamaConfig.preset(cfg.preset, vocab_size=corpus.vocab_size,
                                      max_len=cfg.seq_len)
    graphdef, params, rest = train.split_model(llama.Llama(config, rngs=nnx.Rngs(cfg.seed)))
    batch = jnp.asarray(next(data.lm_batches(corpus.train, batch_size=cfg.batch_size,
                                             seq_len=cfg.seq_len, seed=cfg.seed)))
    return graphdef, params, rest, batch, corpus


def _matrices_only(params: Any) -> Any:
    """``params`` with every leaf but the low-rank candidates (2-D, not the embedding)
    emptied to zero size: an optimizer's state on it is the state *of the matrices*."""
    return jax.tree.map(lambda emb, x: x if x.ndim == 2 and not emb
                        else jnp.zeros((0,) * x.ndim, x.dtype), _is_embedding(params), params)


def _std(fn, *args):
    with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32
        return fn(*args)


def measure_optimizers(s: Settings, txs: dict[str, optax.GradientTransformation],
                       ) -> dict[str, dict[str, Any]]:
    """State bytes (matrices, everything), compiled memory of the update, step and update
    times against the first optimizer (AdamW), measured round-robin in one process."""
    graphdef, params, rest, batch, _ = _model(s.lm)
    loss = lambda model, b, key: llama.lm_loss(model, b)  # noqa: E731
    grads = jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest), batch, None))(params)
    key, out, steps, updates = jax.random.key(0), {}, {}, {}
    for name, tx in txs.items():
        update = jax.jit(lambda g, st, p, tx=tx: _std(tx.update, g, st, p))
        # time and size the update at step 2: GaLore's projector refresh (an SVD every
        # galore_gap steps, at step 1 among them) is left out of the ratios
        state = update(grads, train.init_optimizer(tx, params), params)[1]
        memory = measure.compiled_memory(update, grads, state, params)
        matrices = _std(tx.init, _matrices_only(params))
        out[name] = {"optimizer_state_bytes": measure.tree_nbytes(state),
                     "matrix_state_bytes": measure.tree_nbytes(matrices),
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


def _split_loss(cfg: pretrain.LMConfig, run: Any, split: str) -> float:
    """Mean next-token NLL of ``run``'s model on the first eval windows of ``split``."""
    corpus = data.load_lm_corpus(vocab_size=cfg.vocab_size, max_bytes=cfg.max_bytes,
                                 seed=cfg.seed)
    windows = data.lm_windows(corpus.splits()[split], cfg.seq_len)
    windows = windows[:cfg.eval_batches * cfg.batch_size]
    sums = train.evaluate(train.make_eval_step(run.graphdef, pretrain.lm_metrics), run.params,
                          run.rest, {"tokens": windows}, batch_size=cfg.batch_size)
    return float(sums["loss"] / sums["count"])


def _train(s: Settings, c: Candidate, peak: float, steps: int, *, progress: bool,
           test: bool = False) -> dict[str, Any]:
    cfg = dataclasses.replace(s.lm, steps=steps, lr=peak)
    run = pretrain.train_lm(cfg, tx=c.build(peak, steps), progress=progress)
    r = run.result
    evals = r["history"]["evals"]
    out = {"lr": peak, "steps": steps, "tokens_seen": r["tokens_seen"],
           "val_loss": r["val_loss"], "val_perplexity": r["val_perplexity"],
           "curve": {"step": [e["step"] for e in evals],
                     "val_loss": [e["val_loss"] for e in evals],
                     "val_perplexity": [math.exp(min(e["val_loss"], 50.0)) for e in evals]},
           "train_loss_last50": sum(r["history"]["losses"][-50:]) / min(
               50, len(r["history"]["losses"])),
           "train_seconds": r["train_seconds"], "median_step_seconds": r["median_step_seconds"],
           "extras": {k: r[k] for k in ("model_config", "tokens", "eval_tokens",
                                        "unigram_perplexity", "model_params")}}
    if test:
        out["test_loss"] = _split_loss(cfg, run, "test")
        out["test_perplexity"] = math.exp(min(out["test_loss"], 50.0))
    return out


def _finite(loss: float) -> float:
    return loss if math.isfinite(loss) else math.inf


def _settings_dict(s: Settings) -> dict[str, Any]:
    """The settings as their JSON record reads back (tuples as lists)."""
    return json.loads(json.dumps({**dataclasses.asdict(s), "lm": dataclasses.asdict(s.lm)}))


def _environment_extras() -> dict[str, Any]:
    return {"thread_env": {k: os.environ.get(k) for k in
                           ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "XLA_FLAGS")},
            "load_average": os.getloadavg(), "grids": {k: list(v) for k, v in GRIDS.items()}}


def sweep(s: Settings, *, progress: bool = False, previous: dict[str, Any] | None = None,
          on_result: Any = None) -> dict[str, Any]:
    """Train every candidate at every learning rate of its grid for ``sweep_steps``; pick
    the lowest validation loss. ``previous``: a partial sweep of the same settings whose
    runs are kept. ``on_result(partial)`` receives the result after every run.

    Examples:
        >>> out = sweep(Settings.make(quick=True, sweep_steps=4, grid_points=1,
        ...                           optimizers=("adamw",)))  # doctest: +SKIP
        >>> out["picks"]["adamw"]["lr"]  # doctest: +SKIP
        0.003
    """
    start = time.perf_counter()
    kept = {}
    if previous is not None:
        if previous.get("settings") != _settings_dict(s):
            raise ValueError("sweep: --resume found a sweep with other settings; rerun "
                             "without --resume or with the same flags")
        kept = previous.get("runs", {})
    runs: dict[str, dict[str, Any]] = {}
    picks: dict[str, dict[str, Any]] = {}
    out: dict[str, Any] = _sweep_result(s, runs, picks, start)
    def trial(c: Candidate, peak: float) -> float:
        label = f"{peak:g}"
        if label not in runs[c.name]:
            t0 = time.perf_counter()
            r = _train(s, c, peak, s.sweep_steps, progress=progress)
            r.pop("extras")
            runs[c.name][label] = r
            print(f"sweep {c.name:<18} lr {peak:<7g} val loss {r['val_loss']:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            if on_result is not None:
                on_result(_sweep_result(s, runs, picks, start))
        return _finite(runs[c.name][label]["val_loss"])

    for c in candidates(s):
        runs[c.name] = dict(kept.get(c.name, {}))
        grid = list(s.grid(c.family))
        losses = {peak: trial(c, peak) for peak in grid}
        extended = []
        # a pick at an edge of the grid is not a pick: step past it, by the grid's own
        # spacing, up to EXTEND times (each one a full trial)
        while len(grid) > 1 and len(extended) < EXTEND:
            best = min(grid, key=losses.__getitem__)
            if best == grid[-1]:
                peak = _round(grid[-1] * grid[-1] / grid[-2])
                grid.append(peak)
            elif best == grid[0]:
                peak = _round(grid[0] * grid[0] / grid[1])
                grid.insert(0, peak)
            else:
                break
            extended.append(peak)
            losses[peak] = trial(c, peak)
        best = min(grid, key=losses.__getitem__)
        picks[c.name] = {"lr": best, "val_loss": losses[best], "grid": grid,
                         "extended": extended,
                         "edge": len(grid) > 1 and best in (grid[0], grid[-1])}
        out = _sweep_result(s, runs, picks, start)
        if on_result is not None:
            on_result(out)
    return out


def _round(lr: float) -> float:
    """``lr`` to two significant digits (a grid value that prints as it is)."""
    return float(f"{lr:.2g}")


def _sweep_result(s: Settings, runs, picks, start) -> dict[str, Any]:
    return {"settings": _settings_dict(s), **_environment_extras(), "phase": "sweep",
            "runs": runs, "picks": dict(picks),
            "pending": [c.name for c in candidates(s) if c.name not in picks],
            "total_seconds": time.perf_counter() - start}


def headline(s: Settings, picks: dict[str, dict[str, Any]], *, progress: bool = False,
             sweep_result: dict[str, Any] | None = None, on_result: Any = None,
             ) -> dict[str, Any]:
    """Train every candidate at its picked rate for ``lm.steps``, then measure the costs.

    Examples:
        >>> s = Settings.make(quick=True, steps=4, optimizers=("adamw",))  # doctest: +SKIP
        >>> headline(s, {"adamw": {"lr": 3e-3}})["optimizers"]["adamw"]["lr"]  # doctest: +SKIP
        0.003
    """
    start = time.perf_counter()
    cands = candidates(s)
    missing = [c.name for c in cands if c.name not in picks]
    if missing:
        raise ValueError(f"headline: no learning-rate pick for {missing}; run --phase sweep "
                         "first (or --phase all)")
    results: dict[str, dict[str, Any]] = {}
    extras: dict[str, Any] = {}
    txs = {c.name: c.build(picks[c.name]["lr"], s.lm.steps) for c in cands}

    def snapshot() -> dict[str, Any]:
        return {"settings": _settings_dict(s), **_environment_extras(), **extras,
                "phase": "headline", "picks": picks, "optimizers": results,
                "sweep": sweep_result, "pending": [c.name for c in cands
                                                   if c.name not in results],
                "galore_available": hasattr(optax.contrib, "galore"),
                "total_seconds": time.perf_counter() - start}

    for c in cands:
        t0 = time.perf_counter()
        r = _train(s, c, picks[c.name]["lr"], s.lm.steps, progress=progress, test=True)
        extras = {**r.pop("extras"), "tokens_seen": r["tokens_seen"]}
        results[c.name] = r
        print(f"headline {c.name:<18} lr {r['lr']:<7g} val loss {r['val_loss']:.4f}  "
              f"test loss {r['test_loss']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        if on_result is not None:
            on_result(snapshot())
    for name, m in measure_optimizers(s, txs).items():
        results[name].update(m)
    out = snapshot()
    if on_result is not None:
        on_result(out)
    return out


def summary(result: dict[str, Any]) -> str:
    """The headline table: lr, val and test loss, state, update memory, time ratios."""
    rows = [f"{'optimizer':<18} {'lr':>7} {'val loss':>8} {'test loss':>9} {'matrix MiB':>10} "
            f"{'state MiB':>9} {'upd temp MiB':>12} {'update x':>8} {'step x':>7}"]
    for name, r in result["optimizers"].items():
        step = next((v for k, v in r.items() if k.startswith("step_time_ratio")), math.nan)
        upd = next((v for k, v in r.items() if k.startswith("update_time_ratio")), math.nan)
        mib = lambda key: r.get(key, math.nan) / 2**20  # noqa: E731
        rows.append(f"{name:<18} {r['lr']:>7g} {r['val_loss']:>8.4f} "
                    f"{r.get('test_loss', math.nan):>9.4f} {mib('matrix_state_bytes'):>10.3f} "
                    f"{mib('optimizer_state_bytes'):>9.3f} "
                    f"{r.get('update_memory', {}).get('temp', math.nan) / 2**20:>12.3f} "
                    f"{upd:>8.3f} {step:>7.3f}")
    return "\n".join(rows)


def sweep_summary(result: dict[str, Any]) -> str:
    """Validation loss per optimizer and learning rate; the pick starred (``!`` at an edge)."""
    rows = []
    for name, by_lr in result["runs"].items():
        pick = result["picks"].get(name, {})
        cells = []
        for label, r in sorted(by_lr.items(), key=lambda kv: float(kv[0])):
            star = ("*" + ("!" if pick.get("edge") else "")) if pick.get("lr") == float(label) \
                else ""
            cells.append(f"{label}: {r['val_loss']:.4f}{star}")
        rows.append(f"{name:<18} " + "   ".join(cells))
    return "\n".join(rows)


def parse(argv=None) -> argparse.Namespace:
    p = runner.parser(__name__, __doc__, quick="the tiny corpus (sizes set the rest)",
                      seed=None, seed_help="model init and data seed (default: the LM config's)",
                      sizes=SIZES)
    p.add_argument("--phase", choices=PHASES, default="all",
                   help="sweep: learning-rate grids; headline: the picks at --steps; all: both")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs of a partial sweep file with the same settings")
    for name, kind in (("preset", str), ("steps", int), ("sweep-steps", int),
                       ("grid-points", int), ("rank", int), ("batch-size", int),
                       ("seq-len", int), ("muon-adam-lr", float), ("max-bytes", int),
                       ("warmup-fraction", float), ("weight-decay", float),
                       ("eval-batches", int), ("evals", int), ("timing-repeats", int)):
        p.add_argument(f"--{name}", type=kind)
    p.add_argument("--only", help="comma-separated optimizer names")
    return runner.parse(p, argv)


#: ``subspace-jax bench --size``: this script's arguments (``full``: the recorded run).
SIZES = {
    "tiny": ["--quick", "--sweep-steps", "8", "--steps", "16", "--grid-points", "1",
             "--eval-batches", "2", "--timing-repeats", "2", "--only", "adamw,lorapre_r8"],
    "small": ["--quick", "--sweep-steps", "60", "--steps", "200", "--timing-repeats", "4",
              "--only", "adamw,lorapre_r8,galore_r64,muon,lorapre_muon_r32"],
    "full": ["--preset", "5m", "--sweep-steps", "200", "--steps", "800", "--batch-size", "8",
             "--seq-len", "128", "--warmup-fraction", "0.1", "--eval-batches", "10",
             "--evals", "5", "--timing-repeats", "4"],
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
            memory_ratio=ratio(r.get("optimizer_state_bytes"), b.get("optimizer_state_bytes")),
            flops_ratio=ratio(r.get("step_flops", {}).get("xla"),
                              b.get("step_flops", {}).get("xla")),
            time_ratio=ratio(r.get("step_seconds"), b.get("step_seconds")),
            what="optimizer state bytes; train step FLOPs (XLA) and time"))
    return rows


def settings_from(args: argparse.Namespace) -> Settings:
    """The run's :class:`Settings` from its flags (the shared flags aside, ``seed`` kept)."""
    skip = {*runner.SHARED, "only", "phase", "resume"} - {"seed"}
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in skip}
    if args.only:
        overrides["optimizers"] = tuple(args.only.split(","))
    return Settings.make(quick=args.quick, **overrides)


def _same_protocol(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two settings that differ at most in what the headline alone sets (its steps, its
    optimizer subset, its timing rounds)."""
    free = {"optimizers": None, "timing_repeats": None}
    return ({**a, **free, "lm": {**a["lm"], "steps": None}}
            == {**b, **free, "lm": {**b["lm"], "steps": None}})


def main(argv=None) -> int:
    args = parse(argv)
    settings = settings_from(args)
    candidates(settings)  # unknown --only names fail here, before any training
    name = args.name or "lorapre" + ("_quick" if args.quick else "")
    sweep_path = args.results_dir / f"{name}_sweep.json"
    path = args.results_dir / f"{name}.json"
    progress = not args.no_progress
    if args.phase in ("sweep", "all"):
        previous = (json.loads(sweep_path.read_text())
                    if args.resume and sweep_path.exists() else None)
        save_sweep = lambda partial: records.write_result(  # noqa: E731
            f"{name}_sweep", partial, results_dir=args.results_dir)
        swept = sweep(settings, progress=progress, previous=previous, on_result=save_sweep)
        print(sweep_summary(swept))
        print(f"sweep: {swept['total_seconds']:.0f} s; wrote {sweep_path}")
    if args.phase in ("headline", "all"):
        if not sweep_path.exists():
            raise SystemExit(f"lorapre_pretrain: no sweep at {sweep_path}: run --phase sweep")
        swept = json.loads(sweep_path.read_text())
        if not _same_protocol(swept["settings"], _settings_dict(settings)):
            raise SystemExit(f"lorapre_pretrain: {sweep_path} was swept with other settings "
                             "(model, data, ranks, scales or grids): rerun --phase sweep")
        save = lambda partial: (records.write_result(name, partial,  # noqa: E731
                                                        results_dir=args.results_dir),
                                plot(path, partial))
        result = headline(settings, swept["picks"], progress=progress,
                          sweep_result={k: swept[k] for k in ("settings", "runs", "picks")},
                          on_result=save)
        print(summary(result))
        print(f"headline: {result['total_seconds']:.0f} s; wrote {path} and plots")
    return 0


def plot(path: Path, result: dict[str, Any]) -> None:
    """Validation curves (``<path>.png``) and state/transient bytes (``<path>_memory.png``)."""
    curves = result["optimizers"]
    panels = {f"validation {m}": {f"{n} (lr {r['lr']:g})": (r["curve"]["step"],
                                                            r["curve"][f"val_{m}"])
                                  for n, r in curves.items()} for m in ("loss", "perplexity")}
    lm = result["settings"]["lm"]
    title = (f"Llama {lm['preset']}, {lm['steps']} steps, learning rates picked on "
             "validation")
    analysis.plot_curves(path.with_suffix(".png"), panels, logy=("validation perplexity",),
                         title=title)
    measured = {n: r for n, r in curves.items() if "update_memory" in r}
    if measured:
        analysis.plot_bars(path.with_name(path.stem + "_memory.png"), {
            n: {"matrix state MiB": r["matrix_state_bytes"] / 2**20,
                "state MiB": r["optimizer_state_bytes"] / 2**20,
                "update temp MiB": r["update_memory"]["temp"] / 2**20}
            for n, r in measured.items()},
            title="optimizer state (matrices, all) and transient update memory",
            ylabel="MiB")


if __name__ == "__main__":
    sys.exit(main())
