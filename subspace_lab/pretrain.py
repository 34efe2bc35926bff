"""The language-model baseline: a small Llama decoder pretrained on the standard library.

:func:`pretrain_lm` trains a :class:`~subspace_jax.models.llama.Llama` preset from scratch
on the standard library's source (byte-level BPE, split by module,
:func:`subspace_jax.data.load_lm_corpus`) and reports its validation perplexity next to
the add-one unigram baseline on the same tokens. The trained parameters are saved with
:func:`subspace_jax.checkpoint.save`, next to ``config.json`` and ``tokenizer.json``, so
later methods can compress or retrain the model: :func:`load_lm` rebuilds it.

References:
    Touvron et al., "LLaMA", arXiv 2302.13971. Loshchilov and Hutter, "Decoupled Weight
    Decay Regularization", arXiv 1711.05101.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from subspace_jax import checkpoint, data, train
from subspace_lab.baselines import Run
from subspace_jax.models import llama

__all__ = ["LMConfig", "pretrain_lm", "train_lm", "lm_optimizer", "load_lm", "lm_metrics"]

_QUICK_LM = dict(steps=40, batch_size=8, seq_len=64, max_bytes=300_000, vocab_size=512,
                 eval_batches=8, evals=2)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMConfig:
    """Settings of :func:`pretrain_lm`; :meth:`make` applies ``quick`` defaults.

    Attributes:
        preset: :data:`subspace_jax.models.llama.PRESETS` name (``'1m'``, ``'5m'``, ...).
        steps: training steps.
        batch_size: windows per step.
        seq_len: tokens per window.
        lr: peak AdamW learning rate (warm-up, then cosine decay to ``lr / 10``).
        warmup_fraction: share of the steps spent in warm-up.
        weight_decay: AdamW decoupled weight decay (matrices only).
        vocab_size: byte-level BPE vocabulary size.
        max_bytes: cap on the corpus bytes (None: the whole standard library).
        eval_batches: validation batches per evaluation (the same windows each time).
        evals: validation evaluations during training.
        seed: seed of the initialisation and batch order.
        quick: the small defaults were applied.
    """

    preset: str = "1m"
    steps: int = 1200
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup_fraction: float = 0.05
    weight_decay: float = 0.1
    vocab_size: int = 4096
    max_bytes: int | None = None
    eval_batches: int = 40
    evals: int = 6
    seed: int = 0
    quick: bool = False

    def __post_init__(self):
        if self.preset not in llama.PRESETS:
            raise ValueError(f"LMConfig: preset={self.preset!r} not in {sorted(llama.PRESETS)}")
        train.check_positive("LMConfig", self, ("steps", "batch_size", "seq_len", "lr",
                                                "vocab_size", "max_bytes", "eval_batches", "evals"))
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"LMConfig: warmup_fraction={self.warmup_fraction!r} must lie in "
                             "[0, 1)")

    @classmethod
    def make(cls, *, quick: bool = False, **overrides: Any) -> LMConfig:
        """The config with ``quick`` defaults (40 steps on 300 kB, vocab 512) under ``overrides``.

        Examples:
            >>> LMConfig.make(quick=True).max_bytes, LMConfig.make(steps=10).steps
            (300000, 10)
        """
        return cls(quick=quick, **{**(_QUICK_LM if quick else {}), **overrides})


def lm_metrics(model: llama.Llama, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Summed next-token NLL and token count of a batch, padding rows (``weight`` 0) left out.

    The metrics of :func:`subspace_jax.train.make_eval_step` for a decoder: the mean loss
    is ``loss / count`` of :func:`subspace_jax.train.evaluate`'s sums.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from subspace_jax.models import llama
        >>> model = llama.Llama(llama.LlamaConfig(vocab_size=8, dim=16, depth=1, heads=2),
        ...                     rngs=nnx.Rngs(0))
        >>> out = lm_metrics(model, {"tokens": jnp.ones((3, 5), jnp.int32),
        ...                          "weight": jnp.array([1.0, 1.0, 0.0])})
        >>> float(out["count"])  # two real rows of four predicted tokens
        8.0
    """
    tokens, weight = batch["tokens"], batch["weight"]
    nll = optax.softmax_cross_entropy_with_integer_labels(model(tokens[:, :-1]), tokens[:, 1:])
    return {"loss": (nll * weight[:, None]).sum(), "count": weight.sum() * nll.shape[1]}


