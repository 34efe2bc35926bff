"""Text-classification baselines every subspace method is compared with (pydoc topics).

* :func:`text_baselines`: majority class and bag of words (TF-IDF + logistic regression)
  on :func:`subspace_jax.data.load_pydoc_topics`.
* :func:`finetune_text_classifier`: pretrained all-MiniLM-L6-v2 + a linear head, trained
  fully (``mode="full"``) or with rank-8 LoRA on every attention and MLP kernel, the
  encoder frozen and the head trained (``mode="lora"``). Besides accuracy it measures the
  training step with :func:`subspace_jax.train.measure_step`: median time, compiled
  memory, residual bytes, FLOPs, trainable parameters and optimizer-state bytes.

``quick=True`` swaps in small defaults (short runs, subsets) that any field overrides.
The language-model baseline is in :mod:`subspace_jax.pretrain`.

References:
    Hu et al., "LoRA", arXiv 2106.09685. Reimers and Gurevych, arXiv 1908.10084.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from subspace_jax import data, lora, rules, train
from subspace_jax.models import bert

__all__ = ["FinetuneConfig", "Run", "text_baselines", "finetune_text_classifier",
           "train_text_classifier", "classifier_loss", "classifier_metrics", "LORA_PATTERN"]

LORA_PATTERN = r"bert/encoder/layers/\d+/(attn/(q|k|v|o)|mlp/(up|down))/kernel"
_QUICK_FINETUNE = dict(steps=40, batch_size=16, eval_limit=256, evals=2)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Settings of :func:`finetune_text_classifier`; :meth:`make` applies ``quick`` defaults.

    Attributes:
        mode: ``"full"`` (every parameter trains) or ``"lora"``.
        epochs: passes over the training set (ignored when ``steps`` is set).
        steps: training steps (None: ``epochs`` worth of full batches).
        batch_size: training rows per step.
        max_length: tokens per text ([CLS] and [SEP] included).
        lr: peak learning rate (None: 2e-3 LoRA; 5e-5 full, 2e-4 when ``quick``, whose 40
            steps are too few for 5e-5).
        warmup_fraction: share of the steps spent in linear warm-up.
        weight_decay: AdamW decoupled weight decay (matrices only).
        lora_rank: LoRA rank.
        lora_alpha: LoRA scale numerator (scale ``alpha / rank``).
        seed: seed of the head, adapters, batch order, dropout and subsets.
        train_limit: use a seeded subset of this many training texts (None: all).
        eval_limit: evaluate on seeded subsets of this many val/test texts (None: all).
        eval_batch_size: rows per evaluation call.
        evals: validation evaluations during training (the last one after the last step).
        num_layers: keep only the first ``num_layers`` encoder layers (None: all six);
            for smoke tests.
        quick: the small defaults were applied.
    """

    mode: str = "full"
    epochs: int = 2
    steps: int | None = None
    batch_size: int = 16
    max_length: int = 64
    lr: float | None = None
    warmup_fraction: float = 0.1
    weight_decay: float = 0.01
    lora_rank: int = 8
    lora_alpha: float = 16.0
    seed: int = 0
    train_limit: int | None = None
    eval_limit: int | None = None
    eval_batch_size: int = 64
    evals: int = 4
    num_layers: int | None = None
    quick: bool = False

    def __post_init__(self):
        if self.mode not in ("full", "lora"):
            raise ValueError(f"FinetuneConfig: mode={self.mode!r} must be 'full' or 'lora'")
        train.check_positive("FinetuneConfig", self, (
            "epochs", "steps", "batch_size", "max_length", "lr", "lora_rank", "lora_alpha",
            "train_limit", "eval_limit", "eval_batch_size", "evals", "num_layers"))
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"FinetuneConfig: warmup_fraction={self.warmup_fraction!r} must "
                             "lie in [0, 1)")

    @classmethod
    def make(cls, *, quick: bool = False, **overrides: Any) -> FinetuneConfig:
        """The config with ``quick`` defaults (40 steps of 16, 256 eval texts) under ``overrides``.

        Examples:
            >>> FinetuneConfig.make(quick=True, mode="lora").steps
            40
            >>> FinetuneConfig.make().learning_rate, FinetuneConfig.make(quick=True).learning_rate
            (5e-05, 0.0002)
            >>> FinetuneConfig.make(mode="adapter")
            Traceback (most recent call last):
            ...
            ValueError: FinetuneConfig: mode='adapter' must be 'full' or 'lora'
        """
        return cls(quick=quick, **{**(_QUICK_FINETUNE if quick else {}), **overrides})

    @property
    def learning_rate(self) -> float:
        """``lr``, or the default of the mode (and of ``quick``)."""
        if self.lr is not None:
            return self.lr
        if self.mode == "lora":
            return 2e-3
        return 2e-4 if self.quick else 5e-5


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run:
    """A finished training run.

    Attributes:
        result: the JSON-ready summary (what the public functions return).
        graphdef: the model's graph.
        params: trained parameters.
        rest: non-parameter state.
        initial_params: host copy of the parameters before training (if kept).
    """

    result: dict[str, Any]
    graphdef: Any
    params: Any
    rest: Any
    initial_params: Any = None


