"""The contract every kernel form honours, parametrised over all forms.

A new form joins by adding an entry to ``FORMS``: ``factory(key, (in, out), dtype)``
returns a kernel of that logical shape and dtype whose product is not trivially zero, and
``bits(dtype)`` is the number of bits it must store, counted by hand for ``SHAPE``.
Differentiated contractions run on ``(ROWS, in)`` inputs (WASI's form keeps the Tucker basis
of a calibrated activation shape for its backward). A form whose training needs the train
step's ``post_update`` (WASI's master variant re-derives its forward factors there) names it
in ``POST_UPDATE``.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from subspace_jax import checkpoint, forms, linalg, littlebit, lora, measure, nested, train, wasi


def _dense(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _low_rank(key, shape, dtype):
    return forms.LowRank.from_dense(_dense(key, shape, jnp.float32), rank=3, dtype=dtype)


def _lora(key, shape, dtype):
    k1, k2 = jax.random.split(key)
    adapter = lora.LoRA.init(k1, _dense(k2, shape, dtype), rank=3, alpha=6.0)
    return dataclasses.replace(adapter, b=_dense(key, adapter.b.shape, dtype))  # non-zero update


def _nested(key, shape, dtype):
    return nested.Nested.from_dense(_dense(key, shape, jnp.float32), max_rank=5, dtype=dtype)


def _littlebit(key, shape, dtype):  # rank 8, residual path: two of everything
    return littlebit.BinaryLowRank.from_dense(_dense(key, shape, jnp.float32), rank=8,
                                              itq_iters=5, key=key, dtype=dtype)


def _littlebit_packed(key, shape, dtype):  # uint8 words: SHAPE exercises the padding
    return _littlebit(key, shape, dtype).deploy()


def _wasi(key, shape, dtype):
    """WASI's factored kernel at rank 6 (``b`` orthonormal) with the float32 Tucker basis
    (ranks (8, 4)) of a ``(ROWS, in)`` activation."""
    low = forms.LowRank.from_dense(_dense(key, shape, jnp.float32), rank=6, split=1.0,
                                   dtype=dtype)
    x = jax.random.normal(jax.random.fold_in(key, 1), (ROWS, shape[0]))
    return wasi.WasiKernel(low.a, low.b, tuple(linalg.hosvd(x, ranks=(8, 4)).factors),
                           key="contract")


def _wasi_master(key, shape, dtype):
    """WASI's master variant: the ``(in, out)`` master matrix in the dtype trains, the float32
    rank-6 factors (its SVD; re-derived by ``wasi.post_update``) and basis are frozen."""
    w = _dense(key, shape, jnp.float32)
    low = forms.LowRank.from_dense(w, rank=6, split=1.0)
    x = jax.random.normal(jax.random.fold_in(key, 1), (ROWS, shape[0]))
    return wasi.WasiMasterKernel(low.a, low.b, tuple(linalg.hosvd(x, ranks=(8, 4)).factors),
                                 w=w.astype(dtype), key="contract")


SHAPE = (16, 12)
ROWS = 32
_IN, _OUT = SHAPE
_BITS = {jnp.dtype(jnp.float32): 32, jnp.dtype(jnp.bfloat16): 16}
# name -> (factory, stored bits for SHAPE in a dtype): hand counts, not the forms' formulas
FORMS = {
    "dense": (_dense, lambda dtype: _BITS[dtype] * _IN * _OUT),
    # latent U (out, 8), V (in, 8), scales h (out), g (in), lu, lv (8), per path
    "littlebit": (_littlebit,
                  lambda dtype: _BITS[dtype] * 2 * (_OUT * 8 + _IN * 8 + _OUT + _IN + 8 + 8)),
    # signs packed in uint8 along in/out (16 -> 2 bytes, 12 -> 2 bytes, 4 padding bits) per
    # rank column, float16 scales h, g and the fused l, per path
    "littlebit_packed": (_littlebit_packed,
                         lambda dtype: 2 * (8 * 8 * (2 + 2) + 16 * (_OUT + _IN + 8))),
    "low_rank": (_low_rank, lambda dtype: _BITS[dtype] * 3 * (_IN + _OUT)),
    "lora": (_lora, lambda dtype: _BITS[dtype] * (_IN * _OUT + 3 * (_IN + _OUT))),
    # 5 nested components, each a column of a (in) and a row of b (out)
    "nested": (_nested, lambda dtype: _BITS[dtype] * 5 * (_IN + _OUT)),
    # rank-6 factors in the dtype, float32 activation basis (ROWS, 8) and (in, 4)
    "wasi": (_wasi, lambda dtype: _BITS[dtype] * 6 * (_IN + _OUT) + 32 * (ROWS * 8 + _IN * 4)),
    # the master matrix in the dtype, float32 rank-6 factors and the same float32 basis
    "wasi_master": (_wasi_master, lambda dtype: _BITS[dtype] * _IN * _OUT
                    + 32 * (6 * (_IN + _OUT) + ROWS * 8 + _IN * 4)),
}
# what the shared train step runs after each optimizer update (``post_update``), per form:
# the master variant's forward reads factors that only this re-derives from the trained ``w``
POST_UPDATE = {"wasi": wasi.post_update, "wasi_master": wasi.post_update}
# |error| / max|y| of matmul against x @ materialize in float32: bfloat16 rounds the output,
# a form's intermediate product and its materialized matrix, each by at most 2^-8
# relatively; measured worst over 20 seeds: 0.76, 2.15 and 1.39 x 2^-8 (dense, low_rank, lora)
DTYPES = {"float32": (jnp.float32, 4e-6), "bfloat16": (jnp.bfloat16, 4 * 2.0 ** -8)}


@pytest.fixture(params=sorted(FORMS))
def form_name(request):
    return request.param


@pytest.fixture
def make(form_name):
    return FORMS[form_name][0]


def _tol(dtype):
    return {jnp.dtype(d): tol for d, tol in DTYPES.values()}[jnp.dtype(dtype)]


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_matmul_equals_x_times_materialize(make, dtype):
    dtype = DTYPES[dtype][0]
    kernel = make(jax.random.key(0), SHAPE, dtype)
    x = jax.random.normal(jax.random.key(1), (2, 5, SHAPE[0]), jnp.float32).astype(dtype)
    got = forms.matmul(x, kernel)
    want = jnp.matmul(x.astype(jnp.float32), forms.materialize(kernel).astype(jnp.float32))
    assert got.shape == (2, 5, SHAPE[1])
    assert got.dtype == jnp.dtype(dtype)
    assert forms.materialize(kernel).dtype == jnp.dtype(dtype)
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=_tol(dtype) * scale)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_shape_dtype_bits_and_flops_equal_the_traced_matmul(form_name, make, dtype):
    dtype = jnp.dtype(DTYPES[dtype][0])
    kernel = make(jax.random.key(0), SHAPE, dtype)
    assert forms.materialize(kernel).shape == SHAPE
    assert 8 * forms.nbytes(kernel) == FORMS[form_name][1](dtype)
    if forms.is_form(kernel):
        assert kernel.shape == SHAPE and kernel.dtype == dtype
        assert kernel.bits == FORMS[form_name][1](dtype)
    x = jnp.ones((3, 7, SHAPE[0]), dtype)
    counted = measure.flops(lambda x: forms.matmul(x, kernel), x).matmul
    assert forms.flops(kernel, tokens=21) == counted > 0


def test_frozen_fields_never_train(make):
    kernel = make(jax.random.key(0), SHAPE, jnp.float32)
    mask = train.trainable_mask({"k": kernel})["k"]
    if not forms.is_form(kernel):
        assert mask is True
        return
    for field in dataclasses.fields(kernel):
        if field.metadata.get("static"):
            continue
        values = jax.tree.leaves(getattr(kernel, field.name))  # an array, or a tuple of them
        expected = [field.name not in type(kernel).frozen_fields
                    and jnp.issubdtype(v.dtype, jnp.inexact) for v in values]  # bits never train
        assert jax.tree.leaves(getattr(mask, field.name)) == expected, field.name


def test_jit_does_not_recompile(make):
    traces = []

    @jax.jit
    def apply(kernel, x):
        traces.append(1)
        return forms.matmul(x, kernel)

    for seed in range(3):
        kernel = make(jax.random.key(seed), SHAPE, jnp.float32)
        x = jax.random.normal(jax.random.key(10 + seed), (4, SHAPE[0]))
        jax.block_until_ready(apply(kernel, x))
    assert len(traces) == 1


def test_eval_shape(make):
    kernel = make(jax.random.key(0), SHAPE, jnp.float32)
    abstract = checkpoint.abstract(kernel)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(abstract))
    x = jax.ShapeDtypeStruct((ROWS, SHAPE[0]), jnp.float32)
    out = jax.eval_shape(forms.matmul, x, abstract)
    assert out.shape == (ROWS, SHAPE[1]) and out.dtype == jnp.float32
    trainable, frozen = train.partition(abstract, train.trainable_mask({"k": abstract})["k"])
    grads = jax.eval_shape(
        jax.grad(lambda t, f, x: forms.matmul(x, train.combine(t, f)).sum()), trainable, frozen, x)
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    assert forms.nbytes(abstract) == forms.nbytes(kernel)
    if forms.is_form(kernel):
        assert abstract.shape == SHAPE and abstract.flops(3) == kernel.flops(3)
        assert abstract.bits == kernel.bits


def _double_floats(tree):
    return jax.tree.map(lambda a: 2 * a if jnp.issubdtype(a.dtype, jnp.inexact) else a, tree)


def _expected_double(kernel):
    """materialize() after every floating leaf doubled (packed sign bits stay)."""
    if isinstance(kernel, lora.LoRA):  # w doubles, the product of doubled factors quadruples
        return 2 * kernel.w + 4 * kernel.scale * kernel.a @ kernel.b
    if isinstance(kernel, littlebit.BinaryLowRank):  # h, g, lu, lv double; signs of u, v stay
        return 16 * forms.materialize(kernel)
    if isinstance(kernel, littlebit.PackedBinaryLowRank):  # h, g and the fused l double
        return 8 * forms.materialize(kernel)
    return forms.materialize(kernel) * (4 if forms.is_form(kernel) else 2)


def test_tree_map_grad_and_optax_update(form_name, make):
    kernel = make(jax.random.key(0), SHAPE, jnp.float32)
    doubled = _double_floats(kernel)
    assert type(doubled) is type(kernel)
    np.testing.assert_allclose(forms.materialize(doubled), _expected_double(kernel),
                               rtol=1e-5, atol=1e-5 * float(jnp.abs(_expected_double(kernel)).max()))
    x = jax.random.normal(jax.random.key(1), (ROWS, SHAPE[0]))
    y = jax.random.normal(jax.random.key(2), (ROWS, SHAPE[1]))

    def loss(k):
        return jnp.mean((forms.matmul(x, k) - y) ** 2)

    mask = train.trainable_mask({"k": kernel})["k"]  # the one freeze mechanism
    trainable, frozen = train.partition(kernel, mask)
    grad = jax.jit(jax.grad(lambda t, f: loss(train.combine(t, f))))
    assert jax.tree.structure(grad(trainable, frozen)) == jax.tree.structure(trainable)
    # clipping maps every leaf to a scalar (global norm): forms must survive that rebuild
    tx = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(1e-2))
    state = train.init_optimizer(tx, kernel, mask)
    post_update = POST_UPDATE.get(form_name, lambda params: (params, None))
    losses = [float(loss(kernel))]
    for _ in range(20):
        with jax.numpy_dtype_promotion(train.OPTIMIZER_PROMOTION):
            updates, state = tx.update(grad(trainable, frozen), state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        updated = post_update({"k": train.combine(trainable, frozen)})[0]["k"]
        trainable, frozen = train.partition(updated, mask)
        losses.append(float(loss(updated)))
    assert type(train.combine(trainable, frozen)) is type(kernel)
    print("loss", losses[0], "->", losses[-1])
    if jax.tree.leaves(trainable):
        assert losses[-1] < 0.9 * losses[0]
    else:  # a deployed (inference-only) form: nothing trains, nothing moves
        assert losses[-1] == losses[0]
        assert not [leaf for leaf in jax.tree.leaves(state) if leaf.ndim]  # only Adam's count


def test_checkpoint_round_trip_exact(make, tmp_path):
    tree = {"layer": {"kernel": make(jax.random.key(0), SHAPE, jnp.float32), "bias": jnp.ones(12)}}
    path = checkpoint.save(tmp_path / "ckpt", tree)
    restored = checkpoint.restore(path, checkpoint.abstract(tree))
    assert jax.tree.structure(restored) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_sharded_matmul(make, four_devices):
    mesh = Mesh(np.array(four_devices), ("data",))
    kernel = make(jax.random.key(0), SHAPE, jnp.float32)
    kernel = jax.device_put(kernel, NamedSharding(mesh, P()))
    x = jax.random.normal(jax.random.key(1), (8, SHAPE[0]))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    out = jax.jit(forms.matmul)(xs, kernel)
    assert out.sharding.spec == P("data")
    np.testing.assert_allclose(out, forms.matmul(x, kernel), rtol=1e-5, atol=1e-5)
