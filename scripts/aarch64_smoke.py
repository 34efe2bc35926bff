"""Smoke run of the core transforms and of every method; prints one JSON line of numbers.

Used by scripts/aarch64_smoke.sh, which runs it natively and under qemu aarch64 and compares
the two lines with ``--compare NATIVE ARM`` (every number within float32 tolerance). Shapes
are tiny and every model is built abstractly (``nnx.eval_shape``) and filled by one jitted
init: under emulation each eager op costs a compilation (seconds), so the script keeps to a
few jitted calls per method. Checks:

* core: dense / low-rank / trained / restored loss, sign-fixed QR, Tucker;
* convert one small model with WASI, NSN and LittleBit-2;
* one jitted WASI train step driven by the LoRA-Pre optimizer (two steps: no retrace);
* NSN at two ranks (full rank equals dense);
* LittleBit-2 packed inference: deploy, then the model and one matmul from packed bits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one BLAS thread beside XLA's pool

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import subspace_jax as sj  # noqa: E402
from subspace_jax import littlebit, lorapre, nested, rules, train, wasi  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5  # float32: different CPUs sum in different orders
_T0 = time.perf_counter()


def _log(what: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f} s] {what}", file=sys.stderr, flush=True)


def build(make):
    """``make()`` as a model built abstractly and initialised by one jitted call."""
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    return nnx.merge(graphdef, jax.jit(lambda: nnx.split(make())[1])())


class Block(nnx.Module):
    """A transformer-shaped toy: one attention projection, a GELU MLP and a head."""

    def __init__(self, rngs: nnx.Rngs, d: int = 16, hidden: int = 32, out: int = 4):
        self.attn = nnx.Dict(q=nnx.Linear(d, d, rngs=rngs))
        self.mlp = nnx.Dict(up=nnx.Linear(d, hidden, rngs=rngs),
                            down=nnx.Linear(hidden, d, rngs=rngs))
        self.head = nnx.Linear(d, out, rngs=rngs)

    def __call__(self, x):
        h = x + self.attn["q"](x)
        h = h + self.mlp["down"](jax.nn.gelu(self.mlp["up"](h)))
        return self.head(h)


def core_checks() -> dict:
    model = sj.adopt(build(lambda: nnx.Sequential(nnx.Linear(16, 32, rngs=nnx.Rngs(0)),
                                                  nnx.Linear(32, 4, rngs=nnx.Rngs(1)))))
    graphdef, state = nnx.split(model)
    x, y = jax.jit(lambda: (jax.random.normal(jax.random.key(2), (8, 16)),
                            jax.random.normal(jax.random.key(3), (8, 4))))()
    low = sj.factorize(state, sj.LowRankRule(pattern=r"layers/\d/kernel", rank=4))
    loss = jax.jit(lambda s: jnp.mean((nnx.merge(graphdef, s)(x) - y) ** 2))
    tx = optax.sgd(0.1)
    step = jax.jit(lambda s: optax.apply_updates(s, tx.update(jax.grad(loss)(s), tx.init(s))[0]))
    trained = low
    for _ in range(5):
        trained = step(trained)
    path = sj.checkpoint.save(tempfile.mkdtemp() + "/ckpt", trained)
    restored = sj.checkpoint.restore(path, sj.checkpoint.abstract(trained))
    q, r = sj.linalg.qr_positive(jax.random.normal(jax.random.key(4), (12, 5)))
    tucker = sj.linalg.hosvd(jax.random.normal(jax.random.key(5), (4, 6, 8)), ranks=(2, 3, 4))
    return {"dense_loss": loss(state), "low_rank_loss": loss(low),
            "trained_loss": loss(trained), "restored_loss": loss(restored),
            "qr_diag_min": np.diag(r).min(),
            "tucker_norm": np.linalg.norm(sj.linalg.tucker_reconstruct(tucker))}


@jax.jit
def _data():
    x = jax.random.normal(jax.random.key(10), (4, 6, 16))
    y = jax.random.normal(jax.random.key(11), (4, 6, 4))
    return x, y


def _apply(model, x):
    """``model(x)`` in one jitted call (eagerly, every op would compile on its own)."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)


def _loss(model, batch, key):
    del key
    x, y = batch
    return jnp.mean((model(x) - y) ** 2)


def wasi_lorapre_checks(block: Block) -> dict:
    """WASI conversion, then two jitted WASI train steps driven by LoRA-Pre."""
    x, y = _data()
    rule = wasi.WasiRule(pattern=wasi.MLP_PATTERN, energy=0.9, activation_eps=0.9)
    model = wasi.convert(block, rule, sample=lambda m: m(x), verbose=False)
    converted_out = _apply(model, x)
    graphdef, params, rest = train.split_model(model)
    traces = []

    def loss(m, batch, key):
        traces.append(1)
        return _loss(m, batch, key)

    tx = lorapre.lorapre(1e-2, rank=2)
    step = train.make_train_step(graphdef, loss, tx, post_update=wasi.post_update,
                                 donate=False)  # ``model`` is evaluated after the steps
    opt = jax.jit(lambda p: train.init_optimizer(tx, p))(params)
    losses = []
    for i in range(2):
        params, opt, rest, metrics = step(params, opt, rest, (x, y), jax.random.key(i))
        losses.append(metrics["loss"])
    after = nnx.merge(graphdef, params, rest)
    return {"wasi_converted_out_norm": np.linalg.norm(converted_out),
            "wasi_lorapre_loss": np.stack(losses),
            "wasi_lorapre_after_loss": np.mean((np.asarray(_apply(after, x)) - np.asarray(y)) ** 2),
            "wasi_lorapre_traces": float(len(traces))}


