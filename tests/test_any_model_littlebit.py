"""LittleBit-2 on eleven models the library did not write (tests/any_models.py).

For every case: ``littlebit.transform`` with one :class:`~subspace_jax.littlebit.LittleBitRule`
(N-D kernels folded by the case's ``in_axes``), the model's own code on the training form
inside ``sj.nn.intercept()`` equals it on the materialized tree, the deployed (packed) tree
equals its own materialized tree, the bit accounting counts the folded matrices, and one
jitted QAT-style step through the shared train step moves the latent factors (the signs'
surrogate gradient reaches them). ``littlebit.convert`` on an NNX attention model shares no
array with its input, also after a donated step.
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
from subspace_jax import littlebit, train

# Every kernel of the cases is 16 wide on one side (12 to 64 on the other): rank 8, the
# smallest LittleBit rank, is the only one that fits, so take a low bpw and let strict=False
# floor it to rank 8 (what the official code does).
SETTINGS = dict(bpw=1.0, strict=False, itq_iters=3)
FOLDED = ("linen_dense_general", "linen_einsum", "linen_mha", "nnx_linear_general",
          "nnx_einsum", "nnx_mha", "nnx_block")
_FORMS = (littlebit.BinaryLowRank, littlebit.PackedBinaryLowRank)


def _rel(a, b) -> float:
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def _run(case: am.Case, params):
    with sj.nn.intercept():
        return jax.jit(case.apply)(params, case.x)


def _dense(case: am.Case, params):
    return jax.jit(case.apply)(sj.materialize(params), case.x)


def _forms(tree) -> list:
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, _FORMS))
    return [x for x in leaves if isinstance(x, _FORMS)]


def _transform(case: am.Case):
    rule = littlebit.LittleBitRule(pattern=case.pattern, in_axes=case.axes or None, **SETTINGS)
    return littlebit.transform(case.params, rule, key=jax.random.key(3))


@pytest.mark.parametrize("name", am.NAMES)
def test_littlebit_transform_deploy_and_one_train_step(name):
    case = am.build(name)
    tree = _transform(case)
    found = _forms(tree)
    assert found and all(isinstance(k, littlebit.BinaryLowRank) and k.rank == 8 for k in found)
    assert any(k.fold is not None for k in found) == (name in FOLDED)
    # the training form, in the model's own code, equals the model on its materialized tree
    assert _rel(_run(case, tree), _dense(case, tree)) < 1e-5
    # bits count the folded (in, out) matrices; materialize gives back every N-D shape
    acc = littlebit.accounting(tree)
    assert [lay.shape for lay in acc.layers] == [k.matrix_shape for k in found]
    assert [lay.kernel_shape for lay in acc.layers] == [k.shape for k in found]
    assert acc.linear_weights == sum(int(np.prod(k.shape)) for k in found)
    jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape),
                 sj.materialize(tree), case.params)
    # deployed: packed bits evaluate to the packed tree's own materialized kernels
    packed = littlebit.deploy(tree)
    deployed = _forms(packed)
    assert all(isinstance(k, littlebit.PackedBinaryLowRank) for k in deployed)
    assert [k.fold for k in deployed] == [k.fold for k in found]
    assert _rel(_run(case, packed), _dense(case, packed)) < 1e-5
    assert littlebit.accounting(packed).linear_bits == acc.linear_bits
    # QAT: one step of the shared train step (graphdef None: the model's own apply). Adam
    # moves a parameter exactly when its gradient is not zero, so every latent factor and
    # scale of every kernel moving shows the gradient reaches them through the sign's
    # surrogate.
    new, metrics = case.train_step(tree)
    moved = _forms(new)
    assert [type(k) for k in moved] == [type(k) for k in found]
    for k, o in zip(moved, found):
        assert all(float(jnp.abs(getattr(k, f) - getattr(o, f)).max()) > 0
                   for f in ("u", "v", "h", "g", "lu", "lv")), k.shape


def test_convert_nnx_attention_shares_no_arrays_and_reads_adopted_axes():
    model = nnx.MultiHeadAttention(2, am.D, qkv_features=am.D, decode=False, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, am.D))
    before = model(x)
    rule = littlebit.LittleBitRule(pattern=r".*kernel", **SETTINGS)  # in_axes from adopt
    small = littlebit.convert(model, rule)
    graphdef, params, rest = train.split_model(small)
    kernels = {k.fold.in_axes if k.fold else (0,) for k in _forms(params)}
    assert kernels == {(0,), (0, 1)}  # q/k/v (in, heads, head_dim) and out (heads, head_dim, out)
    dense = nnx.merge(graphdef, sj.materialize(params), rest)(x)
    assert _rel(small(x), dense) < 1e-5
    packed = littlebit.convert(model, rule, deployed=True)
    assert all(isinstance(k, littlebit.PackedBinaryLowRank) for k in _forms(nnx.state(packed)))
    assert _rel(packed(x), small(x)) < 5e-3  # the 16-bit scales

    def loss(m, batch, key):
        return jnp.mean(jnp.square(m(batch)))

    tx = optax.adam(1e-2)
    step = train.make_train_step(graphdef, loss, tx)  # donates the converted model's buffers
    step(params, train.init_optimizer(tx, params), rest, x, jax.random.key(0))
    np.testing.assert_array_equal(model(x), before)  # the input model is intact
