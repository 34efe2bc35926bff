"""LittleBit QAT: distil a compressed student from its frozen floating-point teacher.

The step is :func:`subspace_jax.train.make_train_step` with a distillation ``loss_fn``; the
teacher runs in the same jitted step (no cache), its outputs behind ``stop_gradient``:

* decoder (:class:`~subspace_jax.models.llama.Llama`,
  :class:`~subspace_jax.models.gemma.Gemma`), the paper's recipe exactly:
  ``KL(teacher || student)`` of the next-token logits (``batchmean``: summed over positions)
  plus ``10 x`` the sum over layers of the hidden-state MSE (every block output, the last
  one after the final norm), :func:`~subspace_jax.littlebit.distill_loss`;
* encoder (:class:`~subspace_jax.models.bert.Bert`, no logits): the same per-layer hidden
  MSE (padding masked out), with the logit KL replaced by the KL of the in-batch
  similarity distributions of the mean-pooled sentence embeddings (``cos / tau``, the
  diagonal left out), which is what retrieval reads, plus ``1 - cos`` between each
  student embedding and its teacher's.

Per-layer hidden states come from the model's own ``hidden_states`` method (its forward
pass, which ``__call__`` runs too): a decoder's ``hidden_states(tokens, final_norm=True)``
and ``logits(features)`` (:meth:`~subspace_jax.models.llama.Llama.hidden_states`), an
encoder's ``hidden_states(input_ids, attention_mask, token_type_ids)``
(:meth:`~subspace_jax.models.bert.Bert.hidden_states`); entry 0, the embedding, is left out.
Any model with these methods distils; one without gets a ``TypeError`` naming its type.

The teacher's parameters travel in the batch (``batch["teacher"]``, see
:func:`with_teacher`): arrays closed over by a jitted function become constants baked into
the executable (a second copy of the model, slower compiles); as a batch entry they are
plain, non-donated, non-differentiated arguments, left out of the residual count.
Embeddings and heads are frozen through :func:`subspace_jax.train.trainable_mask`
(:data:`FROZEN`); the latent factors, scales, biases and norms train.

References:
    LittleBit, Sec. 3.3 (QAT), arXiv 2506.13771; LittleBit-2, arXiv 2603.00042.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from subspace_jax import rules, train
from subspace_jax.littlebit.distill import distill_loss
from subspace_jax.littlebit.form import BinaryLowRank

__all__ = [
    "FROZEN", "train_rules", "lm_loss_fn", "encoder_loss_fn", "with_teacher", "setup",
    "sign_flips",
]

#: Paths that never train in QAT: embeddings, output heads and BERT's (unused) pooler.
FROZEN = r"(.*/)?(embed|embeddings|head|pooler)(/.*)?"


def train_rules(frozen: str = FROZEN) -> list[rules.Rule]:
    """Rules for :func:`~subspace_jax.train.trainable_mask`: all but ``frozen`` paths train.

    Examples:
        >>> import jax.numpy as jnp
        >>> from subspace_jax import train
        >>> from subspace_jax.littlebit import qat
        >>> params = {"embed": {"embedding": jnp.ones((4, 2))}, "blocks": {"w": jnp.ones(2)}}
        >>> train.trainable_mask(params, train=qat.train_rules())
        {'blocks': {'w': True}, 'embed': {'embedding': False}}
    """
    return [rules.Rule(pattern=frozen, skip=True), rules.Rule(pattern=".*")]


def _method(model: Any, name: str, loss: str) -> Callable:
    method = getattr(model, name, None)
    if not callable(method):
        raise TypeError(
            f"qat.{loss}: {type(model).__name__} has no {name}() method, which the "
            "distillation calls for the per-layer hidden states (see "
            "subspace_jax.models.llama.Llama.hidden_states / subspace_jax.models.bert.Bert."
            "hidden_states)"
        )
    return method


def _decoder_outputs(model: Any, tokens: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Logits and the ``depth`` hidden states after the embedding (the last one final-normed)."""
    hidden = _method(model, "hidden_states", "lm_loss_fn")(tokens, final_norm=True)[1:]
    return _method(model, "logits", "lm_loss_fn")(hidden[-1]), hidden


def _teacher(graphdef: nnx.GraphDef, batch: dict) -> nnx.Module:
    state = jax.tree.map(jax.lax.stop_gradient, batch["teacher"])
    return nnx.merge(graphdef, state)


