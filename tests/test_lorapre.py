"""LoRA-Pre: closed-form low-rank moments against Adam's exact ones, and the optax contract.

Exact where the maths is exact (AdamW-routed leaves, state sizes, gauge invariance),
properties otherwise (EMA tracking on exactly low-rank gradient streams, convergence).
optax's own wrappers (``inject_hyperparams``, ``MultiSteps``, ``adamw``) mix Python floats
with int32 counts, so the tests that run them do so under standard dtype promotion;
LoRA-Pre's own transforms run under the suite's strict promotion.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from subspace_jax import measure
from subspace_jax.lorapre import (DimensionNumbers, core, labels, lorapre, lorapre_muon,
                                  moments, scale_by_lorapre, scale_by_lorapre_muon)

STANDARD = jax.numpy_dtype_promotion("standard")  # for optax's own wrappers only


def _stream(key, p, q, k, steps):
    """Gradients of exact rank ``k`` in a fixed subspace: a persistent part plus noise."""
    kl, kr, kc = jax.random.split(key, 3)
    left = jax.random.normal(kl, (p, k))
    right = jax.random.normal(kr, (k, q))
    signal = jnp.diag(jnp.arange(1.0, k + 1))
    noise = jax.random.normal(kc, (steps, k, k))
    return jnp.einsum("pk,tkl,lq->tpq", left, signal + noise, right)


def _run(tx, grads):
    """Feed ``grads`` (stacked on axis 0) through ``tx`` with a scan; all updates and states."""
    state = tx.init({"w": grads[0]})

    def body(state, g):
        u, state = tx.update({"w": g}, state, {"w": g})
        return state, (u["w"], state)

    return jax.lax.scan(body, state, grads)[1]


# --- the moments track Adam's exact ones ------------------------------------------------

def _rank_one_stream(key, p, q, scales):
    """``g_t = c_t a b^T``: gradients whose moments (of ``g`` and of ``|g|``) are rank 1."""
    ka, kb = jax.random.split(key)
    a, b = jax.random.normal(ka, (p,)), jax.random.normal(kb, (q,))
    return scales[:, None, None] * jnp.outer(a, b)


def _adam(grads, **kwargs):
    with STANDARD:
        return _run(optax.scale_by_adam(**kwargs), grads)


@pytest.mark.parametrize("rank", [4, 8])
def test_first_moment_is_adams_bias_corrected_one_on_exact_low_rank_stream(rank):
    """The factors hold Adam's ``mhat`` from step 1 (rank >= the stream's 4), and the moment
    the step uses, ``b1 (1 - b1^(t-1)) M + (1 - b1) g``, is Adam's zero-started ``m_t``."""
    grads = _stream(jax.random.key(1), 64, 48, 4, 300)
    _, states = _run(scale_by_lorapre(rank=rank, b1=0.9), grads)
    adam_mu = _adam(grads, b1=0.9)[1].mu["w"]
    t = jnp.arange(1.0, 301.0)[:, None, None]
    product = jax.vmap(core.reconstruct)(states.mu["w"])
    rel = lambda x, y: jnp.linalg.norm(x - y, axis=(1, 2)) / jnp.linalg.norm(y, axis=(1, 2))  # noqa: E731
    err = rel(product, adam_mu / (1 - 0.9 ** t))
    mixed = 0.9 * (1 - 0.9 ** t[1:] / 0.9) * product[:-1] + 0.1 * grads[1:]
    err_mixed = rel(mixed, adam_mu[1:])
    print(f"rank {rank}: factor product vs Adam's mhat, steps 1-300: max rel. error "
          f"{err.max():.2e}; mixed moment vs Adam's m: {err_mixed.max():.2e}")
    assert err.max() < 1e-4 and err_mixed.max() < 1e-4


