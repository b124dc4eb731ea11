"""Bandwidth grid, threshold search, link bound, wall-clock estimate and reading a run's summary."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from eagerloco.simulator import (
    BANDWIDTH_GRID_GBPS,
    PAPER_GRID_GBPS,
    TOKENS_PER_STEP_PAPER,
    LinkSpec,
    ModelSpec,
    SimulatorConfigError,
    bits_per_outer_step,
    estimate_wall_clock,
    link_rate_from_blocked,
    load_run_summary,
    method_preset,
    min_bandwidth_for_targets,
    mode_method,
    model_preset,
    simulate,
    smallest_hiding_overlap,
    sustained_bandwidth_bound_gbps,
)


def test_grid_is_the_papers_log_grid_extended_below():
    grid = BANDWIDTH_GRID_GBPS
    assert len(grid) == 87 and len(PAPER_GRID_GBPS) == 50
    assert grid[37:] == PAPER_GRID_GBPS
    assert PAPER_GRID_GBPS[0] == pytest.approx(0.1, rel=1e-15)
    assert grid[-1] == pytest.approx(1000.0, rel=1e-15)
    assert grid[0] == pytest.approx(10 ** (-1 - 37 * 4 / 49), rel=1e-14)  # 0.0954 Mbit/s
    assert 0.09e-3 < grid[0] < 0.1e-3
    ratios = [b / a for a, b in itertools.pairwise(grid)]
    assert ratios == pytest.approx([10 ** (4 / 49)] * 86, rel=1e-12)


def test_min_bandwidth_for_targets_picks_first_grid_point_reaching_each():
    grid = [1.0, 2.0, 4.0, 8.0]
    cus = [0.4, 0.85, 0.95, 0.98]
    assert min_bandwidth_for_targets(cus, grid, [0.5, 0.8, 0.9, 0.95, 0.99]) == [2.0, 2.0, 4.0, 4.0, None]
    with pytest.raises(SimulatorConfigError, match="3 CU values for a grid of 4"):
        min_bandwidth_for_targets(cus[:3], grid)
    with pytest.raises(SimulatorConfigError, match=r"CU target 1.5: must be in \(0, 1\]"):
        min_bandwidth_for_targets(cus, grid, [1.5])


def test_link_bound_formula():
    model = model_preset("100B")
    # 1e11 params · 4 bits · 2(M−1)/M = 4e11 bits per outer step over H·T = 490 s
    assert bits_per_outer_step(model, method_preset("streaming_eager_fp4"), 2) == 4e11
    assert sustained_bandwidth_bound_gbps(model, method_preset("streaming_eager_fp4")) == pytest.approx(400 / 490)
    assert sustained_bandwidth_bound_gbps(model, method_preset("dp_bf16"), workers=4) == pytest.approx(
        1.6e12 * 1.5 / 4.9e9
    )


def test_wall_clock_25b_tokens_at_1_gbit():
    """The eager paper's column: 1B, 25e9 tokens at 1 Gbit/s, 2^20 tokens per step → 23,842 steps, 0.662 h."""
    model, link = model_preset("1B"), LinkSpec(bandwidth_gbps=1.0)
    compute_h = 23842 * 0.1 / 3600
    eager = estimate_wall_clock(model, method_preset("streaming_eager_fp4"), link, 25e9, TOKENS_PER_STEP_PAPER)
    assert eager.inner_steps == 23842
    assert eager.hours == pytest.approx(compute_h, rel=1e-12) and eager.cu == 1.0
    assert eager.bytes_per_worker == pytest.approx(1e9 * 4 / 8 * 238.42, rel=1e-12)
    dp = estimate_wall_clock(model, method_preset("dp_bf16"), link, 25e9, TOKENS_PER_STEP_PAPER)
    d, r = 0.1 / 71, 16.0 / 24  # node time, per-layer transfer at 1 Gbit/s
    assert dp.hours == pytest.approx(23842 * max(0.1 + r, 25 * d + 24 * r) / 3600, rel=1e-10)
    assert dp.bytes_per_worker == pytest.approx(23842 * 2e9, rel=1e-12)
    # τ = 1 with FP4: 8 fragment syncs per outer step each expose 0.5 s − 0.1 s − p·d
    tau1 = estimate_wall_clock(model, method_preset("streaming_tau1_fp4"), link, 25e9, TOKENS_PER_STEP_PAPER)
    waits = sum(0.5 - 0.1 - p * d for p in range(8))
    assert tau1.hours == pytest.approx(compute_h * (10 + waits) / 10, rel=1e-10)
    with pytest.raises(SimulatorConfigError, match=r"tokens=-1.0: must be a finite number > 0"):
        estimate_wall_clock(model, method_preset("dp_bf16"), link, -1.0, TOKENS_PER_STEP_PAPER)


def write_summary(tmp_path, **summary):
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    return tmp_path