def lm_loss_fn(teacher_graphdef: nnx.GraphDef, *, hidden_weight: float = 10.0,
               temperature: float = 1.0) -> Callable:
    """``loss_fn(model, batch, key)`` of LittleBit's decoder QAT (logit KL + hidden MSE).

    The model (student and teacher) provides ``hidden_states(tokens, final_norm=True)`` and
    ``logits(features)``, as :class:`~subspace_jax.models.llama.Llama` and
    :class:`~subspace_jax.models.gemma.Gemma` do; the hidden term matches entries
    ``1 .. depth`` (every block's output, the last one after the final norm). ``batch``
    holds ``tokens`` (int ``(B, T)``, all positions used) and ``teacher`` (the teacher's
    ``nnx.state``, see :func:`with_teacher`). Aux metrics: ``kl`` and ``hidden`` (the
    weighted hidden-state term).

    Args:
        teacher_graphdef: ``nnx.split(teacher)[0]`` of the full-precision model.
        hidden_weight: weight of the summed per-layer MSE (10 in LittleBit).
        temperature: softmax temperature of the KL.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from subspace_jax.littlebit import qat
        >>> from subspace_jax.models import llama
        >>> model = llama.Llama(llama.LlamaConfig(vocab_size=32, dim=16, depth=2, heads=2),
        ...                     rngs=nnx.Rngs(0))
        >>> graphdef, state = nnx.split(model)
        >>> batch = {"tokens": jnp.ones((2, 5), jnp.int32), "teacher": state}
        >>> loss, aux = qat.lm_loss_fn(graphdef)(model, batch, jax.random.key(0))
        >>> float(loss), sorted(aux)  # the student is the teacher
        (0.0, ['hidden', 'kl'])
    """

    def loss_fn(model, batch, key):
        del key
        tokens = batch["tokens"]
        logits_t, hidden_t = _decoder_outputs(_teacher(teacher_graphdef, batch), tokens)
        logits_s, hidden_s = _decoder_outputs(model, tokens)
        kl = distill_loss(logits_s, logits_t, temperature=temperature)
        loss = distill_loss(logits_s, logits_t, hidden_s, hidden_t, hidden_weight=hidden_weight,
                            temperature=temperature)
        return loss, {"kl": kl, "hidden": loss - kl}

    return loss_fn


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _similarity_logits(emb: jax.Array, tau: float) -> jax.Array:
    sim = emb @ emb.T / tau
    return jnp.where(jnp.eye(emb.shape[0], dtype=bool), -1e4, sim)


def encoder_loss_fn(teacher_graphdef: nnx.GraphDef, *, hidden_weight: float = 10.0,
                    tau: float = 0.05, cosine_weight: float = 1.0) -> Callable:
    """``loss_fn(model, batch, key)`` of encoder QAT (hidden MSE + sentence-embedding terms).

    ``loss = KL(in-batch similarities) + hidden_weight * sum_l masked MSE_l
    + cosine_weight * mean(1 - cos(e_s, e_t))``, where ``e`` are mean-pooled unit sentence
    embeddings and the similarity logits are ``e e^T / tau`` without the diagonal. The
    hidden term is :func:`~subspace_jax.littlebit.distill_loss`'s (with one-class logits,
    whose KL is 0, so that the token mask applies). ``batch`` holds ``input_ids``,
    ``attention_mask``, ``token_type_ids`` and ``teacher``; the model provides
    ``hidden_states(input_ids, attention_mask, token_type_ids)`` (deterministic), as
    :class:`~subspace_jax.models.bert.Bert` does; every layer's output (entries ``1 ..``)
    is matched. Aux: ``kl``, ``hidden``, ``cosine`` (mean
    cosine to the teacher).

    Args:
        teacher_graphdef: ``nnx.split(teacher)[0]``.
        hidden_weight: weight of the summed per-layer MSE (10, LittleBit's).
        tau: temperature of the similarity logits (a contrastive-learning value).
        cosine_weight: weight of ``1 - cos``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from subspace_jax.littlebit import qat
        >>> from subspace_jax.models import bert
        >>> cfg = bert.BertConfig(vocab_size=20, hidden_size=8, num_layers=2, num_heads=2,
        ...                       intermediate_size=16, max_position_embeddings=8)
        >>> model = bert.Bert(cfg, rngs=nnx.Rngs(0))
        >>> ids = jnp.arange(12).reshape(3, 4) + 1
        >>> batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids),
        ...          "token_type_ids": jnp.zeros_like(ids), "teacher": nnx.state(model)}
        >>> loss, aux = qat.encoder_loss_fn(nnx.split(model)[0])(model, batch, None)
        >>> abs(float(loss)) < 1e-5, round(float(aux["cosine"]), 4)
        (True, 1.0)
    """

    # sentence-transformers' pooling, kept in one place (the BERT module) and read lazily, so
    # that this module depends on no model.
    from subspace_jax.models.bert import mean_pool

    def hidden_states(model, inputs):
        return _method(model, "hidden_states", "encoder_loss_fn")(*inputs)[1:]

    def loss_fn(model, batch, key):
        del key
        inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        mask = batch["attention_mask"]
        hidden_t = hidden_states(_teacher(teacher_graphdef, batch), inputs)
        hidden_s = hidden_states(model, inputs)
        emb_t = jax.lax.stop_gradient(_unit(mean_pool(hidden_t[-1], mask)))
        emb_s = _unit(mean_pool(hidden_s[-1], mask))
        kl = distill_loss(_similarity_logits(emb_s, tau), _similarity_logits(emb_t, tau))
        one_class = jnp.zeros(mask.shape + (1,), jnp.float32)
        hidden = distill_loss(one_class, one_class, hidden_s, hidden_t,
                              hidden_weight=hidden_weight, mask=mask)
        cosine = jnp.mean(jnp.sum(emb_s * emb_t, axis=-1))
        loss = kl + hidden + cosine_weight * (1.0 - cosine)
        return loss, {"kl": kl, "hidden": hidden, "cosine": cosine}

    return loss_fn