def _subset(split: data.TextSplit, limit: int | None, seed: int) -> tuple[list[str], np.ndarray]:
    index = np.arange(len(split))
    if limit is not None and limit < len(split):
        index = np.sort(np.random.default_rng(seed).permutation(len(split))[:limit])
    return [split.texts[i] for i in index], split.labels[index]


def text_baselines(*, quick: bool = False, seed: int = 0, eval_limit: int | None = None,
                   ) -> dict[str, Any]:
    """Majority-class and bag-of-words accuracy on the pydoc-topics val and test splits.

    The majority baseline predicts the most frequent training class. The bag of words is
    TF-IDF on word uni- and bigrams (sublinear tf, ``min_df=2``) with multinomial logistic
    regression, ``C`` chosen on validation (one ``C`` when ``quick``). Needs scikit-learn.

    Args:
        quick: skip the ``C`` search.
        seed: seed of the eval subsets (as in :class:`FinetuneConfig`).
        eval_limit: evaluate on seeded subsets of this many val/test texts (None: all).

    Returns:
        ``{"majority": {...}, "bag_of_words": {...}, "num_train", "num_val", "num_test",
        "label_names"}``; each baseline has ``val_accuracy`` and ``test_accuracy``.

    Examples:
        >>> out = text_baselines(quick=True)  # doctest: +SKIP
        >>> bow, majority = out["bag_of_words"], out["majority"]  # doctest: +SKIP
        >>> bow["test_accuracy"] > majority["test_accuracy"]  # doctest: +SKIP
        True
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    topics = data.load_pydoc_topics()
    evals = {name: _subset(getattr(topics, name), eval_limit, seed) for name in ("val", "test")}
    train_labels = topics.train.labels
    majority = int(np.argmax(np.bincount(train_labels, minlength=topics.num_classes)))
    out: dict[str, Any] = {
        "num_train": len(train_labels), "num_val": len(evals["val"][1]),
        "num_test": len(evals["test"][1]), "label_names": list(topics.label_names),
        "majority": {"class": topics.label_names[majority], **{
            f"{name}_accuracy": float(np.mean(y == majority)) for name, (_, y) in evals.items()}},
    }
    start = time.perf_counter()
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    x_train = vectorizer.fit_transform(topics.train.texts)
    x_eval = {name: vectorizer.transform(texts) for name, (texts, _) in evals.items()}
    grid = {}
    for c in ((10.0,) if quick else (1.0, 3.0, 10.0, 30.0, 100.0)):
        clf = LogisticRegression(C=c, max_iter=3000).fit(x_train, train_labels)
        grid[c] = (float(clf.score(x_eval["val"], evals["val"][1])), clf)
    best = max(grid, key=lambda c: grid[c][0])
    out["bag_of_words"] = {
        "C": best, "val_accuracy": grid[best][0],
        "test_accuracy": float(grid[best][1].score(x_eval["test"], evals["test"][1])),
        "val_accuracy_by_C": {str(c): acc for c, (acc, _) in grid.items()},
        "features": int(x_train.shape[1]), "seconds": time.perf_counter() - start,
    }
    return out


def _encode(texts: list[str], labels: np.ndarray, max_length: int) -> dict[str, np.ndarray]:
    tokens = data.tokenize_texts(texts, data.load_minilm_tokenizer(), max_length=max_length)
    return {**tokens.as_dict(), "labels": labels.astype(np.int32)}


def _classifier(cfg: FinetuneConfig, num_classes: int) -> bert.BertClassifier:
    encoder, _ = bert.from_pretrained()
    if cfg.num_layers is not None:
        encoder.encoder.layers = nnx.List(list(encoder.encoder.layers)[:cfg.num_layers])
    return bert.BertClassifier(encoder, num_classes, rngs=nnx.Rngs(cfg.seed))


def _logits(model: Any, batch: dict[str, jax.Array], **kwargs) -> jax.Array:
    return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], **kwargs)


def classifier_loss(model: Any, batch: dict[str, jax.Array], key: jax.Array) -> jax.Array:
    """Training loss of a :class:`~subspace_jax.models.bert.BertClassifier`, dropout on.

    ``batch`` holds ``input_ids``, ``attention_mask``, ``token_type_ids`` and ``labels``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> cfg = bert.BertConfig(vocab_size=20, hidden_size=8, num_layers=1, num_heads=2,
        ...                       intermediate_size=16, max_position_embeddings=8)
        >>> model = bert.BertClassifier(cfg, 3, rngs=nnx.Rngs(0))
        >>> ids = jnp.ones((2, 4), jnp.int32)
        >>> batch = {"input_ids": ids, "attention_mask": ids, "token_type_ids": 0 * ids,
        ...          "labels": jnp.array([0, 2])}
        >>> classifier_loss(model, batch, jax.random.key(0)).shape
        ()
    """
    logits = _logits(model, batch, deterministic=False, rngs=nnx.Rngs(dropout=key))
    return train.cross_entropy(logits, batch["labels"])


def classifier_metrics(model: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Sums ``loss``, ``correct`` and ``count`` weighted by ``batch["weight"]``, dropout off.

    Examples:
        >>> import jax.numpy as jnp
        >>> cfg = bert.BertConfig(vocab_size=20, hidden_size=8, num_layers=1, num_heads=2,
        ...                       intermediate_size=16, max_position_embeddings=8)
        >>> model = bert.BertClassifier(cfg, 3, rngs=nnx.Rngs(0))
        >>> ids = jnp.ones((2, 4), jnp.int32)
        >>> out = classifier_metrics(model, {"input_ids": ids, "attention_mask": ids,
        ...     "token_type_ids": 0 * ids, "labels": jnp.array([0, 2]), "weight": jnp.ones(2)})
        >>> float(out["count"])
        2.0
    """
    logits, weights = _logits(model, batch, deterministic=True), batch["weight"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    hits = (jnp.argmax(logits, axis=-1) == batch["labels"]).astype(jnp.float32)
    return {"loss": (losses * weights).sum(), "correct": (hits * weights).sum(),
            "count": weights.sum()}


def train_text_classifier(cfg: FinetuneConfig, *, progress: bool = True,
                          keep_initial: bool = False) -> Run:
    """:func:`finetune_text_classifier` returning the trained state as well (see :class:`Run`).

    Examples:
        >>> run = train_text_classifier(FinetuneConfig.make(quick=True))  # doctest: +SKIP
        >>> 0.0 <= run.result["test_accuracy"] <= 1.0  # doctest: +SKIP
        True
    """
    start = time.perf_counter()
    topics = data.load_pydoc_topics()
    texts, labels = _subset(topics.train, cfg.train_limit, cfg.seed)
    train_arrays = _encode(texts, labels, cfg.max_length)
    evals = {name: _encode(*_subset(getattr(topics, name), cfg.eval_limit, cfg.seed),
                           cfg.max_length) for name in ("val", "test")}
    steps = cfg.steps or cfg.epochs * (len(labels) // cfg.batch_size)
    graphdef, params, rest = train.split_model(_classifier(cfg, topics.num_classes))
    tx = train.adamw(cfg.learning_rate, steps, warmup=int(cfg.warmup_fraction * steps),
                     weight_decay=cfg.weight_decay)
    mask = None
    if cfg.mode == "lora":
        rule = lora.LoRARule(pattern=LORA_PATTERN, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
        params = lora.add_lora(params, rule, key=jax.random.key(cfg.seed))
        mask = lora.trainable_mask(params, also=rules.Rule(pattern=r"head/.*"))
        tx = lora.freeze(tx, mask)
    initial = jax.tree.map(np.array, params) if keep_initial else None
    eval_step = train.make_eval_step(graphdef, classifier_metrics)

    def evaluate(p, split: str) -> dict[str, float]:
        sums = train.evaluate(eval_step, p, rest, evals[split], batch_size=cfg.eval_batch_size)
        return {f"{split}_loss": sums["loss"] / sums["count"],
                f"{split}_accuracy": sums["correct"] / sums["count"]}

    epochs = math.ceil(steps / (len(labels) // cfg.batch_size))
    batches = data.batches(train_arrays, cfg.batch_size, seed=cfg.seed, epochs=epochs)
    params, history, measures = train.fit_measured(
        graphdef, params, rest, classifier_loss, tx, batches, num_steps=steps,
        key=jax.random.key(cfg.seed), mask=mask, evals=cfg.evals,
        eval_fn=lambda p: evaluate(p, "val"), progress=progress, desc=f"MiniLM {cfg.mode}")
    result = {"task": "pydoc_topics", "model": "all-MiniLM-L6-v2", "mode": cfg.mode,
              "config": dataclasses.asdict(cfg), "lr": cfg.learning_rate, "steps": steps,
              "num_train": len(labels), "num_val": len(evals["val"]["labels"]),
              "num_test": len(evals["test"]["labels"]),
              "epochs_seen": steps * cfg.batch_size / len(labels),
              **{k: v for k, v in history.evals[-1].items() if k != "step"},
              **evaluate(params, "test"), **measures,
              "median_step_seconds": history.median_step_time(),
              "first_step_seconds": history.step_times[0], "history": history.as_dict(),
              "total_seconds": time.perf_counter() - start}
    return Run(result=result, graphdef=graphdef, params=params, rest=rest,
               initial_params=initial)


def finetune_text_classifier(*, quick: bool = False, progress: bool = True,
                             **settings: Any) -> dict[str, Any]:
    """Fine-tune pretrained all-MiniLM-L6-v2 on pydoc topics, fully or with LoRA.

    Mean pooling + dropout + a linear head (:class:`~subspace_jax.models.bert.BertClassifier`),
    AdamW with warm-up and cosine decay, dropout on. ``mode="lora"`` wraps every attention
    (q, k, v, o) and MLP (up, down) kernel in a rank-``lora_rank`` adapter; only the
    adapters and the head train (embeddings, norms and biases stay frozen).

    Args:
        quick: small defaults (:meth:`FinetuneConfig.make`).
        progress: show tqdm bars.
        **settings: any :class:`FinetuneConfig` field (``mode``, ``epochs``, ``steps``,
            ``batch_size``, ``max_length``, ``lr``, ``lora_rank``, ``seed``, ...).

    Returns:
        JSON-ready dict: ``val_accuracy``, ``test_accuracy`` (and losses), step
        measurements (``median_step_seconds``, ``compiled_memory``, ``residual_bytes``,
        ``flops_matmul``, ``trainable_params``, ``optimizer_state_bytes``), the config and
        the training ``history``.

    Examples:
        >>> out = finetune_text_classifier(quick=True, mode="lora")  # doctest: +SKIP
        >>> out["trainable_params"] < out["model_params"] // 20  # doctest: +SKIP
        True
    """
    cfg = FinetuneConfig.make(quick=quick, **settings)
    return train_text_classifier(cfg, progress=progress).result
