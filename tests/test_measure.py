"""Tests of subspace_jax.measure: memory, residuals, FLOPs, timing, bytes, doctests."""

import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import subspace_jax.measure as measure
from subspace_jax import forms
from subspace_jax.measure import (
    compare, compiled_memory, flops, peak_rss_bytes, report, saved_residuals, time_fn,
    tree_nbytes)

F32 = jnp.float32


def _normal(seed, shape, scale=1.0):
    return jax.random.normal(jax.random.key(seed), shape, F32) * scale


# ----------------------------------------------------------------------------------- memory

def test_memory_argument_exact_and_total_formula():
    x, w = _normal(0, (8, 16)), _normal(1, (16, 4))
    m = compiled_memory(lambda x, w: jnp.tanh(x @ w), x, w)
    assert m.argument == x.nbytes + w.nbytes == 8 * 16 * 4 + 16 * 4 * 4
    assert m.output == 8 * 4 * 4
    assert m.alias == 0
    assert m.total == m.argument + m.output - m.alias + m.temp
    assert "total" in str(m)


def test_memory_donation_shows_as_alias():
    x = _normal(0, (32, 32))
    plain = compiled_memory(jax.jit(lambda x: x * 2), x)
    donated = compiled_memory(jax.jit(lambda x: x * 2, donate_argnums=0), x)
    assert plain.alias == 0
    assert donated.alias == x.nbytes
    assert donated.total == donated.argument + donated.output - donated.alias + donated.temp


def test_memory_shape_dtype_struct_compiled_and_static_flag():
    sds = jax.ShapeDtypeStruct((64, 64), jnp.bfloat16)
    assert compiled_memory(lambda x: x @ x, sds).argument == 64 * 64 * 2
    compiled = jax.jit(lambda x: x + 1).lower(sds).compile()
    assert compiled_memory(compiled).output == 64 * 64 * 2

    def f(x, square):  # a Python bool steers tracing: it must be closed over, not traced
        return x @ x if square else x
    x = _normal(0, (8, 8))
    assert compiled_memory(f, x, True).argument == x.nbytes
    assert flops(f, x, True).matmul == 2 * 8 ** 3
    assert flops(f, x, False).matmul == 0
    saved = {s: [(r.shape, r.is_input) for r in saved_residuals(
        lambda x, s: (f(x, s) ** 2).sum(), x, s).items] for s in (True, False)}
    # d(x @ x)^2 needs x and the product; d(x^2) needs only the product
    assert saved == {True: [((8, 8), True), ((8, 8), False)], False: [((8, 8), False)]}


def test_memory_rejects_non_callable():
    with pytest.raises(TypeError, match="callable"):
        compiled_memory(3, jnp.ones(2))


# -------------------------------------------------------------------------------- residuals

def _mlp_loss(params, x):
    h = jnp.tanh(x @ params["w1"])
    out = jnp.tanh(h @ params["w2"])
    return jnp.mean(out ** 2)


def test_residuals_of_two_layer_mlp():
    b, i, h, o = 16, 8, 32, 4
    params = {"w1": _normal(0, (i, h)), "w2": _normal(1, (h, o))}
    res = saved_residuals(_mlp_loss, params, _normal(2, (b, i)))
    print(res.table())
    activations = [r for r in res.items if r.source.startswith("output of tanh")]
    assert sorted(r.shape for r in activations) == [(b, o), (b, h)]
    inputs = {r.source for r in res.items if r.is_input}
    assert inputs == {"from the argument params['w1']", "from the argument params['w2']",
                      "from the argument x"}
    assert all(r.nbytes == math.prod(r.shape) * 4 for r in res.items)
    assert res.nbytes == sum(r.nbytes for r in res.items)
    assert res.nbytes_excluding_arguments == sum(r.nbytes for r in res.items if not r.is_input)
    assert res.nbytes - res.nbytes_excluding_arguments == (i * h + h * o + b * i) * 4


