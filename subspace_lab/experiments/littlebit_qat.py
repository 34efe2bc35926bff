"""LittleBit-2 QAT by distillation on all-MiniLM-L6-v2: sentence embeddings before and after.

    subspace-jax run littlebit_qat [--quick] [--bpw 1.0 0.55 0.3 0.1] [--steps N]

For every bits-per-weight target the 36 encoder Linear kernels are compressed (Dual-SVID +
Joint-ITQ + residual path; at 0.1 bpw one path and rank >= 8, as in
``subspace-jax run littlebit_compress``), then distilled from the frozen full-precision
MiniLM with :mod:`subspace_jax.littlebit.qat` (per-layer hidden MSE x 10, in-batch
similarity KL, 1 - cos; embeddings frozen) on the pydoc-topics training texts (64 tokens),
the same number of steps at every target. On the held-out test texts it reports, before
and after QAT:

* ``cosine``: mean cosine similarity of each text's sentence embedding (mean-pooled,
  normalised) to the teacher's;
* ``top1_agreement``: share of texts whose nearest other test text (by cosine) is the one
  the teacher picks;
* ``sign_flips``: share of latent signs QAT changed.

Writes ``results/littlebit_qat[_quick].json`` and ``.png`` (quality against bits per weight,
distillation loss against step).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from subspace_jax import data, littlebit, train
from subspace_lab import analysis, records, runner
from subspace_jax.littlebit import qat
from subspace_jax.models import bert

BPWS = (1.0, 0.55, 0.3, 0.1)
KERNELS = r"encoder/layers/\d+/(attn/(q|k|v|o)|mlp/(up|down))/kernel"


def settings(bpw: float) -> dict:
    """``LittleBitRule`` settings (those of ``littlebit_compress.py``): one path below 0.3 bpw."""
    return dict(residual=True, strict=True) if bpw >= 0.3 else dict(residual=False, strict=False)


def _tokens(texts, max_length: int) -> dict[str, np.ndarray]:
    return data.tokenize_texts(list(texts), data.load_minilm_tokenizer(),
                               max_length=max_length).as_dict()


def embed(model: bert.Bert, arrays: dict[str, np.ndarray], batch_size: int = 128) -> np.ndarray:
    """Unit sentence embeddings of ``arrays`` in fixed-size batches (one compile per model)."""
    def fn(chunk):
        return bert.sentence_embedding(model, chunk["input_ids"], chunk["attention_mask"],
                                       chunk["token_type_ids"])

    n, out = len(arrays["input_ids"]), []
    for start in range(0, n, batch_size):
        chunk = {k: v[start:start + batch_size] for k, v in arrays.items()}
        pad = batch_size - len(chunk["input_ids"])
        chunk = {k: np.concatenate([v, np.repeat(v[:1], pad, 0)]) for k, v in chunk.items()}
        out.append(np.asarray(fn(chunk))[:batch_size - pad])
    return np.concatenate(out)


def top1(emb: np.ndarray) -> np.ndarray:
    """Index of each row's nearest other row by cosine (rows are unit vectors)."""
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(axis=1)


def quality(emb: np.ndarray, teacher: np.ndarray) -> dict[str, float]:
    cos = np.sum(emb * teacher, axis=1)
    return dict(cosine=float(cos.mean()), cosine_min=float(cos.min()),
                top1_agreement=float(np.mean(top1(emb) == top1(teacher))))


