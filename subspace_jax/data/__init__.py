"""Offline, deterministic datasets built from what is on disk.

* :func:`load_digits`: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes),
  stratified train/val/test.
* :func:`load_pydoc_topics`: docstrings of the Python standard library labelled by the
  topic of their module (11 classes, about 5,500 texts), split by module.
* :func:`load_lm_corpus`: the standard library's source or docstrings as token streams
  (byte-level BPE trained here, or MiniLM's WordPiece), split by module, with
  :func:`lm_batches` and the :func:`unigram_perplexity` baseline.
* :func:`batches`: fixed-shape, seeded mini-batches of numpy arrays.

Nothing here needs the network; parsed and tokenised results are cached under
``~/.cache/subspace_jax`` (or ``$SUBSPACE_JAX_CACHE``).
"""

from subspace_jax.data.batching import batches, num_batches
from subspace_jax.data.digits import ImageSplit, ImageSplits, load_digits, stratified_split
from subspace_jax.data.lm_corpus import (
    LMCorpus,
    inputs_targets,
    lm_batches,
    lm_windows,
    load_lm_corpus,
    num_lm_batches,
    unigram_perplexity,
)
from subspace_jax.data.pydoc_topics import TOPICS, TextSplit, TextSplits, load_pydoc_topics
from subspace_jax.data.tokenization import (
    TokenizedTexts,
    load_minilm_tokenizer,
    load_tokenizer,
    tokenize_texts,
    train_byte_bpe,
)

__all__ = [
    "batches",
    "num_batches",
    "ImageSplit",
    "ImageSplits",
    "load_digits",
    "stratified_split",
    "LMCorpus",
    "load_lm_corpus",
    "lm_windows",
    "lm_batches",
    "num_lm_batches",
    "inputs_targets",
    "unigram_perplexity",
    "TOPICS",
    "TextSplit",
    "TextSplits",
    "load_pydoc_topics",
    "TokenizedTexts",
    "load_minilm_tokenizer",
    "load_tokenizer",
    "tokenize_texts",
    "train_byte_bpe",
]
