"""The shared training utilities: step, fit loop, evaluation, masks (tiny problems only)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from subspace_jax import baselines, lora, rules, train
from subspace_jax.models import bert


def _regression(key, n=64):
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (n, 8))
    y = x @ jax.random.normal(kw, (8, 2))
    return np.asarray(x), np.asarray(y)


def _mse(model, batch, key):
    del key
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


def test_fit_reduces_loss_without_recompiling(key):
    x, y = _regression(key)
    graphdef, params, rest = train.split_model(nnx.Linear(8, 2, rngs=nnx.Rngs(0)))
    tx = train.adamw(1e-1, 60, warmup=5)
    step = train.make_train_step(graphdef, _mse, tx)
    batches = ({"x": x[i % 4 * 16:][:16], "y": y[i % 4 * 16:][:16]} for i in range(60))
    params, _, hist = train.fit(step, params, train.init_optimizer(tx, params), rest, batches,
                                num_steps=60, key=key, progress=False)
    print(f"loss {hist.losses[0]:.3f} -> {hist.losses[-1]:.4f}")
    assert len(hist.losses) == len(hist.step_times) == 60
    assert hist.losses[-1] < 0.1 * hist.losses[0]
    assert step._cache_size() == 1  # one compile for 60 steps
    assert hist.median_step_time() > 0


def test_fit_runs_evals_and_reports_short_iterators(key):
    x, y = _regression(key, n=16)
    graphdef, params, rest = train.split_model(nnx.Linear(8, 2, rngs=nnx.Rngs(0)))
    tx = optax.sgd(0.05)
    step = train.make_train_step(graphdef, _mse, tx, donate=False)
    calls = []

    def eval_fn(p):
        calls.append(1)
        return {"val": float(len(calls))}

    batch = {"x": x, "y": y}
    _, _, hist = train.fit(step, params, train.init_optimizer(tx, params), rest, [batch] * 5,
                           num_steps=5, key=key, progress=False, eval_fn=eval_fn, eval_every=2)
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
    params = lora.add_lora(params, lora.LoRARule(pattern=r".*attn/(q|v)/kernel", rank=2),
                           key=key)
    mask = lora.trainable_mask(params, also=rules.Rule(pattern="head/.*"))
    before = jax.tree.map(np.array, params)
    tx = lora.freeze(train.adamw(1e-2, 10), mask)
    step = train.make_train_step(graphdef, baselines.classifier_loss, tx, mask=mask)
    ids = np.asarray(jax.random.randint(key, (4, 6), 1, 30), np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "token_type_ids": np.zeros_like(ids), "labels": np.array([0, 1, 2, 1], np.int32)}
    opt_state = train.init_optimizer(tx, params)
    for i in range(3):
        params, opt_state, _ = step(params, opt_state, rest, batch, jax.random.fold_in(key, i))
    flat_before = dict(jax.tree_util.tree_leaves_with_path(before))
    changed = {jax.tree_util.keystr(path): not np.array_equal(flat_before[path], np.asarray(leaf))
               for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    trainable = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
    assert changed.keys() == trainable.keys()
    frozen_moved = [p for p, moved in changed.items() if moved and not trainable[p]]
    assert not frozen_moved
    assert all(changed[p] for p, m in trainable.items() if m)  # a moves once b is nonzero
    assert train.count_params(params, mask) == 2 * 2 * (16 + 16) + 16 * 3 + 3


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