def nested_checks(block: Block) -> dict:
    """NSN conversion (R = 16), then the model at ranks 16 (= dense) and 4."""
    x, _ = _data()
    model = nested.convert(block)
    fwd = jax.jit(lambda state: nnx.merge(nnx.graphdef(model), state)(x))
    out = {}
    for r in (16, 4):  # static=False: one compilation serves both ranks
        state = nested.set_rank(nnx.state(model), r, static=False)
        y = np.asarray(fwd(state))
        out[f"nsn_rank{r}_out"] = y[0, 0]
        out[f"nsn_rank{r}_out_norm"] = np.linalg.norm(y)
    dense = np.asarray(_apply(block, x))
    err = np.linalg.norm(np.asarray(fwd(nested.set_rank(nnx.state(model), 16, static=False)))
                         - dense)
    out["nsn_full_rank_equals_dense"] = float(err < 1e-5 * np.linalg.norm(dense))
    return out


def littlebit_checks(block: Block) -> dict:
    """LittleBit-2 compression of the MLP, deploy (packed bits), packed inference."""
    x, _ = _data()
    rule = littlebit.LittleBitRule(pattern=r"mlp/(up|down)/kernel", bpw=1.0, itq_iters=3,
                                   strict=False)
    student = littlebit.convert(block, rule)
    graphdef, state = nnx.split(student)
    packed = littlebit.deploy(state)
    fwd = jax.jit(lambda s: nnx.merge(graphdef, s)(x))
    kernel = dict(rules.leaf_paths(packed)[0])["mlp/up/kernel"].get_value()
    train_kernel = dict(rules.leaf_paths(state)[0])["mlp/up/kernel"].get_value()
    xs = np.asarray(x).reshape(-1, 16)
    mm = jax.jit(sj.forms.matmul)
    packed_out, train_out = np.asarray(mm(xs, kernel)), np.asarray(mm(xs, train_kernel))
    packed_y, train_y = np.asarray(fwd(packed)), np.asarray(fwd(state))
    return {"littlebit_train_out_norm": np.linalg.norm(train_y),
            "littlebit_packed_out": packed_y[0, 0],
            "littlebit_packed_out_norm": np.linalg.norm(packed_y),
            "littlebit_packed_matmul": packed_out[0, :4],
            "littlebit_packed_equals_train": float(  # up to the float16 scales
                np.linalg.norm(packed_out - train_out) < 1e-2 * np.linalg.norm(train_out)),
            "littlebit_bits": float(littlebit.accounting(packed).linear_bits)}


SECTIONS = {"core": core_checks, "wasi+lorapre": wasi_lorapre_checks,
            "nested": nested_checks, "littlebit": littlebit_checks}


def run(only=None) -> dict:
    checks = {}
    for name, fn in SECTIONS.items():
        if only and name not in only:
            continue
        args = () if name == "core" else (build(lambda: Block(nnx.Rngs(0))),)
        checks.update({k: jax.device_get(v) for k, v in fn(*args).items()})
        _log(name)
    values = {k: [float(v) for v in np.ravel(x)] for k, x in checks.items()}
    return {"values": values, "checks": sorted(values), "machine": platform.machine(),
            "jax": jax.__version__, "seconds": time.perf_counter() - _T0}


def compare(native: dict, arm: dict, *, rtol: float = RTOL, atol: float = ATOL) -> list[str]:
    """Lines describing each check: native vs aarch64, relative error, ok or FAIL.

    Examples:
        >>> a = {"values": {"x": [1.0, 2.0]}, "machine": "x86_64"}
        >>> b = {"values": {"x": [1.0, 2.0 + 1e-6]}, "machine": "aarch64"}
        >>> compare(a, b)[0].endswith("ok")
        True
        >>> compare(a, {"values": {"x": [1.0, 2.1]}})[0].endswith("FAIL")
        True
    """
    lines = []
    for key in sorted(set(native["values"]) | set(arm["values"])):
        n, a = native["values"].get(key), arm["values"].get(key)
        if n is None or a is None or len(n) != len(a):
            lines.append(f"{key:<36} missing or misshapen: native {n} aarch64 {a}  FAIL")
            continue
        ok = all(math.isclose(u, v, rel_tol=rtol, abs_tol=atol) for u, v in zip(n, a))
        err = max(abs(u - v) / max(abs(u), atol) for u, v in zip(n, a))
        lines.append(f"{key:<36} {n[0]:>+14.7g} {a[0]:>+14.7g}  rel {err:.1e}  "
                     + ("ok" if ok else "FAIL"))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run only these checks")
    p.add_argument("--compare", nargs=2, metavar=("NATIVE", "ARM"),
                   help="compare two output files (last JSON line of each) instead of running")
    args = p.parse_args(argv)
    if args.compare:
        native, arm = (json.loads(open(f).read().splitlines()[-1]) for f in args.compare)
        lines = compare(native, arm)
        print(f"{'check':<36} {native['machine']:>14} {arm['machine']:>14}  "
              f"(rtol {RTOL:g}, atol {ATOL:g})")
        print("\n".join(lines))
        failed = sum(line.endswith("FAIL") for line in lines)
        print(f"{len(lines) - failed} of {len(lines)} checks agree; native {native['seconds']:.0f} s, "
              f"aarch64 {arm['seconds']:.0f} s")
        return 1 if failed or arm["machine"] != "aarch64" else 0
    print(json.dumps(run(args.only)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
