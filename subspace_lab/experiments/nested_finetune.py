"""NSN on MiniLM: one model fine-tuned on pydoc topics, read at any rank of its MLP Linears.

    subspace-jax run nested_finetune --epochs 4 --name nested_4ep  # the recorded run
    subspace-jax run nested_finetune --epochs 2      # the 2-epoch run (results/nested.json)
    subspace-jax run nested_finetune --quick         # minutes: subsets, few steps
    subspace-jax bench nested [--size tiny|small|full]    # SIZES below, rows by bench_rows

Trains, with the same steps, batch and seed: full fine-tuning (dense), one NSN model (MLP
Linears converted at R = 384, anchor + one sampled rank per step, learned log-variances,
curriculum), and specialists converted and trained at fixed ranks. Reports accuracy against
rank for NSN, for plain SVD truncation of the fine-tuned dense model and for the
specialists, with McNemar's exact test of NSN against SVD truncation on the same test texts
at each rank; cost fractions under three denominators; forward latency per rank measured
round robin beside the dense model (and one Linear alone); nesting (principal angles);
component energies; the learned log-variances. Writes ``results/nested[_quick].json``,
``.png`` (accuracy against FLOPs and latency), ``_analysis.png`` and ``.md`` (the README
table with this command).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from subspace_jax import data, measure, nested, train
from subspace_lab import analysis, baselines, nested_eval, records, runner

EVAL_RANKS = (1, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 240, 256, 307, 384)
LATENCY_RANKS = (8, 32, 64, 96, 153, 192, 256, 307, 384)

#: ``subspace-jax bench nested`` sizes: the script's argv ("full" is the recorded run).
SIZES: dict[str, list[str]] = {
    # one encoder layer, 3 steps of 4 texts, one specialist: a smoke run (~30 s)
    "tiny": ["--num-layers", "1", "--steps", "3", "--batch-size", "4", "--max-length", "16",
             "--train-limit", "32", "--eval-limit", "8", "--ranks", "1", "--specialists", "4",
             "--latency-ranks", "384", "--latency-repeats", "1", "--latency-rows", "4"],
    # the quick budget (40 steps of 16, 256 val/test texts), one specialist: minutes
    "small": ["--quick", "--specialists", "153", "--ranks", "8,48,96,153,256,384",
              "--latency-repeats", "3"],
    "full": ["--epochs", "4"],
}


def parse(argv=None) -> argparse.Namespace:
    p = runner.parser(__name__, __doc__, quick="short runs on subsets", seed=None, sizes=SIZES)
    p.add_argument("--epochs", type=int, default=1, help="passes of every training run")
    p.add_argument("--steps", type=int, help="steps of every training run (overrides epochs)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate of every run")
    p.add_argument("--nested-lr", type=float, help="peak learning rate of the NSN run only "
                   "(default: --lr)")
    p.add_argument("--warm-start", type=float, default=0.0,
                   help="share of the steps spent fine-tuning the dense model before it is "
                        "converted; NSN trains the remaining steps, so the total stays the "
                        "dense run's (default 0: NSN converts the pretrained model)")
    p.add_argument("--train-limit", type=int)
    p.add_argument("--eval-limit", type=int)
    p.add_argument("--num-layers", type=int, help="keep only the first encoder layers")
    p.add_argument("--max-length", type=int)
    p.add_argument("--grid", help="training ranks, comma-separated (default: "
                   "rank_grid(R, steps=--grid-steps))")
    p.add_argument("--grid-steps", type=int, default=16,
                   help="evenly spaced training ranks of the default grid (plus halvings)")
    p.add_argument("--ranks", help="evaluation ranks, comma-separated")
    p.add_argument("--specialists", default="48,153,256", help="fixed-rank specialists")
    p.add_argument("--curriculum", type=float, default=0.3, help="share of steps to widen")
    p.add_argument("--log-var-lr", type=float, default=1e-2)
    p.add_argument("--latency-ranks", help="ranks timed (default: a subset of --ranks)")
    p.add_argument("--latency-repeats", type=int, default=10)
    p.add_argument("--latency-rows", type=int, default=32, help="texts per timed forward")
    p.add_argument("--reuse", type=Path, help="a result of this script whose dense run, SVD "
                   "truncation and specialists to reuse (same settings): train only NSN")
    return runner.parse(p, argv)


def _ints(text, default):
    return tuple(int(x) for x in text.split(",")) if text else tuple(default)


def _config(args, mode, **overrides):
    fields = {"epochs", "steps", "batch_size", "lr", "seed", "train_limit", "eval_limit",
              "num_layers", "max_length"}
    settings = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    return baselines.FinetuneConfig.make(quick=args.quick, mode=mode, evals=1,
                                         **{**settings, **overrides})


def _train(args, method, mode, progress, **overrides):
    cfg = _config(args, mode, **overrides)
    start = time.perf_counter()
    run = baselines.train_text_classifier(cfg, method=method, progress=progress)
    print(f"{mode}: {run.result['steps']} steps, median step "
          f"{run.result['median_step_seconds']:.2f} s, {time.perf_counter() - start:.0f} s",
          flush=True)
    return cfg, run


def _summary(run):
    keep = ("mode", "lr", "steps", "median_step_seconds", "compiled_memory", "residual_bytes",
            "flops_matmul", "trainable_params", "model_params", "optimizer_state_bytes",
            "val_accuracy", "test_accuracy", "train_seconds")
    return {k: run.result[k] for k in keep if k in run.result}


def _layer_latency(d_in, d_out, tokens, ranks, repeats):
    """One (d_in, d_out) Linear alone: dense matmul against nested prefixes, round robin."""
    key = jax.random.key(0)
    w = jax.random.normal(key, (d_in, d_out)) / np.sqrt(d_in)
    x = jax.random.normal(jax.random.key(1), (tokens, d_in))
    kernel = nested.Nested.from_dense(w)
    fns = {"dense": (jax.jit(lambda x, w: x @ w), (x, w))}
    for r in ranks:
        fns[f"r{r}"] = (jax.jit(lambda x, k, r=r: k.matmul_at(x, r)), (x, kernel))
    timing = measure.compare(fns, warmup=2, repeats=repeats)
    return {name: {"rank": None if name == "dense" else int(name[1:]),
                   "median_s": timing.median(name),
                   "macs_per_token": d_in * d_out if name == "dense"
                   else int(name[1:]) * (d_in + d_out)}
            for name in fns}


def _fit(xs, ys):
    """Least-squares line and R^2."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    slope, icpt = np.polyfit(xs, ys, 1)
    pred = slope * xs + icpt
    r2 = 1 - ((ys - pred) ** 2).sum() / max(((ys - ys.mean()) ** 2).sum(), 1e-30)
    return {"slope": slope, "intercept": icpt, "r2": r2}


