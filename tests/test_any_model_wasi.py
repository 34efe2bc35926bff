"""WASI on eleven models the library did not write (tests/any_models.py).

For every case: ``wasi.transform`` with one :class:`~subspace_jax.wasi.WasiRule` at energy and
activation eps 1.0 (N-D kernels folded by the case's ``in_axes``; the activation's Tucker
modes are those of the folded ``(..., in)`` input), the model's own code on the result inside
``sj.nn.intercept()`` reproduces the dense model, and one jitted step of the shared train step
(``graphdef=None``) absorbs the refreshed activation bases and keeps the weight basis
orthonormal. One case with the master variant; ``wasi.convert``'s input model still works
after a donated train step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import any_models as am
import subspace_jax as sj
from subspace_jax import train, wasi

FOLDED = ("linen_dense_general", "linen_einsum", "linen_mha", "nnx_linear_general",
          "nnx_einsum", "nnx_mha", "nnx_block")


def _rel(a, b) -> float:
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def _dense(case: am.Case):
    return jax.jit(case.apply)(case.params, case.x)


def _kernels(tree) -> list[wasi.WasiKernel]:
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, wasi.WasiKernel))
    return [x for x in leaves if isinstance(x, wasi.WasiKernel)]


def _transform(case: am.Case, **kwargs):
    rule = wasi.WasiRule(pattern=case.pattern, in_axes=case.axes or None, energy=1.0,
                         activation_eps=1.0)
    return wasi.transform(case.params, rule, sample=lambda p: case.apply(p, case.x),
                          return_plans=True, **kwargs)


def _step_and_check(case: am.Case, tree, post_update=wasi.post_update):
    before = [jax.tree.map(np.array, k.basis) for k in _kernels(tree)]
    tx = optax.adam(1e-2)
    step = train.make_train_step(None, case.loss, tx, post_update=post_update, donate=False)
    if jnp.issubdtype(case.x.dtype, jnp.floating):  # another batch of the calibrated shape
        batch = case.x + 0.1 * jax.random.normal(jax.random.key(7), case.x.shape)
    else:   # token ids: the same ones in another order (random ids hit NaN rows of the
        batch = jnp.flip(case.x, axis=1)   # randomly initialised FlaxBertModel's embedding)
    new, _, _, metrics = step(tree, train.init_optimizer(tx, tree), None, batch,
                              jax.random.key(0))
    # full weight and activation rank: the step's loss is the dense model's on that batch
    np.testing.assert_allclose(metrics["loss"], case.loss(case.params, batch, None), rtol=1e-4)
    after = _kernels(new)
    assert len(after) == len(before)
    for k, old in zip(after, before):       # every activation basis was absorbed, refreshed
        assert [u.shape for u in k.basis] == [u.shape for u in old]
        assert any(not np.allclose(u, v, atol=1e-6) for u, v in zip(k.basis, old)), k.key
        np.testing.assert_allclose(k.b @ k.b.T, np.eye(k.rank), atol=1e-5)
    return new


@pytest.mark.parametrize("name", am.NAMES)
def test_wasi_transform_runs_in_the_models_own_code_and_trains(name):
    case = am.build(name)
    tree, plans = _transform(case)
    found = _kernels(tree)
    assert found and [p.path for p in plans] == [k.key for k in found]
    assert any(k.fold is not None for k in found) == (name in FOLDED)
    for k in found:   # full weight rank; the basis spans the folded input (..., in)
        assert k.rank == min(k.matrix_shape) and k.act_shape[-1] == k.matrix_shape[0]
        assert k.materialize().shape == k.shape
    with sj.nn.intercept():
        out = jax.jit(case.apply)(tree, case.x)
    assert _rel(out, _dense(case)) < 1e-5
    _step_and_check(case, tree)


def test_wasi_master_variant_on_a_folded_kernel():
    case = am.build("linen_dense_general")
    tree, _ = _transform(case, variant="master")
    found = _kernels(tree)
    assert found and all(isinstance(k, wasi.WasiMasterKernel) for k in found)
    mask = _kernels(train.trainable_mask(tree))
    assert all(m.w and not m.a and not m.b for m in mask)   # the master matrix trains
    with sj.nn.intercept():
        assert _rel(jax.jit(case.apply)(tree, case.x), _dense(case)) < 1e-5
    new = _step_and_check(case, tree)
    for k, k0 in zip(_kernels(new), found):    # the factors follow the trained master matrix
        assert not np.allclose(k.w, k0.w)
        np.testing.assert_allclose(k.matrix(), k.w @ k.b.T @ k.b, atol=1e-4)


def test_convert_input_model_survives_a_donated_step():
    rngs = nnx.Rngs(0)
    model = nnx.Dict(mlp=nnx.Sequential(nnx.Linear(am.D, 32, rngs=rngs), jax.nn.gelu,
                                        nnx.Linear(32, am.D, rngs=rngs)))
    x = jax.random.normal(jax.random.key(1), (2, 5, am.D))
    dense = model["mlp"](x)
    conv = wasi.convert(model, sample=lambda m: m["mlp"](x), verbose=False)
    assert not hasattr(conv, "wasi_plans") and not hasattr(model, "wasi_plans")
    graphdef, params, rest = train.split_model(conv)
    tx = optax.sgd(0.1)
    step = train.make_train_step(graphdef, lambda m, b, k: jnp.mean(m["mlp"](b) ** 2), tx,
                                 post_update=wasi.post_update)
    params, _, rest, _ = step(params, train.init_optimizer(tx, params), rest, x,
                              jax.random.key(0))
    np.testing.assert_array_equal(model["mlp"](x), dense)   # the input still works, unchanged
    assert [p.path for p in wasi.plans(nnx.merge(graphdef, params, rest))] == [
        "mlp/layers/0/kernel", "mlp/layers/2/kernel"]       # the default MLP_PATTERN
