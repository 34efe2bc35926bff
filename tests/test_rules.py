"""Path rules pick exactly the intended leaves on NNX, pure-dict and linen trees."""

import collections
import dataclasses

import flax.linen as linen
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from subspace_jax import forms, rules


class Block(nnx.Module):
    def __init__(self, rngs):
        self.attn_q = nnx.Linear(8, 8, rngs=rngs)
        self.up = nnx.Linear(8, 16, rngs=rngs)
        self.down = nnx.Linear(16, 8, rngs=rngs)
        self.norm = nnx.LayerNorm(8, rngs=rngs)


class Net(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(10, 8, rngs=rngs)
        self.blocks = nnx.List([Block(rngs) for _ in range(2)])
        self.head = nnx.Linear(8, 3, rngs=rngs)


class LinenNet(linen.Module):
    @linen.compact
    def __call__(self, x):
        x = linen.Dense(16, name="up")(x)
        return linen.Dense(4, name="down")(x)


MLP_RULES = [rules.Rule(pattern=r"blocks/\d+/(up|down)/kernel")]
WANT_NNX = ["blocks/0/down/kernel", "blocks/0/up/kernel", "blocks/1/down/kernel", "blocks/1/up/kernel"]


def _selected(sel):
    return sorted(m.path for m in sel.selected)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Pair:
    w: jax.Array
    b: jax.Array


class _Opaque:  # registered without key names: its children get FlattenedIndexKeys
    def __init__(self, xs):
        self.xs = xs


jax.tree_util.register_pytree_node(_Opaque, lambda o: (o.xs, None), lambda _, xs: _Opaque(xs))


def _hand_join(keypath):
    """The hand-written join ``keypath_str`` used before it became ``jax.tree_util.keystr``."""
    parts = []
    for k in keypath:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    return "/".join(parts)


def test_keypath_str_matches_the_hand_join_on_every_key_kind():
    state = nnx.state(nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0))), nnx.Param)
    pair = collections.namedtuple("Pair", "p q")
    tree = {
        "d": {"x": 1, "y": {3: 2}},  # string and int dict keys
        "seq": [4, (5, 6)],  # list and tuple indices
        "dc": _Pair(jnp.ones(2), jnp.zeros(2)),  # registered dataclass attributes
        "nt": pair(7, 8),  # named tuple attributes
        "op": _Opaque([9, 10]),  # flattened indices
        "lr": forms.LowRank(jnp.ones((3, 1)), jnp.ones((1, 2))),  # a kernel form's fields
        "st": state,  # nnx.State, walked into the Variables (".../value")
        "linen": linen.FrozenDict({"params": {"k": 11}}),
    }
    want = {"d/x", "d/y/3", "seq/0", "seq/1/1", "dc/w", "nt/q", "op/1", "lr/b",
            "st/layers/0/kernel/value", "st/layers/0/bias/value", "linen/params/k"}
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    got = [rules.keypath_str(kp) for kp, _ in flat]
    assert got == [_hand_join(kp) for kp, _ in flat]
    assert want <= set(got)
    with_vars, _ = jax.tree_util.tree_flatten_with_path(state, is_leaf=rules._is_leaf)
    assert [rules.keypath_str(kp) for kp, _ in with_vars] == ["layers/0/bias", "layers/0/kernel"]
    assert rules.keypath_str(()) == _hand_join(()) == ""
    assert rules.keypath_str(("a", 1)) == _hand_join(("a", 1)) == "a/1"  # plain keys


def test_nnx_state_paths_and_selection():
    state = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
    sel = rules.select(state, MLP_RULES)
    assert _selected(sel) == WANT_NNX
    assert sel.counts == (4,)
    paths = [m.path for m in sel.matches]
    assert "embed/embedding" in paths and "blocks/1/norm/scale" in paths


def test_pure_dict_selection():
    pure = nnx.to_pure_dict(nnx.state(Net(nnx.Rngs(0)), nnx.Param))
    assert _selected(rules.select(pure, MLP_RULES)) == WANT_NNX


