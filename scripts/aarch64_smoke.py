"""Smoke run of the core transforms; prints one JSON line of numbers to compare across CPUs.

Used by scripts/aarch64_smoke.sh (native vs qemu aarch64). Small shapes: emulation is slow.
"""

import json
import platform
import tempfile

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import subspace_jax as sj


def main() -> None:
    model = sj.adopt(
        nnx.Sequential(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), nnx.Linear(32, 4, rngs=nnx.Rngs(1)))
    )
    graphdef, state = nnx.split(model)
    x = jax.random.normal(jax.random.key(2), (8, 16))
    y = jax.random.normal(jax.random.key(3), (8, 4))
    low = sj.factorize(state, sj.LowRankRule(pattern=r"layers/\d/kernel", rank=4))

    def loss(s):
        return jnp.mean((nnx.merge(graphdef, s)(x) - y) ** 2)

    tx = optax.sgd(0.1)
    step = jax.jit(lambda s: optax.apply_updates(s, tx.update(jax.grad(loss)(s), tx.init(s))[0]))
    trained = low
    for _ in range(5):
        trained = step(trained)
    path = sj.checkpoint.save(tempfile.mkdtemp() + "/ckpt", trained)
    restored = sj.checkpoint.restore(path, sj.checkpoint.abstract(trained))
    q, r = sj.linalg.qr_positive(jax.random.normal(jax.random.key(4), (12, 5)))
    tucker = sj.linalg.hosvd(jax.random.normal(jax.random.key(5), (4, 6, 8)), ranks=(2, 3, 4))
    out = {
        "dense_loss": float(loss(state)),
        "low_rank_loss": float(loss(low)),
        "trained_loss": float(loss(trained)),
        "restored_loss": float(loss(restored)),
        "qr_diag_min": float(jnp.diag(r).min()),
        "tucker_norm": float(jnp.linalg.norm(sj.linalg.tucker_reconstruct(tucker))),
    }
    out["checks"] = sorted(out)
    out["machine"] = platform.machine()
    out["jax"] = jax.__version__
    print(json.dumps(out))


if __name__ == "__main__":
    main()
