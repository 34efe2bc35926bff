"""Tests for the reference ViT: shapes, jit, Linear types, paths, dtypes, training."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from subspace_jax import nn as sjnn
from subspace_jax.models import vit
from subspace_jax.models.vit import ViT, ViTConfig

CONFIG = ViTConfig.digits(depth=1)  # the doctest's model: eager ops compile once
DEEP = ViTConfig.digits(depth=3)  # built but never run: structure tests


def _digits_batch(n, seed=0):
    """Random stand-ins for scikit-learn digits: (n, 8, 8, 1) in [0, 16], labels 0..9.

    Drawn with numpy: a jax.random draw compiles once per new shape (about a second here).
    """
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.0, 16.0, (n, 8, 8, 1)).astype(np.float32)
    return jnp.asarray(images), jnp.asarray(rng.integers(0, 10, n, dtype=np.int32))


def _jit_forward(model, **kwargs):
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, **kwargs))
    return lambda x: forward(state, x)


@pytest.fixture(scope="module")
def model():
    return ViT(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def deep_model():
    return ViT(DEEP, rngs=nnx.Rngs(0))


def test_split_merge_jit_matches_eager_on_digits_shape(model):
    images, _ = _digits_batch(2)
    logits = _jit_forward(model)(images)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, model(images), rtol=1e-5, atol=1e-5)


def test_patch_size_4_on_digits_shape():
    model = ViT(ViTConfig.digits(patch_size=4, depth=1), rngs=nnx.Rngs(0))
    assert model.patch_embed.kernel.shape == (16, 64)
    assert model.pos_embed[...].shape == (1, 1 + 4, 64)
    assert _jit_forward(model)(_digits_batch(3)[0]).shape == (3, 10)


def test_patchify_matches_strided_conv():
    images, _ = _digits_batch(2)
    kernel = jnp.asarray(np.random.default_rng(1).standard_normal((2, 2, 1, 5)), jnp.float32)

    @jax.jit
    def both(images, kernel):
        conv = jax.lax.conv_general_dilated(
            images, kernel, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return vit.patchify(images, 2) @ kernel.reshape(4, 5), conv

    via_patches, conv = both(images, kernel)
    np.testing.assert_allclose(via_patches, conv.reshape(2, 16, 5), rtol=1e-5, atol=1e-4)


def test_every_linear_is_subspace_linear(deep_model):
    linears = [node for _, node in nnx.iter_graph(deep_model) if isinstance(node, nnx.Linear)]
    assert len(linears) == 2 + 6 * DEEP.depth  # patch_embed + head + q,k,v,o,up,down
    assert all(type(node) is sjnn.Linear for node in linears)


def test_expected_paths_exist(deep_model):
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(deep_model))}
    expected = {"patch_embed/kernel", "cls_token", "pos_embed", "final_norm/scale", "head/kernel"}
    for i in range(DEEP.depth):
        expected |= {f"blocks/{i}/attn/{n}/kernel" for n in ("q", "k", "v", "o")}
        expected |= {f"blocks/{i}/mlp/{n}/kernel" for n in ("up", "down")}
        expected |= {f"blocks/{i}/attn_norm/scale", f"blocks/{i}/mlp_norm/scale"}
    assert expected <= paths, expected - paths
    assert not any("rngs" in p for p in paths)  # dropout keys are passed at call time


@pytest.mark.parametrize(
    "overrides, field",
    [({"heads": 5}, "heads"), ({"patch_size": 3}, "patch_size"), ({"dropout": 1.0}, "dropout"),
     ({"depth": 0}, "depth"), ({"dtype": jnp.int32}, "dtype")],
)
def test_config_validation_names_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        ViTConfig.digits(**overrides)


def test_wrong_image_shape_raises(model):
    with pytest.raises(ValueError, match="images shape"):
        model(jnp.zeros((2, 8, 8, 3)))


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_bfloat16_compute_traces_under_strict_promotion(param_dtype):
    # promotion errors are raised while tracing, so eval_shape checks them without a compile
    cfg = ViTConfig.digits(depth=1, dtype=jnp.bfloat16, param_dtype=param_dtype)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0))))
    images, labels = _digits_batch(4)

    def loss(state):
        logits = nnx.merge(graphdef, state)(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    (value, logits), grads = jax.eval_shape(jax.value_and_grad(loss, has_aux=True), state)
    assert logits.dtype == jnp.float32 and logits.shape == (4, 10)
    assert value.dtype == jnp.float32
    assert grads["blocks"][0]["attn"]["q"]["kernel"].dtype == param_dtype


def test_dropout_needs_rngs_and_changes_output():
    model = ViT(ViTConfig.digits(depth=1, dropout=0.5), rngs=nnx.Rngs(0))
    images, _ = _digits_batch(2)
    with pytest.raises(ValueError, match="needs rngs"):
        model(images, deterministic=False)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, key):
        m = nnx.merge(graphdef, state)
        return m(images), m(images, deterministic=False, rngs=nnx.Rngs(dropout=key))

    clean, noisy = forward(state, jax.random.key(1))
    _, noisy_again = forward(state, jax.random.key(1))
    assert not np.allclose(clean, noisy)
    np.testing.assert_array_equal(noisy, noisy_again)


def test_adam_overfits_32_examples(model):
    images, labels = _digits_batch(32)
    images = images / 16.0
    graphdef, params = nnx.split(model)
    tx = optax.adam(3e-3)

    def loss_fn(params):
        logits = nnx.merge(graphdef, params)(images)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes int and float
            updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    losses = []
    for _ in range(60):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    print(f"ViT digits-shaped overfit: loss {losses[0]:.3f} -> {losses[-1]:.3f} in 60 steps")
    assert losses[-1] < 0.3 * losses[0]
