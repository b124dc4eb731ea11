"""The four modes, each a small strategy over the per-fragment core (:class:`eagerloco.engine.core.FragmentCore`).

Every formula of ALGORITHMS.md sections 1-4 and 6 is written out here, for its mode; the core only provides the
primitives (launch, wait, check_average, outer_step, read_theta, write_theta, schedule_arrival) and measures.
Notation: Δ_m(t) = φ − θ_m(t) (``core.launch``), Δ(t) = (1/M) Σ_m Δ_m(t) (``core.wait``), M = ``core.world_size``,
OuterOpt (``core.outer_step``).

A strategy decides, for one fragment, what happens at its sync point t (``on_sync``), for overlap τ steps later
(``on_arrival``), and at the end of training (``finalize``, section 6).

Collective order invariant: every strategy launches the fresh outer gradient *before* waiting on an older one,
and the engine visits fragments in index order at every step, so all workers issue the same collectives in the
same order whatever their timing (the deadlock torchft fixed in its PR 206).

Non-finite averages: every strategy passes an arrived average through ``core.check_average`` before using it.
It raises on every worker (``nonfinite='raise'``) or returns False on every worker (``'skip'``): the strategy
then applies nothing of that average, leaves the outer optimizer untouched and sets θ ← φ (α = 0 for overlap,
so the local steps of a worker whose θ went bad are dropped too). The collective order is unchanged either way.

A new mode is a subclass here with ``name``, ``on_sync`` (and, if it needs them, ``on_arrival``,
``final_gradient``/``finalize``, ``uniform_outer_state``, ``from_config``), one entry in :data:`STRATEGIES`,
its name in ``engine/config.py``'s ``Mode``/``MODES``, and its section in ALGORITHMS.md (docs/engine.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from eagerloco.engine.config import ConfigError

if TYPE_CHECKING:
    from eagerloco.engine.config import DiLoCoConfig
    from eagerloco.engine.core import FragmentCore, InFlight


class OuterStrategy:
    """Base class. ``on_sync`` runs at the fragment's sync points; ``on_arrival`` at the step an overlap average
    is due; ``finalize`` drains what is still in flight at the end (with ``final_gradient``)."""

    name: ClassVar[str] = ""
    uniform_outer_state: ClassVar[bool] = True
    """True when φ and the outer optimizer state stay bit-identical on all workers (``consolidate`` is then a
    no-op, and a checkpoint may switch to another mode after ``finalize``)."""

    @classmethod
    def from_config(cls, config: DiLoCoConfig) -> OuterStrategy:
        """The strategy with its parameters from ``config`` (validated)."""
        return cls()

    def check_world_size(self, world_size: int, fixed_membership: bool = True) -> None:
        """Raise :class:`ConfigError` if the strategy's parameters do not fit M = ``world_size`` workers (called by
        :func:`make_strategy` when the engine knows M, before any collective; ``fixed_membership=False``: M
        changes per quorum, check only what does not depend on it)."""

    def on_sync(self, core: FragmentCore, t: int) -> None:
        raise NotImplementedError

    def on_arrival(self, core: FragmentCore, t: int) -> None:
        raise RuntimeError(f"mode {self.name!r} schedules no arrivals")

    def final_gradient(self, item: InFlight, mean: torch.Tensor) -> torch.Tensor:
        """ALGORITHMS.md section 6: g = Δ(t) for overlap and delayed."""
        return mean

    def skipped_gradient(self, item: InFlight) -> torch.Tensor | None:
        """What is still due when the average of ``item`` is skipped (non-finite, ``nonfinite='skip'``): nothing,
        except for eager with smoothing (4.4)."""
        return None

    def finalize(self, core: FragmentCore) -> None:
        """ALGORITHMS.md section 6: every average still in flight, oldest first, as one plain step at the outer
        learning rate, φ ← φ − lr·g (g from :meth:`final_gradient`), the outer optimizer's momentum untouched;
        then θ ← φ. Local progress since the fragment's last sync point is dropped (it is in no outer gradient)."""
        while core.in_flight:
            item = core.in_flight.popleft()
            mean = core.wait(item)
            if core.check_average(item, mean):
                g = self.final_gradient(item, mean)
            else:  # nonfinite='skip': nothing of it is applied (but what an earlier average deferred into it, 4.4)
                g = self.skipped_gradient(item)
                if g is None:
                    continue
            core.check_finite(g, item.launch_step)
            core.phi.add_(g, alpha=-core.outer_lr)  # φ ← φ − lr·g
            core.record_plain_step()
        core.write_theta(core.phi)  # θ ← φ


