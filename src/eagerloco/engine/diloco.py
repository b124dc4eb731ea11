"""The outer-step engine: one wrapper for sync, overlap, delayed and eager DiLoCo, with streaming fragments.

Add it to an existing training loop; the loop, the loss and the data stay yours::

    import torch, eagerloco

    model = MyModel()
    inner = torch.optim.AdamW(model.parameters(), lr=4e-4)
    loco = eagerloco.DiLoCo(model, inner, eagerloco.DiLoCoConfig(mode="eager", sync_every=30))
    for x, y in batches:
        loss = loss_fn(model(x), y)
        loss.backward()
        inner.step()
        inner.zero_grad()
        loco.step()              # after every inner optimizer step
    loco.finalize()              # drain and apply every collective still in flight
    loco.consolidate()           # eager only: average the workers' outer parameters into one model
    # the model now holds the outer parameters φ: evaluate and save it

With ``torchrun``, the default communicator is the world process group (``torch.distributed`` must be
initialised); pass ``comm=`` for another group, for :class:`eagerloco.comm.InProcessGroup` simulated workers,
or an :class:`eagerloco.comm.EmulatedLink` for an emulated slow link.

State per fragment p (see :class:`FragmentState`): the outer parameters φ_p as one flat fp32 buffer (on
``outer_device``), the outer optimizer stepping it, the reducer (codec) that averages its outer gradients, and
the queue of averages in flight. The model's parameters θ are only read and written with ``torch._foreach_*``
copies between the flat buffer and the parameter list: no Python loop over parameters on the hot path.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from eagerloco.comm.base import CollectiveAborted, CollectiveTimeout, Communicator
from eagerloco.comm.reducer import CompletedMean, MeanReducer, PendingMean, Reducer
from eagerloco.engine.config import ConfigError, DiLoCoConfig
from eagerloco.engine.fragments import Fragment, build_fragments
from eagerloco.engine.metrics import OuterStepRecord, RunStats
from eagerloco.engine.sharding import FragmentView, check_replicas_agree, is_dtensor, local_shape
from eagerloco.engine.strategies import OuterStrategy, make_strategy

if TYPE_CHECKING:
    from eagerloco.distributed import WorkerLayout

OuterOptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]

CHECKPOINT_FORMAT = 1


class NonFiniteOuterGradient(FloatingPointError):
    """An outer gradient held NaN or Inf; the outer parameters were not touched. Raised by every worker at the same
    outer step (``nonfinite='raise'``): the bad values travel inside the average, which every worker receives
    bit-identical."""


class ModelMismatch(RuntimeError):
    """Workers hold models (or configurations) that differ: averaging them would be meaningless."""


@dataclass(eq=False)
class InFlight:
    """An average launched at ``launch_step`` and not yet applied."""

    launch_step: int
    mean: PendingMean
    own: torch.Tensor | None = None
    """Eager only: (1/M)·Δ_m(t), this worker's contribution exactly as it was applied eagerly (zero when Δ_m(t)
    was not finite: nothing was applied)."""
    own_finite: bool = True
    """Whether this worker's own Δ_m(t) was finite (for the error message when the average is not)."""


@dataclass(eq=False)
class FragmentState:
    """Everything the engine keeps for one fragment."""

    fragment: Fragment
    phi: torch.Tensor
    """φ_p: the outer parameters, flat fp32 on the outer device."""
    outer_optimizer: torch.optim.Optimizer
    reducer: Reducer
    staging: torch.Tensor
    """Flat fp32 scratch on the model's device: θ gathered into one buffer, or φ on its way into θ."""
    staging_views: list[torch.Tensor]
    view: FragmentView
    """This rank's share of the fragment: reads θ into ``staging`` and writes φ back (inner all-gather included
    when a worker is a group of ranks); ``phi`` holds exactly the elements it owns."""
    in_flight: deque[InFlight] = field(default_factory=deque)

    @property
    def index(self) -> int:
        return self.fragment.index


def default_outer_optimizer(config: DiLoCoConfig) -> OuterOptimizerFactory:
    """SGD with (Nesterov) momentum, as in the papers."""

    def factory(params: list[torch.Tensor]) -> torch.optim.Optimizer:
        momentum = config.outer_momentum
        return torch.optim.SGD(params, lr=config.outer_lr, momentum=momentum, nesterov=config.nesterov and momentum > 0)

    return factory


