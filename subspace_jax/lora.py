"""LoRA, the usual efficient fine-tuning baseline every method is compared with.

A :class:`LoRA` kernel form holds the frozen pretrained kernel ``w`` and two
trainable factors: ``x @ kernel = x @ w + scale * (x @ a) @ b`` with ``b``
initialised to zero, so the adapted model starts equal to the pretrained one.
``w`` sits behind ``jax.lax.stop_gradient``: its gradient is an exact zero that
XLA never computes, so the dense ``dW`` matmul of full fine-tuning disappears.
``LoRA.frozen_fields`` names ``w``, so :func:`subspace_jax.train.trainable_mask` keeps the
optimizer off it (no moments); pass ``train=`` rules there to freeze the rest of the
model too, as the LoRA baseline does.

References:
    Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from subspace_jax import forms
from subspace_jax import rules as rules_lib

__all__ = ["LoRA", "LoRARule", "add_lora", "recipe"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRA(forms.KernelForm):
    """A frozen dense kernel plus a trainable low-rank update ``scale * a @ b``.

    Attributes:
        w: ``(in, out)`` frozen base kernel.
        a: ``(in, rank)`` down factor (random init).
        b: ``(rank, out)`` up factor (zero init).
        scale: ``alpha / rank`` (static).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import lora
        >>> k = lora.LoRA.init(jax.random.key(0), jnp.ones((6, 4)), rank=2, alpha=4.0)
        >>> k.a.shape, k.b.shape, k.scale, bool((k.materialize() == 1).all())
        ((6, 2), (2, 4), 2.0, True)
    """

    w: jax.Array
    a: jax.Array
    b: jax.Array
    scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))

    frozen_fields = ("w",)

    @classmethod
    def init(cls, key: jax.Array, w: jax.Array, *, rank: int, alpha: float | None = None,
             in_axes: int | tuple[int, ...] | None = None) -> "LoRA":
        """Wrap ``w`` with a rank-``rank`` adapter (Kaiming-uniform ``a``, zero ``b``).

        Args:
            key: PRNG key for ``a``.
            w: dense ``(in, out)`` kernel.
            rank: adapter rank, ``1 <= rank <= min(in, out)``.
            alpha: scaling numerator (``scale = alpha / rank``); default ``rank`` (scale 1).
            in_axes: for an N-D kernel, the axes that contract with the input
                (:class:`subspace_jax.forms.Fold`); ``w`` is stored as its folded matrix.

        Raises:
            ValueError: for a kernel of fewer than 2 axes, an N-D kernel without
                ``in_axes``, or a rank out of range.
        """
        if getattr(w, "ndim", 0) < 2:
            raise ValueError(f"expected an (in, out) or N-D kernel, got shape {tuple(jnp.shape(w))}")
        w, fold = forms.fold_kernel(w, in_axes)
        if not isinstance(rank, int) or not 1 <= rank <= min(w.shape):
            raise ValueError(f"LoRA rank must be an int in [1, {min(w.shape)}] for {w.shape}, got {rank!r}")
        bound = (1.0 / w.shape[0]) ** 0.5
        a = jax.random.uniform(key, (w.shape[0], rank), jnp.float32, -bound, bound).astype(w.dtype)
        b = jnp.zeros((rank, w.shape[1]), w.dtype)
        return cls(w=w, a=a, b=b, scale=float(alpha if alpha is not None else rank) / rank,
                   fold=fold)

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return (int(self.w.shape[0]), int(self.w.shape[1]))

    @property
    def dtype(self) -> Any:
        return self.w.dtype

    def matrix(self) -> jax.Array:
        delta = jnp.matmul(self.a, self.b) * jnp.asarray(self.scale, self.a.dtype)
        return self.w + delta.astype(self.w.dtype)

    def matmul(self, x: jax.Array, *, dtype: Any = None, precision: Any = None,
               dot_general: Callable | None = None) -> jax.Array:
        w = forms.stop_gradient(self.w)
        x, w, a, b = forms.promote((x, w, self.a, self.b), dtype)
        kw = dict(precision=precision, dot_general=dot_general)
        low = forms.dot(forms.dot(x, a, **kw), b, **kw)
        return forms.dot(x, w, **kw) + low * jnp.asarray(self.scale, low.dtype)

    @property
    def nbytes(self) -> int:
        return sum(forms.nbytes(x) for x in (self.w, self.a, self.b))

    def flops(self, tokens: int) -> int:
        fan_in, fan_out = self.matrix_shape
        return 2 * int(tokens) * (fan_in * fan_out + self.rank * (fan_in + fan_out))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRARule(rules_lib.Rule):
    """Wrap matched ``(in, out)`` kernels in a :class:`LoRA` adapter.

    Attributes:
        rank: adapter rank.
        alpha: scaling numerator (``scale = alpha / rank``); ``None`` means ``rank``.

    Examples:
        >>> from subspace_jax import lora
        >>> lora.LoRARule(pattern=".*/attn/(q|v)/kernel", rank=8, alpha=16.0).describe()
        'LoRARule(rank=8, alpha=16.0)'
    """

    # --- behaviour ---
    # Adapter rank.
    rank: int = 8
    # Scaling numerator; the update is multiplied by alpha / rank.
    alpha: float | None = None


def add_lora(
    tree: Any, rules: rules_lib.Rule | Sequence[rules_lib.Rule], *, key: jax.Array,
    allow_unused: bool = False,
) -> Any:
    """Wrap the kernels selected by ``rules`` in :class:`LoRA` adapters.

    Args:
        tree: an ``nnx.State``, a nested dict or linen variables.
        rules: :class:`LoRARule` objects (and skip rules); first match wins.
        key: PRNG key; each adapter gets ``fold_in(key, i)`` for its index ``i``.
        allow_unused: do not raise for rules that match nothing.

    Returns:
        The tree with :class:`LoRA` leaves; ``transforms.materialize`` merges them back.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import lora
        >>> params = {"q": {"kernel": jnp.ones((8, 8))}, "o": {"kernel": jnp.ones((8, 8))}}
        >>> out = lora.add_lora(params, lora.LoRARule(pattern="q/kernel", rank=2), key=jax.random.key(0))
        >>> type(out["q"]["kernel"]).__name__, type(out["o"]["kernel"]).__name__
        ('LoRA', 'ArrayImpl')
    """
    counter = itertools.count()

    def wrap(path: str, kernel: Any, rule: rules_lib.Rule) -> LoRA:
        if not isinstance(rule, LoRARule):
            raise TypeError(f"add_lora needs LoRARule rules, got {type(rule).__name__}")
        return LoRA.init(jax.random.fold_in(key, next(counter)), kernel, rank=rule.rank,
                         alpha=rule.alpha, in_axes=rule.in_axes)

    return rules_lib.apply(tree, rules, wrap, allow_unused=allow_unused)


def recipe(rules: LoRARule | Sequence[rules_lib.Rule]) -> Any:
    """LoRA as a :class:`~subspace_jax.train.Recipe`: adapters on the kernels ``rules``
    select (:func:`add_lora`, keyed by the recipe's key), and only the adapters train.

    Add the task's own trainable leaves with ``recipe(...).with_train(...)`` (a new head).

    Examples:
        >>> from subspace_jax import lora
        >>> r = lora.recipe(lora.LoRARule(pattern="attn/.*/kernel", rank=8))
        >>> r.name, [x.pattern for x in r.train]
        ('lora', ['attn/.*/kernel'])
    """
    from flax import nnx

    from subspace_jax import nn as sjnn
    from subspace_jax import train

    chosen = (rules,) if isinstance(rules, rules_lib.Rule) else tuple(rules)

    def convert(model: Any, key: jax.Array) -> Any:
        graphdef, params, rest = train.split_model(sjnn.copy_model(model))  # shares no array
        return nnx.merge(graphdef, add_lora(params, chosen, key=key), rest)

    trained = tuple(rules_lib.Rule(pattern=r.pattern) for r in chosen if isinstance(r, LoRARule))
    return train.Recipe(name="lora", convert=convert, train=trained)