def test_residuals_argnums_counts_other_args_as_inputs():
    w, x = _normal(0, (8, 3)), _normal(1, (4, 8))
    res = saved_residuals(lambda w, x: (x @ w).sum(), w, x, argnums=0)
    assert [r.shape for r in res.items] == [(4, 8)]  # dW = x^T g needs x only, not w
    assert res.items[0].is_input and res.nbytes_excluding_arguments == 0
    both = saved_residuals(lambda w, x: (x @ w).sum(), w, x)
    assert sorted(r.shape for r in both.items) == [(4, 8), (8, 3)]
    flagged = saved_residuals(lambda w, x, s: (x @ w).sum() if s else w.sum(), w, x, True,
                              argnums=0)  # a Python flag beside argnums
    assert [r.shape for r in flagged.items] == [(4, 8)]
    with pytest.raises(ValueError, match="out of range"):
        saved_residuals(lambda w, x: (x @ w).sum(), w, x, argnums=2)


L, B, H = 8, 256, 256


def _block(h, w):
    a, b = w
    return h + jnp.tanh(h @ a) @ b


def _scan_loss(ws, x, remat):
    body = lambda h, w: (_block(h, w), None)  # noqa: E731
    if remat:
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    h, _ = jax.lax.scan(body, x, ws)
    return jnp.mean(h ** 2)


def _unrolled_loss(ws, x, remat):
    h = x
    for layer in range(ws[0].shape[0]):
        h = (jax.checkpoint(_block) if remat else _block)(h, (ws[0][layer], ws[1][layer]))
    return jnp.mean(h ** 2)


@pytest.fixture(scope="module")
def deep_mlp():
    ws = (_normal(0, (L, H, H), 1 / 16), _normal(1, (L, H, H), 1 / 16))
    return ws, _normal(2, (B, H))


def test_remat_inside_scan_saves_residuals_and_compiled_temp(deep_mlp):
    ws, x = deep_mlp
    res = {r: saved_residuals(_scan_loss, ws, x, r) for r in (False, True)}
    mem = {r: compiled_memory(jax.grad(_scan_loss), ws, x, r) for r in (False, True)}
    for r in (False, True):
        print(f"scan L={L} B={B} H={H} remat={r}: residuals {res[r].nbytes / 2**20:.2f} MiB "
              f"({res[r].nbytes_excluding_arguments / 2**20:.2f} MiB excluding arguments), "
              f"grad temp {mem[r].temp / 2**20:.2f} MiB, total {mem[r].total / 2**20:.2f} MiB")
    assert res[True].nbytes < res[False].nbytes
    assert res[True].nbytes_excluding_arguments < res[False].nbytes_excluding_arguments
    assert mem[True].temp < mem[False].temp
    assert mem[True].argument == mem[False].argument == tree_nbytes((ws, x))


def test_unrolled_checkpoint_reduces_residuals_at_jaxpr_level(deep_mlp):
    ws, x = deep_mlp
    res = {r: saved_residuals(_unrolled_loss, ws, x, r) for r in (False, True)}
    temp = {r: compiled_memory(jax.grad(_unrolled_loss), ws, x, r).temp for r in (False, True)}
    for r in (False, True):
        print(f"unrolled remat={r}: {len(res[r])} residuals, "
              f"{res[r].nbytes_excluding_arguments / 2**20:.2f} MiB excluding arguments; "
              f"compiled grad temp {temp[r] / 2**20:.2f} MiB (XLA:CPU may undo remat)")
    assert res[True].nbytes_excluding_arguments < res[False].nbytes_excluding_arguments
    assert len(res[True]) < len(res[False])


# ------------------------------------------------------------------------------------ flops

def test_flops_dense_matmul_exact_and_xla_sane():
    b, i, o = 32, 64, 16
    f = flops(lambda x, w: x @ w, _normal(0, (b, i)), _normal(1, (i, o)))
    assert f.matmul == 2 * b * i * o
    assert f.conv == 0 and not f.has_while
    assert 0.5 <= f.xla / f.matmul <= 2.0
    batched = flops(lambda x, w: jnp.einsum("nbi,nio->nbo", x, w),
                    _normal(0, (3, b, i)), _normal(1, (3, i, o)))
    assert batched.matmul == 3 * 2 * b * i * o


def test_flops_grad_counts_forward_and_backward():
    b, i, o = 16, 32, 8
    w, x = _normal(0, (i, o)), _normal(1, (b, i))
    loss = lambda w, x: jnp.sum((x @ w) ** 2)  # noqa: E731
    one = 2 * b * i * o
    assert flops(jax.grad(loss), w, x).matmul == 2 * one  # forward + dW
    assert flops(jax.grad(loss, argnums=(0, 1)), w, x).matmul == 3 * one  # + dx
    # dead code is eliminated: the forward of a linear loss is not needed for dW
    assert flops(jax.grad(lambda w, x: jnp.sum(x @ w)), w, x).matmul == one


