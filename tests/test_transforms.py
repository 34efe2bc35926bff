"""factorize / materialize on whole trees, and clear errors on bad input."""

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from subspace_jax import forms, nn as sjnn, transforms


def _spectrum_matrix(key, shape, s):
    ku, kv = jax.random.split(key)
    u, _ = jnp.linalg.qr(jax.random.normal(ku, (shape[0], len(s))))
    v, _ = jnp.linalg.qr(jax.random.normal(kv, (shape[1], len(s))))
    return (u * jnp.asarray(s)) @ v.T


def test_full_rank_low_rank_reproduces_dense():
    w = jax.random.normal(jax.random.key(0), (24, 16))
    for split in (0.0, 0.5, 1.0):
        k = forms.LowRank.from_dense(w, rank=16, split=split)
        np.testing.assert_allclose(k.materialize(), w, atol=2e-5)


def test_split_puts_singular_values_where_asked():
    w = _spectrum_matrix(jax.random.key(1), (20, 12), [5.0, 3.0, 2.0, 1.0])
    k = forms.LowRank.from_dense(w, rank=4, split=1.0)
    np.testing.assert_allclose(k.b @ k.b.T, jnp.eye(4), atol=1e-5)  # orthonormal rows (WASI)
    k = forms.LowRank.from_dense(w, rank=4, split=0.0)
    np.testing.assert_allclose(k.a.T @ k.a, jnp.eye(4), atol=1e-5)
    k = forms.LowRank.from_dense(w, rank=4, split=0.5)
    np.testing.assert_allclose(
        jnp.linalg.norm(k.a, axis=0), jnp.linalg.norm(k.b, axis=1), rtol=1e-4
    )  # balanced


def test_truncation_error_equals_discarded_energy():
    s = np.array([4.0, 3.0, 2.0, 1.0, 0.5, 0.25])
    w = _spectrum_matrix(jax.random.key(2), (30, 20), s)
    for rank in range(1, 6):
        err = float(jnp.sum((forms.LowRank.from_dense(w, rank=rank).materialize() - w) ** 2))
        np.testing.assert_allclose(err, np.sum(s[rank:] ** 2), rtol=1e-3)
    # energy shares: 16, 25, 29, 30 of 30.3125 -> 0.528, 0.825, 0.957, 0.990
    assert forms.LowRank.from_dense(w, eps=0.95).rank == 3
    assert forms.LowRank.from_dense(w, eps=0.96).rank == 4
    assert forms.LowRank.from_dense(w, eps=0.82).rank == 2


def test_factorize_model_tree_and_materialize_back():
    model = sjnn.adopt(
        nnx.Sequential(nnx.Linear(16, 24, rngs=nnx.Rngs(0)), nnx.Linear(24, 8, rngs=nnx.Rngs(1)))
    )
    x = jax.random.normal(jax.random.key(3), (5, 16))
    graphdef, state = nnx.split(model)
    low = transforms.factorize(
        state,
        [
            transforms.LowRankRule(pattern="layers/0/kernel", rank=16),
            transforms.LowRankRule(pattern="layers/1/kernel", rank=4),
        ],
    )
    assert low["layers"][0]["kernel"].get_value().rank == 16
    assert low["layers"][1]["kernel"].get_value().rank == 4
    dense_again = transforms.materialize(low)
    assert jax.tree.structure(dense_again) == jax.tree.structure(state)
    np.testing.assert_allclose(
        dense_again["layers"][0]["kernel"][...], state["layers"][0]["kernel"][...], atol=2e-5
    )
    full = transforms.factorize(state, transforms.LowRankRule(pattern=".*kernel", rank=8, clip_rank=True))
    assert full["layers"][1]["kernel"].get_value().rank == 8
    out = nnx.merge(graphdef, low)(x)
    ref = nnx.merge(graphdef, dense_again)(x)
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_factorize_linen_params():
    class Net(linen.Module):
        @linen.compact
        def __call__(self, x):
            return linen.Dense(6, name="out")(x)

    variables = Net().init(jax.random.key(0), jnp.ones((1, 10)))
    low = transforms.factorize(variables, transforms.LowRankRule(pattern="params/out/kernel", rank=6))
    assert isinstance(low["params"]["out"]["kernel"], forms.LowRank)
    np.testing.assert_allclose(
        transforms.materialize(low)["params"]["out"]["kernel"],
        variables["params"]["out"]["kernel"],
        atol=2e-5,
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(eps=0.0), r"eps must be in \(0, 1\], got 0.0"),
        (dict(eps=1.5), r"eps must be in \(0, 1\], got 1.5"),
        (dict(rank=0), r"rank must be an int >= 1, got 0"),
        (dict(), "exactly one of rank and eps"),
        (dict(rank=2, eps=0.5), "exactly one of rank and eps"),
    ],
)
def test_bad_rule_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        transforms.LowRankRule(pattern=".*", **kwargs)


def test_bad_kernels_name_path_shape_value():
    good = jnp.ones((4, 6))
    nan = good.at[1, 2].set(jnp.nan)
    inf = good.at[0, 0].set(jnp.inf)
    cases = [
        ({"w": {"kernel": good}}, dict(rank=5), r"'w/kernel' \(shape \(4, 6\)\).*rank 5"),
        ({"w": {"kernel": jnp.ones((2, 3, 4))}}, dict(rank=1), r"'w/kernel'.*3-D kernel of shape \(2, 3, 4\) needs in_axes"),
        ({"w": {"kernel": jnp.ones(4)}}, dict(rank=1), r"'w/kernel'.*N-D kernel.*\(4,\)"),
        ({"w": {"kernel": nan}}, dict(rank=1), r"'w/kernel'.*(NaN|non-finite)"),
        ({"w": {"kernel": inf}}, dict(rank=1), r"'w/kernel'.*(Inf|non-finite)"),
    ]
    for tree, kw, match in cases:
        with pytest.raises(ValueError, match=match):
            transforms.factorize(tree, transforms.LowRankRule(pattern="w/kernel", **kw))
    with pytest.raises(ValueError, match=r"split must be in \[0, 1\], got 2"):
        forms.LowRank.from_dense(good, rank=1, split=2)
    with pytest.raises(ValueError, match=r"a \(4, 2\) and b \(3, 6\)"):
        forms.LowRank(a=jnp.ones((4, 2)), b=jnp.ones((3, 6)))


def test_unmatched_rule_in_factorize_names_rule():
    with pytest.raises(ValueError, match=r"rule #0 LowRankRule\(pattern='mlp/.*'.*matched no path"):
        transforms.factorize({"w": jnp.ones((2, 2))}, transforms.LowRankRule(pattern="mlp/.*", rank=1))


def test_factorize_takes_rules_by_keyword():
    tree = {"w": {"kernel": jax.random.normal(jax.random.key(2), (6, 4))}}
    low = transforms.factorize(tree, rules=[transforms.LowRankRule(pattern="w/kernel", rank=2)])
    assert low["w"]["kernel"].rank == 2
    same = transforms.factorize(tree, rules=[], allow_unused=True)
    assert same["w"]["kernel"] is tree["w"]["kernel"]
