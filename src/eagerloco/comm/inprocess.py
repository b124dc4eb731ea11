"""M workers simulated inside one process: a research backend with the same engine as the real one.

Each simulated worker is a thread that runs an ordinary training loop with its own model, inner optimizer and
:class:`eagerloco.DiLoCo` wrapper. The workers meet in an :class:`InProcessGroup`, whose collectives match the
n-th collective of every rank (the same rule as gloo and NCCL) and complete when the last rank has launched its
part. Results are computed once, in rank order and in the input dtype (fp32 for outer gradients), so every
worker gets bit-identical results, and they agree with a real multi-process gloo run within float rounding
(bitwise for M = 2, where the two-term sum has one order).

Threads rather than one sequential loop, because a worker that waits on a collective must not stop the other
workers from reaching it: with sync DiLoCo, worker 0 waits at the end of its inner phase until worker 1 has
finished its own. PyTorch releases the GIL inside its kernels, so the threads do run in parallel; use
``torch.set_num_threads(max(1, cores // M))``.

Wrap the communicators in :class:`eagerloco.comm.link.EmulatedLink` to give the simulated link a bandwidth and a
latency.

Example::

    group = InProcessGroup(world_size=2)
    results = run_workers(group, lambda comm: train_one_worker(comm))   # one thread per worker
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from eagerloco.comm.base import CollectiveAborted, CollectiveTimeout, CommStats, Communicator, Work

T = TypeVar("T")


_MISSING = object()  # a rank that has not launched its part yet


class _Slot:
    """The meeting point of the n-th collective of every rank."""

    def __init__(self, seq: int, kind: str, world_size: int) -> None:
        self.seq = seq
        self.kind = kind
        self.inputs: list[Any] = [_MISSING] * world_size
        self.arrived = 0
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()


class _InProcessWork:
    def __init__(self, group: InProcessGroup, slot: _Slot, rank: int, deliver: Callable[[Any], None]) -> None:
        self._group = group
        self._slot = slot
        self._rank = rank
        self._deliver = deliver
        self._delivered = False

    def wait(self, timeout: float | None = None) -> None:
        if self._delivered:
            return
        timeout = self._group.default_timeout if timeout is None else timeout
        if not self._slot.done.wait(timeout):
            missing = [r for r, x in enumerate(self._slot.inputs) if x is _MISSING]
            raise CollectiveTimeout(
                f"in-process {self._slot.kind} #{self._slot.seq} waited {timeout} s on rank {self._rank}; "
                f"ranks that never launched it: {missing}"
            )
        if self._slot.error is not None:
            raise CollectiveAborted(
                f"in-process {self._slot.kind} #{self._slot.seq} aborted: {self._slot.error}"
            ) from self._slot.error
        self._deliver(self._slot.result)
        self._delivered = True

    def is_completed(self) -> bool:
        return self._delivered or self._slot.done.is_set()


class InProcessGroup:
    """The meeting point of M simulated workers. ``group.communicator(rank)`` is worker ``rank``'s endpoint.

    Args:
        world_size: number of simulated workers M.
        timeout: seconds a wait may block before :class:`CollectiveTimeout` (``None``: forever).
    """

    def __init__(self, world_size: int, timeout: float | None = None) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.default_timeout = timeout
        self._lock = threading.Lock()
        self._slots: dict[int, _Slot] = {}
        self._next_seq = [0] * world_size
        self._abort_error: BaseException | None = None
        self._communicators = [InProcessCommunicator(self, r) for r in range(world_size)]

    def communicator(self, rank: int) -> InProcessCommunicator:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        return self._communicators[rank]

    def abort(self, error: BaseException) -> None:
        """Fail every pending and future collective (a worker died): nobody stays blocked."""
        with self._lock:
            if self._abort_error is None:
                self._abort_error = error
            slots = list(self._slots.values())
            self._slots.clear()
        for slot in slots:
            slot.error = error
            slot.done.set()

    def _launch(self, rank: int, kind: str, payload: Any, reduce: Callable[[list[Any]], Any]) -> _Slot:
        with self._lock:
            seq = self._next_seq[rank]
            self._next_seq[rank] += 1
            slot = self._slots.get(seq)
            if slot is None:
                slot = self._slots[seq] = _Slot(seq, kind, self.world_size)
            if self._abort_error is not None:
                slot.error = self._abort_error
                slot.done.set()
                return slot
            if slot.kind != kind:
                error = RuntimeError(
                    f"collective mismatch at #{seq}: rank {rank} launched {kind}, another rank {slot.kind} "
                    "(all workers must issue the same collectives in the same order)"
                )
                slot.error = error
                slot.done.set()
                raise error
            first = next((x for x in slot.inputs if x is not _MISSING), _MISSING)
            if isinstance(first, torch.Tensor) and (first.shape != payload.shape or first.dtype != payload.dtype):
                raise RuntimeError(
                    f"collective mismatch at #{seq} ({kind}): rank {rank} sent {tuple(payload.shape)} "
                    f"{payload.dtype}, another rank {tuple(first.shape)} {first.dtype}"
                )
            # The engine never writes a buffer between launch and wait, so holding a reference is safe
            # (as with gloo, which reads the caller's buffer in the background).
            slot.inputs[rank] = payload
            slot.arrived += 1
            complete = slot.arrived == self.world_size
            if complete:
                del self._slots[seq]
        if complete:
            try:
                slot.result = reduce(slot.inputs)
            except BaseException as exc:  # pragma: no cover - surfaced to every waiter
                slot.error = exc
            slot.done.set()
        return slot


class InProcessCommunicator(Communicator):
    """Worker ``rank``'s endpoint in an :class:`InProcessGroup`."""

    def __init__(self, group: InProcessGroup, rank: int) -> None:
        self._group = group
        self.rank = rank
        self.world_size = group.world_size
        self.stats = CommStats()

    @property
    def default_timeout(self) -> float | None:  # type: ignore[override]
        return self._group.default_timeout

    @property
    def backend(self) -> str:
        return "inprocess"

    def all_reduce_sum(self, tensor: torch.Tensor) -> Work:
        self.stats.record("all_reduce", tensor.numel() * tensor.element_size(), self.world_size)

        def reduce(inputs: list[torch.Tensor]) -> torch.Tensor:
            total = inputs[0].clone()
            for x in inputs[1:]:  # rank order: every worker receives the same bits
                total.add_(x)
            return total

        slot = self._group._launch(self.rank, "all_reduce", tensor, reduce)
        return _InProcessWork(self._group, slot, self.rank, lambda result: tensor.copy_(result))

    def all_gather(self, output: torch.Tensor, tensor: torch.Tensor) -> Work:
        if output.shape[0] != self.world_size or output.numel() != tensor.numel() * self.world_size:
            raise ValueError(
                f"all_gather output must have shape ({self.world_size}, {tuple(tensor.shape)}), "
                f"got {tuple(output.shape)}"
            )
        self.stats.record("all_gather", tensor.numel() * tensor.element_size(), self.world_size)

        def gather(inputs: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack([x.reshape(-1) for x in inputs])

        slot = self._group._launch(self.rank, "all_gather", tensor, gather)
        return _InProcessWork(
            self._group, slot, self.rank, lambda result: output.view(self.world_size, -1).copy_(result)
        )

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> Work:
        self.stats.record("broadcast", tensor.numel() * tensor.element_size(), self.world_size, self.rank == src)

        def pick(inputs: list[torch.Tensor]) -> torch.Tensor:
            return inputs[src].clone()

        slot = self._group._launch(self.rank, f"broadcast(src={src})", tensor, pick)
        return _InProcessWork(self._group, slot, self.rank, lambda result: tensor.copy_(result))

    def all_gather_object(self, obj: Any) -> list[Any]:
        objects: list[Any] = []
        slot = self._group._launch(self.rank, "all_gather_object", obj, list)
        _InProcessWork(self._group, slot, self.rank, objects.extend).wait()
        return objects

    def diagnose_peers(self) -> str:
        """Exact in one process: the ranks that have issued fewer collectives than this one never reached the
        collective this rank waits on (they died, hang or run behind)."""
        with self._group._lock:
            issued = list(self._group._next_seq)
        behind = [r for r, n in enumerate(issued) if n < issued[self.rank]]
        if not behind:
            return "every rank has issued as many collectives as this one"
        return f"peers that did not answer: ranks {behind} (collectives issued per rank: {issued})"


def run_workers(
    group: InProcessGroup,
    worker: Callable[[InProcessCommunicator], T],
    *,
    join_timeout: float | None = None,
) -> list[T]:
    """Run ``worker(communicator)`` for every rank of ``group``, one thread each, and return the results in rank
    order. If a worker raises, the group is aborted (so no other worker stays blocked in a collective) and the
    first error is re-raised here, with the failing rank in the message."""
    results: list[Any] = [None] * group.world_size
    errors: list[tuple[int, BaseException]] = []
    lock = threading.Lock()

    def body(rank: int) -> None:
        try:
            results[rank] = worker(group.communicator(rank))
        except BaseException as exc:
            with lock:
                errors.append((rank, exc))
            group.abort(exc)

    threads = [
        threading.Thread(target=body, args=(r,), name=f"eagerloco-worker-{r}", daemon=True)
        for r in range(group.world_size)
    ]
    for thread in threads:
        thread.start()
    deadline = None if join_timeout is None else time.monotonic() + join_timeout
    for thread in threads:
        thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            group.abort(CollectiveTimeout(f"run_workers: {thread.name} still running after {join_timeout} s"))
            raise CollectiveTimeout(f"run_workers: {thread.name} still running after {join_timeout} s")
    if errors:
        # The root cause is the first error that is not a consequence of the abort.
        errors.sort(key=lambda item: isinstance(item[1], CollectiveAborted))
        rank, exc = errors[0]
        raise RuntimeError(f"simulated worker {rank} failed: {type(exc).__name__}: {exc}") from exc
    return results
