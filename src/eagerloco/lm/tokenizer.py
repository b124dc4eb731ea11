"""Tokenizers for the language-model demo: raw UTF-8 bytes (default) or a byte-level BPE trained offline.

Both implement the :class:`Tokenizer` protocol::

    encode(text) -> list[int]         ids in [0, vocab_size)
    decode(ids) -> str                invalid UTF-8 byte sequences become U+FFFD (errors="replace")
    encode_batch(texts) -> list[list[int]]
    vocab_size: int
    fingerprint: str                  identifies the exact mapping (used in cache keys)

* :class:`ByteTokenizer`: id = byte value of the UTF-8 encoding, vocabulary 256, no training, no special tokens.
  ``decode(encode(s)) == s`` for every string ``s``.
* :class:`BPETokenizer`: GPT-2 style byte-level BPE from the ``tokenizers`` library: the text is split by the GPT-2
  regex, each piece's UTF-8 bytes are mapped to 256 printable symbols (all 256 are in the base alphabet, so any
  text encodes), then merges learnt on the training texts are applied. No normaliser, no prefix space and no special
  tokens, so it is lossless as well. ``vocab_size`` is the requested size or less when the training texts run out of
  pairs seen at least twice.

:func:`build_tokenizer` trains the BPE once and caches it as JSON in ``cache_dir`` under a key made of the training
corpus' fingerprint and the vocabulary size (``bpe-v{V}-{sha256[:16]}.json``); the file is written atomically
(temporary file in the same directory, then ``os.replace``), so concurrent builders never see a partial file and a
later build loads it instead of training again.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from eagerloco.fileio import atomic_write_bytes

__all__ = [
    "TOKENIZER_KINDS",
    "BPETokenizer",
    "ByteTokenizer",
    "Tokenizer",
    "bpe_cache_path",
    "build_tokenizer",
    "texts_fingerprint",
]

TOKENIZER_KINDS = ("byte", "bpe")
DEFAULT_BPE_VOCAB = 2048
"""Vocabulary size of :func:`build_tokenizer` ('bpe') when none is given; the same as the training run's default
(``DataConfig.bpe_vocab_size``)."""
_BPE_MIN_FREQUENCY = 2
_BPE_FORMAT = 1  # bump when the training recipe changes: it is part of the cache key


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and the sampler need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def fingerprint(self) -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


def _check_ids(ids: Iterable[int], vocab_size: int) -> list[int]:
    out = [int(i) for i in ids]
    bad = [i for i in out if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token ids out of range [0, {vocab_size}): {bad[:5]}")
    return out


class ByteTokenizer:
    """UTF-8 bytes as tokens: ``encode(s) = list(s.encode('utf-8'))``, vocabulary 256."""

    vocab_size: int = 256
    fingerprint: str = "byte"

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of each text."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """The bytes ``ids`` decoded as UTF-8, invalid sequences replaced by U+FFFD. ``ValueError`` for ids outside
        [0, 256)."""
        return bytes(_check_ids(ids, 256)).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


class BPETokenizer:
    """Byte-level BPE (a wrapped ``tokenizers.Tokenizer``); build it with :meth:`train` or :meth:`from_file`."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))
        digest = hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()[:16]
        self._fingerprint = f"bpe-v{self._vocab_size}-{digest}"

    @property
    def vocab_size(self) -> int:
        """Number of ids (256 byte symbols + learnt merges)."""
        return self._vocab_size

    @property
    def fingerprint(self) -> str:
        """``bpe-v{V}-`` + hash of the serialised tokenizer: equal iff the mapping is equal."""
        return self._fingerprint

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int) -> BPETokenizer:
        """Learn a byte-level BPE with at most ``vocab_size`` ids on ``texts`` (merges of pairs seen >= 2 times)."""
        if vocab_size <= 256:
            raise ValueError(f"BPE vocab_size must exceed the 256 byte symbols, got {vocab_size}")
        tokenizers = _import_tokenizers()
        tok = tokenizers.Tokenizer(tokenizers.models.BPE())
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=_BPE_MIN_FREQUENCY,
            show_progress=False,
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
        )
        tok.train_from_iterator(list(texts), trainer=trainer, length=len(texts))
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> BPETokenizer:
        """Load a tokenizer saved by :meth:`save` (the ``tokenizers`` JSON format)."""
        return cls(_import_tokenizers().Tokenizer.from_file(str(path)))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tokenizer as JSON, atomically."""
        atomic_write_bytes(Path(path), self._tok.to_str().encode("utf-8"))

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text``."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """:meth:`encode` of each text (parallel in the ``tokenizers`` library)."""
        return [list(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; byte sequences that are not valid UTF-8 become U+FFFD. ``ValueError`` for ids outside
        [0, vocab_size)."""
        return self._tok.decode(_check_ids(ids, self._vocab_size), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self._vocab_size}, fingerprint={self._fingerprint!r})"


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the BPE tokenizer needs the 'tokenizers' package: pip install 'tokenizers>=0.15' "
            "(or pip install 'eagerloco[lm]'); the byte tokenizer needs nothing"
        ) from exc
    return tokenizers


