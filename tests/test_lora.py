"""LoRA baseline: starts equal to the base model, trains only its factors, never computes dW."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from subspace_jax import lora, measure, nn as sjnn, rules, train, transforms


def _model():
    return sjnn.adopt(
        nnx.Sequential(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), nnx.Linear(32, 4, rngs=nnx.Rngs(1)))
    )


def test_starts_equal_and_merges_back():
    graphdef, params = nnx.split(_model())
    adapted = lora.add_lora(params, lora.LoRARule(pattern=".*/kernel", rank=4), key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, 16))
    np.testing.assert_array_equal(nnx.merge(graphdef, adapted)(x), nnx.merge(graphdef, params)(x))
    merged = transforms.materialize(adapted)
    assert jax.tree.structure(merged) == jax.tree.structure(params)


def test_base_kernel_gets_no_gradient_and_no_matmul():
    graphdef, params = nnx.split(_model())
    adapted = lora.add_lora(params, lora.LoRARule(pattern="layers/0/kernel", rank=4), key=jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (64, 16))

    def loss(p):
        return jnp.sum(nnx.merge(graphdef, p)(x) ** 2)

    grads = jax.grad(loss)(adapted)
    assert float(jnp.abs(grads["layers"][0]["kernel"].get_value().w).max()) == 0.0
    assert float(jnp.abs(grads["layers"][0]["kernel"].get_value().a).max()) == 0.0  # b starts at 0
    assert float(jnp.abs(grads["layers"][0]["kernel"].get_value().b).max()) > 0.0
    full = measure.flops(jax.grad(loss), params).matmul
    low = measure.flops(jax.grad(loss), adapted).matmul
    print(f"grad matmul FLOPs: full {full:.3e}, LoRA {low:.3e}")
    # LoRA drops dW0 = x^T g (2*64*16*32) and adds, per token, x a and (x a) b forward,
    # then db, d(xa) and da backward: 2*64*4*16 twice (x a, da) and 2*64*4*32 three times
    dense_dw = 2 * 64 * 16 * 32
    adapter = 2 * (2 * 64 * 4 * 16) + 3 * (2 * 64 * 4 * 32)
    assert full - low == dense_dw - adapter


def test_masked_training_moves_only_adapters_and_head():
    graphdef, params, rest = train.split_model(_model())
    adapted = lora.add_lora(params, lora.LoRARule(pattern="layers/0/kernel", rank=4), key=jax.random.key(0))
    mask = train.trainable_mask(adapted, train=[rules.Rule(pattern="layers/0/kernel"),
                                                rules.Rule(pattern="layers/1/.*")])
    assert mask["layers"][0]["kernel"].get_value() == lora.LoRA(w=False, a=True, b=True, scale=1.0)
    tx = optax.adam(1e-2)
    x = jax.random.normal(jax.random.key(1), (64, 16))
    y = jax.random.normal(jax.random.key(2), (64, 4))

    def loss(model, batch, key):
        return jnp.mean((model(batch[0]) - batch[1]) ** 2)

    step = train.make_train_step(graphdef, loss, tx, mask=mask, donate=False)
    state = train.init_optimizer(tx, adapted, mask)
    p, first = adapted, float(loss(nnx.merge(graphdef, adapted, rest), (x, y), None))
    for i in range(30):
        p, state, rest, metrics = step(p, state, rest, (x, y), jax.random.key(i))
    last = float(loss(nnx.merge(graphdef, p, rest), (x, y), None))
    print("loss", first, "->", last)
    assert last < 0.8 * first
    before, after = adapted["layers"][0], p["layers"][0]
    np.testing.assert_array_equal(after["kernel"].get_value().w, before["kernel"].get_value().w)
    np.testing.assert_array_equal(after["bias"][...], before["bias"][...])
    assert float(jnp.abs(after["kernel"].get_value().b).max()) > 0
    frozen_state = [s for s in jax.tree.leaves(state) if getattr(s, "shape", None) == (16, 32)]
    assert not frozen_state  # no moments for the frozen base


def test_bad_rank_names_path():
    with pytest.raises(ValueError, match=r"'w'.*rank must be an int in \[1, 4\]"):
        lora.add_lora({"w": jnp.ones((4, 8))}, lora.LoRARule(pattern="w", rank=5), key=jax.random.key(0))
