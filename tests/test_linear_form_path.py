"""``nn.Linear`` on the kernel-form path honours or refuses what ``nnx.Linear`` honours."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from subspace_jax import forms, nn as sjnn


def _layer(**kwargs):
    layer = sjnn.Linear(6, 4, rngs=nnx.Rngs(0), **kwargs)
    dense = layer.kernel[...]
    layer.kernel.set_value(forms.LowRank.from_dense(dense, rank=4))
    return layer, dense


def test_every_contraction_goes_through_the_modules_dot_general():
    calls = []

    def spy(lhs, rhs, dimension_numbers, **kwargs):
        calls.append((lhs.shape, rhs.shape))
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, **kwargs)

    layer, dense = _layer(dot_general=spy)
    x = jax.random.normal(jax.random.key(1), (3, 6))
    y = layer(x)
    assert calls == [((3, 6), (6, 4)), ((3, 4), (4, 4))]  # x @ a, then (x a) @ b
    np.testing.assert_allclose(y, x @ dense + layer.bias[...], atol=1e-5)


def test_promote_dtype_is_called_on_input_and_bias():
    seen = []

    def promote(args, *, dtype=None, inexact=True):
        seen.append((tuple(None if a is None else a.dtype for a in args), dtype))
        return tuple(None if a is None else jnp.asarray(a, dtype) for a in args)

    layer, _ = _layer(promote_dtype=promote, dtype=jnp.bfloat16)
    y = layer(jnp.ones((2, 6), jnp.float32))
    assert seen == [((jnp.float32, jnp.float32), jnp.bfloat16)]
    assert y.dtype == jnp.bfloat16


@pytest.mark.parametrize("setting", ["preferred_element_type", "out_sharding"])
def test_unsupported_settings_are_refused_not_dropped(setting):
    if setting == "preferred_element_type":
        layer, _ = _layer(preferred_element_type=jnp.float32)
        call = lambda: layer(jnp.ones((2, 6)))  # noqa: E731
    else:
        layer, _ = _layer()
        call = lambda: layer(jnp.ones((2, 6)), out_sharding=jax.sharding.PartitionSpec())  # noqa: E731
    with pytest.raises(ValueError, match=f"Linear holds a LowRank kernel: {setting}="):
        call()


def test_dense_path_still_takes_out_sharding_and_preferred_type():
    layer = sjnn.Linear(6, 4, rngs=nnx.Rngs(0), preferred_element_type=jnp.float32)
    ref = nnx.Linear(6, 4, rngs=nnx.Rngs(0), preferred_element_type=jnp.float32)
    x = jnp.ones((2, 6))
    assert (layer(x) == ref(x)).all()