def _sweep(graph, arrays, ranks, val_ranks):
    """Test accuracy at every rank, validation accuracy too at ``val_ranks``.

    Traced ranks (one compilation for every rank; the numbers equal the static widths',
    which ``tests/test_nested.py`` checks); latency is measured at static widths.
    """
    rows = nested_eval.sweep(*graph, {"test": arrays["test"]}, ranks, static=False)
    val = _by_rank(nested_eval.sweep(*graph, {"val": arrays["val"]},
                               [r for r in ranks if r in val_ranks], static=False))
    for row in rows:
        row.update(val.get(row["rank"], {}))
    return rows


def _correct(graph, split, ranks, batch_size: int = 64) -> dict[int, str]:
    """Per-text correctness on ``split`` at each traced rank, as a string of 0/1 (one
    compilation, plus one for a last partial batch): the paired test below needs it."""
    graphdef, params, rest = graph

    @jax.jit
    def predict(params, rest, batch):
        logits = baselines.classifier_logits(nnx.merge(graphdef, params, rest), batch, deterministic=True)
        return jnp.argmax(logits, axis=-1)

    n, out = len(split["labels"]), {}
    for r in ranks:
        at_r = nested.set_rank(params, r, static=False)
        preds = np.concatenate([np.asarray(predict(at_r, rest, {
            k: jnp.asarray(v[i:i + batch_size]) for k, v in split.items() if k != "labels"}))
            for i in range(0, n, batch_size)])
        out[r] = "".join("1" if hit else "0" for hit in preds == np.asarray(split["labels"]))
    return out


