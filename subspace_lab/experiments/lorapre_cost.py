"""What LoRA-Pre's update costs against AdamW's, at Gemma 3 270M's matrices, in one process.

    subspace-jax run lorapre_cost                 # the update over every block matrix, and
                                                  # the whole fine-tuning step of the model
    subspace-jax run lorapre_cost --no-step       # the update alone (no weights needed)

Two measurements, each round-robin (:func:`subspace_jax.measure.compare`) so that the
machine's noise hits both optimizers alike:

* **the update alone**: ``tx.update`` on gradients shaped like Gemma 3 270M's block
  matrices (q, k, v, o, gate, up and down of ``--layers`` blocks: 640 x 256 to 640 x 2048),
  random, for AdamW and LoRA-Pre at each ``--ranks``; with the compiled program's
  ``temp`` bytes (the transient memory) and the persistent state;
* **the whole step** (unless ``--no-step``): the fine-tuning step of the real model
  (``subspace-jax run gemma_finetune --mode full`` against ``--mode lorapre``: every
  parameter but the embedding trains) on one batch of ``--batch-size`` x ``--seq-len``
  tokens.

The issue's targets: the update within 1.5x of AdamW's, the step within 1.1x.
Writes ``results/lorapre_cost.json``.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):  # see lorapre_pretrain
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from subspace_jax import lorapre, measure, train  # noqa: E402
from subspace_jax.models import gemma_config  # noqa: E402
from subspace_lab import records, runner  # noqa: E402


def block_shapes(config: gemma_config.GemmaConfig, layers: int) -> dict[str, tuple[int, int]]:
    """``{path: (p, q)}`` of the 7 projections of ``layers`` blocks.

    Examples:
        >>> shapes = block_shapes(gemma_config.GemmaConfig(), 1)
        >>> shapes["blocks/0/mlp/up"], shapes["blocks/0/attn/k"]
        ((640, 2048), (640, 256))
    """
    d, f = config.dim, config.mlp_hidden
    q, kv = config.heads * config.head_dim, config.kv_heads * config.head_dim
    one = {"attn/q": (d, q), "attn/k": (d, kv), "attn/v": (d, kv), "attn/o": (q, d),
           "mlp/gate": (d, f), "mlp/up": (d, f), "mlp/down": (f, d)}
    return {f"blocks/{i}/{name}": shape for i in range(layers) for name, shape in one.items()}


def optimizers(ranks: tuple[int, ...]) -> dict[str, optax.GradientTransformation]:
    """AdamW and LoRA-Pre at each rank, as ``gemma_finetune`` builds them (lr irrelevant)."""
    out = {"adamw": train.adamw(2e-5, 100, warmup=10, weight_decay=0.01)}
    for r in ranks:
        out[f"lorapre_r{r}"] = lorapre.recipe(rank=r, warmup_fraction=0.1,
                                              weight_decay=0.01).optimizer(2e-5, 100)
    return out


def update_costs(shapes: dict[str, tuple[int, int]], txs: dict[str, Any], *,
                 repeats: int) -> dict[str, Any]:
    """Round-robin times, ``temp`` bytes and state bytes of each ``tx.update`` alone."""
    keys = jax.random.split(jax.random.key(0), len(shapes))
    grads = {k: jax.random.normal(key, s) * 1e-3 for key, (k, s) in zip(keys, shapes.items())}
    params = jax.tree.map(jnp.ones_like, grads)
    fns, out = {}, {}
    for name, tx in txs.items():
        state = train.init_optimizer(tx, params)
        update = jax.jit(lambda g, s, p, tx=tx: _std(tx.update, g, s, p))
        state = update(grads, state, params)[1]  # time step 2 on
        memory = measure.compiled_memory(update, grads, state, params)
        out[name] = {"state_bytes": measure.tree_nbytes(state), "temp_bytes": memory.temp}
        fns[name] = (update, (grads, state, params))
    comparison = measure.compare(fns, warmup=2, repeats=repeats)
    print(comparison.table())
    for name in fns:
        out[name]["seconds"] = comparison.median(name)
        out[name]["ratio_vs_adamw"] = comparison.ratio(name, "adamw")
    return out


def step_costs(txs: dict[str, Any], *, batch_size: int, seq_len: int,
               repeats: int) -> dict[str, Any]:
    """Round-robin times of the real model's whole fine-tuning step under each optimizer."""
    from subspace_jax.models import gemma
    from subspace_lab import experiments

    script = experiments.load("gemma_finetune")  # the step as that experiment trains it
    model, _ = gemma.from_pretrained()
    graphdef, params, rest, rule = script.prepare(model, "full", rank=8, alpha=16.0,
                                                  key=jax.random.key(0))
    mask = train.trainable_mask(params, train=rule)
    tokens = jax.random.randint(jax.random.key(1), (batch_size, seq_len), 3,
                                model.config.vocab_size)
    loss = lambda m, batch, key: gemma.lm_loss(m, batch, chunk_size=128)  # noqa: E731
    fns = {}
    for name, tx in txs.items():
        step = train.make_train_step(graphdef, loss, tx, mask=mask, donate=False)
        state = train.init_optimizer(tx, params, mask)
        fns[name] = (step, (params, state, rest, tokens, jax.random.key(2)))
    comparison = measure.compare(fns, warmup=1, repeats=repeats)
    print(comparison.table())
    return {name: {"seconds": comparison.median(name),
                   "ratio_vs_adamw": comparison.ratio(name, "adamw")} for name in fns}