def test_linen_params_selection():
    variables = LinenNet().init(jax.random.key(0), jnp.ones((1, 8)))
    sel = rules.select(variables, rules.Rule(pattern=r"params/(up|down)/kernel"))
    assert _selected(sel) == ["params/down/kernel", "params/up/kernel"]


def test_first_match_wins_and_skip():
    state = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
    sel = rules.select(
        state,
        [rules.Rule(pattern=r"blocks/1/.*", skip=True), rules.Rule(pattern=r".*/kernel")],
    )
    assert _selected(sel) == [
        "blocks/0/attn_q/kernel",
        "blocks/0/down/kernel",
        "blocks/0/up/kernel",
        "head/kernel",
    ]
    claimed_by_skip = [m.path for m in sel.matches if m.rule_index == 0]
    assert "blocks/1/up/kernel" in claimed_by_skip and "blocks/1/norm/bias" in claimed_by_skip


def test_unmatched_rule_error_names_rule_and_paths():
    state = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
    with pytest.raises(ValueError, match=r"rule #1 Rule\(pattern='mlp/up/kernel'.*matched no path") as e:
        rules.select(state, [rules.Rule(pattern=".*kernel"), rules.Rule(pattern="mlp/up/kernel")])
    assert "blocks/0/up/kernel" in str(e.value)


def test_shadowed_rule_is_reported():
    state = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
    with pytest.raises(ValueError, match=r"matched 2 path\(s\) that earlier rules claimed first"):
        rules.select(state, [rules.Rule(pattern=".*"), rules.Rule(pattern=r"blocks/\d/up/kernel")])


def test_allow_unused_and_optional():
    state = nnx.state(Net(nnx.Rngs(0)), nnx.Param)
    sel = rules.select(state, [rules.Rule(pattern="nothing")], allow_unused=True)
    assert sel.unused == (rules.Rule(pattern="nothing"),) and not sel.selected
    sel = rules.select(state, [rules.Rule(pattern="nothing", optional=True)])
    assert len(sel.unused) == 1


def test_bad_regex_and_bad_rule_type():
    with pytest.raises(ValueError, match="not a valid regex"):
        rules.Rule(pattern="(")
    with pytest.raises(TypeError, match="rule #0 must be"):
        rules.select({"a": jnp.ones(2)}, ["a"])


def test_apply_keeps_kind_variables_and_untouched_leaves():
    model = Net(nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    out = rules.apply(state, MLP_RULES, lambda path, x, rule: jnp.zeros_like(x))
    assert isinstance(out, nnx.State)
    assert isinstance(out["blocks"][0]["up"]["kernel"], nnx.Param)
    assert float(jnp.abs(out["blocks"][0]["up"]["kernel"][...]).sum()) == 0.0
    assert out["head"]["kernel"][...] is state["head"]["kernel"][...]
    assert float(jnp.abs(state["blocks"][0]["up"]["kernel"][...]).sum()) > 0  # input untouched
    nnx.update(model, out)
    assert float(jnp.abs(model.blocks[1].down.kernel[...]).sum()) == 0.0


def test_apply_error_names_path():
    def fail(path, x, rule):
        raise ValueError("boom")

    with pytest.raises(ValueError, match=r"at 'head/kernel' \(shape \(8, 3\)\): boom"):
        rules.apply(nnx.state(Net(nnx.Rngs(0))), rules.Rule(pattern="head/kernel"), fail)


def test_table_lists_paths_shapes_actions():
    sel = rules.select(nnx.state(Net(nnx.Rngs(0)), nnx.Param), MLP_RULES)
    table = sel.table()
    print(table)
    lines = table.splitlines()
    assert lines[0].split() == ["path", "shape", "dtype", "action"]
    assert len(lines) == 2 + 4
    assert ["blocks/0/up/kernel", "(8,", "16)", "float32", "select"] in [r.split() for r in lines]
    assert len(sel.table(all_leaves=True).splitlines()) == 2 + len(sel.matches)