@pytest.mark.parametrize("rank", [1, 3])
def test_update_equals_adams_on_rank_one_stream_with_constant_scale(rank):
    """Exactly low-rank moments, a constant scale: no Jensen gap, so the update is
    ``optax.scale_by_adam``'s from step 1; the paper's clock is far off for hundreds of steps."""
    grads = _rank_one_stream(jax.random.key(11), 64, 48, jnp.full(200, 0.7))
    adam, _ = _adam(grads, b1=0.9, b2=0.95)
    ours, _ = _run(scale_by_lorapre(rank=rank), grads)
    paper, _ = _run(scale_by_lorapre(rank=rank, clock="paper"), grads)
    rel = lambda u: jnp.abs(u - adam).max(axis=(1, 2)) / jnp.abs(adam).max(axis=(1, 2))  # noqa: E731
    ratio = np.median(np.asarray(paper / adam).reshape(len(grads), -1), axis=1)
    print(f"rank {rank}: max rel. difference to Adam's update, steps 1-200: unbiased "
          f"{rel(ours).max():.1e}; paper's clock: median update / Adam's at steps "
          "5/10/30/60/100: " + "/".join(f"{ratio[t - 1]:.2f}" for t in (5, 10, 30, 60, 100)))
    np.testing.assert_allclose(ours, adam, rtol=2e-5, atol=1e-6)
    assert rel(paper)[99] > 0.1  # the option reproduces a different (the printed) algorithm


def test_update_differs_from_adams_only_by_the_jensen_gap_with_varying_scale():
    """With ``c_t`` uniform in [0.5, 1.5] the factors still hold ``mhat`` and ``phat``
    exactly, so the update is the scalar recursion's ``mhat / sqrt(vhat_abs)`` with
    ``vhat_abs = [b2 (1 - b2^(t-1)) phat_{t-1}^2 + (1 - b2) c_t^2] / (1 - b2^t)`` (to
    float32), and its ratio to Adam's is the Jensen gap, bounded here."""
    b1, b2, steps = 0.9, 0.95, 200
    c = jax.random.uniform(jax.random.key(12), (steps,), minval=0.5, maxval=1.5)
    grads = _rank_one_stream(jax.random.key(13), 64, 48, c)
    ours, _ = _run(scale_by_lorapre(rank=2, b1=b1, b2=b2), grads)
    adam, _ = _adam(grads, b1=b1, b2=b2)
    m, v, phat, rho, predicted = 0.0, 0.0, 0.0, b2 ** 0.5, []
    for t, ct in enumerate(np.asarray(c, np.float64), start=1):
        m = b1 * m + (1 - b1) * ct
        vabs = (b2 * (1 - b2 ** (t - 1)) * phat ** 2 + (1 - b2) * ct ** 2) / (1 - b2 ** t)
        predicted.append(m / (1 - b1 ** t) / np.sqrt(vabs))
        phat += (1 - rho) / (1 - rho ** t) * (abs(ct) - phat)
    sign = np.sign(np.asarray(grads[0]))  # g / |g| on the rank-one stream; eps ~ 1e-8 apart
    np.testing.assert_allclose(ours, np.asarray(predicted)[:, None, None] * sign,
                               rtol=2e-4, atol=1e-6)
    ratio = np.asarray(ours / adam)[9:]
    print(f"update / Adam's, steps 10-{steps}: min {ratio.min():.4f}, median "
          f"{np.median(ratio):.4f}, max {ratio.max():.4f} (Jensen: (EMA|c|)^2 <= EMA c^2)")
    assert 0.995 < ratio.min() and ratio.max() < 1.08


