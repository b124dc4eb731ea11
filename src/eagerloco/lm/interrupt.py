"""Ctrl+C / SIGTERM for ``eagerloco train``: stop at the next safe point, agreed by every worker, checkpoint, exit.

A signal only sets a flag (:class:`StopSignal`). The workers then have to agree on *where* to stop, because the
final checkpoint is itself collective (it waits for the averages in flight and ends with a barrier): if worker 0
stopped at inner step 60 and worker 1 at 90, worker 0 would wait in its checkpoint for a collective worker 1
issues elsewhere. :class:`AgreedStop` settles it with one 4-byte all-reduce per outer step on a *separate* control
group (its own gloo connections, so it never queues behind an outer gradient on the data path and is never slowed
by the emulated link): at every outer boundary b (every H inner steps) each worker launches the sum of its flag
(asynchronously), and at boundary b + 1 it waits for the sum launched at b -- long complete by then. Every worker
reads the same sums at the same boundaries, so all of them stop at the same inner step, at most 2·H inner steps
after the signal. They write a checkpoint there (without finalize: the averages in flight are stored by value, so
``--resume`` continues bitwise like an uninterrupted run) and exit with 128 + the signal number and one line.

A second signal more than :attr:`StopSignal.grace_s` seconds after the first aborts at once (KeyboardInterrupt):
the way out when a peer is gone and the safe point never comes. Signals closer together count as one, because a
Ctrl+C in a terminal reaches every process of the foreground group and launchers forward it too (torchrun sends
SIGTERM after the SIGINT, ``--launch processes`` forwards what it receives).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch

from eagerloco.comm.base import Communicator, Work


class TrainingInterrupted(Exception):
    """Training stopped on a signal at an agreed safe point; a checkpoint was written there."""

    def __init__(self, signum: int, inner_step: int, checkpoint: str | None) -> None:
        self.signum = signum
        self.inner_step = inner_step
        self.checkpoint = checkpoint
        name = signal.Signals(signum).name if signum > 0 else "a peer's signal"
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint"
        super().__init__(f"interrupted ({name}): stopped at inner step {inner_step}, {where}; continue with --resume")

    @property
    def exit_code(self) -> int:
        """128 + the signal number, the shell's convention (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + (self.signum if self.signum > 0 else signal.SIGTERM)


class StopSignal:
    """Process-wide flag set by SIGINT/SIGTERM (see the module docstring). Thread-safe to read."""

    grace_s = 5.0
    """A signal later than this after the first one aborts at once."""

    def __init__(self) -> None:
        self.signum = 0
        self._first_at: float | None = None
        self._lock = threading.Lock()

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def request(self, signum: int) -> None:
        """What the handler does; callable directly (tests, a peer's request)."""
        with self._lock:
            if self._first_at is None:
                self.signum = signum
                self._first_at = time.monotonic()
                return
            late = time.monotonic() - self._first_at > self.grace_s
        if late:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting without a checkpoint")

    def _handler(self, signum: int, frame: Any) -> None:
        self.request(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignal]:
        """Handle SIGINT and SIGTERM while inside (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


class AgreedStop:
    """Per worker: decides, identically on every worker, whether to stop at an outer boundary.

    Args:
        control: a communicator on a control group of its own (not the data path's).
        stop: the process's :class:`StopSignal`.
        timeout: seconds to wait for a control sum (it was launched one outer step earlier).

    Collective order: :meth:`at_boundary` must be called at the same inner steps on every worker (the training
    loop calls it at every multiple of H); it issues exactly one all-reduce on the control group per call.
    """

    def __init__(self, control: Communicator, stop: StopSignal, timeout: float | None) -> None:
        self.control = control
        self.stop = stop
        self.timeout = timeout
        self._pending: deque[tuple[Work, torch.Tensor]] = deque()

    def at_boundary(self) -> int:
        """Launch this worker's flag; return the signal number to stop on (0: go on). The decision uses the sums
        launched one boundary earlier: the same on every worker."""
        flag = torch.tensor([float(self.stop.signum)], dtype=torch.float64)
        self._pending.append((self.control.all_reduce_sum(flag), flag))
        if len(self._pending) < 2:
            return 0
        work, total = self._pending.popleft()
        work.wait(self.timeout)
        value = int(total.item())
        if value == 0:
            return 0
        # Several workers may hold different signals: report this worker's own, else a peer's (-1).
        return self.stop.signum or -1