class SyncStrategy(OuterStrategy):
    """DiLoCo (section 1): all-reduce Δ_m(t) and wait; φ ← OuterOpt(φ, Δ(t)); θ ← φ."""

    name = "sync"

    def on_sync(self, core: FragmentCore, t: int) -> None:
        core.launch(t)  # Δ_m(t) = φ − θ(t); the average starts
        item = core.in_flight.popleft()  # the one just launched: nothing else is ever in flight in sync
        mean = core.wait(item)  # Δ(t)
        if core.check_average(item, mean):
            core.outer_step(mean, launched_at=t)  # φ ← OuterOpt(φ, Δ(t))
        core.write_theta(core.phi)  # θ ← φ


class OverlapStrategy(OuterStrategy):
    """Streaming DiLoCo's overlap (section 2): launch at t, keep training; at t + τ wait for Δ(t),
    φ̃ ← OuterOpt(φ, Δ(t)); θ ← α·θ + (1 − α)·φ̃; φ ← φ̃."""

    name = "overlap"

    def __init__(self, overlap_steps: int, alpha: float) -> None:
        self.overlap_steps = overlap_steps
        self.alpha = alpha

    @classmethod
    def from_config(cls, config: DiLoCoConfig) -> OverlapStrategy:
        return cls(config.overlap_steps, config.alpha)

    def on_sync(self, core: FragmentCore, t: int) -> None:
        core.launch(t)  # Δ_m(t) = φ − θ(t); the average starts
        if self.overlap_steps == 0:  # no local step is taken meanwhile: nothing to mix, this is sync
            self._complete(core, alpha=0.0)
        else:
            core.schedule_arrival(t + self.overlap_steps)

    def on_arrival(self, core: FragmentCore, t: int) -> None:
        self._complete(core, alpha=self.alpha)

    @staticmethod
    def _complete(core: FragmentCore, alpha: float) -> None:
        item = core.in_flight.popleft()
        mean = core.wait(item)  # Δ(t), launched τ steps ago
        if not core.check_average(item, mean):
            core.write_theta(core.phi)  # skipped: θ ← φ, whatever α (a θ gone non-finite must not be mixed back in)
            return
        core.outer_step(mean, launched_at=item.launch_step)  # φ ← φ̃ = OuterOpt(φ, Δ(t))
        if alpha == 0.0:
            core.write_theta(core.phi)  # θ ← φ̃
            return
        theta = core.read_theta()
        # θ ← α·θ + (1 − α)·φ̃, computed as torch.lerp does: θ + (1 − α)·(φ̃ − θ)
        theta.lerp_(core.phi.to(theta.device), 1.0 - alpha)
        core.write_theta(theta)


class DelayedStrategy(OuterStrategy):
    """Naive delay of k outer steps (section 3): launch Δ_m(t); wait for Δ(t − kH); φ ← OuterOpt(φ, Δ(t − kH));
    θ ← φ. During the first k sync points nothing has arrived: no outer step, θ ← φ."""

    name = "delayed"

    def __init__(self, delay: int) -> None:
        self.delay = delay

    @classmethod
    def from_config(cls, config: DiLoCoConfig) -> DelayedStrategy:
        return cls(config.delay)

    def on_sync(self, core: FragmentCore, t: int) -> None:
        core.launch(t)  # Δ_m(t) = φ − θ(t); the average starts
        if len(core.in_flight) > self.delay:  # Δ(t − kH), launched k sync points ago, is due
            item = core.in_flight.popleft()
            mean = core.wait(item)
            if core.check_average(item, mean):
                core.outer_step(mean, launched_at=item.launch_step)  # φ ← OuterOpt(φ, Δ(t − kH))
        core.write_theta(core.phi)  # θ ← φ