def _std(fn, *args):
    with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32
        return fn(*args)


def parse(argv=None) -> argparse.Namespace:
    p = runner.parser(__name__, __doc__, quick="2 blocks, no whole step", seed=None,
                      sizes=SIZES)
    p.add_argument("--layers", type=int, default=18, help="blocks whose matrices update")
    p.add_argument("--ranks", default="8,32", help="LoRA-Pre ranks, comma-separated")
    p.add_argument("--repeats", type=int, default=10, help="round-robin rounds (update)")
    p.add_argument("--step-repeats", type=int, default=3, help="round-robin rounds (step)")
    p.add_argument("--no-step", action="store_true", help="skip the whole-step measurement")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    args = runner.parse(p, argv)
    if args.quick:
        args.layers, args.no_step = min(args.layers, 2), True
    return args


SIZES = {"tiny": ["--quick", "--layers", "1", "--ranks", "8", "--repeats", "2"],
         "small": ["--quick", "--repeats", "5"],
         "full": []}


def main(argv=None) -> int:
    args = parse(argv)
    start = time.perf_counter()
    config = gemma_config.GemmaConfig()
    shapes = block_shapes(config, args.layers)
    txs = optimizers(tuple(int(r) for r in args.ranks.split(",")))
    result: dict[str, Any] = {
        "config": {k: v for k, v in vars(args).items() if k != "results_dir"},
        "matrices": len(shapes), "matrix_params": sum(p * q for p, q in shapes.values()),
        "load_average_start": os.getloadavg(),
        "update": update_costs(shapes, txs, repeats=args.repeats)}
    if not args.no_step:
        result["step"] = step_costs(txs, batch_size=args.batch_size, seq_len=args.seq_len,
                                    repeats=args.step_repeats)
    result["load_average_end"] = os.getloadavg()
    result["total_seconds"] = time.perf_counter() - start
    name = args.name or "lorapre_cost" + ("_quick" if args.quick else "")
    path = records.write_result(name, result, results_dir=args.results_dir)
    for part in ("update", "step"):
        for tx, r in result.get(part, {}).items():
            extra = (f", temp {r['temp_bytes'] / 2**20:.1f} MiB, state "
                     f"{r['state_bytes'] / 2**20:.1f} MiB" if part == "update" else "")
            print(f"{part:<7} {tx:<12} {r['seconds'] * 1e3:9.1f} ms  "
                  f"{r['ratio_vs_adamw']:.2f}x AdamW{extra}")
    print(f"wrote {path} ({result['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
