"""What the engine measures: blocked time, utilization, bytes, norms, divergence; and real overlap."""

from __future__ import annotations

import time

import pytest
import torch

from _toy import TinyNet, run_inprocess, train_tinynet
from eagerloco import DiLoCo, DiLoCoConfig, EmulatedLink, NonFiniteOuterGradient
from eagerloco.comm import InProcessGroup

torch.set_num_threads(1)
NUMEL = sum(p.numel() for p in TinyNet().parameters())


def slow_run(config: DiLoCoConfig, latency_s: float, step_s: float, steps: int) -> list:
    group = InProcessGroup(2, timeout=30)

    def worker(comm):
        link = EmulatedLink(comm, latency_s=latency_s)
        return train_tinynet(link, config, steps, step_hook=lambda _: time.sleep(step_s))

    from eagerloco.comm import run_workers

    return run_workers(group, worker)


def test_overlap_is_real_eager_hides_a_collective_slower_than_an_inner_phase():
    # Inner phase H·step = 4 x 30 ms = 120 ms; every collective takes 180 ms (1.5 inner phases).
    # sync blocks for ~180 ms at every outer step; eager with k = 2 outer steps of slack never blocks.
    sync = slow_run(DiLoCoConfig(mode="sync", sync_every=4), 0.18, 0.03, 16)
    eager = slow_run(DiLoCoConfig(mode="eager", sync_every=4, delay=2), 0.18, 0.03, 16)
    for s, e in zip(sync, eager):
        # sync waits the whole 180 ms (a loaded CPU can only add to it); eager's waits are a tenth of that at most
        assert 0.9 * 0.18 <= s.stats["blocked_per_outer_step_s"] < 0.5
        assert e.stats["blocked_per_outer_step_s"] < 0.1 * s.stats["blocked_per_outer_step_s"]
        assert e.stats["utilization"] > s.stats["utilization"]
        # the final drain waits for what is still in flight: counted as blocked, not as an outer step
        assert e.stats["finalize_blocked_s"] > 0.1


def test_eager_k1_blocks_only_for_the_excess_over_one_inner_phase():
    # collective 180 ms, inner phase 120 ms, k = 1: a wait lasts at most the excess (60 ms). Because the next
    # collective is launched before the wait, the waits alternate ~60 ms / ~0 ms: mean ~30 ms per outer step.
    eager = slow_run(DiLoCoConfig(mode="eager", sync_every=4, delay=1), 0.18, 0.03, 20)
    records = [r for r in eager[0].records if r["kind"] == "step"]
    waits = [r["blocked_s"] for r in records[1:]]
    assert records[0]["blocked_s"] < 0.02  # nothing to wait for at the first sync point
    assert max(waits) < 0.1, waits
    assert 0.01 < sum(waits) / len(waits) < 0.06, waits


def test_bytes_per_outer_step_are_the_fp32_fragment():
    config = DiLoCoConfig(mode="sync", sync_every=3)
    results = run_inprocess(2, lambda comm: train_tinynet(comm, config, steps=9))
    records = [r for r in results[0].records if r["kind"] == "step"]
    assert len(records) == 3
    for r in records:
        assert r["payload_bytes"] == NUMEL * 4
        assert r["wire_bytes"] == NUMEL * 4  # ring all-reduce, M = 2: 2(M−1)/M·n = n
    assert results[0].stats["payload_bytes"] == 3 * NUMEL * 4


def test_bytes_with_fragments_sum_to_the_model():
    config = DiLoCoConfig(mode="eager", sync_every=4, num_fragments=2)
    results = run_inprocess(3, lambda comm: train_tinynet(comm, config, steps=4))
    records = [r for r in results[0].records if r["kind"] == "step"]
    assert sum(r["payload_bytes"] for r in records) == NUMEL * 4
    assert sum(r["wire_bytes"] for r in records) == (2 * 2 * NUMEL * 4) // 3


def test_utilization_and_time_accounting():
    config = DiLoCoConfig(mode="sync", sync_every=2)
    result = slow_run(config, latency_s=0.05, step_s=0.02, steps=6)[0]
    stats = result.stats
    assert stats["wall_s"] == pytest.approx(stats["inner_s"] + stats["blocked_s"] + stats["overhead_s"])
    assert stats["utilization"] == pytest.approx(stats["inner_s"] / stats["wall_s"])
    # 6 inner steps of >= 20 ms, 3 outer steps each blocked for the link's 50 ms (less the few µs between the
    # launch and the wait). Bounds that hold on a loaded machine: a busy CPU only lengthens inner steps and
    # wake-ups, so the lower bounds are exact and the upper bound only catches gross misaccounting.
    assert stats["inner_s"] >= 0.12
    assert 0.9 * 0.15 <= stats["blocked_s"] < 1.0
    assert stats["utilization"] <= stats["inner_s"] / (stats["inner_s"] + 0.9 * 0.15)
    for record in result.records:
        assert 0 <= record["utilization"] <= 1
        assert record["window_wall_s"] >= record["window_inner_s"]


