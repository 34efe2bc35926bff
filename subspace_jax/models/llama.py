"""Llama-style decoder whose every dense layer is a :class:`subspace_jax.nn.Linear`.

Token embedding, then pre-norm blocks (RMSNorm -> causal self-attention with rotary
position embeddings and optional grouped-query attention -> residual; RMSNorm -> SwiGLU
MLP -> residual), a final RMSNorm and the output projection: either tied (logits
``x @ embedding.T``, no extra parameters, not a Linear) or an untied ``head`` Linear. No
Linear has a bias.

Parameter paths (``'/'.join(map(str, path))`` over ``nnx.to_flat_state(nnx.state(model))``),
``hd = dim // heads``, ``F = config.hidden_dim``::

    embed/embedding (vocab_size, dim)
    blocks/{i}/attn_norm/scale           (dim,)
    blocks/{i}/attn/q/kernel             (dim, heads * hd)
    blocks/{i}/attn/k/kernel             (dim, kv_heads * hd)
    blocks/{i}/attn/v/kernel             (dim, kv_heads * hd)
    blocks/{i}/attn/o/kernel             (heads * hd, dim)
    blocks/{i}/mlp_norm/scale            (dim,)
    blocks/{i}/mlp/gate/kernel           (dim, F)
    blocks/{i}/mlp/up/kernel             (dim, F)
    blocks/{i}/mlp/down/kernel           (F, dim)
    final_norm/scale                     (dim,)
    head/kernel (dim, vocab_size)        only when tie_embeddings=False

RoPE uses the *rotate-half* layout (GPT-NeoX / Hugging Face Llama): the head vector is split
into halves ``(x1, x2)`` and pair ``i`` is ``(x1[i], x2[i])`` rotated by angle
``pos * theta ** (-2 i / hd)``. Meta's original checkpoints use interleaved pairs
``(x[2i], x[2i+1])``; loading them needs the usual permutation of q/k output columns.

Dtypes: Linear layers, the embedding and the residual stream use ``config.dtype``; parameters
are stored in ``config.param_dtype``; RMSNorm, RoPE, attention scores and softmax run in
float32; logits are float32.

References:
    Touvron et al., "LLaMA: Open and Efficient Foundation Language Models", arXiv 2302.13971.
    Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding",
    arXiv 2104.09864. Shazeer, "GLU Variants Improve Transformer", arXiv 2002.05202.
    Zhang and Sennrich, "Root Mean Square Layer Normalization", arXiv 1910.07467.
    Ainslie et al., "GQA", arXiv 2305.13245.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from subspace_jax import nn as sjnn

__all__ = ["LlamaConfig", "Llama", "apply_rope", "lm_loss", "PRESETS"]

# name -> (dim, depth, heads); names give the approximate non-embedding parameter count.
PRESETS: dict[str, tuple[int, int, int]] = {
    "1m": (128, 5, 4),
    "5m": (256, 6, 4),
    "20m": (384, 11, 6),
    "100m": (768, 14, 12),
}

_INT_FIELDS = ("vocab_size", "dim", "depth", "heads", "max_len")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Shape and dtype of a :class:`Llama`.

    Args:
        vocab_size: number of tokens.
        dim: width of the residual stream.
        depth: number of blocks.
        heads: query heads; must divide ``dim`` with an even head width (RoPE pairs).
        kv_heads: key/value heads (grouped-query attention); must divide ``heads``.
            ``None`` means ``heads`` (plain multi-head attention).
        mlp_hidden: SwiGLU hidden width; ``None`` means ``8/3 * dim`` rounded up to a
            multiple of 64 (see :attr:`hidden_dim`).
        max_len: longest sequence accepted (RoPE has no table, so no parameters depend on it).
        rope_theta: RoPE base.
        norm_eps: RMSNorm epsilon.
        tie_embeddings: if True the output projection is the transposed token embedding.
        dtype: computation dtype (Linears, embedding output, residual stream).
        param_dtype: storage dtype of the parameters.

    Examples:
        >>> cfg = LlamaConfig(vocab_size=64, dim=48, depth=2, heads=4, kv_heads=2)
        >>> cfg.head_dim, cfg.hidden_dim, cfg.num_params()
        (12, 128, 54000)
        >>> LlamaConfig(vocab_size=64, dim=48, depth=2, heads=4, kv_heads=3)
        Traceback (most recent call last):
        ...
        ValueError: LlamaConfig: kv_heads=3 must divide heads=4
    """

    vocab_size: int
    dim: int
    depth: int
    heads: int
    kv_heads: int | None = None
    mlp_hidden: int | None = None
    max_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for name in _INT_FIELDS + ("kv_heads", "mlp_hidden"):
            value = getattr(self, name)
            if name in ("kv_heads", "mlp_hidden") and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LlamaConfig: {name}={value!r} must be a positive int")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(
                f"LlamaConfig: heads={self.heads} must divide dim={self.dim} into an even "
                "head width (RoPE rotates pairs)"
            )
        if self.heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig: kv_heads={self.kv_heads} must divide heads={self.heads}"
            )
        for name in ("rope_theta", "norm_eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LlamaConfig: {name}={getattr(self, name)!r} must be > 0")
        for name in ("dtype", "param_dtype"):
            if not jnp.issubdtype(jnp.dtype(getattr(self, name)), jnp.floating):
                raise ValueError(f"LlamaConfig: {name}={getattr(self, name)!r} must be float")

    @classmethod
    def preset(cls, name: str, *, vocab_size: int, **overrides) -> LlamaConfig:
        """A named size; the name is the approximate non-embedding parameter count.

        Args:
            name: one of ``'1m'`` (dim 128, depth 5), ``'5m'`` (256, 6), ``'20m'`` (384, 11),
                ``'100m'`` (768, 14); head width 32 for ``'1m'``, 64 otherwise.
            vocab_size: number of tokens.
            **overrides: any other field (``kv_heads``, ``tie_embeddings``, ``dtype``, ...).

        Returns:
            The config.

        Examples:
            >>> cfg = LlamaConfig.preset('5m', vocab_size=256)
            >>> cfg.dim, cfg.depth, cfg.heads, cfg.num_params(embeddings=False)
            (256, 6, 4, 4820224)
        """
        if name not in PRESETS:
            raise ValueError(f"LlamaConfig.preset: name={name!r} not in {sorted(PRESETS)}")
        dim, depth, heads = PRESETS[name]
        fields = dict(vocab_size=vocab_size, dim=dim, depth=depth, heads=heads)
        return cls(**(fields | overrides))

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``dim // heads``."""
        return self.dim // self.heads

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads, ``kv_heads`` or ``heads`` when unset."""
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden width: ``mlp_hidden`` or ``8/3 * dim`` rounded up to 64."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return -(-8 * self.dim // (3 * 64)) * 64

    def num_params(self, *, embeddings: bool = True) -> int:
        """Parameter count computed from the config, without building the model.

        Args:
            embeddings: if False, leave out the token embedding and the untied head
                (the "non-embedding" count of Kaplan et al., arXiv 2001.08361).

        Returns:
            The number of scalar parameters.
        """
        d, hd = self.dim, self.head_dim
        attn = 2 * d * self.heads * hd + 2 * d * self.num_kv_heads * hd
        block = attn + 3 * d * self.hidden_dim + 2 * d
        body = self.depth * block + d
        if not embeddings:
            return body
        head = 0 if self.tie_embeddings else d * self.vocab_size
        return body + self.vocab_size * d + head


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float = 10000.0) -> jax.Array:
    """Rotary position embedding, rotate-half layout, computed in float32.

    Args:
        x: ``(..., T, H, D)`` with even ``D``.
        positions: integer positions broadcastable to ``x.shape[:-2]``, e.g. ``(T,)``.
        theta: RoPE base.

    Returns:
        ``x`` rotated, same shape and dtype. ``<rope(q, m), rope(k, n)>`` depends on
        ``m - n`` only.

    Examples:
        >>> q = jnp.ones((1, 3, 1, 4))
        >>> apply_rope(q, jnp.arange(3)).shape
        (1, 3, 1, 4)
        >>> bool(jnp.allclose(apply_rope(q, jnp.zeros(3, int)), q))
        True

    References:
        Su et al., arXiv 2104.09864.
    """
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (..., T, D/2)
    cos, sin = jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _linear(config: LlamaConfig, d_in: int, d_out: int, rngs: nnx.Rngs) -> sjnn.Linear:
    return sjnn.Linear(
        d_in, d_out, use_bias=False, dtype=config.dtype, param_dtype=config.param_dtype,
        rngs=rngs,
    )


def _rms_norm(config: LlamaConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(
        config.dim, epsilon=config.norm_eps, dtype=jnp.float32,
        param_dtype=config.param_dtype, rngs=rngs,
    )


class CausalSelfAttention(nnx.Module):
    """Causal grouped-query attention with RoPE; ``q``, ``k``, ``v``, ``o`` are Linears.

    Query head ``h`` reads key/value head ``h // (heads // kv_heads)``.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.heads, self.kv_heads = config.heads, config.num_kv_heads
        self.head_dim, self.theta = config.head_dim, config.rope_theta
        hd = config.head_dim
        self.q = _linear(config, config.dim, self.heads * hd, rngs)
        self.k = _linear(config, config.dim, self.kv_heads * hd, rngs)
        self.v = _linear(config, config.dim, self.kv_heads * hd, rngs)
        self.o = _linear(config, self.heads * hd, config.dim, rngs)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        kv, group, hd = self.kv_heads, self.heads // self.kv_heads, self.head_dim
        q = apply_rope(self.q(x).reshape(b, t, self.heads, hd), positions, theta=self.theta)
        k = apply_rope(self.k(x).reshape(b, t, kv, hd), positions, theta=self.theta)
        v = self.v(x).reshape(b, t, kv, hd)
        q = q.reshape(b, t, kv, group, hd)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))
        scores = jnp.where(causal, scores * hd**-0.5, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v)
        return self.o(out.reshape(b, t, self.heads * hd))


