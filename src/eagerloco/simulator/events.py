"""Event simulation of the per-layer training DAG on one compute device per site and one shared link.

The DAG (Streaming DiLoCo paper, section 3.1). Per inner step s and layer l = 0..L−1 there are compute nodes

    F(l, s)   forward of layer l
    Ba(l, s)  backward w.r.t. activations of layer l (not for l = 0: nothing below needs it)
    Bp(l, s)  backward w.r.t. parameters of layer l

(3L − 1 compute nodes, each taking d = T / (3L − 1) seconds, so that a step's compute is exactly T) and one
reduction node R(l, s) per layer on the steps where the method reduces that layer. A worker computes its
nodes one at a time in program order

    F(0) … F(L−1), Bp(L−1), Ba(L−1), Bp(L−2), Ba(L−2), …, Bp(1), Ba(1), Bp(0)

and a node starts at max(end of the previous node, end of its dependencies). All workers are identical, so
one worker is simulated. Reductions share one link, served first in, first out, one at a time; R(l, s)
occupies it for LinkSpec.transfer_s(N / L, bits) seconds.

When reductions enter the link:
- data-parallel: R(l, s) is ready when Bp(l, s) ends, every step (gradients overlap with the backward);
- outer methods, outer_ready='step-end' (default): after the sync step's last node, because the outer
  gradient Δ = φ − θ(t) needs θ(t) after the inner optimizer step, which needs every layer's gradient
  (global-norm clipping); outer_ready='backward': when Bp(l, s) ends, as in the papers' DAG.

What waits for them: the reduction of fragment p launched after step s must be complete before F(l, s + 1 + D)
for every layer l of the fragment (the outer step is applied to the fragment as a whole), with D = 0
(data-parallel: the next step; DiLoCo: blocking), τ (overlap) or k·H (delayed / eager). Because the
fragment's layers run forward in increasing order, the binding dependency is the fragment's first layer.

Efficiency without approximation: a node without external dependencies starts when its predecessor ends,
so a run of such nodes is advanced in one addition (i nodes take i·d), and a step with neither a sync nor a
due reduction takes exactly T. Only the nodes that carry a dependency, and the link's reductions, are
handled one by one. The state repeats with period H steps (one step for data-parallel); the simulation runs
whole periods until the state at a period boundary repeats (steady state) and reports how many it ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from eagerloco.simulator.config import LinkSpec, MethodSpec, ModelSpec, SimulatorConfigError

STEADY_REL_TOL = 1e-9
"""Two states at period boundaries are equal when no entry differs by more than this fraction of H·T."""

DEFAULT_MAX_PERIODS = 5000
"""Give up waiting for a steady state after this many periods (then average the last few)."""

MIN_INNER_STEPS = 300
"""Simulate at least this many inner steps (three outer steps at the papers' H = 100; 300 steps for
data-parallel, whose pattern repeats every step), and at least D/H + 3 periods."""

AVERAGE_PERIODS_IF_NOT_STEADY = 8
"""Periods averaged for CU when no steady state was reached."""


@dataclass(frozen=True)
class Schedule:
    """The DAG of one method on one model and link, reduced to what the event loop needs."""

    layers: int
    """L."""
    node_s: float
    """d = T / (3L − 1): duration of one compute node."""
    period_steps: int
    """Steps after which the pattern of syncs repeats: H (1 for data-parallel)."""
    fragment_layers: tuple[tuple[int, ...], ...]
    """Layers of each fragment, in increasing order."""
    sync_offsets: tuple[int, ...]
    """Per fragment, the step inside a period after which it syncs: (t_p − 1) mod H."""
    delay_steps: int
    """D: the reduction launched after step s is needed by the fragment's forward of step s + 1 + D."""
    ready_at_backward: bool
    """True: R(l, s) is ready when Bp(l, s) ends; False: when step s ends."""
    transfer_s: tuple[float, ...]
    """Per layer, seconds its reduction holds the link."""

    @property
    def step_s(self) -> float:
        """A step's compute: (3L − 1)·d = T."""
        return (3 * self.layers - 1) * self.node_s

    def backward_param_end(self, layer: int) -> float:
        """End of Bp(layer) after the end of the step's forward: (2(L − 1 − l) + 1)·d."""
        return (2 * (self.layers - 1 - layer) + 1) * self.node_s