def texts_fingerprint(texts: Iterable[str]) -> str:
    """SHA-256 (hex) of the texts, each length-prefixed so that the split into texts matters."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def bpe_cache_path(cache_dir: str | os.PathLike[str], texts: Sequence[str], vocab_size: int) -> Path:
    """Where :func:`build_tokenizer` caches the BPE trained on ``texts`` with ``vocab_size``."""
    key = hashlib.sha256(f"{_BPE_FORMAT}:{vocab_size}:{texts_fingerprint(texts)}".encode()).hexdigest()[:16]
    return Path(cache_dir) / f"bpe-v{vocab_size}-{key}.json"


def build_tokenizer(
    kind: str = "byte",
    vocab_size: int | None = None,
    corpus: Sequence[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> ByteTokenizer | BPETokenizer:
    """The tokenizer ``kind`` ('byte' or 'bpe').

    Args:
        kind: 'byte' (vocabulary 256; ``vocab_size`` must be None or 256, ``corpus`` is ignored) or 'bpe'.
        vocab_size: BPE vocabulary size (default :data:`DEFAULT_BPE_VOCAB`); must exceed 256.
        corpus: BPE only: the training texts (the training split, never the validation split).
        cache_dir: BPE only: directory of the cache. When the file for (corpus fingerprint, vocab size) exists it is
            loaded, otherwise the BPE is trained and saved there atomically. ``None``: train, do not cache.
        log: called with one line when the BPE is trained (it takes a while) and when a cached one is reused.
    """
    if kind == "byte":
        if vocab_size not in (None, 256):
            raise ValueError(f"the byte tokenizer has vocab_size 256, got vocab_size={vocab_size}")
        return ByteTokenizer()
    if kind != "bpe":
        raise ValueError(f"unknown tokenizer {kind!r}: choose one of {', '.join(TOKENIZER_KINDS)}")
    size = DEFAULT_BPE_VOCAB if vocab_size is None else int(vocab_size)
    if size <= 256:
        raise ValueError(f"BPE vocab_size must exceed the 256 byte symbols, got {size}")
    if corpus is None:
        raise ValueError("a BPE tokenizer needs its training texts: pass corpus=[...] (the training split)")
    texts = list(corpus)
    if not any(texts):
        raise ValueError("cannot train a BPE tokenizer on an empty corpus")
    say = log or (lambda line: None)
    path = None if cache_dir is None else bpe_cache_path(cache_dir, texts, size)
    if path is not None and path.is_file():
        say(f"tokenizer: BPE (vocab {size}) reused from the cache {path}")
        return BPETokenizer.from_file(path)
    chars = sum(len(t) for t in texts)
    say(f"tokenizer: training a byte-level BPE (vocab {size}) on {chars:,} characters of the training split ...")
    start = time.perf_counter()
    tok = BPETokenizer.train(texts, size)
    if path is not None:
        tok.save(path)
    where = f", cached as {path}" if path is not None else ""
    say(f"tokenizer: BPE trained in {time.perf_counter() - start:.1f} s{where}")
    return tok