def test_paper_clock_is_algorithm_one_as_printed():
    """``clock="paper"``: constant steps ``1 - sqrt(b1)``, ``1 - b2^(1/4)`` and Adam's
    corrections on ``b1 M + (1 - b1) g``, ``b2 P^2 + (1 - b2) g^2`` (replayed by hand)."""
    grads = _stream(jax.random.key(14), 24, 16, 2, 40)
    b1, b2, eps = 0.9, 0.95, 1e-8
    ours, _ = _run(scale_by_lorapre(rank=2, b1=b1, b2=b2, eps=eps, clock="paper"), grads)
    state = scale_by_lorapre(rank=2).init({"w": grads[0]})
    mu, nu = state.mu["w"], state.nu["w"]
    for t, g in enumerate(grads, start=1):
        m = b1 * core.reconstruct(mu) + (1 - b1) * g
        v = b2 * jnp.square(core.reconstruct(nu)) + (1 - b2) * g ** 2
        want = (m / (1 - b1 ** t)) / (jnp.sqrt(v / (1 - b2 ** t)) + eps)
        np.testing.assert_allclose(ours[t - 1], want, rtol=1e-5, atol=1e-6)
        mu = core.newton_step(mu, g, core.gamma_for(b1))
        nu = core.newton_step(nu, jnp.abs(g), core.gamma_for(b2, power=4))


def test_sequential_factor_step_beats_simultaneous_on_noisy_stream():
    """The reason for the Gauss-Seidel order: the simultaneous one is quadratic in ``g``."""
    grads = _stream(jax.random.key(2), 48, 32, 3, 200)
    gamma = core.gamma_for(0.9)

    def errors(sequential):
        def body(carry, g):
            f, exact = carry
            f, exact = core.newton_step(f, g, gamma, sequential=sequential), 0.9 * exact + 0.1 * g
            return (f, exact), jnp.linalg.norm(core.reconstruct(f) - exact) / jnp.linalg.norm(exact)

        f0 = core.init_factors(jax.random.key(0), grads[0].shape, 3)
        return jax.lax.scan(body, (f0, jnp.zeros_like(grads[0])), grads)[1][50:].mean()

    seq, sim = float(errors(True)), float(errors(False))
    print(f"mean rel. error, steps 50-200: sequential {seq:.2e}, simultaneous {sim:.2e}")
    assert seq < 1e-3 and 5 * seq < sim


def test_second_moment_factors_fit_abs_gradient():
    """``(v_B v_A)^2`` is the square of the bias-corrected EMA (decay sqrt(b2)) of ``|g|``."""
    key_s, key_c = jax.random.split(jax.random.key(3))
    u, v = jnp.arange(1.0, 33.0), jnp.linspace(0.5, 2.0, 24)
    scales = 1.0 + jax.random.uniform(key_c, (200,))
    signs = jnp.where(jax.random.bernoulli(key_s, 0.5, (200, 32, 24)), 1.0, -1.0)
    grads = signs * scales[:, None, None] * jnp.outer(u, v)          # |g| has rank 1
    _, states = _run(scale_by_lorapre(rank=2, b2=0.95), grads)
    ema, decay = jnp.zeros((32, 24)), 0.95 ** 0.5
    for g in grads:
        ema = decay * ema + (1 - decay) * jnp.abs(g)
    ema = ema / (1 - decay ** len(grads))
    v_hat = jnp.square(core.reconstruct(jax.tree.map(lambda x: x[-1], states.nu["w"])))
    assert float(jnp.linalg.norm(v_hat - ema ** 2) / jnp.linalg.norm(ema ** 2)) < 1e-5


def test_step_one_is_finite_and_equals_adam():
    g = {"w": jax.random.normal(jax.random.key(4), (16, 12))}
    tx = scale_by_lorapre(rank=4)
    state = tx.init(g)
    assert float(jnp.abs(state.mu["w"].B).max()) == 0.0  # factors start at zero
    u, state = jax.jit(tx.update)(g, state)
    with STANDARD:
        adam, _ = optax.scale_by_adam(b2=0.95).update(g, optax.scale_by_adam(b2=0.95).init(g))
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state))
    np.testing.assert_allclose(u["w"], adam["w"], rtol=1e-6)


def test_rebalance_keeps_product_and_newton_step_is_gauge_equivariant():
    k1, k2, k3 = jax.random.split(jax.random.key(5), 3)
    f = core.Factors(jax.random.normal(k1, (10, 3)), jax.random.normal(k2, (3, 7)))
    t = jax.random.normal(k3, (10, 7))
    m = jnp.diag(jnp.array([2.0, 1.0, 0.5]))
    g = core.Factors(f.B @ m, jnp.linalg.inv(m) @ f.A)
    a, b = core.newton_step(f, t, 0.3), core.newton_step(g, t, 0.3)
    np.testing.assert_allclose(core.reconstruct(a), core.reconstruct(b), rtol=1e-4, atol=1e-4)


