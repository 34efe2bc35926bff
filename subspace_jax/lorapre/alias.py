"""The user-facing LoRA-Pre optimizers: low-rank moments for matrices, AdamW for the rest.

:func:`lorapre` and :func:`lorapre_muon` split the parameters with ``optax.partition``:
a leaf goes to the low-rank branch when it has dimension numbers (by default: it is 2-D),
its folded matrix has ``min(p, q) > rank`` and ``adamw_mask`` does not name it; every other
leaf (biases, norm scales, small matrices, whatever the mask names) goes to
``optax.adamw`` with the same learning rate, betas, eps and weight decay, so its updates
are exactly ``optax.adamw``'s.

References:
    Wang, Liang, He, Wang, Tan, "Taming Momentum: Rethinking Optimizer States Through
    Low-Rank Approximation", ICLR 2026, arXiv 2602.24283.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from subspace_jax import rules
from subspace_jax.lorapre import _tree, transform

__all__ = ["lorapre", "lorapre_muon", "labels", "recipe"]

_LOW, _ADAM = "lorapre", "adamw"


def _default_spec(x) -> Any:
    return transform.DimensionNumbers() if getattr(x, "ndim", 0) == 2 else None


def labels(params: Any, *, rank: int, weight_dimension_numbers: Any = None,
           adamw_mask: Any = None, owner: str = "lorapre") -> Any:
    """The ``optax.partition`` label (``'lorapre'`` or ``'adamw'``) of every leaf.

    Args:
        params: parameters (or anything with their shapes).
        rank: factor rank; matrices with ``min(p, q) <= rank`` go to AdamW.
        weight_dimension_numbers: as :func:`lorapre`.
        adamw_mask: as :func:`lorapre`.
        owner: name used in error messages.

    Returns:
        A tree of strings shaped like ``params``.

    Raises:
        ValueError: a leaf's dimension numbers do not fit its shape (names path and shape).

    Examples:
        >>> import jax.numpy as jnp
        >>> params = {"w": jnp.ones((16, 8)), "small": jnp.ones((4, 4)), "b": jnp.ones(8)}
        >>> labels(params, rank=4)
        {'b': 'adamw', 'small': 'adamw', 'w': 'lorapre'}
    """
    specs = _tree.flat_specs(owner, params, weight_dimension_numbers, _default_spec)
    forced = _tree.flat_mask(owner, params, adamw_mask)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for (path, x), spec, force in zip(flat, specs, forced):
        if force or spec is None:
            out.append(_ADAM)
            continue
        p, q = _tree.view(owner, _tree.path_str(path), tuple(x.shape), spec).shape[-2:]
        out.append(_ADAM if min(p, q) <= rank else _LOW)
    return treedef.unflatten(out)


def _low_rank_specs(weight_dimension_numbers: Any):
    """Dimension numbers for the low-rank branch (whose tree has ``MaskedNode`` elsewhere)."""
    if weight_dimension_numbers is None:
        return lambda tree: jax.tree.map(lambda x: transform.DimensionNumbers(), tree)
    return weight_dimension_numbers


def _standard_promotion(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` traced under standard dtype promotion.

    optax's own ``adamw`` and schedules mix Python floats with int32 step counts, which
    ``jax_numpy_dtype_promotion='strict'`` rejects; LoRA-Pre's code is strict-clean.
    """
    tx = optax.with_extra_args_support(tx)

    def init_fn(params):
        with jax.numpy_dtype_promotion("standard"):
            return tx.init(params)

    def update_fn(updates, state, params=None, **extra_args):
        with jax.numpy_dtype_promotion("standard"):
            return tx.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check(owner: str, rank: Any, scale: Any, **betas: Any) -> None:
    transform.check_rank(owner, rank)
    transform.check_betas(owner, **betas)
    if isinstance(scale, (int, float)) and not scale > 0:
        raise ValueError(f"{owner}: scale={scale!r} must be > 0")


def _split(owner: str, rank: int, low: optax.GradientTransformation,
           adam: optax.GradientTransformation, weight_dimension_numbers: Any,
           adamw_mask: Any) -> optax.GradientTransformationExtraArgs:
    param_labels = functools.partial(labels, rank=rank, owner=owner, adamw_mask=adamw_mask,
                                     weight_dimension_numbers=weight_dimension_numbers)
    return optax.partition({_LOW: low, _ADAM: _standard_promotion(adam)}, param_labels)


