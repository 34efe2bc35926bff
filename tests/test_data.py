"""Tests of the offline datasets: digits, pydoc topics, the LM corpus and batching."""

import math
import sys

import numpy as np
import pytest

from subspace_jax.data import (
    batches,
    inputs_targets,
    lm_batches,
    lm_windows,
    load_digits,
    load_lm_corpus,
    load_minilm_tokenizer,
    load_pydoc_topics,
    num_batches,
    stratified_split,
    num_lm_batches,
    tokenize_texts,
    train_byte_bpe,
    unigram_perplexity,
)
from subspace_jax.data import pydoc_topics

# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    return load_digits()


def test_digits_shapes_dtypes_and_range(digits):
    for split in digits.splits().values():
        assert split.x.shape == (len(split), 8, 8, 1)
        assert split.x.dtype == np.float32 and split.y.dtype == np.int32
        assert split.x.min() >= 0.0 and split.x.max() <= 1.0
    assert digits.train.x.max() == 1.0  # 16 / 16: the scale is used in full
    assert digits.num_classes == 10
    print(digits)


def test_digits_splits_are_disjoint_and_cover_everything(digits):
    index = np.concatenate([s.index for s in digits.splits().values()])
    assert len(index) == 1797
    np.testing.assert_array_equal(np.sort(index), np.arange(1797))


def test_digits_split_is_stratified(digits):
    from sklearn.datasets import load_digits as sk_load

    per_class = np.bincount(sk_load().target)
    for split, share in ((digits.val, 0.15), (digits.test, 0.15), (digits.train, 0.70)):
        counts = np.bincount(split.y, minlength=10)
        assert np.all(np.abs(counts - per_class * share) <= 1.5), counts


def test_digits_split_sizes(digits):
    assert [len(s) for s in digits.splits().values()] == [1259, 269, 269]
    for split in digits.splits().values():
        assert split.index.dtype == np.int64 and np.all(np.diff(split.index) > 0)


def test_digits_are_deterministic_and_seeded(digits):
    again = load_digits()
    np.testing.assert_array_equal(again.train.x, digits.train.x)
    np.testing.assert_array_equal(again.test.y, digits.test.y)
    other = load_digits(seed=1)
    assert not np.array_equal(other.test.index, digits.test.index)
    assert [len(s) for s in other.splits().values()] == [1259, 269, 269]


def test_digits_split_is_the_same_in_another_process(digits):
    import os
    import subprocess

    code = ("from subspace_jax.data import load_digits; d = load_digits(); "
            "print(*(','.join(map(str, s.index)) for s in d.splits().values()), sep='|')")
    env = {**os.environ, "PYTHONHASHSEED": "123", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                         capture_output=True, text=True).stdout.strip()
    here = "|".join(",".join(map(str, s.index)) for s in digits.splits().values())
    assert out == here


def test_stratified_split_sizes_empty_parts_and_errors():
    labels = np.repeat(np.arange(4), 25)  # 100 examples, 4 classes
    a, b, c = stratified_split(labels, (0.5, 0.3, 0.2), seed=0)
    assert (len(a), len(b), len(c)) == (50, 30, 20)
    assert len(stratified_split(labels, (0.71, 0.29), seed=0)[1]) == 29  # 0.29 * 100 < 29
    assert np.bincount(labels[c]).tolist() == [5, 5, 5, 5]
    np.testing.assert_array_equal(np.sort(np.concatenate([a, b, c])), np.arange(100))
    rest, empty = stratified_split(labels, (1.0, 0.0), seed=0)
    assert len(rest) == 100 and len(empty) == 0 and empty.dtype == np.int64
    with pytest.raises(ValueError, match="sum to 1"):
        stratified_split(labels, (0.5, 0.2), seed=0)
    with pytest.raises(ValueError, match="1-D"):
        stratified_split(labels.reshape(10, 10), (0.5, 0.5), seed=0)
    with pytest.raises(ValueError, match=r"part 1 \(fraction 0.02, 2 of 100"):
        stratified_split(labels, (0.98, 0.02), seed=0)  # 2 examples cannot hold 4 classes


def test_digits_rejects_bad_fractions():
    pytest.importorskip("sklearn")
    with pytest.raises(ValueError, match="val_fraction"):
        load_digits(val_fraction=1.5)
    with pytest.raises(ValueError, match="< 1"):
        load_digits(val_fraction=0.5, test_fraction=0.5)


