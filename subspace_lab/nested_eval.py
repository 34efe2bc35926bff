"""The MiniLM benchmark's building blocks (``subspace-jax run nested_finetune``) and demo rows.

* :func:`nested_method` / :func:`specialist_method`: :class:`~subspace_lab.baselines.Method`
  objects for :func:`~subspace_lab.baselines.train_text_classifier`: one NSN model
  trained over a rank grid, or a model converted at one fixed rank and trained there.
* :func:`sweep`: accuracy of a trained model at each rank of a list (static widths, each
  rank compiled as it would be deployed, or traced ranks, one compilation for all).
* :func:`latency`: forward-pass times per rank measured side by side (round robin) with
  the dense model, and the matmul FLOPs of each forward counted from its jaxpr.
* :func:`nesting_angles` and :func:`energies`: the nesting and energy-decay checks.
* :func:`demo_rows` / :func:`recorded_rows`: rows of ``subspace-jax demo``;
  :func:`bench_rows`: rows of ``subspace-jax bench nested``.

References:
    NSN, arXiv 2509.17874.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from subspace_jax import data, measure, train
from subspace_lab import baselines, rows
from subspace_jax.nested import core, cost, layer, training

__all__ = ["nested_method", "specialist_method", "eval_arrays", "sweep", "latency",
           "nesting_angles", "energies", "demo_rows", "recorded_rows", "bench_rows"]


def nested_method(*, grid: Sequence[int] | None = None, curriculum: float = 0.3,
                  log_var_lr: float = 1e-2, max_rank: int | None = None, lr: float = 2e-4,
                  quick_lr: float | None = None, name: str = "nested") -> baselines.Method:
    """NSN fine-tuning as a :class:`~subspace_lab.baselines.Method` (everything trains).

    Args:
        grid: training ranks (default :func:`~subspace_jax.nested.core.rank_grid`).
        curriculum: share of the run's steps over which the variant window widens.
        log_var_lr: Adam learning rate of the log-variances.
        max_rank: ``R`` (None: ``min(in, out)``, reproducing the pretrained model).
        lr: default peak learning rate (2e-4: 240 steps of 16 texts at 1e-4 left the low
            ranks far behind); ``quick_lr`` when ``quick``.
        name: the run's label.

    Examples:
        >>> nested_method().name
        'nested'
    """

    def recipe(cfg: baselines.FinetuneConfig):
        return training.recipe(layer.NestedRule(max_rank=max_rank), grid=grid,
                               curriculum=curriculum, log_var_lr=log_var_lr)

    return baselines.Method(name=name, recipe=recipe, lr=lr, quick_lr=quick_lr)


def specialist_method(rank: int, *, lr: float = 2e-4, quick_lr: float | None = None,
                      ) -> baselines.Method:
    """A specialist: MLP Linears converted at ``max_rank=rank`` and trained at that rank only.

    Examples:
        >>> specialist_method(64).name
        'specialist_r64'
    """

    def convert(model: nnx.Module, key: jax.Array) -> nnx.Module:
        del key
        return layer.convert(model, layer.NestedRule(max_rank=rank))

    name = f"specialist_r{rank}"
    return baselines.Method(name=name, lr=lr, quick_lr=quick_lr,
                            recipe=lambda cfg: train.Recipe(name=name, convert=convert))


def eval_arrays(cfg: baselines.FinetuneConfig) -> dict[str, dict[str, np.ndarray]]:
    """The val and test arrays a fine-tuning run with ``cfg`` evaluates on (same subsets).

    Examples:
        >>> arrays = eval_arrays(baselines.FinetuneConfig.make(quick=True))  # doctest: +SKIP
        >>> len(arrays["test"]["labels"])  # doctest: +SKIP
        256
    """
    topics = data.load_pydoc_topics()
    return {name: baselines.encode(*baselines.subset(getattr(topics, name), cfg.eval_limit,
                                                       cfg.seed), cfg.max_length)
            for name in ("val", "test")}


def sweep(graphdef: Any, params: Any, rest: Any, arrays: Mapping[str, Mapping[str, np.ndarray]],
          ranks: Sequence[int], *, batch_size: int = 64, static: bool = True,
          ) -> list[dict[str, float]]:
    """Loss and accuracy of a converted classifier at each global rank (the inputs unchanged).

    With ``static=True`` each rank compiles its own evaluation (its width is in the graph)
    and costs what it would cost deployed; with ``static=False`` only the traced ranks
    change: one compilation for every rank, each at the full width's cost. Both give the
    same numbers.

    Returns:
        One dict per rank: ``rank`` and ``<split>_loss`` / ``<split>_accuracy`` per split.

    Examples:
        >>> rows = sweep(graphdef, params, rest, arrays, [8, 384])  # doctest: +SKIP
    """
    model = nnx.merge(graphdef, params, rest)
    traced = None if static else train.make_eval_step(graphdef, baselines.classifier_metrics)
    rows = []
    for r in ranks:
        if static:
            g, p, s = train.split_model(layer.set_rank(model, r))
            step = train.make_eval_step(g, baselines.classifier_metrics)
        else:
            step, p, s = traced, layer.set_rank(params, r, static=False), rest
        row: dict[str, float] = {"rank": r}
        for split, values in arrays.items():
            sums = train.evaluate(step, p, s, values, batch_size=batch_size)
            row[f"{split}_loss"] = sums["loss"] / sums["count"]
            row[f"{split}_accuracy"] = sums["correct"] / sums["count"]
        rows.append(row)
    return rows


def _forward(graphdef: Any):
    def fn(params, rest, batch):
        return baselines.classifier_logits(nnx.merge(graphdef, params, rest), batch)
    return jax.jit(fn)


def latency(model: nnx.Module, dense: nnx.Module, ranks: Sequence[int],
            batch: Mapping[str, Any], *, repeats: int = 10, warmup: int = 2,
            ) -> dict[str, dict[str, float]]:
    """Forward-pass time at each rank and of the dense model, timed round robin in one run.

    Args:
        model: a converted classifier (not changed).
        dense: the same classifier unconverted (the reference).
        ranks: global ranks to time.
        batch: ``input_ids``, ``attention_mask``, ``token_type_ids``.
        repeats, warmup: as :func:`subspace_jax.measure.compare`.

    Returns:
        ``{"dense" or "r<rank>": {"rank", "median_s", "min_s", "ratio_to_dense",
        "flops_matmul", "flops_ratio_to_dense", "mlp_fraction"}}``.

    Examples:
        >>> out = latency(model, dense, [16, 384], batch, repeats=3)  # doctest: +SKIP
    """
    fns, flops = {}, {}
    g, p, s = train.split_model(dense)
    fns["dense"] = (_forward(g), (p, s, batch))
    for r in ranks:
        g, p, s = train.split_model(layer.set_rank(model, r))
        fns[f"r{r}"] = (_forward(g), (p, s, batch))
    for name, (fn, args) in fns.items():
        flops[name] = measure.flops(fn, *args).matmul
    timing = measure.compare(fns, warmup=warmup, repeats=repeats)
    out = {}
    for name in fns:
        rank = None if name == "dense" else int(name[1:])
        out[name] = {"rank": rank, "median_s": timing.median(name),
                     "min_s": timing.timings[name].min,
                     "ratio_to_dense": timing.ratio(name, "dense"),
                     "flops_matmul": flops[name],
                     "flops_ratio_to_dense": flops[name] / flops["dense"],
                     "mlp_fraction": None if rank is None
                     else cost.flop_fractions(model, rank)["mlp"]}
    return out


def nesting_angles(model: nnx.Module, ranks: Sequence[int], paths: Sequence[str] | None = None,
                   ) -> dict[str, dict[int, float]]:
    """Largest principal angle (degrees) between the images of ``W_r`` and ``W_{r+1}``.

    Images come from an SVD of each dense ``W_r`` (not from the factors), so this checks
    nesting numerically; zero means ``Im W_r ⊆ Im W_{r+1}``.

    Examples:
        >>> angles = nesting_angles(model, [8, 16])  # doctest: +SKIP
    """
    found = layer.kernels(model)
    out = {}
    for path in paths or list(found):
        kernel = found[path]
        out[path] = {}
        for r in ranks:
            if r >= kernel.max_rank:
                continue
            u = core.image_basis(kernel.prefix(r).materialize(), r)
            v = core.image_basis(kernel.prefix(r + 1).materialize(), r + 1)
            out[path][r] = float(np.degrees(core.principal_angles(u, v).max()))
    return out


def energies(model: nnx.Module) -> dict[str, np.ndarray]:
    """``‖a_i‖ ‖b_i‖`` of every component of every nested layer (see
    :func:`~subspace_jax.nested.core.component_energy`).

    Examples:
        >>> e = energies(model)  # doctest: +SKIP
    """
    return {p: core.component_energy(k.a, k.b)["product"]
            for p, k in layer.kernels(model).items()}


def _row(name: str, result: Mapping[str, Any], rank_row: Mapping[str, float]) -> dict[str, Any]:

    return rows.row(name, {**result, "val_accuracy": rank_row["val_accuracy"],
                            "test_accuracy": rank_row["test_accuracy"]})


def demo_rows(budget: Any, progress: bool) -> list[dict[str, Any]]:
    """Live demo rows: NSN trained at the shared budget, read at full, 50%-MLP and low rank.

    Each NSN step runs two forward and backward passes (anchor and variant rank), so the
    model trains for half the budget's steps: the same number of passes as the other rows.

    Examples:
        >>> rows = demo_rows(rows.Budget(), progress=False)  # doctest: +SKIP
    """
    settings = budget.finetune(mode="nested")
    steps = max(1, settings.pop("steps", 40) // 2)
    method = nested_method()
    cfg = baselines.FinetuneConfig.make(**{**settings, "steps": steps})
    run = baselines.train_text_classifier(cfg, method=method, progress=progress)
    model = nnx.merge(run.graphdef, run.params, run.rest)
    top = max(k.max_rank for k in layer.kernels(model).values())
    half = cost.rank_for_budget(model, 0.5)
    ranks = [top, half, max(1, top // 8)]
    rows = sweep(run.graphdef, run.params, run.rest, eval_arrays(cfg), ranks,
                 batch_size=cfg.eval_batch_size, static=False)
    names = [f"NSN r{top} (max)", f"NSN r{half} (50% MLP)", f"NSN r{ranks[2]}"]
    return [_row(n, run.result, row) for n, row in zip(names, rows)]


def bench_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of ``subspace-jax bench nested`` from a result of ``subspace-jax run nested_finetune``.

    Inference rows (NSN at 50% of the dense-MLP FLOPs, at its maximum rank and at
    ``R / 8``) compare the forward pass with the dense fine-tuned model: matmul FLOPs and
    latency, both measured in one run (round robin). The training row compares the NSN
    step (anchor + one sampled rank) with full fine-tuning: compiled memory and matmul
    FLOPs (the two runs' step times were not measured side by side, so no time ratio).

    Examples:
        >>> rows = bench_rows(json.load(open("results/nested_4ep.json")))  # doctest: +SKIP
        >>> rows[0]["run"]  # doctest: +SKIP
        'NSN r153 (50% dense-MLP FLOPs)'
    """
    dense, head = result["dense"], result["headline"]
    nsn = {row["rank"]: row for row in result["nested"]["sweep"]}
    svd = {row["rank"]: row for row in result["svd_truncation"]["sweep"]}
    lat = result["latency"]["model"]
    top = head["ranks"][0]
    labels = {head["rank"]: f"NSN r{head['rank']} (50% dense-MLP FLOPs)",
              top: f"NSN r{top} (max rank)", head["ranks"][2]: f"NSN r{head['ranks'][2]}"}
    rows = []
    for r, run in labels.items():
        timed = lat.get(f"r{r}", {})
        rows.append({
            "method": "nested", "run": run, "baseline": "dense fine-tuning (same steps)",
            "quality": f"test acc {nsn[r]['test_accuracy']:.3f} vs {dense['test_accuracy']:.3f} "
                       f"(SVD trunc. r{r} {svd[r]['test_accuracy']:.3f})",
            "memory_ratio": None, "flops_ratio": timed.get("flops_ratio_to_dense"),
            "time_ratio": timed.get("ratio_to_dense"),
            "what": "inference forward matmul FLOPs; forward latency"})
    spent, base = result["nested"], dense
    rows.append({
        "method": "nested", "run": "NSN training step (anchor + 1 sampled rank)",
        "baseline": "full fine-tuning",
        "quality": f"test acc at max rank {nsn[top]['test_accuracy']:.3f} vs "
                   f"{dense['test_accuracy']:.3f}",
        "memory_ratio": spent["compiled_memory"]["total"] / base["compiled_memory"]["total"],
        "flops_ratio": spent["flops_matmul"] / base["flops_matmul"], "time_ratio": None,
        "what": "train step compiled memory; train step matmul FLOPs"})
    return rows


def recorded_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Demo rows from a recorded result: NSN at full, 50%-MLP and low rank, SVD at 50%.

    Each label carries its run's training steps (NSN's include a dense warm start; SVD
    truncation's are the dense run's), since recorded runs of other methods may differ.

    Examples:
        >>> recorded_rows(json.load(open("results/nested_4ep.json")))  # doctest: +SKIP
    """
    nsn = result["nested"]
    steps = {"nested": nsn["steps"] + nsn.get("warm_start_steps", 0),
             "svd_truncation": result["dense"]["steps"]}
    rows = []
    for label, key in (("NSN", "nested"), ("SVD trunc.", "svd_truncation")):
        by_rank = {row["rank"]: row for row in result[key]["sweep"]}
        chosen = result["headline"]["ranks"] if key == "nested" else [result["headline"]["rank"]]
        for r in chosen:
            if r in by_rank:
                rows.append(_row(f"{label} r{r} ({steps[key]} steps)", result[key], by_rank[r]))
    return rows
