"""LittleBit's QAT objective: logit distillation plus layer-wise hidden-state matching.

The student (the LittleBit model) learns from the frozen floating-point teacher with

    loss = T^2 * sum_tokens KL(softmax(t / T) || softmax(s / T)) / batch
           + hidden_weight * sum_l mean((h_s_l - h_t_l)^2),

the official recipe's ``batchmean`` KL over ``(B, T, V)`` logits (so summed over token
positions) and 10 x the MSE of every hidden state. The wiring into a train step is separate.

References:
    LittleBit, Sec. 3.3 (QAT by distillation), arXiv 2506.13771; LittleBit-2, arXiv 2603.00042.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = ["distill_loss"]


def _token_mask(mask, shape: tuple[int, ...]) -> jax.Array:
    if mask is None:
        return jnp.ones(shape, jnp.float32)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the token shape {shape}")
    return mask.astype(jnp.float32)


def distill_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    student_hidden: Sequence[jax.Array] = (),
    teacher_hidden: Sequence[jax.Array] = (),
    *,
    hidden_weight: float = 10.0,
    temperature: float = 1.0,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Logit KL (teacher to student) plus ``hidden_weight`` times the hidden-state MSE.

    The teacher's arrays are behind ``stop_gradient``; maths in float32.

    Args:
        student_logits: ``(B, ..., V)`` student logits.
        teacher_logits: same shape, teacher logits.
        student_hidden: the student's hidden states, one ``(B, ..., D)`` array per layer.
        teacher_hidden: the teacher's, same count and shapes.
        hidden_weight: weight of the summed per-layer MSE (10 in LittleBit).
        temperature: softmax temperature ``T`` of both distributions; the KL is scaled by
            ``T**2`` so its gradient does not shrink with ``T``.
        mask: optional ``(B, ...)`` token mask (1 = real token): padding adds nothing.

    Returns:
        A float32 scalar.

    Raises:
        ValueError: mismatched shapes or layer counts, or ``temperature <= 0``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import littlebit
        >>> t = jax.random.normal(jax.random.key(0), (2, 5, 11))
        >>> h = [jnp.ones((2, 5, 4))]
        >>> float(littlebit.distill_loss(t, t, h, h, hidden_weight=10.0, temperature=1.0))
        0.0
        >>> float(littlebit.distill_loss(t, t, [h[0] + 1], h, hidden_weight=10.0, temperature=1.0))
        10.0

    References:
        LittleBit, arXiv 2506.13771; Hinton et al., arXiv 1503.02531 (temperature).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {student_logits.shape} != teacher logits {teacher_logits.shape}")
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"{len(student_hidden)} student hidden states but {len(teacher_hidden)} teacher ones")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    weights = _token_mask(mask, tuple(student_logits.shape[:-1]))
    log_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    log_t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
    loss = temperature**2 * jnp.sum(kl * weights) / student_logits.shape[0]
    count = jnp.maximum(jnp.sum(weights), 1.0)
    for i, (hs, ht) in enumerate(zip(student_hidden, teacher_hidden)):
        if hs.shape != ht.shape or tuple(hs.shape[:-1]) != tuple(weights.shape):
            raise ValueError(f"hidden state {i}: student {hs.shape}, teacher {ht.shape}, tokens {weights.shape}")
        sq = jnp.square(hs.astype(jnp.float32) - jax.lax.stop_gradient(ht).astype(jnp.float32))
        loss = loss + hidden_weight * jnp.sum(jnp.mean(sq, axis=-1) * weights) / count
    return loss
