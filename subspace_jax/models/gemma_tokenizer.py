"""Gemma's SentencePiece-style BPE tokenizer, rebuilt offline from a GGUF vocabulary.

A Gemma GGUF file stores the pieces (``tokenizer.ggml.tokens``), their scores and their
types (1 normal, 3 control, 4 user-defined, 6 byte), but no merges and no
``tokenizer.json``. :func:`build_tokenizer` turns them into a ``tokenizers.Tokenizer``
that behaves like the original SentencePiece model:

* no pre-tokenization and no dummy prefix; spaces become ``▁`` (U+2581);
* BPE with byte fallback (``<0x00>``..``<0xFF>`` for characters outside the vocabulary).
  The merges are recovered from the vocabulary: every split of a piece into two pieces
  is a merge, ranked by the piece's position in the file (best first). Gemma's scores
  follow that order for normal pieces; control, byte and user-defined pieces all carry
  score -1000 or 0, so their position is the tie-break that works. This is what
  ``transformers``' GGUF loader does, and ``tests/test_gemma.py`` compares the ids;
* user-defined pieces (runs of newlines, tabs and spaces, HTML tags) are matched whole,
  longest first, before BPE, as SentencePiece does. **Pitfall:** llama.cpp stored the
  runs of 2-31 spaces with plain spaces instead of ``▁``; they are spelled back here, and
  matched on the normalised text. Without this Python source tokenizes at 2.4 instead
  of 3.9 characters per token and its perplexity triples. (transformers 5 respells them
  too but then lets BPE build the runs, which differs only on runs longer than 31.)
* control pieces (``<pad>``, ``<eos>``, ``<bos>``, ``<start_of_turn>``, ...) are special
  tokens; :func:`build_tokenizer` prepends BOS to every encoding: Gemma needs it (without
  BOS the 270M model's loss on the same text rises from about 3.35 to 5.5 nats).

References:
    Kudo and Richardson, "SentencePiece", arXiv 1808.06226.
    Sennrich et al., "Neural Machine Translation of Rare Words with Subword Units",
    arXiv 1508.07909.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

__all__ = ["build_tokenizer", "respell", "vocab_merges", "NORMAL", "CONTROL", "USER_DEFINED",
           "BYTE"]

NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6
_SPACE = "\u2581"


def respell(token: str) -> str:
    """A token made only of plain spaces as SentencePiece spells it (with ``▁``).

    Examples:
        >>> respell("   "), respell("a b")
        ('▁▁▁', 'a b')
    """
    return _SPACE * len(token) if token and not token.strip(" ") else token


def vocab_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary ranked by id: every split of a piece into two pieces.

    Merges are ordered by the merged piece's id (lowest first), then by longer left part,
    as ``transformers.tokenization_utils_base.generate_merges`` orders them with scores
    ``-id``.

    Args:
        vocab: piece -> id.

    Returns:
        ``(left, right)`` pairs, best first.

    Examples:
        >>> vocab_merges({"a": 0, "b": 1, "ab": 2, "abb": 3})
        [('a', 'b'), ('ab', 'b')]
    """
    ranked = [(index, -i, piece[:i], piece[i:]) for piece, index in vocab.items()
              for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
    ranked.sort(key=lambda r: r[:2])  # one split per (piece, left length): no ties
    return [(left, right) for _, _, left, right in ranked]


def build_tokenizer(tokens: Sequence[str], token_types: Sequence[int], *, bos_id: int = 2,
                    unk_id: int = 3, add_bos: bool = True) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` equivalent to Gemma's SentencePiece model (module doc).

    Args:
        tokens: the pieces in id order (``tokenizer.ggml.tokens``), spelled as in the file.
        token_types: their SentencePiece types (``tokenizer.ggml.token_type``).
        bos_id: id of the beginning-of-sequence token.
        unk_id: id of the unknown token.
        add_bos: prepend BOS to every encoding (single texts and both parts of pairs).

    Returns:
        The tokenizer; ``encode(text).ids`` starts with ``bos_id`` when ``add_bos``, and
        ``decode(ids)`` drops special tokens by default.

    Raises:
        ValueError: lengths differ, a piece appears twice after respelling, or an id is
            out of range.

    Examples:
        >>> tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "\\n", "  ", "a", "b", "ab",
        ...           "\u2581", "\u2581ab"]
        >>> tok = build_tokenizer(tokens, [3, 3, 3, 3, 4, 4, 1, 1, 1, 1, 1])
        >>> enc = tok.encode("ab ab  ab\\nb")
        >>> enc.tokens
        ['<bos>', 'ab', '▁ab', '▁▁', 'ab', '\\n', 'b']
        >>> tok.decode(enc.ids)
        'ab ab  ab\\nb'
    """
    if len(tokens) != len(token_types):
        raise ValueError(f"build_tokenizer: {len(tokens)} tokens but {len(token_types)} types")
    for name, index in (("bos_id", bos_id), ("unk_id", unk_id)):
        if not 0 <= index < len(tokens):
            raise ValueError(f"build_tokenizer: {name}={index} outside [0, {len(tokens)})")
    spelled = [respell(t) if ty == USER_DEFINED else t for t, ty in zip(tokens, token_types)]
    vocab: dict[str, int] = {}
    for index, piece in enumerate(spelled):
        if piece in vocab:
            raise ValueError(f"build_tokenizer: piece {piece!r} appears at ids {vocab[piece]} "
                             f"and {index}")
        vocab[piece] = index
    tok = Tokenizer(BPE(vocab=vocab, merges=vocab_merges(vocab), unk_token=spelled[unk_id],
                        fuse_unk=True, byte_fallback=True, dropout=None))
    tok.normalizer = normalizers.Replace(" ", _SPACE)
    tok.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(spelled, token_types) if ty == CONTROL])
    # Spaces were normalised to ``▁`` before these are matched, so the runs of ``▁``
    # match normalised text; the others (newlines, tabs, HTML tags) match the raw text.
    tok.add_tokens([AddedToken(t, special=False, normalized=t.startswith(_SPACE))
                    for t, ty in zip(spelled, token_types) if ty == USER_DEFINED])
    if add_bos:
        bos = spelled[bos_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, bos_id)])
    return tok
