"""The methods composed on one small Llama, with no glue code (issue #11, part 1).

* WASI fine-tuning driven by the LoRA-Pre optimizer through the shared train step;
* NSN rank selection, then LittleBit-2 compression of the chosen-rank factors;
* LittleBit-2 QAT with LoRA-Pre's compressed optimizer state;
* every composed model (and optimizer state) saved and reloaded with ``checkpoint``.

Each pair runs under one ``jax.jit`` without recompiling (traces and compiled executables are
counted) and gives what the methods give alone where the maths says it must: LoRA-Pre's
first step is Adam's (its factors start at zero) and, at a rank no smaller than any matrix
side, ``lorapre`` routes every leaf to AdamW, so the composed runs equal the Adam runs;
NSN's truncated tree is the NSN model at that rank, and compressing it is LittleBit applied
to the explicitly truncated dense factors. The pairs that cannot compose directly fail at
transform time with the reason.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import subspace_jax as sj
from subspace_jax import checkpoint, littlebit, lorapre, nested, rules, train, wasi
from subspace_jax.littlebit import qat
from subspace_jax.models import llama
from compile_count import Compiles

STEPS = 3
# QAT moves signs, so its loss jumps from step to step: give it enough steps to show a trend
QAT_STEPS = 8
LR = 1e-2
ADAM = dict(b1=0.9, b2=0.95, eps=1e-8)  # lorapre's defaults
MLP = rules.Rule(pattern=nested.MLP_PATTERN)


def _model() -> llama.Llama:
    cfg = llama.LlamaConfig(vocab_size=64, dim=32, depth=1, heads=2, mlp_hidden=64, max_len=16)
    return llama.Llama(cfg, rngs=nnx.Rngs(0))


def _tokens(seed: int) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (4, 16), 0, 64)


_COMPILES: dict = {}  # jitted function -> Compiles of its calls made through _call


def _call(jitted, *args):
    """``jitted(*args)``, counting the XLA compiles the call makes."""
    with _COMPILES.setdefault(jitted, Compiles()):
        return jitted(*args)


def _compiles(jitted) -> int:
    """XLA compiles of the calls of ``jitted`` made through :func:`_call`: a recompile
    without a retrace (e.g. for arguments committed to a device) shows here, not in the
    trace count."""
    return _COMPILES[jitted].count


def _max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                               jax.tree.leaves(b)))


def _run(step, params, opt_state, rest, batches):
    """Steps over ``batches``; returns the final states, the losses and the params after step 1."""
    losses, first = [], None
    for i, batch in enumerate(batches):
        params, opt_state, rest, metrics = _call(step, params, opt_state, rest, batch,
                                                 jax.random.key(i))
        losses.append(float(metrics["loss"]))
        if first is None:
            first = jax.tree.map(jnp.copy, params)
    return params, opt_state, rest, losses, first


def _low_rank_factors(opt_state) -> dict[str, lorapre.Factors]:
    """LoRA-Pre's first-moment factors by parameter path (the low-rank branch only)."""
    return {path: m.first for path, m in lorapre.moments(opt_state).items()}


def _full_rank_is_adam(params, mask, **kwargs) -> float:
    """Largest gap between ``lorapre`` at a rank no smaller than any matrix side and Adam,
    over ``STEPS`` updates of the trainable part of a composed tree with the same gradients."""
    trainable, _ = train.partition(params, mask)
    txs = (lorapre.lorapre(LR, rank=64, **kwargs), optax.adam(LR, **ADAM))
    states = [train.init_optimizer(tx, params, mask) for tx in txs]
    gap = 0.0
    for i in range(STEPS):
        grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(i), x.shape), trainable)
        with jax.numpy_dtype_promotion(train.OPTIMIZER_PROMOTION):
            outs = [tx.update(grads, st, trainable) for tx, st in zip(txs, states)]
        states = [st for _, st in outs]
        gap = max(gap, _max_diff(outs[0][0], outs[1][0]))
    return gap


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x):
    """The output of ``nnx.merge(graphdef, state)`` on ``x`` (jitted: eager is slow)."""
    return nnx.merge(graphdef, state)(x)


def _reload(tmp_path, name, tree):
    return checkpoint.restore(checkpoint.save(tmp_path / name, tree), checkpoint.abstract(tree))


# --- WASI + LoRA-Pre --------------------------------------------------------------------

