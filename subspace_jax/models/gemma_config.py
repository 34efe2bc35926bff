"""Configuration of :class:`subspace_jax.models.gemma.Gemma`: shapes, layer pattern, dtypes.

The defaults are Gemma 3 270M. The layer pattern (``global_every``), the local RoPE base
and the query scale are not stored in a GGUF file, so they live here (and
``tests/test_gemma.py`` guards their values).

References:
    Gemma Team, "Gemma 3 Technical Report", arXiv 2503.19786.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

__all__ = ["GemmaConfig"]

_INT_FIELDS = ("vocab_size", "dim", "depth", "heads", "kv_heads", "head_dim", "mlp_hidden",
               "max_len", "sliding_window", "global_every")
_POSITIVE = ("local_rope_theta", "global_rope_theta", "query_pre_attn_scalar", "norm_eps")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmaConfig:
    """Shape, layer pattern and dtypes of a :class:`~subspace_jax.models.gemma.Gemma`;
    the defaults are Gemma 3 270M.

    Args:
        vocab_size: number of tokens.
        dim: width of the residual stream.
        depth: number of blocks.
        heads: query heads.
        kv_heads: key/value heads; must divide ``heads``.
        head_dim: width of one head (need not be ``dim // heads``; even, for RoPE).
        mlp_hidden: GeGLU hidden width.
        max_len: longest sequence accepted.
        sliding_window: keys a local layer sees, the query's own included.
        global_every: layer ``i`` is global iff ``i % global_every == global_every - 1``.
        local_rope_theta: RoPE base of the local layers (not in the GGUF metadata).
        global_rope_theta: RoPE base of the global layers.
        query_pre_attn_scalar: scores are scaled by its ``-1/2`` power (not in the GGUF).
        norm_eps: RMSNorm epsilon.
        dtype: computation dtype (Linears, embedding output, residual stream).
        param_dtype: storage dtype of the parameters.

    Examples:
        >>> cfg = GemmaConfig()
        >>> cfg.global_layers, cfg.query_scale, cfg.num_params()
        ((5, 11, 17), 0.0625, 268098176)
        >>> GemmaConfig.tiny().layer_types
        ('local', 'local', 'global')
        >>> GemmaConfig(heads=4, kv_heads=3)
        Traceback (most recent call last):
        ...
        ValueError: GemmaConfig: kv_heads=3 must divide heads=4
    """

    vocab_size: int = 262_144
    dim: int = 640
    depth: int = 18
    heads: int = 4
    kv_heads: int = 1
    head_dim: int = 256
    mlp_hidden: int = 2048
    max_len: int = 32_768
    sliding_window: int = 512
    global_every: int = 6
    local_rope_theta: float = 10_000.0
    global_rope_theta: float = 1_000_000.0
    query_pre_attn_scalar: float = 256.0
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GemmaConfig: {name}={value!r} must be a positive int")
        if self.heads % self.kv_heads:
            raise ValueError(
                f"GemmaConfig: kv_heads={self.kv_heads} must divide heads={self.heads}")
        if self.head_dim % 2:
            raise ValueError(f"GemmaConfig: head_dim={self.head_dim} must be even (RoPE pairs)")
        for name in _POSITIVE:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"GemmaConfig: {name}={value!r} must be a positive number")
        for name in ("dtype", "param_dtype"):
            if not jnp.issubdtype(jnp.dtype(getattr(self, name)), jnp.floating):
                raise ValueError(f"GemmaConfig: {name}={getattr(self, name)!r} must be float")

    @classmethod
    def tiny(cls, **overrides) -> GemmaConfig:
        """A small random-model config for tests: 3 layers (local, local, global), GQA 4:2.

        Args:
            **overrides: any field.

        Returns:
            ``vocab_size=128, dim=32, depth=3, heads=4, kv_heads=2, head_dim=8,
            mlp_hidden=64, max_len=64, sliding_window=4, global_every=3`` plus overrides.

        Examples:
            >>> GemmaConfig.tiny(depth=6).global_layers
            (2, 5)
        """
        fields = dict(vocab_size=128, dim=32, depth=3, heads=4, kv_heads=2, head_dim=8,
                      mlp_hidden=64, max_len=64, sliding_window=4, global_every=3)
        return cls(**(fields | overrides))

    def is_global(self, layer: int) -> bool:
        """Whether block ``layer`` attends globally (else through the sliding window)."""
        return layer % self.global_every == self.global_every - 1

    @property
    def layer_types(self) -> tuple[str, ...]:
        """``'local'`` or ``'global'`` for every block."""
        return tuple("global" if self.is_global(i) else "local" for i in range(self.depth))

    @property
    def global_layers(self) -> tuple[int, ...]:
        """Indices of the global blocks."""
        return tuple(i for i in range(self.depth) if self.is_global(i))

    def rope_theta(self, layer: int) -> float:
        """RoPE base of block ``layer``."""
        return self.global_rope_theta if self.is_global(layer) else self.local_rope_theta

    def window(self, layer: int) -> int | None:
        """Sliding window of block ``layer``; None for a global block."""
        return None if self.is_global(layer) else self.sliding_window

    @property
    def query_scale(self) -> float:
        """The factor on attention scores, ``query_pre_attn_scalar ** -0.5``."""
        return float(self.query_pre_attn_scalar) ** -0.5

    def num_params(self, *, embeddings: bool = True) -> int:
        """Parameter count from the config, without building the model.

        Args:
            embeddings: if False, leave out the (tied) token embedding.

        Returns:
            The number of scalar parameters.
        """
        d, hd = self.dim, self.head_dim
        attn = 2 * d * self.heads * hd + 2 * d * self.kv_heads * hd + 2 * hd
        block = attn + 3 * d * self.mlp_hidden + 4 * d
        body = self.depth * block + d
        return body + (self.vocab_size * d if embeddings else 0)
