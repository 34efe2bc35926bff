"""Small models the library did not write, for the "every method on any Flax model" tests.

Each :class:`Case` is built only from flax's own modules (linen and NNX) or Hugging Face's
``FlaxBertModel`` (random init from a ``BertConfig``, no download) and exposes one shape:
the parameter tree, ``apply(params, x)`` that runs the model's *own* code on a tree, a sample
input, the kernels' ``in_axes`` from :func:`subspace_jax.nn.kernel_axes`, and a regex that
selects every kernel. A test converts ``case.params`` with a method's transform and runs
``case.apply`` on the result inside :func:`subspace_jax.nn.intercept` (the shared train step
opens it itself: use ``train.make_train_step(None, case.loss, tx)``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import subspace_jax as sj

D = 16  # width of every case; heads 2, head_dim 8


@dataclasses.dataclass
class Case:
    """One model: ``apply(params, x)`` runs its own code; ``params`` is what transforms take."""

    name: str
    params: Any
    apply: Callable[[Any, jax.Array], jax.Array]
    x: jax.Array
    axes: dict[str, tuple[int, ...]]
    pattern: str = r".*kernel"
    mlp_pattern: str | None = None  # kernels of an 'mlp' module (for MLP-only methods)

    def loss(self, params: Any, batch: jax.Array, key: jax.Array) -> jax.Array:
        """A scalar for the shared train step with ``graphdef=None``."""
        y = self.apply(params, batch)
        return jnp.mean(jnp.square(y.astype(jnp.float32)))

    def train_step(self, tree: Any, tx: Any = None) -> tuple[Any, dict[str, jax.Array]]:
        """One jitted step of the shared train step on ``tree`` (graphdef None: the model's
        own apply; frozen fields masked); returns the new tree and the metrics."""
        tx = optax.adam(1e-2) if tx is None else tx
        mask = sj.train.trainable_mask(tree)
        step = sj.train.make_train_step(None, self.loss, tx, mask=mask, donate=False)
        new, _, _, metrics = step(tree, sj.train.init_optimizer(tx, tree, mask), {}, self.x,
                                  jax.random.key(0))
        assert bool(jnp.isfinite(metrics["loss"])), f"{self.name}: loss {metrics['loss']}"
        return new, metrics

    @property
    def dense_out(self) -> jax.Array:
        return self.apply(self.params, self.x)


def _x(shape=(2, 5, D)) -> jax.Array:
    return jax.random.normal(jax.random.key(1), shape)


def _linen(name: str, module: nn.Module, x: jax.Array) -> Case:
    params = module.init(jax.random.key(0), x)["params"]
    return Case(name, params, lambda p, x: module.apply({"params": p}, x), x,
                sj.nn.kernel_axes(module, x))


def _nnx(name: str, model: nnx.Module, x: jax.Array, *, adopt: bool = False,
         mlp_pattern: str | None = None) -> Case:
    axes = sj.nn.kernel_axes(model)
    if adopt:
        model = sj.adopt(model)
    graphdef, params, rest = sj.train.split_model(model)
    return Case(name, params, lambda p, x: nnx.merge(graphdef, p, rest)(x), x, axes,
                mlp_pattern=mlp_pattern)


class Block(nnx.Module):
    """A pre-norm transformer block made only of flax modules."""

    def __init__(self, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(2, D, qkv_features=D, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(D, rngs=rngs)
        self.mlp = nnx.Sequential(nnx.Linear(D, 4 * D, rngs=rngs), jax.nn.gelu,
                                  nnx.Linear(4 * D, D, rngs=rngs))

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _bert() -> Case:
    from transformers import BertConfig, FlaxBertModel

    cfg = BertConfig(vocab_size=50, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=4 * D, max_position_embeddings=12)
    bert = FlaxBertModel(cfg, seed=0)
    ids = jax.random.randint(jax.random.key(2), (2, 6), 0, 50)
    def apply(p, ids):
        with jax.numpy_dtype_promotion("standard"):  # Hugging Face's code is not strict-safe
            return bert(ids, params=p).last_hidden_state

    return Case("hf_bert", bert.params, apply, ids, {},
                pattern=r".*layer/.*kernel",
                mlp_pattern=r".*layer/\d+/(intermediate|output)/dense/kernel")


BUILDERS: dict[str, Callable[[], Case]] = {
    "linen_dense": lambda: _linen("linen_dense", nn.Dense(12), _x()),
    "linen_dense_general": lambda: _linen("linen_dense_general", nn.DenseGeneral((2, 8)),
                                          _x()),
    "linen_einsum": lambda: _linen("linen_einsum", nn.Einsum((2, D, 8), "btd,ndh->btnh"),
                                   _x()),
    "linen_mha": lambda: _linen("linen_mha", nn.MultiHeadDotProductAttention(
        num_heads=2, qkv_features=D), _x()),
    "nnx_linear": lambda: _nnx("nnx_linear", nnx.Linear(D, 12, rngs=nnx.Rngs(0)), _x()),
    "nnx_linear_adopted": lambda: _nnx("nnx_linear_adopted",
                                       nnx.Linear(D, 12, rngs=nnx.Rngs(0)), _x(), adopt=True),
    "nnx_linear_general": lambda: _nnx("nnx_linear_general", nnx.LinearGeneral(
        D, (2, 8), rngs=nnx.Rngs(0)), _x()),
    "nnx_einsum": lambda: _nnx("nnx_einsum", nnx.Einsum("btd,ndh->btnh", (2, D, 8),
                                                        rngs=nnx.Rngs(0)), _x()),
    "nnx_mha": lambda: _nnx("nnx_mha", nnx.MultiHeadAttention(
        2, D, qkv_features=D, decode=False, rngs=nnx.Rngs(0)), _x()),
    "nnx_block": lambda: _nnx("nnx_block", Block(nnx.Rngs(0)), _x(),
                              mlp_pattern=sj.rules.MLP_PATTERN),
    "hf_bert": _bert,
}
NAMES = tuple(BUILDERS)


@functools.cache
def build(name: str) -> Case:
    """The case ``name`` (built once per test session; never mutate it)."""
    return BUILDERS[name]()
