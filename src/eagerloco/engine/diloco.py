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

State per fragment p (see :class:`eagerloco.engine.core.FragmentCore`): the outer parameters φ_p as one flat
fp32 buffer (on ``outer_device``), the outer optimizer stepping it, the reducer (codec) that averages its outer
gradients, and the queue of averages in flight. The formulas of every mode are in
:mod:`eagerloco.engine.strategies`; the measurements in :mod:`eagerloco.engine.recorder`. The model's
parameters θ are only read and written with ``torch._foreach_*`` copies between the flat buffer and the
parameter list: no Python loop over parameters on the hot path.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from eagerloco.comm.base import CollectiveAborted, CollectiveTimeout, Communicator
from eagerloco.comm.reducer import CompletedMean, MeanReducer, Reducer
from eagerloco.engine.config import REMOVED_FIELDS, ConfigError, DiLoCoConfig
from eagerloco.engine.core import EngineContext, FragmentCore, InFlight
from eagerloco.engine.errors import ModelMismatch, NonFiniteOuterGradient
from eagerloco.engine.fragments import build_fragments
from eagerloco.engine.metrics import OuterStepRecord, RunStats
from eagerloco.engine.recorder import Recorder, RecordListener
from eagerloco.engine.sharding import FragmentView, check_replicas_agree, is_dtensor, local_shape
from eagerloco.engine.strategies import OuterStrategy, make_strategy

if TYPE_CHECKING:
    from eagerloco.distributed import WorkerLayout

__all__ = [
    "CHECKPOINT_FORMAT",
    "DiLoCo",
    "FragmentCore",
    "FragmentState",
    "InFlight",
    "ModelMismatch",
    "NonFiniteOuterGradient",
    "OuterOptimizerFactory",
    "default_outer_optimizer",
]

OuterOptimizerFactory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]

CHECKPOINT_FORMAT = 1

FragmentState = FragmentCore
"""The per-fragment state's former name (``DiLoCo.states`` holds :class:`FragmentCore` objects)."""