class DiLoCo:
    """Wraps a model and its inner optimizer with an outer loop (see the module docstring).

    Args:
        model: any ``nn.Module``; its trainable parameters are the θ of ALGORITHMS.md.
        inner_optimizer: the user's optimizer over ``model``'s parameters. The wrapper never calls it; it is
            held so that checkpoints and reports can find it. Its state is never synchronised (the papers' choice).
        config: the outer loop's settings (:class:`DiLoCoConfig`), validated here, before any collective.
        outer_optimizer: ``factory(params) -> torch.optim.Optimizer`` called once per fragment with
            ``[φ_p]``. Default: SGD(lr=config.outer_lr, momentum=config.outer_momentum, nesterov).
        comm: the outer process group. Default: ``torch.distributed``'s world group.
        fragments: explicit streaming fragments: one module (or list of modules) per fragment.
        blocks: the repeated blocks to split into fragments (default: the model's largest ModuleList).
        reducer_factory: ``factory(fragment_index, comm) -> Reducer``; default: from ``config.compression``.
        layout: when a worker is a group of ranks (DDP or FSDP2 inside): this rank's
            :class:`eagerloco.distributed.WorkerLayout`. The outer collectives then run on ``layout.outer_group``
            (the default ``comm``) and this rank keeps φ and the outer optimizer state only for its own share of
            each fragment: its FSDP2 shards, and 1/N of the replicated (DDP) parameters, all-gathered inside the
            worker after every outer step (see :mod:`eagerloco.engine.sharding`). Build the wrapper after
            ``fully_shard``/DDP, and call :meth:`step` on every rank of every worker.
    """

    def __init__(
        self,
        model: nn.Module,
        inner_optimizer: torch.optim.Optimizer | None = None,
        config: DiLoCoConfig | None = None,
        *,
        outer_optimizer: OuterOptimizerFactory | None = None,
        comm: Communicator | None = None,
        fragments: Sequence[nn.Module | Sequence[nn.Module]] | None = None,
        blocks: Sequence[nn.Module] | None = None,
        reducer_factory: Callable[[int, Communicator], Reducer] | None = None,
        layout: WorkerLayout | None = None,
    ) -> None:
        self.config = (config or DiLoCoConfig()).validate()
        cfg = self.config
        self.model = model
        self.inner_optimizer = inner_optimizer
        self.layout = layout
        if comm is None and layout is not None:
            comm = layout.outer_comm(timeout=cfg.collective_timeout_s)
        elif comm is None:
            from eagerloco.comm.torch_dist import TorchDistributedCommunicator

            comm = TorchDistributedCommunicator(timeout=cfg.collective_timeout_s)
        if layout is not None and (comm.world_size, comm.rank) != (layout.num_workers, layout.worker):
            raise ConfigError(
                f"comm is rank {comm.rank} of {comm.world_size} but the layout puts this rank in worker "
                f"{layout.worker} of {layout.num_workers}: pass comm=layout.outer_comm() (or a wrapper of it)"
            )
        self.comm = comm
        self.rank = comm.rank
        self.world_size = comm.world_size
        self.strategy: OuterStrategy = make_strategy(cfg.mode, cfg.overlap_steps, cfg.alpha, cfg.delay)
        self.fragments = build_fragments(
            model, cfg.num_fragments, cfg.sync_every, cfg.fragment_layout, modules=fragments, blocks=blocks
        )
        if reducer_factory is None:
            reducer_factory = _codec_reducer_factory(cfg)
        factory = outer_optimizer or default_outer_optimizer(cfg)

        # This rank's share of every fragment (all of it with one rank per worker; see engine/sharding.py).
        self._views = [FragmentView(fragment, layout) for fragment in self.fragments]
        if layout is not None and layout.outer_backend == "gloo":  # gloo moves CPU tensors: φ must live there
            for view in self._views:
                where = torch.device(cfg.outer_device) if cfg.outer_device is not None else view.staging.device
                if where.type != "cpu":
                    raise ConfigError(
                        f"outer_device={cfg.outer_device!r} puts the outer state on {where}, but the outer group's "
                        "backend is gloo, which moves CPU tensors: set DiLoCoConfig(outer_device='cpu') (or "
                        "two_level_mesh(..., outer_backend='nccl') to keep it on the GPU)"
                    )

        # Every worker must hold the same model and configuration, or the collectives below would pair buffers
        # of different meaning (or sizes, and hang). Compare before the first collective on the data path.
        # Collective order at start, the same on every rank: the comparison (outer group), the replica check
        # (inner group), the broadcast of φ_0 (outer group), the write of φ_0 into θ (inner group).
        self._check_same_model_and_config()
        check_replicas_agree(self._views, layout)

        self.states: list[FragmentState] = []
        for fragment, view in zip(self.fragments, self._views):
            device = view.staging.device
            outer_device = torch.device(cfg.outer_device) if cfg.outer_device is not None else device
            phi = view.read_theta().to(outer_device, copy=True)
            self.states.append(
                FragmentState(
                    fragment=fragment,
                    phi=phi,
                    outer_optimizer=factory([phi]),
                    reducer=reducer_factory(fragment.index, comm),
                    staging=view.staging,
                    staging_views=view.staging_views,
                    view=view,
                )
            )
        if cfg.broadcast_initial_parameters and self.world_size > 1:
            # All workers must start from the same φ_0 (prime-diloco shipped a bug where they did not).
            works = [comm.broadcast(state.phi, src=0) for state in self.states]
            for state, work in zip(self.states, works):
                self._wait_diagnosed(work, f"the broadcast of worker 0's initial parameters (fragment {state.index})")
            for state in self.states:
                self.reset_inner(state)

        # The schedule: fragment p syncs at t ≡ offset_p (mod H). Precomputed so step() is O(1) off sync points.
        self._sync_at: dict[int, list[FragmentState]] = {}
        for state in self.states:
            self._sync_at.setdefault(state.fragment.offset % cfg.sync_every, []).append(state)
        self._arrivals: dict[int, list[FragmentState]] = {}

        self.inner_step = 0
        self.finalized = False
        self.records: list[OuterStepRecord] = []
        self.stats = RunStats()
        self._record_listeners: list[Callable[[OuterStepRecord], None]] = []
        self._event: OuterStepRecord | None = None
        self._window_inner_s = 0.0
        self._window_wall_s = 0.0
        self._window_mark = 0.0
        self._event_wire_start = 0
        self._event_diagnostic_start = 0
        self._blocked_in_call = 0.0
        self._outer_steps_fragment0 = 0
        self._last_exit = time.perf_counter()

    # ------------------------------------------------------------------ the user's calls

    def step(self) -> None:
        """Call once after every inner optimizer step. Runs the outer work due at this inner step."""
        enter = self._enter_call()
        if self.finalized:
            raise RuntimeError("step() after finalize(): create a new DiLoCo wrapper to continue training")
        self.inner_step = t = self.inner_step + 1
        self.stats.inner_steps = t
        arrivals = self._arrivals.pop(t, None)
        syncs = self._sync_at.get(t % self.config.sync_every)
        if arrivals or syncs:
            self._open_event()
            # Order matters for deadlock freedom: arrivals (waits only) first, then launches in fragment order.
            for state in arrivals or ():
                self.strategy.on_arrival(self, state, t)
            for state in syncs or ():
                self._event.fragments_synced.append(state.index)
                self.strategy.on_sync(self, state, t)
            if (
                self.config.divergence_every
                and syncs
                and syncs[0].index == 0
                and self._count_fragment0_sync() % self.config.divergence_every == 0
            ):
                self._measure_divergence(self._event)
            self._close_event()
        self._exit_call(enter)

    def finalize(self) -> None:
        """Wait for every collective still in flight and apply it as one plain step at the outer learning rate,
        φ ← φ − lr·g, oldest first, leaving the outer optimizer's momentum untouched (ALGORITHMS.md, section 6):
        g = Δ(t) for overlap and delayed, g = Δ(t) − (1/M)·Δ_m(t) for eager. Then θ ← φ: the model holds the
        outer parameters, the ones to evaluate and save. Local progress since each fragment's last sync point is
        dropped (it belongs to no outer gradient)."""
        if self.finalized:
            return
        enter = self._enter_call()
        self._open_event(kind="finalize")
        assert self._event is not None
        for state in self.states:  # fragment order, oldest first: the same on every worker
            while state.in_flight:
                item = state.in_flight.popleft()
                mean = self.wait(state, item)
                if not self.check_average(state, item, mean):  # nonfinite='skip': nothing of it is applied
                    continue
                g = self.strategy.final_gradient(item, mean)
                self._check_finite(g, state, item.launch_step)
                lr = state.outer_optimizer.param_groups[0]["lr"]
                state.phi.add_(g, alpha=-lr)
                self._event.fragments_applied.append(state.index)
            self.reset_inner(state)
        self._arrivals.clear()
        self.stats.finalize_blocked_s += self._blocked_in_call
        if self._event.fragments_applied:
            self._close_event()
        else:
            self._event = None
        self._exit_call(enter)
        self.finalized = True

    def consolidate(self) -> None:
        """Eager: average φ_m across workers (one blocking all-reduce per fragment) and load it into the model,
        so that every worker holds the same final model. A no-op in the other modes, where φ is already
        identical. Call after :meth:`finalize`."""
        if not self.finalized:
            raise RuntimeError("consolidate() needs finalize() first: averages still in flight would be lost")
        if self.strategy.uniform_outer_state or self.world_size == 1:
            return
        before = self.comm.stats.wire_bytes
        buffers = [state.phi.clone() for state in self.states]
        works = [self.comm.all_reduce_sum(buf) for buf in buffers]
        for state, buf, work in zip(self.states, buffers, works):
            self._wait_diagnosed(work, f"consolidate() (the average of φ, fragment {state.index})")
            state.phi.copy_(buf.div_(self.world_size))
            self.reset_inner(state)
        self.stats.diagnostic_bytes += self.comm.stats.wire_bytes - before

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluation, checkpointing, logging) counts neither as compute nor as wall time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._last_exit += time.perf_counter() - start

    def reopen(self) -> None:
        """Continue training after :meth:`finalize` (e.g. a finished run resumed with more steps): allowed because
        finalize left nothing in flight. The next :meth:`finalize` drains what the new steps launch."""
        if any(state.in_flight for state in self.states):
            raise RuntimeError("reopen() with averages in flight: only a finalized wrapper can be reopened")
        self.finalized = False

    def reset_clock(self) -> None:
        """Restart the measurements (e.g. after warm-up or after loading a checkpoint)."""
        self.stats = RunStats(inner_steps=self.inner_step)
        self.records = []
        self._window_inner_s = self._window_wall_s = 0.0
        self._last_exit = time.perf_counter()

    def add_record_listener(self, listener: Callable[[OuterStepRecord], None]) -> None:
        """Call ``listener(record)`` for every outer-step record (metrics logging)."""
        self._record_listeners.append(listener)

    def outer_parameters(self) -> dict[str, torch.Tensor]:
        """φ as a ``{parameter name: tensor}`` dict (views into the flat buffers, on the outer device).

        With a layout, each parameter in the form this rank holds it: its local shard for FSDP2 parameters
        (shaped like ``p.to_local()``), the full tensor for replicated (DDP) ones. When replicated parameters are
        split over the worker's ranks the values are gathered (copies, on the model's device) with a collective
        on the worker's inner group: every rank of the worker must then call this method."""
        out: dict[str, torch.Tensor] = {}
        for state in self.states:
            out.update(zip(state.fragment.names, state.view.local_values(state.phi)))
        return out

    def full_outer_parameters(self) -> dict[str, torch.Tensor]:
        """φ as ``{parameter name: full tensor}``: FSDP2 shards and split replicas are gathered inside the worker
        (a collective on its inner group when a layout shards anything: every rank of the worker must call
        it). For evaluating or saving the whole model on one rank; equal to :meth:`outer_parameters` with one
        rank per worker."""
        out: dict[str, torch.Tensor] = {}
        for state in self.states:
            out.update(zip(state.fragment.names, state.view.full_values(state.phi)))
        return out

    def copy_outer_parameters_to(self, module: nn.Module) -> None:
        """Load φ into another module of the same architecture (e.g. to evaluate mid-training).

        With a layout, ``module`` may be sharded the same way as the wrapped model (its FSDP2 parameters get this
        rank's shards) or be a plain module (it gets the full tensors, gathered inside the worker: every rank of
        the worker must call this method)."""
        params = dict(module.named_parameters())
        phi = self.outer_parameters()
        missing = sorted(set(phi) - set(params))
        if missing:
            raise ValueError(f"module lacks parameters {missing[:5]}: it is not the wrapped model's architecture")
        sharded_source = {n for state in self.states for n, p in zip(state.fragment.names, state.fragment.params)
                          if is_dtensor(p)}  # fmt: skip
        if any(not is_dtensor(params[n]) for n in sharded_source):
            phi = self.full_outer_parameters()  # a plain target needs the whole tensor of a sharded source
        targets = [params[n].to_local() if is_dtensor(params[n]) else params[n] for n in phi]
        with torch.no_grad():
            torch._foreach_copy_(targets, list(phi.values()))

    # ------------------------------------------------------------------ the core, used by the strategies

    def launch(self, state: FragmentState, t: int, keep_own: bool = False) -> InFlight:
        """Δ_m(t) = φ − θ(t) for this fragment, handed to the reducer; queued as in flight. With ``keep_own``
        (eager) also keep (1/M)·Δ_m(t), the contribution applied at once."""
        theta = state.view.read_theta()  # this rank's owned elements of θ (all of them with one rank per worker)
        theta = theta if theta.device == state.phi.device else theta.to(state.phi.device)
        delta = torch.sub(state.phi, theta)
        own_finite = bool(torch.isfinite(delta).all())
        # A non-finite Δ_m is NOT raised here: the other workers would then block on a collective this worker
        # never joins. It is launched like any other: NaN/Inf in one contribution makes the average non-finite
        # on every worker (gloo and the codecs give every worker the same bits; a codec sends a payload that
        # decodes to NaN), so every worker takes the same decision in check_average when the average arrives.
        pending = state.reducer.launch(delta)  # may add the error-feedback residual into delta, in place
        if self._event is not None:
            self._event.payload_bytes += pending.payload_bytes
            if own_finite:
                self._event.delta_norm = math.hypot(self._event.delta_norm, float(delta.norm()))
        own = None
        if keep_own:  # eager applies this at once: never a non-finite contribution, φ stays finite
            own = delta.div_(self.world_size) if own_finite else torch.zeros_like(delta)
        item = InFlight(launch_step=t, mean=pending, own=own, own_finite=own_finite)
        state.in_flight.append(item)
        return item

    def wait(self, state: FragmentState, item: InFlight) -> torch.Tensor:
        """The average launched at ``item.launch_step``; the time spent waiting counts as blocked."""
        start = time.perf_counter()
        try:
            mean = item.mean.wait(self.config.collective_timeout_s)
        except (CollectiveTimeout, CollectiveAborted) as exc:
            raise type(exc)(
                f"outer step {self.outer_index(state, item.launch_step)} of fragment {state.index} (launched at "
                f"inner step {item.launch_step}, waited for at inner step {self.inner_step}) failed on "
                f"{self.comm.describe()} (collective_timeout_s={self.config.collective_timeout_s}): {exc}; "
                f"{self.comm.diagnose_peers()}"
            ) from exc
        except Exception as exc:
            raise type(exc)(
                f"outer step {self.outer_index(state, item.launch_step)} of fragment {state.index}: the average "
                f"launched at inner step {item.launch_step} failed on {self.comm.describe()}: {exc}"
            ) from exc
        blocked = time.perf_counter() - start
        self.stats.blocked_s += blocked
        self._blocked_in_call += blocked
        if self._event is not None:
            self._event.blocked_s += blocked
        return mean

    def check_average(self, state: FragmentState, item: InFlight, mean: torch.Tensor) -> bool:
        """True when the average Δ(t) of ``item`` is finite and may be applied. Otherwise some worker's
        contribution held NaN/Inf; every worker sees the same non-finite average at the same outer step, so all
        take the same decision: ``nonfinite='raise'`` raises :class:`NonFiniteOuterGradient`, ``'skip'`` counts
        the skip and returns False (the caller then leaves φ and the outer optimizer untouched and sets θ ← φ)."""
        if bool(torch.isfinite(mean).all()):
            return True
        bad = int((~torch.isfinite(mean)).sum())
        whose = (
            "this worker's own outer gradient was not finite"
            if not item.own_finite
            else "this worker's own outer gradient was finite: another worker's was not"
        )
        where = (
            f"outer step {self.outer_index(state, item.launch_step)} of fragment {state.index} (launched at inner "
            f"step {item.launch_step})"
        )
        if self.config.nonfinite == "raise":
            raise NonFiniteOuterGradient(
                f"the average outer gradient of {where} has {bad} non-finite values (NaN/Inf) on "
                f"{self.comm.describe()} at inner step {self.inner_step}; {whose}. The outer parameters were not "
                "touched and every worker stops here. Lower the inner learning rate, enable gradient clipping, or "
                "set nonfinite='skip'."
            )
        self.stats.skipped_outer_steps += 1
        if self._event is not None:
            self._event.skipped = True
        warnings.warn(
            f"skipping {where} on {self.comm.describe()}: the average has {bad} non-finite values ({whose})",
            RuntimeWarning,
            stacklevel=2,
        )
        return False

    def outer_index(self, state: FragmentState, t: int) -> int:
        """The outer step number (1, 2, ...) of ``state``'s fragment whose sync point is inner step ``t``."""
        offset = state.fragment.offset % self.config.sync_every
        return (t - offset) // self.config.sync_every + (1 if offset > 0 else 0)

    def apply(self, state: FragmentState, g: torch.Tensor, launched_at: int) -> None:
        """φ ← OuterOpt(φ, g) for this fragment."""
        self._check_finite(g, state, launched_at)
        state.phi.grad = g
        state.outer_optimizer.step()
        state.phi.grad = None
        if self._event is not None:
            self._event.fragments_applied.append(state.index)
            self._event.applied_norm = math.hypot(self._event.applied_norm, float(g.norm()))
            self._event.staleness = max(self._event.staleness, self.inner_step - launched_at)

    def reset_inner(self, state: FragmentState, alpha: float = 0.0) -> None:
        """θ ← α·θ + (1 − α)·φ for this fragment (θ ← φ when α = 0). With a layout whose workers hold replicated
        parameters this ends with one blocking all-gather inside the worker (see engine/sharding.py)."""
        state.view.write_theta(state.phi, alpha)

    def schedule_arrival(self, state: FragmentState, t: int) -> None:
        """Have ``strategy.on_arrival`` called for this fragment at inner step ``t``."""
        self._arrivals.setdefault(t, []).append(state)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The outer loop's state: φ, outer optimizer and reducer state per fragment, and the averages in flight.

        Averages in flight are waited for (blocking) and stored by value, together with eager's own
        contributions: a resumed run applies exactly what the uninterrupted run would have. Save the model's
        and the inner optimizer's ``state_dict()`` next to it: θ is theirs.
        """
        fragments = []
        for state in self.states:
            in_flight = []
            for item in state.in_flight:
                in_flight.append(
                    {
                        "launch_step": item.launch_step,
                        "mean": self.wait(state, item).clone(),
                        "own": None if item.own is None else item.own.clone(),
                        "own_finite": item.own_finite,
                        "payload_bytes": item.mean.payload_bytes,
                    }
                )
            fragments.append(
                {
                    "names": list(state.fragment.names),
                    "phi": state.phi.clone(),
                    "outer_optimizer": state.outer_optimizer.state_dict(),
                    "reducer": state.reducer.state_dict(),
                    "in_flight": in_flight,
                    "arrivals": sorted(t for t, states in self._arrivals.items() if any(s is state for s in states)),
                }
            )
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "world_size": self.world_size,
            "rank": self.rank,
            "layout": self._layout_key(),
            "inner_step": self.inner_step,
            "finalized": self.finalized,
            "fragments": fragments,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Refuses a checkpoint from another schedule or number of workers, and from
        another mode (delay, τ, codec) unless it was written after :meth:`finalize`: nothing is in flight then,
        so the outer loop may continue in another mode from φ, with a fresh outer optimizer state (eager's
        per-worker momentum must not leak into a mode whose outer state is uniform). Call :meth:`reopen` to
        continue training after loading a finalized state."""
        if state_dict.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unknown DiLoCo checkpoint format {state_dict.get('format')!r}")
        saved = state_dict["config"]
        drained = bool(state_dict.get("finalized")) and not any(f["in_flight"] for f in state_dict["fragments"])
        switchable = ("mode", "overlap_steps", "delay", "compression", "error_feedback")
        switched = False
        for key in ("mode", "sync_every", "num_fragments", "fragment_layout", "overlap_steps", "delay", "compression"):
            if saved.get(key) != getattr(self.config, key):
                if drained and key in switchable:
                    switched = True
                    continue
                hint = (
                    " (another mode is possible only from a state saved after finalize())" if key in switchable else ""
                )
                raise ValueError(
                    f"checkpoint was written with {key}={saved.get(key)!r}, this run has {key}="
                    f"{getattr(self.config, key)!r}: resume with the same setting{hint}"
                )
        switched = switched or (drained and saved.get("error_feedback", False) != self.config.error_feedback)
        if state_dict["world_size"] != self.world_size:
            raise ValueError(
                f"checkpoint was written by {state_dict['world_size']} workers, this run has {self.world_size}"
            )
        if state_dict.get("layout") != self._layout_key():
            raise ValueError(
                f"checkpoint was written by a rank with layout {state_dict.get('layout')}, this rank has "
                f"{self._layout_key()}: resume with the same ranks per worker and parallelism"
            )
        if len(state_dict["fragments"]) != len(self.states):
            raise ValueError("checkpoint has a different number of fragments")
        self._arrivals.clear()
        for state, saved_fragment in zip(self.states, state_dict["fragments"]):
            if saved_fragment["names"] != state.fragment.names:
                raise ValueError(f"fragment {state.index} holds other parameters in the checkpoint")
            state.phi.copy_(saved_fragment["phi"])
            if not switched:  # a new mode starts a new outer loop: fresh outer optimizer and codec state
                state.outer_optimizer.load_state_dict(saved_fragment["outer_optimizer"])
                state.reducer.load_state_dict(saved_fragment["reducer"])
            state.in_flight = deque(
                InFlight(
                    launch_step=item["launch_step"],
                    mean=CompletedMean(item["mean"].to(state.phi.device), item["payload_bytes"]),
                    own=None if item["own"] is None else item["own"].to(state.phi.device),
                    own_finite=item.get("own_finite", True),
                )
                for item in saved_fragment["in_flight"]
            )
            for t in saved_fragment["arrivals"]:
                self.schedule_arrival(state, t)
        self.inner_step = state_dict["inner_step"]
        self.finalized = state_dict["finalized"]
        self.reset_clock()

    # ------------------------------------------------------------------ internals

    def _enter_call(self) -> float:
        """Start of a step()/finalize() call: the time since the previous call was inner compute."""
        enter = time.perf_counter()
        inner = enter - self._last_exit
        self.stats.inner_s += inner
        self._window_inner_s += inner
        self._window_wall_s += inner
        self._window_mark = enter
        self._blocked_in_call = 0.0
        return enter

    def _exit_call(self, enter: float) -> None:
        exit_ = time.perf_counter()
        self.stats.overhead_s += (exit_ - enter) - self._blocked_in_call
        self._window_wall_s += exit_ - self._window_mark
        self._last_exit = exit_

    def _open_event(self, kind: str = "step") -> None:
        self._event = OuterStepRecord(inner_step=self.inner_step, kind=kind)
        self._event_wire_start = self.comm.stats.wire_bytes
        self._event_diagnostic_start = self.stats.diagnostic_bytes

    def _close_event(self) -> None:
        """Finish the current record: its window runs from the previous record's end to now."""
        event = self._event
        assert event is not None
        now = time.perf_counter()
        in_call = now - self._window_mark
        event.overhead_s = max(0.0, (now - self._window_mark) - event.blocked_s)
        event.window_inner_s = self._window_inner_s
        event.window_wall_s = self._window_wall_s + in_call
        event.utilization = event.window_inner_s / event.window_wall_s if event.window_wall_s > 0 else 1.0
        diagnostic = self.stats.diagnostic_bytes - self._event_diagnostic_start
        event.wire_bytes = self.comm.stats.wire_bytes - self._event_wire_start - diagnostic
        if event.kind == "step":
            self.stats.outer_steps += 1
        self.stats.payload_bytes += event.payload_bytes
        self.stats.wire_bytes += event.wire_bytes
        self.records.append(event)
        for listener in self._record_listeners:
            listener(event)
        self._event = None
        self._window_inner_s = 0.0
        self._window_wall_s = 0.0
        self._window_mark = now

    def _count_fragment0_sync(self) -> int:
        self._outer_steps_fragment0 += 1
        return self._outer_steps_fragment0

    def _check_finite(self, g: torch.Tensor, state: FragmentState, t: int, fresh: bool = False) -> None:
        if bool(torch.isfinite(g).all()):
            return
        bad = int((~torch.isfinite(g)).sum())
        what = "this worker's fresh outer gradient Δ_m" if fresh else "the outer gradient to apply"
        raise NonFiniteOuterGradient(
            f"{what} for fragment {state.index} (launched at inner step {t}) has {bad} non-finite values "
            f"(NaN/Inf) on {self.comm.describe()} at inner step {self.inner_step}; the outer parameters were not "
            "touched. Lower the inner learning rate or enable gradient clipping."
        )

    def _wait_diagnosed(self, work: Any, what: str) -> None:
        """``work.wait`` bounded by ``collective_timeout_s``; a failure names ``what`` and the silent peers."""
        try:
            work.wait(self.config.collective_timeout_s)
        except (CollectiveTimeout, CollectiveAborted) as exc:
            raise type(exc)(
                f"{what} failed on {self.comm.describe()} (collective_timeout_s="
                f"{self.config.collective_timeout_s}): {exc}; {self.comm.diagnose_peers()}"
            ) from exc

    def _measure_divergence(self, event: OuterStepRecord) -> None:
        """‖φ_m − mean φ‖ over all fragments: one blocking all-reduce of φ (diagnostic traffic)."""
        before = self.comm.stats.wire_bytes
        start = time.perf_counter()
        buffers = [state.phi.clone() for state in self.states]
        works = [self.comm.all_reduce_sum(buf) for buf in buffers]
        dist_sq = 0.0
        norm_sq = 0.0
        for state, buf, work in zip(self.states, buffers, works):
            self._wait_diagnosed(
                work, f"the divergence measurement at inner step {self.inner_step} (fragment {state.index})"
            )
            mean = buf.div_(self.world_size)
            dist_sq += float(torch.sub(state.phi, mean).pow_(2).sum())
            norm_sq += float(mean.pow(2).sum())
        blocked = time.perf_counter() - start
        self.stats.blocked_s += blocked
        self._blocked_in_call += blocked
        event.blocked_s += blocked
        self.stats.diagnostic_bytes += self.comm.stats.wire_bytes - before
        event.divergence = math.sqrt(dist_sq)
        event.divergence_rel = math.sqrt(dist_sq / norm_sq) if norm_sq > 0 else 0.0

    def _layout_key(self) -> dict[str, Any] | None:
        """What a checkpoint of this rank's outer state depends on beyond the configuration (None: one rank per
        worker)."""
        if self.layout is None:
            return None
        return {
            "ranks_per_worker": self.layout.ranks_per_worker,
            "inner_rank": self.layout.inner_rank,
            "owned": [view.numel for view in self._views],
        }

    def _check_same_model_and_config(self) -> None:
        entries = [
            (name, local_shape(p), str(p.dtype), fragment.index)  # the local shard's shape for FSDP2 parameters
            for fragment in self.fragments
            for name, p in zip(fragment.names, fragment.params)
        ]
        schedule = {k: v for k, v in self.config.to_dict().items() if k != "outer_device"}
        if self.layout is not None:  # rank n of every worker must own the same elements of every fragment
            schedule["layout"] = (
                f"{self.layout.ranks_per_worker} ranks per worker; owned elements per fragment "
                f"{[view.numel for view in self._views]} ({[view.sharded_numel for view in self._views]} sharded)"
            )
        digest = hashlib.sha256(repr((entries, sorted(schedule.items()))).encode()).hexdigest()
        mine = (digest, entries, schedule)
        if self.world_size == 1:
            return
        everyone = self.comm.all_gather_object(mine)
        for rank, (other_digest, other_entries, other_schedule) in enumerate(everyone):
            if other_digest == digest:
                continue
            if other_schedule != schedule:
                diff = sorted(k for k in schedule if schedule[k] != other_schedule.get(k))
                raise ModelMismatch(
                    f"worker {rank} runs another configuration than worker {self.rank}: "
                    + ", ".join(f"{k}={other_schedule.get(k)!r} vs {schedule[k]!r}" for k in diff)
                )
            for index, (a, b) in enumerate(zip(entries, other_entries)):
                if a != b:
                    raise ModelMismatch(
                        f"models differ across workers at parameter #{index}: worker {self.rank} has {a[0]!r} "
                        f"{a[1]} {a[2]} (fragment {a[3]}), worker {rank} has {b[0]!r} {b[1]} {b[2]} "
                        f"(fragment {b[3]})"
                    )
            raise ModelMismatch(
                f"models differ across workers: worker {self.rank} has {len(entries)} trainable parameters, "
                f"worker {rank} has {len(other_entries)}"
            )


def _codec_reducer_factory(config: DiLoCoConfig) -> Callable[[int, Communicator], Reducer]:
    if config.compression == "none":
        return lambda index, comm: MeanReducer(comm)
    try:
        from eagerloco.compression import make_reducer
    except ImportError as exc:  # pragma: no cover - the package ships with eagerloco
        raise ConfigError(f"compression={config.compression!r} needs eagerloco.compression: {exc}") from exc
    return lambda index, comm: make_reducer(config.compression, comm, error_feedback=config.error_feedback)
