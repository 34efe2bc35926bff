"""LittleBit-2: rank rule, packing, Dual-SVID + Joint-ITQ, both form states, bits, errors.

The contract every form honours (matmul against materialize in float32 and bfloat16, bits,
FLOPs, jit, eval_shape, checkpoints, sharding, training) runs on both LittleBit forms in
tests/test_form_contract.py; this file keeps what is LittleBit's own."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from subspace_jax import checkpoint, forms, littlebit, measure, rules
from subspace_jax.littlebit import core


def _train_form(key, shape, dtype):
    kernel = jax.random.normal(key, shape, jnp.float32)
    return littlebit.BinaryLowRank.from_dense(kernel, rank=8, itq_iters=5, key=key, dtype=dtype)


# rank 8 with the residual path, a few ITQ steps; uint8 words (SHAPE exercises the padding)
FACTORIES = {"littlebit": _train_form,
             "littlebit_packed": lambda key, shape, dtype: _train_form(key, shape, dtype).deploy()}
SHAPE = (16, 12)  # not a multiple of the word size: padding is exercised


def _heavy_tailed(key, shape, exponent=1.0):
    """A matrix with singular values k**-exponent and random row magnitudes."""
    k1, k2, k3 = jax.random.split(key, 3)
    m, n = shape
    q1, _ = jnp.linalg.qr(jax.random.normal(k1, (m, m)))
    q2, _ = jnp.linalg.qr(jax.random.normal(k2, (n, n)))
    k = min(m, n)
    s = jnp.arange(1, k + 1, dtype=jnp.float32) ** -exponent
    rows = jnp.exp(jax.random.normal(k3, (m, 1)))
    return rows * (q1[:, :k] * s) @ q2[:, :k].T


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


# --- rank and bit formulas -------------------------------------------------------------------


def test_rank_rule_matches_the_formula_on_minilm_shapes():
    # s = (ab bpw - 16 P (a+b)) / (P (a+b+16)), floor to a multiple of 8.
    assert [core.rank_for_bpw(384, 1536, b) for b in (1.0, 0.55, 0.3)] == [136, 64, 24]
    assert [core.rank_for_bpw(384, 384, b) for b in (1.0, 0.55, 0.3)] == [72, 32, 8]
    assert core.rank_for_bpw(384, 1536, 0.1, residual=False) == 8
    assert core.formula_bits(384, 1536, 24) == 2 * 24 * (384 + 1536 + 16) + 32 * (384 + 1536)
    assert core.formula_bits(384, 1536, 8, residual=False) == 8 * 1936 + 16 * 1920
    for shape in [(384, 1536), (1536, 384), (384, 384), (1000, 3000)]:
        for bpw in (1.0, 0.55, 0.3):
            r = core.rank_for_bpw(*shape, bpw)
            assert r % 8 == 0 and r >= 8
            assert core.formula_bits(*shape, r) <= bpw * shape[0] * shape[1]  # fits the budget
            assert core.formula_bits(*shape, r + 8) > bpw * shape[0] * shape[1]  # largest that fits


def test_rank_rule_errors_and_non_strict_floor():
    with pytest.raises(ValueError, match=r"bpw=0.1 is too low for a \(384, 384\).*rank 8 needs 0.2"):
        core.rank_for_bpw(384, 384, 0.1)
    assert core.rank_for_bpw(384, 384, 0.1, strict=False) == 8
    with pytest.raises(ValueError, match="exceeds|> min"):
        core.rank_for_bpw(64, 64, 30.0, residual=False)
    with pytest.raises(ValueError, match="bpw must be"):
        core.rank_for_bpw(64, 64, float("nan"))


# --- packing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("word", [np.uint8, np.uint32])
@pytest.mark.parametrize("shape,axis", [((1,), 0), ((7, 3), 0), ((8, 5), 0), ((33, 2), 0),
                                        ((2, 65, 4), 1), ((3, 31), 1), ((2, 32, 3), 1)])
def test_pack_unpack_round_trips_every_bit(word, shape, axis):
    x = jax.random.normal(jax.random.key(sum(shape)), shape)
    x = x.at[(0,) * x.ndim].set(0.0)  # zero is +1
    words = core.pack_signs(x, axis=axis, word=word)
    w = 8 * np.dtype(word).itemsize
    n = shape[axis]
    assert words.dtype == np.dtype(word)
    assert words.shape == shape[:axis] + (-(-n // w),) + shape[axis + 1:]
    np.testing.assert_array_equal(core.unpack_signs(words, n, axis=axis), core.sign(x))
    # LSB-first with -1 -> bit 1 is numpy's little-endian bit order; padding bits are 0.
    bits = np.moveaxis(np.asarray(x) < 0, axis, -1)
    padded = np.concatenate([bits, np.zeros(bits.shape[:-1] + ((-n) % w,), bool)], axis=-1)
    as_bytes = np.packbits(padded, axis=-1, bitorder="little")
    words_last = np.ascontiguousarray(np.moveaxis(np.asarray(words), axis, -1))
    np.testing.assert_array_equal(words_last.view(np.uint8), as_bytes)


def test_signs_map_zero_to_plus_one_and_have_surrogate_gradients():
    x = jnp.array([-2.0, -0.005, 0.0, 0.005, 0.5, 2.0])
    np.testing.assert_array_equal(core.smooth_sign(x), [-1, -1, 1, 1, 1, 1])
    smooth = jax.vmap(jax.grad(core.smooth_sign))(x)
    np.testing.assert_allclose(smooth, 100 * (1 - jnp.tanh(100 * x) ** 2), rtol=1e-6)
    np.testing.assert_array_equal(jax.vmap(jax.grad(core.clipped_sign))(x), [0, 1, 1, 1, 1, 0])


# --- Dual-SVID and Joint-ITQ -----------------------------------------------------------------


def test_joint_itq_rotation_leaves_the_product_unchanged():
    w = _heavy_tailed(jax.random.key(0), (96, 160))
    u, v = core.balanced_factors(w, 32)
    r = core.joint_itq(u, v, jax.random.key(1), iters=50)
    np.testing.assert_allclose(r @ r.T, jnp.eye(32), atol=1e-5)
    np.testing.assert_allclose((u @ r) @ (v @ r).T, u @ v.T, atol=1e-5 * float(jnp.abs(w).max()))
    # ...and it moves the rows of [U; V] toward hypercube vertices: the ITQ objective falls.
    x = jnp.concatenate([u, v])
    before = jnp.linalg.norm(core.sign(x) - x)
    after = jnp.linalg.norm(core.sign(x @ r) - x @ r)
    assert float(after) < float(before)


@pytest.mark.parametrize("shape,rank", [((256, 256), 16), ((256, 512), 32)])
def test_joint_itq_lowers_error_on_heavy_tailed_spectra(shape, rank):
    w = _heavy_tailed(jax.random.key(2), shape, exponent=0.75)
    errs = {}
    for name, iters in [("dual_svid", 0), ("joint_itq", 50)]:
        for residual in (False, True):
            form = littlebit.BinaryLowRank.from_dense(w, rank=rank, residual=residual, itq_iters=iters)
            errs[name, residual] = _rel(form.materialize(), w)
    print({f"{k[0]}{'+res' if k[1] else ''}": round(v, 4) for k, v in errs.items()})
    for residual in (False, True):
        assert errs["joint_itq", residual] < 0.95 * errs["dual_svid", residual]
        assert errs["dual_svid", residual] < 1.0
    assert errs["joint_itq", True] < errs["joint_itq", False]  # the residual path helps


def test_dual_svid_structure():
    w = jax.random.normal(jax.random.key(3), (40, 24))
    f = core.littlebit_init(w, jax.random.key(0), rank=8, itq_iters=0)
    u, v = core.balanced_factors(w, 8)
    np.testing.assert_array_equal(core.sign(f["u"][0]), core.sign(u))  # no rotation: SVD signs
    # Dual-SVID: outer(h, lu) and outer(g, lv) are the best rank-1 fits of |U| and |V|
    for path in range(2):
        for rows, cols, latent in (("h", "lu", "u"), ("g", "lv", "v")):
            p, s, qt = np.linalg.svd(np.abs(np.asarray(f[latent][path], np.float64)))
            best = np.abs(s[0] * np.outer(p[:, 0], qt[0]))  # Perron vectors: one-signed
            np.testing.assert_allclose(np.outer(f[rows][path], f[cols][path]), best,
                                       rtol=1e-4, atol=1e-5 * s[0], err_msg=f"{path} {rows}")
    # The residual path fits what the binarised primary leaves.
    primary = core.path_dense(*(f[k][0] for k in ("u", "v", "h", "g")), f["lu"][0] * f["lv"][0])
    u2, _ = core.balanced_factors(w - primary, 8)
    np.testing.assert_allclose(jnp.abs(f["u"][1]), jnp.abs(u2), rtol=1e-3, atol=1e-4)


# --- the two form states ---------------------------------------------------------------------


@pytest.fixture(params=sorted(FACTORIES))
def make(request):
    return FACTORIES[request.param]


def test_every_contraction_goes_through_dot_general(make):
    kernel = make(jax.random.key(0), SHAPE, jnp.float32)
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return jax.lax.dot_general(*args, **kwargs)

    kernel.matmul(jnp.ones((3, SHAPE[0])), dot_general=spy)
    assert calls == [(3, SHAPE[0]), (3, 2 * 8)]  # two thin matmuls for both paths together


def test_packed_bits_are_the_formula_plus_the_word_padding():
    kernel = FACTORIES["littlebit_packed"](jax.random.key(0), SHAPE, jnp.float32)
    pad = core.padded_bits(*SHAPE, 8, np.uint8)  # 8 * 2 paths * (2 + 2 words of 8 bits)
    assert kernel.bits == core.formula_bits(*SHAPE, 8) + pad == 8 * kernel.nbytes
    assert pad == 2 * 8 * ((-16) % 8 + (-12) % 8)


@pytest.mark.parametrize("grad", ["smooth", "clipped"])
def test_training_form_learns(grad):
    kernel = littlebit.BinaryLowRank.from_dense(
        jax.random.normal(jax.random.key(0), SHAPE), rank=8, itq_iters=5, grad=grad)
    x = jax.random.normal(jax.random.key(1), (32, SHAPE[0]))
    y = jax.random.normal(jax.random.key(2), (32, SHAPE[1]))

    def loss(k):
        return jnp.mean((forms.matmul(x, k) - y) ** 2)

    grads = jax.jit(jax.grad(loss))(kernel)
    assert float(jnp.abs(grads.u).max()) > 0 and float(jnp.abs(grads.lu).max()) > 0
    tx = optax.adam(1e-2)

    @jax.jit
    def step(kernel, state):
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction mixes int and float
            updates, state = tx.update(jax.grad(loss)(kernel), state, kernel)
        return optax.apply_updates(kernel, updates), state

    state = tx.init(kernel)
    losses = [float(loss(kernel))]
    for _ in range(20):
        kernel, state = step(kernel, state)
        losses.append(float(loss(kernel)))
    assert type(kernel) is littlebit.BinaryLowRank and kernel.grad == grad
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.parametrize("word", [np.uint8, np.uint32])
def test_deployed_form_gives_the_training_signs_outputs(word):
    train = littlebit.BinaryLowRank.from_dense(
        jax.random.normal(jax.random.key(0), (72, 40)), rank=16, itq_iters=10)
    packed = train.deploy(word=word)
    np.testing.assert_array_equal(core.unpack_signs(packed.v_bits, 72, axis=1), core.sign(train.v))
    np.testing.assert_array_equal(core.unpack_signs(packed.u_bits, 40, axis=1), core.sign(train.u))
    # The same signs with the 16-bit fused scales, evaluated by the training form:
    f32 = lambda t: t.astype(jnp.float32)  # noqa: E731
    ref = littlebit.BinaryLowRank(u=train.u, v=train.v, h=f32(packed.h), g=f32(packed.g),
                                  lu=f32(packed.l), lv=jnp.ones_like(train.lv))
    x = jax.random.normal(jax.random.key(1), (5, 72))
    np.testing.assert_allclose(packed.matmul(x), ref.matmul(x), rtol=1e-5, atol=1e-5)
    want = train.matmul(x)  # unrounded scales: within 16-bit rounding
    np.testing.assert_allclose(packed.matmul(x), want, atol=2e-3 * float(jnp.abs(want).max()))


# --- tree transforms, accounting, checkpoint size --------------------------------------------


def _tree(key=0):
    keys = jax.random.split(jax.random.key(key), 4)
    return {
        "embed": {"embedding": jax.random.normal(keys[0], (50, 128))},
        "layers": [{"mlp": {"kernel": jax.random.normal(keys[1], (128, 264)),
                            "bias": jax.random.normal(keys[2], (264,))},
                    "norm": {"scale": jnp.ones(264), "bias": jnp.zeros(264)}}],
        "head": {"kernel": jax.random.normal(keys[3], (264, 10))},
    }


def _rule(pattern, bpw=1.0, **kwargs):
    return littlebit.LittleBitRule(pattern=pattern, bpw=bpw, **kwargs)


def test_bit_count_equals_formula_and_checkpoint_size(tmp_path):
    packed = littlebit.deploy(littlebit.transform(_tree(), _rule(".*mlp/kernel")))
    acc = littlebit.accounting(packed)
    (layer,) = acc.layers
    form = packed["layers"][0]["mlp"]["kernel"]
    assert layer.rank == 24 and layer.bpw <= 1.0 + layer.padding / (128 * 264)
    assert layer.bits == form.bits == layer.formula + layer.padding
    assert layer.padding == 2 * 24 * ((-264) % 8)  # 128 packs exactly; 264 = 33 bytes: no pad
    assert layer.formula == core.formula_bits(128, 264, 24)
    assert set(acc.by_kind()) == {"embedding", "norm", "bias", "head"}
    assert acc.total_bits == 8 * measure.tree_nbytes(packed)
    # Uncompressed zarr checkpoint without OCDBT: every array is raw chunk files, whose bytes
    # are exactly the predicted ones (OCDBT's batched data files add load-dependent headers).
    path = pathlib.Path(tmp_path) / "raw"
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False,
                                                      use_ocdbt=False)) as ckptr:
        ckptr.save(path, args=ocp.args.PyTreeSave(packed))
    chunks = [f for f in path.rglob("*") if f.is_file() and re.fullmatch(r"\d+(\.\d+)*", f.name)]
    data = sum(f.stat().st_size for f in chunks)
    print(f"predicted {acc.total_bits // 8} B, checkpoint chunks {data} B in {len(chunks)} files")
    assert len(chunks) >= len(jax.tree.leaves(packed)) and data == acc.total_bits // 8
    # The library's (zstd, OCDBT) checkpoint is no larger than the same format uncompressed,
    # and reloads to identical outputs.
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as ckptr:
        ckptr.save(tmp_path / "ocdbt", args=ocp.args.PyTreeSave(packed))
    saved = checkpoint.save(tmp_path / "zstd", packed)
    assert sum(f.stat().st_size for f in saved.rglob("*") if f.is_file()) <= sum(
        f.stat().st_size for f in (tmp_path / "ocdbt").rglob("*") if f.is_file())
    restored = checkpoint.restore(saved, checkpoint.abstract(packed))
    x = jax.random.normal(jax.random.key(5), (3, 128))
    reloaded = restored["layers"][0]["mlp"]["kernel"]
    np.testing.assert_array_equal(forms.matmul(x, reloaded), forms.matmul(x, form))


def test_weight_memory_is_the_bit_count():
    kernel = littlebit.BinaryLowRank.from_dense(
        jax.random.normal(jax.random.key(0), (192, 768)), rank=16, itq_iters=2).deploy()
    x = jnp.ones((64, 192))
    mem = measure.compiled_memory(lambda x, k: forms.matmul(x, k), x, kernel)
    assert mem.argument == x.nbytes + kernel.bits // 8
    # The working set: the unpacked thin (in + out) x 2r matrices, not a dense (in, out) one.
    assert mem.temp < 4 * 192 * 768 // 4


def test_transform_works_on_dicts_linen_and_nnx_state():
    tree = _tree()
    out = littlebit.transform(tree, _rule(".*mlp/kernel"))
    assert isinstance(out["layers"][0]["mlp"]["kernel"], littlebit.BinaryLowRank)
    assert out["head"]["kernel"] is tree["head"]["kernel"]
    linen = littlebit.transform({"params": tree}, _rule("params/.*mlp/kernel"))
    np.testing.assert_array_equal(linen["params"]["layers"][0]["mlp"]["kernel"].u,
                                  out["layers"][0]["mlp"]["kernel"].u)
    model = nnx.Sequential(nnx.Linear(128, 256, rngs=nnx.Rngs(0)), nnx.Linear(256, 8, rngs=nnx.Rngs(1)))
    small = littlebit.convert(model, _rule("layers/0/kernel"))
    packed = littlebit.convert(model, _rule("layers/0/kernel"), deployed=True)
    graphdef, state = nnx.split(small)
    assert isinstance(state["layers"][0]["kernel"].get_value(), littlebit.BinaryLowRank)
    x = jax.random.normal(jax.random.key(1), (4, 128))
    np.testing.assert_allclose(packed(x), small(x), rtol=2e-3, atol=2e-3)
    assert type(model.layers[0].kernel.get_value()) is not littlebit.BinaryLowRank  # input untouched
    deployed = littlebit.deploy(state)
    assert isinstance(deployed, nnx.State)
    np.testing.assert_array_equal(nnx.merge(graphdef, deployed)(x), packed(x))


def test_bad_input_errors_name_the_layer():
    tree = _tree()
    with pytest.raises(ValueError, match=r"'layers/0/mlp/kernel'.*bpw=0.05 is too low"):
        littlebit.transform(tree, _rule(".*mlp/kernel", bpw=0.05))
    with pytest.raises(ValueError, match=r"'layers/0/mlp/bias'.*2-D"):
        littlebit.transform(tree, _rule(".*mlp/bias"))
    bad = {"w": {"kernel": tree["layers"][0]["mlp"]["kernel"].at[3, 4].set(jnp.nan)}}
    with pytest.raises(ValueError, match=r"'w/kernel'.*NaN"):
        littlebit.transform(bad, _rule(".*kernel"))
    packed = littlebit.deploy(littlebit.transform(tree, _rule(".*mlp/kernel")))
    with pytest.raises(ValueError, match=r"'layers/0/mlp/kernel' is already deployed"):
        littlebit.deploy(packed)
    with pytest.raises(TypeError, match=r"'layers/0/mlp/kernel'.*already a PackedBinaryLowRank"):
        littlebit.transform(packed, _rule(".*mlp/kernel"))
    with pytest.raises(ValueError, match="no BinaryLowRank"):
        littlebit.deploy(tree)
    # settings are checked on the rule; a plain non-skip rule carries none
    with pytest.raises(ValueError, match=r"LittleBitRule\('.\*'\).bpw must be"):
        _rule(".*", bpw=-1.0)
    with pytest.raises(ValueError, match=r"itq_iters must be an int >= 0"):
        _rule(".*", itq_iters=-1)
    with pytest.raises(ValueError, match=r"grad must be one of"):
        _rule(".*", grad="sign")
    with pytest.raises(TypeError, match=r"rule #0 .*needs LittleBitRule"):
        littlebit.transform(tree, rules.Rule(pattern=".*mlp/kernel"))
    # an N-D kernel needs its in_axes, and a bpw that does not fit names the folded matrix
    tree3 = {"attn": {"kernel": jax.random.normal(jax.random.key(0), (64, 4, 32))}}
    with pytest.raises(ValueError, match=r"'attn/kernel' \(shape \(64, 4, 32\)\).*needs in_axes"):
        littlebit.transform(tree3, _rule(".*"))
    with pytest.raises(ValueError, match=r"too low for a \(64, 128\) kernel.*\(64, 4, 32\) kernel "
                                         r"folded with in_axes=\(0,\)"):
        littlebit.transform(tree3, _rule(".*", in_axes=(0,)))


def test_skip_rules_and_the_old_names_give_the_same_forms():
    tree = _tree()
    new = littlebit.transform(tree, [rules.Rule(pattern="head/.*", skip=True),
                                     _rule(".*kernel", itq_iters=0)], key=jax.random.key(4))
    assert new["head"]["kernel"] is tree["head"]["kernel"]
    old = littlebit.compress(tree, [rules.Rule(pattern="head/.*", skip=True),
                                    rules.Rule(pattern=".*kernel")], 1.0, itq=False,
                             key=jax.random.key(4))
    jax.tree.map(np.testing.assert_array_equal, old, new)
    model = nnx.Linear(128, 64, rngs=nnx.Rngs(0))
    a = littlebit.compress_model(model, rules.Rule(pattern="kernel"), 4.0, itq_iters=3)
    b = littlebit.convert(model, _rule("kernel", bpw=4.0, itq_iters=3))
    jax.tree.map(np.testing.assert_array_equal, nnx.state(a), nnx.state(b))


@pytest.mark.parametrize("shape,in_axes", [((64, 4, 8), (0,)), ((4, 8, 64), (0, 1)),
                                           ((4, 64, 8), (1,))])
def test_nd_kernels_fold_and_count_their_matrix(shape, in_axes):
    w = jax.random.normal(jax.random.key(0), shape)
    fold = forms.Fold(shape, in_axes)
    k = littlebit.BinaryLowRank.from_dense(w, rank=8, in_axes=in_axes, itq_iters=5)
    ref = littlebit.BinaryLowRank.from_dense(fold.fold(w), rank=8, itq_iters=5)
    assert k.fold == fold and k.shape == shape and k.matrix_shape == fold.matrix_shape
    np.testing.assert_array_equal(k.matrix(), ref.materialize())  # the folded matrix, factored
    np.testing.assert_array_equal(k.materialize(), fold.unfold(ref.materialize()))
    packed = littlebit.deploy({"k": k})["k"]
    assert packed.fold == fold and packed.materialize().shape == shape and packed.rank == 8
    acc = littlebit.accounting({"k": packed})
    (lay,) = acc.layers
    assert lay.shape == fold.matrix_shape and lay.kernel_shape == shape
    assert lay.formula == core.formula_bits(*fold.matrix_shape, 8) and lay.bits == packed.bits
    assert f"{shape}->{fold.matrix_shape}" in acc.table()


# --- the QAT objective -----------------------------------------------------------------------


def test_distill_loss_is_token_summed_kl_plus_weighted_hidden_mse():
    keys = jax.random.split(jax.random.key(0), 4)
    s, t = jax.random.normal(keys[0], (2, 3, 7)), jax.random.normal(keys[1], (2, 3, 7))
    hs, ht = [jax.random.normal(keys[2], (2, 3, 5))], [jax.random.normal(keys[3], (2, 3, 5))]
    pt, ps = jax.nn.softmax(t / 2.0), jax.nn.softmax(s / 2.0)
    kl = 4.0 * jnp.sum(pt * (jnp.log(pt) - jnp.log(ps))) / 2  # T^2, summed over tokens, / batch
    want = kl + 10.0 * jnp.mean((hs[0] - ht[0]) ** 2)
    got = littlebit.distill_loss(s, t, hs, ht, hidden_weight=10.0, temperature=2.0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    grads = jax.jit(jax.grad(littlebit.distill_loss, argnums=(0, 1, 2, 3)))(s, t, hs, ht)
    assert float(jnp.abs(grads[1]).max()) == 0.0 and float(jnp.abs(grads[3][0]).max()) == 0.0
    assert float(jnp.abs(grads[0]).max()) > 0.0 and float(jnp.abs(grads[2][0]).max()) > 0.0
    mask = jnp.array([[1.0, 1, 0], [1, 0, 0]])
    pt, ps = jax.nn.softmax(t), jax.nn.softmax(s)
    kl_tok = jnp.sum(pt * (jnp.log(pt) - jnp.log(ps)), axis=-1)
    mse_tok = jnp.mean((hs[0] - ht[0]) ** 2, axis=-1)
    want = jnp.sum(kl_tok * mask) / 2 + 10.0 * jnp.sum(mse_tok * mask) / 3
    np.testing.assert_allclose(littlebit.distill_loss(s, t, hs, ht, mask=mask), want, rtol=1e-5)
    with pytest.raises(ValueError, match="hidden states"):
        littlebit.distill_loss(s, t, hs, [], hidden_weight=1.0, temperature=1.0)


@pytest.mark.parametrize("shape", [(96, 160), (160, 96)])
def test_balanced_factors_give_the_best_rank_r_approximation(shape):
    w = _heavy_tailed(jax.random.key(4), shape, exponent=0.5)
    u, v = core.balanced_factors(w, 24)
    p, s, qt = np.linalg.svd(np.asarray(w, np.float64))
    best = (p[:, :24] * s[:24]) @ qt[:24]
    np.testing.assert_allclose(u @ v.T, best, atol=1e-5 * float(s[0]))
    np.testing.assert_allclose(jnp.linalg.norm(u, axis=0), jnp.linalg.norm(v, axis=0), rtol=1e-4)