# --- routing, exact AdamW leaves, state size ----------------------------------------------

def _mixed_params(dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(6), 5)
    return {"w": jax.random.normal(keys[0], (24, 16), dtype),
            "b": jax.random.normal(keys[1], (16,), dtype),
            "small": jax.random.normal(keys[2], (4, 16), dtype),     # min(p, q) <= rank
            "embed": jax.random.normal(keys[3], (32, 16), dtype),    # named by adamw_mask
            "k3": jax.random.normal(keys[4], (16, 2, 8), dtype)}     # 3-D, no dim numbers


def test_labels_route_vectors_small_matrices_and_masked_leaves_to_adamw():
    params = _mixed_params()
    got = labels(params, rank=4, adamw_mask={"w": False, "b": False, "small": False,
                                             "embed": True, "k3": False})
    assert got == {"w": "lorapre", "b": "adamw", "small": "adamw", "embed": "adamw",
                   "k3": "adamw"}
    got = labels(params, rank=4, weight_dimension_numbers=lambda p: {
        k: (DimensionNumbers(0, (1, 2)) if v.ndim == 3 else None) for k, v in p.items()})
    assert got["k3"] == "lorapre" and got["w"] == "adamw"
    optax_spec = {"w": optax.contrib.MuonDimensionNumbers(), "b": None, "small": None,
                  "embed": None, "k3": None}  # optax's spec types are accepted too
    assert labels(params, rank=4, weight_dimension_numbers=optax_spec)["w"] == "lorapre"


def test_adamw_leaves_are_bit_identical_to_optax_adamw():
    params = _mixed_params()
    schedule = optax.linear_schedule(1e-2, 1e-3, 5)
    decay = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # noqa: E731
    kwargs = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    tx = lorapre(schedule, rank=4, weight_decay_mask=decay,
                 adamw_mask=lambda p: {k: k == "embed" for k in p}, **kwargs)
    with STANDARD:
        ref = optax.adamw(schedule, mask=decay, **kwargs)
    step = lambda tx: jax.jit(lambda g, s, p: tx.update(g, s, p))  # noqa: E731
    s, s_ref = tx.init(params), jax.jit(ref.init)(params)
    for i in range(3):
        g = jax.tree.map(lambda x: jnp.sin(x * (i + 1)), params)
        u, s = step(tx)(g, s, params)
        with STANDARD:
            u_ref, s_ref = step(ref)(g, s_ref, params)
        for name in ("b", "small", "embed", "k3"):
            np.testing.assert_array_equal(u[name], u_ref[name], err_msg=name)
        if i:  # step 1 equals Adam's in exact arithmetic (bit-equal on GPU); later ones differ
            assert not np.array_equal(u["w"], u_ref["w"])
        params = optax.apply_updates(params, u)


@pytest.mark.parametrize("shape, spec, rank", [
    ((24, 16), None, 4),
    ((16, 2, 8), DimensionNumbers(0, (1, 2)), 3),     # (embed, heads, head_dim) as one matrix
    ((3, 12, 10), DimensionNumbers(1, 2), 2),         # batch axis 0: three matrices
])
def test_state_bytes_are_2r_p_plus_q_per_matrix_plus_count(shape, spec, rank):
    params = {"w": jnp.ones(shape, jnp.bfloat16)}
    dims = None if spec is None else {"w": spec}
    state = scale_by_lorapre(rank=rank, weight_dimension_numbers=dims).init(params)
    batch = shape[0] if len(shape) == 3 and spec == DimensionNumbers(1, 2) else 1
    p = shape[0] if batch == 1 else shape[1]
    q = int(np.prod(shape)) // (batch * p)
    assert measure.tree_nbytes(state) == 4 * batch * 2 * rank * (p + q) + 4
    muon = scale_by_lorapre_muon(rank=rank, weight_dimension_numbers=dims).init(params)
    assert measure.tree_nbytes(muon) == 4 * batch * rank * (p + q) + 4
    assert state.mu["w"].B.dtype == jnp.float32