# ----------------------------------------------------------------------- pydoc topics


@pytest.fixture(scope="module")
def topics():
    return load_pydoc_topics()


def _fingerprint(data) -> str:
    import hashlib

    h = hashlib.sha256()
    for split in data.splits().values():
        h.update("\x00".join(split.texts).encode())
        h.update(split.labels.tobytes())
    return h.hexdigest()


def test_topics_size_classes_and_stats(topics):
    print(topics)
    total = sum(len(s) for s in topics.splits().values())
    assert total >= 3000
    assert topics.num_classes >= 6
    for name, split in topics.splits().items():
        counts = np.bincount(split.labels, minlength=topics.num_classes)
        assert np.all(counts > 0), f"a class is missing from {name}: {counts}"
        assert split.labels.dtype == np.int32 and len(split.labels) == len(split.texts)
    stats = topics.stats()
    assert stats["train"]["n"] == len(topics.train)
    assert sum(stats["val"]["per_class"].values()) == len(topics.val)


def test_topics_class_balance_is_sane(topics):
    shares = np.bincount(topics.train.labels) / len(topics.train)
    assert shares.max() < 0.5, dict(zip(topics.label_names, shares.round(3)))
    assert shares.min() > 0.01
    sizes = [len(s) for s in topics.splits().values()]
    assert 0.6 < sizes[0] / sum(sizes) < 0.8  # about 70/15/15 by examples


def test_topics_split_by_module(topics):
    names = {k: set(s.module_names) for k, s in topics.splits().items()}
    assert not names["train"] & names["val"]
    assert not names["train"] & names["test"]
    assert not names["val"] & names["test"]
    for split in topics.splits().values():  # each label is its module's topic
        expected = [topics.label_names.index(pydoc_topics.topic_of(m)) for m in split.modules]
        np.testing.assert_array_equal(split.labels, expected)


def test_topics_have_no_duplicate_texts(topics):
    texts = [t.casefold() for s in topics.splits().values() for t in s.texts]
    assert len(set(texts)) == len(texts)


def test_topics_texts_are_cleaned(topics):
    for split in topics.splits().values():
        for text in split.texts:
            assert 40 <= len(text) <= 600
            assert ">>>" not in text and "\n" not in text and "  " not in text


def test_topics_are_deterministic_and_seeded(topics):
    again = load_pydoc_topics()
    assert _fingerprint(again) == _fingerprint(topics)
    other = load_pydoc_topics(seed=1)
    assert set(other.test.module_names) != set(topics.test.module_names)


def test_topics_from_a_cold_cache_match_and_import_nothing(topics, tmp_path, monkeypatch):
    monkeypatch.setenv("SUBSPACE_JAX_CACHE", str(tmp_path))
    before = set(sys.modules)
    fresh = load_pydoc_topics()  # parses the standard library again, into tmp_path
    new = [m for m in set(sys.modules) - before  # codecs may be looked up to decode a file
           if pydoc_topics.topic_of(m) and not m.startswith("encodings.")]
    assert new == []  # parsed with ast, never imported
    assert list((tmp_path / "docstrings").glob("*.json"))  # the cache was written
    assert _fingerprint(fresh) == _fingerprint(topics)  # fresh parse == cached parse


def test_topic_of_and_bad_arguments():
    assert pydoc_topics.topic_of("xml.etree.ElementTree") == "data_formats"
    assert pydoc_topics.topic_of("asyncio.tasks") == "concurrency"
    assert pydoc_topics.topic_of("emailx") is None
    with pytest.raises(ValueError, match="min_chars"):
        load_pydoc_topics(min_chars=100, max_chars=50)
    with pytest.raises(ValueError, match="test_fraction"):
        load_pydoc_topics(test_fraction=-0.1)


def test_tokenize_texts_with_minilm(topics):
    tok = load_minilm_tokenizer()
    out = tokenize_texts(topics.val.texts[:16], tok, max_length=64)
    for arr in out.as_dict().values():
        assert arr.shape == (16, 64) and arr.dtype == np.int32
    assert np.all(out.input_ids[:, 0] == tok.token_to_id("[CLS]"))
    lengths = out.attention_mask.sum(axis=1)
    assert lengths.max() == 64 and lengths.min() < 64  # some truncated, some padded
    pad = tok.token_to_id("[PAD]")
    assert np.all((out.input_ids == pad) == (out.attention_mask == 0))
    assert tok.padding["length"] == 128  # the caller's tokenizer is left as it was
    with pytest.raises(ValueError, match="max_length"):
        tokenize_texts(["x"], tok, max_length=0)


