"""The per-fragment core: the narrow interface the strategies (:mod:`eagerloco.engine.strategies`) work through.

One :class:`FragmentCore` per streaming fragment holds the fragment's outer parameters φ (flat fp32), its outer
optimizer, its reducer, its queue of averages in flight and its :class:`eagerloco.engine.sharding.FragmentView`.
It offers the primitives the spec's formulas are written with, and does no arithmetic of the algorithm itself:

========================  ==========================================================================================
``launch(t)``             Δ_m(t) = φ − θ(t) handed to the reducer (the average starts); queued in ``in_flight``
``wait(item)``            Δ(t) of an item in flight (the time spent here is *blocked time*)
``check_average(item, Δ)`` the ``nonfinite`` policy: True when Δ(t) may be used
``outer_step(g, t₀)``     φ ← OuterOpt(φ, g) (g into ``φ.grad``, one ``optimizer.step()``)
``read_theta()``          θ's elements this rank owns, flat fp32
``write_theta(values)``   θ ← values (owned elements; the worker's replicas are restored inside)
``schedule_arrival(t)``   have the strategy's ``on_arrival`` called for this fragment at inner step t
========================  ==========================================================================================

plus ``phi``, ``outer_lr``, ``world_size`` (M), ``index`` and ``check_finite``. It reports to the engine's
:class:`eagerloco.engine.recorder.Recorder` at the named points (blocked, launched, applied, skipped); it knows
nothing of ``DiLoCo``: the state it shares with the other fragments (the communicator, the configuration, the
inner step, the arrival schedule) is one :class:`EngineContext`.
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from dataclasses import dataclass, field

import torch

from eagerloco.comm.base import CollectiveAborted, CollectiveTimeout, Communicator
from eagerloco.comm.reducer import PendingMean, Reducer
from eagerloco.engine.config import DiLoCoConfig
from eagerloco.engine.errors import NonFiniteOuterGradient
from eagerloco.engine.fragments import Fragment
from eagerloco.engine.recorder import Recorder
from eagerloco.engine.sharding import FragmentView


@dataclass(eq=False)
class InFlight:
    """An average launched at ``launch_step`` and not yet applied."""

    launch_step: int
    mean: PendingMean
    own: torch.Tensor | None = None
    """Eager only: this worker's contribution exactly as it was applied eagerly (w·Δ_m(t), w = 1/M by default,
    ALGORITHMS.md 4.1; zero when Δ_m(t) was not finite: nothing was applied). Set by the strategy."""
    share: torch.Tensor | None = None
    """Eager with β > 0 only (ALGORITHMS.md 4.4): w·Δ_m(t), the own term before the instalment β·R_m(t − kH) of the
    previous average's rest was taken out of it (own = share − β·R_m(t − kH)), so that this average's rest
    R_m(t) = Δ(t) − share is exact on arrival. None: nothing was taken out (β = 0, or nothing had arrived at t), the
    share is ``own``."""
    own_finite: bool = True
    """Whether this worker's own Δ_m(t) was finite (for the error message when the average is not)."""


@dataclass(eq=False)
class EngineContext:
    """What the fragments of one engine share: read by the cores, advanced by the engine."""

    comm: Communicator
    config: DiLoCoConfig
    recorder: Recorder
    inner_step: int = 0
    """t: the engine's inner-step counter."""
    arrivals: dict[int, list[FragmentCore]] = field(default_factory=dict)
    """Inner step → the fragments whose ``on_arrival`` is due then."""


