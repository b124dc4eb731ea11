"""Outer collectives over ``torch.distributed``: gloo across sites and on CPU, NCCL on GPUs.

Collectives are issued with ``async_op=True``: gloo runs them on its own worker threads and NCCL on its own
stream, so the transfer really proceeds while the next inner steps compute. ``Work.wait(timeout)`` bounds every
wait; a peer that died makes the survivors raise :class:`CollectiveTimeout` instead of hanging (gloo reports a
closed connection at once; a hung peer is caught by the timeout). Blocking object collectives (start-up checks,
checkpoint barriers) are bounded by the process group's own timeout: initialise it with
``init_process_group(..., timeout=timedelta(seconds=...))``.

Which peer failed? gloo's error names a socket address, not a rank. Each communicator therefore runs a heartbeat
(a daemon thread adding 1 to the key ``eagerloco/heartbeat/<global rank>`` of the process group's store every
0.25 s, until the process group is destroyed). After a failure
:meth:`TorchDistributedCommunicator.diagnose_peers` reads every rank's counter twice, 1 s apart: ranks whose counter
did not move did not answer. If the store itself is unreachable, its host died
(rank 0 under ``env://`` launches; torchrun's agent and ``eagerloco train --launch processes`` host it outside
the workers, so it outlives any of them) and the message says so.

Launch with ``torchrun`` (one process per worker, or per rank when a worker is a group of ranks) and pass the
process group that joins the workers (default: the world group)::

    torchrun --nproc-per-node 2 train.py            # one machine
    torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:29400 train.py   # two sites
"""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from eagerloco.comm.base import CollectiveTimeout, CommStats, Communicator, Work

_PEER_FAILURE_WORDS = ("timed out", "timeout", "connection", "closed", "reset by peer", "broken pipe", "socket",
                       "abort")  # fmt: skip


def is_peer_failure(exc: BaseException) -> bool:
    """True for the errors gloo and NCCL raise when a peer died, hung or is unreachable (not for misuse such as
    mismatched tensor sizes, which stays a plain RuntimeError)."""
    text = str(exc).lower()
    return any(word in text for word in _PEER_FAILURE_WORDS)


def first_line(exc: BaseException) -> str:
    """gloo's messages start with a source path and end with an emoji; keep the sentence that matters."""
    line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if line.startswith("[") and "] " in line:
        line = line.split("] ", 1)[1]
    return line.split(" This is typically caused", 1)[0]


class _Heartbeat:
    """One per process and store: bumps ``eagerloco/heartbeat/<global rank>`` every ``interval`` seconds, until
    :func:`stop_heartbeats`, the process group's ``destroy_process_group()`` or the interpreter's exit.

    Shutdown invariant: at interpreter exit no heartbeat may be inside a store call. A store call releases the GIL;
    a daemon thread that tries to take it back once finalization has begun is ended by ``pthread_exit``, whose
    unwinding through pybind11's GIL guard (a noexcept destructor) aborts the process with "terminate called
    without an active exception", after the worker's work is done. So the thread stops on its own at its next beat
    once the default process group is destroyed, and the exit hook waits up to ``exit_join_s`` for a call in
    flight (a store op takes milliseconds; seconds only on a machine so loaded that the store's host thread is
    starved)."""

    interval = 0.25
    exit_join_s = 5.0
    _instances: ClassVar[dict[int, _Heartbeat]] = {}
    _lock = threading.Lock()

    def __init__(self, store: Any, global_rank: int) -> None:
        self.store = store
        self.global_rank = global_rank
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="eagerloco-heartbeat", daemon=True)
        self._thread.start()

    @classmethod
    def for_store(cls, store: Any, global_rank: int) -> _Heartbeat:
        with cls._lock:
            if not cls._instances:
                atexit.register(cls.stop_all)
            beat = cls._instances.get(id(store))
            if beat is None or beat._stop.is_set():
                beat = cls._instances[id(store)] = cls(store, global_rank)
            return beat

    @classmethod
    def stop_all(cls) -> None:
        """Stop and join every heartbeat (at exit, before the stores go away: no thread is left inside a store
        call while the interpreter and the process group are torn down)."""
        with cls._lock:
            beats = list(cls._instances.values())
            cls._instances.clear()
        for beat in beats:
            beat._stop.set()
        for beat in beats:
            beat._thread.join(timeout=cls.exit_join_s)  # returns at once unless a store call is in flight

    @staticmethod
    def key(global_rank: int) -> str:
        return f"eagerloco/heartbeat/{global_rank}"

    @staticmethod
    def failed_key(global_rank: int) -> str:
        return f"eagerloco/failed/{global_rank}"

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if not dist.is_initialized():  # destroy_process_group(): nothing left to diagnose; leave the store
                self._stop.set()
                break
            try:
                self.store.add(self.key(self.global_rank), 1)
            except Exception:  # the store is gone: nothing left to report to
                self._stop.set()

    def counters(self, global_ranks: list[int]) -> list[int]:
        return [int(self.store.add(self.key(r), 0)) for r in global_ranks]


