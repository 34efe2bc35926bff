"""The shared training utilities: step, fit loop, evaluation, masks (tiny problems only)."""

import dataclasses
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from subspace_jax import forms, lora, measure, rules, train
from subspace_lab import baselines
from subspace_jax import nn as sjnn
from subspace_jax.models import bert


def _regression(key, n=64):
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (n, 8))
    y = x @ jax.random.normal(kw, (8, 2))
    return np.asarray(x), np.asarray(y)


def _mse(model, batch, key):
    del key
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


def test_fit_reduces_loss_without_recompiling(key, counting):
    x, y = _regression(key)
    graphdef, params, rest = train.split_model(nnx.Linear(8, 2, rngs=nnx.Rngs(0)))
    tx = train.adamw(1e-1, 60, warmup=5)
    loss, traces = counting(_mse)
    step = train.make_train_step(graphdef, loss, tx)
    batches = ({"x": x[i % 4 * 16:][:16], "y": y[i % 4 * 16:][:16]} for i in range(60))
    params, _, _, hist = train.fit(step, params, train.init_optimizer(tx, params), rest,
                                   batches, num_steps=60, key=key, progress=False, log_every=7)
    print(f"loss {hist.losses[0]:.3f} -> {hist.losses[-1]:.4f}")
    assert len(hist.losses) == len(hist.step_times) == 60
    assert hist.losses[-1] < 0.1 * hist.losses[0]
    assert len(traces) == 1  # one trace (one compile) for 60 steps
    # the first step is timed on its own and holds the compile; the median leaves it out
    print(f"first step {hist.step_times[0]:.3f} s, median {hist.median_step_time():.2e} s")
    assert hist.median_step_time() == statistics.median(hist.step_times[1:])
    assert hist.step_times[0] > 3 * hist.median_step_time()


class _Count(sjnn.SubspaceState):
    pass


class _ToyMethod(nnx.Module):
    """A factored layer, an int32 parameter (a lookup table) and a per-step counter."""

    def __init__(self):
        self.layer = sjnn.Linear(8, 2, rngs=nnx.Rngs(0))
        self.layer.kernel.set_value(forms.LowRank.from_dense(self.layer.kernel[...], rank=2))
        self.table = nnx.Param(jnp.array([2, 0, 1], jnp.int32))
        self.count = _Count(jnp.zeros((), jnp.int32))

    def __call__(self, x):
        self.count.set_value(self.count[...] + 1)
        return self.layer(x)[:, self.table[...][:2]]


def _unit_rows(params, rest):
    """Post-update hook: re-normalise the rows of the output factor b."""
    kernel = params["layer"]["kernel"].get_value()
    b = kernel.b / jnp.linalg.norm(kernel.b, axis=1, keepdims=True)
    params["layer"]["kernel"].set_value(dataclasses.replace(kernel, b=b))
    return params, rest


def test_toy_method_state_hook_and_integer_leaf_through_fit(key, counting):
    x, y = _regression(key)
    model = _ToyMethod()
    graphdef, params, rest = train.split_model(model)
    mask = train.trainable_mask(params)
    assert mask["table"].get_value() is False  # int32: carried, never trained
    assert mask["layer"]["kernel"].get_value() == forms.LowRank(a=True, b=True)

    def loss_fn(model, batch, key):
        err = model(batch["x"]) - batch["y"]
        return jnp.mean(err ** 2), {"count": model.count[...].astype(jnp.float32)}

    loss, traces = counting(loss_fn)
    tx = optax.adam(1e-2)
    opt_state = train.init_optimizer(tx, params, mask)
    assert opt_state[0].mu["table"].get_value() is None  # no optimizer state for it
    step = train.make_train_step(graphdef, loss, tx, mask=mask, post_update=_unit_rows)
    batches = ({"x": x[:16], "y": y[:16]} for _ in range(12))
    params, opt_state, rest, hist = train.fit(step, params, opt_state, rest, batches,
                                              num_steps=12, key=key, progress=False,
                                              log_every=5)
    assert int(rest["count"].get_value()) == 12                    # once per step
    assert hist.metrics["count"] == [float(i) for i in range(1, 13)]  # seen inside the step
    b = params["layer"]["kernel"].get_value().b
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(params["table"].get_value(), [2, 0, 1])
    assert len(traces) == 1
    grads = jax.grad(lambda p: jnp.sum(p["table"].get_value() * 1.0))
    with pytest.raises(TypeError):  # JAX itself refuses to differentiate an int leaf
        grads(params)


def test_step_returns_aux_and_rejects_bad_loss_output(key):
    graphdef, params, rest = train.split_model(nnx.Linear(8, 2, rngs=nnx.Rngs(0)))
    batch = {"x": jnp.ones((4, 8)), "y": jnp.zeros((4, 2))}
    tx = optax.sgd(0.1)
    bad = train.make_train_step(graphdef, lambda m, b, k: (1.0, 2.0, 3.0), tx, donate=False)
    with pytest.raises(TypeError, match="a scalar or \\(loss, aux\\)"):
        bad(params, train.init_optimizer(tx, params), rest, batch, key)