# --- the optax contract ---------------------------------------------------------------------

def test_moments_reads_the_factors_through_any_wrapper_by_parameter_path():
    from flax import nnx

    params = {"enc": {"w": jnp.ones((32, 16)), "small": jnp.ones((3, 3))}, "b": jnp.zeros(16)}
    grads = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), params)
    with STANDARD:
        wrapped = [lorapre(1e-3, rank=4),
                   optax.chain(optax.clip_by_global_norm(1.0), lorapre(1e-3, rank=4)),
                   optax.inject_hyperparams(lorapre, static_args=("rank",))(1e-3, rank=4),
                   optax.MultiSteps(lorapre(1e-3, rank=4), every_k_schedule=2)]
        for tx in wrapped:
            state = tx.init(params)
            _, state = tx.update(grads, state, params)
            low = moments(state)
            assert list(low) == ["enc/w"], list(low)  # AdamW's leaves are absent
            inner = jax.tree.leaves(state, is_leaf=lambda x: isinstance(
                x, type(low["enc/w"].first)))
            assert any(x is low["enc/w"].first for x in inner)
            np.testing.assert_allclose(low["enc/w"].m(), low["enc/w"].first.B
                                       @ low["enc/w"].first.A)
            np.testing.assert_allclose(low["enc/w"].v(), jnp.square(
                low["enc/w"].second.B @ low["enc/w"].second.A))
        muon = moments(lorapre_muon(1e-3, rank=4).init(params))["enc/w"]
        assert muon.second is None and muon.v() is None and muon.m().shape == (32, 16)
        # an nnx.State: the paths are the model's, not the Variables' insides
        state = nnx.state(nnx.Linear(32, 16, rngs=nnx.Rngs(0)), nnx.Param)
        assert list(moments(lorapre(1e-3, rank=4).init(state))) == ["kernel"]
        with pytest.raises(ValueError, match="no LoRA-Pre state.*found 0"):
            moments(optax.adam(1e-3).init(params))
        two = optax.chain(lorapre(1e-3, rank=4), lorapre(1e-3, rank=2))
        with pytest.raises(ValueError, match="more than one.*found 2"):
            moments(two.init(params))


def test_jit_does_not_recompile_and_accepts_extra_args():
    traces = []
    params = _mixed_params()
    tx = lorapre(1e-3, rank=4)

    @jax.jit
    def step(params, state):
        traces.append(1)
        g = jax.tree.map(jnp.cos, params)
        u, state = tx.update(g, state, params, unexpected_extra_arg=1)
        return optax.apply_updates(params, u), state

    state = tx.init(params)
    for _ in range(3):
        params, state = step(params, state)
    assert len(traces) == 1


def test_abstract_init_matches_concrete():
    params = _mixed_params()
    for tx in (lorapre(1e-3, rank=4), lorapre_muon(1e-3, rank=4)):
        abstract = jax.eval_shape(tx.init, params)
        concrete = tx.init(params)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(
            lambda x: (x.shape, x.dtype), concrete)


@pytest.mark.parametrize("factory, kwargs", [
    (lorapre, dict(rank=4, weight_decay=0.1)),
    (lorapre_muon, dict(rank=4, adam_learning_rate=1e-3))])
