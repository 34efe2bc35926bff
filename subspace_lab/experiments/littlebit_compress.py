"""LittleBit-2 on the real all-MiniLM-L6-v2 weights: reconstruction error, size, packed speed.

    subspace-jax run littlebit_compress [--quick] [--bpw 1.0 0.55 0.3 0.1]

For every bits-per-weight target, all 36 encoder Linear kernels (q, k, v, o, up, down of 6
layers) are compressed and the relative Frobenius error ``||W_hat - W|| / ||W||`` of each is
reported for four methods, before any QAT:

* ``dual_svid``: LittleBit's initialisation (Dual-SVID, residual path);
* ``joint_itq``: LittleBit-2's (Dual-SVID + Joint-ITQ);
* ``fp16_low_rank``: a float16 truncated-SVD factorisation with the same storage
  (rank ``floor(bits / (16 (in + out)))``, the papers' "tiny-rank FP16"; rank 0 is error 1);
* ``sign_rows``: plain ``sign(W)`` with one 16-bit scale per output row (about 1.04 bpw
  whatever the target: a reference, not a competitor at equal size).

At 0.1 bpw the residual path does not fit MiniLM's layers (its 16-bit row and column scales
alone cost 0.104 bpw on the MLP kernels), so that target uses one path, and the 384 x 384
attention kernels, where even one path of rank 8 costs 0.126 bpw, keep rank 8 (``strict=False``);
the achieved bits are reported. Size: exact bits (accounting) and the orbax checkpoint on
disk. Speed and memory: the packed path against dense float32, for one MLP layer and for the
whole encoder, every configuration timed round-robin in one ``measure.compare`` call.

Writes ``results/littlebit[_quick].json`` and ``results/littlebit[_quick].png``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from subspace_jax import forms, littlebit, measure, rules
from subspace_lab import analysis, records, runner
from subspace_jax.models import bert

BPWS = (1.0, 0.55, 0.3, 0.1)
KERNELS = r"encoder/layers/\d+/(attn/(q|k|v|o)|mlp/(up|down))/kernel"
METHODS = ("dual_svid", "joint_itq", "fp16_low_rank", "sign_rows")


def settings(bpw: float) -> dict:
    """``LittleBitRule`` settings for a target: one path and rank >= 8 where two paths cannot fit."""
    return dict(residual=True, strict=True) if bpw >= 0.3 else dict(residual=False, strict=False)


def _rel(approx, w) -> float:
    return float(jnp.linalg.norm(approx.astype(jnp.float32) - w) / jnp.linalg.norm(w))


def fp16_low_rank(w: jax.Array, bits: int) -> tuple[float, int]:
    """Error and rank of the float16 truncated SVD that fits in ``bits``."""
    rank = min(bits // (16 * sum(w.shape)), min(w.shape))
    if rank == 0:
        return 1.0, 0
    factors = littlebit.core.balanced_factors(w, rank)
    a, b = (f.astype(jnp.float16).astype(jnp.float32) for f in factors)
    return _rel(a @ b.T, w), rank


def sign_rows(w: jax.Array) -> tuple[float, int]:
    """Error and bits of ``diag(alpha) sign(W)`` with alpha = mean |W| per output unit."""
    alpha = jnp.mean(jnp.abs(w), axis=0).astype(jnp.float16).astype(jnp.float32)
    return _rel(littlebit.core.sign(w) * alpha, w), w.size + 16 * w.shape[1]


def layer_errors(state, compressed, svid_state, paths) -> list[dict]:
    """One row per kernel: the four methods' errors, ranks and bits."""
    flat = dict((p, leaf) for p, leaf in rules.leaf_paths(state)[0])
    packed = dict(rules.leaf_paths(compressed)[0])
    svid = dict(rules.leaf_paths(svid_state)[0])
    rows = []
    for path in paths:
        w = flat[path].get_value()
        form, base = packed[path].get_value(), svid[path].get_value()
        bits = littlebit.core.formula_bits(*w.shape, form.rank, residual=form.paths == 2)
        fp_err, fp_rank = fp16_low_rank(w, bits)
        sign_err, sign_bits = sign_rows(w)
        rows.append(dict(
            path=path, shape=list(w.shape), rank=form.rank, paths=form.paths, bits=bits,
            bpw=bits / w.size, fp16_rank=fp_rank, sign_rows_bpw=sign_bits / w.size,
            dual_svid=_rel(base.materialize(), w), joint_itq=_rel(form.materialize(), w),
            fp16_low_rank=fp_err, sign_rows=sign_err))
    return rows