def test_forward_runs_under_strict_promotion_inside_the_step(key):
    graphdef, params, rest = train.split_model(nnx.Linear(8, 2, rngs=nnx.Rngs(0)))
    tx = optax.adam(1e-3)  # needs standard promotion internally: the step allows it there

    def mixed(model, batch, key):
        return jnp.mean(model(batch["x"]) * jnp.ones((), jnp.bfloat16))  # f32 * bf16

    step = train.make_train_step(graphdef, mixed, tx, donate=False)
    with pytest.raises(jax.dtypes.TypePromotionError):
        step(params, train.init_optimizer(tx, params), rest, {"x": jnp.ones((4, 8))}, key)
    ok = train.make_train_step(graphdef, _mse, tx, donate=False)
    ok(params, train.init_optimizer(tx, params), rest,
       {"x": jnp.ones((4, 8)), "y": jnp.zeros((4, 2))}, key)


def test_fit_runs_evals_and_reports_short_iterators(key):
    x, y = _regression(key, n=16)
    graphdef, params, rest = train.split_model(nnx.Linear(8, 2, rngs=nnx.Rngs(0)))
    tx = optax.sgd(0.05)
    step = train.make_train_step(graphdef, _mse, tx, donate=False)
    calls = []

    def eval_fn(p, r):
        calls.append(1)
        return {"val": float(len(calls))}

    batch = {"x": x, "y": y}
    _, _, _, hist = train.fit(step, params, train.init_optimizer(tx, params), rest,
                              [batch] * 5, num_steps=5, key=key, progress=False,
                              eval_fn=eval_fn, eval_every=2)
    assert [e["step"] for e in hist.evals] == [2, 4, 5]
    with pytest.raises(ValueError, match="ran out after 2 of num_steps=3"):
        train.fit(step, params, train.init_optimizer(tx, params), rest, [batch] * 2, num_steps=3,
                  key=key, progress=False)


def test_evaluate_pads_the_last_batch_with_zero_weight(key):
    logits_model = nnx.Linear(4, 3, rngs=nnx.Rngs(1))
    graphdef, params, rest = train.split_model(logits_model)
    x = np.asarray(jax.random.normal(key, (7, 4)))
    labels = np.array([0, 1, 2, 0, 1, 2, 0], np.int32)

    def metrics(model, batch):
        logits = model(batch["x"])
        hits = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
        return {"correct": (hits * batch["weight"]).sum(), "count": batch["weight"].sum()}

    out = train.evaluate(train.make_eval_step(graphdef, metrics), params, rest,
                         {"x": x, "labels": labels}, batch_size=3)
    expected = float(train.accuracy(logits_model(jnp.asarray(x)), jnp.asarray(labels)))
    assert out["count"] == 7.0
    assert out["correct"] / out["count"] == pytest.approx(expected)


def test_mask_freezes_everything_but_adapters_and_head(key):
    cfg = bert.BertConfig(vocab_size=30, hidden_size=16, num_layers=1, num_heads=2,
                          intermediate_size=32, max_position_embeddings=8)
    graphdef, params, rest = train.split_model(bert.BertClassifier(cfg, 3, rngs=nnx.Rngs(0)))
    pattern = r".*attn/(q|v)/kernel"
    params = lora.add_lora(params, lora.LoRARule(pattern=pattern, rank=2), key=key)
    mask = train.trainable_mask(params, train=[rules.Rule(pattern=pattern),
                                               rules.Rule(pattern="head/.*")])
    before = jax.tree.map(np.array, params)
    tx = train.adamw(1e-2, 10)
    step = train.make_train_step(graphdef, baselines.classifier_loss, tx, mask=mask)
    ids = np.asarray(jax.random.randint(key, (4, 6), 1, 30), np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "token_type_ids": np.zeros_like(ids), "labels": np.array([0, 1, 2, 1], np.int32)}
    opt_state = train.init_optimizer(tx, params, mask)
    for i in range(3):
        params, opt_state, rest, _ = step(params, opt_state, rest, batch,
                                          jax.random.fold_in(key, i))
    flat_before = dict(jax.tree_util.tree_leaves_with_path(before))
    changed = {jax.tree_util.keystr(path): not np.array_equal(flat_before[path], np.asarray(leaf))
               for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    trainable = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
    assert changed.keys() == trainable.keys()
    frozen_moved = [p for p, moved in changed.items() if moved and not trainable[p]]
    assert not frozen_moved
    assert all(changed[p] for p, m in trainable.items() if m)  # a moves once b is nonzero
    n_trainable = 2 * 2 * (16 + 16) + 16 * 3 + 3
    assert optax.tree.size(train.partition(params, mask)[0]) == n_trainable
    # optimizer state: Adam's two moments of the trainable leaves only, plus the counts
    moments = 2 * 4 * n_trainable
    assert moments <= measure.tree_nbytes(opt_state) <= moments + 64


def test_trainable_mask_rule_that_matches_nothing_raises():
    with pytest.raises(ValueError, match="head/.*.*matched no path"):
        train.trainable_mask({"w": jnp.ones(2)}, train=rules.Rule(pattern="head/.*"))


def test_cross_entropy_and_accuracy_weights():
    logits = jnp.array([[3.0, 0.0], [0.0, 3.0], [3.0, 0.0]])
    labels = jnp.array([0, 0, 0])
    assert float(train.accuracy(logits, labels)) == pytest.approx(2 / 3)
    assert float(train.accuracy(logits, labels, jnp.array([1.0, 0.0, 1.0]))) == 1.0
    unweighted = float(train.cross_entropy(logits, labels))
    weighted = float(train.cross_entropy(logits, labels, jnp.array([1.0, 1.0, 1.0])))
    assert weighted == pytest.approx(unweighted)


def test_adamw_validates_arguments():
    with pytest.raises(ValueError, match="warmup=10"):
        train.adamw(1e-3, 10, warmup=10)
    with pytest.raises(ValueError, match="lr=0"):
        train.adamw(0, 10)