# -------------------------------------------------------------------------- LM corpus


@pytest.fixture(scope="module")
def corpus():
    return load_lm_corpus(max_bytes=200_000, vocab_size=1024)


def test_lm_streams_are_nonempty_int32_in_vocab(corpus):
    print(corpus)
    for name, ids in corpus.splits().items():
        assert ids.dtype == np.int32 and ids.ndim == 1 and len(ids) > 1000, name
        assert ids.min() >= 0 and ids.max() < corpus.vocab_size
        assert ids[-1] == corpus.eos_id
    assert corpus.vocab_size == 1024
    assert np.sum(corpus.train == corpus.eos_id) == len(corpus.modules["train"])
    assert sum(corpus.num_bytes.values()) <= 200_000


def test_lm_splits_are_module_disjoint(corpus):
    train, val, test = (set(corpus.modules[k]) for k in ("train", "val", "test"))
    assert not train & val and not train & test and not val & test
    assert len(val) >= 2 and len(test) >= 2


def test_lm_module_split_does_not_depend_on_the_cap(corpus):
    wordpiece = load_lm_corpus(max_bytes=100_000, tokenizer="wordpiece")
    assert not set(wordpiece.modules["val"]) & set(corpus.modules["train"])
    assert not set(wordpiece.modules["train"]) & set(corpus.modules["test"])
    assert wordpiece.vocab_size == 30522 and wordpiece.eos_id == 102  # [SEP]
    assert wordpiece.train.max() < wordpiece.vocab_size


def test_lm_is_deterministic_and_cached(corpus):
    again = load_lm_corpus(max_bytes=200_000, vocab_size=1024)
    for name, ids in corpus.splits().items():
        np.testing.assert_array_equal(again.splits()[name], ids)
    assert again.tokenizer_path == corpus.tokenizer_path and corpus.tokenizer_path.exists()


def test_bpe_round_trips_text_exactly(corpus):
    tok = corpus.tokenizer()
    samples = [
        "def f(x):\n\treturn x  # comment\r\n",
        "    \"\"\"Docstring with unicode: é, ∑, 漢字, emoji 🐍.\"\"\"\n\n\n",
        " leading space and trailing  ",
    ]
    head = tok.decode(corpus.val[:2000].tolist())  # real held-out text
    for text in samples + [head]:
        assert tok.decode(tok.encode(text).ids) == text


def test_bpe_training_is_deterministic():
    texts = ["import os\nos.path.join('a', 'b')\n", "def g():\n    pass\n"] * 20
    a = train_byte_bpe(texts, vocab_size=300)
    b = train_byte_bpe(texts, vocab_size=300)
    assert a.to_str() == b.to_str()
    with pytest.raises(ValueError, match="vocab_size"):
        train_byte_bpe(texts, vocab_size=100)


def test_lm_batches_shapes_and_shift(corpus):
    batch_size, seq_len = 4, 32
    got = list(lm_batches(corpus.train, batch_size=batch_size, seq_len=seq_len, seed=0))
    assert len(got) == num_lm_batches(corpus.train, batch_size=batch_size, seq_len=seq_len)
    for w in got:
        assert w.shape == (batch_size, seq_len + 1) and w.dtype == np.int32
        x, y = inputs_targets(w)
        np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # targets = inputs shifted by one
    windows = lm_windows(corpus.train, seq_len)
    np.testing.assert_array_equal(windows[1, :seq_len], corpus.train[seq_len:2 * seq_len])
    again = list(lm_batches(corpus.train, batch_size=batch_size, seq_len=seq_len, seed=0))
    np.testing.assert_array_equal(np.stack(got), np.stack(again))
    other = next(lm_batches(corpus.train, batch_size=batch_size, seq_len=seq_len, seed=1))
    assert not np.array_equal(other, got[0])
    with pytest.raises(ValueError, match="seq_len"):
        lm_windows(corpus.val[:10], 10)


