"""An emulated slow link: latency and bandwidth added to any communicator.

``tc netem`` is not available everywhere (it is missing on the project's CI machines), and the in-process
simulation has no network at all. :class:`EmulatedLink` wraps a :class:`Communicator` and makes each collective
complete no earlier than it would on a link of the given rate and one-way latency. The link is a FIFO queue per
worker: a transfer starts serialising when the previous one has left the sender, so a backlog builds up exactly as
it would on a real link when outer gradients are produced faster than the link drains them; latency delays each
transfer's arrival but does not occupy the link (transfers are pipelined):

    start_i  = max(launch_i, start_{i-1} + serialise_{i-1})      serialise_i = wire_bytes_i * 8 / rate
    finish_i = start_i + serialise_i + latency

``wire_bytes`` is what this worker sends with ring algorithms (``eagerloco.comm.base.wire_bytes``). The real
collective still runs underneath and its result is what ``wait`` delivers; only the completion time is held back.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from eagerloco.comm.base import CollectiveTimeout, Communicator, Work, wire_bytes


class _DelayedWork:
    """The inner collective's work, delivered no earlier than ``finish_at`` (``time.perf_counter()`` seconds)."""

    def __init__(self, inner: Work, finish_at: float, default_timeout: float | None) -> None:
        self._inner = inner
        self._finish_at = finish_at
        self._default_timeout = default_timeout

    def wait(self, timeout: float | None = None) -> None:
        """Wait for the inner collective, then until the link delivers it. ``timeout`` (default: the inner
        communicator's) bounds the whole wait: a delivery later than that raises :class:`CollectiveTimeout` once
        the timeout has passed, never after sleeping past it."""
        limit = self._default_timeout if timeout is None else timeout
        deadline = None if limit is None else time.perf_counter() + limit
        self._inner.wait(limit)
        now = time.perf_counter()
        remaining = self._finish_at - now
        if remaining <= 0:
            return
        if deadline is not None and self._finish_at > deadline:
            time.sleep(max(0.0, deadline - now))
            raise CollectiveTimeout(
                f"the emulated link delivers this collective {remaining:.3g} s from now, after the timeout of {limit} s"
            )
        time.sleep(remaining)

    def is_completed(self) -> bool:
        return time.perf_counter() >= self._finish_at and self._inner.is_completed()


class EmulatedLink(Communicator):
    """Wraps ``inner`` so that each collective takes ``wire_bytes * 8 / bandwidth_bps + latency_s`` on a FIFO link.

    Args:
        inner: the communicator that really moves the data.
        bandwidth_bps: link rate in bits per second (``None``: unlimited).
        latency_s: one-way latency added to every collective, in seconds.
    """

    def __init__(self, inner: Communicator, bandwidth_bps: float | None = None, latency_s: float = 0.0) -> None:
        if bandwidth_bps is not None and not bandwidth_bps > 0:
            raise ValueError(f"bandwidth_bps must be > 0 bits/s or None (unlimited), got {bandwidth_bps}")
        if not latency_s >= 0:
            raise ValueError(f"latency_s must be >= 0 seconds, got {latency_s}")
        self.inner = inner
        self.bandwidth_bps = bandwidth_bps
        self.latency_s = latency_s
        self.rank = inner.rank
        self.world_size = inner.world_size
        self.fixed_membership = getattr(inner, "fixed_membership", True)
        self.stats = inner.stats
        self._link_free_at = 0.0
        self._lock = threading.Lock()

    @property
    def default_timeout(self) -> float | None:  # type: ignore[override]
        return self.inner.default_timeout

    @property
    def backend(self) -> str:
        rate = "unlimited" if self.bandwidth_bps is None else f"{self.bandwidth_bps / 1e6:g} Mbit/s"
        return f"{self.inner.backend}+link({rate}, {self.latency_s * 1e3:g} ms)"

    def serialise_seconds(self, kind: str, nbytes: int, is_source: bool = True) -> float:
        """Time one collective of this worker occupies the link: wire bytes · 8 / rate."""
        sent = wire_bytes(kind, nbytes, self.world_size, is_source)
        return 0.0 if self.bandwidth_bps is None else sent * 8 / self.bandwidth_bps

    def _schedule(self, kind: str, tensor: torch.Tensor, is_source: bool = True) -> float:
        serialise = self.serialise_seconds(kind, tensor.numel() * tensor.element_size(), is_source)
        with self._lock:
            start = max(time.perf_counter(), self._link_free_at)
            self._link_free_at = start + serialise
            return self._link_free_at + self.latency_s

    def all_reduce_sum(self, tensor: torch.Tensor) -> Work:
        finish = self._schedule("all_reduce", tensor)
        return _DelayedWork(self.inner.all_reduce_sum(tensor), finish, self.default_timeout)

    def all_gather(self, output: torch.Tensor, tensor: torch.Tensor) -> Work:
        finish = self._schedule("all_gather", tensor)
        return _DelayedWork(self.inner.all_gather(output, tensor), finish, self.default_timeout)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> Work:
        finish = self._schedule("broadcast", tensor, self.rank == src)
        return _DelayedWork(self.inner.broadcast(tensor, src), finish, self.default_timeout)

    def all_gather_object(self, obj: Any) -> list[Any]:
        return self.inner.all_gather_object(obj)

    def diagnose_peers(self) -> str:
        return self.inner.diagnose_peers()
