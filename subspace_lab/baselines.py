"""Text-classification baselines every subspace method is compared with (pydoc topics).

* :func:`text_baselines`: majority class and bag of words (TF-IDF + logistic regression)
  on :func:`subspace_jax.data.load_pydoc_topics`.
* :func:`finetune_text_classifier`: pretrained all-MiniLM-L6-v2 + a linear head, trained
  by a :class:`Method`: fully (``mode="full"``) or with rank-8 LoRA on every attention and
  MLP kernel, the encoder frozen and the head trained (``mode="lora"``). A method is a
  model conversion, an optimizer factory (any optax transform), the rules of what trains
  and an optional post-update hook, so every subspace method and optimizer plugs in
  without editing this module. Besides accuracy it measures the training step with
  :func:`subspace_jax.train.measure_step`: median time, compiled memory, residual bytes,
  FLOPs, trainable parameters and optimizer-state bytes.

``quick=True`` swaps in small defaults (short runs, subsets) that any field overrides.
The language-model baseline is in :mod:`subspace_lab.pretrain`.

References:
    Hu et al., "LoRA", arXiv 2106.09685. Reimers and Gurevych, arXiv 1908.10084.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from subspace_jax import data, lora, rules, train
from subspace_jax.models import bert

__all__ = ["FinetuneConfig", "Method", "METHODS", "Run", "text_baselines",
           "finetune_text_classifier", "train_text_classifier", "classifier_loss",
           "classifier_metrics", "adamw_for", "lora_method", "LORA_PATTERN", "subset", "encode",
           "build_classifier", "classifier_logits", "num_steps", "HEAD"]

LORA_PATTERN = r"bert/encoder/layers/\d+/(attn/(q|k|v|o)|mlp/(up|down))/kernel"
_QUICK_FINETUNE = dict(steps=40, batch_size=16, eval_limit=256, evals=2)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Settings of :func:`finetune_text_classifier`; :meth:`make` applies ``quick`` defaults.

    Attributes:
        mode: a :data:`METHODS` name (``"full"``: every parameter trains; ``"lora"``), or
            the name of the :class:`Method` given to :func:`train_text_classifier`.
        epochs: passes over the training set (ignored when ``steps`` is set).
        steps: training steps (None: ``epochs`` worth of full batches).
        batch_size: training rows per step.
        max_length: tokens per text ([CLS] and [SEP] included).
        lr: peak learning rate (None: the method's default, e.g. 2e-3 LoRA; 5e-5 full,
            2e-4 when ``quick``, whose 40 steps are too few for 5e-5).
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
        if not isinstance(self.mode, str) or not self.mode:
            raise ValueError(f"FinetuneConfig: mode={self.mode!r} must be a method name")
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
            >>> FinetuneConfig.make(steps=0)
            Traceback (most recent call last):
            ...
            ValueError: FinetuneConfig: steps=0 must be > 0
        """
        return cls(quick=quick, **{**(_QUICK_FINETUNE if quick else {}), **overrides})


def adamw_for(cfg: FinetuneConfig, lr: float, steps: int) -> optax.GradientTransformation:
    """The default optimizer of a fine-tuning run: :func:`subspace_jax.train.adamw` with the
    config's warm-up and weight decay.

    Examples:
        >>> tx = adamw_for(FinetuneConfig.make(quick=True), 1e-4, 40)
    """
    return train.adamw(lr, steps, warmup=int(cfg.warmup_fraction * steps),
                       weight_decay=cfg.weight_decay)


def _full(cfg: FinetuneConfig) -> train.Recipe:
    return train.Recipe(name=cfg.mode)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
    """A method on this task: the library's :class:`~subspace_jax.train.Recipe` for a run's
    settings, the task loss and the learning rates picked for it.

    Attributes:
        name: the label of the run (``FinetuneConfig.mode`` and the result's ``mode``).
        recipe: ``recipe(cfg) -> Recipe`` (default: full fine-tuning); e.g.
            ``lambda cfg: wasi.recipe(...)``. Its optimizer defaults to :func:`adamw_for`.
        loss: ``loss(model, batch, key) -> loss or (loss, aux)`` (default
            :func:`classifier_loss`).
        lr: default peak learning rate; ``quick_lr`` the default when ``quick`` (None:
            ``lr``).

    Examples:
        >>> import optax
        >>> from subspace_jax import train
        >>> sgd = Method(name="sgd", lr=0.1, recipe=lambda cfg: train.Recipe(
        ...     name="sgd", optimizer=lambda lr, steps: optax.sgd(lr)))
        >>> sgd.learning_rate(FinetuneConfig.make(mode="sgd"))
        0.1
    """

    name: str
    recipe: Callable[[FinetuneConfig], train.Recipe] = _full
    loss: Callable | None = None
    lr: float = 5e-5
    quick_lr: float | None = None

    def learning_rate(self, cfg: FinetuneConfig) -> float:
        """``cfg.lr``, else this method's default (``quick_lr`` when ``cfg.quick``)."""
        if cfg.lr is not None:
            return cfg.lr
        return self.quick_lr if cfg.quick and self.quick_lr is not None else self.lr

    def prepare(self, model: nnx.Module, cfg: FinetuneConfig, steps: int) -> train.Prepared:
        """The recipe applied to ``model`` with this task's loss, learning rate, AdamW
        (:func:`adamw_for`) and ``cfg.seed`` as the conversion key."""
        return self.recipe(cfg).prepare(
            model, self.loss or classifier_loss, lr=self.learning_rate(cfg), steps=steps,
            key=jax.random.key(cfg.seed), default_optimizer=functools.partial(adamw_for, cfg))