def _reuse(args, reused, eval_ranks):
    """The dense, SVD-truncation and specialist sections of ``reused``, checked and labelled."""
    svd_ranks = {row["rank"] for row in reused["svd_truncation"]["sweep"]}
    problems = [f"lr {reused['dense']['lr']} != {args.lr}"] if reused["dense"]["lr"] != args.lr else []
    problems += [f"rank {r} not in its SVD sweep" for r in eval_ranks if r not in svd_ranks]
    if problems:
        raise ValueError(f"--reuse {args.reuse}: not the same settings: {problems}")
    env = reused.get("environment", {})
    return {"dense": reused["dense"], "svd_truncation": reused["svd_truncation"],
            "specialists": reused["specialists"],
            "reused": {"from": str(args.reuse), "command": reused["command"],
                       "git_commit": env.get("git_commit"),
                       "sections": ["dense", "svd_truncation", "specialists",
                                    "nesting.specialists", "energy.svd_of_dense_ft"],
                       "latency_baseline": "the pretrained dense model (same shapes)"}}


def _by_rank(rows):
    return {row["rank"]: row for row in rows}


@dataclasses.dataclass
class _Run:
    """What the sections of one benchmark run share."""

    args: argparse.Namespace
    progress: bool
    reused: dict | None = None
    cfg: Any = None
    steps: int = 0
    dense_model: Any = None
    svd_model: Any = None
    arrays: dict = dataclasses.field(default_factory=dict)
    top: int = 0
    half: int = 0
    headline: list = dataclasses.field(default_factory=list)
    eval_ranks: tuple = ()
    batch: dict = dataclasses.field(default_factory=dict)
    model: Any = None
    spec_models: dict = dataclasses.field(default_factory=dict)


def main(argv=None) -> int:
    """Run the benchmark (see the module docstring); returns the exit status."""
    args = parse(argv)
    if not 0 <= args.warm_start < 1:
        raise ValueError(f"--warm-start {args.warm_start}: the share of the steps that "
                         f"fine-tune the dense model before NSN must be in [0, 1)")
    start = time.perf_counter()
    argv = sys.argv[1:] if argv is None else list(argv)
    out: dict = {"task": "pydoc_topics", "model": "all-MiniLM-L6-v2",
                 "command": " ".join(["subspace-jax run nested_finetune", *argv])}
    run = _Run(args=args, progress=not args.no_progress,
               reused=json.loads(args.reuse.read_text()) if args.reuse else None)
    _dense_and_svd(run, out)
    _nsn(run, out)
    _specialists(run, out)
    _costs_latency_nesting_energy(run, out)
    _headline(run, out)
    out["total_seconds"] = time.perf_counter() - start
    name = args.name or "nested" + ("_quick" if args.quick else "")
    path = records.write_result(name, out, results_dir=args.results_dir)
    _plots(path, out)
    table = _table(out, name)
    path.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"wrote {path}, {path.with_suffix('.png').name}, {path.stem}_analysis.png, "
          f"{path.with_suffix('.md').name}")
    return 0




