"""Vision Transformer (ViT) whose every dense layer is a :class:`subspace_jax.nn.Linear`.

Images are cut into ``patch_size x patch_size`` patches, each flattened patch goes through
one ``Linear`` (``patch_embed``, the same map as the paper's strided convolution, but a
Linear kernel that the subspace rules can select), a learned CLS token is prepended and
learned position embeddings are added. Pre-LN blocks follow (LayerNorm -> multi-head
self-attention -> residual; LayerNorm -> GELU MLP -> residual), then a final LayerNorm and
the classification ``head`` on the CLS token.

Parameter paths (``'/'.join(map(str, path))`` over ``nnx.to_flat_state(nnx.state(model))``),
``N = (image_size // patch_size) ** 2`` patches, ``P = patch_size ** 2 * channels``::

    patch_embed/kernel (P, dim)          patch_embed/bias (dim,)
    cls_token (1, 1, dim)                pos_embed (1, 1 + N, dim)
    blocks/{i}/attn_norm/scale, bias     (dim,)
    blocks/{i}/attn/{q,k,v,o}/kernel     (dim, dim), .../bias (dim,)
    blocks/{i}/mlp_norm/scale, bias      (dim,)
    blocks/{i}/mlp/up/kernel             (dim, mlp_dim), .../bias
    blocks/{i}/mlp/down/kernel           (mlp_dim, dim), .../bias
    final_norm/scale, bias               (dim,)
    head/kernel (dim, num_classes)       head/bias (num_classes,)

Dtypes: Linear layers compute in ``config.dtype`` with parameters stored in
``config.param_dtype``; LayerNorm and softmax run in float32; logits are float32.

Dropout (``config.dropout``) sits after the embeddings, inside the MLP and on both residual
branches. It needs ``deterministic=False`` and an ``nnx.Rngs`` passed to the call; the model
itself holds no random state, so ``nnx.split`` gives only parameters.

References:
    Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image
    Recognition at Scale", arXiv 2010.11929.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from subspace_jax import nn as sjnn

__all__ = ["ViTConfig", "ViT", "patchify"]

_INT_FIELDS = (
    "image_size", "patch_size", "channels", "dim", "depth", "heads", "mlp_dim", "num_classes",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViTConfig:
    """Shape and dtype of a :class:`ViT`.

    Args:
        image_size: height and width of the (square) input images.
        patch_size: side of a square patch; must divide ``image_size``.
        channels: image channels (last axis of the NHWC input).
        dim: width of the residual stream.
        depth: number of transformer blocks.
        heads: attention heads; must divide ``dim``.
        mlp_dim: hidden width of the MLP.
        num_classes: number of output logits.
        dropout: dropout rate in ``[0, 1)``.
        dtype: computation dtype of the Linear layers and the residual stream.
        param_dtype: storage dtype of the parameters.

    Examples:
        >>> cfg = ViTConfig.digits()
        >>> cfg.num_patches, cfg.patch_features, cfg.head_dim
        (16, 4, 16)
        >>> ViTConfig.digits(heads=5)
        Traceback (most recent call last):
        ...
        ValueError: ViTConfig: heads=5 must divide dim=64
    """

    image_size: int
    patch_size: int
    channels: int = 3
    dim: int
    depth: int
    heads: int
    mlp_dim: int
    num_classes: int
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ViTConfig: {name}={value!r} must be a positive int")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ViTConfig: patch_size={self.patch_size} must divide "
                f"image_size={self.image_size}"
            )
        if self.dim % self.heads:
            raise ValueError(f"ViTConfig: heads={self.heads} must divide dim={self.dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ViTConfig: dropout={self.dropout!r} must lie in [0, 1)")
        for name in ("dtype", "param_dtype"):
            if not jnp.issubdtype(jnp.dtype(getattr(self, name)), jnp.floating):
                raise ValueError(f"ViTConfig: {name}={getattr(self, name)!r} must be a float dtype")

    @classmethod
    def digits(cls, **overrides) -> ViTConfig:
        """Preset for scikit-learn digits: 8x8x1 images, 2x2 patches, 10 classes.

        Args:
            **overrides: any field to change (e.g. ``patch_size=4``, ``dtype=jnp.bfloat16``).

        Returns:
            The config (dim 64, depth 4, 4 heads, MLP 128, no dropout unless overridden).
        """
        fields = dict(
            image_size=8, patch_size=2, channels=1, dim=64, depth=4, heads=4, mlp_dim=128,
            num_classes=10, dropout=0.0,
        )
        return cls(**(fields | overrides))

    @property
    def num_patches(self) -> int:
        """Number of patches ``(image_size // patch_size) ** 2``."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_features(self) -> int:
        """Length of one flattened patch, ``patch_size ** 2 * channels``."""
        return self.patch_size**2 * self.channels

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.heads


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """Cut NHWC images into flattened non-overlapping patches.

    Each patch is flattened in ``(row, column, channel)`` order, so a ``Linear`` kernel
    ``(p * p * C, dim)`` equals a ``p x p`` stride-``p`` convolution kernel ``(p, p, C, dim)``
    reshaped.

    Args:
        images: ``(B, H, W, C)``; ``patch_size`` must divide ``H`` and ``W``.
        patch_size: side ``p`` of a square patch.

    Returns:
        ``(B, (H // p) * (W // p), p * p * C)``, patches in row-major order.

    Examples:
        >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
        >>> patchify(x, 2)[0, 0]
        Array([0., 1., 4., 5.], dtype=float32)
        >>> patchify(x, 2).shape
        (1, 4, 4)
    """
    b, h, w, c = images.shape
    p = patch_size
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def _linear(config: ViTConfig, d_in: int, d_out: int, rngs: nnx.Rngs) -> sjnn.Linear:
    return sjnn.Linear(
        d_in, d_out, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs
    )


def _layer_norm(config: ViTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        config.dim, epsilon=1e-6, dtype=jnp.float32, param_dtype=config.param_dtype, rngs=rngs
    )


class SelfAttention(nnx.Module):
    """Multi-head self-attention without mask; ``q``, ``k``, ``v``, ``o`` are Linears."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.heads = config.heads
        self.head_dim = config.head_dim
        self.q = _linear(config, config.dim, config.dim, rngs)
        self.k = _linear(config, config.dim, config.dim, rngs)
        self.v = _linear(config, config.dim, config.dim, rngs)
        self.o = _linear(config, config.dim, config.dim, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, _ = x.shape
        q, k, v = (f(x).reshape(b, n, self.heads, self.head_dim) for f in (self.q, self.k, self.v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores * self.head_dim**-0.5, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return self.o(out.reshape(b, n, self.heads * self.head_dim))


class MLP(nnx.Module):
    """``down(dropout(gelu(up(x))))`` with exact GELU."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.up = _linear(config, config.dim, config.mlp_dim, rngs)
        self.down = _linear(config, config.mlp_dim, config.dim, rngs)
        self.dropout = nnx.Dropout(config.dropout)

    def __call__(self, x: jax.Array, *, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
        h = jax.nn.gelu(self.up(x), approximate=False)
        return self.down(self.dropout(h, deterministic=deterministic, rngs=rngs))


class Block(nnx.Module):
    """Pre-LN transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.dtype = config.dtype
        self.attn_norm = _layer_norm(config, rngs)
        self.attn = SelfAttention(config, rngs=rngs)
        self.mlp_norm = _layer_norm(config, rngs)
        self.mlp = MLP(config, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout)

    def __call__(self, x: jax.Array, *, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
        h = self.attn(self.attn_norm(x).astype(self.dtype))
        x = x + self.dropout(h, deterministic=deterministic, rngs=rngs)
        h = self.mlp(self.mlp_norm(x).astype(self.dtype), deterministic=deterministic, rngs=rngs)
        return x + self.dropout(h, deterministic=deterministic, rngs=rngs)


class ViT(nnx.Module):
    """Vision Transformer classifier (paths and dtypes in the module docstring).

    Args:
        config: the :class:`ViTConfig`.
        rngs: parameter initialisation keys.

    Examples:
        >>> model = ViT(ViTConfig.digits(depth=1), rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((2, 8, 8, 1))).shape
        (2, 10)
        >>> model.blocks[0].attn.q.kernel.shape
        (64, 64)

    References:
        Dosovitskiy et al., arXiv 2010.11929.
    """

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.patch_embed = _linear(config, config.patch_features, config.dim, rngs)
        init = nnx.initializers.normal(0.02)
        self.cls_token = nnx.Param(jnp.zeros((1, 1, config.dim), config.param_dtype))
        self.pos_embed = nnx.Param(
            init(rngs.params(), (1, 1 + config.num_patches, config.dim), config.param_dtype)
        )
        self.dropout = nnx.Dropout(config.dropout)
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.depth)])
        self.final_norm = _layer_norm(config, rngs)
        self.head = _linear(config, config.dim, config.num_classes, rngs)

    def __call__(
        self, images: jax.Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """Classify a batch of images.

        Args:
            images: ``(B, image_size, image_size, channels)``, any real dtype.
            deterministic: if False, apply dropout (needs ``rngs`` when ``dropout > 0``).
            rngs: dropout keys (stream ``dropout``, or ``default``).

        Returns:
            float32 logits ``(B, num_classes)``.
        """
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, cfg.channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"ViT: images shape {images.shape} is not (B, *{expected})")
        if not deterministic and cfg.dropout > 0 and rngs is None:
            raise ValueError(f"ViT: deterministic=False with dropout={cfg.dropout} needs rngs")
        x = self.patch_embed(patchify(images.astype(cfg.dtype), cfg.patch_size))
        cls = jnp.broadcast_to(self.cls_token[...].astype(cfg.dtype), (x.shape[0], 1, cfg.dim))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(cfg.dtype)
        x = self.dropout(x, deterministic=deterministic, rngs=rngs)
        for block in self.blocks:
            x = block(x, deterministic=deterministic, rngs=rngs)
        x = self.final_norm(x[:, 0]).astype(cfg.dtype)
        return self.head(x).astype(jnp.float32)