def run(*, quick: bool = False, bpws=BPWS, steps: int | None = None, batch_size: int = 16,
        max_length: int = 64, lr: float = 1e-3, eval_limit: int | None = None,
        itq_iters: int = 50, seed: int = 0, progress: bool = True,
        on_point: Callable[[dict], None] | None = None) -> dict:
    """Compress, evaluate, distil and evaluate again at each target; the JSON-ready result.

    ``quick``: 0.55 and 0.1 bpw, 20 steps, 256 test texts. ``on_point(result)`` is called
    after each target (the script writes the partial result there).
    """
    start = time.perf_counter()
    if quick:
        bpws = (0.55, 0.1) if tuple(bpws) == BPWS else bpws
        steps, eval_limit = steps or 20, eval_limit or 256
    steps = steps or 200
    teacher, _ = bert.from_pretrained()
    topics = data.load_pydoc_topics()
    train_arrays = _tokens(topics.train.texts, max_length)
    test_texts = topics.test.texts
    if eval_limit is not None and eval_limit < len(test_texts):
        index = np.sort(np.random.default_rng(seed).permutation(len(test_texts))[:eval_limit])
        test_texts = [test_texts[i] for i in index]
    test_arrays = _tokens(test_texts, max_length)
    t0 = time.perf_counter()
    ref = embed(teacher, test_arrays)
    result = dict(model="all-MiniLM-L6-v2", quick=quick, bpws=list(bpws), steps=steps,
                  batch_size=batch_size, max_length=max_length, lr=lr, itq_iters=itq_iters,
                  num_train=len(train_arrays["input_ids"]), num_test=len(test_texts),
                  teacher_embed_seconds=time.perf_counter() - t0, points={})
    tgraph, tstate = nnx.split(teacher)
    loss_fn = qat.encoder_loss_fn(tgraph)
    for bpw in bpws:
        t0 = time.perf_counter()
        student = littlebit.convert(teacher, littlebit.LittleBitRule(
            pattern=KERNELS, bpw=bpw, itq_iters=itq_iters, **settings(bpw)))
        acc = littlebit.accounting(nnx.state(student))
        compress_s = time.perf_counter() - t0
        before = quality(embed(student, test_arrays), ref)
        tx = train.adamw(lr, steps, warmup=max(steps // 50, 1), weight_decay=0.0)
        step, params, opt_state, rest, _, graphdef = qat.setup(student, loss_fn, tx)
        init = jax.tree.map(jnp.copy, params)
        epochs = -(-steps * batch_size // len(train_arrays["input_ids"])) + 1
        batches = data.batches(train_arrays, batch_size, seed=seed, epochs=epochs)
        t0 = time.perf_counter()
        params, _, rest, hist = train.fit(step, params, opt_state, rest,
                                          qat.with_teacher(batches, tstate), num_steps=steps,
                                          key=jax.random.key(seed), progress=progress,
                                          desc=f"QAT {bpw} bpw", log_every=10)
        train_s = time.perf_counter() - t0
        flips = qat.sign_flips(init, params)
        latents = sum(x.size for x in jax.tree.leaves(init) if x.ndim == 3)
        after = quality(embed(nnx.merge(graphdef, params, rest), test_arrays), ref)
        packed = nnx.merge(graphdef, littlebit.deploy(params), rest)
        deployed = quality(embed(packed, test_arrays), ref)
        point = dict(linear_bpw=acc.linear_bpw, model_bpw=acc.model_bpw,
                     ranks=sorted({lay.rank for lay in acc.layers}), settings=settings(bpw),
                     before=before, after=after, deployed=deployed, sign_flips=flips / latents,
                     compress_seconds=compress_s, train_seconds=train_s,
                     history=hist.as_dict())
        result["points"][str(bpw)] = point
        print(f"{bpw} bpw (linear {acc.linear_bpw:.3f}): cosine {before['cosine']:.4f} -> "
              f"{after['cosine']:.4f}, top-1 agreement {before['top1_agreement']:.3f} -> "
              f"{after['top1_agreement']:.3f}, sign flips {flips / latents:.4f}, "
              f"{hist.median_step_time():.2f} s/step; deployed cosine {deployed['cosine']:.4f}",
              flush=True)
        result["seconds"] = time.perf_counter() - start
        if on_point is not None:
            on_point(result)
    result["seconds"] = time.perf_counter() - start
    return result


def plot(result: dict, path: pathlib.Path) -> pathlib.Path:
    """Quality against achieved bits per weight (before/after QAT) and the loss curves."""
    pts = result["points"]
    xs = [pts[str(b)]["linear_bpw"] for b in result["bpws"]]
    panels = {}
    for metric in ("cosine", "top1_agreement"):
        panels[f"{metric} to the teacher (test texts)"] = {
            when: (xs, [pts[str(b)][when][metric] for b in result["bpws"]])
            for when in ("before", "after")}
    curves = {f"{b} bpw": (range(1, len(pts[str(b)]["history"]["losses"]) + 1),
                           pts[str(b)]["history"]["losses"]) for b in result["bpws"]}
    analysis.plot_curves(path, panels, xlabel="bits per weight (achieved, linear layers)",
                           title="MiniLM LittleBit-2: sentence embeddings before/after QAT")
    analysis.plot_curves(path.with_name(path.stem + "_loss.png"),
                           {"distillation loss": curves}, logy=("distillation loss",),
                           title="MiniLM LittleBit-2 QAT")
    return path


def parse(argv=None) -> argparse.Namespace:
    p = runner.parser(__name__, __doc__,
                      quick="0.55 and 0.1 bpw, 20 steps, 256 texts", seed_help="eval subset, batch order and QAT key", sizes=SIZES)
    p.add_argument("--bpw", type=float, nargs="+", default=list(BPWS))
    p.add_argument("--steps", type=int, help="QAT steps at every target (default 200)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-limit", type=int, help="test texts evaluated (default all)")
    p.add_argument("--itq-iters", type=int, default=50)
    return runner.parse(p, argv)


#: ``subspace-jax bench --size``: this script's arguments (``full``: the recorded run).
SIZES = {"tiny": ["--quick", "--bpw", "0.55", "--steps", "4", "--batch-size", "8",
                  "--eval-limit", "64", "--itq-iters", "5"],
         "small": ["--quick"],
         "full": []}


def bench_rows(result: dict) -> list[dict]:
    """``subspace-jax bench`` rows: the distilled student at each target against its teacher.

    Examples:
        >>> point = dict(linear_bpw=0.5, before=dict(cosine=0.7), after=dict(cosine=0.9),
        ...              deployed=dict(cosine=0.9, top1_agreement=0.8))
        >>> row = bench_rows({"bpws": [0.55], "steps": 20, "points": {"0.55": point}})[0]
        >>> row["memory_ratio"], row["quality"]
        (0.015625, 'cos 0.700 -> 0.900 (20 QAT steps), top-1 0.800')
    """
    rows = []
    for bpw in result["bpws"]:
        p = result["points"][str(bpw)]
        rows.append(dict(
            method="littlebit-qat", run=f"LittleBit-2 {bpw} bpw + QAT, packed",
            baseline="MiniLM float32 (teacher)",
            quality=f"cos {p['before']['cosine']:.3f} -> {p['deployed']['cosine']:.3f} "
                    f"({result['steps']} QAT steps), top-1 {p['deployed']['top1_agreement']:.3f}",
            memory_ratio=p["linear_bpw"] / 32, flops_ratio=None, time_ratio=None,
            what="Linear kernels' storage (exact bits); sentence-embedding cosine to teacher"))
    return rows


def main(argv=None) -> int:
    args = parse(argv)
    name = args.name or "littlebit_qat" + ("_quick" if args.quick else "")

    def write(partial: dict) -> pathlib.Path:
        return records.write_result(name, partial, results_dir=args.results_dir)

    result = run(quick=args.quick, bpws=tuple(args.bpw), steps=args.steps,
                 batch_size=args.batch_size, max_length=args.max_length, lr=args.lr,
                 eval_limit=args.eval_limit, itq_iters=args.itq_iters,
                 seed=args.seed, progress=not args.no_progress, on_point=write)
    path = write(result)
    plot(result, path.with_suffix(".png"))
    print(f"\n{'bpw':>5} {'linear bpw':>10} {'cos before':>10} {'cos after':>10} "
          f"{'top1 before':>11} {'top1 after':>10} {'flips':>7}")
    for b in result["bpws"]:
        p = result["points"][str(b)]
        print(f"{b:>5} {p['linear_bpw']:>10.3f} {p['before']['cosine']:>10.4f} "
              f"{p['after']['cosine']:>10.4f} {p['before']['top1_agreement']:>11.3f} "
              f"{p['after']['top1_agreement']:>10.3f} {p['sign_flips']:>7.4f}")
    print(f"wrote {path} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
