"""What the engine measures, per outer step and for the run (ALGORITHMS.md, section 10).

Time is split three ways by the wrapper's ``step()`` calls:

* *inner time*: wall time between two ``step()`` calls, i.e. the user's forward, backward, inner optimizer
  step and data loading;
* *blocked time*: time inside ``step()`` (or ``finalize()``) spent waiting on outer collectives;
* *outer overhead*: the rest of the time inside ``step()``: outer gradient, outer optimizer, copies.

Compute utilization CU = inner time / (inner + blocked + overhead) = inner time / wall time of the loop. Time
inside ``DiLoCo.paused()`` (evaluation, checkpointing) counts as neither.

Steady-state CU (:attr:`RunStats.steady_utilization`) = inner time / steady wall time, what a long run's CU
approaches (and what the simulator predicts). Two things set a short run apart: delayed and eager end every run
by waiting for the last averages in flight (the final drain: paid once per run however long it is), and those
averages are the ones the run never waited for inside ``step()``: a run of T sync points of eager k = 1 waits
T − 1 times. So the steady wall time leaves the drain out and counts every average launched as waited for, each as
long as the run's in-loop waits took on average (:attr:`RunStats.steady_blocked_s`).

The clock that produces these numbers is :class:`eagerloco.engine.recorder.Recorder`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class OuterStepRecord:
    """One ``step()`` call in which some fragment synced (launched its outer gradient) or applied an average."""

    inner_step: int
    """t: the inner step count when the outer work happened."""
    kind: str = "step"
    """'step' (an outer step inside ``step()``) or 'finalize' (the drain at the end of training)."""
    fragments_synced: list[int] = field(default_factory=list)
    """Fragments whose outer gradient was launched at this step."""
    fragments_applied: list[int] = field(default_factory=list)
    """Fragments whose outer parameters φ were updated at this step."""
    staleness: int = 0
    """Inner steps between the launch of the newest average applied here and now (0 for sync, τ for overlap,
    k·H for delayed/eager once averages arrive)."""
    blocked_s: float = 0.0
    """Seconds blocked on outer collectives in this step() call."""
    overhead_s: float = 0.0
    """Seconds in this step() call not blocked (outer gradient, outer optimizer, copies)."""
    window_inner_s: float = 0.0
    """Inner (compute) seconds since the previous record."""
    window_wall_s: float = 0.0
    """Wall seconds since the previous record (inner + blocked + overhead)."""
    utilization: float = 1.0
    """window_inner_s / window_wall_s."""
    payload_bytes: int = 0
    """Bytes this worker handed to outer collectives at this step."""
    wire_bytes: int = 0
    """Bytes this worker sends for them under ring algorithms."""
    delta_norm: float = 0.0
    """‖Δ_m(t)‖₂: the norm of this worker's fresh outer gradient(s) launched here (all synced fragments)."""
    applied_norm: float = 0.0
    """‖g‖₂ of the outer gradient(s) given to the outer optimizer here (the average, or eager's Δ̃_m)."""
    skipped: bool = False
    """An outer step was skipped here because its outer gradient was not finite (policy 'skip')."""
    dropped: bool = False
    """An average was dropped here by fault tolerance (a member failed or the membership changed)."""
    divergence: float | None = None
    """‖φ_m − mean φ‖₂ over all fragments, when measured at this step (``divergence_every``)."""
    divergence_rel: float | None = None
    """divergence / ‖mean φ‖₂."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunStats:
    """Totals since the wrapper was created (or since ``reset_clock()``)."""

    inner_steps: int = 0
    outer_steps: int = 0
    """Number of step() calls with outer work (records of kind 'step')."""
    inner_s: float = 0.0
    blocked_s: float = 0.0
    """All time blocked on outer collectives, the final drain included."""
    finalize_blocked_s: float = 0.0
    """The part of ``blocked_s`` spent in ``finalize()`` draining the collectives still in flight."""
    overhead_s: float = 0.0
    payload_bytes: int = 0
    wire_bytes: int = 0
    diagnostic_bytes: int = 0
    """Bytes of divergence measurements and consolidation, not part of the algorithm's traffic."""
    outer_launches: int = 0
    """Outer gradients launched (one per fragment and sync point)."""
    outer_waits: int = 0
    """Averages waited for inside ``step()`` (the final drain's and a checkpoint's excluded)."""
    outer_wait_s: float = 0.0
    """The part of ``blocked_s`` spent in those waits."""
    skipped_outer_steps: int = 0
    """Averages (one per fragment and outer step) not applied because they held NaN/Inf (``nonfinite='skip'``)."""
    dropped_averages: int = 0
    """Averages dropped by fault tolerance (eagerloco.ft): nothing of them was applied."""

    @property
    def wall_s(self) -> float:
        return self.inner_s + self.blocked_s + self.overhead_s

    @property
    def utilization(self) -> float:
        """Compute utilization: inner time / wall time."""
        return self.inner_s / self.wall_s if self.wall_s > 0 else 1.0

    @property
    def steady_blocked_s(self) -> float:
        """Blocked time as a long run would have it: without the final drain, and with each average launched
        counted as waited for, as long as the in-loop waits took on average: ``blocked_s − finalize_blocked_s +
        outer_wait_s·(outer_launches / outer_waits − 1)``. Equal to ``blocked_s − finalize_blocked_s`` where every
        average was waited for inside the loop (sync, data-parallel)."""
        blocked = self.blocked_s - self.finalize_blocked_s
        if self.outer_waits and self.outer_launches > self.outer_waits:
            blocked += self.outer_wait_s * (self.outer_launches / self.outer_waits - 1.0)
        return blocked

    @property
    def steady_wall_s(self) -> float:
        """Wall time as a long run would have it: ``inner_s + overhead_s + steady_blocked_s``."""
        return self.inner_s + self.overhead_s + self.steady_blocked_s

    @property
    def steady_utilization(self) -> float:
        """Steady-state compute utilization: inner time / ``steady_wall_s`` (the module docstring says why)."""
        wall = self.steady_wall_s
        return self.inner_s / wall if wall > 0 else 1.0

    @property
    def blocked_per_outer_step_s(self) -> float:
        """Mean time blocked per outer step (a record of kind 'step') in steady state: ``steady_blocked_s /
        outer_steps``."""
        return self.steady_blocked_s / self.outer_steps if self.outer_steps else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            wall_s=self.wall_s,
            utilization=self.utilization,
            steady_utilization=self.steady_utilization,
            steady_blocked_s=self.steady_blocked_s,
            steady_wall_s=self.steady_wall_s,
            blocked_per_outer_step_s=self.blocked_per_outer_step_s,
        )
        return out