def test_inject_hyperparams_gives_the_plain_results(factory, kwargs):
    params = _mixed_params()
    plain = factory(1e-2, **kwargs)
    static = ("rank", "ns_steps") if factory is lorapre_muon else ("rank",)  # shapes, loops
    with STANDARD:
        injected = optax.inject_hyperparams(factory, static_args=static)(1e-2, **kwargs)
        s, s_inj = jax.jit(plain.init)(params), jax.jit(injected.init)(params)
        for _ in range(3):
            g = jax.tree.map(jnp.cos, params)
            u, s = jax.jit(plain.update)(g, s, params)
            u_inj, s_inj = jax.jit(injected.update)(g, s_inj, params)
            for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_inj)):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
            params = optax.apply_updates(params, u)
    for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(s_inj.inner_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_multisteps_gives_the_plain_results():
    params = _mixed_params()
    grads = [jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)), params) for i in range(4)]
    plain = lorapre(1e-2, rank=4)
    with STANDARD:
        multi = optax.MultiSteps(lorapre(1e-2, rank=4), every_k_schedule=2)
        s, s_multi = plain.init(params), multi.init(params)
        for i in range(0, 4, 2):
            mean = jax.tree.map(lambda a, b: (a + b) / 2, grads[i], grads[i + 1])
            u, s = jax.jit(plain.update)(mean, s, params)
            zero, s_multi = jax.jit(multi.update)(grads[i], s_multi, params)
            assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(zero))
            u_multi, s_multi = jax.jit(multi.update)(grads[i + 1], s_multi, params)
            for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_multi)):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_map_params_and_bfloat16_dtype():
    params = _mixed_params(jnp.bfloat16)
    tx = lorapre(1e-3, rank=4)
    state = optax.tree.map_params(tx, lambda v: v, tx.init(params))
    u, state = jax.jit(tx.update)(params, state, params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
    assert moments(state)["w"].first.B.dtype == jnp.float32


def test_state_is_sharded_like_its_parameter(four_devices):
    """Eager ``init`` places ``B`` along ``p`` and ``A`` along ``q`` like the parameter; a
    step jitted with the state's shardings as ``out_shardings`` keeps them (Auto mesh)."""
    mesh = jax.make_mesh((2, 2), ("x", "y"), devices=four_devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)
    specs = {"w": P("x", "y"), "b": P("y")}
    params = {"w": jnp.ones((32, 16)), "b": jnp.zeros(16)}
    params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
    tx = lorapre(1e-3, rank=4)
    state = tx.init(params)
    low = moments(state)["w"]
    for factors in (low.first, low.second):
        assert factors.B.sharding.is_equivalent_to(NamedSharding(mesh, P("x", None)), 2)
        assert factors.A.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "y")), 2)
    replicated = NamedSharding(mesh, P())  # step counts live on one device until jitted
    shardings = jax.tree.map(lambda x: x.sharding if isinstance(x.sharding, NamedSharding)
                             else replicated, (params, state))
    step = jax.jit(tx.update, out_shardings=shardings)
    u, new_state = step(params, state, params)
    u, new_state = step(u, new_state, params)
    assert jax.tree.map(lambda x: x.sharding, (u, new_state)) == shardings
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(new_state))


# --- convergence --------------------------------------------------------------------------

def _minimise(tx, params, loss, steps):
    def body(carry, _):
        params, state = carry
        u, state = tx.update(jax.grad(loss)(params), state, params)
        return (optax.apply_updates(params, u), state), None

    with STANDARD:
        return jax.lax.scan(body, (params, tx.init(params)), length=steps)[0][0]


@pytest.mark.parametrize("make", [lambda: lorapre(0.05, rank=2),
                                  lambda: lorapre_muon(0.05, rank=2)])