HEAD = rules.Rule(pattern=r"head/.*")


def lora_method(rank: int = 8, alpha: float = 16.0, pattern: str = LORA_PATTERN) -> Method:
    """The LoRA baseline: rank-``rank`` adapters on ``pattern``; adapters and head train.

    Examples:
        >>> cfg = FinetuneConfig.make(mode="lora")
        >>> [r.pattern for r in lora_method(rank=4).recipe(cfg).train][1]
        'head/.*'
    """
    rule = lora.LoRARule(pattern=pattern, rank=rank, alpha=alpha)
    return Method(name="lora", lr=2e-3, recipe=lambda cfg: lora.recipe(rule).with_train(HEAD))


#: The built-in methods by name (``FinetuneConfig.mode``); LoRA's rank and alpha come
#: from the config.
METHODS: dict[str, Callable[[FinetuneConfig], Method]] = {
    "full": lambda cfg: Method(name="full", lr=5e-5, quick_lr=2e-4),
    "lora": lambda cfg: lora_method(cfg.lora_rank, cfg.lora_alpha),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run:
    """A finished training run.

    Attributes:
        result: the JSON-ready summary (what the public functions return).
        graphdef: the model's graph.
        params: trained parameters.
        rest: non-parameter state.
        initial_params: host copy of the parameters before training (if kept).
        beside: the method state trained beside the parameters (NSN's objective: ``Recipe.objective``).
    """

    result: dict[str, Any]
    graphdef: Any
    params: Any
    rest: Any
    initial_params: Any = None
    beside: Any = None


def subset(split: data.TextSplit, limit: int | None, seed: int) -> tuple[list[str], np.ndarray]:
    """``(texts, labels)`` of a seeded subset of ``limit`` texts of ``split`` in their order
    (all of it when ``limit`` is None or not smaller)."""
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
    evals = {name: subset(getattr(topics, name), eval_limit, seed) for name in ("val", "test")}
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


def encode(texts: list[str], labels: np.ndarray, max_length: int) -> dict[str, np.ndarray]:
    """MiniLM token arrays of ``texts`` (``input_ids``, ``attention_mask``,
    ``token_type_ids``) with int32 ``labels``: one batch dict for :mod:`subspace_jax.train`."""
    tokens = data.tokenize_texts(texts, data.load_minilm_tokenizer(), max_length=max_length)
    return {**tokens.as_dict(), "labels": labels.astype(np.int32)}


def build_classifier(cfg: FinetuneConfig, num_classes: int) -> bert.BertClassifier:
    """Pretrained MiniLM (its first ``cfg.num_layers`` layers) with a fresh
    ``num_classes`` head, seeded by ``cfg.seed``."""
    encoder, _ = bert.from_pretrained()
    if cfg.num_layers is not None:
        encoder.encoder.layers = nnx.List(list(encoder.encoder.layers)[:cfg.num_layers])
    return bert.BertClassifier(encoder, num_classes, rngs=nnx.Rngs(cfg.seed))


def classifier_logits(model: Any, batch: dict[str, jax.Array], **kwargs) -> jax.Array:
    """The classifier's logits on a batch dict (``kwargs``: e.g. ``deterministic=True``)."""
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
    logits = classifier_logits(model, batch, deterministic=False, rngs=nnx.Rngs(dropout=key))
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
    logits, weights = classifier_logits(model, batch, deterministic=True), batch["weight"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    hits = (jnp.argmax(logits, axis=-1) == batch["labels"]).astype(jnp.float32)
    return {"loss": (losses * weights).sum(), "correct": (hits * weights).sum(),
            "count": weights.sum()}


def _resolve(cfg: FinetuneConfig, method: Method | None) -> Method:
    if method is not None:
        if method.name != cfg.mode:
            raise ValueError(f"train_text_classifier: cfg.mode={cfg.mode!r} but the method is "
                             f"{method.name!r}; set mode to the method's name")
        return method
    if cfg.mode not in METHODS:
        raise ValueError(f"train_text_classifier: mode={cfg.mode!r} is not a built-in method "
                         f"{sorted(METHODS)}; pass method=Method(name={cfg.mode!r}, ...)")
    return METHODS[cfg.mode](cfg)


def num_steps(cfg: FinetuneConfig, num_train: int | None = None) -> int:
    """Training steps of a run: ``cfg.steps``, else ``cfg.epochs`` passes over the training
    texts (``num_train``; None: counted from the task and ``cfg.train_limit``).

    Examples:
        >>> num_steps(FinetuneConfig.make(steps=7))
        7
        >>> num_steps(FinetuneConfig.make(steps=None, epochs=2, batch_size=16), 100)
        12
    """
    if cfg.steps:
        return cfg.steps
    if num_train is None:
        num_train = len(data.load_pydoc_topics().train)
        num_train = min(num_train, cfg.train_limit or num_train)
    return cfg.epochs * (num_train // cfg.batch_size)


def train_text_classifier(cfg: FinetuneConfig, *, method: Method | None = None,
                          progress: bool = True, keep_initial: bool = False) -> Run:
    """:func:`finetune_text_classifier` returning the trained state as well (see :class:`Run`).

    Args:
        cfg: the run's settings.
        method: how to convert and train (None: ``METHODS[cfg.mode]``).
        progress: show tqdm bars.
        keep_initial: keep a host copy of the parameters before training.

    Examples:
        >>> run = train_text_classifier(FinetuneConfig.make(quick=True))  # doctest: +SKIP
        >>> run.result["test_accuracy"] > 0.3  # doctest: +SKIP
        True
    """
    start = time.perf_counter()
    method = _resolve(cfg, method)
    lr = method.learning_rate(cfg)
    topics = data.load_pydoc_topics()
    texts, labels = subset(topics.train, cfg.train_limit, cfg.seed)
    train_arrays = encode(texts, labels, cfg.max_length)
    evals = {name: encode(*subset(getattr(topics, name), cfg.eval_limit, cfg.seed),
                           cfg.max_length) for name in ("val", "test")}
    steps = num_steps(cfg, len(labels))
    ready = method.prepare(build_classifier(cfg, topics.num_classes), cfg, steps)
    graphdef, params, rest, model_part = ready.graphdef, ready.params, ready.rest, ready.model_params
    initial = jax.tree.map(np.array, model_part(params)) if keep_initial else None
    eval_step = train.make_eval_step(graphdef, classifier_metrics)

    def evaluate(p, r, split: str) -> dict[str, float]:
        sums = train.evaluate(eval_step, model_part(p), r, evals[split],
                              batch_size=cfg.eval_batch_size)
        return {f"{split}_loss": sums["loss"] / sums["count"],
                f"{split}_accuracy": sums["correct"] / sums["count"]}

    initial_val = evaluate(params, rest, "val")
    epochs = math.ceil(steps / (len(labels) // cfg.batch_size))
    batches = data.batches(train_arrays, cfg.batch_size, seed=cfg.seed, epochs=epochs)
    params, rest, history, measures = train.fit_measured(
        ready.step_graphdef, params, rest, ready.loss, ready.tx, batches, num_steps=steps,
        key=jax.random.key(cfg.seed), mask=ready.mask, post_update=ready.post_update,
        evals=cfg.evals, eval_fn=lambda p, r: evaluate(p, r, "val"), progress=progress,
        desc=f"MiniLM {method.name}")
    result = {"task": "pydoc_topics", "model": "all-MiniLM-L6-v2", "mode": method.name,
              "config": dataclasses.asdict(cfg), "lr": lr, "steps": steps,
              "num_train": len(labels), "num_val": len(evals["val"]["labels"]),
              "num_test": len(evals["test"]["labels"]),
              "epochs_seen": steps * cfg.batch_size / len(labels),
              "val_loss_initial": initial_val["val_loss"],
              "val_accuracy_initial": initial_val["val_accuracy"],
              **{k: v for k, v in history.evals[-1].items() if k != "step"},
              **evaluate(params, rest, "test"), **measures,
              "median_step_seconds": history.median_step_time(),
              "first_step_seconds": history.step_times[0], "history": history.as_dict(),
              "total_seconds": time.perf_counter() - start}
    beside = (None if ready.step_graphdef is not None
              else {k: v for k, v in params.items() if k != "model"})
    return Run(result=result, graphdef=graphdef, params=model_part(params), rest=rest,
               initial_params=initial, beside=beside)


def finetune_text_classifier(*, quick: bool = False, progress: bool = True,
                             method: Method | None = None, **settings: Any) -> dict[str, Any]:
    """Fine-tune pretrained all-MiniLM-L6-v2 on pydoc topics, fully or with LoRA.

    Mean pooling + dropout + a linear head (:class:`~subspace_jax.models.bert.BertClassifier`),
    AdamW with warm-up and cosine decay, dropout on. ``mode="lora"`` wraps every attention
    (q, k, v, o) and MLP (up, down) kernel in a rank-``lora_rank`` adapter; only the
    adapters and the head train (embeddings, norms and biases stay frozen).

    Args:
        quick: small defaults (:meth:`FinetuneConfig.make`).
        progress: show tqdm bars.
        method: a :class:`Method` (None: the built-in ``METHODS[mode]``).
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
    if method is not None:
        settings.setdefault("mode", method.name)
    cfg = FinetuneConfig.make(quick=quick, **settings)
    return train_text_classifier(cfg, method=method, progress=progress).result