@pytest.fixture(scope="module")
def wasi_runs(counting):
    """One WASI model trained by LoRA-Pre (rank 4) and by Adam, on committed arrays (as
    restored checkpoints are, so that resuming reuses the compiled step)."""
    inputs = _tokens(1)
    rule = wasi.WasiRule(pattern=wasi.MLP_PATTERN, energy=0.9)
    model = wasi.convert(_model(), rule, sample=lambda m: m(inputs[:, :-1]), verbose=False)
    graphdef, params, rest = train.split_model(model)
    batches = [{"tokens": inputs}] * STEPS
    runs = {}
    for name, tx in (("lorapre", lorapre.lorapre(LR, rank=4)), ("adam", optax.adam(LR, **ADAM))):
        loss, traces = counting(lambda m, b, k: llama.lm_loss(m, b["tokens"]))
        step = train.make_train_step(graphdef, loss, tx, post_update=wasi.post_update)
        p, r = jax.tree.map(jnp.copy, (params, rest))  # the step donates them
        state = jax.device_put((p, train.init_optimizer(tx, p), r), jax.devices()[0])
        out = _run(step, *state, batches)
        runs[name] = dict(zip(("params", "opt", "rest", "losses", "first"), out),
                          traces=traces, step=step, tx=tx)
    return graphdef, params, runs


def test_wasi_trains_with_lorapre_in_one_compile(wasi_runs):
    graphdef, params, runs = wasi_runs
    run = runs["lorapre"]
    print("WASI + LoRA-Pre losses", [round(v, 4) for v in run["losses"]])
    assert len(run["traces"]) == 1 and _compiles(run["step"]) == 1  # STEPS steps, one compile
    assert np.mean(run["losses"][-3:]) < run["losses"][0]
    factors = _low_rank_factors(run["opt"])
    assert params["blocks"][0]["mlp"]["up"]["kernel"].get_value().rank < 32  # WASI factored it
    for name in "ab":                                       # LoRA-Pre keeps rank-4 moments of it
        assert factors[f"blocks/0/mlp/up/kernel/{name}"].B.shape[-1] == 4
    kernel = run["params"]["blocks"][0]["mlp"]["up"]["kernel"].get_value()
    assert isinstance(kernel, wasi.WasiKernel)               # still WASI's form ...
    np.testing.assert_allclose(kernel.b @ kernel.b.T, np.eye(kernel.rank), atol=1e-5)  # refreshed
    lorapre_bytes = sj.measure.tree_nbytes(run["opt"])
    adam_bytes = sj.measure.tree_nbytes(runs["adam"]["opt"])
    print(f"optimizer state: LoRA-Pre {lorapre_bytes} B, Adam {adam_bytes} B")
    assert lorapre_bytes < adam_bytes


def test_wasi_lorapre_equals_wasi_adam_where_the_maths_says(wasi_runs):
    _, _, runs = wasi_runs
    # step 1: LoRA-Pre's factors start at zero, so its update is Adam's g / (|g| + eps)
    assert _max_diff(runs["lorapre"]["first"], runs["adam"]["first"]) < 1e-5
    # later steps differ (low-rank moments), so the check above can fail
    assert _max_diff(runs["lorapre"]["params"], runs["adam"]["params"]) > 1e-3
    # at a rank no smaller than any matrix side every leaf is AdamW's: Adam's updates
    params = runs["lorapre"]["params"]
    assert _full_rank_is_adam(params, train.trainable_mask(params)) < 1e-6


def test_wasi_lorapre_checkpoint_reloads_and_resumes(wasi_runs, tmp_path):
    graphdef, _, runs = wasi_runs
    run = runs["lorapre"]
    graphdef, state = nnx.split(nnx.merge(graphdef, run["params"], run["rest"]))
    x = _tokens(2)[:, :-1]
    np.testing.assert_array_equal(_forward(graphdef, _reload(tmp_path, "model", state), x),
                                  _forward(graphdef, state, x))
    # the optimizer state (low-rank factors inside WASI's forms) round-trips and resumes on
    # the same executable (orbax restores committed arrays; the runs use committed arrays)
    step, device = run["step"], jax.devices()[0]
    restored = _reload(tmp_path, "opt", run["opt"])
    batch = {"tokens": _tokens(1)}
    copies = lambda *t: jax.device_put(jax.tree.map(jnp.copy, t), device)  # noqa: E731
    a = _call(step, *copies(run["params"], run["opt"], run["rest"]), batch, jax.random.key(9))
    b = _call(step, *copies(run["params"], restored, run["rest"]), batch, jax.random.key(9))
    # bit for bit on CPU; a GPU's scatter-adds (the embedding gradient) use atomics, whose
    # summation order changes from call to call
    tol = 0.0 if jax.default_backend() == "cpu" else 1e-5
    assert _max_diff(a[0], b[0]) <= tol and _max_diff(a[1], b[1]) <= tol
    assert len(run["traces"]) == 1 and _compiles(step) == 1


