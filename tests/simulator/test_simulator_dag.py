"""The fast event loop against a plain node-by-node schedule of the full per-layer DAG.

The reference below walks every compute node of every step in program order, starts each at
max(end of the previous node, end of the reductions it depends on) with the dependency on *every* layer of the
fragment (not only its first one), and serves reductions on a FIFO link sorted by ready time. It shares
nothing with ``eagerloco.simulator.events`` except the specs, so agreement pins the shortcuts the fast loop
takes (skipping dependency-free steps and nodes, binding only the fragment's first layer).
"""

from __future__ import annotations

import pytest

from eagerloco.simulator import LinkSpec, MethodSpec, ModelSpec, simulate
from eagerloco.simulator.events import fragment_assignment, sync_offsets


def reference_period_ends(model: ModelSpec, method: MethodSpec, link: LinkSpec, periods: int) -> list[float]:
    """Wall-clock time at the end of each period (H steps; one step for data-parallel)."""
    L = model.layers
    d = model.step_time_s / (3 * L - 1)
    P = method.num_fragments(model)
    H = 1 if method.data_parallel else method.sync_every
    D = method.delay_steps
    layout = "strided" if method.data_parallel else method.layout
    groups = [[l for l in range(L) if (l % P if layout == "strided" else l * P // L) == p] for p in range(P)]
    offsets = [p * H // P for p in range(P)]
    at_backward = method.data_parallel or method.outer_ready == "backward"
    transfer = 2 * (link.workers - 1) * link.latency_s + (
        model.params / L * method.bits * 2 * (link.workers - 1) / link.workers / (link.bandwidth_gbps * 1e9)
    )
    program = [("F", l) for l in range(L)]
    for l in reversed(range(L)):
        program.append(("Bp", l))
        if l > 0:
            program.append(("Ba", l))
    assert len(program) == 3 * L - 1

    t = 0.0
    link_free = 0.0
    needs: dict[tuple[int, int], float] = {}  # (step, layer) -> completion its forward waits for
    ends = []
    for s in range(periods * H):
        bp_end = {}
        for kind, l in program:
            start = max(t, needs.pop((s, l), 0.0)) if kind == "F" else t
            t = start + d
            if kind == "Bp":
                bp_end[l] = t
        for p in range(P):
            if (s + 1 - offsets[p]) % H == 0 and s + 1 >= max(offsets[p], 1):
                queue = sorted((bp_end[l] if at_backward else t, -l) for l in groups[p])
                for ready, _ in queue:
                    link_free = max(link_free, ready) + transfer
                for l in groups[p]:
                    needs[(s + 1 + D, l)] = link_free
        if (s + 1) % H == 0:
            ends.append(t)
    return ends


SMALL = ModelSpec(name="small", params=7e9, layers=7, step_time_s=0.2)

CASES = [
    MethodSpec(name="dp", data_parallel=True),
    MethodSpec(name="diloco", sync_every=6),
    MethodSpec(name="diloco_backward", sync_every=6, outer_ready="backward"),
    MethodSpec(name="streaming", sync_every=6, fragments=3),
    MethodSpec(name="streaming_seq", sync_every=6, fragments=3, layout="sequential"),
    MethodSpec(name="streaming_p4_h6", sync_every=6, fragments=4),  # P does not divide H or L
    MethodSpec(name="overlap2", sync_every=6, fragments=3, overlap_steps=2),
    MethodSpec(name="overlap5_backward", sync_every=6, fragments=2, overlap_steps=5, outer_ready="backward"),
    MethodSpec(name="eager1", sync_every=6, fragments=3, slack_outer_steps=1, bits=4),
    MethodSpec(name="eager2", sync_every=5, fragments=5, slack_outer_steps=2, bits=8),
    MethodSpec(name="eager1_p1", sync_every=4, slack_outer_steps=1, bits=32),
]


@pytest.mark.parametrize("method", CASES, ids=lambda m: m.name)
@pytest.mark.parametrize("bandwidth", [3.0, 40.0, 400.0, 5000.0])
@pytest.mark.parametrize(("workers", "latency"), [(2, 0.0), (3, 0.01)])
def test_event_loop_matches_node_by_node_dag(method: MethodSpec, bandwidth: float, workers: int, latency: float):
    link = LinkSpec(bandwidth_gbps=bandwidth, workers=workers, latency_s=latency)
    periods = 12 if method.data_parallel else 7
    expected = reference_period_ends(SMALL, method, link, periods)
    got = simulate(SMALL, method, link, periods=periods).period_end_s
    assert got == pytest.approx(expected, rel=1e-12)


def test_fragment_assignment_and_offsets():
    assert fragment_assignment(7, 3, "strided") == ((0, 3, 6), (1, 4), (2, 5))
    assert fragment_assignment(7, 3, "sequential") == ((0, 1, 2), (3, 4), (5, 6))
    assert fragment_assignment(24, 8, "strided")[5] == (5, 13, 21)
    # H = 100, P = 8 (the papers' 1B setup): floor(p·100/8), as the training engine computes offsets.
    assert sync_offsets(100, 8) == (0, 12, 25, 37, 50, 62, 75, 87)
    assert sync_offsets(100, 4) == (0, 25, 50, 75)