def _dense_and_svd(run: _Run, out: dict) -> None:
    """1. Dense fine-tuning, then plain SVD truncation of the fine-tuned model (no NSN)."""
    args, progress, reused = run.args, run.progress, run.reused
    eval_ranks = _ints(args.ranks, EVAL_RANKS)
    if reused is None:
        cfg, dense = _train(args, None, "full", progress)
        steps = dense.result["steps"]
        dense_model = nnx.merge(dense.graphdef, dense.params, dense.rest)
    else:  # the pretrained model: its shapes set the ranks, its forward the latency baseline
        cfg, steps = _config(args, "full"), reused["dense"]["steps"]
        dense_model = baselines.build_classifier(cfg, data.load_pydoc_topics().num_classes)
    arrays = nested_eval.eval_arrays(cfg)
    svd_model = nested.convert(dense_model)
    top = max(k.max_rank for k in nested.kernels(svd_model).values())
    half = nested.rank_for_budget(svd_model, 0.5, "mlp")  # 50% of the dense-MLP FLOPs
    headline = [top, half, max(1, top // 8)]
    eval_ranks = tuple(sorted({r for r in eval_ranks if r <= top} | set(headline)))
    batch = {k: jnp.asarray(v[:args.latency_rows]) for k, v in arrays["test"].items()}
    if reused is None:
        logits = {n: baselines.classifier_logits(m, batch)
                  for n, m in (("dense", dense_model), ("svd", svd_model))}
        out["dense"] = _summary(dense)
        out["svd_truncation"] = {
            "max_abs_logit_difference_at_R": float(jnp.abs(logits["dense"] - logits["svd"]).max()),
            "sweep": _sweep(train.split_model(svd_model), arrays, eval_ranks, headline),
            "test_correct": _correct(train.split_model(svd_model), arrays["test"], eval_ranks)}
        print("SVD truncation swept", flush=True)
    else:
        out.update(_reuse(args, reused, eval_ranks))

    run.cfg, run.steps, run.dense_model, run.svd_model = cfg, steps, dense_model, svd_model
    run.arrays, run.top, run.half, run.headline = arrays, top, half, headline
    run.eval_ranks, run.batch = eval_ranks, batch


def _nsn(run: _Run, out: dict) -> None:
    """2. One NSN model over the rank grid (after an optional dense warm start)."""
    args, progress, steps, top = run.args, run.progress, run.steps, run.top
    arrays, eval_ranks, headline = run.arrays, run.eval_ranks, run.headline
    grid = _ints(args.grid, nested.core.rank_grid(top, steps=args.grid_steps))
    warm_steps = round(args.warm_start * steps)
    if warm_steps >= steps:
        raise ValueError(f"--warm-start {args.warm_start}: {warm_steps} of the {steps} steps "
                         f"fine-tune the dense model, which leaves NSN none")
    method = nested_eval.nested_method(grid=grid, curriculum=args.curriculum,
                                       log_var_lr=args.log_var_lr)
    if warm_steps:  # dense fine-tuning first, then NSN from that model: same total steps
        _, warm = _train(args, None, "full", progress, steps=warm_steps)
        warm_model, recipe = nnx.merge(warm.graphdef, warm.params, warm.rest), method.recipe

        def warm_recipe(cfg):  # NSN converts the warm model instead of the pretrained one
            r = recipe(cfg)
            return dataclasses.replace(r, convert=lambda model, key: r.convert(warm_model, key))

        method = dataclasses.replace(method, recipe=warm_recipe)
    overrides = {"steps": steps - warm_steps} if warm_steps else {}
    if args.nested_lr is not None:
        overrides["lr"] = args.nested_lr
    _, nrun = _train(args, method, "nested", progress, **overrides)
    if warm_steps + nrun.result["steps"] != steps:
        raise ValueError(f"NSN ran {warm_steps} + {nrun.result['steps']} steps, the dense run "
                         f"{steps}")
    model = nnx.merge(nrun.graphdef, nrun.params, nrun.rest)
    sampled = nrun.result["history"]["metrics"]["variant_rank"]
    ranks_seen, counts = np.unique(np.asarray(sampled, int), return_counts=True)
    out["nested"] = {
        **_summary(nrun), "warm_start_steps": warm_steps, "grid": list(grid),
        "curriculum_steps": int(args.curriculum * (steps - warm_steps)),
        "log_var_lr": args.log_var_lr,
        "sampled_ranks": {int(r): int(c) for r, c in zip(ranks_seen, counts)},
        "log_variances": dict(zip(map(str, grid),
                                  np.asarray(nrun.beside[nested.OBJECTIVE].log_var).tolist())),
        "history": {k: nrun.result["history"]["metrics"][k] for k in
                    ("ce_anchor", "ce_variant", "variant_rank", "s_anchor", "s_variant")},
        "sweep": _sweep((nrun.graphdef, nrun.params, nrun.rest), arrays, eval_ranks, headline),
        "test_correct": _correct((nrun.graphdef, nrun.params, nrun.rest), arrays["test"],
                                 eval_ranks)}
    for row in out["nested"]["sweep"]:
        row["trained"] = row["rank"] in grid
        row["sampled"] = row["rank"] in out["nested"]["sampled_ranks"] or row["rank"] == top
    svd_acc = _by_rank(out["svd_truncation"]["sweep"])
    print("NSN swept: rank, NSN / SVD-truncation test accuracy:", ", ".join(
        f"{row['rank']}: {row['test_accuracy']:.3f} / {svd_acc[row['rank']]['test_accuracy']:.3f}"
        for row in out["nested"]["sweep"]), flush=True)

    run.model = model


def _specialists(run: _Run, out: dict) -> None:
    """3. Specialists: MLP Linears converted and trained at one fixed rank each."""
    args, progress, arrays, top = run.args, run.progress, run.arrays, run.top
    specialists = _ints(args.specialists, ())
    out.setdefault("specialists", {})
    spec_models = run.spec_models
    for r in () if run.reused else specialists:
        if r > top:
            continue
        _, srun = _train(args, nested_eval.specialist_method(r), f"specialist_r{r}",
                         progress)
        spec_models[r] = nnx.merge(srun.graphdef, srun.params, srun.rest)
        lower = tuple(sorted({max(1, r // 4), max(1, r // 2), r}))
        out["specialists"][str(r)] = {
            **_summary(srun),
            "sweep": _sweep((srun.graphdef, srun.params, srun.rest), arrays, lower, [r])}



def _costs_latency_nesting_energy(run: _Run, out: dict) -> None:
    """4. FLOP costs by rank, latency (model and one layer), nesting angles, energies."""
    args, reused, model, top = run.args, run.reused, run.model, run.top
    batch, eval_ranks, spec_models = run.batch, run.eval_ranks, run.spec_models
    dense_model, svd_model = run.dense_model, run.svd_model
    out["costs"] = {
        "layers": [{"path": c.path, "d_in": c.d_in, "d_out": c.d_out, "max_rank": c.max_rank,
                    "dense_macs": c.dense, "macs_per_rank": c.per_rank, "break_even": c.break_even}
                   for c in nested.layer_costs(model)],
        "other_linear_macs": nested.other_linear_macs(model),
        "by_rank": {str(r): nested.flop_fractions(model, r) for r in eval_ranks},
        "rank_for_budget": {f"{d}@{f}": nested.rank_for_budget(model, f, d)
                            for d in nested.DENOMINATORS for f in (0.25, 0.5, 0.75, 1.0)
                            if f >= nested.flop_fractions(model, 1)[d]}}
    lat_ranks = tuple(r for r in _ints(args.latency_ranks, LATENCY_RANKS) if r <= top) or (top,)
    out["latency"] = {"rows": args.latency_rows, "tokens": int(batch["input_ids"].size),
                      "model": nested_eval.latency(model, dense_model, lat_ranks, batch,
                                             repeats=args.latency_repeats)}
    costs = {c.path: c for c in nested.layer_costs(model)}
    first = next(iter(costs.values()))
    out["latency"]["layer"] = {"d_in": first.d_in, "d_out": first.d_out, "tokens": 2048,
                               "times": _layer_latency(first.d_in, first.d_out, 2048, lat_ranks,
                                                       args.latency_repeats)}
    timed = [v for v in out["latency"]["model"].values()]
    out["latency"]["model_fit"] = _fit([v["flops_matmul"] for v in timed],
                                       [v["median_s"] for v in timed])
    layer_times = list(out["latency"]["layer"]["times"].values())
    out["latency"]["layer_fit"] = _fit([v["macs_per_token"] for v in layer_times],
                                       [v["median_s"] for v in layer_times])
    print("latency measured", flush=True)
    paths = [p for p in costs][:1] + [p for p in costs][-1:]
    angle_ranks = tuple(r for r in (1, 8, 48, 153, 256, top - 1) if 1 <= r < top)
    out["nesting"] = {"max_angle_degrees": nested_eval.nesting_angles(model, angle_ranks, paths)}
    if reused and "specialists" in reused["nesting"]:
        out["nesting"]["specialists"] = reused["nesting"]["specialists"]
    if len(spec_models) >= 2:
        (r1, m1), (r2, m2) = sorted(spec_models.items())[:2]
        k1, k2 = nested.kernels(m1)[paths[0]], nested.kernels(m2)[paths[0]]
        u = nested.core.image_basis(k1.materialize(), r1)
        v = nested.core.image_basis(k2.materialize(), r2)
        out["nesting"]["specialists"] = {
            "ranks": [r1, r2], "path": paths[0],
            "max_angle_degrees": float(np.degrees(nested.core.principal_angles(u, v).max()))}
    pretrained = nested.convert(baselines.build_classifier(_config(args, "full"), 11))
    energy = {"nested": nested_eval.energies(model), "svd_of_dense_ft": nested_eval.energies(svd_model),
              "pretrained": nested_eval.energies(pretrained)}
    if reused:  # svd_model is the pretrained model here
        del energy["svd_of_dense_ft"]
    out["energy"] = {
        name: {"inversions": {p: int((np.diff(e) > 0).sum()) for p, e in by_path.items()},
               "mean_normalised": np.mean([e / e[0] for e in by_path.values()], axis=0).tolist(),
               "first_layers": {p: by_path[p].tolist() for p in paths}}
        for name, by_path in energy.items()}
    if reused:
        out["energy"] = {"nested": out["energy"]["nested"],
                         "svd_of_dense_ft": reused["energy"]["svd_of_dense_ft"],
                         "pretrained": out["energy"]["pretrained"]}



def _headline(run: _Run, out: dict) -> None:
    """5. The headline: NSN at 50% of the dense-MLP FLOPs against SVD truncation."""
    model, top, half, headline, arrays = run.model, run.top, run.half, run.headline, run.arrays
    nsn, svd = _by_rank(out["nested"]["sweep"]), _by_rank(out["svd_truncation"]["sweep"])
    below = [r for r in sorted(nsn) if r < top and r in svd]
    accs = [nsn[r]["test_accuracy"] for r in sorted(nsn)]
    noise = float(np.sqrt(0.25 / len(arrays["test"]["labels"])))
    out["headline"] = {
        "rank": half, "mlp_fraction": nested.flop_fractions(model, half)["mlp"],
        "ranks": headline,
        "nested_test_accuracy_at_R": nsn[top]["test_accuracy"],
        "nested_test_accuracy": nsn[half]["test_accuracy"],
        "loss_points": 100 * (nsn[top]["test_accuracy"] - nsn[half]["test_accuracy"]),
        "svd_test_accuracy": svd[half]["test_accuracy"],
        "beats_svd_below_full": {str(r): nsn[r]["test_accuracy"] > svd[r]["test_accuracy"]
                                 for r in below},
        "paired_vs_svd": _paired(out, below),
        "largest_drop_with_rank": max(0.0, *(a - b for a, b in zip(accs, accs[1:]))),
        "largest_decline": analysis.largest_decline(out["nested"]),
        "binomial_noise_sd": noise}


def _paired(out, ranks) -> dict[str, dict[str, float]]:
    """McNemar's exact test of NSN against SVD truncation at each rank, on the test texts
    (``only_a``: texts only NSN gets right); empty when a section has no per-text record
    (one reused from an older result)."""
    nsn = {int(r): v for r, v in out["nested"].get("test_correct", {}).items()}
    svd = {int(r): v for r, v in out["svd_truncation"].get("test_correct", {}).items()}
    return {str(r): analysis.mcnemar(nsn[r], svd[r]) for r in ranks if r in nsn and r in svd}


def _plots(path, out):
    nsn, svd = out["nested"]["sweep"], out["svd_truncation"]["sweep"]
    frac = {int(r): v["mlp"] for r, v in out["costs"]["by_rank"].items()}
    frac.update({row["rank"]: out["headline"]["mlp_fraction"] for row in nsn
                 if row["rank"] == out["headline"]["rank"]})

    def curve(rows):
        rows = sorted((r for r in rows if r["rank"] in frac), key=lambda r: r["rank"])
        return [frac[r["rank"]] for r in rows], [r["test_accuracy"] for r in rows]

    panels = {"test accuracy vs MLP FLOPs (fraction of dense MLP)": {
        "NSN (one model)": curve(nsn), "SVD truncation of dense FT": curve(svd),
        **{f"specialist r{r} (own sweep)": curve(s["sweep"])
           for r, s in out["specialists"].items()},
        "dense FT": ([0.0, 1.25], [out["dense"]["test_accuracy"]] * 2)}}
    lat = out["latency"]["model"]
    acc = {row["rank"]: row["test_accuracy"] for row in nsn}
    svd_acc = {row["rank"]: row["test_accuracy"] for row in svd}
    timed = sorted((v for v in lat.values() if v["rank"] in acc), key=lambda v: v["rank"])
    panels["test accuracy vs forward latency (ms)"] = {
        "NSN": ([1e3 * v["median_s"] for v in timed], [acc[v["rank"]] for v in timed]),
        "SVD truncation": ([1e3 * v["median_s"] for v in timed],
                           [svd_acc[v["rank"]] for v in timed]),
        "dense FT": ([1e3 * lat["dense"]["median_s"]], [out["dense"]["test_accuracy"]])}
    analysis.plot_curves(path.with_suffix(".png"), panels, xlabel="cost",
                           title="NSN on MiniLM (pydoc topics): accuracy at every rank")
    grid = list(map(int, out["nested"]["log_variances"]))
    energy = out["energy"]
    analysis.plot_curves(path.with_name(path.stem + "_analysis.png"), {
        "learned log-variance s_k": {"s_k": (grid, list(out["nested"]["log_variances"].values()))},
        "component energy |a_i||b_i| / first (mean over layers)": {
            name: (list(range(1, len(e["mean_normalised"]) + 1)), e["mean_normalised"])
            for name, e in energy.items()},
        "forward latency vs matmul GFLOPs": {
            "model": ([v["flops_matmul"] / 1e9 for v in lat.values()],
                      [1e3 * v["median_s"] for v in lat.values()])}},
        xlabel="rank (s_k, energy) / GFLOPs (latency)", logy=("component energy |a_i||b_i| / first "
                                                              "(mean over layers)",))


def _table(out, name):
    head = out["headline"]
    nsn, svd = _by_rank(out["nested"]["sweep"]), _by_rank(out["svd_truncation"]["sweep"])
    lat = {v["rank"]: v for v in out["latency"]["model"].values()}
    lines = [f"Command: `{out['command']}`",
             *([f"Dense fine-tuning, SVD truncation and specialists reused from "
                f"`{out['reused']['from']}` (`{out['reused']['command']}`, commit "
                f"{(out['reused']['git_commit'] or '?')[:7]}); latency measured against the "
                f"pretrained dense model (same shapes)."] if "reused" in out else []),
             "", "| rank | MLP FLOPs | model FLOPs | NSN test acc | SVD-trunc. test acc | "
             "texts only NSN / only SVD right (McNemar p) | latency vs dense |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    paired = head.get("paired_vs_svd", {})
    for r in sorted(nsn):
        f = out["costs"]["by_rank"].get(str(r))
        t = lat.get(r)
        m = paired.get(str(r))
        pair = "-" if m is None else f"{m['only_a']} / {m['only_b']} ({m['p_value']:.2g})"
        lines.append(f"| {r}{' (50%)' if r == head['rank'] else ''} | "
                     f"{f['mlp']:.2f} | {f['model']:.2f} | {nsn[r]['test_accuracy']:.3f} | "
                     f"{svd[r]['test_accuracy']:.3f} | {pair} | "
                     f"{'-' if t is None else format(t['ratio_to_dense'], '.2f') + 'x'} |"
                     if f else f"| {r} | - | - | {nsn[r]['test_accuracy']:.3f} | - | - | - |")
    lines += ["", f"Dense fine-tuning: test accuracy {out['dense']['test_accuracy']:.3f}. "
              f"NSN at 50% of the dense-MLP FLOPs (rank {head['rank']}): "
              f"{head['nested_test_accuracy']:.3f}, {head['loss_points']:.1f} points below its "
              f"own full rank ({head['nested_test_accuracy_at_R']:.3f}); SVD truncation there: "
              f"{head['svd_test_accuracy']:.3f}."]
    fall = head.get("largest_decline")
    if fall:
        test = (f" (texts only r{fall['low']} / only r{fall['high']} right: {fall['only_low']} / "
                f"{fall['only_high']}, McNemar p {fall['p_value']:.2g}; the worst of "
                f"{fall['pairs']} pairs: Bonferroni p {fall['p_bonferroni']:.2g})"
                if "p_value" in fall else "")
        lines.append(f"Largest fall in NSN accuracy as rank rises: {fall['points']:.1f} points, "
                     f"r{fall['low']} to r{fall['high']}{test}.")
    for r, s in out["specialists"].items():
        own = _by_rank(s["sweep"])[int(r)]
        lines.append(f"Specialist r{r}: test accuracy {own['test_accuracy']:.3f} "
                     f"(NSN at r{r}: {nsn[int(r)]['test_accuracy']:.3f})"
                     if int(r) in nsn else f"Specialist r{r}: {own['test_accuracy']:.3f}")
    return "\n".join(lines)


def bench_rows(result: dict) -> list[dict]:
    """Rows of ``subspace-jax bench nested`` (see :func:`subspace_lab.nested_eval.bench_rows`)."""
    return nested_eval.bench_rows(result)


def demo_rows(budget, progress: bool) -> list[dict]:
    """The demo's live NSN rows at the shared budget (see
    :func:`subspace_lab.nested_eval.demo_rows`)."""
    return nested_eval.demo_rows(budget, progress)


#: Demo rows of the recorded (4-epoch) result: NSN at full, 50%-MLP and low rank, SVD at 50%.
RECORDED = {"nested_4ep.json": nested_eval.recorded_rows}


if __name__ == "__main__":
    sys.exit(main())
