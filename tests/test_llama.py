"""Tests for the reference Llama: causality, RoPE, GQA, parameter counts, dtypes, training."""

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from subspace_jax import nn as sjnn
from subspace_jax.models import llama
from subspace_jax.models.llama import Llama, LlamaConfig, apply_rope, lm_loss

TINY = dict(vocab_size=64, dim=32, depth=2, heads=4)  # the doctests' shapes: shared compiles


def _tokens(shape, seed=0):
    """Random tokens drawn with numpy (a jax.random draw compiles once per new shape)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, TINY["vocab_size"], shape, dtype=np.int32))


def _param_count(state):
    return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(state))


@functools.partial(jax.jit, static_argnums=0)
def _jit_apply(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def _forward(model, tokens):
    """Jitted forward through split/merge; models of one config share one compile."""
    return _jit_apply(*nnx.split(model), tokens)


@pytest.fixture(scope="module", params=[None, 2], ids=["mha", "gqa"])
def model(request):
    return Llama(LlamaConfig(**TINY, kv_heads=request.param), rngs=nnx.Rngs(0))


def test_causality_is_exact(model):
    tokens = _tokens((2, 12))
    base = np.asarray(_forward(model, tokens))
    for t in (0, 5, 10):
        changed = tokens.at[:, t + 1:].set(_tokens((2, 11 - t), seed=t + 1))
        assert not np.array_equal(changed, tokens)
        logits = np.asarray(_forward(model, changed))
        np.testing.assert_array_equal(logits[:, : t + 1], base[:, : t + 1])
        assert not np.allclose(logits[:, t + 1:], base[:, t + 1:])  # the future does move


def test_rope_scores_depend_only_on_relative_position():
    q, k = jnp.asarray(np.random.default_rng(0).standard_normal((2, 1, 1, 3, 16)), jnp.float32)

    @jax.jit
    def rotated_dot(m, n):
        return jnp.sum(apply_rope(q, m[None]) * apply_rope(k, n[None]), axis=-1)

    def score(m, n):
        return np.asarray(rotated_dot(jnp.int32(m), jnp.int32(n)))

    for m, n, shift in [(0, 0, 7), (5, 2, 13), (3, 9, 100), (40, 1, 250)]:
        np.testing.assert_allclose(score(m + shift, n + shift), score(m, n), rtol=1e-4, atol=1e-4)
    assert not np.allclose(score(5, 2), score(5, 3), atol=1e-3)  # it does see the offset
    np.testing.assert_allclose(score(17, 17), np.sum(q * k, axis=-1), rtol=1e-4, atol=1e-4)


def test_rope_is_rotate_half_layout():
    x = jnp.zeros((1, 1, 1, 4)).at[..., 0].set(1.0)  # pair 0 is (x[0], x[2]), angle = pos
    out = apply_rope(x, jnp.array([2]))[0, 0, 0]
    np.testing.assert_allclose(out, [math.cos(2.0), 0.0, math.sin(2.0), 0.0], atol=1e-6)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_num_params_matches_model(tie, kv_heads):
    cfg = LlamaConfig(**TINY, kv_heads=kv_heads, tie_embeddings=tie)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    assert cfg.num_params() == _param_count(nnx.state(model, nnx.Param))
    embed = cfg.vocab_size * cfg.dim * (1 if tie else 2)
    assert cfg.num_params(embeddings=False) == cfg.num_params() - embed


def test_presets_span_1m_to_100m():
    counts = {}
    for name in ("1m", "5m", "20m", "100m"):
        cfg = LlamaConfig.preset(name, vocab_size=256, tie_embeddings=False)
        abstract = nnx.eval_shape(lambda cfg=cfg: Llama(cfg, rngs=nnx.Rngs(0)))
        assert cfg.num_params() == _param_count(nnx.state(abstract, nnx.Param)), name
        counts[name] = cfg.num_params(embeddings=False)
    print("non-embedding parameters:", counts)
    for name, target in [("1m", 1e6), ("5m", 5e6), ("20m", 20e6), ("100m", 100e6)]:
        assert 0.8 * target <= counts[name] <= 1.2 * target, (name, counts[name])
    with pytest.raises(ValueError, match="name='3m'"):
        LlamaConfig.preset("3m", vocab_size=256)


def test_gqa_equals_mha_with_repeated_kv():
    heads, kv, dim = TINY["heads"], 2, TINY["dim"]
    hd = dim // heads
    gqa = Llama(LlamaConfig(**TINY, kv_heads=kv), rngs=nnx.Rngs(0))
    mha = Llama(LlamaConfig(**TINY), rngs=nnx.Rngs(1))
    assert gqa.blocks[0].attn.k.kernel.shape == (dim, kv * hd)
    assert gqa.blocks[0].attn.q.kernel.shape == (dim, heads * hd)
    assert mha.blocks[0].attn.k.kernel.shape == (dim, heads * hd)

    def repeat_heads(path, v):  # query head h reads kv head h // (heads // kv)
        if re.fullmatch(r"blocks/\d+/attn/[kv]/kernel", "/".join(map(str, path))):
            w = jnp.repeat(v[...].reshape(dim, kv, hd), heads // kv, axis=1)
            return v.replace(w.reshape(dim, heads * hd))
        return v

    tokens = _tokens((2, 12))
    mha_before = _forward(mha, tokens)
    nnx.update(mha, nnx.map_state(repeat_heads, nnx.state(gqa, nnx.Param)))
    gqa_logits = _forward(gqa, tokens)
    assert not np.allclose(mha_before, gqa_logits, atol=1e-3)
    np.testing.assert_allclose(_forward(mha, tokens), gqa_logits, rtol=1e-5, atol=1e-5)
    same = Llama(LlamaConfig(**TINY, kv_heads=heads), rngs=nnx.Rngs(1))  # explicit == heads
    np.testing.assert_array_equal(_forward(same, tokens), mha_before)


@pytest.mark.parametrize("tie", [True, False])
def test_every_linear_is_subspace_linear_and_paths(tie):
    cfg = LlamaConfig(**TINY, tie_embeddings=tie)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    linears = [node for _, node in nnx.iter_graph(model) if isinstance(node, nnx.Linear)]
    assert len(linears) == 7 * cfg.depth + (0 if tie else 1)
    assert all(type(node) is sjnn.Linear and node.bias is None for node in linears)
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model))}
    names = [f"attn/{n}" for n in "qkvo"] + [f"mlp/{n}" for n in ("gate", "up", "down")]
    expected = {f"blocks/{i}/{n}/kernel" for i in range(cfg.depth) for n in names}
    expected |= {"embed/embedding", "final_norm/scale", "blocks/1/attn_norm/scale"}
    assert expected <= paths, expected - paths
    assert ("head/kernel" in paths) is (not tie)


def test_bfloat16_compute_runs_and_returns_float32_logits():
    cfg = LlamaConfig(**TINY, kv_heads=2, dtype=jnp.bfloat16)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    tokens = _tokens((2, 12))
    logits = _forward(model, tokens)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    reference = _forward(Llama(dataclasses.replace(cfg, dtype=jnp.float32), rngs=nnx.Rngs(0)),
                         tokens)
    np.testing.assert_allclose(logits, reference, atol=0.1)  # same model, bf16 rounding only


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_bfloat16_training_traces_under_strict_promotion(param_dtype):
    # promotion errors are raised while tracing, so eval_shape checks them without a compile
    cfg = LlamaConfig(**TINY, kv_heads=2, dtype=jnp.bfloat16, param_dtype=param_dtype)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
    tokens = _tokens((2, 9))
    loss = lambda state: lm_loss(nnx.merge(graphdef, state), tokens)  # noqa: E731
    value, grads = jax.eval_shape(jax.value_and_grad(loss), state)
    assert value.dtype == jnp.float32
    assert grads["blocks"][0]["mlp"]["gate"]["kernel"].dtype == param_dtype


@pytest.mark.parametrize(
    "overrides, field",
    [({"heads": 3}, "heads"), ({"kv_heads": 3}, "kv_heads"), ({"dim": 36, "heads": 4}, "heads"),
     ({"depth": 0}, "depth"), ({"rope_theta": 0.0}, "rope_theta"),
     ({"mlp_hidden": 0}, "mlp_hidden"), ({"dtype": jnp.int8}, "dtype")],
)
def test_config_validation_names_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        LlamaConfig(**(TINY | overrides))


def test_too_long_sequence_raises():
    model = Llama(LlamaConfig(**TINY, max_len=8), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_len=8"):
        model(jnp.zeros((1, 9), jnp.int32))


def test_overfits_repeated_sequence():
    graphdef, params = nnx.split(Llama(LlamaConfig(**TINY), rngs=nnx.Rngs(0)))
    tokens = jnp.tile(_tokens((8,)), (4, 5))[:, :33]  # a period-8 sequence, batch of 4
    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(lambda p: lm_loss(nnx.merge(graphdef, p), tokens))(params)
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes int and float
            updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    losses = []
    for _ in range(60):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    log_v = math.log(TINY["vocab_size"])
    print(f"Llama repeated-sequence overfit: loss {losses[0]:.3f} -> {losses[-1]:.3f}, "
          f"log(V) = {log_v:.3f}")
    assert abs(losses[0] - log_v) < 1.0
    assert losses[-1] < 0.3 * log_v


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_hidden_states_are_the_forward_pass(tie):
    cfg = LlamaConfig(**TINY, kv_heads=2, tie_embeddings=tie)
    model, tokens = Llama(cfg, rngs=nnx.Rngs(0)), _tokens((2, 7))
    states = model.hidden_states(tokens)
    normed = model.hidden_states(tokens, final_norm=True)
    assert len(states) == len(normed) == cfg.depth + 1
    np.testing.assert_array_equal(states[0], model.embed(tokens))
    for a, b in zip(states[:-1], normed[:-1]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(normed[-1], model.final_norm(states[-1]))
    np.testing.assert_array_equal(normed[-1], model.features(tokens))
    np.testing.assert_array_equal(model.logits(normed[-1]), model(tokens))
    with pytest.raises(ValueError, match="max_len"):
        model.hidden_states(jnp.zeros((1, cfg.max_len + 1), jnp.int32))
