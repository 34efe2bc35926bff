"""LittleBit QAT by distillation: the jitted step on tiny decoder and encoder models."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from subspace_jax import littlebit, train
from subspace_jax.littlebit import core, form, qat
from subspace_jax.models import bert, llama

STEPS = 25


@pytest.fixture(scope="module")
def decoder():
    cfg = llama.LlamaConfig(vocab_size=64, dim=64, depth=2, heads=4, kv_heads=2, max_len=16)
    teacher = llama.Llama(cfg, rngs=nnx.Rngs(0))
    student = littlebit.convert(teacher, littlebit.LittleBitRule(
        pattern=r"blocks/.*/kernel", bpw=1.0, strict=False, itq_iters=5))
    return teacher, student


@pytest.fixture(scope="module")
def trained(decoder):
    teacher, student = decoder
    tgraph, tstate = nnx.split(teacher)
    teacher_before = jax.tree.map(jnp.copy, tstate)
    return teacher_before, _run(student, qat.lm_loss_fn(tgraph), _tokens(STEPS), tstate)


def _run(student, loss_fn, batches, teacher_state, *, lr=1e-2, steps=STEPS):
    traces = []

    def counted(model, batch, key):
        traces.append(1)
        return loss_fn(model, batch, key)

    step, params, opt_state, rest, mask, graphdef = qat.setup(student, counted, optax.adam(lr))
    before = jax.tree.map(jnp.copy, params)
    params, _, rest, hist = train.fit(step, params, opt_state, rest,
                                      qat.with_teacher(batches, teacher_state), num_steps=steps,
                                      key=jax.random.key(0), progress=False, log_every=5)
    return before, params, rest, graphdef, mask, hist, len(traces)


def _tokens(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"tokens": rng.integers(0, 64, (4, 16)).astype(np.int32)} for _ in range(n)]


def test_losses_read_the_models_own_hidden_states(decoder):
    teacher, _ = decoder
    tokens = jnp.asarray(_tokens(1)[0]["tokens"])
    hidden = teacher.hidden_states(tokens, final_norm=True)
    assert len(hidden) == 3  # embedding + 2 blocks; the loss matches the 2 block outputs
    np.testing.assert_array_equal(teacher.logits(hidden[-1]), teacher(tokens))

    class NoWalk(nnx.Module):
        def __call__(self, tokens):
            return tokens

    batch = {"tokens": tokens, "teacher": nnx.state(NoWalk())}
    with pytest.raises(TypeError, match="NoWalk has no hidden_states"):
        qat.lm_loss_fn(nnx.graphdef(NoWalk()))(NoWalk(), batch, None)
    with pytest.raises(TypeError, match="qat.encoder_loss_fn: NoWalk has no hidden_states"):
        ids = jnp.ones((2, 4), jnp.int32)
        qat.encoder_loss_fn(nnx.graphdef(NoWalk()))(NoWalk(), {
            "input_ids": ids, "attention_mask": ids, "token_type_ids": ids,
            "teacher": nnx.state(NoWalk())}, None)


def test_decoder_qat_lowers_loss_freezes_embeddings_flips_signs_compiles_once(decoder, trained):
    teacher, student = decoder
    tgraph, tstate = nnx.split(teacher)
    teacher_before, (before, params, _, _, mask, hist, traces) = trained

    first, last = np.mean(hist.losses[:3]), np.mean(hist.losses[-3:])
    print(f"\ndistillation loss {first:.4f} -> {last:.4f}; kl {hist.metrics['kl'][0]:.4f} -> "
          f"{hist.metrics['kl'][-1]:.4f}")
    assert last < 0.85 * first
    assert traces == 1
    # Embeddings (tied: also the head) are frozen and never move; the forms, norms train.
    assert mask["embed"]["embedding"].get_value() is False
    assert mask["blocks"][0]["attn_norm"]["scale"].get_value() is True
    kmask = mask["blocks"][0]["mlp"]["up"]["kernel"].get_value()
    assert all(getattr(kmask, f) for f in ("u", "v", "h", "g", "lu", "lv"))
    np.testing.assert_array_equal(params["embed"]["embedding"].get_value(),
                                  before["embed"]["embedding"].get_value())
    flips = qat.sign_flips(before, params)
    total = sum(x.size for x in jax.tree.leaves(before) if x.ndim == 3)
    print(f"sign flips: {flips} of {total} latent entries")
    assert flips > 0
    # The teacher's buffers were neither donated nor changed.
    jax.tree.map(np.testing.assert_array_equal, nnx.state(teacher), teacher_before)

    # A fresh batch: the distilled student is closer to the teacher than the initial one.
    loss_fn = qat.lm_loss_fn(tgraph)
    batch = {"tokens": jnp.asarray(_tokens(1, seed=99)[0]["tokens"]), "teacher": tstate}
    graphdef, _, rest = train.split_model(student)
    held_loss = jax.jit(lambda p, b: loss_fn(nnx.merge(graphdef, p, rest), b, None)[0])
    held = [float(held_loss(p, batch)) for p in (before, params)]
    print(f"held-out distillation loss {held[0]:.4f} -> {held[1]:.4f}")
    assert held[1] < held[0]


def test_deploy_after_qat_uses_the_trained_signs(trained):
    _, (_, params, rest, graphdef, _, _, _) = trained
    packed = littlebit.deploy(params)
    is_form = lambda x: isinstance(x, (form.BinaryLowRank, form.PackedBinaryLowRank))  # noqa: E731
    pairs = list(zip(jax.tree.leaves(params, is_leaf=is_form),
                     jax.tree.leaves(packed, is_leaf=is_form)))
    pairs = [(t, p) for t, p in pairs if isinstance(t, form.BinaryLowRank)]
    assert len(pairs) == 2 * 7
    for t, p in pairs:
        fan_in, fan_out = t.matrix_shape
        for lat, bits, n in ((t.u, p.u_bits, fan_out), (t.v, p.v_bits, fan_in)):
            np.testing.assert_array_equal(core.unpack_signs(bits, n, axis=1, dtype=jnp.float32),
                                          jnp.where(lat >= 0, 1.0, -1.0))
    # The training form with the deployed (16-bit, fused) scales gives the deployed outputs.
    def round_scales(leaf):
        if not isinstance(leaf, form.BinaryLowRank):
            return leaf
        f16 = lambda x: x.astype(jnp.float16).astype(jnp.float32)  # noqa: E731
        return form.BinaryLowRank(u=leaf.u, v=leaf.v, h=f16(leaf.h), g=f16(leaf.g),
                                  lu=f16(leaf.lu * leaf.lv), lv=jnp.ones_like(leaf.lv),
                                  grad=leaf.grad, fold=leaf.fold)

    rounded = jax.tree.map(round_scales, params, is_leaf=is_form)
    tokens = jnp.asarray(_tokens(1, seed=5)[0]["tokens"])
    out_packed = nnx.merge(graphdef, packed, rest)(tokens)
    out_train = nnx.merge(graphdef, rounded, rest)(tokens)
    np.testing.assert_allclose(out_packed, out_train, rtol=1e-4, atol=1e-4)


def test_encoder_qat_lowers_loss_and_raises_cosine():
    cfg = bert.BertConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4,
                          intermediate_size=128, max_position_embeddings=16)
    teacher = bert.Bert(cfg, rngs=nnx.Rngs(0))
    student = littlebit.convert(teacher, littlebit.LittleBitRule(
        pattern=r"encoder/.*/kernel", bpw=1.0, strict=False, itq_iters=5))
    tgraph, tstate = nnx.split(teacher)
    rng = np.random.default_rng(0)

    def batch():
        ids = rng.integers(1, 64, (8, 12)).astype(np.int32)
        mask = (np.arange(12)[None] < rng.integers(4, 13, (8, 1))).astype(np.int32)
        return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": 0 * ids}

    batches = [batch() for _ in range(STEPS)]
    before, params, _, _, mask, hist, traces = _run(
        student, qat.encoder_loss_fn(tgraph), batches, tstate, lr=3e-3)
    cos = hist.metrics["cosine"]
    print(f"\nencoder loss {hist.losses[0]:.4f} -> {hist.losses[-1]:.4f}, cosine to teacher "
          f"{cos[0]:.4f} -> {cos[-1]:.4f}")
    assert traces == 1
    assert np.mean(hist.losses[-3:]) < 0.7 * np.mean(hist.losses[:3])
    assert np.mean(cos[-3:]) > np.mean(cos[:3])
    assert mask["embeddings"]["word"]["embedding"].get_value() is False
    for name in ("word", "position"):
        np.testing.assert_array_equal(params["embeddings"][name]["embedding"].get_value(),
                                      before["embeddings"][name]["embedding"].get_value())


def test_identical_student_has_zero_loss_and_padding_is_ignored():
    cfg = bert.BertConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=2,
                          intermediate_size=32, max_position_embeddings=8)
    teacher = bert.Bert(cfg, rngs=nnx.Rngs(0))
    other = bert.Bert(cfg, rngs=nnx.Rngs(1))
    tgraph, tstate = nnx.split(teacher)
    ids = jnp.array([[2, 5, 7, 0], [3, 4, 0, 0], [9, 9, 9, 9]])
    b = {"input_ids": ids, "attention_mask": (ids > 0).astype(jnp.int32),
         "token_type_ids": jnp.zeros_like(ids), "teacher": tstate}
    loss_fn = qat.encoder_loss_fn(tgraph)
    assert abs(float(loss_fn(teacher, b, None)[0])) < 1e-5
    base = float(loss_fn(other, b, None)[1]["hidden"])
    # Changing padded tokens changes nothing (the attention mask hides them everywhere).
    padded = {**b, "input_ids": jnp.where(ids > 0, ids, 17)}
    assert float(loss_fn(other, padded, None)[1]["hidden"]) == pytest.approx(base, rel=1e-6)
