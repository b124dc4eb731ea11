"""What the engine needs from a communication backend, and nothing more.

A :class:`Communicator` is one worker's handle on the outer process group: the group of M workers that exchange
outer gradients across the slow link. Every collective is *asynchronous*: it returns a :class:`Work` at once and
runs while the caller goes on computing; ``Work.wait()`` blocks until the result is in the caller's tensor.

Two implementations ship:

* :class:`eagerloco.comm.torch_dist.TorchDistributedCommunicator` -- ``torch.distributed`` (gloo across sites
  and on CPU, NCCL on GPU), one process per worker, launched by ``torchrun``.
* :class:`eagerloco.comm.inprocess.InProcessGroup` -- M workers simulated as threads of one process, for
  research on one machine. Same engine, same results within float tolerance.

and one wrapper, :class:`eagerloco.comm.link.EmulatedLink`, that adds a configurable latency and bandwidth to
any communicator (tc netem is not always available; this is the documented way to inject latency).

Invariant that every caller must respect (it is what keeps gloo and NCCL from deadlocking): all workers issue
the same collectives, with the same sizes, in the same order. The engine guarantees it by visiting fragments
in index order at every inner step.

Byte accounting. ``stats.payload_bytes`` counts the bytes of the tensors handed to collectives by this worker
(its contribution). ``stats.wire_bytes`` estimates the bytes this worker actually sends with the usual ring
algorithms: all-reduce 2(M-1)/M * n, all-gather (M-1) * n_in, broadcast n from the source. Both are exact
functions of what was passed to the collectives, not of what the caller meant to send.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Protocol

import torch


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within the configured timeout (a peer died, hung or is partitioned)."""


class CollectiveAborted(RuntimeError):
    """The group was aborted (another worker failed) while this collective was pending."""


class Work(Protocol):
    """Handle on an asynchronous collective."""

    def wait(self, timeout: float | None = None) -> None:
        """Block until the collective's result is in place; raise :class:`CollectiveTimeout` after ``timeout``
        seconds (``None``: the communicator's default)."""

    def is_completed(self) -> bool:
        """True when ``wait()`` would return at once."""


class CompletedWork:
    """A :class:`Work` that is already done (restored from a checkpoint, or a world of one)."""

    def wait(self, timeout: float | None = None) -> None:
        return None

    def is_completed(self) -> bool:
        return True


@dataclass
class CommStats:
    """Cumulative traffic of one worker, counted from the tensors passed to collectives."""

    collectives: int = 0
    """Number of collectives launched."""
    payload_bytes: int = 0
    """Bytes of this worker's contributions (input tensors) handed to collectives."""
    wire_bytes: int = 0
    """Bytes this worker sends on the wire under ring algorithms (see the module docstring)."""

    def record(self, kind: str, nbytes: int, world_size: int, is_source: bool = True) -> None:
        self.collectives += 1
        self.payload_bytes += nbytes
        self.wire_bytes += wire_bytes(kind, nbytes, world_size, is_source)


def wire_bytes(kind: str, nbytes: int, world_size: int, is_source: bool = True) -> int:
    """Bytes one worker sends for a collective whose per-worker input is ``nbytes``, with ring algorithms.

    all_reduce: 2(M-1)/M * n (reduce-scatter then all-gather). all_gather: (M-1) * n. broadcast: n for the
    source (a pipelined chain), 0 for the others.
    """
    m = world_size
    if m <= 1:
        return 0
    if kind == "all_reduce":
        return (2 * (m - 1) * nbytes) // m
    if kind == "all_gather":
        return (m - 1) * nbytes
    if kind == "broadcast":
        return nbytes if is_source else 0
    raise ValueError(f"unknown collective kind {kind!r}")


class Communicator(abc.ABC):
    """One worker's endpoint in the outer process group. See the module docstring for the contract."""

    rank: int
    world_size: int
    stats: CommStats
    default_timeout: float | None
    """Seconds a ``Work.wait()`` waits before raising :class:`CollectiveTimeout` (``None``: forever)."""
    fixed_membership: bool = True
    """False where the members change during the run (eagerloco.ft: ``world_size`` is the latest quorum's M_Q);
    the engine then checks no setting against one M (ALGORITHMS.md 4.1, 11)."""

    @property
    @abc.abstractmethod
    def backend(self) -> str:
        """Short name for reports: 'gloo', 'nccl', 'inprocess', ..."""

    @abc.abstractmethod
    def all_reduce_sum(self, tensor: torch.Tensor) -> Work:
        """Start summing ``tensor`` across workers, in place. The tensor must not be touched until ``wait``."""

    @abc.abstractmethod
    def all_gather(self, output: torch.Tensor, tensor: torch.Tensor) -> Work:
        """Start gathering every worker's ``tensor`` into ``output`` (shape ``(world_size, *tensor.shape)``),
        rank r's contribution at ``output[r]``."""

    @abc.abstractmethod
    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> Work:
        """Start overwriting ``tensor`` on every worker with worker ``src``'s tensor."""

    @abc.abstractmethod
    def all_gather_object(self, obj: Any) -> list[Any]:
        """Blocking: every worker's picklable ``obj``, in rank order (start-up checks only, never hot)."""

    def describe(self) -> str:
        return f"{self.backend} rank {self.rank}/{self.world_size}"

    def diagnose_peers(self) -> str:
        """After a collective failed: what this backend can tell about which peers did not answer, as one
        sentence for the error message. The default knows nothing beyond the group's other ranks; backends that
        can do better (heartbeats, the in-process group's bookkeeping) override it. Never raises, never hangs
        for more than a few seconds."""
        others = [r for r in range(self.world_size) if r != self.rank]
        return f"this backend cannot tell which of the other ranks {others} failed"
