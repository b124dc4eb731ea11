"""A training run's data: a corpus, split, tokenised and cached (:func:`prepare_data`), as one :class:`LMData`
that makes each worker's batch sampler and the evaluation batches.

The parts: :mod:`eagerloco.lm.corpora` (offline corpora and the per-document train/validation split),
:mod:`eagerloco.lm.tokenizer` (byte and BPE tokenizers), :mod:`eagerloco.lm.batches` (token streams, per-worker
samplers with iid or non-iid sharding, fixed evaluation batches).

With a ``cache_dir``, BPE token arrays are cached there as ``tokens-<key>.npz`` keyed by (corpus fingerprint,
validation fraction, tokenizer fingerprint), written atomically; byte tokenisation is a memory copy and is not
cached.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eagerloco.fileio import atomic_write_bytes
from eagerloco.lm.batches import SHARDINGS, BatchSampler, EvalBatches, TokenStream, shard_documents
from eagerloco.lm.corpora import DEFAULT_VAL_FRACTION, Corpus, CorpusError, load_corpus, split_corpus
from eagerloco.lm.tokenizer import ByteTokenizer, Tokenizer, build_tokenizer

__all__ = ["LMData", "default_cache_dir", "prepare_data"]

_TOKEN_CACHE_FORMAT = 1


@dataclass(frozen=True, eq=False)
class LMData:
    """A tokenised corpus split into training and validation streams; makes samplers and evaluation batches."""

    corpus_name: str
    corpus_fingerprint: str
    val_fraction: float
    tokenizer: Tokenizer
    train: TokenStream
    val: TokenStream

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def shard(self, worker: int, num_workers: int, sharding: str = "iid") -> list[int]:
        """Indices of the training documents worker ``worker`` of ``num_workers`` samples from."""
        if sharding not in SHARDINGS:
            raise ValueError(f"unknown sharding {sharding!r}: choose one of {', '.join(SHARDINGS)}")
        if num_workers < 1 or not 0 <= worker < num_workers:
            raise ValueError(f"worker must be in [0, num_workers={num_workers}), got {worker}")
        if sharding == "iid":
            return list(range(self.train.num_documents))
        return list(shard_documents(self.train.lengths, num_workers)[worker])

    def sampler(
        self,
        batch_size: int,
        seq_len: int,
        *,
        seed: int,
        worker: int = 0,
        num_workers: int = 1,
        sharding: str = "iid",
    ) -> BatchSampler:
        """The training :class:`BatchSampler` of ``worker`` (see :meth:`shard` and the module docstring)."""
        documents = self.shard(worker, num_workers, sharding)
        return BatchSampler(self.train, batch_size, seq_len, seed=seed, worker=worker, documents=documents)

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None) -> EvalBatches:
        """The fixed validation batches (:class:`EvalBatches`)."""
        return EvalBatches(self.val, batch_size, seq_len, max_batches)

    def summary(self) -> str:
        """One line: corpus, documents, tokenizer, split sizes."""
        return (
            f"corpus {self.corpus_name}: {self.train.num_documents} documents, tokenizer {self.tokenizer.fingerprint} "
            f"(vocab {self.vocab_size}), train {len(self.train):,} tokens, "
            f"validation {len(self.val):,} tokens ({self.val_fraction:.0%} tail of each document)"
        )


def default_cache_dir() -> Path:
    """``$EAGERLOCO_CACHE_DIR``, else ``$XDG_CACHE_HOME/eagerloco``, else ``~/.cache/eagerloco``."""
    env = os.environ.get("EAGERLOCO_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "eagerloco"


def _load_token_cache(path: Path, num_train: int, num_val: int) -> tuple[np.ndarray, ...] | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = tuple(npz[k] for k in ("train_tokens", "train_offsets", "val_tokens", "val_offsets"))
    except (OSError, ValueError, KeyError, EOFError):
        return None  # missing or unreadable: rebuild (and overwrite)
    if len(arrays[1]) != num_train + 1 or len(arrays[3]) != num_val + 1:
        return None
    return arrays


def prepare_data(
    corpus: str | os.PathLike[str] | Corpus = "shakespeare",
    *,
    tokenizer: str = "byte",
    vocab_size: int | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    cache_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> LMData:
    """Load (or take) a corpus, split it, build the tokenizer (BPE: trained on the training split) and tokenise both
    splits.

    Args:
        corpus: a :func:`load_corpus` spec or a :class:`Corpus`.
        tokenizer: 'byte' or 'bpe' (see :func:`eagerloco.lm.tokenizer.build_tokenizer`).
        vocab_size: BPE vocabulary size.
        val_fraction: fraction of each document held out for validation (its tail), in [0, 1).
        cache_dir: where the BPE tokenizer and BPE token arrays are cached (None: no caching).
            :func:`default_cache_dir` is the conventional choice.
        log: called with one line per stage that takes a while (reading the corpus, training the BPE, tokenising)
            or that reuses a cache, and with :meth:`LMData.summary` at the end (None: silent).
    """
    say = log or (lambda line: None)
    start = time.perf_counter()
    if not isinstance(corpus, Corpus):
        say(f"data: reading corpus {corpus} ...")
    corp = corpus if isinstance(corpus, Corpus) else load_corpus(corpus)
    if not corp.documents:
        raise CorpusError(f"empty corpus {corp.name!r}")
    say(f"data: corpus {corp.name}: {len(corp.documents)} documents, {corp.num_chars:,} characters")
    train_docs, val_docs = split_corpus(corp, val_fraction)
    tok = build_tokenizer(tokenizer, vocab_size, corpus=[d.text for d in train_docs], cache_dir=cache_dir, log=log)
    arrays: tuple[np.ndarray, ...] | None = None
    cache_path: Path | None = None
    if cache_dir is not None and not isinstance(tok, ByteTokenizer):
        key = f"{_TOKEN_CACHE_FORMAT}:{corp.fingerprint}:{val_fraction!r}:{tok.fingerprint}"
        cache_path = Path(cache_dir) / f"tokens-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"
        arrays = _load_token_cache(cache_path, len(train_docs), len(val_docs))
    if arrays is not None:
        say(f"data: token arrays reused from the cache {cache_path}")
        train = TokenStream(arrays[0], arrays[1].astype(np.int64), tuple(d.name for d in train_docs))
        val = TokenStream(arrays[2], arrays[3].astype(np.int64), tuple(d.name for d in val_docs))
    else:
        if not isinstance(tok, ByteTokenizer):  # bytes are a memory copy; BPE encoding takes a while
            say(f"data: tokenising {corp.num_chars:,} characters with the BPE ...")
        train = TokenStream.from_documents(train_docs, tok)
        val = TokenStream.from_documents(val_docs, tok)
        if cache_path is not None:
            buffer = io.BytesIO()
            np.savez(
                buffer,
                train_tokens=train.tokens,
                train_offsets=train.offsets,
                val_tokens=val.tokens,
                val_offsets=val.offsets,
            )
            atomic_write_bytes(cache_path, buffer.getvalue())
    if len(train) == 0:
        raise CorpusError(f"empty corpus {corp.name!r}: no training tokens")
    data = LMData(corp.name, corp.fingerprint, val_fraction, tok, train, val)
    say(f"data: ready in {time.perf_counter() - start:.1f} s: {data.summary()}")
    return data