def check_saved_config(saved: dict[str, Any]) -> None:
    """Refuse a saved configuration (``state_dict()["config"]``) written with a setting this eagerloco no longer
    has (``REMOVED_FIELDS``: ``eager_lookahead=True``, ALGORITHMS.md 4.2; ``eager_swap_steps`` set, 4.3). A
    checkpoint written while such a setting existed but with it off trained as today's code does, and loads."""
    for key, (off, section, commit) in REMOVED_FIELDS.items():
        value = saved.get(key, off)
        if value != off:
            raise ValueError(
                f"checkpoint was written with {key}={value!r}: that variant of eager was removed after its "
                f"measurement (ALGORITHMS.md {section}); continue this run with a checkout at commit {commit}"
            )


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
        fragments: explicit streaming fragments: one module (or list of modules) per fragment; a module may be
            named by an ``fnmatch`` pattern over ``model.named_modules()`` (``["transformer.h.0", "transformer.wte"]``).
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
        fragments: Sequence[nn.Module | str | Sequence[nn.Module | str]] | None = None,
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
        # The strategy's parameters are checked against M here, before any collective (eager_own_weight >= 1/M),
        # where M is fixed; a membership that changes (eagerloco.ft) has one M per quorum (ALGORITHMS.md 4.1).
        self.strategy: OuterStrategy = make_strategy(cfg, self.world_size, getattr(comm, "fixed_membership", True))
        self.fragments = build_fragments(
            model, cfg.num_fragments, cfg.sync_every, cfg.fragment_layout, modules=fragments, blocks=blocks
        )
        if reducer_factory is None:
            reducer_factory = _codec_reducer_factory(cfg)
        factory = outer_optimizer or default_outer_optimizer(cfg)

        # This rank's share of every fragment (all of it with one rank per worker; see engine/sharding.py).
        views = [FragmentView(fragment, layout) for fragment in self.fragments]
        if layout is not None and layout.outer_backend == "gloo":  # gloo moves CPU tensors: φ must live there
            for view in views:
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
        self._check_same_model_and_config(views)
        check_replicas_agree(views, layout)

        self._recorder = Recorder(comm)
        self._context = EngineContext(comm=comm, config=cfg, recorder=self._recorder)
        self.states: list[FragmentCore] = []
        """One :class:`FragmentCore` per fragment, in fragment order: φ (``.phi``), ``.outer_optimizer``, ..."""
        for fragment, view in zip(self.fragments, views):
            device = view.staging.device
            outer_device = torch.device(cfg.outer_device) if cfg.outer_device is not None else device
            phi = view.read_theta().to(outer_device, copy=True)
            self.states.append(
                FragmentCore(
                    fragment=fragment,
                    phi=phi,
                    outer_optimizer=factory([phi]),
                    reducer=reducer_factory(fragment.index, comm),
                    view=view,
                    context=self._context,
                )
            )
        if cfg.broadcast_initial_parameters and self.world_size > 1:
            # All workers must start from the same φ_0 (prime-diloco shipped a bug where they did not).
            works = [comm.broadcast(core.phi, src=0) for core in self.states]
            for core, work in zip(self.states, works):
                self._wait_diagnosed(work, f"the broadcast of worker 0's initial parameters (fragment {core.index})")
            for core in self.states:
                core.write_theta(core.phi)  # θ ← φ_0

        # The schedule: fragment p syncs at t ≡ offset_p (mod H). Precomputed so step() is O(1) off sync points.
        self._sync_at: dict[int, list[FragmentCore]] = {}
        for core in self.states:
            self._sync_at.setdefault(core.fragment.offset % cfg.sync_every, []).append(core)

        self.finalized = False
        self._outer_steps_fragment0 = 0
        self._hook: Any = None  # the inner optimizer's step post-hook while inside ``with DiLoCo(...)``
        self._stepping_from_hook = False

    # ------------------------------------------------------------------ drop-in use: the optimizer hook

    def __enter__(self) -> DiLoCo:
        """``with DiLoCo(model, inner, config) as loco:`` -- the loop stays as it is: a post-hook on the inner
        optimizer (``register_step_post_hook``) calls :meth:`step` after every inner ``optimizer.step()``, exactly
        one outer step per inner step as in the explicit API; leaving the block drains and consolidates
        (:meth:`finalize`, :meth:`consolidate`), so the model holds φ after it. Calling :meth:`step` by hand inside
        the block is refused (it would double-step). An optimizer wrapper (Accelerate's ``AcceleratedOptimizer``)
        is unwrapped to the ``torch.optim.Optimizer`` whose ``step()`` really runs: a step it skips (gradient
        accumulation, an AMP overflow) is no inner step and no outer step."""
        if self._hook is not None:
            raise RuntimeError("DiLoCo is already in use as a context manager: enter it once")
        if self.finalized:
            raise RuntimeError("with DiLoCo(...) after finalize(): create a new wrapper (or reopen() it)")
        optimizer = _innermost_optimizer(self.inner_optimizer)
        self._hook = optimizer.register_step_post_hook(self._on_inner_step)
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        hook, self._hook = self._hook, None
        if hook is not None:
            hook.remove()
        if exc_type is None:  # after an error another worker may never reach the collectives: do not drain
            self.finalize()
            self.consolidate()

    def _on_inner_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._stepping_from_hook = True
        try:
            self.step()
        finally:
            self._stepping_from_hook = False

    # ------------------------------------------------------------------ the user's calls

    def step(self) -> None:
        """Call once after every inner optimizer step. Runs the outer work due at this inner step. (Inside
        ``with DiLoCo(...)`` the inner optimizer's hook calls it: do not.)"""
        if self._hook is not None and not self._stepping_from_hook:
            raise RuntimeError(
                "loco.step() called by hand inside `with DiLoCo(...)`: the inner optimizer's hook already runs it "
                "after every optimizer.step(); remove the manual call (it would take two outer steps per inner step)"
            )
        recorder, context = self._recorder, self._context
        recorder.enter()
        if self.finalized:
            raise RuntimeError("step() after finalize(): create a new DiLoCo wrapper to continue training")
        context.inner_step = t = context.inner_step + 1
        recorder.stats.inner_steps = t
        arrivals = context.arrivals.pop(t, None)
        syncs = self._sync_at.get(t % self.config.sync_every)
        if arrivals or syncs:
            recorder.open(t)
            # Order matters for deadlock freedom: arrivals (waits only) first, then launches in fragment order.
            for core in arrivals or ():
                self.strategy.on_arrival(core, t)
            for core in syncs or ():
                self.strategy.on_sync(core, t)
            if (
                self.config.divergence_every
                and syncs
                and syncs[0].index == 0
                and self._count_fragment0_sync() % self.config.divergence_every == 0
            ):
                self._measure_divergence()
            recorder.close()
        recorder.exit()

    def finalize(self) -> None:
        """Wait for every collective still in flight and apply it as one plain step at the outer learning rate,
        φ ← φ − lr·g, oldest first, leaving the outer optimizer's momentum untouched (ALGORITHMS.md, section 6;
        ``OuterStrategy.finalize``): g = Δ(t) for overlap and delayed, g = Δ(t) − (1/M)·Δ_m(t) for eager. Then
        θ ← φ: the model holds the outer parameters, the ones to evaluate and save. Local progress since each
        fragment's last sync point is dropped (it belongs to no outer gradient)."""
        if self.finalized:
            return
        recorder = self._recorder
        recorder.enter()
        recorder.open(self.inner_step, kind="finalize")
        for core in self.states:  # fragment order, oldest first: the same on every worker
            self.strategy.finalize(core)
        self._context.arrivals.clear()
        recorder.close()  # a 'finalize' record that applied nothing is dropped
        recorder.exit()
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
        buffers = [core.phi.clone() for core in self.states]
        works = [self.comm.all_reduce_sum(buf) for buf in buffers]
        for core, buf, work in zip(self.states, buffers, works):
            self._wait_diagnosed(work, f"consolidate() (the average of φ, fragment {core.index})")
            core.phi.copy_(buf.div_(self.world_size))
            core.write_theta(core.phi)  # θ ← φ
        self._recorder.diagnostic(self.comm.stats.wire_bytes - before)

    def paused(self) -> AbstractContextManager[None]:
        """Time spent inside (evaluation, checkpointing, logging) counts neither as compute nor as wall time.
        Re-entrant: only the outermost one counts."""
        return self._recorder.paused()

    def reopen(self) -> None:
        """Continue training after :meth:`finalize` (e.g. a finished run resumed with more steps): allowed because
        finalize left nothing in flight. The next :meth:`finalize` drains what the new steps launch."""
        if any(state.in_flight for state in self.states):
            raise RuntimeError("reopen() with averages in flight: only a finalized wrapper can be reopened")
        self.finalized = False

    def reset_clock(self) -> None:
        """Restart the measurements (e.g. after warm-up or after loading a checkpoint)."""
        self._recorder.reset_clock(inner_steps=self.inner_step)

    def add_record_listener(self, listener: RecordListener) -> None:
        """Call ``listener(record)`` for every outer-step record (metrics logging)."""
        self._recorder.add_record_listener(listener)

    def elapsed_s(self) -> float:
        """Wall seconds since creation or :meth:`reset_clock`, time inside :meth:`paused` excluded."""
        return self._recorder.elapsed_s()

    @property
    def stats(self) -> RunStats:
        """The run's totals since creation or :meth:`reset_clock` (:class:`RunStats`)."""
        return self._recorder.stats

    @property
    def records(self) -> list[OuterStepRecord]:
        """One :class:`OuterStepRecord` per ``step()`` with outer work (and one for a ``finalize()`` that applied
        something), since creation or :meth:`reset_clock`."""
        return self._recorder.records

    @property
    def inner_step(self) -> int:
        """t: the number of ``step()`` calls (restored by :meth:`load_state_dict`)."""
        return self._context.inner_step

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
                        "mean": state.wait(item).clone(),
                        "own": None if item.own is None else item.own.clone(),
                        "share": None if item.share is None else item.share.clone(),
                        "own_finite": item.own_finite,
                        "payload_bytes": item.mean.payload_bytes,
                        "dropped": bool(getattr(item.mean, "dropped", False)),
                    }
                )
            fragments.append(
                {
                    "names": list(state.fragment.names),
                    "phi": state.phi.clone(),
                    "outer_optimizer": state.outer_optimizer.state_dict(),
                    "reducer": state.reducer.state_dict(),
                    "in_flight": in_flight,
                    "arrivals": sorted(
                        t for t, cores in self._context.arrivals.items() if any(c is state for c in cores)
                    ),
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
        check_saved_config(saved)
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
        self._context.arrivals.clear()
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
                    mean=restored_mean(item, state.phi.device),
                    own=None if item["own"] is None else item["own"].to(state.phi.device),
                    share=None if item.get("share") is None else item["share"].to(state.phi.device),
                    own_finite=item.get("own_finite", True),
                )
                for item in saved_fragment["in_flight"]
            )
            for t in saved_fragment["arrivals"]:
                state.schedule_arrival(t)
        self._context.inner_step = state_dict["inner_step"]
        self.finalized = state_dict["finalized"]
        self.reset_clock()

    # ------------------------------------------------------------------ internals

    def _count_fragment0_sync(self) -> int:
        self._outer_steps_fragment0 += 1
        return self._outer_steps_fragment0

    def _wait_diagnosed(self, work: Any, what: str) -> None:
        """``work.wait`` bounded by ``collective_timeout_s``; a failure names ``what`` and the silent peers."""
        try:
            work.wait(self.config.collective_timeout_s)
        except (CollectiveTimeout, CollectiveAborted) as exc:
            raise type(exc)(
                f"{what} failed on {self.comm.describe()} (collective_timeout_s="
                f"{self.config.collective_timeout_s}): {exc}; {self.comm.diagnose_peers()}"
            ) from exc

    def _measure_divergence(self) -> None:
        """‖φ_m − mean φ‖ over all fragments: one blocking all-reduce of φ (diagnostic traffic)."""
        before = self.comm.stats.wire_bytes
        start = time.perf_counter()
        buffers = [core.phi.clone() for core in self.states]
        works = [self.comm.all_reduce_sum(buf) for buf in buffers]
        dist_sq = 0.0
        norm_sq = 0.0
        for core, buf, work in zip(self.states, buffers, works):
            self._wait_diagnosed(
                work, f"the divergence measurement at inner step {self.inner_step} (fragment {core.index})"
            )
            mean = buf.div_(self.world_size)
            dist_sq += float(torch.sub(core.phi, mean).pow_(2).sum())
            norm_sq += float(mean.pow(2).sum())
        self._recorder.blocked(time.perf_counter() - start)
        self._recorder.diagnostic(self.comm.stats.wire_bytes - before)
        self._recorder.divergence(math.sqrt(dist_sq), math.sqrt(dist_sq / norm_sq) if norm_sq > 0 else 0.0)

    def _layout_key(self) -> dict[str, Any] | None:
        """What a checkpoint of this rank's outer state depends on beyond the configuration (None: one rank per
        worker)."""
        if self.layout is None:
            return None
        return {
            "ranks_per_worker": self.layout.ranks_per_worker,
            "inner_rank": self.layout.inner_rank,
            "owned": [core.view.numel for core in self.states],
        }

    def _check_same_model_and_config(self, views: list[FragmentView]) -> None:
        entries = [
            (name, local_shape(p), str(p.dtype), fragment.index)  # the local shard's shape for FSDP2 parameters
            for fragment in self.fragments
            for name, p in zip(fragment.names, fragment.params)
        ]
        schedule = {k: v for k, v in self.config.to_dict().items() if k != "outer_device"}
        if self.layout is not None:  # rank n of every worker must own the same elements of every fragment
            schedule["layout"] = (
                f"{self.layout.ranks_per_worker} ranks per worker; owned elements per fragment "
                f"{[view.numel for view in views]} ({[view.sharded_numel for view in views]} sharded)"
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


def _innermost_optimizer(optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` whose ``step()`` really runs (through wrappers that hold it as
    ``.optimizer``, like Accelerate's ``AcceleratedOptimizer``); refuses a wrapper without step hooks."""
    if optimizer is None:
        raise ConfigError("with DiLoCo(...) needs the inner optimizer: DiLoCo(model, inner_optimizer, config)")
    seen = 0
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer) and seen < 8:
        optimizer = optimizer.optimizer  # type: ignore[union-attr]
        seen += 1
    if not hasattr(optimizer, "register_step_post_hook"):
        raise ConfigError(
            f"inner optimizer {type(optimizer).__name__} has no register_step_post_hook: call loco.step() by hand"
        )
    return optimizer


def restored_mean(item: dict[str, Any], device: torch.device) -> CompletedMean:
    """A saved average in flight, with the drop decision fault tolerance took for it (ALGORITHMS.md section 11)."""
    mean = CompletedMean(item["mean"].to(device), item["payload_bytes"])
    if item.get("dropped", False):
        mean.dropped = True  # type: ignore[attr-defined]
    return mean


def _codec_reducer_factory(config: DiLoCoConfig) -> Callable[[int, Communicator], Reducer]:
    if config.compression == "none":
        return lambda index, comm: MeanReducer(comm)
    from eagerloco.compression import make_reducer  # imported only when a codec is used

    return lambda index, comm: make_reducer(config.compression, comm, error_feedback=config.error_feedback)