class EagerStrategy(OuterStrategy):
    """Eager updates with k outer steps of slack (section 4). At t: launch Δ_m(t); wait for Δ(t − kH); then

        Δ̃_m(t) = [Δ(t − kH) − (1/M)·Δ_m(t − kH)] + (1/M)·Δ_m(t);   φ_m ← OuterOpt(φ_m, Δ̃_m(t));   θ ← φ_m

    with Δ(t − kH) = Δ_m(t − kH) = 0 during the first k sync points. The own term (1/M)·Δ_m(t) is kept exactly as
    applied (``InFlight.own``) and subtracted when the average that contains it arrives, so each contribution is
    applied once: the own one at once, the others' k periods late. The bracket is computed first so that with
    M = 1 it is exactly zero and eager(k) is bitwise sync.

    Variant (section 4.1, opt-in ``eager_own_weight`` = w ∈ [1/M, 1]): the own term is w·Δ_m(t) instead of
    (1/M)·Δ_m(t), i.e. Δ̃_m(t) = Δ(t − kH) + w·(Δ_m(t) − Δ_m(t − kH)); kept and swapped exactly the same way.
    ``own_weight=None`` is the paper's rule (and divides by M, bit for bit as before). Under a membership that
    changes, the own term of an average launched in quorum Q uses w_Q = max(w, 1/M_Q) (a worker alone is sync).

    Variant (section 4.4, opt-in ``eager_smoothing`` = β ∈ [0, 1]): the rest of each arriving average, R_m(t − kH)
    = Δ(t − kH) − w·Δ_m(t − kH), is applied (1 − β) on arrival and β at the next arrival. The deferred instalment
    β·R_m(t − kH) is taken out of the own term, own(t) = w·Δ_m(t) − β·R_m(t − kH) (w·Δ_m(t) kept in ``InFlight.share``),
    so the swap of own(t) for Δ(t) at the next arrival applies it: Δ̃_m(t) = w·Δ_m(t) + (1 − β)·R_m(t − kH) +
    β·R_m(t − 2kH), each contribution still applied exactly once. β = 0 is the rule above, bit for bit.
    """

    name = "eager"
    uniform_outer_state = False

    def __init__(self, delay: int, own_weight: float | None = None, smoothing: float = 0.0) -> None:
        self.delay = delay
        self.own_weight = own_weight
        self.smoothing = smoothing
        self._checked_world_size = False

    @classmethod
    def from_config(cls, config: DiLoCoConfig) -> EagerStrategy:
        return cls(config.delay, config.eager_own_weight, config.eager_smoothing)

    def check_world_size(self, world_size: int, fixed_membership: bool = True) -> None:
        """w must be in [1/M, 1]: below 1/M a worker would weigh its own fresh contribution less than the average
        does (and with M = 1 only w = 1 keeps eager bitwise sync). A membership that changes has no one M: there
        each collective takes w_Q = max(w, 1/M_Q) (ALGORITHMS.md 4.1), and nothing is refused here."""
        self._checked_world_size = True
        w = self.own_weight
        if w is not None and fixed_membership and w < 1 / world_size:
            raise ConfigError(
                f"eager_own_weight={w!r}: below 1/M = {1 / world_size:g} for M={world_size} workers; the "
                "own-contribution weight w must be in [1/M, 1]"
            )

    def on_sync(self, core: FragmentCore, t: int) -> None:
        if not self._checked_world_size:  # a strategy built without M: refuse before the first collective
            self.check_world_size(core.world_size)
        fresh, delta = core.launch(t)  # Δ_m(t) = φ − θ(t) (error-feedback residual included); the average starts
        # own(t) = w·Δ_m(t) (w = 1/M: the paper's rule), applied at once and kept as applied; a non-finite Δ_m(t)
        # contributes nothing here (it still travels, so that every worker sees the bad average): φ stays finite.
        if not fresh.own_finite:
            fresh.own = torch.zeros_like(delta)
        elif self.own_weight is None:
            fresh.own = delta.div_(core.world_size)  # (1/M)·Δ_m(t)
        else:
            # w·Δ_m(t); w_Q = max(w, 1/M_Q) is w itself wherever M is fixed (w >= 1/M was checked)
            fresh.own = delta.mul_(max(self.own_weight, 1 / core.world_size))
        if len(core.in_flight) > self.delay:  # Δ(t − kH), launched k sync points ago, is due
            item = core.in_flight.popleft()
            assert item.own is not None
            mean = core.wait(item)
            # Δ̃_m(t) = [Δ(t − kH) − own(t − kH)] + own(t), the bracket first (exactly 0 when M = 1, where w must
            # be 1). Each contribution once: own(t − kH) went in at t − kH and is swapped for the average. A skipped
            # Δ(t − kH) leaves own(t): the others' part is never applied, the own part was, at t − kH (0 if bad).
            arrived = core.check_average(item, mean)
            if arrived:
                g = torch.sub(mean, item.own)  # R_m(t − kH), plus the instalment own(t − kH) deferred (4.4)
                if self.smoothing:
                    rest = g if item.share is None else torch.sub(mean, item.share)  # R_m(t − kH) = Δ − w·Δ_m
                    fresh.share = fresh.own.clone()  # w·Δ_m(t)
                    fresh.own.add_(rest, alpha=-self.smoothing)  # own(t) = w·Δ_m(t) − β·R_m(t − kH)
                g.add_(fresh.own)  # (after rest is used: rest may be g itself)
            else:
                g = self.skipped_gradient(item)  # the deferred instalment of an earlier average, if any
                g = fresh.own.clone() if g is None else g.add(fresh.own)
            core.outer_step(g, launched_at=item.launch_step)  # φ_m ← OuterOpt(φ_m, Δ̃_m(t))
        else:
            core.outer_step(fresh.own.clone(), launched_at=t)  # Δ̃_m(t) = own(t): nothing has arrived yet
        core.write_theta(core.phi)  # θ ← φ_m

    def final_gradient(self, item: InFlight, mean: torch.Tensor) -> torch.Tensor:
        """ALGORITHMS.md section 6: g = Δ(t) − own(t), own(t) = (1/M)·Δ_m(t) or w·Δ_m(t) as it was applied: the
        rest of the average, the own part went in at t (with β > 0 also the instalment own(t) deferred, 4.4)."""
        assert item.own is not None
        return torch.sub(mean, item.own)

    def skipped_gradient(self, item: InFlight) -> torch.Tensor | None:
        """A skipped average (non-finite) applies nothing of itself, but the instalment of the average before it
        that its own term deferred (4.4) is still due: share − own = β·R_m of that earlier average."""
        return None if item.share is None else torch.sub(item.share, item.own)


STRATEGIES: dict[str, type[OuterStrategy]] = {
    cls.name: cls for cls in (SyncStrategy, OverlapStrategy, DelayedStrategy, EagerStrategy)
}
"""Mode name (``DiLoCoConfig.mode``, one of ``config.MODES``) → its strategy."""


def make_strategy(config: DiLoCoConfig, world_size: int | None = None, fixed_membership: bool = True) -> OuterStrategy:
    """The strategy of ``config.mode`` with its parameters; with ``world_size`` (M) its parameters are checked
    against M here (otherwise at the first sync point, before the first collective). ``fixed_membership=False``
    (eagerloco.ft: M changes per quorum) checks only what does not depend on M."""
    cls = STRATEGIES.get(config.mode)
    if cls is None:
        raise ValueError(f"mode={config.mode!r}: no strategy; known modes: {', '.join(STRATEGIES)}")
    strategy = cls.from_config(config)
    if world_size is not None:
        strategy.check_world_size(world_size, fixed_membership)
    return strategy