def stop_heartbeats() -> None:
    """Stop and join this process's heartbeat threads now (each also stops within one beat of
    ``destroy_process_group()``, and at exit)."""
    _Heartbeat.stop_all()


class TorchWork:
    """Adapts a ``torch.distributed`` work handle to :class:`eagerloco.comm.base.Work`, with a timeout that
    names the operation and the group. A failure that :meth:`is_failure` accepts (a timeout, a dead peer) becomes
    :class:`CollectiveTimeout`; anything else propagates as it is."""

    def __init__(self, work: Any, what: str, default_timeout: float | None) -> None:
        self._work = work
        self._what = what
        self._default_timeout = default_timeout
        self._done = False

    @staticmethod
    def is_failure(exc: Exception) -> bool:
        """gloo and NCCL report timeouts and dead peers as RuntimeError with recognizable messages."""
        return isinstance(exc, RuntimeError) and is_peer_failure(exc)

    def wait(self, timeout: float | None = None) -> None:
        if self._done:
            return
        timeout = self._default_timeout if timeout is None else timeout
        start = time.monotonic()
        try:
            if timeout is None:
                self._work.wait()
            else:
                self._work.wait(timeout=timedelta(seconds=timeout))
        except Exception as exc:
            if not self.is_failure(exc):
                raise
            waited = time.monotonic() - start
            message = f"{self._what} failed after {waited:.1f} s (limit {timeout} s): {first_line(exc)}"
            raise CollectiveTimeout(message) from exc
        self._done = True

    def is_completed(self) -> bool:
        return self._done or bool(self._work.is_completed())


EXCHANGE_TAG = 0x10C0
"""The point-to-point tag of :func:`exchange_all_gather` (one tag: every worker posts its exchanges in the same
order and gloo matches a pair's messages of one tag in that order)."""


class _WorkGroup:
    """Several ``torch.distributed`` works as one: ``wait`` waits for all of them within one deadline. ``error``: a
    failure raised while posting them, which ``wait`` raises (where a collective's failure surfaces)."""

    def __init__(self, works: list[Any], error: Exception | None = None) -> None:
        self._works = works
        self._error = error

    def wait(self, timeout: timedelta | None = None) -> bool:
        if self._error is not None:
            raise self._error
        deadline = None if timeout is None else time.monotonic() + timeout.total_seconds()
        for work in self._works:
            if deadline is None:
                work.wait()
            else:  # what is left of the deadline (at least a millisecond: a zero timeout means "no limit")
                work.wait(timeout=timedelta(seconds=max(deadline - time.monotonic(), 1e-3)))
        return True

    def is_completed(self) -> bool:
        return self._error is not None or all(work.is_completed() for work in self._works)


def gathers_by_exchange(world_size: int) -> bool:
    """Whether a gloo all-gather among ``world_size`` ranks should be :func:`exchange_all_gather`: only for two.
    There gloo's ring sends data and notices both ways on the one connection between them, the race the exchange
    removes. From three ranks on, a ring rank sends its data to the next rank and its notices to the previous one,
    so no notice waits behind data, and the exchange's M − 1 concurrent streams per link were slower on the link lab
    (3 sites at 4 Mbit/s, 0.3 MB per rank: done everywhere in a median of 1.53-1.55 s against 1.35-1.40 s for
    gloo's ring; BENCHMARKS.md section 7)."""
    return world_size == 2


