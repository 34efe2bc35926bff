"""The NNX layer: drop-in for nnx.Linear, bit-identical surgery, forms in the kernel slot."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from subspace_jax import forms, nn as sjnn, transforms


class MLP(nnx.Module):
    def __init__(self, rngs, param_dtype=jnp.float32, dtype=None):
        kw = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        self.up = nnx.Linear(12, 32, **kw)
        self.down = nnx.Linear(32, 12, use_bias=False, **kw)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


class Attention(nnx.Module):
    def __init__(self, rngs, dim=16, heads=4):
        self.heads = heads
        self.q, self.k, self.v, self.o = (nnx.Linear(dim, dim, rngs=rngs) for _ in range(4))

    def __call__(self, x):
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d / self.heads), -1)
        return self.o(jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, t, d))


def _is_subspace_linear(model):
    return [type(m) is sjnn.Linear for _, m in sjnn.linears(model)]


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: MLP(nnx.Rngs(0)), (3, 12)),
        (lambda: MLP(nnx.Rngs(0), param_dtype=jnp.bfloat16), (3, 12)),
        (lambda: Attention(nnx.Rngs(0)), (2, 5, 16)),
    ],
    ids=["mlp", "mlp-bf16", "attention"],
)
def test_adopt_is_bit_identical_and_leaves_input_untouched(make, shape):
    model = make()
    dtype = model.up.param_dtype if isinstance(model, MLP) else jnp.float32
    x = jax.random.normal(jax.random.key(1), shape).astype(dtype)
    before = jax.tree.map(np.asarray, nnx.state(model))
    new = sjnn.adopt(model)
    assert all(_is_subspace_linear(new)) and not any(_is_subspace_linear(model))
    np.testing.assert_array_equal(np.asarray(new(x)), np.asarray(model(x)))
    assert new(x).dtype == model(x).dtype
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model), before)
    # same leaves at the same paths (adopt adds only the kernels' in_axes metadata)
    assert (jax.tree.structure(nnx.to_pure_dict(nnx.state(new)))
            == jax.tree.structure(nnx.to_pure_dict(nnx.state(model))))
    assert nnx.state(new)["up" if isinstance(model, MLP) else "q"]["kernel"].get_metadata()["in_axes"] == (0,)


def test_adopt_keeps_shared_modules_shared_and_requires_linear():
    model = MLP(nnx.Rngs(0))
    model.tied = model.up
    new = sjnn.adopt(model)
    assert new.tied is new.up and type(new.tied) is sjnn.Linear
    with pytest.raises(ValueError, match="contains no nnx.Linear"):
        sjnn.adopt(nnx.LayerNorm(4, rngs=nnx.Rngs(0)))


def test_adopt_ties_one_linear_at_two_paths_to_one_subspace_linear():
    class Tied(nnx.Module):  # one nnx.Linear at 'blocks/0' and at 'inner/out'
        def __init__(self, rngs):
            shared = nnx.Linear(4, 4, rngs=rngs)
            self.blocks = nnx.List([shared, nnx.Linear(4, 4, rngs=rngs)])
            self.inner = nnx.Sequential(nnx.Linear(4, 4, rngs=rngs))
            self.inner.out = shared

    model = Tied(nnx.Rngs(0))
    new = sjnn.adopt(model)
    assert new.blocks[0] is new.inner.out and type(new.blocks[0]) is sjnn.Linear
    assert new.blocks[1] is not new.blocks[0]
    assert all(_is_subspace_linear(new))
    paths = [p for p, _ in sjnn.linears(new)]
    assert len(paths) == 3 and ("blocks/0" in paths) != ("inner/out" in paths)  # listed once
    assert len(jax.tree.leaves(nnx.state(new))) == len(jax.tree.leaves(nnx.state(model))) == 6
    # one set of Variables, shared by both paths and not by the input model
    new.blocks[0].kernel.set_value(jnp.zeros((4, 4)))
    assert float(jnp.abs(new.inner.out.kernel[...]).sum()) == 0.0
    assert float(jnp.abs(model.inner.out.kernel[...]).sum()) > 0.0


def test_adopt_reaches_a_linear_inside_a_tuple():
    class InTuple(nnx.Module):
        def __init__(self, rngs):
            self.pair = nnx.data((nnx.Linear(2, 2, rngs=rngs),))

    model = InTuple(nnx.Rngs(0))
    new = sjnn.adopt(model)
    assert type(new.pair[0]) is sjnn.Linear and type(model.pair[0]) is nnx.Linear


def test_adopt_skips_user_subclasses():
    class MyLinear(nnx.Linear):
        pass

    model = nnx.Sequential(MyLinear(3, 3, rngs=nnx.Rngs(0)), nnx.Linear(3, 2, rngs=nnx.Rngs(1)))
    new = sjnn.adopt(model)
    assert type(new.layers[0]) is MyLinear and type(new.layers[1]) is sjnn.Linear
    again = sjnn.adopt(new)  # already adopted: a copy, no error
    assert type(again.layers[1]) is sjnn.Linear and again.layers[1] is not new.layers[1]
    with pytest.raises(ValueError, match="contains no nnx.Linear"):
        sjnn.adopt(nnx.Sequential(MyLinear(3, 3, rngs=nnx.Rngs(0))))


def test_linear_is_drop_in_for_nnx_linear():
    ours = sjnn.Linear(6, 4, rngs=nnx.Rngs(3))
    theirs = nnx.Linear(6, 4, rngs=nnx.Rngs(3))
    assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(theirs))
    x = jnp.ones((2, 6))
    np.testing.assert_array_equal(ours(x), theirs(x))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_linear_with_low_rank_kernel(dtype):
    model = sjnn.adopt(MLP(nnx.Rngs(0), param_dtype=dtype))
    x = jax.random.normal(jax.random.key(1), (4, 12)).astype(dtype)
    dense_out = model(x)
    graphdef, state = nnx.split(model)
    rule = transforms.LowRankRule(pattern=r"(up|down)/kernel", rank=12)
    low = transforms.factorize(state, rule)
    assert isinstance(low["up"]["kernel"].get_value(), forms.LowRank)
    apply = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    out = apply(low, x)
    assert out.dtype == dense_out.dtype
    tol = 1e-4 if dtype == jnp.float32 else 0.1
    np.testing.assert_allclose(
        np.asarray(out, np.float32), np.asarray(dense_out, np.float32), atol=tol, rtol=tol
    )


def test_linear_form_respects_compute_dtype():
    layer = sjnn.Linear(6, 4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    dense = layer(jnp.ones((2, 6)))
    layer.kernel.set_value(forms.LowRank.from_dense(layer.kernel[...], rank=4))
    out = layer(jnp.ones((2, 6)))
    assert out.dtype == dense.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(dense, np.float32), atol=0.05)


def test_subspace_state_is_separated_from_params():
    class Basis(sjnn.SubspaceState):
        pass

    model = sjnn.adopt(MLP(nnx.Rngs(0)))
    model.up.basis = Basis(jnp.eye(4))
    _, params, method_state, rest = nnx.split(model, nnx.Param, sjnn.SubspaceState, ...)
    assert "basis" not in params["up"] and "basis" in method_state["up"]
    assert len(jax.tree.leaves(rest)) == 0
    grads = jax.grad(lambda p: nnx.merge(_, p, method_state, rest)(jnp.ones((1, 12))).sum())(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