def test_unigram_perplexity_baseline(corpus):
    ppl = unigram_perplexity(corpus.train, corpus.val, corpus.vocab_size)
    fit = unigram_perplexity(corpus.train, corpus.train, corpus.vocab_size)
    print(f"unigram perplexity: train {fit:.1f}, val {ppl:.1f}, vocab {corpus.vocab_size}")
    # the counts fit their own text better than held-out text, and both beat the uniform model
    assert 1.0 < fit < ppl < corpus.vocab_size
    uniform = unigram_perplexity(np.arange(corpus.vocab_size), corpus.val, corpus.vocab_size)
    assert uniform == pytest.approx(corpus.vocab_size)  # flat counts: the uniform model
    p = np.array([3, 2]) / 5  # counts [2, 1] plus one each
    assert unigram_perplexity([0, 0, 1], [0, 1], 2) == pytest.approx(
        math.exp(-np.log(p).mean()))
    with pytest.raises(ValueError, match="outside"):
        unigram_perplexity(corpus.train, np.array([corpus.vocab_size]), corpus.vocab_size)


def test_lm_docstrings_content_and_bad_arguments():
    docs = load_lm_corpus(content="docstrings", max_bytes=60_000, vocab_size=512)
    assert len(docs.train) > 1000 and len(docs.val) > 0
    assert docs.content == "docstrings"
    with pytest.raises(ValueError, match="tokenizer"):
        load_lm_corpus(tokenizer="gpt2")
    with pytest.raises(ValueError, match="content"):
        load_lm_corpus(content="html")
    with pytest.raises(ValueError, match="max_bytes"):
        load_lm_corpus(max_bytes=0)


# --------------------------------------------------------------------------- batching


def test_batches_have_fixed_shapes_and_drop_last():
    x, y = np.arange(23 * 3).reshape(23, 3), np.arange(23, dtype=np.int32)
    got = list(batches((x, y), 5, seed=0))
    assert len(got) == 4 == num_batches((x, y), 5)
    for bx, by in got:
        assert bx.shape == (5, 3) and by.shape == (5,) and by.dtype == np.int32
        np.testing.assert_array_equal(bx[:, 0] // 3, by)  # rows stay paired
    full = list(batches((x, y), 5, seed=0, drop_last=False))
    assert [len(b[1]) for b in full] == [5, 5, 5, 5, 3]
    assert num_batches(23, 5, drop_last=False) == 5


def test_batches_cover_each_example_at_most_once_per_epoch():
    y = np.arange(23)
    epochs = list(batches({"y": y}, 5, seed=3, epochs=3))
    assert len(epochs) == 12
    for e in range(3):
        seen = np.concatenate([b["y"] for b in epochs[4 * e:4 * e + 4]])
        assert len(np.unique(seen)) == len(seen) == 20
    first, second = (np.concatenate([b["y"] for b in epochs[i:i + 4]]) for i in (0, 4))
    assert not np.array_equal(first, second)  # a new permutation every epoch
    ordered = np.concatenate(list(batches(y, 5, seed=0, shuffle=False)))
    np.testing.assert_array_equal(ordered, np.arange(20))


def test_batches_are_deterministic_for_a_seed():
    x = np.arange(50)
    a = np.stack(list(batches(x, 10, seed=7, epochs=2)))
    b = np.stack(list(batches(x, 10, seed=7, epochs=2)))
    c = np.stack(list(batches(x, 10, seed=8, epochs=2)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_batches_error_messages():
    with pytest.raises(ValueError, match=r"\[0\]: 4, \[1\]: 5"):
        batches((np.zeros(4), np.zeros(5)), 2, seed=0)
    with pytest.raises(ValueError, match=r"'b'"):
        batches({"a": np.zeros(4), "b": np.zeros(3)}, 2, seed=0)
    with pytest.raises(ValueError, match="batch_size=9 is larger than .* N=4"):
        batches(np.zeros(4), 9, seed=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        num_batches(4, 0)
    with pytest.raises(ValueError, match="epochs"):
        batches(np.zeros(4), 2, seed=0, epochs=0)
    with pytest.raises(ValueError, match="scalar"):
        batches((np.zeros(4), np.float32(1.0)), 2, seed=0)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        batches(np.zeros(4), 2.0, seed=0)
