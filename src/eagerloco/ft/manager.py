"""Workers that fail and join without stopping the run: the engine over torchft's Manager.

Semantics: ALGORITHMS.md section 11. How it maps onto torchft:

* **Quorum at every sync point.** The engine launches one fragment's outer gradient per sync point; the
  :class:`FaultTolerantReducer` of that fragment first asks torchft's ``Manager.start_quorum()`` (synchronous) for
  the current membership. The lighthouse gives every live worker the same quorum (id, members); torchft
  reconfigures its gloo process group when the id changes. The Manager's step counter is set to the engine's inner
  step before each quorum, so a worker that is behind (a joiner, or a restarted worker) is *healed*: torchft fetches
  the state of a live peer over HTTP and hands it to :meth:`FaultTolerance._load_peer_state`.
* **M per collective.** After the quorum, ``comm.world_size`` and the engine's ``world_size`` are the quorum's
  size, so every 1/M of that sync point (the reducer's mean, eager's own term) uses M_Q.
* **Drops.** When the quorum id changed, every average still in flight from the previous quorum is marked dropped
  (every member sees the change at the same sync point). An average waited for within its quorum is decided by one
  record in the coordination store (apply iff all M_Q members reported success; drop on a failure or when the votes
  are not complete within what the collective left of the timeout; written once by compare-and-set). A dropped
  average has ``dropped = True``; the engine's ``check_average`` then takes the path of a skipped non-finite
  average on every member: nothing applied, outer optimizer untouched, θ ← φ, eager keeps its own contribution
  (``RunStats.dropped_averages``). Its value is NaN, so that no path can apply it by mistake.

Collective order: the quorum and the votes are not collectives of the process group (lighthouse RPC, store
requests), so the order of the outer collectives is the engine's, unchanged. The quorum is a barrier at every sync
point (the lighthouse waits for every member of the previous quorum, or for its join timeout).
"""

from __future__ import annotations

import hashlib
import pickle
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch

from eagerloco.comm.base import CommStats, Communicator, Work
from eagerloco.comm.torch_dist import EXCHANGE_TAG, TorchWork, exchange_all_gather, gathers_by_exchange
from eagerloco.engine.config import ConfigError
from eagerloco.ft._deps import require_torchft

if TYPE_CHECKING:
    from torch import nn

    from eagerloco.comm.reducer import PendingMean, Reducer
    from eagerloco.engine.config import DiLoCoConfig
    from eagerloco.engine.diloco import DiLoCo


class FaultToleranceError(RuntimeError):
    """The membership layer itself failed (lighthouse unreachable, a quorum or a state transfer that failed)."""


@dataclass
class MembershipRecord:
    """One quorum: taken at every sync point (and once when a worker attaches)."""

    inner_step: int
    quorum_id: int
    members: int
    """M_Q: the number of workers in this quorum."""
    rank: int
    """This worker's rank in the quorum."""
    changed: bool
    """The membership differs from the previous quorum's (a worker left or joined)."""
    quorum_s: float
    """Seconds this worker waited for the quorum (a dead member makes it wait the lighthouse's timeouts)."""
    dropped_in_flight: int = 0
    """Averages of the previous quorum still in flight, dropped because the membership changed."""
    healed: bool = False
    """This worker loaded a live peer's state at this quorum."""
    state_bytes: int = 0
    """Bytes of the peer state it loaded (tensors only)."""