def with_teacher(batches: Iterable[dict], teacher_state: Any) -> Iterator[dict]:
    """Add ``teacher=teacher_state`` to every batch (the same arrays, no copy).

    Examples:
        >>> from subspace_jax.littlebit import qat
        >>> next(qat.with_teacher([{"tokens": 1}], "state"))
        {'tokens': 1, 'teacher': 'state'}
    """
    for batch in batches:
        yield {**batch, "teacher": teacher_state}


def setup(student: nnx.Module, loss_fn: Callable, tx: optax.GradientTransformation, *,
          frozen: str = FROZEN) -> tuple[Callable, Any, Any, Any, Any, nnx.GraphDef]:
    """Split the student, build the jitted QAT step and its optimizer state.

    Args:
        student: the compressed model (:class:`~subspace_jax.littlebit.BinaryLowRank` kernels).
        loss_fn: from :func:`lm_loss_fn` or :func:`encoder_loss_fn`.
        tx: an optax transform (LittleBit: AdamW, no weight decay, cosine schedule).
        frozen: regex of the paths that do not train (:data:`FROZEN`).

    Returns:
        ``(step, params, opt_state, rest, mask, graphdef)``, ``step`` from
        :func:`subspace_jax.train.make_train_step`. ``params`` and ``rest`` are copies, as
        the step donates them (a student made by :func:`~subspace_jax.littlebit.transform` shares
        its uncompressed leaves with the teacher).
        Run the step with :func:`subspace_jax.train.fit` on :func:`with_teacher` batches,
        then ``nnx.merge(graphdef, params, rest)``.

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> from flax import nnx
        >>> from subspace_jax import littlebit
        >>> from subspace_jax.littlebit import qat
        >>> from subspace_jax.models import llama
        >>> teacher = llama.Llama(llama.LlamaConfig(vocab_size=32, dim=32, depth=1, heads=2),
        ...                       rngs=nnx.Rngs(0))
        >>> rule = littlebit.LittleBitRule(pattern="blocks/.*kernel", bpw=4.0, strict=False,
        ...                                itq_iters=2)
        >>> student = littlebit.convert(teacher, rule)
        >>> tgraph, tstate = nnx.split(teacher)
        >>> step, params, opt, rest, mask, graphdef = qat.setup(
        ...     student, qat.lm_loss_fn(tgraph), optax.adam(1e-3))
        >>> batch = {"tokens": jnp.ones((2, 6), jnp.int32), "teacher": tstate}
        >>> params, opt, rest, metrics = step(params, opt, rest, batch, jax.random.key(0))
        >>> sorted(metrics), mask["embed"]["embedding"].get_value()
        (['hidden', 'kl', 'loss'], False)
    """
    graphdef, params, rest = train.split_model(student)
    # The step donates params and rest: copy them, since a student made by transform() on the
    # teacher's state keeps the uncompressed leaves (embeddings, norms) as the teacher's own
    # buffers (convert() already copies; one more copy is cheap).
    params, rest = jax.tree.map(jnp.copy, (params, rest))
    mask = train.trainable_mask(params, train=train_rules(frozen))
    step = train.make_train_step(graphdef, loss_fn, tx, mask=mask)
    return step, params, train.init_optimizer(tx, params, mask), rest, mask, graphdef


def sign_flips(before: Any, after: Any) -> int:
    """Number of latent factor entries whose sign differs between two trees of forms.

    Examples:
        >>> import dataclasses, jax, jax.numpy as jnp
        >>> from subspace_jax import littlebit
        >>> from subspace_jax.littlebit import qat
        >>> w = jax.random.normal(jax.random.key(0), (16, 16))
        >>> k = littlebit.BinaryLowRank.from_dense(w, rank=8)
        >>> flipped = dataclasses.replace(k, u=-k.u)
        >>> qat.sign_flips({"k": k}, {"k": k}), qat.sign_flips({"k": k}, {"k": flipped})
        (0, 256)
    """
    def factors(tree):
        leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, BinaryLowRank))
        return [f for x in leaves if isinstance(x, BinaryLowRank) for f in (x.u, x.v)]

    return sum(int(jnp.sum((a >= 0) != (b >= 0))) for a, b in zip(factors(before), factors(after)))
