"""NSN: nested factors, rank control, the two-rank objective, FLOP accounting (tiny models)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from subspace_jax import forms, measure, nested, rules, train
from subspace_jax.models import bert
from subspace_jax.nested import core

TINY = bert.BertConfig(vocab_size=40, hidden_size=16, num_layers=2, num_heads=2,
                       intermediate_size=48, max_position_embeddings=8)
MLP_PATHS = [f"bert/encoder/layers/{i}/mlp/{n}" for i in range(2) for n in ("down", "up")]


def _classifier(seed=0):
    return bert.BertClassifier(TINY, 3, rngs=nnx.Rngs(seed))


def _batch(key, rows=4, length=8):
    ids = jax.random.randint(key, (rows, length), 1, TINY.vocab_size)
    return {"input_ids": ids, "attention_mask": jnp.ones_like(ids),
            "token_type_ids": jnp.zeros_like(ids), "labels": jnp.arange(rows) % 3}


def _logits(model, batch):
    return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])


def _ce(model, batch, key):
    del key
    return train.cross_entropy(_logits(model, batch), batch["labels"])


# --- the form -------------------------------------------------------------------------

# Nested is a member of the shared contract suite (tests/test_form_contract.py FORMS).


def test_full_rank_is_exact_and_prefixes_are_truncated_svds():
    w = jax.random.normal(jax.random.key(0), (24, 10))
    k = nested.Nested.from_dense(w)
    np.testing.assert_allclose(k.materialize(), w, atol=2e-5)
    s = np.linalg.svd(np.asarray(w), compute_uv=False)
    for r in (1, 3, 7):
        err = np.linalg.norm(np.asarray(k.prefix(r).materialize()) - np.asarray(w))
        np.testing.assert_allclose(err, np.sqrt((s[r:] ** 2).sum()), rtol=1e-4)  # Eckart-Young
        np.testing.assert_allclose(core.component_energy(k.a, k.b)["product"][:r], s[:r], rtol=1e-4)


def test_traced_rank_mask_equals_the_static_prefix_and_zeroes_the_tail_gradient():
    k = nested.Nested.from_dense(jax.random.normal(jax.random.key(0), (12, 9)))
    x = jax.random.normal(jax.random.key(1), (5, 12))
    f = jax.jit(lambda k, x, r: k.matmul_at(x, k.max_rank, r))
    for r in (1, 4, 9):
        np.testing.assert_allclose(f(k, x, jnp.int32(r)), k.prefix(r).matmul(x), atol=1e-5)
    grads = jax.grad(lambda k: (k.matmul_at(x, 9, jnp.int32(4)) ** 2).sum(), allow_int=True)(k)
    assert float(jnp.abs(grads.a[:, 4:]).max()) == 0.0 == float(jnp.abs(grads.b[4:]).max())
    assert float(jnp.abs(grads.a[:, :4]).max()) > 0.0


def test_nesting_holds_by_construction_and_fails_for_separate_truncations():
    # any factors, trained or not: prefixes of shared factors are nested
    k = nested.Nested(jax.random.normal(jax.random.key(0), (20, 8)),
                      jax.random.normal(jax.random.key(1), (8, 30)))
    worst = 0.0
    for r in range(1, 8):
        u = core.image_basis(k.prefix(r).materialize(), r)
        v = core.image_basis(k.prefix(r + 1).materialize(), r + 1)
        worst = max(worst, float(core.principal_angles(u, v).max()))
    # separately factored models ("specialists" from two different matrices) are not
    noise = 0.3 * jax.random.normal(jax.random.key(2), (20, 30))
    k2 = nested.Nested.from_dense(k.materialize() + noise)
    u = core.image_basis(k.prefix(3).materialize(), 3)
    v = core.image_basis(k2.prefix(4).materialize(), 4)
    other = float(core.principal_angles(u, v).max())
    print(f"largest angle: nested {np.degrees(worst):.2e} deg, separate "
          f"{np.degrees(other):.1f} deg")
    assert worst < 1e-3 and other > 0.1


def test_bad_ranks_are_clear_errors():
    w = jnp.ones((6, 4))
    with pytest.raises(ValueError, match=r"max_rank=5 is above min\(in, out\) = 4"):
        nested.Nested.from_dense(w, max_rank=5)
    k = nested.Nested.from_dense(jax.random.normal(jax.random.key(0), (6, 4)))
    for bad in (0, 5):
        with pytest.raises(ValueError, match=rf"rank={bad} is outside \[1, 4\]"):
            k.prefix(bad)
    with pytest.raises(TypeError, match="Python int"):
        k.prefix(2.0)


# --- conversion and rank control ------------------------------------------------------

def test_convert_reproduces_the_dense_model_and_keeps_attention_dense():
    model, batch = _classifier(), _batch(jax.random.key(1))
    converted = nested.convert(model)
    assert sorted(nested.kernels(converted)) == sorted(MLP_PATHS)
    assert not forms.is_form(converted.bert.encoder.layers[0].attn.q.kernel.get_value())
    np.testing.assert_allclose(_logits(converted, batch), _logits(model, batch), atol=1e-5)
    assert type(model.bert.encoder.layers[0].mlp.up.kernel.get_value()) is not nested.Nested
    # the input shares no array with the result
    ids = {id(x) for x in jax.tree.leaves(nnx.state(model))}
    assert not ids & {id(x) for x in jax.tree.leaves(nnx.state(converted))}


def test_bfloat16_layers_keep_their_dtype():
    mlp = nnx.Sequential(nnx.Linear(16, 40, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    model = nested.convert(mlp, nested.NestedRule(pattern=".*kernel"))
    kernel = model.layers[0].kernel.get_value()
    assert kernel.a.dtype == kernel.b.dtype == jnp.bfloat16
    x = jax.random.normal(jax.random.key(1), (3, 16)).astype(jnp.bfloat16)
    y, want = model(x), mlp(x)
    assert y.dtype == jnp.bfloat16
    err = float(jnp.abs(y.astype(jnp.float32) - want.astype(jnp.float32)).max())
    assert err <= 4 * 2.0 ** -8 * float(jnp.abs(want.astype(jnp.float32)).max())


def test_default_rules_select_mlp_paths_only():
    assert nested.MLP_PATTERN is rules.MLP_PATTERN and nested.NestedRule().pattern == rules.MLP_PATTERN
    rule = rules.Rule(pattern=nested.MLP_PATTERN)
    yes = ["bert/encoder/layers/3/mlp/up/kernel", "blocks/0/mlp/gate/kernel",
           "gpt_neox/layers/0/mlp/dense_h_to_4h/kernel", "mlp/layers/0/kernel"]
    no = ["bert/encoder/layers/3/attn/o/kernel", "gpt_neox/layers/0/attention/dense/kernel",
          "model/layers/0/self_attn/q_proj/kernel", "bert/encoder/layers/3/mlp_norm/scale",
          "bert/encoder/layers/3/mlp/up/bias"]
    assert all(rule.matches(p) for p in yes) and not any(rule.matches(p) for p in no)


@pytest.mark.parametrize("kind", ["state", "dict", "linen"])
def test_factorize_is_a_pure_tree_transform(kind):
    state = nnx.state(_classifier(), nnx.Param)
    tree = {"state": lambda: state, "dict": lambda: nnx.to_pure_dict(state),
            "linen": lambda: {"params": nnx.to_pure_dict(state)}}[kind]()
    out = nested.transform(tree, nested.NestedRule(max_rank=4))
    alias = nested.factorize(tree, max_rank=4)            # the old name, one more release
    assert jax.tree.structure(alias) == jax.tree.structure(out)
    pairs, _ = rules.leaf_paths(out)
    found = {p: leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf for p, leaf in pairs}
    forms_found = sorted(p for p, x in found.items() if isinstance(x, nested.Nested))
    prefix = "params/" if kind == "linen" else ""
    assert forms_found == sorted(f"{prefix}{p}/kernel" for p in MLP_PATHS)
    assert all(found[p].max_rank == 4 for p in forms_found)
    back = nested.truncate(out, 2)
    assert not any(forms.is_form(x) for x in jax.tree.leaves(tree, is_leaf=forms.is_form))
    kept = jax.tree.leaves(back, is_leaf=forms.is_form)
    assert {x.max_rank for x in kept if forms.is_form(x)} == {2}


def test_set_rank_global_per_layer_state_tree_and_truncate_agree():
    model, batch = nested.convert(_classifier()), _batch(jax.random.key(1))
    up = "bert/encoder/layers/0/mlp/up"
    pure = nested.truncate(nnx.state(model, nnx.Param), {up: 3})
    graphdef, params, rest = train.split_model(model)
    small = nested.set_rank(model, {up: 3})
    assert nested.ranks(small)[up] == 3 == nested.kernels(small)[up].width
    assert nested.ranks(small)["bert/encoder/layers/1/mlp/up"] == 16
    assert set(nested.ranks(model).values()) == {16}                 # the input is unchanged
    assert {k.width for k in nested.kernels(model).values()} == {16}
    by_model = _logits(small, batch)
    traced = nested.set_rank(params, {up: 3}, static=False)
    assert nested.kernels(traced)[up].width == 16 and nested.ranks(traced)[up] == 3
    by_state = _logits(nnx.merge(graphdef, traced, rest), batch)
    np.testing.assert_allclose(by_state, by_model, atol=1e-6)  # traced rank == static width
    layer = small.bert.encoder.layers[0].mlp.up
    x = jax.random.normal(jax.random.key(2), (5, 16))
    kernel = pure["bert"]["encoder"]["layers"][0]["mlp"]["up"]["kernel"].get_value()
    assert kernel.max_rank == 3
    np.testing.assert_allclose(forms.matmul(x, kernel) + layer.bias[...], layer(x), atol=1e-6)
    seven = nested.set_rank(small, 7)
    assert set(nested.ranks(seven).values()) == {7}
    assert {k.width for k in nested.kernels(seven).values()} == {7}


def test_rank_errors_name_the_problem():
    model = nested.convert(_classifier())
    with pytest.raises(ValueError, match=r"rank=0 is outside \[1, 16\]"):
        nested.set_rank(model, 0)
    with pytest.raises(ValueError, match=r"rank=17 is outside \[1, 16\]"):
        nested.set_rank(nnx.state(model), 17)
    with pytest.raises(ValueError, match=r"not converted: \['bert/encoder/layers/0/attn/q'\]"):
        nested.set_rank(model, {"bert/encoder/layers/0/attn/q": 2})
    four = nested.set_rank(model, 4)
    with pytest.raises(ValueError, match=r"above its computed width 4"):
        nested.set_rank(four, 8, static=False)
    with pytest.raises(ValueError, match=r"layers/0/mlp/down/kernel.*max_rank=17 is above min"):
        nested.convert(_classifier(), nested.NestedRule(max_rank=17))
    with pytest.raises(ValueError, match="no nested layers"):
        nested.set_rank(_classifier(), 2)
    with pytest.raises(ValueError, match=r"needs in_axes"):
        nested.transform({"mlp": {"kernel": jnp.ones((4, 2, 2))}})


def test_one_compilation_per_static_rank_and_one_for_every_traced_rank():
    model, batch = nested.convert(_classifier()), _batch(jax.random.key(1))
    traces = []

    @functools.partial(jax.jit, static_argnums=0)
    def forward(graphdef, params, rest):
        traces.append(1)
        return _logits(nnx.merge(graphdef, params, rest), batch)

    graphdef, params, rest = train.split_model(model)
    for r in (2, 9, 16, 5):  # traced ranks: one compilation for all
        jax.block_until_ready(forward(graphdef, nested.set_rank(params, r, static=False), rest))
    assert len(traces) == 1
    for r in (2, 9, 2, 9):  # static widths: one compilation per rank
        jax.block_until_ready(forward(*train.split_model(nested.set_rank(model, r))))
    assert len(traces) == 3


def test_forward_flops_follow_r_times_in_plus_out():
    model, batch = nested.convert(_classifier()), _batch(jax.random.key(1))
    tokens = batch["input_ids"].size

    def flops_at(r):
        g, p, s = train.split_model(nested.set_rank(model, r))
        return measure.flops(lambda p, s: _logits(nnx.merge(g, p, s), batch), p, s).matmul

    per_rank = 2 * tokens * sum(c.per_rank for c in nested.layer_costs(model))
    assert per_rank == 2 * tokens * 2 * 2 * (16 + 48)
    assert flops_at(9) - flops_at(3) == 6 * per_rank
    assert flops_at(16) - flops_at(1) == 15 * per_rank


# --- FLOP accounting -------------------------------------------------------------------

def _bert_mlp_tree():
    keys = jax.random.split(jax.random.key(0), 2)
    return nested.transform({"mlp": {"up": {"kernel": jax.random.normal(keys[0], (384, 1536))},
                                     "down": {"kernel": jax.random.normal(keys[1], (1536, 384))}}})


def test_flop_fractions_and_break_even_by_hand():
    tree = _bert_mlp_tree()
    costs = {c.path: c for c in nested.layer_costs(tree)}
    assert costs["mlp/up"].dense == 384 * 1536 and costs["mlp/up"].break_even == 307.2
    f = nested.flop_fractions(tree, 384, other_macs=100_000)
    assert f["mlp"] == 1.25 and f["max"] == 1.0
    assert f["model"] == (100_000 + 2 * 384 * 1920) / (100_000 + 2 * 384 * 1536)


@pytest.mark.parametrize("denominator", nested.DENOMINATORS)
def test_rank_for_budget_is_monotone_largest_feasible_and_handles_edges(denominator):
    tree = _bert_mlp_tree()
    other = 700_000
    frac = lambda r: nested.flop_fractions(tree, r, other_macs=other)[denominator]  # noqa: E731
    pick = lambda f: nested.rank_for_budget(tree, f, denominator, other_macs=other)  # noqa: E731
    budgets = np.linspace(frac(1), frac(384) * 1.1, 60)
    picked = [pick(float(b)) for b in budgets]
    assert picked == sorted(picked) and picked[0] == 1 and picked[-1] == 384
    for b, r in zip(budgets, picked):
        assert frac(r) <= b * (1 + 1e-12) and (r == 384 or frac(r + 1) > b)
    for r in (1, 2, 153, 307, 383, 384):  # a budget equal to cost(r) gives r exactly
        assert pick(frac(r)) == r
        if r > 1:
            assert pick(frac(r) * (1 - 1e-9)) == r - 1  # the slack is 1e-12 relative
    assert pick(1e9) == 384
    with pytest.raises(ValueError, match="below the cost of rank 1"):
        pick(frac(1) * (1 - 1e-9))
    assert pick(np.float32(frac(153))) == pick(frac(153))  # any real number
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "0.5"):
        with pytest.raises(ValueError, match="must be a finite number > 0"):
            pick(bad)
    with pytest.raises(ValueError, match="denominator="):
        nested.rank_for_budget(tree, 0.5, "flops")


def test_rank_for_budget_on_a_model_counts_the_other_linears():
    model = nested.convert(_classifier())
    other = nested.other_linear_macs(model)
    assert other == 2 * 4 * 16 * 16 + 16 * 3  # q, k, v, o per layer and the head
    r = nested.rank_for_budget(model, 0.9, "model")
    fraction = lambda r: nested.flop_fractions(model, r)["model"]  # noqa: E731
    assert fraction(r) <= 0.9 < fraction(r + 1)


# --- training ---------------------------------------------------------------------------

GRID = (2, 4, 8, 16)


def _nsn(grid=GRID, curriculum_steps=0):
    """A converted classifier and its training dict ``{"model": params, "nsn": objective}``."""
    graphdef, params, rest = train.split_model(nested.convert(_classifier()))
    state = {"model": params,
             "nsn": nested.objective(params, grid, curriculum_steps=curriculum_steps)}
    return graphdef, state, rest


def _with_log_var(state, values):
    return {**state, "nsn": dataclasses.replace(state["nsn"], log_var=jnp.asarray(values))}


def test_loss_is_the_uncertainty_weighted_sum_of_two_ranks():
    graphdef, state, rest = _nsn()
    batch = _batch(jax.random.key(1))
    s = np.array([0.1, -0.2, 0.3, 0.5])
    state = _with_log_var(state, s)
    key = jax.random.key(7)
    index, rank = state["nsn"].sample(jax.random.split(key)[0])
    value, aux = nested.loss(_ce, graphdef=graphdef, rest=rest)(state, batch, key)
    at = lambda r: _ce(nnx.merge(graphdef, nested.set_rank(state["model"], r, static=False),  # noqa: E731
                                 rest), batch, None)
    ce_v, ce_a = float(at(int(rank))), float(at(16))
    want = np.exp(-s[3]) * ce_a + s[3] + np.exp(-s[int(index)]) * ce_v + s[int(index)]
    np.testing.assert_allclose(float(value), want, rtol=1e-5)
    assert int(aux["variant_rank"]) == int(rank) and set(nested.ranks(state["model"]).values()) == {16}


def test_log_variances_get_gradients_and_updates_indexed_by_rank():
    graphdef, params, rest = _nsn()
    traces = []
    inner = nested.loss(_ce, graphdef=graphdef, rest=rest)

    def counted(params, batch, key):
        traces.append(1)
        return inner(params, batch, key)

    tx = nested.optimizer(train.adamw(1e-3, 12), log_var_lr=0.05)  # with clipping
    mask = train.trainable_mask(params)
    assert mask["nsn"].step is False and mask["nsn"].log_var is True
    step = train.make_train_step(None, counted, tx, mask=mask, post_update=nested.advance)
    opt_state = train.init_optimizer(tx, params, mask)
    assert any(getattr(x, "shape", None) == (4,) for x in jax.tree.leaves(opt_state))
    before = np.asarray(params["nsn"].log_var)
    structure = jax.tree.structure(opt_state)
    sampled = []
    for i in range(12):
        params, opt_state, rest, metrics = step(params, opt_state, rest,
                                                _batch(jax.random.key(i)), jax.random.key(100 + i))
        sampled.append(int(metrics["variant_rank"]))
        assert jax.tree.structure(opt_state) == structure
    after = np.asarray(params["nsn"].log_var)
    moved = {g for g, b, a in zip(GRID, before, after) if a != b}
    print("sampled", sampled, "s_k", after.round(4).tolist())
    assert len(traces) == 1 and len(set(sampled)) > 1
    assert moved == set(sampled) | {16}  # the anchor and exactly the sampled ranks moved
    assert int(params["nsn"].step) == 12
    assert set(nested.ranks(params["model"]).values()) == {16}  # the tree keeps its ranks


def test_log_variance_gradients_are_exact_at_the_anchor_and_the_sampled_rank_only():
    graphdef, state, rest = _nsn()
    batch = _batch(jax.random.key(1))
    s = jnp.array([0.1, -0.2, 0.3, 0.5])
    state = _with_log_var(state, s)
    key = jax.random.key(3)
    trainable, frozen = train.partition(state, train.trainable_mask(state))

    def objective(t):
        return nested.loss(_ce, graphdef=graphdef, rest=rest)(train.combine(t, frozen), batch, key)

    grads, aux = jax.jit(jax.grad(objective, has_aux=True))(trainable)
    index = GRID.index(int(aux["variant_rank"]))
    want = np.zeros(4)
    want[3] = 1 - np.exp(-0.5) * float(aux["ce_anchor"])  # d/ds (exp(-s) CE + s)
    want[index] = 1 - np.exp(-float(s[index])) * float(aux["ce_variant"])
    np.testing.assert_allclose(np.asarray(grads["nsn"].log_var), want, rtol=1e-5, atol=1e-7)
    assert want[3] != 0 and want[index] != 0


def test_curriculum_widens_toward_low_ranks():
    obj = nested.Objective(jnp.zeros(6), jnp.int32(0), grid=(1, 2, 4, 8, 16, 32),
                           curriculum_steps=100)
    keys = jax.random.split(jax.random.key(0), 200)
    seen = {}
    for t in (0, 50, 100):
        at_t = dataclasses.replace(obj, step=jnp.int32(t))
        seen[t] = {int(at_t.sample(k)[1]) for k in keys}
    assert seen[0] == {16} and min(seen[50]) > 1 and seen[100] == {1, 2, 4, 8, 16}


def test_objective_and_grid_errors():
    params = nnx.state(nested.convert(_classifier()), nnx.Param)
    with pytest.raises(ValueError, match="ending at the anchor 16"):
        nested.objective(params, (2, 4, 8))
    with pytest.raises(ValueError, match="no Nested form"):
        nested.objective(nnx.state(_classifier()))
    with pytest.raises(ValueError, match="curriculum_steps=-1"):
        nested.objective(params, curriculum_steps=-1)
    graphdef, state, rest = _nsn()
    four = {**state, "model": nested.set_rank(state["model"], 4)}
    with pytest.raises(ValueError, match="computes only 4 components"):
        nested.loss(_ce, graphdef=graphdef)(four, _batch(jax.random.key(0)), jax.random.key(0))
    with pytest.raises(TypeError, match=r"takes \{'model': params, 'nsn'"):
        nested.loss(_ce, graphdef=graphdef)(state["model"], _batch(jax.random.key(0)),
                                            jax.random.key(0))


def test_the_objective_is_returned_never_attached():
    model = nested.convert(_classifier())
    before = jax.tree.structure(nnx.state(model))
    obj = nested.objective(model)
    assert jax.tree.structure(nnx.state(model)) == before and not hasattr(model, "nsn")
    assert obj.grid[-1] == 16 and int(obj.step) == 0