def test_flops_scan_multiplies_by_trip_count_xla_counts_one_body():
    n, b, h = 6, 16, 64
    step = lambda c, w: (c @ w, None)  # noqa: E731
    f = flops(lambda x, ws: jax.lax.scan(step, x, ws)[0], _normal(0, (b, h)),
              _normal(1, (n, h, h)))
    one_layer = 2 * b * h * h
    print(f"scan of {n} matmuls: {f}")
    assert f.matmul == n * one_layer
    assert 0.5 <= f.xla / one_layer <= 2.0  # XLA's cost_analysis counts the body once


def test_flops_sub_jaxprs_cond_while_and_calls():
    x = _normal(0, (8, 8))
    one = 2 * 8 ** 3

    @jax.custom_vjp
    def cv(a):
        return a @ a
    cv.defvjp(lambda a: (a @ a, a), lambda a, g: (g @ a.T + a.T @ g,))

    @jax.custom_jvp
    def cj(a):
        return a @ a
    cj.defjvp(lambda p, t: (cj(p[0]), t[0] @ p[0] + p[0] @ t[0]))

    def calls(a):
        return jax.jit(lambda a: a @ a)(a) + jax.checkpoint(lambda a: a @ a)(a) + cv(a) + cj(a)
    assert flops(calls, x).matmul == 4 * one
    cond = flops(lambda a, p: jax.lax.cond(p, lambda a: a @ a @ a, lambda a: a, a), x, True)
    assert cond.matmul == 2 * one  # the larger branch
    loop = flops(lambda a: jax.lax.while_loop(lambda c: c[0] < 5,
                                              lambda c: (c[0] + 1, c[1] @ c[1]), (0, a))[1], x)
    assert loop.matmul == one and loop.has_while


def test_flops_conv_and_shard_map(four_devices):
    n, c, o, s, k = 2, 3, 5, 8, 3
    conv = flops(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME"),
                 _normal(0, (n, c, s, s)), _normal(1, (o, c, k, k)))
    assert conv.conv == 2 * (n * o * s * s) * c * k * k and conv.matmul == 0

    mesh = jax.make_mesh((4,), ("x",), devices=four_devices)
    x = jax.device_put(_normal(0, (16, 8)), NamedSharding(mesh, P("x")))
    w = jax.device_put(_normal(1, (8, 4)), NamedSharding(mesh, P()))
    sharded = jax.shard_map(lambda x, w: x @ w, mesh=mesh, in_specs=(P("x"), P()),
                            out_specs=P("x"))
    assert flops(sharded, x, w).matmul == 2 * 16 * 8 * 4  # body (4 rows) x 4 devices


def test_flops_rejects_compiled():
    compiled = jax.jit(jnp.sin).lower(jnp.ones(2)).compile()
    with pytest.raises(TypeError, match="jaxpr"):
        flops(compiled)


# ----------------------------------------------------------------------------------- timing

def _sleeping(seconds, fn):
    """``fn`` after ``seconds`` of sleep: a call that lasts at least that long."""
    def slow(*args):
        time.sleep(seconds)
        return fn(*args)
    return slow


