"""NSN on eleven models the library did not write (tests/any_models.py).

Each case's tree is transformed by ``nested.transform`` and run by the model's own code
(``model.apply``, ``nnx.merge(...)(x)``, Hugging Face's ``__call__``) inside
``sj.nn.intercept()``: at full rank it reproduces the dense model, at a lower rank it equals
the truncated tree, statically or by the traced rank; one jitted step trains it through the
shared train step, with the NSN objective beside the parameters on some cases, and the step
does not recompile when the sampled rank changes.
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
from subspace_jax import nested, train


def _rel(a, b) -> float:
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def _run(case: am.Case, params):
    with sj.nn.intercept():  # eager: tiny shapes run faster than they compile
        return case.apply(params, case.x)


def _transform(case: am.Case):
    return nested.transform(case.params, nested.NestedRule(pattern=case.pattern,
                                                           in_axes=case.axes or None))


@pytest.mark.parametrize("name", am.NAMES)
def test_full_rank_reproduces_dense_and_lower_ranks_equal_truncation(name):
    case = am.build(name)
    tree = _transform(case)
    found = nested.kernels(tree)
    assert found and all(k.width == k.max_rank == min(k.matrix_shape) for k in found.values())
    assert _rel(_run(case, tree), case.dense_out) < 1e-5
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                 sj.materialize(tree), case.params)            # N-D kernels come back N-D
    cut = _run(case, nested.truncate(tree, 2))
    assert _rel(_run(case, nested.set_rank(tree, 2)), cut) < 1e-5
    assert _rel(_run(case, nested.set_rank(tree, 2, static=False)), cut) < 1e-5
    assert _rel(cut, case.dense_out) > 1e-3                    # rank 2 is not the dense model


@pytest.mark.parametrize("name", am.NAMES)
def test_one_jitted_step_trains_the_factors_and_never_the_rank(name):
    case = am.build(name)
    tree = nested.set_rank(_transform(case), 3, static=False)
    new, metrics = case.train_step(tree)
    assert nested.ranks(new) == nested.ranks(tree)
    moved = [float(jnp.abs(k.a - nested.kernels(tree)[p].a).max())
             for p, k in nested.kernels(new).items()]
    assert max(moved) > 0


@pytest.mark.parametrize("name", ["nnx_block", "hf_bert"])
def test_the_nsn_objective_trains_beside_the_params_without_recompiling(name):
    case = am.build(name)
    tree = _transform(case)
    traces = []

    def task(params, batch, key):
        traces.append(1)
        return case.loss(params, batch, key)

    state = {"model": tree, "nsn": nested.objective(tree, curriculum_steps=0)}
    tx = nested.optimizer(optax.adam(1e-2), log_var_lr=0.1)
    step = train.make_train_step(None, nested.loss(task), tx, post_update=nested.advance,
                                 donate=False)  # the cached case's arrays stay alive
    opt_state = train.init_optimizer(tx, state)
    sampled = []
    for i in range(4):
        state, opt_state, _, metrics = step(state, opt_state, {}, case.x, jax.random.key(i))
        sampled.append(int(metrics["variant_rank"]))
    print(name, "grid", state["nsn"].grid, "sampled", sampled)
    assert len(set(sampled)) > 1 and len(traces) == 2       # anchor + variant, traced once
    assert int(state["nsn"].step) == 4 and float(jnp.abs(state["nsn"].log_var).max()) > 0
    assert set(nested.ranks(state["model"]).values()) == set(nested.ranks(tree).values())


def test_convert_input_survives_a_donated_step_on_the_converted_model():
    case = am.build("nnx_block")
    block = am.Block(nnx.Rngs(0))
    x = case.x
    before = np.asarray(block(x))
    model = nested.convert(block, nested.NestedRule(pattern=sj.rules.MLP_PATTERN))
    graphdef, params, rest = train.split_model(model)
    state = {"model": params, "nsn": nested.objective(params, curriculum_steps=2)}
    mse = lambda m, b, key: jnp.mean(m(b) ** 2)                     # noqa: E731
    tx = nested.optimizer(optax.adam(1e-2))
    step = train.make_train_step(None, nested.loss(mse, graphdef=graphdef, rest=rest), tx,
                                 post_update=nested.advance)    # donates its inputs
    state, _, _, _ = step(state, train.init_optimizer(tx, state), rest, x, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(block(x)), before)   # the input still works
    # the plain NNX route: the converted model trains through make_train_step(graphdef, ...)
    g2, p2, r2 = train.split_model(nested.convert(block))
    step2 = train.make_train_step(g2, mse, optax.adam(1e-2))
    p2, _, r2, m = step2(p2, train.init_optimizer(optax.adam(1e-2), p2), r2, x,
                         jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(block(x)), before)
    assert int(state["nsn"].step) == 1
    # at full rank the converted model's loss is the dense block's
    np.testing.assert_allclose(m["loss"], jnp.mean(jnp.asarray(before) ** 2), rtol=1e-5)
