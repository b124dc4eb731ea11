"""Averaging outer gradients across workers: the seam where compression plugs in.

The engine hands each fragment's outer gradient Δ_m (a flat fp32 tensor) to a :class:`Reducer` and gets back a
:class:`PendingMean`, whose ``wait()`` returns the average Δ = (1/M) Σ_m Δ_m as every worker received it. The
plain :class:`MeanReducer` all-reduces fp32 and divides by M; the codecs of :mod:`eagerloco.compression` send
encoded values instead and accumulate the decoded ones in fp32.

Contract of ``Reducer.launch(delta)``:

* It may add state it carries (the error-feedback residual) into ``delta`` in place; after the call ``delta`` is
  exactly this worker's contribution *before* encoding. Eager mode applies that tensor at once and subtracts it
  when the average arrives (ALGORITHMS.md, section 7).
* It neither writes nor reads ``delta`` after returning: the collective works on a buffer of its own, so the
  caller may keep, read and modify ``delta`` (eager mode scales it by 1/M in place) while it is in flight.
* ``PendingMean.payload_bytes`` is the number of bytes this worker handed to collectives for it.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from eagerloco.comm.base import Communicator, Work


class PendingMean(Protocol):
    """An average in flight."""

    payload_bytes: int
    """Bytes this worker passed to collectives for this average."""

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        """Block until the average has arrived and return it (flat fp32). Idempotent."""

    def is_completed(self) -> bool:
        """True when ``wait()`` would return at once."""


class Reducer(Protocol):
    """Averages one fragment's outer gradients across workers. One instance per fragment (it may carry state)."""

    name: str

    def launch(self, delta: torch.Tensor) -> PendingMean:
        """Start averaging ``delta`` across workers; see the module docstring for the contract."""

    def state_dict(self) -> dict[str, Any]:
        """State carried between outer steps (e.g. the error-feedback residual), for checkpoints."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CompletedMean:
    """A :class:`PendingMean` whose value is known (restored from a checkpoint)."""

    def __init__(self, mean: torch.Tensor, payload_bytes: int = 0) -> None:
        self._mean = mean
        self.payload_bytes = payload_bytes

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        return self._mean

    def is_completed(self) -> bool:
        return True


class _PendingAllReduce:
    def __init__(self, work: Work, buffer: torch.Tensor, world_size: int, payload_bytes: int) -> None:
        self._work = work
        self._buffer = buffer
        self._world_size = world_size
        self._mean: torch.Tensor | None = None
        self.payload_bytes = payload_bytes

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        if self._mean is None:
            self._work.wait(timeout)
            self._mean = self._buffer.div_(self._world_size)
        return self._mean

    def is_completed(self) -> bool:
        return self._mean is not None or self._work.is_completed()


class MeanReducer:
    """Full-precision average: one fp32 all-reduce (sum) of the fragment's flat outer gradient, divided by M."""

    name = "none"

    def __init__(self, comm: Communicator) -> None:
        self.comm = comm

    def launch(self, delta: torch.Tensor) -> PendingMean:
        buffer = delta.clone()  # the all-reduce overwrites its buffer in place; `delta` stays the caller's
        work = self.comm.all_reduce_sum(buffer)
        return _PendingAllReduce(work, buffer, self.comm.world_size, buffer.numel() * buffer.element_size())

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
