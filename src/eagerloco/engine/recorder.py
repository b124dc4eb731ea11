"""The measurements of a training loop, apart from the algorithm (ALGORITHMS.md, section 10).

One :class:`Recorder` per engine (:class:`eagerloco.DiLoCo` and the data-parallel
:class:`eagerloco.engine.data_parallel.GradientAverager` alike) holds the clock, the run's :class:`RunStats`
and the per-outer-step :class:`OuterStepRecord` list. The engine calls it at a few named points and never reads
a clock itself:

* :meth:`Recorder.enter` / :meth:`Recorder.exit` around every engine call (``step()``, ``finalize()``,
  ``average_gradients()``): the time between two calls is inner compute, the time inside is blocked or overhead;
* :meth:`Recorder.open` / :meth:`Recorder.close` around the outer work of one call (one record);
* :meth:`Recorder.blocked` (seconds spent waiting on a collective), :meth:`Recorder.launched` (an outer
  gradient handed to a reducer), :meth:`Recorder.applied` (an outer gradient applied to φ),
  :meth:`Recorder.skipped`, :meth:`Recorder.traffic`, :meth:`Recorder.diagnostic`, :meth:`Recorder.divergence`.

What a training loop uses is the :class:`Measured` protocol, which the recorder, ``DiLoCo`` and
``GradientAverager`` all implement: ``stats``, ``records``, ``paused()``, ``reset_clock()``,
``add_record_listener()`` and ``elapsed_s()`` (the loop's wall clock with the paused time taken out).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from eagerloco.engine.metrics import OuterStepRecord, RunStats

if TYPE_CHECKING:
    import torch

    from eagerloco.comm.base import Communicator

RecordListener = Callable[[OuterStepRecord], None]


@runtime_checkable
class Measured(Protocol):
    """What a training loop reads from an engine's measurements (``DiLoCo``, ``GradientAverager``, ``Recorder``).

    * ``stats``: the run's totals (:class:`RunStats`), since creation or the last ``reset_clock()``;
    * ``records``: one :class:`OuterStepRecord` per call with outer work (empty for data parallelism);
    * ``paused()``: a context manager; time inside counts neither as compute nor as wall time (evaluation,
      checkpointing, logging). Nesting is allowed: only the outermost one counts;
    * ``reset_clock()``: restart the measurements (after warm-up, after loading a checkpoint);
    * ``add_record_listener(fn)``: ``fn(record)`` for every new record (metrics logging);
    * ``elapsed_s()``: wall seconds since the last ``reset_clock()`` with the paused time taken out (frozen while
      paused): the loop's clock for logs.
    """

    @property
    def stats(self) -> RunStats: ...

    @property
    def records(self) -> list[OuterStepRecord]: ...

    def paused(self) -> AbstractContextManager[None]: ...

    def reset_clock(self) -> None: ...

    def add_record_listener(self, listener: RecordListener) -> None: ...

    def elapsed_s(self) -> float: ...


class Recorder:
    """The clock, totals and records of one engine on one worker (see the module docstring).

    Args:
        comm: the engine's communicator; a record's ``wire_bytes`` is the growth of ``comm.stats.wire_bytes``
            during it (diagnostic traffic excluded). Only needed when records are opened.
    """

    def __init__(self, comm: Communicator | None = None) -> None:
        self._comm = comm
        self.stats = RunStats()
        self.records: list[OuterStepRecord] = []
        self._listeners: list[RecordListener] = []
        self._record: OuterStepRecord | None = None
        # The current window: from the end of the previous record to now (a record's utilization).
        self._window_inner_s = 0.0
        self._window_wall_s = 0.0
        self._window_mark = 0.0
        # The current engine call.
        self._enter = 0.0
        self._blocked_in_call = 0.0
        self._last_exit = time.perf_counter()
        # The record's starting counters (its wire bytes are the difference).
        self._wire_start = 0
        self._diagnostic_start = 0
        # elapsed_s(): the loop's clock without the paused time.
        self._started = self._last_exit
        self._paused_s = 0.0
        self._paused_since: float | None = None
        self._pause_depth = 0

    # ------------------------------------------------------------------ Measured

    def reset_clock(self, inner_steps: int | None = None) -> None:
        """Restart the measurements; ``stats.inner_steps`` becomes ``inner_steps`` (default: unchanged)."""
        self.stats = RunStats(inner_steps=self.stats.inner_steps if inner_steps is None else inner_steps)
        self.records = []
        self._window_inner_s = self._window_wall_s = 0.0
        self._last_exit = self._started = time.perf_counter()
        self._paused_s = 0.0
        self._paused_since = self._started if self._pause_depth else None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside counts neither as compute nor as wall time. Re-entrant: only the outermost counts."""
        self._pause_depth += 1
        if self._pause_depth == 1:
            self._paused_since = time.perf_counter()
        try:
            yield
        finally:
            self._pause_depth -= 1
            if self._pause_depth == 0:
                assert self._paused_since is not None
                duration = time.perf_counter() - self._paused_since
                self._last_exit += duration  # the next enter() sees no inner time for the pause
                self._paused_s += duration
                self._paused_since = None

    def add_record_listener(self, listener: RecordListener) -> None:
        """Call ``listener(record)`` for every record closed from now on."""
        self._listeners.append(listener)

    def elapsed_s(self) -> float:
        """Wall seconds since creation or :meth:`reset_clock`, paused time excluded (frozen while paused)."""
        now = time.perf_counter() if self._paused_since is None else self._paused_since
        return now - self._started - self._paused_s

    # ------------------------------------------------------------------ the engine's calls

    def enter(self, at: float | None = None) -> None:
        """Start of an engine call: the time since the previous call was inner compute. ``at``: when the call
        really began (a ``time.perf_counter()`` value), if before now: DDP waits for its last all-reduce inside
        ``backward()``, from the launch of its last bucket on, and that wait is the engine's, not compute."""
        enter = time.perf_counter() if at is None else at
        inner = enter - self._last_exit
        self.stats.inner_s += inner
        self._window_inner_s += inner
        self._window_wall_s += inner
        self._window_mark = self._enter = enter
        self._blocked_in_call = 0.0

    def exit(self) -> None:
        """End of an engine call: the time inside that was not blocked is overhead."""
        exit_ = time.perf_counter()
        self.stats.overhead_s += (exit_ - self._enter) - self._blocked_in_call
        self._window_wall_s += exit_ - self._window_mark
        self._last_exit = exit_

    def open(self, inner_step: int, kind: str = "step") -> None:
        """Start the record of this call's outer work (kind 'step' or 'finalize')."""
        self._record = OuterStepRecord(inner_step=inner_step, kind=kind)
        self._wire_start = self._comm.stats.wire_bytes if self._comm is not None else 0
        self._diagnostic_start = self.stats.diagnostic_bytes

    def close(self) -> OuterStepRecord | None:
        """Finish the open record: its window runs from the previous record's end to now. A 'finalize' record adds
        the call's blocked time to ``stats.finalize_blocked_s`` and is dropped when it applied nothing."""
        record = self._record
        assert record is not None, "close() without open()"
        self._record = None
        if record.kind == "finalize":
            self.stats.finalize_blocked_s += self._blocked_in_call
            if not record.fragments_applied:
                return None
        now = time.perf_counter()
        in_call = now - self._window_mark
        record.overhead_s = max(0.0, in_call - record.blocked_s)
        record.window_inner_s = self._window_inner_s
        record.window_wall_s = self._window_wall_s + in_call
        record.utilization = record.window_inner_s / record.window_wall_s if record.window_wall_s > 0 else 1.0
        diagnostic = self.stats.diagnostic_bytes - self._diagnostic_start
        wire_now = self._comm.stats.wire_bytes if self._comm is not None else 0
        record.wire_bytes = wire_now - self._wire_start - diagnostic
        if record.kind == "step":
            self.stats.outer_steps += 1
        self.stats.payload_bytes += record.payload_bytes
        self.stats.wire_bytes += record.wire_bytes
        self.records.append(record)
        for listener in self._listeners:
            listener(record)
        self._window_inner_s = 0.0
        self._window_wall_s = 0.0
        self._window_mark = now
        return record

    @property
    def record(self) -> OuterStepRecord | None:
        """The open record, if any."""
        return self._record

    # ------------------------------------------------------------------ named points of the algorithm

    def blocked(self, seconds: float) -> None:
        """``seconds`` spent waiting on a collective (counted even outside a record, e.g. in ``state_dict``)."""
        self.stats.blocked_s += seconds
        self._blocked_in_call += seconds
        if self._record is not None:
            self._record.blocked_s += seconds

    def waited(self, seconds: float) -> None:
        """``seconds`` spent waiting for an average: blocked time, and inside ``step()`` one of the run's
        ``outer_waits`` (the final drain's waits are not: steady-state CU counts them from the launches)."""
        self.blocked(seconds)
        if self._record is not None and self._record.kind == "step":
            self.stats.outer_waits += 1
            self.stats.outer_wait_s += seconds

    def launched(self, fragment: int, payload_bytes: int, delta: torch.Tensor | None) -> None:
        """Fragment ``fragment`` handed its outer gradient ``delta`` (``None``: it was not finite) to its reducer,
        which passes ``payload_bytes`` to collectives."""
        self.stats.outer_launches += 1
        record = self._record
        if record is None:
            return
        record.fragments_synced.append(fragment)
        record.payload_bytes += payload_bytes
        if delta is not None:
            record.delta_norm = math.hypot(record.delta_norm, float(delta.norm()))

    def applied(self, fragment: int, g: torch.Tensor | None = None, staleness: int | None = None) -> None:
        """Fragment ``fragment``'s φ moved by the outer gradient ``g``, launched ``staleness`` inner steps ago
        (``g``/``staleness`` ``None``: not measured, the final drain's plain steps)."""
        record = self._record
        if record is None:
            return
        record.fragments_applied.append(fragment)
        if g is not None:
            record.applied_norm = math.hypot(record.applied_norm, float(g.norm()))
        if staleness is not None:
            record.staleness = max(record.staleness, staleness)

    def skipped(self) -> None:
        """An average was not applied because it held NaN/Inf (``nonfinite='skip'``)."""
        self.stats.skipped_outer_steps += 1
        if self._record is not None:
            self._record.skipped = True

    def dropped(self) -> None:
        """An average was not applied because fault tolerance dropped it (a member failed or the membership
        changed: ALGORITHMS.md section 11)."""
        self.stats.dropped_averages += 1
        if self._record is not None:
            self._record.dropped = True

    def traffic(self, payload_bytes: int, wire_bytes: int) -> None:
        """Bytes of the algorithm's traffic counted outside records (data parallelism: one all-reduce per step)."""
        self.stats.payload_bytes += payload_bytes
        self.stats.wire_bytes += wire_bytes

    def diagnostic(self, wire_bytes: int) -> None:
        """Bytes of diagnostic traffic (divergence, consolidation): not part of the algorithm's."""
        self.stats.diagnostic_bytes += wire_bytes

    def divergence(self, absolute: float, relative: float) -> None:
        """‖φ_m − mean φ‖ measured in this call."""
        if self._record is not None:
            self._record.divergence = absolute
            self._record.divergence_rel = relative