def checkpoint_bytes(tree) -> int:
    """Bytes on disk of the library's orbax checkpoint of ``tree`` (zstd-compressed)."""
    from subspace_jax import checkpoint

    with tempfile.TemporaryDirectory() as d:
        path = checkpoint.save(pathlib.Path(d) / "ckpt", tree)
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _forward(graphdef):
    return jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))


def speed(graphdef, state, deployed: dict, *, tokens: int, batch: int, repeats: int,
          seed: int = 0) -> dict:
    """Layer and encoder time and memory, dense float32 vs packed, in one round-robin each."""
    out = {}
    for name in ("up", "down"):
        path = f"encoder/layers/0/mlp/{name}/kernel"
        dense = dict(rules.leaf_paths(state)[0])[path].get_value()
        x = jax.random.normal(jax.random.key(2 * seed + 1), (tokens, dense.shape[0]))
        mm = jax.jit(lambda x, k: forms.matmul(x, k))
        fns = {"dense f32": (mm, (x, dense))}
        for bpw, tree in deployed.items():
            fns[f"{bpw} bpw"] = (mm, (x, dict(rules.leaf_paths(tree)[0])[path].get_value()))
        out[f"layer_{name}"] = _timed(fns, x.nbytes, repeats, shape=list(dense.shape), tokens=tokens)
    ids = jax.random.randint(jax.random.key(2 * seed + 2), (batch, tokens // batch), 1000, 20000)
    mask = jnp.ones(ids.shape, jnp.int32)
    fwd = _forward(graphdef)
    fns = {"dense f32": (fwd, (state, ids, mask))}
    fns.update({f"{bpw} bpw": (fwd, (tree, ids, mask)) for bpw, tree in deployed.items()})
    out["encoder"] = _timed(fns, ids.nbytes + mask.nbytes, repeats, batch=batch,
                            seq=tokens // batch, tokens=tokens)
    ref = fwd(state, ids, mask)
    out["encoder"]["hidden_rel_error"] = {f"{b} bpw": _rel(fwd(t, ids, mask), ref)
                                          for b, t in deployed.items()}
    return out


def _timed(fns: dict, input_bytes: int, repeats: int, **info) -> dict:
    """Compile each ``(fn, args)`` once; time the executables round-robin and read their memory."""
    compiled = {name: fn.lower(*args).compile() for name, (fn, args) in fns.items()}
    cmp = measure.compare({n: (compiled[n], args) for n, (_, args) in fns.items()},
                          warmup=2, repeats=repeats)
    print(cmp.table())
    rows = {}
    for name in fns:
        mem = measure.compiled_memory(compiled[name])
        fn, args = fns[name]
        rows[name] = dict(flops=vars(measure.flops(fn, *args)),median_ms=1e3 * cmp.median(name), min_ms=1e3 * cmp.timings[name].min,
                          speedup_vs_dense=cmp.ratio("dense f32", name),
                          speedup_of_min_times=cmp.timings["dense f32"].min / cmp.timings[name].min,
                          weight_bytes=mem.argument - input_bytes, temp_bytes=mem.temp,
                          total_bytes=mem.total)
    return dict(info, results=rows)


def run(*, quick: bool = False, bpws=BPWS, itq_iters: int = 50, tokens: int | None = None,
        batch: int | None = None, repeats: int | None = None,
        save_checkpoints: bool | None = None, seed: int = 0) -> dict:
    """Compress MiniLM at each target and measure errors, sizes and packed speed.

    ``quick``: reconstruction errors of layer 0's six kernels only (all 36 are still
    compressed for the encoder timing), two targets (0.3, 0.1), 512 tokens, 3 timed rounds,
    no checkpoint written. Returns the JSON-ready result.
    """
    save_checkpoints = not quick if save_checkpoints is None else save_checkpoints
    start, cpu = time.perf_counter(), time.process_time()
    bpws = (0.3, 0.1) if quick and tuple(bpws) == BPWS else tuple(bpws)
    tokens = tokens or (512 if quick else 4096)
    batch = batch or (8 if quick else 32)
    repeats = repeats or (3 if quick else 10)
    model, _ = bert.from_pretrained()
    graphdef, state = nnx.split(model)
    rule = rules.Rule(pattern=KERNELS)
    paths = [m.path for m in rules.select(state, rule).selected]
    err_paths = [p for p in paths if p.startswith("encoder/layers/0/")] if quick else paths
    result = dict(model="all-MiniLM-L6-v2", quick=quick, itq_iters=itq_iters, bpws=list(bpws),
                  settings={str(b): settings(b) for b in bpws}, layers={}, summary={}, size={})
    deployed = {}
    for bpw in bpws:
        t0 = time.perf_counter()
        compressed = littlebit.transform(state, littlebit.LittleBitRule(
            pattern=KERNELS, bpw=bpw, itq_iters=itq_iters, **settings(bpw)))
        svid = littlebit.transform(state, littlebit.LittleBitRule(  # Dual-SVID: no ITQ
            pattern="|".join(err_paths), bpw=bpw, itq_iters=0, **settings(bpw)))
        rows = layer_errors(state, compressed, svid, err_paths)
        deployed[bpw] = littlebit.deploy(compressed)
        acc = littlebit.accounting(deployed[bpw])
        result["layers"][str(bpw)] = rows
        result["summary"][str(bpw)] = {m: float(np.mean([r[m] for r in rows])) for m in METHODS}
        result["summary"][str(bpw)]["worse_itq_layers"] = [
            r["path"] for r in rows if r["joint_itq"] > r["dual_svid"]]
        result["size"][str(bpw)] = dict(
            linear_bits=acc.linear_bits, linear_weights=acc.linear_weights,
            linear_bpw=acc.linear_bpw, model_bits=acc.total_bits, model_params=acc.total_weights,
            model_bpw=acc.model_bpw, not_compressed_bytes={k: b // 8 for k, b in acc.by_kind().items()},
            checkpoint_bytes=checkpoint_bytes(deployed[bpw]) if save_checkpoints else None,
            predicted_bytes=acc.total_bits // 8, seconds=time.perf_counter() - t0)
        print(f"{bpw} bpw: {result['summary'][str(bpw)]}  ({time.perf_counter() - t0:.1f} s)")
        print(acc.table().split("\n", 2)[0], "\n", "\n".join(acc.table().splitlines()[-3:]))
    dense_acc = littlebit.accounting(state)
    dense_acc = littlebit.accounting(state)
    result["size"]["dense"] = dict(
        model_bits=dense_acc.total_bits, model_params=dense_acc.total_weights,
        linear_bytes=4 * result["size"][str(bpws[0])]["linear_weights"],
        checkpoint_bytes=checkpoint_bytes(state) if save_checkpoints else None)
    result["speed"] = speed(graphdef, state, deployed, tokens=tokens, batch=batch, repeats=repeats,
                            seed=seed)
    result["seconds"] = time.perf_counter() - start
    result["cpu_seconds"] = time.process_time() - cpu  # all threads: what 2 free cores would need
    return result


def plot(result: dict, path: pathlib.Path) -> pathlib.Path:
    """Mean relative error against achieved bits per weight, all layers and by layer kind."""
    labels = dict(dual_svid="Dual-SVID", joint_itq="Dual-SVID + Joint-ITQ",
                  fp16_low_rank="FP16 low rank, same bits", sign_rows="sign + row scale (~1.04 bpw)")
    panels = {}
    for panel, pat in [("all kernels", ""), ("attention q/k/v/o", "/attn/"), ("MLP up/down", "/mlp/")]:
        curves = {}
        for m in METHODS:
            xs, ys = [], []
            for b in result["bpws"]:
                rows = [r for r in result["layers"][str(b)] if pat in r["path"]]
                xs.append(np.mean([r["sign_rows_bpw" if m == "sign_rows" else "bpw"] for r in rows]))
                ys.append(np.mean([r[m] for r in rows]))
            curves[labels[m]] = (xs, ys)
        panels[panel] = curves
    return analysis.plot_curves(path, panels, xlabel="bits per weight (achieved)",
                                  title="MiniLM kernels: relative reconstruction error before QAT")


def parse(argv=None) -> argparse.Namespace:
    p = runner.parser(__name__, __doc__,
                      quick="layer 0 errors, 0.3 and 0.1 bpw, 512 tokens", seed_help="the timing inputs' seed", sizes=SIZES)
    p.add_argument("--bpw", type=float, nargs="+", default=list(BPWS))
    p.add_argument("--itq-iters", type=int, default=50)
    p.add_argument("--repeats", type=int, help="timed rounds of each comparison")
    return runner.parse(p, argv)


#: ``subspace-jax bench --size``: this script's arguments (``full``: the recorded run).
SIZES = {"tiny": ["--quick", "--bpw", "0.55", "--itq-iters", "5", "--repeats", "2"],
         "small": ["--quick"],
         "full": []}


def bench_rows(result: dict) -> list[dict]:
    """``subspace-jax bench`` rows: the packed path at each target against dense float32 (the
    first MLP kernel alone, then the whole MiniLM encoder), timed side by side in one run.

    Examples:
        >>> res = lambda b, t, f: dict(weight_bytes=b, median_ms=t, flops=dict(matmul=f))
        >>> part = {"shape": [384, 1536], "results": {"dense f32": res(400, 2.0, 100),
        ...                                         "0.3 bpw": res(40, 1.0, 10)}}
        >>> rows = bench_rows({"bpws": [0.3], "summary": {"0.3": dict(joint_itq=0.6)},
        ...                    "speed": {"layer_up": part, "encoder": dict(
        ...                        part, hidden_rel_error={"0.3 bpw": 0.2})}})
        >>> rows[0]["memory_ratio"], rows[0]["flops_ratio"], rows[0]["time_ratio"]
        (0.1, 0.1, 0.5)
        >>> rows[0]["quality"], rows[1]["quality"]
        ('mean kernel err 0.600', 'hidden err 0.200 (no QAT)')
    """
    rows = []
    for bpw in result["bpws"]:
        for part, what in (("layer_up", "kernel"), ("encoder", "encoder forward")):
            speed = result["speed"][part]
            r, dense = speed["results"][f"{bpw} bpw"], speed["results"]["dense f32"]
            flops = r.get("flops", {}).get("matmul"), dense.get("flops", {}).get("matmul")
            quality = (f"mean kernel err {result['summary'][str(bpw)]['joint_itq']:.3f}"
                       if part == "layer_up" else
                       f"hidden err {speed['hidden_rel_error'][f'{bpw} bpw']:.3f} (no QAT)")
            rows.append(dict(
                method="littlebit", baseline="dense float32", quality=quality,
                run=f"LittleBit-2 {bpw} bpw, packed: "
                    + ("MLP up " + "x".join(map(str, speed["shape"])) if part == "layer_up"
                       else "MiniLM encoder"),
                memory_ratio=r["weight_bytes"] / dense["weight_bytes"],
                flops_ratio=None if None in flops else flops[0] / flops[1],
                time_ratio=r["median_ms"] / dense["median_ms"],
                what=f"{what}: weight bytes in compiled memory"
                     + (" (embeddings incl.)" if part == "encoder" else "")
                     + ", matmul FLOPs, time"))
    return rows


def main(argv=None) -> int:
    args = parse(argv)
    result = run(quick=args.quick, bpws=tuple(args.bpw), itq_iters=args.itq_iters, repeats=args.repeats,
                 seed=args.seed)
    name = args.name or "littlebit" + ("_quick" if args.quick else "")
    path = records.write_result(name, result, results_dir=args.results_dir)
    plot(result, path.with_suffix(".png"))
    print(f"\n{'bpw':>5} " + " ".join(f"{m:>14}" for m in METHODS))
    for b in result["bpws"]:
        print(f"{b:>5} " + " ".join(f"{result['summary'][str(b)][m]:>14.4f}" for m in METHODS))
    for part, rows in result["speed"].items():
        print(part, "speedup (medians; mins):",
              {k: (round(v["speedup_vs_dense"], 2), round(v["speedup_of_min_times"], 2))
               for k, v in rows["results"].items()})
    print(f"wrote {path} and {path.with_suffix('.png').name} in {result['seconds']:.0f} s "
          f"({result['cpu_seconds']:.0f} s of CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
