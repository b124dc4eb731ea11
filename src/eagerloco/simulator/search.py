"""What bandwidth is needed: CU curves on the papers' grid, threshold search, bounds, wall-clock estimates."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from eagerloco.simulator.config import LinkSpec, MethodSpec, ModelSpec, SimulatorConfigError
from eagerloco.simulator.events import SimResult, simulate

GRID_BELOW_PAPERS = 37
"""Points of the grid below the papers' 0.1 Gbit/s, at the papers' ratio: down to 10^(-1 - 148/49) Gbit/s, about
0.0954 Mbit/s, so that small models on slow links (``eagerloco train``'s default 20 Mbit/s) get an answer."""

BANDWIDTH_GRID_GBPS: tuple[float, ...] = tuple(10.0 ** (-1.0 + 4.0 * i / 49) for i in range(-GRID_BELOW_PAPERS, 50))
"""The papers' grid, 50 points evenly spaced in log10 from 0.1 to 1,000 Gbit/s (ratio 10^(4/49) ≈ 1.207), extended
downwards by GRID_BELOW_PAPERS points at the same ratio: 87 points from 0.0954 Mbit/s to 1,000 Gbit/s. Every
threshold at or above 0.1 Gbit/s is the papers' grid point."""

PAPER_GRID_GBPS: tuple[float, ...] = BANDWIDTH_GRID_GBPS[GRID_BELOW_PAPERS:]
"""The papers' 50 points alone, 0.1 to 1,000 Gbit/s."""

CU_TARGETS: tuple[float, ...] = (0.50, 0.80, 0.90, 0.95, 0.99)
"""Compute utilizations the papers' tables report."""

CU_TOLERANCE = 1e-12
"""A simulated CU counts as reaching a target t when CU >= t − CU_TOLERANCE (float rounding only)."""


def cu_curve(
    model: ModelSpec,
    method: MethodSpec,
    *,
    workers: int = 2,
    latency_s: float = 0.0,
    grid: Sequence[float] = BANDWIDTH_GRID_GBPS,
) -> list[SimResult]:
    """One steady-state simulation per bandwidth of ``grid`` (Gbit/s)."""
    return [simulate(model, method, LinkSpec(bandwidth_gbps=bw, workers=workers, latency_s=latency_s)) for bw in grid]


def min_bandwidth_for_targets(
    cus: Sequence[float], grid: Sequence[float] = BANDWIDTH_GRID_GBPS, targets: Sequence[float] = CU_TARGETS
) -> list[float | None]:
    """For each target, the smallest bandwidth of ``grid`` whose CU reaches it; None if none does."""
    if len(cus) != len(grid):
        raise SimulatorConfigError(f"{len(cus)} CU values for a grid of {len(grid)} bandwidths")
    found: list[float | None] = []
    for target in targets:
        if not 0 < target <= 1:
            raise SimulatorConfigError(f"CU target {target!r}: must be in (0, 1]")
        hits = [bw for bw, cu in zip(grid, cus) if cu >= target - CU_TOLERANCE]
        found.append(min(hits) if hits else None)
    return found


def bits_per_outer_step(model: ModelSpec, method: MethodSpec, workers: int) -> float:
    """Bits each worker sends per outer step (per inner step for data-parallel): N·bits·2(M − 1)/M, or
    N·bits·(M − 1) for a compressed method's all-gather (``MethodSpec.gather``). Every fragment syncs once per H
    steps, so streaming sends the same volume as DiLoCo."""
    return model.params * method.bits * method.wire_factor(workers)


def sustained_bandwidth_bound_gbps(model: ModelSpec, method: MethodSpec, workers: int = 2) -> float:
    """Lowest bandwidth at which the link can carry the traffic at all (PAPER_FACTS):
    bits per outer step / (H·T), and bits per step / T for data-parallel. Below it,
    CU <= bandwidth / bound whatever the overlap; CU = c needs at least c·bound."""
    steps = 1 if method.data_parallel else method.sync_every
    return bits_per_outer_step(model, method, workers) / (steps * model.step_time_s) / 1e9


@dataclass(frozen=True)
class WallClockEstimate:
    """Time to train on a token budget at one bandwidth, in steady state (start-up and the final drain of
    in-flight reductions, at most one outer step, are ignored)."""

    cu: float
    """Steady-state compute utilization at that bandwidth."""
    inner_steps: int
    """ceil(tokens / tokens_per_step)."""
    compute_hours: float
    """inner_steps · T / 3600: the time with an infinitely fast link."""
    hours: float
    """compute_hours / CU."""
    bytes_per_worker: float
    """Bytes each worker sends: bits per outer step / 8 · inner_steps / H (H = 1 for data-parallel)."""
    simulated_steps: int
    """Inner steps the event simulation ran to find the CU."""


def estimate_wall_clock(
    model: ModelSpec,
    method: MethodSpec,
    link: LinkSpec,
    tokens: float,
    tokens_per_step: float,
) -> WallClockEstimate:
    """Hours to process ``tokens`` tokens at ``tokens_per_step`` per inner step (all workers together):
    ceil(tokens / tokens_per_step)·T / CU(bandwidth)."""
    for name, value in (("tokens", tokens), ("tokens_per_step", tokens_per_step)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise SimulatorConfigError(f"{name}={value!r}: must be a finite number > 0")
    result = simulate(model, method, link)
    steps = math.ceil(tokens / tokens_per_step)
    compute_hours = steps * model.step_time_s / 3600.0
    period = 1 if method.data_parallel else method.sync_every
    return WallClockEstimate(
        cu=result.cu,
        inner_steps=steps,
        compute_hours=compute_hours,
        hours=compute_hours / result.cu,
        bytes_per_worker=bits_per_outer_step(model, method, link.workers) / 8.0 * steps / period,
        simulated_steps=result.inner_steps,
    )


@dataclass(frozen=True)
class OverlapChoice:
    """What :func:`smallest_hiding_overlap` found: the τ to train with and the CU of every τ it simulated."""

    overlap_steps: int
    """The smallest τ reaching the target, or (none does) the smallest τ of the highest CU."""
    result: SimResult
    """The simulation at that τ."""
    reached: bool
    """Whether that τ reaches the target."""
    cu_by_tau: dict[int, float]
    """CU of each τ simulated, from 1 upwards (the search stops at the first τ that reaches the target)."""


def smallest_hiding_overlap(
    model: ModelSpec, method: MethodSpec, link: LinkSpec, target: float = CU_TARGETS[-1]
) -> OverlapChoice:
    """The smallest overlap τ in [1, H − 1] whose steady-state CU at ``link`` reaches ``target``: of the τ that
    keep up with the link, the one whose averages are least stale (staleness costs loss: on the default job τ = 1
    ends 0.6 % below DiLoCo, τ = 14 0.7 % above, BENCHMARKS.md 8). ``method`` is an overlap method (its τ is
    replaced). If no τ < H reaches the target, the smallest τ of the highest CU; CU need not grow with τ (past H/P
    steps a fragment's all-reduce shares the link with the next fragment's), so every τ is simulated then."""
    if method.overlap_steps < 1 or method.data_parallel:
        raise SimulatorConfigError(f"{method.name}: τ is sized for an overlap method only (overlap_steps >= 1)")
    if not 0 < target <= 1:
        raise SimulatorConfigError(f"CU target {target!r}: must be in (0, 1]")
    cus: dict[int, float] = {}
    results: dict[int, SimResult] = {}
    for tau in range(1, method.sync_every):
        results[tau] = simulate(model, replace(method, overlap_steps=tau), link)
        cus[tau] = results[tau].cu
        if cus[tau] >= target - CU_TOLERANCE:
            return OverlapChoice(tau, results[tau], True, cus)
    if not cus:
        raise SimulatorConfigError(f"{method.name}: H = {method.sync_every} leaves no τ in [1, H − 1]")
    best = max(cus.values())
    tau = min(t for t, cu in cus.items() if cu >= best - CU_TOLERANCE)  # equal CUs differ in the last bits
    return OverlapChoice(tau, results[tau], False, cus)


def link_rate_from_blocked(
    model: ModelSpec,
    method: MethodSpec,
    blocked_s: float,
    *,
    workers: int = 2,
    latency_s: float = 0.0,
    rel_tol: float = 1e-12,
) -> float:
    """The link rate in Gbit/s at which the simulator predicts ``blocked_s`` seconds blocked per outer step for
    ``method`` (per step for data-parallel): the rate a run's own measurement implies, transport overhead and
    anything else that slowed its collectives included. Blocked time falls as the rate grows, so the rate is found
    by bisection in log space to ``rel_tol``.

    Meant for a blocking method (sync), where every outer step waits for its whole all-reduce and the blocked time
    measures the link; an overlapped method's blocked time is only what the overlap did not hide, so it says little
    about the link when it is small. Raises SimulatorConfigError if ``blocked_s`` is not a finite number > 0, or is at
    or below what latency alone costs (no rate gives it)."""
    ok = isinstance(blocked_s, (int, float)) and not isinstance(blocked_s, bool) and math.isfinite(blocked_s)
    if not ok or blocked_s <= 0:
        raise SimulatorConfigError(f"blocked_s={blocked_s!r}: must be a finite number of seconds > 0")

    def blocked_at(gbps: float) -> float:
        link = LinkSpec(bandwidth_gbps=gbps, workers=workers, latency_s=latency_s)
        return simulate(model, method, link).blocked_s_per_period

    low, high = 1e-9, 1e6  # 1 bit/s to 1 Pbit/s, in Gbit/s
    if blocked_at(high) >= blocked_s:
        raise SimulatorConfigError(
            f"{blocked_s:.4g} s blocked per outer step: {method.name} blocks that long even at "
            f"{high:g} Gbit/s (latency {latency_s:g} s per hop), so no link rate explains it"
        )
    if blocked_at(low) <= blocked_s:
        raise SimulatorConfigError(f"{blocked_s:.4g} s blocked per outer step: slower than a {low:g} Gbit/s link")
    while high / low > 1 + rel_tol:
        middle = math.sqrt(low * high)
        if blocked_at(middle) > blocked_s:
            low = middle
        else:
            high = middle
    return math.sqrt(low * high)