def test_norms_and_staleness():
    config = DiLoCoConfig(mode="eager", sync_every=3, delay=1)
    result = train_tinynet(InProcessGroup(1).communicator(0), config, steps=9)
    steps = [r for r in result.records if r["kind"] == "step"]
    assert [r["staleness"] for r in steps] == [0, 3, 3]
    for r in steps:
        assert r["delta_norm"] > 0
        # M = 1: eager applies exactly the fresh outer gradient
        assert r["applied_norm"] == pytest.approx(r["delta_norm"], rel=1e-6)


def test_divergence_measured_for_eager():
    config = DiLoCoConfig(mode="eager", sync_every=3, divergence_every=1)
    results = run_inprocess(2, lambda comm: train_tinynet(comm, config, steps=9))
    div = [r["divergence"] for r in results[0].records if r["kind"] == "step"]
    assert all(d is not None and d > 0 for d in div)
    other = [r["divergence"] for r in results[1].records if r["kind"] == "step"]
    assert other == pytest.approx(div, rel=1e-5)  # M = 2: both are half the distance between the two φ
    assert results[0].stats["diagnostic_bytes"] > 0
    sync = run_inprocess(
        2, lambda comm: train_tinynet(comm, DiLoCoConfig(mode="sync", sync_every=3, divergence_every=1), 6)
    )
    assert all(r["divergence"] == 0.0 for r in sync[0].records if r["kind"] == "step")


def test_nonfinite_outer_gradient_raises_before_touching_phi():
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    loco = DiLoCo(model, inner, DiLoCoConfig(mode="sync", sync_every=1), comm=InProcessGroup(1).communicator(0))
    phi_before = loco.states[0].phi.clone()
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteOuterGradient, match=r"fragment 0 .* has 1 non-finite values"):
        loco.step()
    assert torch.equal(loco.states[0].phi, phi_before)


def test_wrapper_is_cheap_off_sync_points():
    # The benchmark in benchmarks/ measures the overhead properly; here only a sanity bound per call.
    model = TinyNet()
    loco = DiLoCo(model, None, DiLoCoConfig(sync_every=10_000_000), comm=InProcessGroup(1).communicator(0))
    start = time.perf_counter()
    for _ in range(10_000):
        loco.step()
    assert (time.perf_counter() - start) / 10_000 < 100e-6