def test_time_fn_shapes_and_validation():
    calls = []
    fn = _sleeping(0.005, jax.jit(jnp.sin))
    t = time_fn(lambda x: calls.append(1) or fn(x), jnp.ones(16), warmup=1, repeats=4)
    print("times", t.times)
    assert len(calls) == 1 + 4 and len(t.times) == 4 and all(s >= 0.005 for s in t.times)
    assert t.min == min(t.times) and t.median == float(np.median(t.times))
    with pytest.raises(ValueError, match="repeats"):
        time_fn(jnp.sin, jnp.ones(2), repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        time_fn(jnp.sin, jnp.ones(2), warmup=-1)


def test_compare_alternates_and_ratio_is_median_ratio():
    calls = []

    def recorded(name, fn):
        def wrapper(*args):
            calls.append(name)
            return fn(*args)
        return wrapper

    x = jnp.ones(64)
    sleeps = {"a": 0.002, "b": 0.03, "c": 0.002}
    fns = {"a": (recorded("a", _sleeping(sleeps["a"], jax.jit(jnp.sin))), (x,)),
           "b": (recorded("b", _sleeping(sleeps["b"], jax.jit(jnp.cos))), (x,)),
           "c": (recorded("c", _sleeping(sleeps["c"], jax.jit(jnp.tanh))), (x,))}
    c = compare(fns, warmup=1, repeats=3)
    assert calls == ["a", "b", "c"] * 4  # 1 warm-up round + 3 timed rounds, round-robin
    assert list(c.timings) == ["a", "b", "c"]
    assert all(c.median(n) >= sleeps[n] and len(c.timings[n].times) == 3 for n in "abc")
    assert c.ratio("b", "a") > 1  # 30 ms of sleep against 2 ms
    assert c.ratio("a", "b") == c.median("a") / c.median("b")
    print(c.table())
    assert c.table().splitlines()[2].endswith(f"{c.ratio('b', 'a'):.3f}x")
    with pytest.raises(TypeError, match="pair"):
        compare({"a": jnp.sin})
    with pytest.raises(ValueError, match="at least one"):
        compare({})


# ------------------------------------------------------------------------------ bytes, RSS

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Factors:
    u: jax.Array
    v: jax.Array
    rank: int = dataclasses.field(metadata=dict(static=True))


def test_tree_nbytes():
    tree = {"a": {"w": jnp.ones((4, 8), F32), "b": jnp.ones((8,), jnp.bfloat16)},
            "f": _Factors(jnp.ones((4, 2), jnp.bfloat16), jnp.ones((2, 8), F32), 2),
            "s": jax.ShapeDtypeStruct((3, 5), F32), "step": 7, "none": None}
    assert tree_nbytes(tree) == 4 * 8 * 4 + 8 * 2 + 4 * 2 * 2 + 2 * 8 * 4 + 3 * 5 * 4
    assert tree_nbytes({}) == 0


def test_peak_rss_is_bytes():
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc to read the kernel's own high-water mark")
    peak = peak_rss_bytes()
    with open("/proc/self/status") as fh:
        hwm_kib = next(int(ln.split()[1]) for ln in fh if ln.startswith("VmHWM:"))
    print(f"peak RSS {peak / 2**20:.1f} MiB, VmHWM {hwm_kib / 2**10:.1f} MiB")
    # same counter read two ways (the kernel's RSS counters are batched: allow 10%);
    # a forgotten KiB -> bytes conversion would be off by 1024x
    assert 0.9 < peak / (hwm_kib * 1024) < 1.1


def test_report_bundles_grad_step():
    params = {"w1": _normal(0, (8, 16)), "w2": _normal(1, (16, 4))}
    x = _normal(2, (32, 8))
    r = report(_mlp_loss, params, x)
    print(r.table())
    assert r.memory.argument == tree_nbytes((params, x))
    assert r.flops.matmul == flops(jax.value_and_grad(_mlp_loss), params, x).matmul
    assert not any(i.source.startswith("from the argument x") for i in r.residuals.items)
    assert len(r.table().splitlines()) == 3


def test_stop_gradient_activation_counts_and_frozen_parameter_does_not():
    """Hand-counted: loss(a) = sum(sg(sin(x)) @ a) + sum(a @ frozen(w)), x (4, 8), a, w (8, 8).

    Both terms are linear in ``a``: the backward pass needs sg(sin(x)) (4, 8) float32 =
    128 B, an activation computed under stop_gradient, and w (8, 8) = 256 B, a frozen
    parameter tagged by ``forms.stop_gradient``. Only the 128 B are extra memory.
    """
    x, w, a = jnp.ones((4, 8)), jnp.ones((8, 8)), jnp.ones((8, 8))

    def loss(a, w, x):
        act = jax.lax.stop_gradient(jnp.sin(x))
        return jnp.sum(act @ a) + jnp.sum(a @ forms.stop_gradient(w))

    res = measure.saved_residuals(loss, a, w, x, argnums=0)
    print(res.table())
    assert res.nbytes_excluding_arguments == 4 * 8 * 4
    assert res.nbytes == 4 * 8 * 4 + 8 * 8 * 4
    (frozen,) = [r for r in res.items if r.is_input]
    assert frozen.shape == (8, 8) and forms.FROZEN_NAME in frozen.source
    # the same activation behind stop_gradient was excluded before this fix: it must count
    (act,) = [r for r in res.items if not r.is_input]
    assert act.source.startswith("output of stop_gradient") and act.shape == (4, 8)