# --- NSN rank selection, then LittleBit-2 ----------------------------------------------

def _mlp_bits(bpw, **settings):
    """LittleBit-2 on the MLP kernels (the rule carries the settings)."""
    return littlebit.LittleBitRule(pattern=MLP.pattern, bpw=bpw, **{"itq_iters": 5, **settings})


@pytest.fixture(scope="module")
def nsn_littlebit():
    base = _model()
    model = nested.convert(base)                            # MLP Linears, R = min(in, out)
    rank = nested.rank_for_budget(model, 0.5)               # largest rank within 50% MLP FLOPs
    model = nested.set_rank(model, rank)                    # a new model at that width
    plain_graph, _, plain_rest = train.split_model(sj.adopt(base))
    _, params, _ = train.split_model(model)
    chosen = nested.truncate(params, rank)                  # pure: prefix factors, rank `rank`
    compressed = littlebit.transform(sj.materialize(chosen), _mlp_bits(3.0))
    return dict(model=model, rank=rank, params=params, chosen=chosen, compressed=compressed,
                plain_graph=plain_graph, plain_rest=plain_rest)


def test_nsn_truncated_tree_is_the_nsn_model_at_that_rank(nsn_littlebit):
    c = nsn_littlebit
    assert 1 <= c["rank"] < 32 and nested.rank_for_budget(c["params"], 0.5) == c["rank"]
    x = _tokens(3)
    plain = nnx.merge(c["plain_graph"], c["chosen"], c["plain_rest"])
    np.testing.assert_allclose(plain(x), c["model"](x), atol=1e-5)


def test_nsn_then_littlebit_is_littlebit_of_the_truncated_factors(nsn_littlebit):
    c = nsn_littlebit
    r = c["rank"]
    explicit = rules.map_with_path(
        lambda path, k: k.a[:, :r] @ k.b[:r] if isinstance(k, nested.Nested) else k, c["params"])
    direct = littlebit.transform(explicit, _mlp_bits(3.0))
    assert _max_diff(c["compressed"], direct) == 0.0
    kernels = [leaf.get_value() for _, leaf in rules.leaf_paths(c["compressed"])[0]
               if isinstance(leaf.get_value(), littlebit.BinaryLowRank)]
    assert len(kernels) == 3 and all(k.rank <= r for k in kernels)
    # a LittleBit rank above the NSN rank meets zero singular values: still finite
    wide = littlebit.transform(sj.materialize(c["chosen"]), _mlp_bits(4.0))
    wide = [leaf.get_value() for _, leaf in rules.leaf_paths(wide)[0]
            if isinstance(leaf.get_value(), littlebit.BinaryLowRank)]
    assert all(k.rank > r and bool(jnp.isfinite(k.materialize()).all()) for k in wide)


def test_nsn_littlebit_evaluates_in_one_compile_and_reloads_packed(nsn_littlebit, tmp_path,
                                                                   counting):
    c = nsn_littlebit
    forward, traces = counting(lambda p, x: nnx.merge(c["plain_graph"], p, c["plain_rest"])(x))
    forward = jax.jit(forward)
    packed = littlebit.deploy(c["compressed"])
    outs = [_call(forward, packed, _tokens(s)) for s in (4, 5, 6)]
    assert len(traces) == 1 and _compiles(forward) == 1
    np.testing.assert_allclose(outs[0], forward(c["compressed"], _tokens(4)), atol=2e-2)
    back = _reload(tmp_path, "packed", packed)
    np.testing.assert_array_equal(forward(back, _tokens(4)), outs[0])
    assert len(traces) == 2  # the packed and the training forms: one compile each


def test_littlebit_rejects_nested_forms_at_transform_time(nsn_littlebit):
    with pytest.raises(TypeError, match=r"mlp/.*kernel.*already a Nested; transform dense"):
        littlebit.transform(nsn_littlebit["chosen"], _mlp_bits(3.0))


# --- LittleBit-2 QAT with LoRA-Pre ------------------------------------------------------