@dataclass
class FaultToleranceStats:
    """Counters of a fault-tolerant run (per worker)."""

    quorums: int = 0
    membership_changes: int = 0
    dropped_on_change: int = 0
    """Averages dropped because the membership changed while they were in flight."""
    dropped_by_vote: int = 0
    """Averages dropped by the decision record (a collective failed on some member, or a vote was missing)."""
    failed_waits: int = 0
    """Collectives that failed or timed out on this worker."""
    failed_wait_s: float = 0.0
    """Seconds spent in waits that failed (time to notice a dead peer inside a collective)."""
    change_quorum_s: float = 0.0
    """Seconds spent in quorums that changed the membership (time to agree on a failure or a join)."""
    heals: int = 0
    state_bytes_received: int = 0
    catch_up_s: float = 0.0
    """Joiner: seconds from :meth:`FaultTolerance.attach` to the end of its first outer step with the others."""
    records: list[MembershipRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _FTWork(TorchWork):
    """A torchft process-group work with a bounded wait: any failure (a dead peer, a timeout, or a process group
    aborted by a reconfiguration) raises :class:`CollectiveTimeout`, which the average's decision then reports."""

    @staticmethod
    def is_failure(exc: Exception) -> bool:
        return True


class FaultTolerantCommunicator(Communicator):
    """The outer group of a fault-tolerant run: torchft's reconfigurable gloo process group, whose members, rank
    and size are those of the latest quorum (``world_size`` is 1 until the first quorum, so that the engine runs
    no start-up collective: :meth:`FaultTolerance.attach` does the start-up checks through the store)."""

    fixed_membership = False

    def __init__(self, ft: FaultTolerance, timeout: float | None) -> None:
        self._ft = ft
        self.rank = 0
        self.world_size = 1
        self.stats = CommStats()
        self.default_timeout = timeout
        self._objects = 0

    @property
    def backend(self) -> str:
        return "torchft-gloo"

    def describe(self) -> str:
        return f"torchft-gloo rank {self.rank}/{self.world_size} (quorum {self._ft.quorum_id})"

    def _wrap(self, work: Any, what: str) -> Work:
        return _FTWork(work, f"{what} on {self.describe()}", self.default_timeout)

    def all_reduce_sum(self, tensor: torch.Tensor) -> Work:
        from torch.distributed.distributed_c10d import AllreduceOptions, ReduceOp

        self.stats.record("all_reduce", tensor.numel() * tensor.element_size(), self.world_size)
        opts = AllreduceOptions()
        opts.reduceOp = ReduceOp.SUM
        return self._wrap(self._ft.pg.allreduce([tensor], opts), f"all_reduce of {tensor.numel()} x {tensor.dtype}")

    def all_gather(self, output: torch.Tensor, tensor: torch.Tensor) -> Work:
        """The receive-first exchange of :func:`~eagerloco.comm.torch_dist.exchange_all_gather` where
        :func:`~eagerloco.comm.torch_dist.gathers_by_exchange` says (a quorum of two), gloo's all-gather otherwise."""
        from torch.distributed.distributed_c10d import AllgatherOptions

        self.stats.record("all_gather", tensor.numel() * tensor.element_size(), self.world_size)
        what = f"all_gather of {tensor.numel()} x {tensor.dtype}"
        pg = self._ft.pg
        if gathers_by_exchange(self.world_size):
            work = exchange_all_gather(
                output,
                tensor,
                self.rank,
                lambda buffer, peer: pg.recv([buffer], peer, EXCHANGE_TAG),
                lambda payload, peer: pg.send([payload], peer, EXCHANGE_TAG),
                _FTWork.is_failure,  # any failure while posting surfaces at wait, as this group's failures all do
            )
            return self._wrap(work, what)
        rows = list(output.reshape(self.world_size, -1).unbind(0))  # views: gloo writes rank r's bytes into row r
        return self._wrap(pg.allgather([rows], [tensor.reshape(-1)], AllgatherOptions()), what)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> Work:
        from torch.distributed.distributed_c10d import BroadcastOptions

        self.stats.record("broadcast", tensor.numel() * tensor.element_size(), self.world_size, self.rank == src)
        opts = BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        return self._wrap(self._ft.pg.broadcast([tensor], opts), f"broadcast of {tensor.numel()} x {tensor.dtype}")

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Not a collective here (members come and go): the first worker to call it for the n-th time stores its
        object; every caller gets ``[first worker's object, its own]``. Enough for the start-up checks, which
        compare every entry with the caller's own."""
        self._objects += 1
        key = f"{self._ft.prefix}/object/{self._objects}"
        mine = pickle.dumps(obj)
        first = self._ft.coord.compare_set(key, "", mine)
        return [pickle.loads(first), obj]

    def diagnose_peers(self) -> str:
        return (
            f"membership is the lighthouse's: quorum {self._ft.quorum_id} has {self.world_size} members; a dead "
            "one is left out of the next quorum"
        )


class _FTPending:
    """An average in flight under fault tolerance: dropped when its quorum ended before it was waited for, else
    decided by the coordination store's record after the local wait (see the module docstring)."""

    def __init__(self, ft: FaultTolerance, inner: PendingMean, quorum_id: int, seq: int, members: int,
                 numel: int, device: torch.device) -> None:  # fmt: skip
        self._ft = ft
        self._inner = inner
        self.quorum_id = quorum_id
        self.seq = seq
        self.world_size = members
        """M_Q of the quorum this average belongs to."""
        self._numel = numel
        self._device = device
        self.dropped = False
        self.dropped_reason = ""
        self.payload_bytes = inner.payload_bytes
        self._result: torch.Tensor | None = None

    def drop(self, reason: str) -> None:
        if self._result is None:
            self.dropped = True
            self.dropped_reason = reason

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        if self._result is not None:
            return self._result
        if not self.dropped:
            # One bound for the whole wait: the collective and the votes share `timeout` (ALGORITHMS.md 11: no
            # survivor blocks longer than the configured timeout). The collective's own bound is the same, so a
            # dead peer leaves no time for votes: this member writes 'drop' at once, which every member then reads.
            ok, error = True, ""
            timeout = self._ft.timeout_s if timeout is None else timeout
            start = time.perf_counter()
            try:
                mean = self._inner.wait(timeout)
            except Exception as exc:
                ok, error = False, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                self._ft.stats.failed_waits += 1
                self._ft.stats.failed_wait_s += time.perf_counter() - start
            remaining = max(0.0, timeout - (time.perf_counter() - start))
            decision = self._ft._decide(self.quorum_id, self.seq, self.world_size, ok, remaining)
            if decision == "apply" and ok:
                self._result = mean
                self._ft._forget(self)
                return mean
            self.dropped = True
            self.dropped_reason = error or "another member's collective failed or its vote did not arrive"
            self._ft.stats.dropped_by_vote += 1
        # The engine sees `dropped` and applies nothing of it (core.check_average); NaN guards any other path.
        self._result = torch.full((self._numel,), float("nan"), device=self._device)
        self._ft._forget(self)
        return self._result

    def is_completed(self) -> bool:
        return self._result is not None or self.dropped or self._inner.is_completed()


class FaultTolerantReducer:
    """Wraps a fragment's reducer (fp32 mean or a codec): a quorum before each launch, a decision at each wait."""

    def __init__(self, inner: Reducer, ft: FaultTolerance) -> None:
        self.inner = inner
        self.ft = ft
        self.name = inner.name

    def launch(self, delta: torch.Tensor) -> _FTPending:
        self.ft._quorum_for_launch()
        pending = self.inner.launch(delta)
        return self.ft._track(pending, delta.numel(), delta.device)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


class FaultTolerance:
    """One worker's membership in a fault-tolerant run (torchft's Manager, a replica group of one rank).

    Typical use (one process per worker, every worker seeded identically or not: :meth:`attach` makes them
    agree)::

        ft = FaultTolerance(lighthouse="http://HOST:29510", store="HOST:29511", replica_id="site-a")
        loco = ft.diloco(model, inner, DiLoCoConfig(mode="eager"))   # builds and attaches
        for batch in data:
            ...; inner.step(); loco.step()
        ft.finish(loco); ft.shutdown()          # finalize, then (eager) the average of φ over the survivors

    Args:
        lighthouse: ``http://HOST:PORT`` of the lighthouse (:class:`eagerloco.ft.LighthouseHost`).
        store: ``HOST:PORT`` of the coordination store (the same host).
        replica_id: this worker's name (a restarted worker may reuse it; torchft appends a fresh id).
        min_replicas: smallest quorum this worker accepts to train in.
        timeout_s: bound of every average's wait (its collective and its votes together), state transfer and RPC.
        quorum_timeout_s: bound of one quorum (default 4 × ``timeout_s``): a worker waits this long for the others
            at a sync point before failing.
        host: the address other workers use to reach this one (its store, its state-transfer server); an IPv6
            address with or without brackets.
    """

    def __init__(
        self,
        lighthouse: str,
        store: str,
        replica_id: str,
        *,
        min_replicas: int = 1,
        timeout_s: float = 60.0,
        quorum_timeout_s: float | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        require_torchft()
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if min_replicas < 1:
            raise ValueError(f"min_replicas must be >= 1, got {min_replicas}")
        if ":" not in store:
            raise ValueError(f"store must be HOST:PORT, got {store!r}")
        from torch.distributed import TCPStore
        from torchft.checkpointing import HTTPTransport
        from torchft.manager import Manager
        from torchft.process_group import ProcessGroupGloo

        class _AdvertisedHTTPTransport(HTTPTransport):
            """torchft's HTTP state transfer, with two fixes for a loop that never calls ``should_commit``:

            * it advertises ``host`` (torchft advertises ``gethostname()``: wrong across namespaces);
            * :meth:`disallow_checkpoint` (called before each quorum, so that a joiner's request waits until this
              quorum's state is staged) first waits until every joiner of the previous quorum has fetched it, else
              a joiner slower than our next H inner steps would wait on us while we wait on it in the next quorum.
            """

            def __init__(self, timeout: timedelta, num_chunks: int) -> None:
                self._fetched = threading.Condition()
                self._expected_fetches = 0
                self._fetches = 0
                super().__init__(timeout=timeout, num_chunks=num_chunks)

            @property
            def _state_dict(self) -> Any:  # read once per full fetch by torchft's request handler
                with self._fetched:
                    self._fetches += 1
                    self._fetched.notify_all()
                return self.__dict__.get("_staged")

            @_state_dict.setter
            def _state_dict(self, value: Any) -> None:
                self.__dict__["_staged"] = value

            def send_checkpoint(self, dst_ranks: list[int], step: int, state_dict: Any, timeout: timedelta) -> None:
                with self._fetched:
                    self._expected_fetches, self._fetches = len(dst_ranks), 0
                super().send_checkpoint(dst_ranks, step, state_dict, timeout)

            def disallow_checkpoint(self) -> None:
                with self._fetched:  # bounded: a joiner that died never fetches
                    self._fetched.wait_for(lambda: self._fetches >= self._expected_fetches, timeout=timeout_s)
                super().disallow_checkpoint()

            def address(self) -> str:
                return f"http://{url_host(host)}:{self._server.socket.getsockname()[1]}/checkpoint/"

        from eagerloco.ft.lighthouse import bare_host, url_host

        host = bare_host(host)  # an IPv6 address: bare for sockets and stores, in brackets in URLs
        self.replica_id = replica_id
        self.timeout_s = float(timeout_s)
        self.prefix = "eagerloco/ft"
        store_host, store_port = store.rsplit(":", 1)
        store_host = bare_host(store_host)
        self.coord = TCPStore(store_host, int(store_port), is_master=False, timeout=timedelta(seconds=timeout_s))
        self._own_store = TCPStore(host, 0, is_master=True, wait_for_workers=False)
        timeout = timedelta(seconds=timeout_s)
        self.pg = ProcessGroupGloo(timeout=timeout)
        self._transport = _AdvertisedHTTPTransport(timeout=timeout, num_chunks=0)
        self.manager = Manager(
            pg=self.pg,
            load_state_dict=self._load_peer_state,
            state_dict=self._peer_state,
            min_replica_size=min_replicas,
            use_async_quorum=False,
            timeout=timeout,
            quorum_timeout=timedelta(seconds=quorum_timeout_s or 4 * timeout_s),
            connect_timeout=timeout,
            rank=0,
            world_size=1,
            store_addr=host,
            store_port=self._own_store.port,
            lighthouse_addr=lighthouse,
            replica_id=replica_id,
            hostname=url_host(host),  # torchft advertises http://HOSTNAME:PORT to the lighthouse
            checkpoint_transport=self._transport,
            init_sync=True,
        )
        self.comm = FaultTolerantCommunicator(self, timeout_s)
        self.quorum_id = -1
        self.stats = FaultToleranceStats()
        self.engine: DiLoCo | None = None
        self._seq = 0
        self._in_flight: list[_FTPending] = []
        self._lock = threading.Lock()
        self._skip_next_quorum = False
        self._serving_launch = False
        self._received: dict[str, Any] | None = None

    # ------------------------------------------------------------------ building and joining

    def reducer_factory(self, config: DiLoCoConfig) -> Callable[[int, Communicator], FaultTolerantReducer]:
        """``reducer_factory`` for :class:`eagerloco.DiLoCo`: the config's codec, wrapped for fault tolerance."""
        from eagerloco.compression import make_reducer

        def factory(index: int, comm: Communicator) -> FaultTolerantReducer:
            return FaultTolerantReducer(make_reducer(config.compression, comm, error_feedback=config.error_feedback),
                                        self)  # fmt: skip

        return factory

    def diloco(self, model: nn.Module, inner_optimizer: torch.optim.Optimizer | None, config: DiLoCoConfig,
               **kwargs: Any) -> DiLoCo:  # fmt: skip
        """Build the engine on this worker's fault-tolerant group and :meth:`attach` it."""
        from eagerloco.engine.diloco import DiLoCo

        engine = DiLoCo(model, inner_optimizer, config, comm=self.comm, reducer_factory=self.reducer_factory(config),
                        **kwargs)  # fmt: skip
        self.attach(engine)
        return engine

    def attach(self, engine: DiLoCo) -> None:
        """Join the run with ``engine`` (built with ``comm=self.comm`` and :meth:`reducer_factory`), before its
        first inner step: the first quorum; a worker that is behind (a joiner, a restarted worker, or any but one
        at the very start) loads a live peer's φ, outer optimizer state and step counter, and, when the others are
        in the middle of a sync point, completes that outer step with them (its Δ is 0: it took no inner step).
        Also checks that every worker runs the same model and configuration."""
        if engine.comm is not self.comm:
            raise ConfigError("attach(engine): the engine must be built with comm=ft.comm")
        if engine.config.divergence_every:
            raise ConfigError(
                f"divergence_every={engine.config.divergence_every}: the divergence measurement is a collective "
                "outside the quorum and is not fault tolerant; set it to 0 under fault tolerance"
            )
        if any(not isinstance(state.reducer, FaultTolerantReducer) for state in engine.states):
            raise ConfigError("attach(engine): build the engine with reducer_factory=ft.reducer_factory(config)")
        self.engine = engine
        self._check_fingerprint(engine)
        start = time.perf_counter()
        self._wait_for_a_sync_point()
        self._quorum(engine.inner_step)
        received, self._received = self._received, None
        if received is not None and received["launch_step"] is not None:
            # The others are inside their step at sync point s, right before its launch: take that step with them.
            _set_inner_step(engine, received["launch_step"] - 1)
            self._skip_next_quorum = True
            with engine.paused():
                engine.step()
            self._skip_next_quorum = False
        if received is not None:
            self.stats.catch_up_s = time.perf_counter() - start

    def finish(self, engine: DiLoCo, attempts: int = 3) -> None:
        """The end of a fault-tolerant run, in place of ``finalize(); consolidate()``: :meth:`~DiLoCo.finalize`
        (an average whose collective fails there is dropped, as at any sync point), then, in eager mode, the average
        of φ over the workers still alive: one quorum at the final inner step, one fp32 average per fragment,
        decided like an outer average (applied iff every member's collective succeeded). A member that died since
        the last sync point is left out by the quorum; a failure there retries with the next quorum, at most
        ``attempts`` times (then :class:`FaultToleranceError`). Every survivor ends with the same φ."""
        from eagerloco.comm.reducer import MeanReducer

        engine.finalize()
        if engine.strategy.uniform_outer_state:
            return
        for _ in range(attempts):
            self._quorum(engine.inner_step)  # the workers still alive, at the same (final) inner step
            if self.comm.world_size == 1:
                return  # alone: its φ is the average
            reducer = MeanReducer(self.comm)
            # the reducer averages a copy of φ; fragment order: the same collectives on every member
            pending = [self._track(reducer.launch(c.phi), c.phi.numel(), c.phi.device) for c in engine.states]
            means = [item.wait() for item in pending]
            if not any(item.dropped for item in pending):
                for core, mean in zip(engine.states, means):
                    core.phi.copy_(mean)
                    core.write_theta(core.phi)  # θ ← φ
                return
        raise FaultToleranceError(
            f"replica {self.replica_id!r}: the final average of φ failed {attempts} times (workers kept failing)"
        )

    def shutdown(self) -> None:
        """Leave the run (the others see a membership change at their next sync point)."""
        self.manager.shutdown(wait=False)

    # ------------------------------------------------------------------ the quorum

    def _quorum_for_launch(self) -> None:
        if self._skip_next_quorum:  # attach() already took this sync point's quorum
            return
        assert self.engine is not None, "attach(engine) before training"
        # Announce the sync point to a joiner waiting for one (see _wait_for_a_sync_point).
        self.coord.add(f"{self.prefix}/syncpoints", 1)
        self._serving_launch = True
        try:
            self._quorum(self.engine.inner_step)
        finally:
            self._serving_launch = False
        if self._received is not None:
            # The lighthouse formed a quorum without this live worker (it reached this sync point after the join
            # window while the others were ready) and the others went on: it is behind, in the middle of its own
            # step. Catching up from here would misalign its collectives; it stops, and rejoins when restarted.
            behind = self._received["inner_step"]
            self._received = None
            raise FaultToleranceError(
                f"replica {self.replica_id!r} fell behind: it reached sync point {self.engine.inner_step} after the "
                f"others had formed a quorum without it and moved on to inner step {behind} (raise the lighthouse's "
                "join_timeout_ms above the workers' skew); restart this worker to rejoin"
            )

    def _wait_for_a_sync_point(self) -> None:
        """A worker joining a run in progress asks for its first quorum only when the others reach their next sync
        point: the lighthouse measures its join window from the first request of a round, and a joiner that asked
        long before would close that window early and leave out a live worker slightly behind the others."""
        key = f"{self.prefix}/syncpoints"
        seen = int(self.coord.add(key, 0))
        if seen == 0:  # the start of the run: every worker asks at once
            return
        deadline = time.monotonic() + self.manager._quorum_timeout.total_seconds()
        while int(self.coord.add(key, 0)) == seen:
            if time.monotonic() > deadline:
                raise FaultToleranceError(
                    f"replica {self.replica_id!r}: no worker of the run reached a sync point within the quorum "
                    "timeout; is the run still going?"
                )
            time.sleep(0.01)

    def _quorum(self, step: int) -> None:
        start = time.perf_counter()
        # torchft heals a member whose step is below the quorum's highest: the engine's inner step is that step.
        self.manager.load_state_dict({"step": step, "batches_committed": 0})
        # A joiner may ask for our state as soon as the lighthouse answers, before this quorum has staged it: hold
        # its request until then (torchft does this in should_commit, which this loop does not call). This first
        # waits until the joiners of the previous quorum have fetched theirs (see _AdvertisedHTTPTransport).
        self._transport.disallow_checkpoint()
        try:
            self.manager.start_quorum()
        except Exception as exc:
            raise FaultToleranceError(
                f"quorum at inner step {step} failed for replica {self.replica_id!r}: {exc}"
            ) from exc
        if (error := self.manager.errored()) is not None:
            raise FaultToleranceError(
                f"quorum at inner step {step} failed for replica {self.replica_id!r} (process group or state "
                f"transfer): {error.original_exception if hasattr(error, 'original_exception') else error}"
            )
        elapsed = time.perf_counter() - start
        quorum_id = int(self.manager._quorum_id)  # torchft exposes no public accessor for the id
        rank = self.manager.participating_rank()
        members = self.manager.num_participants()
        changed = quorum_id != self.quorum_id
        dropped = 0
        if changed:
            with self._lock:
                for pending in self._in_flight:  # the same sync point on every member: the same decision
                    pending.drop(f"the membership changed (quorum {pending.quorum_id} -> {quorum_id})")
                dropped = len(self._in_flight)
                self._in_flight.clear()
            self._seq = 0
            self.stats.dropped_on_change += dropped
            self.stats.membership_changes += 1
            self.stats.change_quorum_s += elapsed
        self.quorum_id = quorum_id
        self.comm.rank = int(rank) if rank is not None else 0
        self.comm.world_size = int(members)
        if self.engine is not None:  # M in every 1/M of this sync point (eager's own term included)
            _set_membership(self.engine, self.comm.rank, self.comm.world_size)
        received = self._received
        record = MembershipRecord(
            inner_step=step if received is None else received["inner_step"],
            quorum_id=quorum_id,
            members=int(members),
            rank=self.comm.rank,
            changed=changed,
            quorum_s=elapsed,
            dropped_in_flight=dropped,
            healed=received is not None,
            state_bytes=0 if received is None else received["nbytes"],
        )
        self.stats.quorums += 1
        self.stats.records.append(record)

    def _track(self, pending: PendingMean, numel: int, device: torch.device) -> _FTPending:
        item = _FTPending(self, pending, self.quorum_id, self._seq, self.comm.world_size, numel, device)
        self._seq += 1
        with self._lock:
            self._in_flight.append(item)
        return item

    def _forget(self, item: _FTPending) -> None:
        with self._lock:
            if item in self._in_flight:
                self._in_flight.remove(item)

    def _decide(self, quorum_id: int, seq: int, members: int, ok: bool, wait_s: float) -> str:
        """The decision record of one average: 'apply' iff every member reported success (ALGORITHMS.md 11).
        Waits at most ``wait_s`` for the others' votes; then writes 'drop' unless a decision is already there. The
        record is written once (compare-and-set), so every member reads the same decision, whoever timed out."""
        key = f"{self.prefix}/decision/{quorum_id}/{seq}"
        if ok:
            if int(self.coord.add(f"{self.prefix}/ok/{quorum_id}/{seq}", 1)) == members:
                self.coord.compare_set(key, "", "apply")
        else:
            self.coord.compare_set(key, "", "drop")
        decided = self.coord.check([key])
        if not decided and wait_s > 0:
            try:
                self.coord.wait([key], timedelta(seconds=wait_s))
                decided = True
            except Exception:  # a member's vote did not arrive in time: it is dead or stuck
                pass
        if not decided:
            self.coord.compare_set(key, "", "drop")
        return self.coord.get(key).decode()

    # ------------------------------------------------------------------ live state transfer

    def _peer_state(self) -> dict[str, Any]:
        """What a joiner takes from this worker (called on torchft's quorum thread while the main thread waits in
        the quorum): φ and the outer optimizer state per fragment, the inner step, and whether the quorum belongs
        to a launch (then the joiner completes that step with the others). Copies: torchft serves them later."""
        engine = self.engine
        assert engine is not None
        fragments = []
        for state in engine.states:
            opt = state.outer_optimizer.state_dict()
            fragments.append(
                {
                    "names": list(state.fragment.names),
                    "phi": state.phi.detach().clone(),
                    "outer_optimizer": _clone_tree(opt),
                }
            )
        return {
            "inner_step": engine.inner_step,
            "launch_step": engine.inner_step if self._serving_launch else None,
            "fingerprint": _fingerprint(engine),
            "fragments": fragments,
        }

    def _load_peer_state(self, peer: dict[str, Any]) -> None:
        engine = self.engine
        assert engine is not None
        if peer["fingerprint"] != _fingerprint(engine):
            raise FaultToleranceError("the peer's model or configuration differs from this worker's")
        nbytes = 0
        for state, saved in zip(engine.states, peer["fragments"]):
            state.phi.copy_(saved["phi"])
            state.outer_optimizer.load_state_dict(saved["outer_optimizer"])
            state.in_flight.clear()  # nothing of its own in flight
            nbytes += saved["phi"].numel() * saved["phi"].element_size()
            nbytes += sum(t.numel() * t.element_size() for t in _tensors(saved["outer_optimizer"]))
            state.write_theta(state.phi)  # θ ← φ
        _set_inner_step(engine, peer["inner_step"])
        self.stats.heals += 1
        self.stats.state_bytes_received += nbytes
        self._received = {"inner_step": peer["inner_step"], "launch_step": peer["launch_step"], "nbytes": nbytes}

    def _check_fingerprint(self, engine: DiLoCo) -> None:
        from eagerloco.engine.errors import ModelMismatch

        entries, config = _model_and_config(engine)
        mine = pickle.dumps((entries, config))
        first_entries, first_config = pickle.loads(self.coord.compare_set(f"{self.prefix}/fingerprint", "", mine))
        if first_config != config:
            diff = sorted(k for k in set(config) | set(first_config) if config.get(k) != first_config.get(k))
            raise ModelMismatch(
                f"worker {self.replica_id!r} runs another configuration than the run's first worker: "
                + ", ".join(f"{k}={config.get(k)!r} vs {first_config.get(k)!r}" for k in diff)
            )
        if first_entries != entries:
            index = next((i for i, (a, b) in enumerate(zip(entries, first_entries)) if a != b), len(entries))
            raise ModelMismatch(
                f"worker {self.replica_id!r} holds another model than the run's first worker (first difference at "
                f"trainable parameter #{index} of {len(entries)} vs {len(first_entries)})"
            )


# The engine's internals this module sets (kept in one place: the engine has no public setter for them).
def _set_inner_step(engine: DiLoCo, t: int) -> None:
    engine._context.inner_step = t
    engine._context.arrivals.clear()  # nothing of this worker's own is in flight


def _set_membership(engine: DiLoCo, rank: int, world_size: int) -> None:
    # The engine's own M (consolidate, divergence, checkpoints). Each average carries its M_Q (_FTPending.world_size),
    # which the core takes at launch for every 1/M of that sync point (eager's own term included).
    engine.rank = rank
    engine.world_size = world_size
    for core in engine.states:  # current before the launch too (eager's check of its own weight against 1/M)
        core.world_size = world_size


def _model_and_config(engine: DiLoCo) -> tuple[list[tuple[Any, ...]], dict[str, Any]]:
    entries = [
        (name, tuple(p.shape), str(p.dtype), fragment.index)
        for fragment in engine.fragments
        for name, p in zip(fragment.names, fragment.params)
    ]
    config = {k: v for k, v in engine.config.to_dict().items() if k != "outer_device"}
    return entries, config


def _fingerprint(engine: DiLoCo) -> str:
    entries, config = _model_and_config(engine)
    return hashlib.sha256(repr((entries, sorted(config.items()))).encode()).hexdigest()


def _clone_tree(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_tree(v) for v in obj)
    return obj


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


__all__ = [
    "FaultTolerance",
    "FaultToleranceError",
    "FaultToleranceStats",
    "FaultTolerantCommunicator",
    "FaultTolerantReducer",
    "MembershipRecord",
]