def _scale_by_grad_scale() -> optax.GradientTransformationExtraArgs:
    """Multiplies the updates by the extra argument ``grad_scale`` (AdamW's branch of a
    clipped :func:`lorapre`; elementwise, so it fuses into Adam's update)."""
    def update_fn(updates, state, params=None, **extra_args):
        del params
        s = extra_args[transform.GRAD_SCALE]
        return jax.tree.map(lambda g: (s * g).astype(g.dtype), updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def _clipped(tx: optax.GradientTransformation, max_norm: float
             ) -> optax.GradientTransformationExtraArgs:
    """``tx`` after global-norm clipping at ``max_norm``, the clip's factor passed down as the
    extra argument ``grad_scale`` instead of applied to a copy of the gradients.

    The factor is ``optax.clip_by_global_norm``'s: 1 under ``max_norm``, else
    ``max_norm / norm``."""
    tx = optax.with_extra_args_support(tx)

    def update_fn(updates, state, params=None, **extra_args):
        norm = optax.tree.norm(updates)
        s = jnp.where(norm < max_norm, 1.0, max_norm / norm).astype(jnp.float32)
        return tx.update(updates, state, params, **{**extra_args, transform.GRAD_SCALE: s})

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def lorapre(learning_rate: optax.ScalarOrSchedule, rank: int = 8, b1: float = 0.9,
            b2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.0,
            weight_decay_mask: Any = None, *, scale: float = 1.0, clip: float | None = None,
            clock: str = "unbiased",
            damping: float = 1e-6, init_std: float = 0.02, key: Any = 0,
            weight_dimension_numbers: Any = None, adamw_mask: Any = None,
            ) -> optax.GradientTransformationExtraArgs:
    """LoRA-Pre Adam: low-rank Adam moments for large matrices, AdamW for the other leaves.

    The low-rank branch chains :func:`~subspace_jax.lorapre.transform.scale_by_lorapre`,
    the GaLore-style ``scale``, decoupled weight decay and the learning rate; persistent
    state is ``2 r (p + q)`` float32 numbers per matrix instead of AdamW's ``2 p q``.

    Args:
        learning_rate: a float or an optax schedule (shared by both branches).
        rank: factor rank ``r`` (static: use ``static_args=("rank",)`` with
            ``optax.inject_hyperparams``).
        b1, b2, eps: Adam's, for both branches (``b2`` defaults to the paper's 0.95).
        weight_decay: decoupled weight decay, multiplied by the learning rate.
        weight_decay_mask: bools (tree, prefix or callable of the params): where to decay.
        scale: multiplies the low-rank branch's direction (GaLore's protocol, which the
            paper follows for pre-training, uses 0.25 with a larger learning rate).
        clip: global-norm clipping of the whole gradient tree (None: none). The same
            numbers as ``optax.chain(optax.clip_by_global_norm(clip), lorapre(...))``, but
            the matrices' gradients are scaled inside the row-chunk loop, so no clipped
            copy of them is held (one dense float32 copy of every matrix otherwise).
        clock: ``"unbiased"`` (default: the factors hold bias-corrected moments, combined
            with the gradient as Adam's recursion does) or ``"paper"`` (Algorithm 1 as
            printed, whose second moment runs on the wrong clock); see
            :func:`~subspace_jax.lorapre.transform.scale_by_lorapre`.
        damping, init_std, key: as :func:`~subspace_jax.lorapre.transform.scale_by_lorapre`.
        weight_dimension_numbers: ``None`` (2-D leaves are matrices), one
            :data:`~subspace_jax.lorapre.transform.DimensionNumbers`, a prefix tree of
            them (``None`` entries: AdamW), or a callable of the params. A 3-D attention
            kernel ``(embed, heads, head_dim)`` is one matrix with
            ``DimensionNumbers(reduction_axis=0, output_axis=(1, 2))``.
        adamw_mask: bools (tree, prefix or callable of the params): leaves forced to AdamW.

    Returns:
        An ``optax.partition`` transform (labels from :func:`labels`).

    Raises:
        ValueError: ``rank < 1``, a beta outside ``[0, 1)``, ``scale <= 0`` or
            ``clip <= 0`` (here); a
            dimension-number spec that does not fit a leaf (at ``init``, naming the leaf).

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> params = {"w": jnp.ones((32, 16)), "b": jnp.zeros(16)}
        >>> tx = lorapre(1e-3, rank=4, weight_decay=0.1)
        >>> state = tx.init(params)
        >>> updates, state = jax.jit(tx.update)(params, state, params)
        >>> params = optax.apply_updates(params, updates)
        >>> lorapre(1e-3, rank=0)
        Traceback (most recent call last):
        ...
        ValueError: lorapre: rank=0 must be a Python int >= 1 (it is static)

    References:
        arXiv 2602.24283.
    """
    _check("lorapre", rank, scale, b1=b1, b2=b2)
    transform.check_clock("lorapre", clock)
    if clip is not None and not (isinstance(clip, (int, float)) and clip > 0):
        raise ValueError(f"lorapre: clip={clip!r} must be a number > 0 (or None)")
    decay_mask = _tree.partition_safe(weight_decay_mask)
    low = optax.chain(
        transform.scale_by_lorapre(rank, b1, b2, eps, clock=clock, damping=damping,
                                   init_std=init_std, key=key,
                                   weight_dimension_numbers=_low_rank_specs(
                                       weight_dimension_numbers)),
        optax.scale(scale),
        optax.add_decayed_weights(weight_decay, decay_mask),
        _standard_promotion(optax.scale_by_learning_rate(learning_rate)),
    )
    adam = optax.adamw(learning_rate, b1, b2, eps, weight_decay=weight_decay, mask=decay_mask)
    if clip is None:
        return _split("lorapre", rank, low, adam, weight_dimension_numbers, adamw_mask)
    adam = optax.chain(_scale_by_grad_scale(), adam)
    return _clipped(_split("lorapre", rank, low, adam, weight_dimension_numbers, adamw_mask),
                    clip)


def lorapre_muon(learning_rate: optax.ScalarOrSchedule, rank: int = 8, beta: float = 0.95,
                 ns_steps: int = 5, eps: float = 1e-8, weight_decay: float = 0.0,
                 weight_decay_mask: Any = None, *, nesterov: bool = True,
                 clock: str = "unbiased", adam_b1: float = 0.9, adam_b2: float = 0.999,
                 adam_weight_decay: float = 0.0,
                 adam_learning_rate: optax.ScalarOrSchedule | None = None,
                 damping: float = 1e-6, init_std: float = 0.02, key: Any = 0,
                 weight_dimension_numbers: Any = None, adamw_mask: Any = None,
                 ) -> optax.GradientTransformationExtraArgs:
    """LoRA-Pre Muon: Muon with a low-rank momentum for large matrices, AdamW for the rest.

    Mirrors ``optax.contrib.muon``'s arguments and defaults (Nesterov, width scaling,
    AdamW for non-matrix leaves with its own betas, weight decay and learning rate);
    persistent state is ``r (p + q)`` float32 numbers per matrix instead of ``p q``.

    Args:
        learning_rate: a float or an optax schedule for the Muon branch.
        rank: factor rank ``r`` (static).
        beta, ns_steps, eps, nesterov, clock: as
            :func:`~subspace_jax.lorapre.transform.scale_by_lorapre_muon`.
        weight_decay: decoupled weight decay of the Muon branch (times the learning rate).
        weight_decay_mask: bools (tree, prefix or callable): where the Muon branch decays.
        adam_b1, adam_b2, adam_weight_decay: the AdamW branch's.
        adam_learning_rate: the AdamW branch's (None: ``learning_rate``).
        damping, init_std, key: as
            :func:`~subspace_jax.lorapre.transform.scale_by_lorapre`.
        weight_dimension_numbers, adamw_mask: as :func:`lorapre`.

    Returns:
        An ``optax.partition`` transform.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> params = {"w": jnp.ones((32, 16)), "b": jnp.zeros(16)}
        >>> tx = lorapre_muon(0.02, rank=4, adam_learning_rate=1e-3)
        >>> updates, state = tx.update(params, tx.init(params), params)
        >>> from subspace_jax.lorapre import moments
        >>> moments(state)["w"].first.B.shape, moments(state)["w"].second  # one pair
        ((32, 4), None)

    References:
        arXiv 2602.24283.
    """
    _check("lorapre_muon", rank, 1.0, beta=beta, adam_b1=adam_b1, adam_b2=adam_b2)
    transform.check_clock("lorapre_muon", clock)
    low = optax.chain(
        transform.scale_by_lorapre_muon(rank, beta, ns_steps, eps, nesterov=nesterov,
                                        clock=clock, damping=damping, init_std=init_std,
                                        key=key,
                                        weight_dimension_numbers=_low_rank_specs(
                                            weight_dimension_numbers)),
        optax.add_decayed_weights(weight_decay, _tree.partition_safe(weight_decay_mask)),
        _standard_promotion(optax.scale_by_learning_rate(learning_rate)),
    )
    adam_lr = learning_rate if adam_learning_rate is None else adam_learning_rate
    adam = optax.adamw(adam_lr, adam_b1, adam_b2, eps, weight_decay=adam_weight_decay,
                       nesterov=nesterov)
    return _split("lorapre_muon", rank, low, adam, weight_dimension_numbers, adamw_mask)


def kernel_dimension_numbers(axes: Mapping[str, tuple[int, ...]] | None = None) -> Callable:
    """``weight_dimension_numbers`` for any Flax model: each kernel folds as its layer does.

    The same description of "which kernel axes contract with the input" that the tree
    transforms use (:class:`subspace_jax.forms.Fold`): a kernel whose path is in ``axes``
    (e.g. from :func:`subspace_jax.nn.kernel_axes`), or whose ``nnx.Variable`` carries the
    ``in_axes`` metadata that :func:`subspace_jax.nn.adopt` records, is one matrix with
    those axes as rows and the rest as columns; any other 2-D leaf is ``(in, out)``; every
    other leaf gets None (AdamW in :func:`lorapre` and :func:`lorapre_muon`).

    Args:
        axes: ``{kernel path: in_axes}``; None reads only the Variables' metadata.

    Returns:
        A callable of the parameters, for ``weight_dimension_numbers=``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from subspace_jax import lorapre
        >>> params = {"attn": {"q": {"kernel": jnp.ones((16, 2, 8))}}, "b": jnp.zeros(8)}
        >>> dims = lorapre.kernel_dimension_numbers({"attn/q/kernel": (0,)})(params)
        >>> dims["attn"]["q"]["kernel"], dims["b"]
        (DimensionNumbers(reduction_axis=(0,), output_axis=(1, 2)), None)
        >>> tx = lorapre.lorapre(1e-3, rank=2,
        ...                      weight_dimension_numbers=lorapre.kernel_dimension_numbers(
        ...                          {"attn/q/kernel": (0,)}))
        >>> lorapre.moments(tx.init(params))["attn/q/kernel"].first.B.shape
        (16, 2)
    """
    axes = dict(axes or {})

    def dims(params: Any) -> Any:
        meta = {path: leaf.get_metadata().get("in_axes")
                for path, leaf in rules.leaf_paths(params)[0]
                if hasattr(leaf, "get_metadata")}

        def one(path: str, x: Any) -> Any:
            ins = axes.get(path) or meta.get(path)
            ndim = getattr(x, "ndim", 0)
            if ins is not None and ndim >= 2:
                ins = tuple(int(a) % ndim for a in ins)
                return transform.DimensionNumbers(ins, tuple(a for a in range(ndim)
                                                             if a not in ins))
            return transform.DimensionNumbers(0, 1) if ndim == 2 else None

        return rules.map_with_path(one, params)

    return dims


def recipe(rank: int = 8, *, b2: float = 0.999, weight_decay: float = 0.01,
           warmup_fraction: float = 0.0, clip: float | None = 1.0, clock: str = "unbiased",
           key: Any = 0, lr: float | None = None) -> Any:
    """LoRA-Pre as a :class:`~subspace_jax.train.Recipe`: the model is unchanged and trains
    fully; the optimizer is :func:`lorapre` (rank-``rank`` Adam moments updated in closed
    form each step) under the same schedule as :func:`subspace_jax.train.adamw` (linear
    warm-up over ``warmup_fraction`` of the steps, cosine decay to ``lr / 10``), global-norm
    clipping at ``clip`` (:func:`lorapre`'s, inside the update) and decoupled weight decay on leaves of two or more dimensions.
    ``clock`` is :func:`lorapre`'s.

    Examples:
        >>> from subspace_jax import lorapre
        >>> r = lorapre.recipe(rank=4)
        >>> r.name, r.convert, r.train
        ('lorapre', None, None)
        >>> tx = r.optimizer(1e-3, 100)  # (peak lr, steps) -> the optax transform
    """
    from subspace_jax import train

    def optimizer(peak: float, steps: int) -> optax.GradientTransformation:
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, peak, int(warmup_fraction * steps), steps, end_value=peak / 10)
        decay = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
        return lorapre(schedule, rank=rank, b2=b2, weight_decay=weight_decay,
                       weight_decay_mask=decay, clip=clip, clock=clock, key=key)

    return train.Recipe(name="lorapre", optimizer=optimizer, lr=lr)

