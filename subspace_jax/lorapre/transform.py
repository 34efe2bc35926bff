"""LoRA-Pre as optax transforms: Adam and Muon whose moments are low-rank factors.

:func:`scale_by_lorapre` keeps, per matrix, factors of the first moment (fit to ``g``) and
of ``|g|`` (squared to give the second moment), advanced every step in closed form
(:func:`subspace_jax.lorapre.core.newton_step`); the step itself mixes the previous factors
with the full-rank current gradient. :func:`lorapre` is the user-facing optimizer:
matrices go through it, everything else (and matrices with ``min(p, q) <= rank``) through
``optax.adamw``. :func:`scale_by_lorapre_muon` / :func:`lorapre_muon` do the same for
Muon's momentum (one factor pair, Newton-Schulz orthogonalisation).

Factor maths runs in float32; updates keep the gradient's dtype. ``rank`` is static (it
sets the state's shapes); betas, eps, the learning rate and weight decay can be injected
(``optax.inject_hyperparams(lorapre, static_args=("rank",))``).

References:
    Wang, Liang, He, Wang, Tan, "Taming Momentum: Rethinking Optimizer States Through
    Low-Rank Approximation", ICLR 2026, arXiv 2602.24283 (Algorithms 1 and 2).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from subspace_jax import rules
from subspace_jax.lorapre import _tree, core

__all__ = ["LoRAPreState", "LoRAPreMuonState", "DimensionNumbers", "Moments", "moments",
           "CLOCKS", "GRAD_SCALE", "scale_by_lorapre", "scale_by_lorapre_muon"]

DimensionNumbers = _tree.DimensionNumbers


class LoRAPreState(NamedTuple):
    """State of :func:`scale_by_lorapre`: ``2 r (p + q)`` float32 numbers per matrix.

    Attributes:
        count: ``()`` int32, steps taken.
        mu: params-shaped tree of :class:`~subspace_jax.lorapre.core.Factors` of the first
            moment (``B (..., p, r)``, ``A (..., r, q)``); ``optax.MaskedNode`` where masked.
        nu: the same for the second moment's root: ``(B @ A) ** 2`` approximates Adam's ``v``.
    """

    count: jax.Array
    mu: Any
    nu: Any


class LoRAPreMuonState(NamedTuple):
    """State of :func:`scale_by_lorapre_muon`: ``r (p + q)`` float32 numbers per matrix.

    Attributes:
        count: ``()`` int32, steps taken.
        mu: params-shaped tree of :class:`~subspace_jax.lorapre.core.Factors` of the momentum.
    """

    count: jax.Array
    mu: Any


class Moments(NamedTuple):
    """One matrix's low-rank moments, as :func:`moments` reads them from a state.

    Both live in the leaf's folded ``(..., p, q)`` matrix view (its dimension numbers; a
    2-D kernel's own shape). Under the default ``clock="unbiased"`` the products are
    bias-corrected after the state's last step: :meth:`m` is Adam's ``mhat`` (exactly,
    where the gradients are rank ``<= r``) and :meth:`v` is ``phat^2``, the square of the
    bias-corrected EMA of ``|g|`` (``<=`` Adam's ``vhat`` by Jensen). Under
    ``clock="paper"`` they are the zero-started EMAs.

    Attributes:
        first: :class:`~subspace_jax.lorapre.core.Factors` of the first moment (Muon: of
            the momentum).
        second: factors of ``|g|``'s moment (``None`` for Muon).
        count: steps the state has taken.
    """

    first: core.Factors
    second: core.Factors | None
    count: jax.Array

    def m(self) -> jax.Array:
        """The first moment ``B @ A``, ``(..., p, q)``."""
        return core.reconstruct(self.first)

    def v(self) -> jax.Array | None:
        """The second moment ``(B @ A)^2``, ``(..., p, q)``; ``None`` for Muon."""
        return None if self.second is None else jnp.square(core.reconstruct(self.second))


def _is_lorapre_state(x: Any) -> bool:
    return isinstance(x, (LoRAPreState, LoRAPreMuonState))


def moments(state: Any) -> dict[str, Moments]:
    """``{path: Moments}`` of every low-rank matrix in an optimizer state.

    Finds the one LoRA-Pre state anywhere in ``state`` (that of :func:`~.alias.lorapre`,
    :func:`~.alias.lorapre_muon` or a ``scale_by_*`` transform, inside any optax chain,
    partition, ``inject_hyperparams`` or ``MultiSteps``); paths are the parameters'
    (``"layers/0/mlp/kernel"``). Leaves routed to AdamW are absent.

    Args:
        state: an optax state.

    Returns:
        A dict from parameter path to :class:`Moments`, in tree order.

    Raises:
        ValueError: ``state`` holds no LoRA-Pre state, or more than one.

    Examples:
        >>> import jax.numpy as jnp, optax
        >>> from subspace_jax import lorapre
        >>> params = {"w": jnp.ones((64, 32)), "b": jnp.zeros(32)}
        >>> tx = optax.chain(optax.clip_by_global_norm(1.0), lorapre.lorapre(1e-3, rank=4))
        >>> state = tx.init(params)
        >>> low = lorapre.moments(state)
        >>> list(low), low["w"].first.B.shape, low["w"].v().shape  # 2 r (p + q), not 2 p q
        (['w'], (64, 4), (64, 32))
        >>> lorapre.moments(optax.adam(1e-3).init(params))
        Traceback (most recent call last):
        ...
        ValueError: moments: no LoRA-Pre state in this optimizer state (found 0)
    """
    found = [x for x in jax.tree.leaves(state, is_leaf=_is_lorapre_state)
             if _is_lorapre_state(x)]
    if len(found) != 1:
        raise ValueError(f"moments: {'no' if not found else 'more than one'} LoRA-Pre state "
                         f"in this optimizer state (found {len(found)})")
    (low,) = found

    def by_path(tree: Any, prefix: str = "") -> dict[str, core.Factors]:
        # the params' own paths: an nnx.Variable (params an nnx.State) adds no key of its own
        leaf = lambda x: isinstance(x, (core.Factors, nnx.Variable))  # noqa: E731
        out = {}
        for keys, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=leaf)[0]:
            path = "/".join(filter(None, [prefix, rules.keypath_str(keys)]))
            if isinstance(x, nnx.Variable):
                out.update(by_path(x.get_value(), path))
            elif isinstance(x, core.Factors):
                out[path] = x
        return out

    firsts = by_path(low.mu)
    seconds = by_path(low.nu) if isinstance(low, LoRAPreState) else {}
    return {path: Moments(f, seconds.get(path), low.count) for path, f in firsts.items()}


def check_rank(owner: str, rank: Any) -> None:
    """``rank`` must be a Python int >= 1: it sets the state's shapes."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"{owner}: rank={rank!r} must be a Python int >= 1 (it is static)")


def check_betas(owner: str, **betas: Any) -> None:
    """Each Python-number beta must lie in ``[0, 1)``; arrays (injected) are not checked."""
    for name, value in betas.items():
        if isinstance(value, (int, float)) and not 0 <= value < 1:
            raise ValueError(f"{owner}: {name}={value!r} must lie in [0, 1)")


CLOCKS = ("unbiased", "paper")
#: The extra argument :func:`scale_by_lorapre` multiplies the gradients by (a clip's factor).
GRAD_SCALE = "grad_scale"


def check_clock(owner: str, clock: Any) -> None:
    """``clock`` must name one of :data:`CLOCKS`."""
    if clock not in CLOCKS:
        raise ValueError(f"{owner}: clock={clock!r} must be one of {CLOCKS}")


def clock_steps(clock: str, decay, power: int, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(gamma_t, w_t)`` of a moment whose EMA decays by ``decay`` per step.

    ``gamma_t`` is the factor step toward this step's target; ``w_t`` weights the previous
    factors' product in this step's moment, ``m_t = w_t (B A)_{t-1} + (1 - decay) g_t``,
    which is then divided by ``1 - decay^t`` like Adam's.

    ``"unbiased"``: the product is the bias-corrected EMA of the target (step
    :func:`~subspace_jax.lorapre.core.unbiased_gamma` with the product's own decay
    ``decay ** (2 / power)``), so ``w_t = decay (1 - decay^(t-1))`` turns it back into
    Adam's zero-started ``m_{t-1}``. ``"paper"``: the constant step
    :func:`~subspace_jax.lorapre.core.gamma_for` and ``w_t = decay`` (Algorithm 1 as
    printed: the zero-started product stands in for ``m_{t-1}``).
    """
    if clock == "paper":
        return core.gamma_for(decay, power), jnp.asarray(decay, jnp.float32)
    d = jnp.asarray(decay, jnp.float32)
    return core.unbiased_gamma(d ** (2.0 / power), t), d * (1 - d ** (t - 1))


def _increment(count: jax.Array) -> jax.Array:
    return jnp.where(count < jnp.iinfo(jnp.int32).max, count + 1, count)


def _leaves(owner: str, tree: Any, dim_nums: Any) -> list[tuple[str, Any, _tree.View]]:
    """``(path, leaf, view)`` per leaf; every leaf must have dimension numbers that fit."""
    default = lambda x: DimensionNumbers()  # noqa: E731
    specs = _tree.flat_specs(owner, tree, dim_nums, default)
    out = []
    for (path, x), spec in zip(jax.tree_util.tree_flatten_with_path(tree)[0], specs):
        name = _tree.path_str(path)
        if spec is None:
            raise ValueError(f"{owner}: leaf {name!r} of shape {x.shape} has no dimension "
                             "numbers; route it elsewhere (lorapre() sends it to AdamW)")
        out.append((name, x, _tree.view(owner, name, tuple(x.shape), spec)))
    return out


def _init(owner: str, params: Any, dim_nums: Any, rank: int, key: Any, init_std: float,
          moments: int) -> tuple[jax.Array, list]:
    """The zero count and ``moments`` params-shaped trees of factors."""
    key = key if isinstance(key, jax.Array) and jax.dtypes.issubdtype(
        key.dtype, jax.dtypes.prng_key) else jax.random.key(key)
    leaves, treedef = jax.tree.flatten(params)
    trees = [[] for _ in range(moments)]
    for i, (_, x, v) in enumerate(_leaves(owner, params, dim_nums)):
        for j, keys in enumerate(jax.random.split(jax.random.fold_in(key, i), moments)):
            f = core.init_factors(keys, v.shape, rank, init_std)
            trees[j].append(_tree.place_like(f, x, v))
    del leaves
    return jnp.zeros([], jnp.int32), [treedef.unflatten(t) for t in trees]


def _factor_list(tree: Any) -> list[core.Factors]:
    return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, core.Factors))


def scale_by_lorapre(rank: int = 8, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, *,
                     clock: str = "unbiased", damping: float = 1e-6, init_std: float = 0.02,
                     key: Any = 0, weight_dimension_numbers: Any = None,
                     ) -> optax.GradientTransformationExtraArgs:
    """Adam's direction with low-rank moments updated in closed form (LoRA-Pre, Algorithm 1).

    Per matrix ``g`` (``p x q``, folded by its dimension numbers), the factors ``M = m_B m_A``
    of the first moment fit ``g`` and ``P = v_B v_A`` fit ``|g|``; ``P^2`` stands for Adam's
    second moment. The step mixes the previous factors with the full-rank current gradient::

        m = w1 M + (1 - b1) g                   v = w2 P^2 + (1 - b2) g^2
        update = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    then ``(m_B, m_A)`` take a damped-Newton step toward ``g`` and ``(v_B, v_A)`` toward
    ``|g|`` (:func:`~subspace_jax.lorapre.core.newton_step`); each factor keeps
    ``1 - gamma`` of itself, so a product decays by ``(1 - gamma)^2``: ``b1`` for ``M``
    and ``sqrt(b2)`` for ``P`` (so ``P^2`` decays by ``b2``).

    **The clock** (``clock``) is what the products are, and how they enter the step.

    ``"paper"`` (Algorithm 1 as printed): constant steps ``gamma1 = 1 - sqrt(b1)``,
    ``gamma2 = 1 - b2 ** (1/4)``, and ``w1 = b1``, ``w2 = b2``. The products are
    zero-started EMAs, standing in for Adam's zero-started ``m_{t-1}`` and ``v_{t-1}``.
    For ``M`` that is right (its weight is ``1 - b1^(t-1)``, as ``m_{t-1}``'s). ``P`` is
    a zero-started EMA of ``|g|`` with decay ``sqrt(b2)``: its weight is
    ``1 - b2^((t-1)/2)``, so ``P^2`` carries ``(1 - b2^((t-1)/2))^2``, not
    ``1 - b2^(t-1)``; dividing by ``1 - b2^t`` leaves ``v`` too small for hundreds of
    steps (on an exactly rank-1 stream with ``b2 = 0.95`` the update is 2.1x Adam's at
    step 10, 1.6x at 30, 1.24x at 60, 1.08x at 100).
    Both products also lag their EMA early: the first steps fit ``g`` against a random
    ``A`` (a relative lag decaying like ``(1 - gamma)^t``).

    ``"unbiased"`` (default): the factors track the *bias-corrected* EMAs ``mhat`` and
    ``phat``. A bias-corrected EMA is an EMA with the step ``eta_t = (1 - d)/(1 - d^t)``
    (:func:`~subspace_jax.lorapre.core.unbiased_gamma`), 1 at ``t = 1``: the first step
    sets each pair to its least-squares fit of ``g_1`` (``|g_1|``), whatever ``A``
    started as. Adam's recursion then needs the zero-started ``m_{t-1} =
    (1 - b1^(t-1)) mhat_{t-1}``, so ``w1 = b1 (1 - b1^(t-1))``, and, reading ``phat^2``
    as ``vhat_{t-1}``, ``w2 = b2 (1 - b2^(t-1))``::

        v_t / (1 - b2^t) = [b2 (1 - b2^(t-1)) phat_{t-1}^2 + (1 - b2) g_t^2] / (1 - b2^t)

    which weighs the past and the current ``g^2`` exactly as Adam's ``vhat_t`` does.
    Where the gradients' moments are exactly rank ``<= r`` (``g_t = c_t a b^T``) the
    factors hold ``mhat`` and ``phat`` exactly from step 1 (``newton_step`` is an exact EMA
    there), so ``m`` is Adam's; ``v`` differs from Adam's only by the Jensen gap of the
    ``|g|`` trick, ``(EMA |c|)^2 <= EMA c^2``: with a constant ``c`` the update is Adam's,
    and for ``c_t`` uniform in ``[0.5, 1.5]`` and ``b2 = 0.95`` it is 1.01-1.07x Adam's
    from step 10 on (``tests/test_lorapre.py``).

    Other choices where the paper's text leaves room: the step uses the previous factors;
    the factor step is sequential (``A`` solves against the new ``B``: on noisy gradients
    the simultaneous order does not track the EMA, see
    :func:`~subspace_jax.lorapre.core.newton_step`) and ends with a QR re-gauge of ``B``
    that leaves the product unchanged; the ``r x r`` damping is relative to the Gram's
    scale.

    The extra argument ``grad_scale`` (:data:`GRAD_SCALE`, a scalar; optax passes extra
    arguments down chains and partitions) multiplies the gradients inside the row-chunk
    loop: what :func:`~subspace_jax.lorapre.lorapre`'s ``clip`` uses, so that clipping
    makes no scaled copy of every gradient matrix.

    Note:
        On CPU the ``r x r`` solves and QR run in LAPACK through scipy's OpenBLAS, whose
        threads can fight XLA's on a few shared cores (a 100x slower update was measured
        on two busy cores): set ``OPENBLAS_NUM_THREADS=1`` there. ``init`` places the
        factors like concretely sharded parameters (``B`` along ``p``, ``A`` along ``q``);
        jit the update with the state's shardings as ``out_shardings`` to keep them.
        Meshes with ``Explicit`` axes are not supported yet.

    Args:
        rank: factor rank ``r`` (static).
        b1: first-moment decay, in ``[0, 1)``.
        b2: second-moment decay, in ``[0, 1)`` (the paper's 0.95; ``b2 -> 1`` makes the
            ``|g|`` factors learn very slowly).
        eps: added to ``sqrt(v)``.
        clock: ``"unbiased"`` (default) or ``"paper"``: see above.
        damping: relative Tikhonov damping of the ``r x r`` solves.
        init_std: standard deviation of the initial ``A`` factors (``B`` starts at zero).
        key: PRNG key or int seed for the ``A`` factors (split per leaf by position).
        weight_dimension_numbers: ``None`` (every leaf is a 2-D matrix), one
            :data:`DimensionNumbers`, a prefix tree of them, or a callable of the params.
            Every leaf needs one (use :func:`lorapre` to route the others to AdamW).

    Returns:
        A transform with state :class:`LoRAPreState`; init works on abstract params and
        places each factor on the mesh of a concretely sharded parameter.

    Examples:
        >>> import jax.numpy as jnp
        >>> tx = scale_by_lorapre(rank=2)
        >>> state = tx.init({"w": jnp.ones((8, 6))})
        >>> state.mu["w"].B.shape, state.mu["w"].A.shape, state.nu["w"].B.shape
        ((8, 2), (2, 6), (8, 2))
        >>> updates, state = tx.update({"w": jnp.full((8, 6), 0.5)}, state)
        >>> round(float(updates["w"][0, 0]), 6)  # step 1 is Adam's: g / |g|
        1.0

    References:
        arXiv 2602.24283.
    """
    check_rank("scale_by_lorapre", rank)
    check_betas("scale_by_lorapre", b1=b1, b2=b2)
    check_clock("scale_by_lorapre", clock)

    def init_fn(params):
        count, (mu, nu) = _init("scale_by_lorapre", params, weight_dimension_numbers, rank,
                                key, init_std, moments=2)
        return LoRAPreState(count=count, mu=mu, nu=nu)

    def update_fn(updates, state, params=None, **extra_args):
        del params
        count = _increment(state.count)
        t = count.astype(jnp.float32)
        gamma1, w1 = clock_steps(clock, b1, 2, t)
        gamma2, w2 = clock_steps(clock, b2, 4, t)
        leaves = _leaves("scale_by_lorapre", updates, weight_dimension_numbers)
        out, mus, nus = [], [], []
        one = functools.partial(core.adam_step, w1=w1, w2=w2, b1=b1, b2=b2, count=t,
                                eps=eps, gamma1=gamma1, gamma2=gamma2, damping=damping,
                                scale=extra_args.get(GRAD_SCALE, 1.0))
        for (_, g, v), mu, nu in zip(leaves, _factor_list(state.mu), _factor_list(state.nu)):
            gm = v.to_matrix(g.astype(jnp.float32))
            step, mu, nu = (one if gm.ndim == 2 else jax.vmap(one))(gm, mu, nu)
            out.append(v.from_matrix(step).astype(g.dtype))
            mus.append(mu)
            nus.append(nu)
        treedef = jax.tree.structure(updates)
        mu_def = jax.tree.structure(state.mu, is_leaf=lambda x: isinstance(x, core.Factors))
        return treedef.unflatten(out), LoRAPreState(
            count=count, mu=mu_def.unflatten(mus), nu=mu_def.unflatten(nus))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_lorapre_muon(rank: int = 8, beta: float = 0.95, ns_steps: int = 5,
                          eps: float = 1e-8, *, nesterov: bool = True,
                          clock: str = "unbiased", damping: float = 1e-6,
                          init_std: float = 0.02, key: Any = 0,
                          weight_dimension_numbers: Any = None,
                          ) -> optax.GradientTransformationExtraArgs:
    """Muon's direction with its momentum as one low-rank factor pair (LoRA-Pre, Algorithm 2).

    Follows optax's Muon: EMA momentum ``m = w m_B m_A + (1 - beta) g`` from the previous
    factors, bias correction (Nesterov by default), quintic Newton-Schulz, then optax's
    width scale ``sqrt(max(1, q / p))``. The factors step toward ``g``; ``clock`` sets the
    step and ``w`` as for :func:`scale_by_lorapre`'s first moment (``"unbiased"``: the
    factors hold the bias-corrected momentum, exact from step 1 where the gradients are
    rank ``<= r``, and the update is then ``optax.contrib.scale_by_muon``'s; ``"paper"``:
    ``gamma = 1 - sqrt(beta)``, ``w = beta``).

    Args:
        rank: factor rank ``r`` (static).
        beta: momentum decay, in ``[0, 1)``.
        ns_steps: Newton-Schulz iterations.
        eps: Frobenius-normalisation guard.
        nesterov: look-ahead momentum, as optax's ``muon`` (default True).
        clock: ``"unbiased"`` (default) or ``"paper"``.
        damping, init_std, key, weight_dimension_numbers: as :func:`scale_by_lorapre`.

    Returns:
        A transform with state :class:`LoRAPreMuonState`.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> tx = scale_by_lorapre_muon(rank=2)
        >>> g = {"w": jax.random.normal(jax.random.key(0), (8, 6))}
        >>> u, state = tx.update(g, tx.init(g))
        >>> u["w"].shape, state.mu["w"].A.shape
        ((8, 6), (2, 6))

    References:
        arXiv 2602.24283.
    """
    check_rank("scale_by_lorapre_muon", rank)
    check_betas("scale_by_lorapre_muon", beta=beta)
    check_clock("scale_by_lorapre_muon", clock)

    def init_fn(params):
        count, (mu,) = _init("scale_by_lorapre_muon", params, weight_dimension_numbers, rank,
                             key, init_std, moments=1)
        return LoRAPreMuonState(count=count, mu=mu)

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        count = _increment(state.count)
        t = count.astype(jnp.float32)
        gamma, w = clock_steps(clock, beta, 2, t)
        leaves = _leaves("scale_by_lorapre_muon", updates, weight_dimension_numbers)
        out, mus = [], []
        for (_, g, v), mu in zip(leaves, _factor_list(state.mu)):
            gm = v.to_matrix(g.astype(jnp.float32))
            m = w * core.reconstruct(mu) + (1 - beta) * gm
            if nesterov:
                m = beta * m / (1 - beta ** (t + 1)) + (1 - beta) * gm / (1 - beta ** t)
            else:
                m = m / (1 - beta ** t)
            p, q = v.shape[-2:]
            o = core.newton_schulz(m, ns_steps, eps) * max(1.0, q / p) ** 0.5
            out.append(v.from_matrix(o).astype(g.dtype))
            mus.append(core.newton_step(mu, gm, gamma, damping))
        mu_def = jax.tree.structure(state.mu, is_leaf=lambda x: isinstance(x, core.Factors))
        return jax.tree.structure(updates).unflatten(out), LoRAPreMuonState(
            count=count, mu=mu_def.unflatten(mus))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