def exchange_all_gather(
    output: torch.Tensor,
    tensor: torch.Tensor,
    rank: int,
    post_recv: Callable[[torch.Tensor, int], Any],
    post_send: Callable[[torch.Tensor, int], Any],
    is_failure: Callable[[Exception], bool] = TorchWork.is_failure,
) -> _WorkGroup:
    """All-gather as a pairwise exchange: every rank receives each peer's ``tensor`` into ``output[peer]`` and
    sends its own to every peer, **posting all of its receives before any send**. ``post_recv(buffer, peer)`` and
    ``post_send(tensor, peer)`` start one point-to-point transfer with the process group's own calls (peers are
    ranks of ``output``'s rows) and return its work. Returns at once (the transfers proceed on the transport);
    ``wait`` on the result completes them all.

    Why not gloo's ``all_gather_into_tensor``: gloo's transport sends a buffer only after the receiver has told
    it that the matching receive is posted, and that notice travels in the same TCP stream as the data. gloo's
    all-gather posts its send before its receive, so on a slow link the rank that starts second (or whose notice
    loses the race) queues its notice *behind its own payload*: the other rank may start sending only once that
    whole payload has crossed, and the two directions of the link run one after the other instead of together.
    On the 4 Mbit/s link lab a 0.44 MB all-gather (the default model's fp4 outer gradient) then completed
    1.35-1.7 s after the later launch on one site, against 0.9 s for this exchange on both (BENCHMARKS.md section
    8, "DiLoCo with 4-bit outer gradients"). Posting the receives first puts every notice on the wire before any
    payload.

    The communicators use it where :func:`gathers_by_exchange` says (two ranks).

    Bytes: each rank sends its tensor to each of the M − 1 others, what a ring all-gather sends. Deadlock freedom:
    nothing here waits, and every rank posts its exchanges in the order the engine issues collectives (the same on
    all ranks), which is the order gloo matches a pair's messages of one tag (:data:`EXCHANGE_TAG`).

    Failures: gloo's point-to-point calls run on the caller's thread and raise at once when the connection to the
    peer is already known to be closed (a peer that died before this launch). Such a failure (``is_failure``: by
    default :meth:`TorchWork.is_failure`, a peer's failure; the caller's own rule where its works have another) is
    raised by ``wait`` instead, where a collective's failure surfaces and callers handle it; anything else (misuse)
    raises here."""
    rows = output.view(output.shape[0], -1)  # row r: rank r's contribution (contiguous)
    flat = tensor.reshape(-1)
    rows[rank].copy_(flat)
    world_size = rows.shape[0]
    peers = [(rank + k) % world_size for k in range(1, world_size)]  # each rank starts with a different peer
    works: list[Any] = []
    try:
        for peer in peers:
            works.append(post_recv(rows[peer], peer))
        for peer in peers:
            works.append(post_send(flat, peer))
    except Exception as exc:
        if not is_failure(exc):
            raise
        return _WorkGroup(works, error=exc)
    return _WorkGroup(works)


