"""Every method's :class:`~subspace_jax.train.Recipe` trains a model it did not write through
the one train step: the loss falls, and what the method promises about its state holds."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from subspace_jax import nn as sjnn
from subspace_jax import littlebit, lora, lorapre, measure, nested, rules, train, wasi

KERNELS = r"(up|down)/kernel"


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(16, 48, rngs=rngs)
        self.down = nnx.Linear(48, 16, rngs=rngs)
        self.head = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(x + self.down(jax.nn.gelu(self.up(x))))


def _loss(model, batch, key):
    return ((model(batch["x"]) - batch["y"]) ** 2).mean()


@pytest.fixture(scope="module")
def task():
    """A pretrained-looking MLP and batches of a teacher it should move towards."""
    teacher = MLP(nnx.Rngs(7))
    x = jax.random.normal(jax.random.key(1), (6, 32, 16))
    batches = [{"x": xb, "y": teacher(xb)} for xb in x]
    return MLP(nnx.Rngs(0)), batches


RECIPES = {
    "full": lambda batches: train.Recipe(name="full"),
    "lora": lambda batches: lora.recipe(lora.LoRARule(pattern=KERNELS, rank=4)).with_train(
        rules.Rule(pattern="head/.*")),
    "lorapre": lambda batches: lorapre.recipe(rank=4),
    "littlebit": lambda batches: littlebit.recipe(
        littlebit.LittleBitRule(pattern=KERNELS, bpw=6.0), train_also=(
            rules.Rule(pattern=r".*/bias"), rules.Rule(pattern="head/.*"))),
    "nested": lambda batches: nested.recipe(nested.NestedRule(pattern=KERNELS), curriculum=0.5),
    "wasi": lambda batches: wasi.recipe(
        wasi.WasiRule(pattern=KERNELS, energy=0.95, activation_eps=0.95),
        sample=lambda m: _loss(m, batches[0], None)),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_trains_a_foreign_model(name, task):
    model, batches = task
    recipe = RECIPES[name](batches)
    ready = recipe.prepare(model, _loss, lr=1e-2, steps=30, key=jax.random.key(0))
    step = ready.step()
    params, opt_state, rest = ready.params, ready.init_optimizer(), ready.rest
    losses = []
    for i in range(30):
        params, opt_state, rest, metrics = step(params, opt_state, rest, batches[i % 5],
                                                jax.random.key(i))
        losses.append(float(metrics["loss"]))
    print(f"{name}: loss {losses[0]:.4f} -> {np.mean(losses[-5:]):.4f}")
    assert np.mean(losses[-5:]) < 0.8 * losses[0], losses
    trained = nnx.merge(ready.graphdef, ready.model_params(params), rest)
    held_out = batches[5]
    with sjnn.intercept():  # forms inside the plain nnx.Linear layers
        assert float(_loss(trained, held_out, None)) < float(_loss(model, held_out, None))
    kernel = ready.model_params(params)["up"]["kernel"].get_value()
    kinds = {"full": jax.Array, "lorapre": jax.Array, "lora": lora.LoRA,
             "littlebit": littlebit.BinaryLowRank, "nested": nested.Nested,
             "wasi": wasi.WasiKernel}
    assert isinstance(kernel, kinds[name]), type(kernel)
    if name == "lora":  # the pretrained kernel is untouched
        np.testing.assert_array_equal(kernel.w, model.up.kernel[...])
    if name == "wasi":  # post_update kept the basis orthonormal
        b = kernel.b
        np.testing.assert_allclose(b @ b.T, np.eye(b.shape[0]), atol=1e-4)
    if name == "nested":  # the objective trained beside the model and came back
        assert int(params[nested.OBJECTIVE].step) == 30
    if name == "lorapre":  # low-rank moments: less state than AdamW's two full copies
        adam = train.init_optimizer(train.adamw(1e-2, 30), ready.params, ready.mask)
        assert measure.tree_nbytes(opt_state) < measure.tree_nbytes(adam)


def test_with_train_and_prepare_leave_the_input_model_alone(task):
    model, batches = task
    before = jax.tree.map(np.asarray, nnx.state(model))
    recipe = lora.recipe(lora.LoRARule(pattern=KERNELS, rank=2))
    assert [r.pattern for r in recipe.with_train(rules.Rule(pattern="head/.*")).train] == [
        KERNELS, "head/.*"]
    assert train.Recipe(name="full").with_train(rules.Rule(pattern="x")).train is None
    ready = recipe.prepare(model, _loss, lr=1e-2, steps=3, key=jax.random.key(0),
                           default_optimizer=lambda lr, steps: optax.sgd(lr))
    ready.step()(ready.params, ready.init_optimizer(), ready.rest, batches[0],
                 jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray,
                                                                     nnx.state(model)))
    assert isinstance(ready.params["up"]["kernel"].get_value(), lora.LoRA)
