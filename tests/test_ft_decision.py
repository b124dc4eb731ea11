"""The decision record of one average under fault tolerance (ALGORITHMS.md section 11), without torchft: apply iff
every member voted success; written once, so every member reads the same decision whoever timed out; and the
collective and the votes share one bound (no member blocks longer than the configured timeout)."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.distributed import TCPStore

from eagerloco.comm.base import CollectiveTimeout
from eagerloco.ft.manager import FaultTolerance, FaultToleranceStats, _FTPending


class _RecordingStore:
    """A real TCPStore that records the timeouts of its ``wait`` calls."""

    def __init__(self) -> None:
        self.store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
        self.waits: list[float] = []

    def wait(self, keys: list[str], timeout: timedelta) -> None:
        self.waits.append(timeout.total_seconds())
        self.store.wait(keys, timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def _member(store: _RecordingStore, timeout_s: float = 30.0) -> SimpleNamespace:
    """What FaultTolerance._decide and _FTPending use of a worker's FaultTolerance."""
    ft = SimpleNamespace(coord=store, prefix="t", timeout_s=timeout_s, stats=FaultToleranceStats(), forgotten=[])
    ft._decide = lambda *args: FaultTolerance._decide(ft, *args)  # type: ignore[arg-type]
    ft._forget = ft.forgotten.append
    return ft


def test_every_member_voting_success_applies() -> None:
    store = _RecordingStore()
    a, b = _member(store), _member(store)
    # b votes success first with no time left (its collective used the whole bound): 1 of 2 votes, so it writes drop
    assert FaultTolerance._decide(b, 7, 0, 2, True, 0.0) == "drop"
    # ... and a, whose success completes the votes later, reads the same drop (written once).
    assert FaultTolerance._decide(a, 7, 0, 2, True, 5.0) == "drop"
    assert store.get("t/ok/7/0") == b"2"
    # A fresh average where both vote success in time: the second vote writes 'apply'; the first member, waiting
    # for it in its own process, reads it (here: reads it afterwards, its vote counted by hand).
    assert store.add("t/ok/7/1", 1) == 1  # a's vote
    assert FaultTolerance._decide(b, 7, 1, 2, True, 0.0) == "apply"
    assert store.get("t/decision/7/1") == b"apply"


def test_a_failure_drops_for_everyone() -> None:
    store = _RecordingStore()
    a, b = _member(store), _member(store)
    assert FaultTolerance._decide(a, 3, 0, 2, False, 5.0) == "drop"
    assert FaultTolerance._decide(b, 3, 0, 2, True, 5.0) == "drop"  # its success cannot overturn the record
    assert store.waits == []  # the record was there: nobody waited


def test_a_missing_vote_drops_after_the_remaining_time_only() -> None:
    store = _RecordingStore()
    a = _member(store)
    assert FaultTolerance._decide(a, 4, 0, 3, True, 0.2) == "drop"
    assert store.waits == [0.2]
    assert FaultTolerance._decide(a, 4, 1, 3, True, 0.0) == "drop"
    assert store.waits == [0.2]  # no time left: no wait at all


class _Inner:
    """An average in flight whose wait takes ``takes_s`` (reported through a fake clock) and then succeeds or
    fails."""

    def __init__(self, clock: list[float], takes_s: float, fails: bool) -> None:
        self.clock, self.takes_s, self.fails = clock, takes_s, fails
        self.payload_bytes = 16
        self.timeouts: list[float | None] = []

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        self.timeouts.append(timeout)
        self.clock[0] += self.takes_s
        if self.fails:
            raise CollectiveTimeout("all_reduce failed: peer gone")
        return torch.ones(4)

    def is_completed(self) -> bool:
        return False


@pytest.mark.parametrize(("takes_s", "fails", "expected_wait"), [(0.0, False, 10.0), (2.5, False, 7.5),
                                                                 (10.0, True, 0.0), (4.0, True, 6.0)])  # fmt: skip
def test_the_collective_and_the_votes_share_one_bound(monkeypatch: pytest.MonkeyPatch, takes_s: float, fails: bool,
                                                      expected_wait: float) -> None:  # fmt: skip
    clock = [100.0]
    monkeypatch.setattr("eagerloco.ft.manager.time.perf_counter", lambda: clock[0])
    decisions: list[tuple[Any, ...]] = []
    ft = SimpleNamespace(timeout_s=99.0, stats=FaultToleranceStats(), _forget=lambda item: None)
    ft._decide = lambda *args: decisions.append(args) or "apply"
    inner = _Inner(clock, takes_s, fails)
    pending = _FTPending(ft, inner, quorum_id=5, seq=2, members=3, numel=4, device=torch.device("cpu"))  # type: ignore[arg-type]
    mean = pending.wait(10.0)
    assert inner.timeouts == [10.0]
    assert decisions == [(5, 2, 3, not fails, expected_wait)]
    assert pending.dropped == fails
    if fails:
        assert torch.isnan(mean).all() and ft.stats.failed_waits == 1 and ft.stats.dropped_by_vote == 1
    else:
        assert torch.equal(mean, torch.ones(4))


def test_no_timeout_given_means_the_workers_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr("eagerloco.ft.manager.time.perf_counter", lambda: clock[0])
    decisions: list[tuple[Any, ...]] = []
    ft = SimpleNamespace(timeout_s=30.0, stats=FaultToleranceStats(), _forget=lambda item: None)
    ft._decide = lambda *args: decisions.append(args) or "drop"
    inner = _Inner(clock, 1.0, False)
    pending = _FTPending(ft, inner, quorum_id=1, seq=0, members=2, numel=4, device=torch.device("cpu"))  # type: ignore[arg-type]
    assert torch.isnan(pending.wait()).all()  # success here, but another member's vote said drop
    assert inner.timeouts == [30.0] and decisions == [(1, 0, 2, True, 29.0)]
    assert pending.dropped and ft.stats.dropped_by_vote == 1 and ft.stats.failed_waits == 0
