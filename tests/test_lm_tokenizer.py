"""Tests of the demo tokenizers (eagerloco.lm.tokenizer)."""

from __future__ import annotations

import pytest

from eagerloco.fileio import atomic_write_bytes
from eagerloco.lm import tokenizer as tokmod
from eagerloco.lm.tokenizer import (
    BPETokenizer,
    ByteTokenizer,
    Tokenizer,
    bpe_cache_path,
    build_tokenizer,
)

SAMPLES = [
    "",
    "a",
    "Hello, world!\n",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nCRLF\rCR",
    "naïve café — déjà vu",
    "emoji 😀👍🏽 and CJK 日本語 and combining e\u0301",
    "\x00 control \x7f characters \x1b[0m",
]

TRAIN = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 3,
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n" * 3,
    "And by opposing end them. To die: to sleep;\nNo more; and by a sleep to say we end\n" * 3,
]


def test_byte_tokenizer_round_trip_is_exact():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.vocab_size == 256 and tok.fingerprint == "byte"
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert tok.encode_batch(SAMPLES) == [tok.encode(t) for t in SAMPLES]
    assert tok.encode("é") == [0xC3, 0xA9]


def test_byte_tokenizer_decode_replaces_invalid_utf8_and_checks_range():
    tok = ByteTokenizer()
    assert tok.decode([0xFF]) == "\ufffd"
    assert tok.decode([ord("a"), 0xC3]) == "a\ufffd"  # truncated 2-byte sequence
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([256])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])


def test_build_tokenizer_byte_and_errors():
    assert isinstance(build_tokenizer("byte"), ByteTokenizer)
    assert isinstance(build_tokenizer("byte", 256), ByteTokenizer)
    with pytest.raises(ValueError, match="vocab_size 256"):
        build_tokenizer("byte", 512)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        build_tokenizer("wordpiece")
    with pytest.raises(ValueError, match="training texts"):
        build_tokenizer("bpe", 300)
    with pytest.raises(ValueError, match="exceed the 256"):
        build_tokenizer("bpe", 256, corpus=TRAIN)
    with pytest.raises(ValueError, match="empty corpus"):
        build_tokenizer("bpe", 300, corpus=["", ""])


def test_bpe_round_trip_vocab_and_compression():
    tok = build_tokenizer("bpe", 300, corpus=TRAIN)
    assert isinstance(tok, BPETokenizer) and isinstance(tok, Tokenizer)
    assert 256 < tok.vocab_size <= 300
    for text in [*SAMPLES, *TRAIN]:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    assert len(tok.encode(TRAIN[0])) < 0.75 * len(TRAIN[0].encode("utf-8"))
    assert tok.encode_batch(TRAIN) == [tok.encode(t) for t in TRAIN]
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


def test_bpe_is_cached_once_and_reused(tmp_path, monkeypatch):
    first = build_tokenizer("bpe", 300, corpus=TRAIN, cache_dir=tmp_path)
    path = bpe_cache_path(tmp_path, TRAIN, 300)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been loaded")

    monkeypatch.setattr(BPETokenizer, "train", classmethod(no_training))
    second = build_tokenizer("bpe", 300, corpus=TRAIN, cache_dir=tmp_path)
    assert second.fingerprint == first.fingerprint
    assert second.encode(TRAIN[1]) == first.encode(TRAIN[1])
    # another corpus or vocabulary size is another cache entry (which would need training)
    assert bpe_cache_path(tmp_path, TRAIN[:2], 300) != path
    assert bpe_cache_path(tmp_path, TRAIN, 320) != path
    with pytest.raises(AssertionError, match="cached"):
        build_tokenizer("bpe", 320, corpus=TRAIN, cache_dir=tmp_path)


def test_bpe_training_is_deterministic():
    a = BPETokenizer.train(TRAIN, 300)
    b = BPETokenizer.train(TRAIN, 300)
    assert a.fingerprint == b.fingerprint


def test_atomic_write_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_texts_fingerprint_depends_on_split_into_texts():
    assert tokmod.texts_fingerprint(["ab", "c"]) != tokmod.texts_fingerprint(["a", "bc"])
    assert tokmod.texts_fingerprint(["ab", "c"]) == tokmod.texts_fingerprint(("ab", "c"))


def test_atomic_write_gives_the_umask_mode_not_0600(tmp_path):
    import os

    from eagerloco.fileio import current_umask

    old = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    atomic_write_bytes(tmp_path / "b.bin", b"y")
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o666 & ~old


def test_bpe_default_vocabulary_is_the_training_default():
    from eagerloco.lm.config import DataConfig

    assert tokmod.DEFAULT_BPE_VOCAB == DataConfig().bpe_vocab_size == 2048