class FakeClock:
    """Stands in for the ``time`` module inside the recorder: ``perf_counter()`` returns ``now``."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_the_recorder_splits_time_by_hand(monkeypatch):
    from eagerloco.engine import recorder as recorder_module

    clock = FakeClock()
    monkeypatch.setattr(recorder_module, "time", clock)
    rec = recorder_module.Recorder()  # t = 0
    clock.now = 2.0
    rec.enter()  # 2 s of inner compute
    rec.blocked(0.25)
    clock.now = 3.0
    rec.exit()  # 1 s in the call, 0.25 blocked: 0.75 overhead
    clock.now = 4.0
    with rec.paused():  # 4 → 7: three seconds paused, nested pauses count once
        clock.now = 5.0
        with rec.paused():
            clock.now = 6.0
        clock.now = 6.5
        assert rec.elapsed_s() == 4.0  # frozen at the pause's start
        clock.now = 7.0
    clock.now = 8.0
    rec.enter()  # 3 → 4 and 7 → 8 were inner compute: inner 2 + 2 = 4
    rec.open(8, kind="finalize")
    rec.blocked(1.0)
    rec.applied(0)
    clock.now = 9.5
    record = rec.close()
    clock.now = 10.0
    rec.exit()  # 2 s in the call, 1 blocked: overhead 0.75 + 1 = 1.75
    stats = rec.stats
    assert (stats.inner_s, stats.blocked_s, stats.overhead_s, stats.finalize_blocked_s) == (4.0, 1.25, 1.75, 1.0)
    assert stats.wall_s == 7.0 and stats.utilization == 4.0 / 7.0
    assert stats.steady_utilization == 4.0 / 6.0  # the final drain's second taken out
    assert stats.outer_steps == 0  # a finalize record is not an outer step
    assert record is not None and rec.records == [record]
    assert (record.kind, record.fragments_applied, record.blocked_s, record.overhead_s) == ("finalize", [0], 1.0, 0.5)
    # the window since creation: inner 2 + 2, wall 2 + 1 + 2 + 1.5 (up to close), the pause excluded
    assert (record.window_inner_s, record.window_wall_s, record.utilization) == (4.0, 6.5, 4.0 / 6.5)
    assert rec.elapsed_s() == 10.0 - 3.0


def test_a_finalize_that_applied_nothing_leaves_no_record_and_both_engines_are_measured():
    from eagerloco.engine import Measured, Recorder
    from eagerloco.engine.data_parallel import GradientAverager

    rec = Recorder()
    rec.enter()
    rec.open(5, kind="finalize")
    assert rec.close() is None and rec.records == []
    rec.exit()
    model = TinyNet()
    comm = InProcessGroup(1).communicator(0)
    loco = DiLoCo(model, None, DiLoCoConfig(mode="sync", sync_every=2), comm=comm)
    for engine in (rec, loco, GradientAverager(model, comm)):
        assert isinstance(engine, Measured)


def test_steady_utilization_takes_out_the_final_drain():
    from eagerloco.engine import RunStats

    stats = RunStats(inner_s=3.0, blocked_s=2.0, overhead_s=1.0, finalize_blocked_s=1.0)
    assert (stats.utilization, stats.steady_utilization) == (0.5, 0.6)
    assert stats.to_dict()["steady_utilization"] == 0.6
    assert RunStats().steady_utilization == 1.0


def test_steady_state_counts_every_average_launched_as_waited_for():
    from eagerloco.engine import RunStats

    # eager k = 1 over T = 4 sync points: 4 launches, 3 waits in the loop (3 s), the 4th average drained (2 s)
    stats = RunStats(
        inner_s=8.0, blocked_s=5.0, overhead_s=1.0, finalize_blocked_s=2.0, outer_steps=4,
        outer_launches=4, outer_waits=3, outer_wait_s=3.0,
    )  # fmt: skip
    assert stats.steady_blocked_s == 3.0 + 3.0 * (4 / 3 - 1)  # 4 waits of 1 s
    assert stats.steady_wall_s == 8.0 + 1.0 + stats.steady_blocked_s
    assert stats.steady_utilization == 8.0 / stats.steady_wall_s
    assert stats.blocked_per_outer_step_s == stats.steady_blocked_s / 4
    assert stats.to_dict()["steady_blocked_s"] == stats.steady_blocked_s
    # every average waited for in the loop (sync): only the drain is taken out; blocked time that is not a wait
    # for an average (a divergence measurement) is kept as it is, not scaled
    sync = RunStats(inner_s=3.0, blocked_s=2.5, overhead_s=1.0, outer_launches=4, outer_waits=4, outer_wait_s=2.0)
    assert (sync.steady_blocked_s, sync.steady_utilization) == (2.5, 3.0 / 6.5)
    mixed = RunStats(inner_s=3.0, blocked_s=2.5, finalize_blocked_s=0.5, outer_launches=2, outer_waits=1,
                     outer_wait_s=1.5)  # fmt: skip
    assert mixed.steady_blocked_s == 2.0 + 1.5
    # no wait in the loop to scale from (a single sync point): the drain alone is taken out
    assert RunStats(inner_s=1.0, blocked_s=1.0, finalize_blocked_s=1.0, outer_launches=1).steady_blocked_s == 0.0


def test_the_recorder_counts_waits_inside_step_only(monkeypatch):
    from eagerloco.engine import recorder as recorder_module

    clock = FakeClock()
    monkeypatch.setattr(recorder_module, "time", clock)
    rec = recorder_module.Recorder()
    rec.enter()
    rec.open(2)
    rec.launched(0, 16, None)
    rec.waited(0.5)
    rec.close()
    rec.exit()
    rec.waited(0.25)  # outside a record (a checkpoint draining what is in flight): blocked, not a loop wait
    rec.enter()
    rec.open(4, kind="finalize")
    rec.waited(1.0)
    rec.applied(0)
    rec.close()
    rec.exit()
    stats = rec.stats
    assert (stats.outer_launches, stats.outer_waits, stats.outer_wait_s) == (1, 1, 0.5)
    assert (stats.blocked_s, stats.finalize_blocked_s) == (1.75, 1.0)


@pytest.mark.parametrize(
    ("config", "launches", "waits"),
    [
        (DiLoCoConfig(mode="sync", sync_every=3), 4, 4),  # every average waited for at its own sync point
        (DiLoCoConfig(mode="eager", sync_every=3), 4, 3),  # the last one is the drain's
        (DiLoCoConfig(mode="delayed", sync_every=3, delay=2), 4, 2),
        # P = 2 with offsets 0 and 2 (H = 4): syncs at steps 2, 4, ..., 12, each due τ = 1 step later: the
        # one launched at step 12 is drained
        (DiLoCoConfig(mode="overlap", sync_every=4, num_fragments=2, overlap_steps=1), 6, 5),
    ],
)
def test_the_engine_counts_launches_and_loop_waits(config, launches, waits):
    results = run_inprocess(2, lambda comm: train_tinynet(comm, config, steps=12))
    for result in results:
        assert (result.stats["outer_launches"], result.stats["outer_waits"]) == (launches, waits)
