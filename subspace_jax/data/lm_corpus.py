"""Language-modelling corpus: the Python standard library's source and docstrings.

The documents are the standard library's ``.py`` files (test suites left out), about
12 MB with Python 3.11: either their whole text (``content="source"``: code, comments
and docstrings) or only their docstrings (``content="docstrings"``, parsed with
:mod:`ast`, never imported). Each module goes to train, val or test by
:func:`subspace_jax.data.batching.group_split` on the sizes of the source files and
``seed`` (about ``1 - val - test : val : test`` by bytes), so val/test modules are never
seen in training, and a module keeps its split whatever ``content`` and ``max_bytes``
are. ``max_bytes`` caps the text of each split at its share of the cap (modules taken in
a seeded, hash-defined order, each cut at a line end to at most 1/8 of its split's share
by default, the last one to what is left), so quick settings stay small yet hold several
modules per split.

Two tokenisations: a byte-level BPE trained here on the train split only
(``tokenizer="bpe"``, exact round trip) and MiniLM's uncased WordPiece
(``tokenizer="wordpiece"``). Documents are joined into one flat int32 stream per split,
each followed by an end-of-text id. Tokenisers and token arrays are cached on disk
(``.json`` / ``.npy``), keyed by the Python version, the settings and a hash of the text.

:func:`lm_batches` cuts a stream into ``(B, T + 1)`` windows (inputs ``w[:, :-1]``,
targets ``w[:, 1:]``); :func:`unigram_perplexity` is the baseline a trained LM must beat.
"""

from __future__ import annotations

import dataclasses
import io
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import Tokenizer

from subspace_jax.data import _stdlib, batching, tokenization

__all__ = ["LMCorpus", "load_lm_corpus", "load_lm_texts", "lm_windows", "lm_batches",
           "num_lm_batches", "inputs_targets", "unigram_perplexity"]