def test_converges_on_matrix_quadratic_and_rosenbrock(make):
    target = jax.random.normal(jax.random.key(7), (12, 10))
    loss = lambda p: (jnp.sum((p["w"] - target) ** 2)  # noqa: E731
                      + (1 - p["r"][0]) ** 2 + 100 * (p["r"][1] - p["r"][0] ** 2) ** 2)
    params = {"w": jnp.zeros((12, 10)), "r": jnp.zeros(2)}
    out = _minimise(make(), params, loss, 3000)
    np.testing.assert_allclose(out["w"], target, atol=3e-2)
    np.testing.assert_allclose(out["r"], jnp.ones(2), atol=3e-2)


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_variant_equals_optax_muon_on_exact_low_rank_stream(nesterov):
    """Exactly rank-3 gradients, rank-3 factors: the factors hold optax's bias-corrected
    momentum from step 1, so the update is ``optax.contrib.scale_by_muon``'s (same
    Newton-Schulz, same width scale). This stream's third direction is weak (singular
    values 109, 51 and 2.5 at step 1): its Gram has a condition number near 2000, which
    leaves about 3e-5 of float32 error, and the default relative damping ``1e-6`` would
    shrink its fit by about ``1e-6 * mean / s^2`` (8e-4 here), so the check runs at
    ``damping=1e-8``."""
    grads = _stream(jax.random.key(8), 48, 32, 3, 120)
    ours, states = _run(scale_by_lorapre_muon(rank=3, nesterov=nesterov, damping=1e-8), grads)
    with STANDARD:
        ref, ref_states = _run(optax.contrib.scale_by_muon(
            nesterov=nesterov,
            weight_dimension_numbers={"w": optax.contrib.MuonDimensionNumbers(0, 1)}), grads)
    paper, _ = _run(scale_by_lorapre_muon(rank=3, nesterov=nesterov, clock="paper"), grads)
    t = jnp.arange(1.0, 121.0)[:, None, None]
    rel = lambda u, r: jnp.linalg.norm(u - r, axis=(1, 2)) / jnp.linalg.norm(r, axis=(1, 2))  # noqa: E731
    momentum = rel(jax.vmap(core.reconstruct)(states.mu["w"]),
                   ref_states.mu["w"] / (1 - 0.95 ** t))
    print(f"Muon, steps 1-120: momentum rel. difference max {momentum.max():.1e}, update "
          f"{rel(ours, ref).max():.1e} (paper's clock: update {rel(paper, ref)[:10].max():.2f} "
          f"in steps 1-10, {rel(paper, ref)[60:].max():.1e} in 60-120)")
    assert momentum.max() < 1e-4 and rel(ours, ref).max() < 2e-4
    assert rel(paper, ref)[:10].max() > 0.05


# --- errors at construction -------------------------------------------------------------------