class SwiGLU(nnx.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.gate = _linear(config, config.dim, config.hidden_dim, rngs)
        self.up = _linear(config, config.dim, config.hidden_dim, rngs)
        self.down = _linear(config, config.hidden_dim, config.dim, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    """Pre-norm decoder block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.dtype = config.dtype
        self.attn_norm = _rms_norm(config, rngs)
        self.attn = CausalSelfAttention(config, rngs=rngs)
        self.mlp_norm = _rms_norm(config, rngs)
        self.mlp = SwiGLU(config, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x).astype(self.dtype), positions)
        return x + self.mlp(self.mlp_norm(x).astype(self.dtype))


class Llama(nnx.Module):
    """Llama-style causal language model (paths and dtypes in the module docstring).

    Args:
        config: the :class:`LlamaConfig`.
        rngs: parameter initialisation keys.

    Examples:
        >>> cfg = LlamaConfig(vocab_size=64, dim=32, depth=2, heads=4, kv_heads=2)
        >>> model = Llama(cfg, rngs=nnx.Rngs(0))
        >>> logits = model(jnp.zeros((2, 5), jnp.int32))
        >>> logits.shape, logits.dtype
        ((2, 5, 64), dtype('float32'))
        >>> model.blocks[1].attn.k.kernel.shape
        (32, 16)

    References:
        Touvron et al., arXiv 2302.13971.
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Embed(
            config.vocab_size, config.dim, dtype=config.dtype, param_dtype=config.param_dtype,
            rngs=rngs,
        )
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.depth)])
        self.final_norm = _rms_norm(config, rngs)
        if not config.tie_embeddings:
            self.head = _linear(config, config.dim, config.vocab_size, rngs)

    def hidden_states(self, tokens: jax.Array, *, final_norm: bool = False
                      ) -> tuple[jax.Array, ...]:
        """The residual stream after the embedding and after every block.

        The forward pass itself: :meth:`features` and ``__call__`` run it.

        Args:
            tokens: integer ``(B, T)`` with ``T <= max_len``.
            final_norm: apply the final RMSNorm to the last entry (it is then
                :meth:`features`), as Hugging Face's ``output_hidden_states`` does; LittleBit's
                QAT (:func:`subspace_jax.littlebit.qat.lm_loss_fn`) matches these.

        Returns:
            ``depth + 1`` arrays ``(B, T, dim)`` in ``config.dtype``: index 0 is the
            embedding, index ``i`` the output of block ``i - 1``.

        Examples:
            >>> model = Llama(LlamaConfig(vocab_size=32, dim=16, depth=2, heads=2),
            ...               rngs=nnx.Rngs(0))
            >>> tokens = jnp.ones((2, 5), jnp.int32)
            >>> states = model.hidden_states(tokens, final_norm=True)
            >>> len(states), states[-1].shape
            (3, (2, 5, 16))
            >>> bool(jnp.array_equal(model.logits(states[-1]), model(tokens)))
            True
        """
        cfg = self.config
        if tokens.ndim != 2 or tokens.shape[1] > cfg.max_len:
            raise ValueError(
                f"Llama: tokens shape {tokens.shape} must be (B, T <= max_len={cfg.max_len})"
            )
        positions = jnp.arange(tokens.shape[1])
        states = [self.embed(tokens)]
        for block in self.blocks:
            states.append(block(states[-1], positions))
        if final_norm:
            states[-1] = self.final_norm(states[-1]).astype(cfg.dtype)
        return tuple(states)

    def features(self, tokens: jax.Array) -> jax.Array:
        """Final-normed hidden states ``(B, T, dim)`` in ``config.dtype`` (the logits' input).

        Examples:
            >>> model = Llama(LlamaConfig(vocab_size=32, dim=16, depth=1, heads=2),
            ...               rngs=nnx.Rngs(0))
            >>> model.features(jnp.ones((1, 3), jnp.int32)).shape
            (1, 3, 16)
        """
        return self.hidden_states(tokens, final_norm=True)[-1]

    def logits(self, features: jax.Array) -> jax.Array:
        """float32 logits ``(..., vocab_size)`` of final-normed ``features`` (tied or ``head``).

        Examples:
            >>> model = Llama(LlamaConfig(vocab_size=32, dim=16, depth=1, heads=2),
            ...               rngs=nnx.Rngs(0))
            >>> model.logits(jnp.ones((3, 16))).shape
            (3, 32)
        """
        out = self.embed.attend(features) if self.config.tie_embeddings else self.head(features)
        return out.astype(jnp.float32)

    def __call__(self, tokens: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """Next-token logits, ``logits(features(tokens))``.

        Args:
            tokens: integer ``(B, T)`` with ``T <= max_len``.
            deterministic: accepted so training loops call every model alike; this model has
                no dropout, so it changes nothing.

        Returns:
            float32 logits ``(B, T, vocab_size)``; position ``t`` sees tokens ``0..t`` only.
        """
        del deterministic
        return self.logits(self.features(tokens))


def lm_loss(model: Llama, tokens: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy.

    Args:
        model: a :class:`Llama` (or any callable mapping ``(B, T)`` tokens to logits).
        tokens: integer ``(B, T + 1)``; inputs are ``tokens[:, :-1]``, targets
            ``tokens[:, 1:]``.

    Returns:
        Scalar float32 loss in nats.

    Examples:
        Uniform logits over 8 tokens cost ``log 8`` nats:

        >>> uniform = lambda tokens: jnp.zeros(tokens.shape + (8,))
        >>> round(float(lm_loss(uniform, jnp.ones((2, 6), jnp.int32))), 4)
        2.0794
    """
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