class TorchDistributedCommunicator(Communicator):
    """A :class:`Communicator` over a ``torch.distributed`` process group.

    Args:
        group: the process group joining the workers (one rank per worker, or the cross-worker group of one
            shard position when workers are groups of ranks). ``None``: the default (world) group, which must
            already be initialised with ``torch.distributed.init_process_group``.
        timeout: seconds before a pending collective raises :class:`CollectiveTimeout` (``None``: the process
            group's own timeout).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, timeout: float | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: call torch.distributed.init_process_group(...) first "
                "(torchrun sets the environment), or use eagerloco.comm.InProcessGroup to simulate workers "
                "in one process"
            )
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.stats = CommStats()
        self.default_timeout = timeout
        self._backend = str(dist.get_backend(group))
        ranks = range(self.world_size)
        self._global_ranks = [dist.get_global_rank(group, r) for r in ranks] if group is not None else list(ranks)
        self._heartbeat: _Heartbeat | None = None
        try:  # a private torch API: without it, diagnose_peers says what it cannot know
            from torch.distributed.distributed_c10d import _get_default_store

            self._heartbeat = _Heartbeat.for_store(_get_default_store(), dist.get_rank())
        except Exception:
            self._heartbeat = None

    @property
    def backend(self) -> str:
        return self._backend

    def _wrap(self, work: Any, what: str) -> Work:
        return TorchWork(work, f"{what} on {self._backend} rank {self.rank}/{self.world_size}", self.default_timeout)

    def all_reduce_sum(self, tensor: torch.Tensor) -> Work:
        self.stats.record("all_reduce", tensor.numel() * tensor.element_size(), self.world_size)
        work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        return self._wrap(work, f"all_reduce of {tensor.numel()} x {tensor.dtype}")

    def all_gather(self, output: torch.Tensor, tensor: torch.Tensor) -> Work:
        """Two gloo ranks: a pairwise exchange that posts every receive before any send (:func:`exchange_all_gather`:
        gloo's own all-gather serializes the two directions of a slow link between them); otherwise the backend's
        ``all_gather_into_tensor``. Either way rank r's contribution lands in ``output[r]``, the same bytes."""
        self.stats.record("all_gather", tensor.numel() * tensor.element_size(), self.world_size)
        what = f"all_gather of {tensor.numel()} x {tensor.dtype}"
        if self._backend == "gloo" and gathers_by_exchange(self.world_size):
            ranks, group = self._global_ranks, self.group  # torch's point-to-point calls take global ranks
            work = exchange_all_gather(
                output,
                tensor,
                self.rank,
                lambda buffer, peer: dist.irecv(buffer, src=ranks[peer], group=group, tag=EXCHANGE_TAG),
                lambda payload, peer: dist.isend(payload, dst=ranks[peer], group=group, tag=EXCHANGE_TAG),
            )
            return self._wrap(work, what)
        # The rows of `output` are contiguous, so rank r's contribution lands in output[r].
        work = dist.all_gather_into_tensor(output.view(-1), tensor.reshape(-1), group=self.group, async_op=True)
        return self._wrap(work, what)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> Work:
        self.stats.record("broadcast", tensor.numel() * tensor.element_size(), self.world_size, self.rank == src)
        global_src = dist.get_global_rank(self.group, src) if self.group is not None else src
        work = dist.broadcast(tensor, src=global_src, group=self.group, async_op=True)
        return self._wrap(work, f"broadcast of {tensor.numel()} x {tensor.dtype}")

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        try:  # blocking, bounded by the process group's timeout
            dist.all_gather_object(out, obj, group=self.group)
        except RuntimeError as exc:
            if is_peer_failure(exc):
                raise CollectiveTimeout(
                    f"all_gather_object on {self.describe()} did not complete: {first_line(exc)}; "
                    f"{self.diagnose_peers()}"
                ) from exc
            raise
        return out

    def diagnose_peers(self) -> str:
        """Which ranks of this group stopped beating (see the module docstring); takes about 1 s."""
        others = [r for r in range(self.world_size) if r != self.rank]
        if self._heartbeat is None:
            return f"this backend cannot tell which of the other ranks {others} failed"
        store = self._heartbeat.store
        try:
            # Mark this rank as one that saw the failure and is about to stop: a survivor that diagnoses later
            # must not blame it for the silence of its own exit.
            store.set(_Heartbeat.failed_key(dist.get_rank()), "1")
            before = self._heartbeat.counters(self._global_ranks)
            time.sleep(4 * _Heartbeat.interval)
            after = self._heartbeat.counters(self._global_ranks)
            stopped = [r for r in others if store.check([_Heartbeat.failed_key(self._global_ranks[r])])]
        except Exception as exc:
            return (
                f"the process group's store is unreachable ({first_line(exc)}): the process hosting it died "
                "(under an env:// launch that is global rank 0)"
            )
        silent = [r for r in others if after[r] == before[r] and r not in stopped]
        if not silent and not stopped:
            return f"every other rank {others} is still alive (heartbeats advance): a peer hung inside the collective"
        text = f"peers that did not answer: ranks {silent} of this group (their heartbeats stopped)"
        if stopped:
            text += f"; ranks {stopped} saw the failure too and stop"
        return text