@pytest.mark.parametrize("build, match", [
    (lambda: lorapre(1e-3, rank=0), "rank=0"),
    (lambda: lorapre(1e-3, rank=2.0), "rank=2.0"),
    (lambda: lorapre(1e-3, b1=1.0), r"b1=1.0 must lie in \[0, 1\)"),
    (lambda: lorapre(1e-3, b2=-0.1), "b2=-0.1"),
    (lambda: lorapre(1e-3, scale=0.0), "scale=0.0"),
    (lambda: scale_by_lorapre(rank=-1), "rank=-1"),
    (lambda: lorapre_muon(1e-3, beta=1.5), "beta=1.5"),
    (lambda: scale_by_lorapre_muon(rank=0), "rank=0"),
    (lambda: lorapre(1e-3, clock="adam"), r"clock='adam' must be one of \('unbiased', 'paper'\)"),
    (lambda: lorapre_muon(1e-3, clock=None), "clock=None"),
])
def test_bad_hyperparameters_fail_at_construction(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_dimension_numbers_that_do_not_fit_name_the_leaf():
    params = {"attn": {"qkv": jnp.ones((16, 3, 8))}, "b": jnp.ones(8)}
    spec = {"attn": {"qkv": DimensionNumbers(0, (1, 3))}, "b": None}
    with pytest.raises(ValueError, match=r"attn/qkv.*\(16, 3, 8\)"):
        lorapre(1e-3, rank=2, weight_dimension_numbers=spec).init(params)
    with pytest.raises(ValueError, match=r"leaf 'b' of shape \(8,\)"):
        scale_by_lorapre(rank=2).init(params)
    with pytest.raises(ValueError, match="overlap"):
        scale_by_lorapre(rank=2, weight_dimension_numbers=DimensionNumbers(0, 0)).init(
            {"w": jnp.ones((4, 4))})
    with pytest.raises(ValueError, match="not a prefix"):
        lorapre(1e-3, rank=2, weight_dimension_numbers={"x": None}).init(params)


def test_update_holds_no_dense_matrix_temporary():
    """Adam's update holds no ``p x q`` temporary; LoRA-Pre's (row-chunked) holds one
    ``rows x q`` chunk of each dense moment (and of the step) at a time, not ``M``, ``P`` or
    ``|g|`` whole (the compiled program's ``temp`` bytes), also where ``p`` has no divisor near the chunk
    size (the prime 1031: the last chunk overlaps its neighbour)."""
    for p, q in ((640, 2048), (1031, 1024)):
        g = {"w": jnp.ones((p, q))}
        temps = {}
        for name, tx in (("adam", optax.scale_by_adam()), ("lorapre", scale_by_lorapre(8))):
            with STANDARD:
                state = tx.init(g)
                temps[name] = measure.compiled_memory(jax.jit(tx.update), g, state).temp
        rows = core.row_chunk(p, q)
        print(f"{p}x{q}: temp bytes Adam {temps['adam']}, LoRA-Pre {temps['lorapre']} "
              f"(one p x q matrix: {4 * p * q}; a chunk: {4 * rows * q})")
        assert temps["lorapre"] <= 3 * 4 * rows * q + 4 * 8 * (p + q) * 8
        assert temps["lorapre"] < 4 * p * q  # less than one dense matrix (it held two)


def test_clip_inside_the_update_equals_clipping_before_it_without_the_copy():
    """``lorapre(clip=c)`` gives ``chain(clip_by_global_norm(c), lorapre())``'s updates (the
    clip active and not, matrices and AdamW leaves alike) while its compiled update holds
    no clipped copy of the gradient matrix, which the chained one does (the chunk loop
    cannot fuse the clip's multiply, so it is a dense temporary there)."""
    k1, k2 = jax.random.split(jax.random.key(3))
    params = {"w": jax.random.normal(k1, (640, 512)), "b": jnp.zeros(512)}
    inside = lorapre(1e-3, rank=4, weight_decay=0.1, clip=1.0)
    chained = optax.chain(optax.clip_by_global_norm(1.0), lorapre(1e-3, rank=4,
                                                                 weight_decay=0.1))
    s_in, s_ch = inside.init(params), chained.init(params)
    for step, size in enumerate((1e-4, 5.0, 3.0)):   # not clipped, clipped, clipped
        g = jax.tree.map(lambda x: size * jax.random.normal(jax.random.fold_in(k2, step),
                                                            x.shape), params)
        u_in, s_in = jax.jit(inside.update)(g, s_in, params)
        u_ch, s_ch = jax.jit(chained.update)(g, s_ch, params)
        for k in params:   # float rounding only (the factors' r x r solves amplify it)
            err = float(jnp.linalg.norm(u_in[k] - u_ch[k]) / jnp.linalg.norm(u_ch[k]))
            assert err < 1e-5, (step, k, err)
    m_in, m_ch = moments(s_in)["w"].m(), moments(s_ch)["w"].m()
    assert float(jnp.linalg.norm(m_in - m_ch) / jnp.linalg.norm(m_ch)) < 1e-5
    g = jax.tree.map(jnp.ones_like, params)
    temps = {name: measure.compiled_memory(jax.jit(tx.update), g, tx.init(params), params).temp
             for name, tx in (("inside", inside), ("chained", chained))}
    dense = 4 * 640 * 512
    print(f"temp bytes: clip inside {temps['inside']}, clip chained before "
          f"{temps['chained']} (one dense matrix {dense})")
    # the chained one holds the clipped copy of g besides the step (the chunk loop's output,
    # which scale, decay and learning rate then read: one dense matrix in both)
    assert temps["chained"] - temps["inside"] >= 0.99 * dense
    assert temps["inside"] < 2 * dense
    with pytest.raises(ValueError, match=r"clip=0 must be a number > 0"):
        lorapre(1e-3, clip=0)
