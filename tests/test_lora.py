"""LoRA baseline: starts equal to the base model, trains only its factors, never computes dW."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from subspace_jax import lora, measure, nn as sjnn, rules, transforms


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
    dense_dw = 2 * 64 * 16 * 32
    assert full - low >= dense_dw - 2 * 64 * 4 * (16 + 32) * 3


def test_masked_training_moves_only_adapters_and_head():
    graphdef, params = nnx.split(_model())
    adapted = lora.add_lora(params, lora.LoRARule(pattern="layers/0/kernel", rank=4), key=jax.random.key(0))
    mask = lora.trainable_mask(adapted, also=rules.Rule(pattern="layers/1/.*"))
    tx = lora.freeze(optax.adam(1e-2), mask)
    x = jax.random.normal(jax.random.key(1), (64, 16))
    y = jax.random.normal(jax.random.key(2), (64, 4))

    def loss(p):
        return jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)

    with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float in bias correction
        state = tx.init(adapted)
        p = adapted
        first = float(loss(p))
        for _ in range(30):
            updates, state = tx.update(jax.grad(loss)(p), state, p)
            p = optax.apply_updates(p, updates)
    print("loss", first, "->", float(loss(p)))
    assert float(loss(p)) < 0.8 * first
    before, after = adapted["layers"][0], p["layers"][0]
    np.testing.assert_array_equal(after["kernel"].get_value().w, before["kernel"].get_value().w)
    np.testing.assert_array_equal(after["bias"][...], before["bias"][...])
    assert float(jnp.abs(after["kernel"].get_value().b).max()) > 0
    frozen_state = [s for s in jax.tree.leaves(state) if getattr(s, "shape", None) == (16, 32)]
    assert not frozen_state  # no moments for the frozen base


def test_bad_rank_names_path():
    with pytest.raises(ValueError, match=r"'w'.*rank must be an int in \[1, 4\]"):
        lora.add_lora({"w": jnp.ones((4, 8))}, lora.LoRARule(pattern="w", rank=5), key=jax.random.key(0))