class FragmentCore:
    """One fragment's outer state and the primitives its strategy composes (see the module docstring).

    Attributes:
        fragment: the fragment (its parameters θ and their names, its sync offset).
        phi: φ_p, the outer parameters: flat fp32 on the outer device, this rank's owned elements.
        outer_optimizer: the optimizer stepping ``[phi]``.
        reducer: averages this fragment's outer gradients across workers (the codec).
        view: this rank's share of the fragment (reads θ, writes θ back; see :mod:`eagerloco.engine.sharding`).
        in_flight: the averages launched and not yet applied, oldest first.
    """

    def __init__(
        self,
        fragment: Fragment,
        phi: torch.Tensor,
        outer_optimizer: torch.optim.Optimizer,
        reducer: Reducer,
        view: FragmentView,
        context: EngineContext,
    ) -> None:
        self.fragment = fragment
        self.phi = phi
        self.outer_optimizer = outer_optimizer
        self.reducer = reducer
        self.view = view
        self.in_flight: deque[InFlight] = deque()
        self._context = context
        self.world_size = context.comm.world_size

    @property
    def index(self) -> int:
        """p: the fragment's index (the order every worker visits fragments in)."""
        return self.fragment.index

    @property
    def outer_lr(self) -> float:
        """The outer optimizer's learning rate (its first parameter group's), for the final drain's plain step."""
        return self.outer_optimizer.param_groups[0]["lr"]

    # ------------------------------------------------------------------ θ

    def read_theta(self) -> torch.Tensor:
        """θ's elements this rank owns, flat fp32, in φ's layout (on the model's device). May be a view of the
        staging buffer: valid until the next read or write, and writable (then pass it to :meth:`write_theta`)."""
        return self.view.read_theta()

    def write_theta(self, values: torch.Tensor) -> None:
        """θ ← ``values`` (this rank's owned elements, φ's layout). With a layout whose workers hold split
        replicas this ends with one blocking all-gather inside the worker (see engine/sharding.py)."""
        self.view.write_theta(values)

    # ------------------------------------------------------------------ the average

    def launch(self, t: int) -> tuple[InFlight, torch.Tensor]:
        """Δ_m(t) = φ − θ(t), handed to the reducer (asynchronous) and queued in :attr:`in_flight`. Returns the
        queued item and Δ_m(t) as the reducer left it (error-feedback residual included): the strategy may keep
        or scale it (eager does, in place); the reducer no longer reads it."""
        theta = self.read_theta()  # this rank's owned elements of θ (all of them with one rank per worker)
        theta = theta if theta.device == self.phi.device else theta.to(self.phi.device)
        delta = torch.sub(self.phi, theta)
        own_finite = bool(torch.isfinite(delta).all())
        # A non-finite Δ_m is NOT raised here: the other workers would then block on a collective this worker
        # never joins. It is launched like any other: NaN/Inf in one contribution makes the average non-finite
        # on every worker (gloo and the codecs give every worker the same bits; a codec sends a payload that
        # decodes to NaN), so every worker takes the same decision in check_average when the average arrives.
        pending = self.reducer.launch(delta)  # may add the error-feedback residual into delta, in place
        # M of this collective: a membership that changes (eagerloco.ft) tells each average its own M_Q, which every
        # 1/M of this sync point uses (ALGORITHMS.md section 11); a fixed group keeps its size.
        self.world_size = getattr(pending, "world_size", self.world_size)
        self._context.recorder.launched(self.index, pending.payload_bytes, delta if own_finite else None)
        item = InFlight(launch_step=t, mean=pending, own_finite=own_finite)
        self.in_flight.append(item)
        return item, delta

    def wait(self, item: InFlight) -> torch.Tensor:
        """The average Δ(t) launched at ``item.launch_step``; the time spent waiting counts as blocked."""
        ctx = self._context
        start = time.perf_counter()
        try:
            mean = item.mean.wait(ctx.config.collective_timeout_s)
        except (CollectiveTimeout, CollectiveAborted) as exc:
            raise type(exc)(
                f"outer step {self.outer_index(item.launch_step)} of fragment {self.index} (launched at "
                f"inner step {item.launch_step}, waited for at inner step {ctx.inner_step}) failed on "
                f"{ctx.comm.describe()} (collective_timeout_s={ctx.config.collective_timeout_s}): {exc}; "
                f"{ctx.comm.diagnose_peers()}"
            ) from exc
        except Exception as exc:
            raise type(exc)(
                f"outer step {self.outer_index(item.launch_step)} of fragment {self.index}: the average "
                f"launched at inner step {item.launch_step} failed on {ctx.comm.describe()}: {exc}"
            ) from exc
        ctx.recorder.waited(time.perf_counter() - start)
        return mean

    def check_average(self, item: InFlight, mean: torch.Tensor) -> bool:
        """True when the average Δ(t) of ``item`` is finite and may be applied. Otherwise some worker's
        contribution held NaN/Inf; every worker sees the same non-finite average at the same outer step, so all
        take the same decision: ``nonfinite='raise'`` raises :class:`NonFiniteOuterGradient`, ``'skip'`` counts
        the skip and returns False (the strategy then leaves φ and the outer optimizer untouched and sets
        θ ← φ)."""
        if getattr(item.mean, "dropped", False):
            # Fault tolerance (ALGORITHMS.md section 11): the collective failed or its membership changed; every
            # member of the quorum took the same decision. The strategy treats it as a skip (nothing applied).
            self._context.recorder.dropped()
            return False
        if bool(torch.isfinite(mean).all()):
            return True
        ctx = self._context
        bad = int((~torch.isfinite(mean)).sum())
        whose = (
            "this worker's own outer gradient was not finite"
            if not item.own_finite
            else "this worker's own outer gradient was finite: another worker's was not"
        )
        where = (
            f"outer step {self.outer_index(item.launch_step)} of fragment {self.index} (launched at inner "
            f"step {item.launch_step})"
        )
        if ctx.config.nonfinite == "raise":
            raise NonFiniteOuterGradient(
                f"the average outer gradient of {where} has {bad} non-finite values (NaN/Inf) on "
                f"{ctx.comm.describe()} at inner step {ctx.inner_step}; {whose}. The outer parameters were not "
                "touched and every worker stops here. Lower the inner learning rate, enable gradient clipping, or "
                "set nonfinite='skip'."
            )
        ctx.recorder.skipped()
        warnings.warn(
            f"skipping {where} on {ctx.comm.describe()}: the average has {bad} non-finite values ({whose})",
            RuntimeWarning,
            stacklevel=2,
        )
        return False

    def schedule_arrival(self, t: int) -> None:
        """Have the strategy's ``on_arrival`` called for this fragment at inner step ``t``."""
        self._context.arrivals.setdefault(t, []).append(self)

    # ------------------------------------------------------------------ φ

    def outer_step(self, g: torch.Tensor, launched_at: int) -> None:
        """φ ← OuterOpt(φ, g): ``g`` (checked finite) as φ's gradient, one step of the outer optimizer."""
        self.check_finite(g, launched_at)
        self.phi.grad = g
        self.outer_optimizer.step()
        self.phi.grad = None
        ctx = self._context
        ctx.recorder.applied(self.index, g, ctx.inner_step - launched_at)

    def record_plain_step(self) -> None:
        """Tell the recorder that φ was moved by a plain step outside the outer optimizer (the final drain)."""
        self._context.recorder.applied(self.index)

    def check_finite(self, g: torch.Tensor, launched_at: int) -> None:
        """Raise :class:`NonFiniteOuterGradient` if ``g`` holds NaN/Inf (φ is then untouched)."""
        if bool(torch.isfinite(g).all()):
            return
        ctx = self._context
        bad = int((~torch.isfinite(g)).sum())
        raise NonFiniteOuterGradient(
            f"the outer gradient to apply for fragment {self.index} (launched at inner step {launched_at}) has "
            f"{bad} non-finite values (NaN/Inf) on {ctx.comm.describe()} at inner step {ctx.inner_step}; the "
            "outer parameters were not touched. Lower the inner learning rate or enable gradient clipping."
        )

    def outer_index(self, t: int) -> int:
        """The outer step number (1, 2, ...) of this fragment whose sync point is inner step ``t``."""
        sync_every = self._context.config.sync_every
        offset = self.fragment.offset % sync_every
        return (t - offset) // sync_every + (1 if offset > 0 else 0)
