"""Token streams, per-worker batch samplers and the fixed evaluation batches of a training run.

Tokenisation (:class:`TokenStream`): each split is tokenised once into one flat array of ids (``uint16`` when the
vocabulary fits, else ``int32``) plus document offsets. Training and evaluation windows always lie inside one
document, so no end-of-text token is needed (:func:`eagerloco.lm.data.prepare_data` caches BPE token arrays).

Sampling (:class:`BatchSampler`): a batch is ``batch_size`` windows of ``seq_len + 1`` consecutive tokens drawn
uniformly, with replacement, among all windows that fit inside one of the sampler's documents; ``x`` is the first
``seq_len`` tokens and ``y`` the last ``seq_len`` (next-token targets). Batch k of worker w is a pure function of
(seed, w, k) and the data: its random draw uses a fresh generator seeded by a hash of (seed, w, k). The sampler's
state is therefore just k, and a resumed sampler draws bitwise the same batches. Sharding:

* ``iid`` (default): every worker samples from all training documents, with its own seed stream (seed, worker);
  worker w's batches do not depend on the number of workers.
* ``noniid``: the documents (in corpus order) are cut into ``num_workers`` contiguous runs of nearly equal token
  count (:func:`shard_documents`); worker w samples only from run w. Contiguity makes the shards differ in kind
  (e.g. comedies against tragedies, Old against New Testament), which is the point of a non-iid experiment.

Evaluation (:class:`EvalBatches`): the validation parts are cut into non-overlapping windows (stride ``seq_len``, in
document order); with ``max_batches`` an evenly spaced subset of ``max_batches · batch_size`` windows is kept, so
that every document is still represented. No randomness: the same windows for every run with the same
(corpus, tokenizer, val_fraction, batch_size, seq_len, max_batches).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from eagerloco.lm.corpora import CorpusError, Document
from eagerloco.lm.tokenizer import ByteTokenizer, Tokenizer

__all__ = [
    "SHARDINGS",
    "BatchSampler",
    "EvalBatches",
    "TokenStream",
    "shard_documents",
]

SHARDINGS = ("iid", "noniid")
_SAMPLER_STATE_FORMAT = 1


# ------------------------------------------------------------------------------------------------- tokenisation


def _token_dtype(vocab_size: int) -> np.dtype[Any]:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


@dataclass(frozen=True, eq=False)
class TokenStream:
    """Token ids of a list of documents, concatenated: document i is ``tokens[offsets[i]:offsets[i + 1]]``."""

    tokens: np.ndarray
    """1-D ids (uint16 or int32)."""
    offsets: np.ndarray
    """int64, length ``num_documents + 1``, offsets[0] = 0, offsets[-1] = len(tokens)."""
    names: tuple[str, ...]
    """Document names, aligned with the offsets."""

    def __post_init__(self) -> None:
        if self.tokens.ndim != 1 or self.offsets.ndim != 1 or len(self.offsets) != len(self.names) + 1:
            raise ValueError("TokenStream needs 1-D tokens and len(offsets) == len(names) + 1")
        if len(self.offsets) and (self.offsets[0] != 0 or self.offsets[-1] != len(self.tokens)):
            raise ValueError("TokenStream offsets must start at 0 and end at len(tokens)")
        if np.any(np.diff(self.offsets) < 0):
            raise ValueError("TokenStream offsets must be non-decreasing")

    @classmethod
    def from_documents(cls, documents: Sequence[Document], tokenizer: Tokenizer) -> TokenStream:
        """Tokenise ``documents`` with ``tokenizer`` (UTF-8 bytes directly for :class:`ByteTokenizer`)."""
        dtype = _token_dtype(tokenizer.vocab_size)
        if isinstance(tokenizer, ByteTokenizer):
            arrays = [np.frombuffer(d.text.encode("utf-8"), dtype=np.uint8).astype(dtype) for d in documents]
        else:
            arrays = [np.asarray(ids, dtype=dtype) for ids in tokenizer.encode_batch([d.text for d in documents])]
        lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
        tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)
        return cls(tokens.astype(dtype, copy=False), offsets, tuple(d.name for d in documents))

    @property
    def num_documents(self) -> int:
        return len(self.names)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per document (int64)."""
        return np.diff(self.offsets)

    def document(self, i: int) -> np.ndarray:
        """Token ids of document ``i``."""
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def __len__(self) -> int:
        return len(self.tokens)