def fragment_assignment(layers: int, fragments: int, layout: str) -> tuple[tuple[int, ...], ...]:
    """Layers of each fragment: strided l → l mod P, sequential l → floor(l·P / L) (as the training engine)."""
    groups: list[list[int]] = [[] for _ in range(fragments)]
    for layer in range(layers):
        index = layer % fragments if layout == "strided" else layer * fragments // layers
        groups[index].append(layer)
    return tuple(tuple(g) for g in groups)


def sync_offsets(sync_every: int, fragments: int) -> tuple[int, ...]:
    """t_p = floor(p·H / P): fragment p syncs after the inner steps t with t ≡ t_p (mod H), t ≥ 1.

    Equals p·H/P when P divides H. Counting steps s = 0, 1, … (the step s is the (s+1)-th), fragment p syncs
    after step s when (s + 1 − t_p) is a positive multiple of H or zero with s + 1 = t_p ≥ 1.
    """
    return tuple(p * sync_every // fragments for p in range(fragments))


def build_schedule(model: ModelSpec, method: MethodSpec, link: LinkSpec) -> Schedule:
    """Resolve fragments, offsets, delay and per-layer transfer times."""
    fragments = method.num_fragments(model)
    period = 1 if method.data_parallel else method.sync_every
    layout = "strided" if method.data_parallel else method.layout
    offsets = (0,) if method.data_parallel else sync_offsets(method.sync_every, fragments)
    per_layer = link.transfer_s(model.params_per_layer, method.bits, method.wire_factor(link.workers))
    return Schedule(
        layers=model.layers,
        node_s=model.step_time_s / (3 * model.layers - 1),
        period_steps=period,
        fragment_layers=fragment_assignment(model.layers, fragments, layout),
        sync_offsets=tuple((t - 1) % period for t in offsets),
        delay_steps=method.delay_steps,
        ready_at_backward=method.data_parallel or method.outer_ready == "backward",
        transfer_s=tuple(per_layer for _ in range(model.layers)),
    )


@dataclass
class SimResult:
    """Outcome of one simulation."""

    cu: float
    """Compute utilization in steady state: H·T / (H·T + time blocked on reductions in one period)."""
    period_wall_s: float
    """Wall time of one period (H steps; one step for data-parallel) in steady state."""
    period_compute_s: float
    """Compute time of one period: H·T."""
    periods: int
    """Periods simulated."""
    inner_steps: int
    """Inner steps simulated: periods · H."""
    steady: bool
    """Whether the state at a period boundary repeated (else CU averages the last periods)."""
    period_end_s: list[float] = field(default_factory=list, repr=False)
    """Wall-clock time at the end of each simulated period."""

    @property
    def blocked_s_per_period(self) -> float:
        """Time the worker waits on reductions per period in steady state: wall − compute."""
        return self.period_wall_s - self.period_compute_s

    @property
    def outer_steps(self) -> int:
        """Alias of ``periods``: outer steps simulated (inner steps for data-parallel)."""
        return self.periods


class EventLoop:
    """The event loop over one schedule, run period by period from an idle start.

    Invariants between periods: ``now`` is the end of the last simulated step (a period boundary);
    ``link_free`` the time the link finishes its last queued reduction; ``due[s]`` lists (first layer of the
    fragment, completion time) of the reductions that the forward of step s waits for.
    """

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.now = 0.0
        self.link_free = 0.0
        self.next_step = 0
        self.periods = 0
        self.due: dict[int, list[tuple[int, float]]] = {}
        self.blocked_s = 0.0
        """Total time the worker waited on reductions so far."""
        self._syncs_at: dict[int, list[int]] = {}
        for p, offset in enumerate(schedule.sync_offsets):
            self._syncs_at.setdefault(offset, []).append(p)
        H, D = schedule.period_steps, schedule.delay_steps
        # Steps inside a period that may carry an event: a sync, or a forward waiting for a reduction.
        self._event_offsets = sorted(set(self._syncs_at) | {(o + 1 + D) % H for o in self._syncs_at})
        self._firsts = [layers[0] for layers in schedule.fragment_layers]
        # A fragment's layers enter the link in backward order (the order their Bp nodes end).
        self._link_order = [sorted(layers, reverse=True) for layers in schedule.fragment_layers]

    def run_period(self) -> float:
        """Simulate the next H steps; return the wall-clock time at their end."""
        sched = self.schedule
        L, d, T, H, D = sched.layers, sched.node_s, sched.step_s, sched.period_steps, sched.delay_steps
        backward_tail = (2 * L - 1) * d  # Bp(L−1) … Bp(0): from the end of the forward to the end of the step
        transfer = sched.transfer_s
        base = self.periods * H
        now, link_free, next_step = self.now, self.link_free, self.next_step
        for offset in self._event_offsets:
            step = base + offset
            now += (step - next_step) * T  # dependency-free steps in between take T each
            # Forward F(0) … F(L−1): F(l) starts at max(end of the previous node, reductions it waits for).
            cursor = now
            position = 0  # index of the next forward node
            for first, ready in sorted(self.due.pop(step, ())):
                start = cursor + (first - position) * d
                if ready > start:
                    self.blocked_s += ready - start
                    start = ready
                cursor, position = start, first
            forward_end = cursor + (L - position) * d
            now = forward_end + backward_tail
            next_step = step + 1
            # Syncs after this step: each layer of the fragment enters the FIFO link when it is ready.
            for p in self._syncs_at.get(offset, ()):
                for layer in self._link_order[p]:
                    ready = forward_end + sched.backward_param_end(layer) if sched.ready_at_backward else now
                    link_free = max(link_free, ready) + transfer[layer]
                self.due.setdefault(step + 1 + D, []).append((self._firsts[p], link_free))
        now += (base + H - next_step) * T
        self.now, self.link_free, self.next_step = now, link_free, base + H
        self.periods += 1
        return now

    def relative_state(self) -> tuple[float, ...]:
        """Everything the future depends on, relative to ``now``: the link's backlog and, per pending
        reduction, its step distance, fragment and remaining time. Times before ``now`` are clamped to 0:
        every later node starts at or after ``now``, so they can no longer delay anything. Two periods that
        end in the same relative state are followed by identical periods: the run is periodic from there."""
        state = [max(self.link_free - self.now, 0.0)]
        for step in sorted(self.due):
            for first, ready in sorted(self.due[step]):
                state += [float(step - self.next_step), float(first), max(ready - self.now, 0.0)]
        return tuple(state)


def simulate(
    model: ModelSpec,
    method: MethodSpec,
    link: LinkSpec,
    *,
    periods: int | None = None,
    max_periods: int = DEFAULT_MAX_PERIODS,
) -> SimResult:
    """Simulate until steady state (or exactly ``periods`` periods) and return the compute utilization.

    Steady state: the relative state (see EventLoop.relative_state) at the end of a period equals, to
    STEADY_REL_TOL·H·T, the one at the end of the period before, after at least D/H + 3 periods and
    MIN_INNER_STEPS steps. From then on
    every period repeats, so CU = H·T / (H·T + waits of the last period) exactly. A backlog that builds up
    slowly (a link just too slow for eager's slack) keeps the state changing and the simulation going until
    the backlog reaches the point where it blocks compute. If max_periods pass first, CU averages the last
    AVERAGE_PERIODS_IF_NOT_STEADY periods and ``steady`` is False.
    """
    for name, value in (("periods", periods), ("max_periods", max_periods)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise SimulatorConfigError(f"{name}={value!r}: must be an integer >= 1")
    schedule = build_schedule(model, method, link)
    H = schedule.period_steps
    compute = H * schedule.step_s
    loop = EventLoop(schedule)
    ends: list[float] = []
    blocked: list[float] = []  # waits on reductions, per period

    def one_period() -> None:
        before = loop.blocked_s
        ends.append(loop.run_period())
        blocked.append(loop.blocked_s - before)

    steady = False
    if periods is not None:
        for _ in range(periods):
            one_period()
    else:
        min_periods = max(schedule.delay_steps // H + 3, -(-MIN_INNER_STEPS // H))
        previous = loop.relative_state()
        tolerance = STEADY_REL_TOL * compute
        while len(ends) < max_periods:
            one_period()
            state = loop.relative_state()
            steady = len(ends) >= min_periods and _same_state(state, previous, tolerance)
            if steady:
                break
            previous = state
    # A step lasts T plus the waits of its forward, so a period's wall time is H·T + its waits, exactly.
    window = 1 if steady else min(AVERAGE_PERIODS_IF_NOT_STEADY, len(ends))
    waits = sum(blocked[-window:]) / window
    return SimResult(
        cu=compute / (compute + waits),
        period_wall_s=compute + waits,
        period_compute_s=compute,
        periods=len(ends),
        inner_steps=len(ends) * H,
        steady=steady,
        period_end_s=ends,
    )


def _same_state(a: tuple[float, ...], b: tuple[float, ...], tolerance: float) -> bool:
    """Equal length and every entry within ``tolerance`` (step distances and fragments compare exactly)."""
    return len(a) == len(b) and all(abs(x - y) <= tolerance for x, y in zip(a, b))