def test_load_run_summary(tmp_path):
    run = write_summary(
        tmp_path, params=123456, inner_step_time_s=0.25, num_layers=6, sync_every=30, num_fragments=3, workers=4
    )
    info = load_run_summary(run)
    assert (info.model.params, info.model.layers, info.model.step_time_s) == (123456, 6, 0.25)
    assert (info.sync_every, info.fragments, info.workers) == (30, 3, 4)
    assert (info.mode, info.compression, info.link_mbit, info.measured_cu) == (None, None, None, None)
    assert load_run_summary(run, layers=2).model.layers == 2


def test_load_run_summary_reads_the_method_and_link_from_config_json(tmp_path):
    run = write_summary(
        tmp_path,
        params=820352,
        inner_step_time_s=0.2,
        num_layers=4,
        sync_every=30,
        mode="sync",
        link_mbit=20.0,
        utilization=0.875,
        blocked_per_outer_step_s=0.5,
    )
    config = {
        "outer": {"mode": "overlap", "sync_every": 10, "num_fragments": 2, "overlap_steps": 0, "delay": 3,
                  "compression": "fp4", "fragment_layout": "sequential", "outer_lr": 0.7},
        "run": {"workers": 3, "link_mbit": 8.5, "link_latency_ms": 5.0, "steps": 100},
        "model": {"n_layer": 4},
    }  # fmt: skip
    (run / "config.json").write_text(json.dumps(config))
    info = load_run_summary(run)
    assert (info.mode, info.sync_every, info.fragments, info.overlap_steps, info.delay) == ("overlap", 10, 2, 0, 3)
    assert (info.compression, info.layout, info.workers) == ("fp4", "sequential", 3)
    assert (info.link_mbit, info.link_latency_ms) == (8.5, 5.0)
    assert (info.measured_cu, info.measured_blocked_s) == (0.875, 0.5)


@pytest.mark.parametrize(
    ("outer", "run", "message"),
    [
        ({"compression": "int4"}, {}, r"config.json: compression='int4': must be one of none, bf16"),
        ({"mode": "async"}, {}, r"config.json: mode='async': must be one of dp, sync"),
        ({"overlap_steps": -1}, {}, r"config.json: overlap_steps=-1: must be an integer >= 0"),
        ({}, {"link_mbit": -3}, r"config.json: link_mbit=-3: must be a number >= 0"),
        ({"num_fragments": 0}, {}, r"config.json: num_fragments=0: must be an integer > 0"),
    ],
)
def test_load_run_summary_config_errors(tmp_path, outer, run, message):
    write_summary(tmp_path, params=10, inner_step_time_s=0.1, num_layers=2)
    (tmp_path / "config.json").write_text(json.dumps({"outer": outer, "run": run}))
    with pytest.raises(SimulatorConfigError, match=message):
        load_run_summary(tmp_path)


@pytest.mark.parametrize(
    ("summary", "layers", "message"),
    [
        ({"inner_step_time_s": 0.1, "num_layers": 2}, None, r"missing key 'params' \(the parameter count\)"),
        ({"params": 10, "num_layers": 2}, None, r"missing key 'inner_step_time_s'"),
        ({"params": 10, "inner_step_time_s": 0.1}, None, r"missing key 'num_layers'.*--layers"),
        ({"params": -3, "inner_step_time_s": 0.1}, 2, r"params=-3: must be an integer > 0"),
        ({"params": 10, "inner_step_time_s": "fast"}, 2, r"inner_step_time_s='fast': must be a number > 0"),
        ({"params": 10, "inner_step_time_s": 0.1, "workers": 1.5}, 2, r"workers=1.5: must be an integer > 0"),
    ],
)
def test_load_run_summary_errors(tmp_path, summary, layers, message):
    with pytest.raises(SimulatorConfigError, match=message):
        load_run_summary(write_summary(tmp_path, **summary), layers=layers)


def test_load_run_summary_missing_file(tmp_path):
    with pytest.raises(SimulatorConfigError, match=r"summary.json: no such file"):
        load_run_summary(tmp_path)
    with pytest.raises(SimulatorConfigError, match="not a directory"):
        load_run_summary(tmp_path / "nope")
    (tmp_path / "summary.json").write_text("{oops")
    with pytest.raises(SimulatorConfigError, match="cannot read it as JSON"):
        load_run_summary(tmp_path)


def test_wall_clock_hours_scale_with_cu():
    model, method = model_preset("10B"), method_preset("diloco")
    est = estimate_wall_clock(model, method, LinkSpec(bandwidth_gbps=2.0), 1e12, 4e6)
    # R = 1e10·16 / 2e9 = 80 s per outer step of H·T = 80 s: CU = 1/2
    assert est.cu == pytest.approx(0.5, rel=1e-12)
    assert est.hours == pytest.approx(2 * math.ceil(1e12 / 4e6) * 0.8 / 3600, rel=1e-12)