_SPLITS = ("train", "val", "test")
_CONTENTS = ("source", "docstrings")
_TOKENIZERS = ("bpe", "wordpiece")


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class LMCorpus:
    """Token streams of :func:`load_lm_corpus`.

    Attributes:
        train: int32 flat token ids of the training modules.
        val: int32 flat token ids of the validation modules.
        test: int32 flat token ids of the test modules.
        modules: Split name -> the modules it holds (in the order they were taken).
        num_bytes: Split name -> UTF-8 bytes of text it holds.
        vocab_size: Size of the tokenizer's vocabulary (every id is below it).
        eos_id: The id appended after each document.
        tokenizer_kind: ``"bpe"`` or ``"wordpiece"``.
        tokenizer_path: The ``tokenizer.json`` used.
        content: ``"source"`` or ``"docstrings"``.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    modules: dict[str, tuple[str, ...]]
    num_bytes: dict[str, int]
    vocab_size: int
    eos_id: int
    tokenizer_kind: str
    tokenizer_path: Path
    content: str

    def splits(self) -> dict[str, np.ndarray]:
        """``{"train": ..., "val": ..., "test": ...}``."""
        return {"train": self.train, "val": self.val, "test": self.test}

    def tokenizer(self) -> Tokenizer:
        """The tokenizer, without padding or truncation."""
        tok = tokenization.load_tokenizer(self.tokenizer_path)
        tok.no_padding()
        tok.no_truncation()
        return tok

    def describe(self) -> str:
        """A table of modules, bytes, tokens and bytes per token for each split."""
        lines = [f"{'split':<6} {'modules':>8} {'bytes':>11} {'tokens':>10} {'bytes/tok':>9}"]
        for name, ids in self.splits().items():
            ratio = self.num_bytes[name] / max(len(ids), 1)
            lines.append(f"{name:<6} {len(self.modules[name]):>8} {self.num_bytes[name]:>11,} "
                         f"{len(ids):>10,} {ratio:>9.2f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        head = (f"lm_corpus: {self.content} of the Python {sys.version_info.major}."
                f"{sys.version_info.minor} standard library, {self.tokenizer_kind} "
                f"tokenizer (vocab {self.vocab_size})")
        return head + "\n" + self.describe()


def _documents(content: str) -> list[tuple[str, Callable[[], str]]]:
    """``(module, text thunk)`` for every document, in file order."""
    if content == "source":
        return [(f.module, lambda f=f: _stdlib.read_source(f))
                for f in _stdlib.list_source_files()]
    by_module: dict[str, list[str]] = {}
    for doc in _stdlib.extract_docstrings():
        by_module.setdefault(doc.module, []).append(doc.text)
    return [(m, lambda texts=texts: "\n\n".join(texts) + "\n") for m, texts in by_module.items()]


def _cut(text: str, budget: int) -> str:
    """At most ``budget`` UTF-8 bytes of ``text``, ending at a line end if there is one."""
    head = text.encode("utf-8")[:budget].decode("utf-8", errors="ignore")
    end = head.rfind("\n")
    return head[: end + 1] if end >= 0 else head


def _select(content: str, seed: int, shares: tuple[float, ...], max_bytes: int | None,
            max_module_bytes: int | None) -> list[list[tuple[str, str]]]:
    """Per split, the ``(module, text)`` documents taken under the byte budgets."""
    docs = _documents(content)
    docs.sort(key=lambda d: _stdlib.digest(str(seed), "order", d[0]))
    # Assigned on whole source files, whatever the content and cap: a module keeps its split.
    split_of = batching.group_split({f.module: f.nbytes for f in _stdlib.list_source_files()},
                                    shares, seed=seed)
    chosen: list[list[tuple[str, str]]] = [[] for _ in _SPLITS]
    used = [0] * len(_SPLITS)
    for module, thunk in docs:
        s = split_of[module]
        budget = None if max_bytes is None else int(max_bytes * shares[s])
        if budget is not None and used[s] >= budget:
            continue
        text = thunk()
        cap = _module_cap(budget, max_module_bytes)
        if cap is not None and len(text.encode("utf-8")) > cap:
            text = _cut(text, cap)
        size = len(text.encode("utf-8"))
        if budget is not None and used[s] + size > budget:
            text = _cut(text, budget - used[s])
            size = budget  # the split is full now, even if the cut kept less
        if text:
            chosen[s].append((module, text))
        used[s] += size
    return chosen


def _module_cap(budget: int | None, max_module_bytes: int | None) -> int | None:
    """Bytes one module may add: ``max_module_bytes``, else 1/8 of a capped split."""
    if max_module_bytes is not None:
        return max_module_bytes
    return None if budget is None else max(budget // 8, 1)


def _bpe(train_texts: list[str], vocab_size: int, min_frequency: int) -> tuple[Tokenizer, Path]:
    key = _stdlib.digest(_stdlib.python_tag(), "bpe", str(vocab_size), str(min_frequency),
                         tokenizers.__version__, *train_texts)
    path = _stdlib.cache_dir() / "tokenizers" / f"bpe{vocab_size}-{key}.json"
    if not path.exists():
        tok = tokenization.train_byte_bpe(train_texts, vocab_size=vocab_size,
                                          min_frequency=min_frequency)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tok.save(str(tmp))
        os.replace(tmp, path)
    return tokenization.load_tokenizer(path), path


def _encode(tok: Tokenizer, texts: list[str], eos_id: int) -> np.ndarray:
    if not texts:
        return np.zeros((0,), dtype=np.int32)
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    parts = []
    for enc in encode(texts, add_special_tokens=False):
        parts.append(np.asarray(enc.ids, dtype=np.int32))
        parts.append(np.array([eos_id], dtype=np.int32))
    return np.concatenate(parts)


def _check_args(tokenizer: str, content: str, vocab_size: int, max_bytes: int | None,
                val_fraction: float, test_fraction: float) -> None:
    if tokenizer not in _TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {_TOKENIZERS}, got {tokenizer!r}")
    if content not in _CONTENTS:
        raise ValueError(f"content must be one of {_CONTENTS}, got {content!r}")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1 or None, got {max_bytes}")
    batching.check_split_fractions(val_fraction, test_fraction)
    if tokenizer == "bpe" and vocab_size < 258:
        raise ValueError(f"vocab_size={vocab_size} is too small for byte-level BPE: need >= 258 "
                         f"(256 bytes + the end-of-text token)")


def load_lm_corpus(*, tokenizer: str = "bpe", content: str = "source", vocab_size: int = 4096,
                   max_bytes: int | None = None, val_fraction: float = 0.05,
                   test_fraction: float = 0.05, seed: int = 0, min_frequency: int = 2,
                   max_module_bytes: int | None = None) -> LMCorpus:
    """Tokenised standard-library text, split by module into train/val/test streams.

    Cold, the whole corpus (``max_bytes=None``) takes tens of seconds to tokenise (and
    to train the BPE); the result is cached, and later calls load ``.npy`` files.

    Args:
        tokenizer: ``"bpe"`` (byte-level BPE trained on the train split) or
            ``"wordpiece"`` (MiniLM's uncased vocabulary, 30,522 tokens).
        content: ``"source"`` (whole files) or ``"docstrings"`` (docstrings only).
        vocab_size: BPE vocabulary size (ignored for WordPiece).
        max_bytes: Cap on the UTF-8 bytes of text over all splits, shared by the split
            fractions; ``None`` takes everything.
        val_fraction: Share of modules (and of ``max_bytes``) for validation.
        test_fraction: Share of modules (and of ``max_bytes``) for test.
        seed: Seed of the module-to-split assignment and of the module order.
        min_frequency: BPE: minimum count of a merged pair.
        max_module_bytes: Cap on the bytes taken from one module (its head, cut at a line
            end). By default none without ``max_bytes``, and 1/8 of the split's budget
            with it, so a capped split still holds several modules.

    Returns:
        The token streams with their modules, byte counts and tokenizer.

    Raises:
        ValueError: If an argument is out of range.

    Examples:
        >>> corpus = load_lm_corpus(max_bytes=60_000, vocab_size=512)
        >>> corpus.train.dtype, corpus.vocab_size, corpus.eos_id
        (dtype('int32'), 512, 0)
        >>> set(corpus.modules["train"]) & set(corpus.modules["val"])
        set()
    """
    _check_args(tokenizer, content, vocab_size, max_bytes, val_fraction, test_fraction)
    if max_module_bytes is not None and max_module_bytes < 1:
        raise ValueError(f"max_module_bytes must be >= 1 or None, got {max_module_bytes}")
    shares = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
    chosen = _select(content, seed, shares, max_bytes, max_module_bytes)
    texts = [[text for _, text in split] for split in chosen]
    if tokenizer == "bpe":
        tok, path = _bpe(texts[0], vocab_size, min_frequency)
        eos_id = tok.token_to_id(tokenization.EOS_TOKEN)
    else:
        path = tokenization.minilm_tokenizer_dir() / "tokenizer.json"
        tok = tokenization.load_tokenizer(path)
        tok.no_padding()
        tok.no_truncation()
        eos_id = tok.token_to_id("[SEP]")
    key = _stdlib.digest(_stdlib.python_tag(), tokenizers.__version__, path.read_bytes(),
                         *[t for split in texts for t in (*split, "\x00split\x00")])
    arrays = {}
    for name, split_texts in zip(_SPLITS, texts):
        file = _stdlib.cache_dir() / "lm" / f"{tokenizer}-{content}-{key}-{name}.npy"
        if file.exists():
            arrays[name] = np.load(file)
        else:
            arrays[name] = _encode(tok, split_texts, eos_id)
            buffer = io.BytesIO()
            np.save(buffer, arrays[name])
            _stdlib.atomic_write(file, buffer.getvalue())
    return LMCorpus(
        **arrays, vocab_size=tok.get_vocab_size(), eos_id=eos_id, tokenizer_kind=tokenizer,
        tokenizer_path=path, content=content,
        modules={n: tuple(m for m, _ in split) for n, split in zip(_SPLITS, chosen)},
        num_bytes={n: sum(len(t.encode("utf-8")) for t in split)
                   for n, split in zip(_SPLITS, texts)})


def load_lm_texts(*, content: str = "source", max_bytes: int | None = None,
                  val_fraction: float = 0.05, test_fraction: float = 0.05, seed: int = 0,
                  max_module_bytes: int | None = None) -> dict[str, list[tuple[str, str]]]:
    """The untokenised documents of :func:`load_lm_corpus`, split by module the same way.

    For a model that brings its own tokenizer (e.g. Gemma): the same settings give the
    same modules, in the same order, cut to the same bytes, as :func:`load_lm_corpus`.

    Args:
        content: ``"source"`` or ``"docstrings"``.
        max_bytes: cap on the UTF-8 bytes over all splits (see :func:`load_lm_corpus`).
        val_fraction: share of modules (and of ``max_bytes``) for validation.
        test_fraction: share of modules (and of ``max_bytes``) for test.
        seed: seed of the module-to-split assignment and of the module order.
        max_module_bytes: cap on the bytes of one module.

    Returns:
        ``{"train": [(module, text), ...], "val": [...], "test": [...]}``.

    Examples:
        >>> texts = load_lm_texts(max_bytes=60_000)
        >>> corpus = load_lm_corpus(max_bytes=60_000, vocab_size=512)
        >>> tuple(m for m, _ in texts["val"]) == corpus.modules["val"]
        True
    """
    _check_args("bpe", content, 4096, max_bytes, val_fraction, test_fraction)
    if max_module_bytes is not None and max_module_bytes < 1:
        raise ValueError(f"max_module_bytes must be >= 1 or None, got {max_module_bytes}")
    shares = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
    chosen = _select(content, seed, shares, max_bytes, max_module_bytes)
    return dict(zip(_SPLITS, chosen))


def lm_windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping ``(T + 1)``-token windows of a stream, as a read-only view.

    Window ``i`` is ``tokens[i * T : i * T + T + 1]``: consecutive windows share one token,
    so every token is a target exactly once. A short tail is dropped.

    Args:
        tokens: 1-D token stream.
        seq_len: ``T``, the number of input (and target) tokens per window.

    Returns:
        ``((len(tokens) - 1) // T, T + 1)`` array.

    Examples:
        >>> lm_windows(np.arange(8), 3).tolist()
        [[0, 1, 2, 3], [3, 4, 5, 6]]
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"need at least seq_len + 1 = {seq_len + 1} tokens, got {len(tokens)}")
    count = (len(tokens) - 1) // seq_len
    return np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)[::seq_len][:count]


def num_lm_batches(tokens: np.ndarray, *, batch_size: int, seq_len: int, epochs: int = 1) -> int:
    """How many ``(B, T + 1)`` batches :func:`lm_batches` yields.

    Examples:
        >>> num_lm_batches(np.arange(100, dtype=np.int32), batch_size=2, seq_len=9)
        5
    """
    return batching.num_batches(lm_windows(tokens, seq_len), batch_size, epochs=epochs)


def lm_batches(tokens: np.ndarray, *, batch_size: int, seq_len: int, seed: int,
               shuffle: bool = True, epochs: int = 1) -> Iterator[np.ndarray]:
    """Fixed-shape ``(batch_size, seq_len + 1)`` batches of :func:`lm_windows`.

    Each epoch visits every full window at most once, in a seeded order (or in stream
    order if not ``shuffle``); the last incomplete batch is dropped.

    Args:
        tokens: 1-D token stream, e.g. ``corpus.train``.
        batch_size: Windows per batch.
        seq_len: Tokens per input row ``T``.
        seed: Seed of the window order.
        shuffle: Shuffle the windows each epoch.
        epochs: Passes over the windows.

    Returns:
        An iterator of int32 ``(B, T + 1)`` arrays; see :func:`inputs_targets`.

    Examples:
        >>> [w.tolist() for w in lm_batches(np.arange(8), batch_size=1, seq_len=3, seed=0,
        ...                                shuffle=False)]
        [[[0, 1, 2, 3]], [[3, 4, 5, 6]]]
    """
    windows = lm_windows(tokens, seq_len)
    return batching.batches(windows, batch_size, seed=seed, shuffle=shuffle, epochs=epochs)


def inputs_targets(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split ``(B, T + 1)`` windows into inputs ``[:, :-1]`` and next-token targets ``[:, 1:]``.

    Examples:
        >>> x, y = inputs_targets(np.array([[1, 2, 3], [4, 5, 6]]))
        >>> x.tolist(), y.tolist()
        ([[1, 2], [4, 5]], [[2, 3], [5, 6]])
    """
    return windows[:, :-1], windows[:, 1:]


def unigram_perplexity(train_ids: np.ndarray, eval_ids: np.ndarray, vocab_size: int) -> float:
    """Perplexity on ``eval_ids`` of an add-one (Laplace) smoothed unigram model of ``train_ids``.

    ``p(v) = (count_train(v) + 1) / (len(train_ids) + vocab_size)``, and the result is
    ``exp(-mean(log p(eval_ids)))``: the baseline a language model must beat. A uniform
    model scores ``vocab_size``; this one scores more only if eval favours ids rare in train.

    Args:
        train_ids: 1-D ids the model is fitted on.
        eval_ids: 1-D ids it is evaluated on.
        vocab_size: Number of ids; every id must lie in ``[0, vocab_size)``.

    Returns:
        The perplexity, a float >= 1.

    Examples:
        >>> round(unigram_perplexity(np.array([0, 0, 1]), np.array([0, 1]), 2), 4)
        2.0412
    """
    train_ids, eval_ids = np.asarray(train_ids), np.asarray(eval_ids)
    for name, ids in (("train_ids", train_ids), ("eval_ids", eval_ids)):
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"{name} must be a non-empty 1-D array, got shape {ids.shape}")
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"{name} has ids outside [0, {vocab_size}): "
                             f"min {ids.min()}, max {ids.max()}")
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts) - np.log(counts.sum())
    return float(np.exp(-log_p[eval_ids].mean()))
