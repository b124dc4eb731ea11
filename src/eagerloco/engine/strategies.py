"""The four modes, each a small strategy over the shared outer-step core (:class:`eagerloco.engine.diloco.DiLoCo`).

A strategy decides, for one fragment, what happens at its sync point t and, for overlap, τ steps later. The core
owns everything else: the outer parameters φ, the outer optimizer, the collectives in flight, the clock. The
formulas below are ALGORITHMS.md's, with Δ_m(t) = φ − θ_m(t) and Δ(t) = (1/M) Σ_m Δ_m(t).

Collective order invariant: every strategy launches the fresh outer gradient *before* waiting on an older one,
and the core visits fragments in index order at every step, so all workers issue the same collectives in the
same order whatever their timing (the deadlock torchft fixed in its PR 206).

Non-finite averages: every strategy passes an arrived average through ``core.check_average`` before using it.
It raises on every worker (``nonfinite='raise'``) or returns False on every worker (``'skip'``): the strategy
then applies nothing of that average, leaves the outer optimizer untouched and sets θ ← φ (α = 0 for overlap,
so the local steps of a worker whose θ went bad are dropped too). The collective order is unchanged either way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from eagerloco.engine.diloco import DiLoCo, FragmentState, InFlight


class OuterStrategy:
    """Base class. ``on_sync`` runs at the fragment's sync points; ``on_arrival`` at the step an overlap average
    is due; ``final_gradient`` gives the plain-step gradient for an average still in flight at ``finalize``."""

    name: str = ""
    uniform_outer_state: bool = True
    """True when φ and the outer optimizer state stay bit-identical on all workers."""

    def on_sync(self, core: DiLoCo, state: FragmentState, t: int) -> None:
        raise NotImplementedError

    def on_arrival(self, core: DiLoCo, state: FragmentState, t: int) -> None:
        raise RuntimeError(f"mode {self.name!r} schedules no arrivals")

    def final_gradient(self, item: InFlight, mean: torch.Tensor) -> torch.Tensor:
        """ALGORITHMS.md section 6: g = Δ(t) for overlap and delayed."""
        return mean


class SyncStrategy(OuterStrategy):
    """DiLoCo: all-reduce Δ_m(t) and wait; φ ← OuterOpt(φ, Δ(t)); θ ← φ."""

    name = "sync"

    def on_sync(self, core: DiLoCo, state: FragmentState, t: int) -> None:
        core.launch(state, t)
        item = state.in_flight.popleft()  # the one just launched: nothing else is ever in flight in sync
        mean = core.wait(state, item)
        if core.check_average(state, item, mean):
            core.apply(state, mean, launched_at=t)
        core.reset_inner(state)


class OverlapStrategy(OuterStrategy):
    """Streaming DiLoCo's overlap: launch at t, keep training; at t + τ wait for Δ(t),
    φ̃ ← OuterOpt(φ, Δ(t)); θ ← α·θ + (1 − α)·φ̃; φ ← φ̃."""

    name = "overlap"

    def __init__(self, overlap_steps: int, alpha: float) -> None:
        self.overlap_steps = overlap_steps
        self.alpha = alpha

    def on_sync(self, core: DiLoCo, state: FragmentState, t: int) -> None:
        core.launch(state, t)
        if self.overlap_steps == 0:  # no local step is taken meanwhile: nothing to mix, this is sync
            self._complete(core, state, alpha=0.0)
        else:
            core.schedule_arrival(state, t + self.overlap_steps)

    def on_arrival(self, core: DiLoCo, state: FragmentState, t: int) -> None:
        self._complete(core, state, alpha=self.alpha)

    @staticmethod
    def _complete(core: DiLoCo, state: FragmentState, alpha: float) -> None:
        item = state.in_flight.popleft()
        mean = core.wait(state, item)
        if core.check_average(state, item, mean):
            core.apply(state, mean, launched_at=item.launch_step)
            core.reset_inner(state, alpha=alpha)
        else:  # skipped: θ ← φ, whatever α (a worker whose θ went non-finite must not mix it back in)
            core.reset_inner(state)


class DelayedStrategy(OuterStrategy):
    """Naive delay of k outer steps: launch Δ_m(t); wait for Δ(t − kH); φ ← OuterOpt(φ, Δ(t − kH)); θ ← φ.
    During the first k sync points nothing has arrived: no outer step, θ ← φ."""

    name = "delayed"

    def __init__(self, delay: int) -> None:
        self.delay = delay

    def on_sync(self, core: DiLoCo, state: FragmentState, t: int) -> None:
        core.launch(state, t)
        if len(state.in_flight) > self.delay:
            item = state.in_flight.popleft()
            mean = core.wait(state, item)
            if core.check_average(state, item, mean):
                core.apply(state, mean, launched_at=item.launch_step)
        core.reset_inner(state)


class EagerStrategy(OuterStrategy):
    """Eager updates with k outer steps of slack. At t: launch Δ_m(t); wait for Δ(t − kH); then

        Δ̃_m(t) = [Δ(t − kH) − (1/M)·Δ_m(t − kH)] + (1/M)·Δ_m(t);   φ_m ← OuterOpt(φ_m, Δ̃_m(t));   θ ← φ_m

    with Δ(t − kH) = Δ_m(t − kH) = 0 during the first k sync points. The own term (1/M)·Δ_m(t) is kept exactly as
    applied (``InFlight.own``) and subtracted when the average that contains it arrives, so each contribution is
    applied once: the own one at once, the others' k periods late. The bracket is computed first so that with
    M = 1 it is exactly zero and eager(k) is bitwise sync.
    """

    name = "eager"
    uniform_outer_state = False

    def __init__(self, delay: int) -> None:
        self.delay = delay

    def on_sync(self, core: DiLoCo, state: FragmentState, t: int) -> None:
        fresh = core.launch(state, t, keep_own=True)
        assert fresh.own is not None
        if len(state.in_flight) > self.delay:
            item = state.in_flight.popleft()
            assert item.own is not None
            mean = core.wait(state, item)
            if core.check_average(state, item, mean):
                g = torch.sub(mean, item.own).add_(fresh.own)
            else:  # skip Δ(t − kH): the others' part is never applied; the own part was, at t − kH (0 if it was bad)
                g = fresh.own.clone()
            core.apply(state, g, launched_at=item.launch_step)
        else:
            core.apply(state, fresh.own.clone(), launched_at=t)
        core.reset_inner(state)

    def final_gradient(self, item: InFlight, mean: torch.Tensor) -> torch.Tensor:
        """ALGORITHMS.md section 6: g = Δ(t) − (1/M)·Δ_m(t): the others' part, the own part was applied."""
        assert item.own is not None
        return torch.sub(mean, item.own)


def make_strategy(mode: str, overlap_steps: int, alpha: float, delay: int) -> OuterStrategy:
    if mode == "sync":
        return SyncStrategy()
    if mode == "overlap":
        return OverlapStrategy(overlap_steps, alpha)
    if mode == "delayed":
        return DelayedStrategy(delay)
    if mode == "eager":
        return EagerStrategy(delay)
    raise ValueError(f"unknown mode {mode!r}")