# N = 1e6 fp32 parameters in 4 layers, T = 0.1 s, H = 10, P = 2 strided fragments of 0.5e6 parameters (16 Mbit each).
SMALL = ModelSpec(name="small", params=1e6, layers=4, step_time_s=0.1)
OVERLAP_P2 = mode_method("overlap", sync_every=10, num_fragments=2)


def test_smallest_hiding_overlap_at_32_mbit():
    """At 32 Mbit/s a fragment's all-reduce takes 16 / 32 = 0.5 s = 5 inner steps: τ = 5 hides it (CU 1), τ = 4
    leaves 0.1 s to wait at fragment 0 and 0.1 − d at fragment 1 (d = T / (3L − 1), fragment 1's outer gradients
    are ready d earlier) per outer step of H·T = 1 s."""
    choice = smallest_hiding_overlap(SMALL, OVERLAP_P2, LinkSpec(bandwidth_gbps=0.032, workers=2), target=0.99)
    assert (choice.overlap_steps, choice.reached) == (5, True)
    assert list(choice.cu_by_tau) == [1, 2, 3, 4, 5]  # stops at the first τ that reaches the target
    assert choice.result.cu == pytest.approx(1.0, abs=1e-12)
    assert choice.cu_by_tau[4] == pytest.approx(1 / (1 + 0.1 + (0.1 - 0.1 / 11)), rel=1e-12)
    # every τ below the choice misses the target; a lower target stops earlier, at its own smallest τ
    assert all(cu < 0.99 for tau, cu in choice.cu_by_tau.items() if tau < 5)
    assert smallest_hiding_overlap(SMALL, OVERLAP_P2, LinkSpec(0.032, workers=2), target=0.8).overlap_steps == 4


def test_smallest_hiding_overlap_on_a_link_too_slow_for_any_tau():
    """At 16 Mbit/s a fragment takes 1 s = H steps: no τ < H hides it, and from τ = 5 on the link carries one
    fragment after the other at its full rate, CU = link rate / link bound = 16 / 32 = 0.5 for τ = 5 ... 9 alike:
    the smallest of them is chosen, and every τ was simulated."""
    link = LinkSpec(bandwidth_gbps=0.016, workers=2)
    choice = smallest_hiding_overlap(SMALL, OVERLAP_P2, link)
    assert (choice.overlap_steps, choice.reached) == (5, False)
    assert list(choice.cu_by_tau) == list(range(1, 10))
    assert choice.result.cu == pytest.approx(0.5, rel=1e-12) == max(choice.cu_by_tau.values())
    for tau, cu in choice.cu_by_tau.items():  # what the search saw is the simulation of that τ
        assert cu == simulate(SMALL, mode_method("overlap", sync_every=10, num_fragments=2, overlap_steps=tau), link).cu


def test_smallest_hiding_overlap_refuses_other_methods():
    link = LinkSpec(bandwidth_gbps=0.016, workers=2)
    with pytest.raises(SimulatorConfigError, match=r"^eager: τ is sized for an overlap method only"):
        smallest_hiding_overlap(SMALL, mode_method("eager", sync_every=10), link)
    with pytest.raises(SimulatorConfigError, match=r"^CU target 0: must be in \(0, 1\]$"):
        smallest_hiding_overlap(SMALL, OVERLAP_P2, link, target=0)


def test_link_rate_from_blocked_inverts_the_simulator():
    """sync blocks for its whole all-reduce: N·32·2(M − 1)/M bits / rate (+ 2(M − 1) latency hops), so the rate
    that gives a measured wait is exact arithmetic; the simulator at the rate found predicts that wait back."""
    model = ModelSpec(name="m", params=1e6, layers=4, step_time_s=0.1)
    sync = mode_method("sync", sync_every=10)
    assert link_rate_from_blocked(model, sync, 2.0) == pytest.approx(32e6 / 2.0 / 1e9, rel=1e-11)
    four = link_rate_from_blocked(model, sync, 2.0, workers=4)  # each worker sends 2·3/4 of the data
    assert four == pytest.approx(32e6 * 1.5 / 2.0 / 1e9, rel=1e-11)
    fp4 = mode_method("sync", sync_every=10, compression="fp4", num_fragments=2)
    for workers, latency in ((2, 0.0), (3, 0.01)):
        gbps = link_rate_from_blocked(model, fp4, 0.7, workers=workers, latency_s=latency)
        link = LinkSpec(bandwidth_gbps=gbps, workers=workers, latency_s=latency)
        assert simulate(model, fp4, link).blocked_s_per_period == pytest.approx(0.7, rel=1e-9)
    for bad in (0.0, -1.0, math.inf, math.nan, True):
        with pytest.raises(SimulatorConfigError, match="must be a finite number of seconds > 0"):
            link_rate_from_blocked(model, sync, bad)
    with pytest.raises(SimulatorConfigError, match="no link rate explains it"):
        link_rate_from_blocked(model, sync, 0.01, latency_s=0.01)  # 2 hops of latency already take 0.02 s