def _gather_windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[Tensor, Tensor]:
    """x = tokens[s : s + T], y = tokens[s + 1 : s + T + 1] for each start s, as int64 tensors (len(starts), T)."""
    windows = tokens[starts[:, None] + np.arange(seq_len + 1, dtype=np.int64)].astype(np.int64)
    w = torch.from_numpy(windows)
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


# ----------------------------------------------------------------------------------------------------- sharding


def shard_documents(lengths: Sequence[int] | np.ndarray, num_workers: int) -> list[range]:
    """Cut documents 0..D−1 into ``num_workers`` contiguous, non-empty runs of nearly equal total length.

    Boundary k (1 ≤ k < W) is the document boundary whose cumulative length is closest to k/W of the total (the
    earlier one on ties), pushed forward or back just enough that every run keeps at least one document.

    Raises:
        CorpusError: fewer documents than workers.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    sizes = np.asarray(lengths, dtype=np.int64)
    count = len(sizes)
    if count < num_workers:
        raise CorpusError(
            f"non-iid sharding gives each worker whole documents, but the corpus has {count} documents for "
            f"{num_workers} workers: use sharding 'iid', fewer workers, or a corpus with more documents"
        )
    prefix = np.concatenate(([0], np.cumsum(sizes)))
    total = int(prefix[-1])
    bounds = [0]
    for k in range(1, num_workers):
        target = total * k / num_workers
        i = int(np.searchsorted(prefix, target, side="left"))
        if i > 0 and target - prefix[i - 1] <= prefix[i] - target:
            i -= 1
        i = min(max(i, bounds[-1] + 1), count - (num_workers - k))
        bounds.append(i)
    bounds.append(count)
    return [range(bounds[k], bounds[k + 1]) for k in range(num_workers)]


def _derive_seed(*parts: object) -> int:
    """A 63-bit seed from a hash of ``parts``: independent streams for different (purpose, seed, worker, step)."""
    # The salt names the module these samplers were first written in: changing it would change every batch.
    digest = hashlib.sha256(":".join(["eagerloco.lm.data", *map(str, parts)]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ------------------------------------------------------------------------------------------------------ sampler


class BatchSampler:
    """Random training windows of one worker (see the module docstring), an endless iterator of ``(x, y)``.

    Args:
        stream: the training token stream.
        batch_size: windows per batch (B).
        seq_len: tokens per window (T); every window has T + 1 tokens inside one document.
        seed: the run's seed.
        worker: this worker's index (its seed stream is (seed, worker)).
        documents: indices of the stream's documents this sampler draws from (default: all).

    Raises:
        CorpusError: no document of the sampler holds ``seq_len + 1`` tokens.
    """

    def __init__(
        self,
        stream: TokenStream,
        batch_size: int,
        seq_len: int,
        *,
        seed: int,
        worker: int = 0,
        documents: Sequence[int] | None = None,
    ) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        if worker < 0:
            raise ValueError(f"worker must be >= 0, got {worker}")
        self.stream = stream
        self.batch_size = int(batch_size)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.worker = int(worker)
        docs = np.arange(stream.num_documents) if documents is None else np.asarray(list(documents), dtype=np.int64)
        if docs.size and (docs.min() < 0 or docs.max() >= stream.num_documents):
            raise ValueError(f"document indices must be in [0, {stream.num_documents})")
        self.documents: tuple[int, ...] = tuple(int(d) for d in docs)
        lengths = stream.lengths[docs] if docs.size else np.zeros(0, dtype=np.int64)
        counts = np.maximum(lengths - self.seq_len, 0)  # starts s with s + T + 1 <= length
        self._doc_starts = stream.offsets[docs] if docs.size else np.zeros(0, dtype=np.int64)
        self._cum = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        self.num_windows = int(self._cum[-1])
        if self.num_windows == 0:
            longest = int(lengths.max()) if lengths.size else 0
            raise CorpusError(
                f"corpus too small for seq_len={seq_len}: worker {worker}'s {len(docs)} training document(s) hold at "
                f"most {longest} tokens, a window needs seq_len + 1 = {seq_len + 1}; lower seq_len, lower "
                "val_fraction, use iid sharding or a larger corpus"
            )
        names = "\0".join(stream.names[d] for d in self.documents)
        self._shard_key = hashlib.sha256(f"{names}\0{self.num_windows}".encode()).hexdigest()[:16]
        self.batches_drawn = 0

    def _starts(self, step: int) -> np.ndarray:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(_derive_seed("train", self.seed, self.worker, step))
        u = torch.randint(0, self.num_windows, (self.batch_size,), generator=gen, dtype=torch.int64).numpy()
        j = np.searchsorted(self._cum, u, side="right") - 1
        return self._doc_starts[j] + (u - self._cum[j])

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """Batch number ``step`` (0-based) of this sampler, without moving its position."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return _gather_windows(self.stream.tokens, self._starts(step), self.seq_len)

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """The next batch ``(x, y)``, both int64 (batch_size, seq_len), y[:, t] = the token after x[:, t]."""
        out = self.batch(self.batches_drawn)
        self.batches_drawn += 1
        return out

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """The sampler's exact position (plain ints and strings): with the same data and arguments,
        :meth:`load_state_dict` makes the sampler continue with bitwise the same batches."""
        return {
            "format": _SAMPLER_STATE_FORMAT,
            "seed": self.seed,
            "worker": self.worker,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "shard": self._shard_key,
            "batches_drawn": self.batches_drawn,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position saved by :meth:`state_dict`.

        Raises:
            ValueError: the state belongs to a sampler with another seed, worker, batch size, sequence length or
                data shard (its batches would differ), or is malformed.
        """
        if state.get("format") != _SAMPLER_STATE_FORMAT:
            raise ValueError(f"unsupported sampler state format {state.get('format')!r}")
        mine = self.state_dict()
        for key in ("seed", "worker", "batch_size", "seq_len", "shard"):
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"sampler state mismatch on {key!r}: saved {state.get(key)!r}, this sampler has {mine[key]!r} "
                    "(resume with the same data, seed, worker, batch size and seq_len)"
                )
        drawn = state.get("batches_drawn")
        if not isinstance(drawn, int) or drawn < 0:
            raise ValueError(f"invalid batches_drawn in sampler state: {drawn!r}")
        self.batches_drawn = drawn

    def __repr__(self) -> str:
        return (
            f"BatchSampler(worker={self.worker}, documents={len(self.documents)}, windows={self.num_windows}, "
            f"batch_size={self.batch_size}, seq_len={self.seq_len}, batches_drawn={self.batches_drawn})"
        )


# --------------------------------------------------------------------------------------------------- evaluation


class EvalBatches:
    """Fixed validation batches (see the module docstring); iterable any number of times, always the same batches.

    Args:
        stream: the validation token stream.
        batch_size: windows per batch (the last batch may be smaller when ``max_batches`` is None).
        seq_len: tokens per window.
        max_batches: keep an evenly spaced subset of ``max_batches · batch_size`` windows (None: all windows).

    Raises:
        CorpusError: the validation split has no window of ``seq_len + 1`` tokens.
    """

    def __init__(self, stream: TokenStream, batch_size: int, seq_len: int, max_batches: int | None = None) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
        self.stream = stream
        self.batch_size = int(batch_size)
        self.seq_len = int(seq_len)
        per_doc = np.maximum(stream.lengths - 1, 0) // self.seq_len  # windows of T + 1 tokens at stride T
        starts = [
            stream.offsets[d] + self.seq_len * np.arange(n, dtype=np.int64) for d, n in enumerate(per_doc.tolist()) if n
        ]
        all_starts = np.concatenate(starts) if starts else np.zeros(0, dtype=np.int64)
        total = len(all_starts)
        if total == 0:
            longest = int(stream.lengths.max()) if stream.num_documents else 0
            raise CorpusError(
                f"validation split too small for seq_len={seq_len}: its longest document part holds {longest} tokens, "
                f"a window needs {seq_len + 1}; lower seq_len, raise val_fraction or use a larger corpus"
            )
        if max_batches is not None and max_batches * self.batch_size < total:
            n = max_batches * self.batch_size
            all_starts = all_starts[(np.arange(n, dtype=np.int64) * total) // n]
        self.starts: np.ndarray = all_starts
        """Start offsets (into the stream) of the windows, in evaluation order."""

    @property
    def num_windows(self) -> int:
        return len(self.starts)

    @property
    def num_tokens(self) -> int:
        """Target tokens evaluated per pass."""
        return self.num_windows * self.seq_len

    def __len__(self) -> int:
        return -(-self.num_windows // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for i in range(0, self.num_windows, self.batch_size):
            yield _gather_windows(self.stream.tokens, self.starts[i : i + self.batch_size], self.seq_len)

    def __repr__(self) -> str:
        return f"EvalBatches(batches={len(self)}, windows={self.num_windows}, seq_len={self.seq_len})"