def _save_lm(directory: Path, params: Any, config: llama.LlamaConfig, corpus: data.LMCorpus,
             ) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint.save(directory / "params", params, overwrite=True)
    fields = {k: (jnp.dtype(v).name if k in ("dtype", "param_dtype") else v)
              for k, v in dataclasses.asdict(config).items()}
    shutil.copyfile(corpus.tokenizer_path, directory / "tokenizer.json")
    meta = {"model": "llama", "config": fields, "tokenizer": "tokenizer.json",
            "corpus": {"content": corpus.content, "tokenizer_kind": corpus.tokenizer_kind}}
    (directory / "config.json").write_text(json.dumps(meta, indent=2))
    return directory


def load_lm(directory: str | Path) -> tuple[llama.Llama, llama.LlamaConfig]:
    """Rebuild the decoder saved by :func:`pretrain_lm` (``checkpoint_dir``).

    Returns:
        ``(model, config)``; ``directory/tokenizer.json`` is its tokenizer.

    Examples:
        >>> model, cfg = load_lm("results/checkpoints/lm_pretrain")  # doctest: +SKIP
        >>> cfg.dim  # doctest: +SKIP
        128
    """
    directory = Path(directory)
    meta = json.loads((directory / "config.json").read_text())
    fields = meta["config"]
    dtypes = {k: jnp.dtype(fields[k]) for k in ("dtype", "param_dtype")}
    config = llama.LlamaConfig(**{**fields, **dtypes})
    abstract = nnx.eval_shape(lambda: llama.Llama(config, rngs=nnx.Rngs(0)))
    graphdef, params, rest = train.split_model(abstract)
    params = checkpoint.restore(directory / "params", params)
    return nnx.merge(graphdef, params, rest), config


def lm_optimizer(cfg: LMConfig) -> optax.GradientTransformation:
    """The baseline optimizer of :func:`train_lm`: AdamW (b2 0.95), warm-up + cosine decay.

    Examples:
        >>> tx = lm_optimizer(LMConfig.make(quick=True))
    """
    return train.adamw(cfg.lr, cfg.steps, warmup=int(cfg.warmup_fraction * cfg.steps),
                       weight_decay=cfg.weight_decay, b2=0.95)