def _matrix_dims(params):
    """LoRA-Pre dimension numbers: 2-D leaves as they are, LittleBit's ``(P, n, r)`` latent
    factors as ``P`` matrices ``(n, r)``."""
    def spec(x):
        return {2: lorapre.DimensionNumbers(), 3: lorapre.DimensionNumbers(1, 2)}.get(x.ndim)
    return jax.tree.map(spec, params)


@pytest.fixture(scope="module")
def qat_runs(counting):
    teacher = _model()
    student = littlebit.convert(teacher, littlebit.LittleBitRule(
        pattern="blocks/.*kernel", bpw=4.0, strict=False, itq_iters=5))
    tgraph, tstate = nnx.split(teacher)
    batches = [{"tokens": _tokens(7), "teacher": tstate}] * QAT_STEPS
    runs = {}
    dims = dict(weight_dimension_numbers=_matrix_dims)
    for name, tx in (("lorapre", lorapre.lorapre(LR, rank=4, **dims)),
                     ("adam", optax.adam(LR, **ADAM))):
        loss, traces = counting(qat.lm_loss_fn(tgraph))
        step, params, opt, rest, mask, graphdef = qat.setup(student, loss, tx)
        out = _run(step, params, opt, rest, batches)
        runs[name] = dict(zip(("params", "opt", "rest", "losses", "first"), out),
                          traces=traces, step=step, mask=mask, graphdef=graphdef)
    return student, runs


def test_littlebit_qat_with_lorapre_in_one_compile(qat_runs):
    student, runs = qat_runs
    run = runs["lorapre"]
    print("LittleBit QAT + LoRA-Pre losses", [round(v, 4) for v in run["losses"]])
    assert len(run["traces"]) == 1 and _compiles(run["step"]) == 1
    assert np.mean(run["losses"][-3:]) < run["losses"][0]
    factors = _low_rank_factors(run["opt"])
    u = factors["blocks/0/mlp/up/kernel/u"]                 # the latent factors' moments ...
    kernel = nnx.state(student)["blocks"][0]["mlp"]["up"]["kernel"].get_value()
    assert u.B.shape == (kernel.paths, 64, 4) and u.A.shape == (kernel.paths, 4, kernel.rank)
    assert "blocks/0/mlp/up/kernel/h" not in factors        # ... scales stay on AdamW
    lorapre_bytes = sj.measure.tree_nbytes(run["opt"])
    adam_bytes = sj.measure.tree_nbytes(runs["adam"]["opt"])
    print(f"optimizer state: LoRA-Pre {lorapre_bytes} B, Adam {adam_bytes} B")
    assert lorapre_bytes < adam_bytes
    assert qat.sign_flips(nnx.state(student), run["params"]) > 0   # QAT moved some signs


def test_littlebit_lorapre_equals_littlebit_adam_where_the_maths_says(qat_runs):
    _, runs = qat_runs
    assert _max_diff(runs["lorapre"]["first"], runs["adam"]["first"]) < 1e-5
    assert _max_diff(runs["lorapre"]["params"], runs["adam"]["params"]) > 1e-3
    run = runs["lorapre"]
    dims = dict(weight_dimension_numbers=_matrix_dims)
    assert _full_rank_is_adam(run["params"], run["mask"], **dims) < 1e-6


def test_littlebit_lorapre_checkpoint_reloads_trained_and_deployed(qat_runs, tmp_path):
    _, runs = qat_runs
    run = runs["lorapre"]
    graphdef, state = nnx.split(nnx.merge(run["graphdef"], run["params"], run["rest"]))
    x = _tokens(8)
    trained = _forward(graphdef, state, x)
    np.testing.assert_array_equal(_forward(graphdef, _reload(tmp_path, "qat", state), x), trained)
    packed = littlebit.deploy(state)
    deployed = _forward(graphdef, packed, x)
    np.testing.assert_array_equal(_forward(graphdef, _reload(tmp_path, "deployed", packed), x),
                                  deployed)
    np.testing.assert_allclose(deployed, trained, atol=5e-2)  # 16-bit scales


# --- pairs that do not compose directly --------------------------------------------------

def test_methods_refuse_each_others_forms_at_transform_time():
    model = littlebit.convert(_model(), _mlp_bits(4.0, strict=False, itq_iters=1))
    x = _tokens(1)
    with pytest.raises(TypeError, match=r"mlp/.*kernel.*WASI converts dense kernels, got a "
                                        r"BinaryLowRank form"):
        wasi.convert(model, sample=lambda m: m(x), verbose=False)
    with pytest.raises(TypeError, match=r"mlp/.*kernel.*already a BinaryLowRank; materialize it"):
        nested.convert(model)
