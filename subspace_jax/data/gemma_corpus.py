"""The standard-library LM corpus in a pretrained model's own tokenization (e.g. Gemma's).

:func:`load_tokenized_corpus` takes the documents of
:func:`subspace_jax.data.lm_corpus.load_lm_texts` (so the modules of each split are those
of :func:`~subspace_jax.data.lm_corpus.load_lm_corpus` with the same settings: val/test
modules are never seen in training), encodes each with the given ``tokenizers``
tokenizer without special tokens, and joins them into one stream per split with an
end-of-text id after each document, keeping the module of every token.

:func:`bos_windows` cuts a stream into non-overlapping ``T``-token windows and puts BOS in
front of each (Gemma needs BOS: without it the 270M model's loss rises by about 2 nats),
so every stream token is a target exactly once; the first token of a window is
predicted from BOS alone.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from subspace_jax.data import lm_corpus

__all__ = ["TokenizedCorpus", "load_tokenized_corpus", "bos_windows"]


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class TokenizedCorpus:
    """Token streams of :func:`load_tokenized_corpus`.

    Attributes:
        streams: split name -> int32 flat token ids (documents joined, EOS after each).
        module_ids: split name -> int32 index into ``modules[split]`` of every token.
        modules: split name -> the modules it holds, in order.
        num_bytes: split name -> UTF-8 bytes of its text.
        eos_id: the id appended after each document.
        content: ``"source"`` or ``"docstrings"``.
    """

    streams: dict[str, np.ndarray]
    module_ids: dict[str, np.ndarray]
    modules: dict[str, tuple[str, ...]]
    num_bytes: dict[str, int]
    eos_id: int
    content: str

    def describe(self) -> str:
        """A table of modules, bytes, tokens and bytes per token for each split."""
        lines = [f"{'split':<6} {'modules':>8} {'bytes':>11} {'tokens':>10} {'bytes/tok':>9}"]
        for name, ids in self.streams.items():
            ratio = self.num_bytes[name] / max(len(ids), 1)
            lines.append(f"{name:<6} {len(self.modules[name]):>8} {self.num_bytes[name]:>11,} "
                         f"{len(ids):>10,} {ratio:>9.2f}")
        return "\n".join(lines)


def load_tokenized_corpus(tokenizer, *, eos_id: int, content: str = "source",
                          max_bytes: int | None = None, val_fraction: float = 0.05,
                          test_fraction: float = 0.05, seed: int = 0,
                          max_module_bytes: int | None = None) -> TokenizedCorpus:
    """Standard-library text split by module, tokenized by ``tokenizer``.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` (special tokens are not added).
        eos_id: id appended after each document (Gemma: 1).
        content: ``"source"`` or ``"docstrings"``.
        max_bytes: cap on the bytes over all splits (see ``load_lm_corpus``).
        val_fraction: share of modules for validation.
        test_fraction: share of modules for test.
        seed: seed of the module assignment and order.
        max_module_bytes: cap on the bytes of one module.

    Returns:
        The streams, with the module of every token.

    Examples:
        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> tok = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1}, unk_token="<unk>"))
        >>> tok.pre_tokenizer = pre_tokenizers.Whitespace()
        >>> corpus = load_tokenized_corpus(tok, eos_id=1, max_bytes=40_000)
        >>> ids, where = corpus.streams["val"], corpus.module_ids["val"]
        >>> ids.dtype, len(ids) == len(where), int((ids == 1).sum()) == len(corpus.modules["val"])
        (dtype('int32'), True, True)
    """
    texts = lm_corpus.load_lm_texts(content=content, max_bytes=max_bytes,
                                    val_fraction=val_fraction, test_fraction=test_fraction,
                                    seed=seed, max_module_bytes=max_module_bytes)
    streams, module_ids, modules, num_bytes = {}, {}, {}, {}
    for split, docs in texts.items():
        encodings = tokenizer.encode_batch([text for _, text in docs], add_special_tokens=False)
        ids = [np.append(np.asarray(e.ids, np.int32), np.int32(eos_id)) for e in encodings]
        streams[split] = np.concatenate(ids) if ids else np.zeros((0,), np.int32)
        module_ids[split] = np.concatenate(
            [np.full(len(a), i, np.int32) for i, a in enumerate(ids)]) if ids else streams[split]
        modules[split] = tuple(m for m, _ in docs)
        num_bytes[split] = sum(len(t.encode("utf-8")) for _, t in docs)
    return TokenizedCorpus(streams=streams, module_ids=module_ids, modules=modules,
                           num_bytes=num_bytes, eos_id=eos_id, content=content)


def bos_windows(stream: np.ndarray, seq_len: int, bos_id: int,
                max_windows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping ``seq_len``-token windows of ``stream``, each with BOS in front.

    Args:
        stream: 1-D token ids.
        seq_len: stream tokens per window (the targets); a short tail is dropped.
        bos_id: the id put in front.
        max_windows: keep at most this many (the first ones).

    Returns:
        ``(windows, index)``: int32 ``(N, seq_len + 1)`` rows ``[BOS, s[i*T], ...,
        s[i*T + T - 1]]`` (inputs ``[:, :-1]``, targets ``[:, 1:]``), and ``(N, seq_len)``
        positions in ``stream`` of the targets.

    Examples:
        >>> w, index = bos_windows(np.arange(10, 17), 3, bos_id=2)
        >>> w.tolist(), index[1].tolist()
        ([[2, 10, 11, 12], [2, 13, 14, 15]], [3, 4, 5])
    """
    stream = np.asarray(stream)
    if stream.ndim != 1 or seq_len < 1 or len(stream) < seq_len:
        raise ValueError(f"bos_windows: need a 1-D stream of at least seq_len={seq_len} tokens, "
                         f"got shape {stream.shape}")
    count = len(stream) // seq_len
    count = count if max_windows is None else min(count, max_windows)
    index = np.arange(count * seq_len).reshape(count, seq_len)
    bos = np.full((count, 1), bos_id, dtype=np.int32)
    return np.concatenate([bos, stream[index].astype(np.int32)], axis=1), index