def train_lm(cfg: LMConfig, *, tx: optax.GradientTransformation | None = None,
             progress: bool = True, checkpoint_dir: str | Path | None = None) -> Run:
    """:func:`pretrain_lm` returning the trained state as well (see :class:`Run`).

    Args:
        cfg: the run's settings.
        tx: any optax transform (an optimizer under test); None: :func:`lm_optimizer`.
        progress: show a tqdm bar.
        checkpoint_dir: as in :func:`pretrain_lm`.

    Examples:
        >>> run = train_lm(LMConfig.make(quick=True), progress=False)  # doctest: +SKIP
        >>> run.result["val_perplexity"] < run.result["unigram_perplexity"]  # doctest: +SKIP
        True
    """
    start = time.perf_counter()
    corpus = data.load_lm_corpus(vocab_size=cfg.vocab_size, max_bytes=cfg.max_bytes,
                                 seed=cfg.seed)
    config = llama.LlamaConfig.preset(cfg.preset, vocab_size=corpus.vocab_size,
                                      max_len=cfg.seq_len)
    graphdef, params, rest = train.split_model(llama.Llama(config, rngs=nnx.Rngs(cfg.seed)))
    tx = lm_optimizer(cfg) if tx is None else tx
    windows = data.lm_windows(corpus.val, cfg.seq_len)[:cfg.eval_batches * cfg.batch_size]
    eval_step = train.make_eval_step(graphdef, lm_metrics)

    def evaluate(p, r) -> dict[str, float]:
        sums = train.evaluate(eval_step, p, r, {"tokens": windows}, batch_size=cfg.batch_size)
        return {"val_loss": sums["loss"] / sums["count"]}

    per_epoch = data.num_lm_batches(corpus.train, batch_size=cfg.batch_size, seq_len=cfg.seq_len)
    batches = data.lm_batches(corpus.train, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                              seed=cfg.seed, epochs=math.ceil(cfg.steps / per_epoch))
    params, rest, history, measures = train.fit_measured(
        graphdef, params, rest, lambda model, batch, key: llama.lm_loss(model, batch), tx,
        batches, num_steps=cfg.steps, key=jax.random.key(cfg.seed), evals=cfg.evals,
        eval_fn=evaluate, progress=progress, desc=f"Llama {cfg.preset}")
    val_loss = history.evals[-1]["val_loss"]
    result = {"task": "stdlib_source_lm", "config": dataclasses.asdict(cfg),
              "model_config": {k: v for k, v in dataclasses.asdict(config).items()
                               if k not in ("dtype", "param_dtype")},
              "tokens": {k: int(len(v)) for k, v in corpus.splits().items()},
              "eval_tokens": int(windows.shape[0] * cfg.seq_len),
              "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
              "val_loss": val_loss, "val_perplexity": math.exp(val_loss),
              "unigram_perplexity": data.unigram_perplexity(
                  corpus.train, windows[:, 1:].ravel(), corpus.vocab_size),
              "unigram_perplexity_full_val": data.unigram_perplexity(
                  corpus.train, corpus.val, corpus.vocab_size),
              **measures, "median_step_seconds": history.median_step_time(),
              "first_step_seconds": history.step_times[0], "history": history.as_dict()}
    if checkpoint_dir is not None:
        result["checkpoint"] = str(_save_lm(Path(checkpoint_dir), params, config, corpus))
    result["total_seconds"] = time.perf_counter() - start
    return Run(result=result, graphdef=graphdef, params=params, rest=rest)


def pretrain_lm(*, quick: bool = False, progress: bool = True,
                checkpoint_dir: str | Path | None = None, **settings: Any) -> dict[str, Any]:
    """Train a small Llama decoder on the standard library's source; perplexity vs unigram.

    Byte-level BPE corpus (:func:`subspace_jax.data.load_lm_corpus`, split by module),
    AdamW (b2 0.95, warm-up + cosine), no dropout. Validation perplexity is measured on the
    first ``eval_batches * batch_size`` validation windows, and the add-one unigram
    perplexity (:func:`subspace_jax.data.unigram_perplexity`) on the same target tokens.

    Args:
        quick: small defaults (:meth:`LMConfig.make`).
        progress: show a tqdm bar.
        checkpoint_dir: if given, save ``params`` (orbax), ``config.json`` and
            ``tokenizer.json`` there; :func:`load_lm` reads them back.
        **settings: any :class:`LMConfig` field (``preset``, ``steps``, ``batch_size``,
            ``seq_len``, ``lr``, ``seed``, ...).

    Returns:
        JSON-ready dict with ``val_perplexity``, ``unigram_perplexity``, step measurements
        and the training ``history``.

    Examples:
        >>> out = pretrain_lm(quick=True, progress=False)  # doctest: +SKIP
        >>> out["val_perplexity"] < out["unigram_perplexity"]  # doctest: +SKIP
        True
    """
    cfg = LMConfig.make(quick=quick, **settings)
    return train_lm(cfg, progress=progress, checkpoint_dir=checkpoint_dir).result
