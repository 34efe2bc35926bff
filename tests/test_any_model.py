"""Low rank, LoRA and LoRA-Pre on eleven models the library did not write (tests/any_models.py).

Each case runs the model's own code (``model.apply``, ``nnx.merge(...)(x)``, Hugging Face's
``__call__``) on a converted tree inside ``sj.nn.intercept()``, and trains one jitted step
through the shared train step. The other methods have their own any-model test files.
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
from subspace_jax import train

FULL = 10**6  # a rank every kernel clips to its full rank


def _rel(a, b) -> float:
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def _run(case: am.Case, params):
    with sj.nn.intercept():
        return jax.jit(case.apply)(params, case.x)


@pytest.mark.parametrize("name", am.NAMES)
def test_low_rank_at_full_rank_reproduces_dense(name):
    case = am.build(name)
    low = sj.factorize(case.params, sj.LowRankRule(pattern=case.pattern, rank=FULL,
                                                   clip_rank=True, in_axes=case.axes or None))
    forms_ = [x for x in jax.tree.leaves(low, is_leaf=sj.forms.is_form) if sj.forms.is_form(x)]
    assert forms_ and any(k.fold is not None for k in forms_) == (
        name in ("linen_dense_general", "linen_einsum", "linen_mha", "nnx_linear_general",
                 "nnx_einsum", "nnx_mha", "nnx_block"))
    assert _rel(_run(case, low), case.dense_out) < 1e-5
    # materialize gives back the original N-D kernels
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                 sj.materialize(low), case.params)


@pytest.mark.parametrize("name", am.NAMES)
def test_lora_equals_its_materialized_tree_and_trains(name):
    case = am.build(name)
    tree = sj.add_lora(case.params, sj.LoRARule(pattern=case.pattern, rank=2,
                                                in_axes=case.axes or None), key=jax.random.key(3))
    # b starts at zero: perturb it, so the adapter is not trivially the base kernel
    tree = jax.tree.map(lambda k: k.__class__(w=k.w, a=k.a, b=k.b + 0.1, scale=k.scale,
                                              fold=k.fold) if isinstance(k, sj.LoRA) else k,
                        tree, is_leaf=lambda x: isinstance(x, sj.LoRA))
    dense = case.apply(sj.materialize(tree), case.x)
    assert _rel(_run(case, tree), dense) < 1e-5
    new, metrics = case.train_step(tree)
    old_w = [k.w for k in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, sj.LoRA))
             if isinstance(k, sj.LoRA)]
    new_k = [k for k in jax.tree.leaves(new, is_leaf=lambda x: isinstance(x, sj.LoRA))
             if isinstance(k, sj.LoRA)]
    assert all(bool((k.w == w).all()) for k, w in zip(new_k, old_w))  # base frozen
    assert any(float(jnp.abs(k.a - o.a).max()) > 0 for k, o in zip(
        new_k, [k for k in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, sj.LoRA))
                if isinstance(k, sj.LoRA)]))


@pytest.mark.parametrize("name", am.NAMES)
def test_lorapre_trains_every_model_with_folded_kernels(name):
    case = am.build(name)
    tx = sj.lorapre.lorapre(1e-2, rank=2, weight_dimension_numbers=(
        sj.lorapre.kernel_dimension_numbers(case.axes)))
    step = train.make_train_step(None, case.loss, tx, donate=False)
    state = train.init_optimizer(tx, case.params)
    assert sj.lorapre.moments(state), "no kernel got low-rank moments"
    new, state, _, m1 = step(case.params, state, {}, case.x, jax.random.key(0))
    _, _, _, m2 = step(new, state, {}, case.x, jax.random.key(1))
    print(name, "loss", float(m1["loss"]), "->", float(m2["loss"]))
    assert float(m2["loss"]) < float(m1["loss"])


def _sub_jaxprs(value):
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):  # ClosedJaxpr
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def _intermediate_shapes(jaxpr) -> set[tuple[int, ...]]:
    """Shapes of every value computed in ``jaxpr`` and in the jaxprs nested in it."""
    shapes = set()
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            shapes.add(tuple(getattr(v.aval, "shape", ())))
        for param in eqn.params.values():
            for sub in _sub_jaxprs(param):
                shapes |= _intermediate_shapes(sub)
    return shapes


@pytest.mark.parametrize("name", ["linen_mha", "nnx_einsum", "hf_bert"])
def test_the_dense_kernel_is_never_formed(name):
    case = am.build(name)
    low = sj.factorize(case.params, sj.LowRankRule(pattern=case.pattern, rank=2,
                                                   in_axes=case.axes or None))
    kernels = {tuple(k.shape) for k in jax.tree.leaves(low, is_leaf=sj.forms.is_form)
               if sj.forms.is_form(k)}
    kernels |= {tuple(k.matrix_shape) for k in jax.tree.leaves(low, is_leaf=sj.forms.is_form)
                if sj.forms.is_form(k)}
    # dense parameters left as they are have gradients of their own shapes
    kernels -= {tuple(x.shape) for x in jax.tree.leaves(low)}
    assert kernels
    with sj.nn.intercept():
        closed = jax.make_jaxpr(lambda p: jax.grad(case.loss)(p, case.x, None))(low)
    computed = _intermediate_shapes(closed.jaxpr)
    factors = {tuple(x.shape) for k in jax.tree.leaves(low, is_leaf=sj.forms.is_form)
               if sj.forms.is_form(k) for x in jax.tree.leaves(k)}
    assert factors <= computed                      # their gradients: nested jaxprs were read
    formed = kernels & computed
    # an activation may share a kernel's shape by chance; none does at these sizes
    assert not formed, f"dense kernels of shape {formed} appear in the step"


def test_the_train_step_compiles_once_for_a_linen_model(counting):
    case = am.build("linen_mha")
    low = sj.factorize(case.params, sj.LowRankRule(pattern=case.pattern, rank=4,
                                                   in_axes=case.axes))
    tx = optax.sgd(1e-2)
    loss, traces = counting(case.loss)
    step = train.make_train_step(None, loss, tx, donate=False)
    state = train.init_optimizer(tx, low)
    for i in range(3):
        low, state, _, _ = step(low, state, {}, case.x, jax.random.key(i))
    assert len(traces) == 1


def test_an_einsum_form_folded_on_the_wrong_axes_names_the_layer():
    case = am.build("nnx_einsum")
    low = sj.factorize(case.params, sj.LowRankRule(pattern=case.pattern, rank=2, in_axes=(0,)))
    with sj.nn.intercept(), pytest.raises(ValueError, match=r"Einsum.*in_axes=\(0,\).*\(1,\)"):
        case.apply(low, case.x)


def test_an_n_d_kernel_without_in_axes_is_refused_with_the_fix():
    case = am.build("linen_mha")
    with pytest.raises(ValueError, match=r"at .key/kernel. \(shape \(16, 2, 8\)\): a 3-D kernel.*needs in_axes"):
        sj.factorize(case.params, sj.LowRankRule(pattern=case.pattern, rank=2))


def test_adopted_models_fold_their_own_kernels():
    mha = nnx.MultiHeadAttention(2, 16, qkv_features=16, decode=False, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(sj.adopt(mha))
    low = sj.factorize(state, sj.LowRankRule(pattern=".*kernel", rank=FULL, clip_rank=True))
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    assert _rel(nnx.merge(graphdef, low)(x), mha(x)) < 1e-5      # no intercept needed


def test_adopt_leaves_the_input_usable_after_a_donated_step():
    model = am.Block(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, am.D))
    before = model(x)
    graphdef, params, rest = train.split_model(sj.adopt(model))
    params = sj.factorize(params, sj.LowRankRule(pattern=sj.rules.MLP_PATTERN, rank=8))
    tx = optax.adam(1e-3)

    def loss(m, batch, key):
        return jnp.mean(m(batch) ** 2)

    step = train.make_train_step(graphdef, loss, tx)                 # donates its inputs
    step(params, train.init_optimizer(tx, params), rest, x, jax.random.key(0))
    np.testing.assert_array_equal(model(x), before)                # not "Array has been deleted"


@pytest.mark.parametrize("name", ["linen_mha", "nnx_block", "hf_bert"])
def test_forms_train_under_jax_checkpoint(name):
    case = am.build(name)
    low = sj.factorize(case.params, sj.LowRankRule(pattern=case.pattern, rank=4,
                                                   in_axes=case.axes or None))
    remat = jax.checkpoint(case.apply)
    plain = jax.grad(lambda p: case.loss(p, case.x, None))
    with sj.nn.intercept():
        g1 = jax.jit(plain)(low)
        g2 = jax.jit(jax.grad(lambda p: jnp.mean(jnp.square(remat(p, case.x)))))(low)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)
