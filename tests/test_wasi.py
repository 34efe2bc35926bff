"""WASI: custom-VJP gradients, compressed residuals, weight refresh, conversion, calibration."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from subspace_jax import checkpoint, forms, linalg, measure, rules, train, wasi
from subspace_jax.wasi import calibration, core


def _rule(**settings):
    return wasi.WasiRule(pattern=wasi.MLP_PATTERN, **settings)


def _full_ranks(shape):
    return tuple(min(d, int(np.prod(shape)) // d) for d in shape)


SHAPES = [(3, 5, 6), (2, 3, 4, 6)]


# --- the custom VJP ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=["3d", "4d"])
@pytest.mark.parametrize("order", ["paper", "project"])
def test_full_rank_gradients_equal_dense_autodiff(shape, order):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, shape)
    w = jax.random.normal(kw, (6, 7))
    g = jax.random.normal(kg, shape[:-1] + (7,))
    low = forms.LowRank.from_dense(w, rank=6, split=1.0)
    factors = linalg.hosvd(x, ranks=_full_ranks(shape)).factors

    def op(cfg, x, w, a, b):
        return jnp.sum(core.wasi_matmul(cfg, x, w, a, b, factors)[0] * g)

    def dense(x, a, b):
        return jnp.sum(x @ a @ b * g)

    want = jax.grad(dense, argnums=(0, 1, 2))(x, low.a, low.b)
    got = jax.grad(lambda x, a, b: op(core.OpConfig(order=order), x, None, a, b),
                   argnums=(0, 1, 2))(x, low.a, low.b)
    for name, u, v in zip(("dx", "da", "db"), got, want):
        err = float(jnp.abs(u - v).max() / jnp.abs(v).max())
        print(f"{shape} {order} factored {name}: max rel err {err:.2e}")
        assert err < 1e-5
    cfg = core.OpConfig(variant="master", order=order, w_dtype=jnp.float32)
    dw = jax.grad(lambda w: op(cfg, x, w, low.a, low.b))(w)
    dw_dense = jnp.einsum("...i,...o->io", x, g)
    assert float(jnp.abs(dw - dw_dense).max() / jnp.abs(dw_dense).max()) < 1e-5


@pytest.mark.parametrize("shape", SHAPES, ids=["3d", "4d"])
def test_converted_layer_gradients_equal_dense_layer(shape):
    x = jax.random.normal(jax.random.key(1), shape)
    dense = nnx.Dict(mlp=nnx.Dict(up=nnx.Linear(6, 5, rngs=nnx.Rngs(0))))
    conv = wasi.convert(dense, _rule(energy=1.0, activation_ranks=_full_ranks(shape)),
                        sample=lambda m: m["mlp"]["up"](x), verbose=False)
    assert conv["mlp"]["up"].kernel.get_value().rank == 5

    def loss(model, x):
        return jnp.sum(jnp.sin(model["mlp"]["up"](x)))

    gd, gx_dense = nnx.grad(loss, argnums=(0, 1))(dense, x)
    gc, gx = nnx.grad(loss, argnums=(0, 1))(conv, x)
    k = conv["mlp"]["up"].kernel.get_value()
    dw = gd["mlp"]["up"]["kernel"].get_value()
    np.testing.assert_allclose(gx, gx_dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gc["mlp"]["up"]["kernel"].get_value().a, dw @ k.b.T, atol=1e-4)
    np.testing.assert_allclose(gc["mlp"]["up"]["kernel"].get_value().b, k.a.T @ dw, atol=1e-4)
    np.testing.assert_allclose(gc["mlp"]["up"]["bias"].get_value(),
                               gd["mlp"]["up"]["bias"].get_value(), atol=1e-5)


def test_truncated_gradient_error_matches_calibration_table():
    x = jax.random.normal(jax.random.key(2), (8, 12, 16))
    g = jax.random.normal(jax.random.key(3), (8, 12, 5))
    opts = calibration.rank_options(x, g, (0.5, 0.8, 1.0))
    print([(o.eps, o.ranks, o.nbytes, round(o.error, 4)) for o in opts])
    assert [o.nbytes for o in opts] == sorted(o.nbytes for o in opts)
    assert opts[-1].error < 1e-5 < opts[0].error
    t = linalg.hosvd(x, eps=0.5)
    exact = jnp.einsum("...i,...o->io", x, g)
    approx = core.tucker_weight_grad(t.core, t.factors, g, order="paper")
    err = float(jnp.linalg.norm(approx - exact) / jnp.linalg.norm(exact))
    assert abs(err - opts[0].error) < 1e-4


def test_saved_residuals_hold_no_full_size_input():
    x = jax.random.normal(jax.random.key(0), (4, 16, 32))
    dense = nnx.Dict(mlp=nnx.Dict(up=nnx.Linear(32, 8, rngs=nnx.Rngs(0))))
    conv = wasi.convert(dense, sample=lambda m: m["mlp"]["up"](2.0 * x), verbose=False)

    def residuals(model):
        graphdef, params, rest = train.split_model(model)

        def loss(p, x):
            return jnp.sum(jnp.sin(nnx.merge(graphdef, p, rest, copy=True)["mlp"]["up"](2.0 * x)))

        return measure.saved_residuals(loss, params, x, argnums=0)

    res_dense, res = residuals(dense), residuals(conv)
    print(res_dense.table(), res.table(), sep="\n")
    extra = [r for r in res.items if not r.is_input]
    assert any(r.shape == x.shape and not r.is_input for r in res_dense.items)  # the test can fail
    assert all(int(np.prod(r.shape)) < x.size for r in extra)
    plan, = wasi.plans(conv)
    tucker = sum(r.nbytes for r in extra if "'compress'" in r.source)
    assert tucker == plan.compressed_bytes  # measured residual bytes == the analytic count


# --- the weight side --------------------------------------------------------------------------

def _near_low_rank(key, shape, rank):
    k1, k2, k3 = jax.random.split(key, 3)
    u = jax.random.normal(k1, (shape[0], rank))
    v = jax.random.normal(k2, (rank, shape[1]))
    return u @ v * jnp.linspace(2.0, 1.0, shape[1]) + 0.05 * jax.random.normal(k3, shape)


def test_master_handover_never_flips_a_rank_one_term():
    w0 = _near_low_rank(jax.random.key(0), (48, 64), 8)        # (in, out); WASI's W is w0^T
    low = forms.LowRank.from_dense(w0, eps=0.9, split=1.0)     # step 0: SVD
    w1 = w0 + 1e-3 * jax.random.normal(jax.random.key(1), w0.shape)
    # the reference code's step: QR without sign fix, R from the previous basis
    q_raw, _ = jnp.linalg.qr(w1.T @ (w1 @ low.b.T))
    assert bool((jnp.diag(q_raw.T @ low.b.T) < 0).any())       # raw QR flips some terms here
    ref_product = (w1 @ low.b.T) @ q_raw.T
    a1, b1 = core.refresh_master(w1, low.b)                    # step 1: subspace iteration
    align = jnp.diag(b1 @ low.b.T)
    best = forms.LowRank.from_dense(w1, rank=low.rank).materialize()
    err = float(jnp.linalg.norm(a1 @ b1 - w1) / jnp.linalg.norm(w1))
    err_best = float(jnp.linalg.norm(best - w1) / jnp.linalg.norm(w1))
    err_ref = float(jnp.linalg.norm(ref_product - w1) / jnp.linalg.norm(w1))
    print(f"hand-over: min alignment {float(align.min()):.4f}, error {err:.4f} "
          f"(best rank-{low.rank} {err_best:.4f}, reference-code step {err_ref:.4f})")
    assert float(align.min()) > 0.99
    assert err < err_best * 1.01 + 1e-6 < err_ref


def test_orth_and_compress_match_householder_references():
    p = jax.random.normal(jax.random.key(0), (200, 12)) * jnp.logspace(0, -3, 12)
    q, r = core.orth(p)
    q_ref, _ = linalg.qr_positive(p)
    np.testing.assert_allclose(q, q_ref, atol=1e-4)
    np.testing.assert_allclose(q.T @ q, jnp.eye(12), atol=1e-5)
    assert float(jnp.diag(r).min()) > 0
    q0, _ = core.orth(jnp.zeros((5, 2)).at[0, 0].set(1.0))   # rank-deficient: falls back
    assert bool(jnp.all(jnp.isfinite(q0)))
    x = jax.random.normal(jax.random.key(1), (6, 8, 10, 12))
    prev = linalg.hosvd(x, ranks=(3, 4, 5, 6)).factors
    t, ref = core.compress(x, prev), linalg.hosvd_step(x, prev)
    np.testing.assert_allclose(linalg.tucker_reconstruct(t), linalg.tucker_reconstruct(ref),
                               atol=1e-4)


@pytest.mark.parametrize("shape", SHAPES, ids=["3d", "4d"])
def test_weight_grad_orders_and_core_gradient_agree_at_full_rank(shape):
    x = jax.random.normal(jax.random.key(0), shape)
    g = jax.random.normal(jax.random.key(1), shape[:-1] + (5,))
    t = linalg.hosvd(x, ranks=_full_ranks(shape))
    dense = jnp.einsum("...i,...o->io", x, g)
    for order in ("paper", "project", "auto"):
        np.testing.assert_allclose(core.tucker_weight_grad(t.core, t.factors, g, order=order),
                                   dense, atol=1e-4)
    m = core.core_gradient(t.core, t.factors, g)
    np.testing.assert_allclose(t.factors[-1] @ m, dense, atol=1e-4)


def test_step_orthonormalisation_has_no_branch_and_keeps_basis_on_breakdown():
    x = jax.random.normal(jax.random.key(1), (6, 8, 10))
    prev = linalg.hosvd(x, ranks=(2, 3, 4)).factors
    assert "cond" not in str(jax.make_jaxpr(core.compress)(x, prev))
    a, b = jnp.ones((5, 2)), jnp.eye(2, 4)
    assert "cond" not in str(jax.make_jaxpr(core.refresh_factored)(a, b))
    deficient = jnp.zeros((2, 4)).at[0, 0].set(1.0)             # rank 1: Cholesky breaks down
    a1, b1 = core.refresh_factored(a, deficient)
    np.testing.assert_array_equal(b1, deficient)                 # kept, finite
    np.testing.assert_array_equal(a1, a)
    keep = jnp.eye(6, 2)
    np.testing.assert_array_equal(core._orth_or_keep(jnp.zeros((6, 2)), keep), keep)


def test_factored_refresh_keeps_product_and_signs():
    low = forms.LowRank.from_dense(_near_low_rank(jax.random.key(0), (48, 64), 8), eps=0.9,
                                   split=1.0)
    a = low.a + 1e-2 * jax.random.normal(jax.random.key(1), low.a.shape)   # an optimizer step
    b = low.b + 1e-2 * jax.random.normal(jax.random.key(2), low.b.shape)
    a1, b1 = core.refresh_factored(a, b)
    np.testing.assert_allclose(a1 @ b1, a @ b, atol=1e-5)
    np.testing.assert_allclose(b1 @ b1.T, jnp.eye(low.rank), atol=1e-5)
    assert float(jnp.diag(b1 @ low.b.T).min()) > 0.99
    # equals WASI's subspace-iteration step on the (rank-K) product
    q, r = linalg.subspace_iteration((a @ b).T, b.T)
    np.testing.assert_allclose(r.T @ q.T, a1 @ b1, atol=1e-4)


def _mlp(seed=0):
    rngs = nnx.Rngs(seed)
    return nnx.Dict(mlp=nnx.Dict(up=nnx.Linear(16, 32, rngs=rngs),
                                 down=nnx.Linear(32, 16, rngs=rngs)),
                    head=nnx.Linear(16, 1, rngs=rngs))


def _forward(m, x):
    return m["head"](m["mlp"]["down"](jax.nn.gelu(m["mlp"]["up"](x))))


def _data(batch=8):
    x = jax.random.normal(jax.random.key(5), (batch, 6, 16))
    y = jnp.sin(x.sum(-1, keepdims=True))
    return x, y


def _loss(model, batch, key):
    x, y = batch
    return jnp.mean((_forward(model, x) - y) ** 2)


@pytest.mark.parametrize("variant", ["factored", "master"])
def test_train_step_refreshes_state_without_retracing(variant):
    x, y = _data()
    model = wasi.convert(_mlp(), _rule(energy=0.9, activation_eps=0.9),
                         sample=lambda m: _forward(m, x), variant=variant, verbose=False)
    graphdef, params, rest = train.split_model(model)
    traces = []

    def loss(model, batch, key):
        traces.append(1)
        return _loss(model, batch, key)

    tx = train.adamw(1e-2, 20)   # global-norm clipping maps over the kernel forms too
    step = train.make_train_step(graphdef, loss, tx, post_update=wasi.post_update)
    opt = train.init_optimizer(tx, params)
    first_basis = jax.tree.map(jnp.copy, params["mlp"]["up"]["kernel"].get_value().basis)
    losses = []
    for i in range(20):
        batch = (x + 0.1 * jax.random.normal(jax.random.key(i), x.shape), y)
        params, opt, rest, m = step(params, opt, rest, batch, jax.random.key(i))
        losses.append(float(m["loss"]))
        k = params["mlp"]["up"]["kernel"].get_value()
        assert isinstance(k, wasi.WasiMasterKernel) == (variant == "master")
        np.testing.assert_allclose(k.b @ k.b.T, jnp.eye(k.rank), atol=1e-5)
    print(f"{variant}: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert len(traces) == 1
    assert losses[-1] < 0.8 * losses[0]
    new_basis = params["mlp"]["up"]["kernel"].get_value().basis   # absorbed every step
    assert any(not np.allclose(u, v) for u, v in zip(new_basis, first_basis))
    if variant == "master":   # the factors follow the master kernel's top-K subspace
        form = params["mlp"]["up"]["kernel"].get_value()
        proj = form.w @ form.b.T @ form.b
        np.testing.assert_allclose(form.materialize(), proj, atol=1e-4)


def test_eval_accepts_other_batch_and_leaves_state():
    x, _ = _data()
    model = wasi.convert(_mlp(), sample=lambda m: _forward(m, x), verbose=False)
    graphdef, params, rest = train.split_model(model)
    before = jax.tree.map(np.asarray, params)
    big = jnp.ones((3 * x.shape[0], 6, 16))
    out = nnx.merge(graphdef, params, rest, copy=True)
    with forms.collect() as emitted:
        y = _forward(out, big)
    assert y.shape == (24, 6, 1)
    for name in ("up", "down"):     # undifferentiated: the bases come back unchanged
        kernel = params["mlp"][name]["kernel"].get_value()
        jax.tree.map(np.testing.assert_array_equal, emitted[f"mlp/{name}/kernel"], kernel.basis)
    after = jax.tree.map(np.asarray, train.split_model(out)[1])
    jax.tree.map(np.testing.assert_array_equal, before, after)


# --- conversion, tree functions, inference, checkpoints ------------------------------------------

def test_tree_factorize_on_dict_and_state_matches_convert():
    x, _ = _data()
    model = _mlp()
    _, params = nnx.split(model, nnx.Param)
    as_dict = jax.tree.map(lambda v: v, params.to_pure_dict())
    on_state = wasi.factorize(params, energy=0.8)
    on_dict = wasi.factorize(as_dict, energy=0.8)
    conv = wasi.convert(model, _rule(energy=0.8), sample=lambda m: _forward(m, x), verbose=False)
    graphdef = nnx.graphdef(model)
    pure = wasi.transform(as_dict, _rule(energy=0.8),
                          sample=lambda p: _forward(nnx.merge(graphdef, p), x))
    for name in ("up", "down"):
        k_state = on_state["mlp"][name]["kernel"].get_value()
        k_dict = on_dict["mlp"][name]["kernel"]
        k_conv = conv["mlp"][name].kernel.get_value()
        k_pure = pure["mlp"][name]["kernel"]
        assert k_state.rank == k_dict.rank == k_conv.rank == k_pure.rank < min(k_state.shape)
        np.testing.assert_array_equal(k_state.b, k_conv.b)
        np.testing.assert_array_equal(k_pure.b, k_conv.b)       # a pure dict, as the model
        jax.tree.map(np.testing.assert_array_equal, k_pure.basis, k_conv.basis)
    assert not forms.is_form(on_dict["head"]["kernel"])
    assert pure["head"]["kernel"] is as_dict["head"]["kernel"]  # unselected: the input's own
    scaled = forms.LowRank(2 * k_dict.a, 3 * k_dict.b)
    tree = wasi.orthonormalize({"mlp": {"up": {"kernel": scaled}}})
    k2 = tree["mlp"]["up"]["kernel"]
    np.testing.assert_allclose(k2.materialize(), 6 * k_dict.materialize(), rtol=1e-4, atol=1e-4)


def test_attention_rule_and_summary_table():
    x, _ = _data()
    model = nnx.Dict(attn=nnx.Dict(q=nnx.Linear(16, 16, rngs=nnx.Rngs(0))), **_mlp())
    rule = [_rule(), rules.Rule(pattern=wasi.ATTENTION_PATTERN)]   # a plain Rule: defaults
    conv, plans = wasi.convert(model, rule, sample=lambda m: _forward(m, m["attn"]["q"](x)),
                               verbose=False, return_plans=True)
    assert isinstance(conv["attn"]["q"].kernel.get_value(), wasi.WasiKernel)
    assert not forms.is_form(conv["head"].kernel.get_value())
    table = wasi.summary(plans)
    print(table)
    assert table == wasi.summary(conv)
    assert {"attn/q/kernel", "mlp/up/kernel", "mlp/down/kernel"} <= {
        line.split()[0] for line in table.splitlines()}
    assert all(p.eps == 0.4 for p in plans)   # no eps, ranks or budget: the default eps


@pytest.mark.parametrize("variant", ["factored", "master"])
def test_export_is_factored_and_checkpoints(tmp_path, variant):
    x, _ = _data()
    conv = wasi.convert(_mlp(), sample=lambda m: _forward(m, x), variant=variant, verbose=False)
    plain = wasi.export(conv)
    _, state = nnx.split(plain)
    shapes = [leaf.shape for leaf in jax.tree.leaves(state)]
    assert (16, 32) not in shapes and (32, 16) not in shapes      # no dense MLP kernel
    assert type(state["mlp"]["up"]["kernel"].get_value()) is forms.LowRank  # no basis
    jax.tree.map(np.testing.assert_array_equal, wasi.export(nnx.state(conv)), state)
    big = jnp.ones((5, 6, 16))
    np.testing.assert_allclose(_forward(plain, big), _forward(conv, big), atol=1e-5)
    flops = measure.flops(jax.jit(lambda s: _forward(nnx.merge(nnx.graphdef(plain), s), big)),
                          state).matmul
    k_up, k_down = (plain["mlp"][n].kernel.get_value() for n in ("up", "down"))
    assert flops == 30 * 2 * (k_up.rank * 48 + k_down.rank * 48 + 16)
    path = checkpoint.save(tmp_path / "ckpt", state)
    restored = checkpoint.restore(path, checkpoint.abstract(state))
    again = nnx.merge(nnx.graphdef(plain), restored)
    np.testing.assert_array_equal(_forward(again, big), _forward(plain, big))
    # the training state (params + method state) round-trips too
    graphdef, params, rest = train.split_model(conv)
    path = checkpoint.save(tmp_path / "train", {"params": params, "rest": rest})
    back = checkpoint.restore(path, checkpoint.abstract({"params": params, "rest": rest}))
    jax.tree.map(np.testing.assert_array_equal, back["rest"], rest)


# --- errors -----------------------------------------------------------------------------------

def test_errors_name_the_layer():
    x, _ = _data()
    sample = lambda m: _forward(m, x)  # noqa: E731
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"WasiRule.*energy.*\(0, 1\]"):
            _rule(energy=bad)
        with pytest.raises(ValueError, match=r"WasiRule.*activation_eps must be in \(0, 1\]"):
            _rule(activation_eps=bad)
    with pytest.raises(TypeError, match=r"energy moved to the rules.*WasiRule"):
        wasi.convert(_mlp(), sample=sample, energy=0.9, verbose=False)
    with pytest.raises(ValueError, match=r"'mlp/(up|down)/kernel'.*rank 9 of mode 0.*\[1, 8\]"):
        wasi.convert(_mlp(), _rule(activation_ranks=(9, 2, 2)), sample=sample, verbose=False)
    with pytest.raises(ValueError, match=r"never called the layers of the kernels.*mlp/down"):
        wasi.convert(_mlp(), sample=lambda m: m["mlp"]["up"](x), verbose=False)
    conv = wasi.convert(_mlp(), sample=sample, verbose=False)
    graphdef, params, rest = train.split_model(conv)
    step = train.make_train_step(graphdef, _loss, optax.sgd(0.1), post_update=wasi.post_update)
    opt = train.init_optimizer(optax.sgd(0.1), params)
    with pytest.raises(ValueError, match=r"'mlp/up/kernel'.*\(4, 6, 16\) differs from the "
                                         r"calibrated.*\(8, 6, 16\)"):
        step(params, opt, rest, (x[:4], x[:4, :, :1]), jax.random.key(0))
    conv_model = nnx.Dict(mlp=nnx.Dict(conv=nnx.Conv(2, 3, (3, 3), rngs=nnx.Rngs(0)),
                                       up=nnx.Linear(4, 4, rngs=nnx.Rngs(0))))
    with pytest.raises(ValueError, match=r"'mlp/conv/kernel'.*4-D kernel of shape "
                                         r"\(3, 3, 2, 3\) needs in_axes"):
        wasi.convert(conv_model, sample=lambda m: m["mlp"]["up"](jnp.ones((2, 4))), verbose=False)
    with pytest.raises(ValueError, match=r"'mlp/conv/kernel'.*needs in_axes"):
        _, params = nnx.split(conv_model, nnx.Param)
        wasi.factorize(params)
    with pytest.raises(TypeError, match=r"'mlp/up/kernel'.*already|WasiKernel form"):
        wasi.convert(conv, sample=sample, verbose=False)
    with pytest.raises(ValueError, match="variant"):
        wasi.convert(_mlp(), sample=sample, variant="svd", verbose=False)


# --- calibration ------------------------------------------------------------------------------

@pytest.mark.parametrize("error", ["absolute", "relative"])
def test_knapsack_is_optimal_against_brute_force(error):
    rng = np.random.default_rng(0)
    scales = rng.uniform(0.1, 10.0, 4)  # each layer's ||dW||: the absolute errors differ
    layers = [[calibration.RankOption(e, (1,), int(rng.integers(1, 20)) * 1024, rel, rel * s)
               for e, rel in zip((0.4, 0.6, 0.9), rng.random(3))] for s in scales]
    value = (lambda o: o.abs_error) if error == "absolute" else (lambda o: o.error)  # noqa: E731
    for budget in (10, 25, 40, 80):
        picks = calibration.knapsack(layers, budget * 1024, error=error)
        cost = sum(layers[i][j].nbytes for i, j in enumerate(picks))
        err = sum(value(layers[i][j]) for i, j in enumerate(picks))
        feasible = [c for c in itertools.product(range(3), repeat=4)
                    if sum(layers[i][j].nbytes for i, j in enumerate(c)) <= budget * 1024]
        if not feasible:    # budget raised to the minimum: every layer's smallest option
            assert picks == [int(np.argmin([o.nbytes for o in opts])) for opts in layers]
            continue
        best = min(sum(value(layers[i][j]) for i, j in enumerate(c)) for c in feasible)
        assert cost <= budget * 1024 and err == pytest.approx(best)


def test_absolute_knapsack_gives_the_large_gradient_layer_more_memory():
    """The paper sums ||dW - dW~||_F: a layer whose gradient is 1000x larger weighs 1000x
    more. The relative sum (each error over its own ||dW||) ignores that, so it shares the
    same budget differently."""
    keys = jax.random.split(jax.random.key(3), 4)
    x_a, x_b = (jax.random.normal(k, (8, 16, 32)) for k in keys[:2])
    g_a, g_b = (jax.random.normal(k, (8, 16, 24)) for k in keys[2:])
    layers = [calibration.rank_options(x_a, g_a), calibration.rank_options(x_b, 1000 * g_b)]
    bytes_b = {}
    differ = []
    for budget in sorted({a.nbytes + b.nbytes for a in layers[0] for b in layers[1]}):
        picks = {e: calibration.knapsack(layers, budget, unit=64, error=e)
                 for e in calibration.ERRORS}
        bytes_b = {e: layers[1][p[1]].nbytes for e, p in picks.items()}
        assert bytes_b["absolute"] >= bytes_b["relative"], (budget, picks)
        if picks["absolute"] != picks["relative"]:
            differ.append((budget, picks))
    print(f"{len(differ)} budgets allocate differently, e.g. {differ[:2]}")
    assert differ
    with pytest.raises(ValueError, match="abs_error"):
        calibration.knapsack([[calibration.RankOption(0.4, (1,), 1024, 0.5)]], 4096)
    with pytest.raises(ValueError, match="error='mean'"):
        calibration.knapsack(layers, 4096, error="mean")


def test_convert_with_budget_uses_the_table():
    x, _ = _data()
    sample = lambda m: jnp.sum(_forward(m, x) ** 2)  # noqa: E731
    _, tight = wasi.convert(_mlp(), sample=sample, budget_bytes=0, verbose=False,
                            return_plans=True)
    _, loose = wasi.convert(_mlp(), sample=sample, budget_bytes=10**9, verbose=False,
                            return_plans=True)
    with pytest.raises(ValueError, match="knapsack_error='mean'"):
        wasi.convert(_mlp(), sample=sample, budget_bytes=0, knapsack_error="mean", verbose=False)
    for t, lo in zip(tight, loose):
        assert len(t.options) == len(calibration.EPS_GRID)
        assert t.eps == 0.4 and lo.eps == 0.9
        assert t.compressed_bytes < lo.compressed_bytes
    print(wasi.summary(tight), wasi.summary(loose), sep="\n")
    # a layer with its own eps is fixed; the knapsack shares what it leaves of the budget
    mixed_rules = [wasi.WasiRule(pattern="mlp/up/kernel", activation_eps=0.9),
                   wasi.WasiRule(pattern="mlp/down/kernel")]
    _, mixed = wasi.convert(_mlp(), mixed_rules, sample=sample, budget_bytes=0, verbose=False,
                            return_plans=True)
    mixed, tight = ({p.path: p for p in plans} for plans in (mixed, tight))
    up, down = mixed["mlp/up/kernel"], mixed["mlp/down/kernel"]
    assert (up.eps, up.options, down.eps) == (0.9, (), 0.4)
    assert down.act_ranks == tight["mlp/down/kernel"].act_ranks
