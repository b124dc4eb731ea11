"""Opt-in variants of the eager rule (ALGORITHMS.md 4.1, the own-contribution weight; 4.4, smoothing), exact.

The own-contribution weight w ∈ [1/M, 1]: Δ̃_m(t) = Δ(t − kH) + w·(Δ_m(t) − Δ_m(t − kH)); w = 1/M (the default,
``eager_own_weight=None``) is the paper's rule. The toy: worker m holds one scalar θ with loss 0.5·(θ − a_m)²,
a_m = 4m, inner SGD lr 0.5 (θ → (θ + a_m)/2 per step), H = 2, outer SGD lr 0.5 without momentum, so every
number is a short binary fraction and every assert below is exact.
"""

from __future__ import annotations

import pytest
import torch

from _toy import Quadratic, TinyNet, run_inprocess, run_tinynet_trace
from eagerloco import DiLoCo, DiLoCoConfig
from eagerloco.engine.config import ConfigError
from eagerloco.engine.strategies import make_strategy
from eagerloco.ft.resize import resize_outer_states


def run_quadratic(world_size: int, steps: int, nan_at: tuple[int, int] | None = None, **overrides) -> list[dict]:
    """Per worker: φ and θ at every inner step, Δ_m(t) and the applied g_m(t) at every sync point, φ after
    finalize. ``nan_at`` = (worker, inner step): that worker's target is NaN at that step (its θ goes NaN)."""
    values = {"mode": "eager", "sync_every": 2, "outer_lr": 0.5, "outer_momentum": 0.0, **overrides}
    config = DiLoCoConfig(**values)

    def worker(comm):
        model = Quadratic()
        inner = torch.optim.SGD(model.parameters(), lr=0.5)
        loco = DiLoCo(model, inner, config, comm=comm)
        target = torch.tensor([4.0 * comm.rank])
        trace = {"delta": {}, "applied": {}}
        for step in range(1, steps + 1):
            bad = nan_at == (comm.rank, step)
            model(torch.tensor([float("nan")]) if bad else target).backward()
            inner.step()
            inner.zero_grad()
            phi_before, theta = loco.states[0].phi.item(), model.theta.item()
            loco.step()
            t = loco.inner_step
            if t % config.sync_every == 0:
                trace["delta"][t] = phi_before - theta  # Δ_m(t) = φ_m − θ_m(t)
                trace["applied"][t] = (phi_before - loco.states[0].phi.item()) / config.outer_lr  # g_m(t)
        loco.finalize()
        trace["final"] = loco.states[0].phi.item()
        return trace

    return run_inprocess(world_size, worker)


def test_own_weight_one_hand_computed():
    # M = 2, w = 1. t=2: θ = (0, 3), Δ_m = (0, −3), g_m = own = (0, −3): φ = (0, 1.5).
    # t=4: worker 0 from 0: Δ_0 = 0, g_0 = (Δ(2) − 0) + 0 = −1.5: φ_0 = 0.75.
    #      worker 1 from 1.5: θ = 1.5/4 + 3 = 3.375, Δ_1 = −1.875, g_1 = (−1.5 + 3) − 1.875 = −0.375: φ_1 = 1.6875.
    #      The mean of what they apply, (−1.5 − 0.375)/2 = −0.9375, is the fresh average Δ(4) = (0 − 1.875)/2.
    # finalize: Δ(4) = −0.9375; g_0 = −0.9375 − 0, g_1 = −0.9375 + 1.875: φ = 0.75 + 0.46875 = 1.6875 − 0.46875.
    w0, w1 = run_quadratic(2, 4, eager_own_weight=1.0)
    assert (w0["applied"], w1["applied"]) == ({2: 0.0, 4: -1.5}, {2: -3.0, 4: -0.375})
    assert (w0["delta"], w1["delta"]) == ({2: 0.0, 4: 0.0}, {2: -3.0, 4: -1.875})
    assert w0["final"] == w1["final"] == 1.21875 == 0.0 - 0.5 * (-1.5 - 0.9375)  # telescoping


@pytest.mark.parametrize("delay", [1, 2])
@pytest.mark.parametrize(
    ("world_size", "weight"), [(2, None), (2, 0.5), (2, 0.75), (2, 1.0), (4, None), (4, 0.25), (4, 0.625), (4, 1.0)]
)
def test_rule_mean_and_telescoping(world_size, weight, delay):
    """Every worker applies exactly Δ(t − kH) + w·(Δ_m(t) − Δ_m(t − kH)); the mean over workers is
    (1 − w)·Δ(t − kH) + w·Δ(t) (with w = 1: DiLoCo's fresh average); after finalize every φ_m is
    φ_0 − lr·Σ_t Δ(t) (each contribution applied exactly once)."""
    steps = 6  # three sync points: the numbers stay short binary fractions (exact in fp32)
    traces = run_quadratic(world_size, steps, eager_own_weight=weight, delay=delay)
    w = 1 / world_size if weight is None else weight
    sync_points = list(range(2, steps + 1, 2))
    avg = {t: sum(tr["delta"][t] for tr in traces) / world_size for t in sync_points}
    for t in sync_points:
        old = t - 2 * delay
        stale_avg = avg.get(old, 0.0)
        for tr in traces:
            stale_own = tr["delta"].get(old, 0.0)
            assert tr["applied"][t] == stale_avg + w * (tr["delta"][t] - stale_own), (t, tr)
        mean_applied = sum(tr["applied"][t] for tr in traces) / world_size
        assert mean_applied == (1 - w) * stale_avg + w * avg[t]
        if w == 1.0:
            assert mean_applied == avg[t]
    expected = 0.0 - 0.5 * sum(avg.values())
    assert [tr["final"] for tr in traces] == [expected] * world_size


@pytest.mark.parametrize("beta", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("delay", [1, 2])
@pytest.mark.parametrize(("world_size", "weight"), [(2, None), (2, 0.75), (4, 0.25), (4, 0.75)])
def test_smoothing_rule_mean_and_telescoping(world_size, weight, delay, beta):
    """ALGORITHMS.md 4.4: every worker applies exactly w·Δ_m(t) + (1 − β)·R_m(t − kH) + β·R_m(t − 2kH), with
    R_m(s) = Δ(s) − w·Δ_m(s) the rest of the average launched at s (0 before the first sync point); the mean over
    workers is w·Δ(t) + (1 − w)·[(1 − β)·Δ(t − kH) + β·Δ(t − 2kH)]; after finalize every φ_m is
    φ_0 − lr·Σ_t Δ(t): each contribution applied exactly once, the deferred instalments included."""
    steps = 8  # four sync points: with k = 1 instalments from two averages; all short binary fractions (exact)
    traces = run_quadratic(world_size, steps, eager_own_weight=weight, delay=delay, eager_smoothing=beta)
    w = 1 / world_size if weight is None else weight
    sync_points = list(range(2, steps + 1, 2))
    avg = {t: sum(tr["delta"][t] for tr in traces) / world_size for t in sync_points}

    def rest(tr, s):
        return avg[s] - w * tr["delta"][s] if s in avg else 0.0

    for t in sync_points:
        old, older = t - 2 * delay, t - 4 * delay
        for tr in traces:
            assert tr["applied"][t] == w * tr["delta"][t] + (1 - beta) * rest(tr, old) + beta * rest(tr, older), t
        mean_applied = sum(tr["applied"][t] for tr in traces) / world_size
        stale = (1 - beta) * avg.get(old, 0.0) + beta * avg.get(older, 0.0)
        assert mean_applied == w * avg[t] + (1 - w) * stale
    expected = 0.0 - 0.5 * sum(avg.values())
    assert [tr["final"] for tr in traces] == [expected] * world_size


def test_smoothing_hand_computed():
    # M = 2, w = 1, β = 0.5, H = 2, k = 1. t=2: θ = (0, 3), Δ_m = (0, −3), nothing arrived: g = own = (0, −3),
    #   φ = (0, 1.5).
    # t=4: Δ(2) = −1.5 arrives; rests R_m(2) = Δ(2) − Δ_m(2) = (−1.5, 1.5); half of each is deferred.
    #   worker 0 from 0: Δ_0 = 0, g_0 = 0 + 0.5·(−1.5) = −0.75: φ_0 = 0.375.
    #   worker 1 from 1.5: θ = 3.375, Δ_1 = −1.875, g_1 = −1.875 + 0.5·1.5 = −1.125: φ_1 = 2.0625.
    # finalize: Δ(4) = −0.9375, R_m(4) = (−0.9375, 0.9375), plus the deferred halves of R_m(2), (−0.75, 0.75):
    #   g = (−1.6875, 1.6875): φ_0 = 0.375 + 0.84375 = 1.21875 = φ_1 = 2.0625 − 0.84375 (telescoping, as β = 0).
    w0, w1 = run_quadratic(2, 4, eager_own_weight=1.0, eager_smoothing=0.5)
    assert (w0["applied"], w1["applied"]) == ({2: 0.0, 4: -0.75}, {2: -3.0, 4: -1.125})
    assert (w0["delta"], w1["delta"]) == ({2: 0.0, 4: 0.0}, {2: -3.0, 4: -1.875})
    assert w0["final"] == w1["final"] == 1.21875


@pytest.mark.filterwarnings("ignore:skipping outer step:RuntimeWarning")  # the skip is the point here
def test_smoothing_a_skipped_average_still_applies_the_instalment_deferred_into_it():
    """nonfinite='skip' drops Δ(4) (worker 1's Δ_1(4) is NaN) when it arrives at t = 6: nothing of it is applied,
    but the half of R_m(2) that each worker deferred into own(4) is, with its fresh own term. M = 2, w = 1, β = 0.5."""
    w0, w1 = run_quadratic(2, 8, nan_at=(1, 4), eager_own_weight=1.0, eager_smoothing=0.5, nonfinite="skip")
    avg2 = (w0["delta"][2] + w1["delta"][2]) / 2
    rest2 = [avg2 - w0["delta"][2], avg2 - w1["delta"][2]]  # R_m(2) = Δ(2) − w·Δ_m(2)
    # t = 4: half of R_m(2) now; the bad worker's own term is 0 (its Δ_1(4) is not finite), the other's Δ_0(4)
    assert [w0["applied"][4], w1["applied"][4]] == [w0["delta"][4] + rest2[0] / 2, rest2[1] / 2]
    # t = 6: Δ(4) skipped: own(6) = Δ_m(6) and the deferred half of R_m(2), nothing deferred further
    assert [w0["applied"][6], w1["applied"][6]] == [w0["delta"][6] + rest2[0] / 2, w1["delta"][6] + rest2[1] / 2]
    # t = 8: Δ(6) arrives whole (R_m(6), nothing was deferred into own(6)); half of it deferred again
    avg6 = (w0["delta"][6] + w1["delta"][6]) / 2
    assert [w0["applied"][8], w1["applied"][8]] == [tr["delta"][8] + (avg6 - tr["delta"][6]) / 2 for tr in (w0, w1)]


def run_tinynet(world_size: int, steps: int, restart_at: int | None = None, **overrides) -> list[dict]:
    """TinyNet with Nesterov momentum 0.9 (not exact by hand: compared bitwise across configurations)."""
    values = {"mode": "eager", "sync_every": 3, "outer_lr": 0.7, "outer_momentum": 0.9, **overrides}
    return run_tinynet_trace(world_size, steps, DiLoCoConfig(**values), restart_at)


def assert_bitwise(a: list[dict], b: list[dict]) -> None:
    for x, y in zip(a, b, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(x["phis"], y["phis"], strict=True))
        assert torch.equal(x["final"], y["final"]) and torch.equal(x["theta"], y["theta"])


@pytest.mark.parametrize("weight", [None, 1.0])
@pytest.mark.parametrize("delay", [1, 2])
def test_one_worker_is_sync_bitwise(weight, delay):
    assert_bitwise(run_tinynet(1, 12, eager_own_weight=weight, delay=delay), run_tinynet(1, 12, mode="sync"))


@pytest.mark.parametrize(("world_size", "weight"), [(2, 0.5), (4, 0.25)])
def test_weight_one_over_m_is_the_papers_rule_bitwise(world_size, weight):
    assert_bitwise(run_tinynet(world_size, 9, eager_own_weight=weight), run_tinynet(world_size, 9))


@pytest.mark.parametrize("weight", [None, 0.75])
def test_smoothing_zero_is_the_rule_bitwise_and_smoothing_changes_it(weight):
    assert_bitwise(run_tinynet(2, 12, eager_own_weight=weight, eager_smoothing=0.0),
                   run_tinynet(2, 12, eager_own_weight=weight))  # fmt: skip
    smoothed = run_tinynet(2, 12, eager_own_weight=weight, eager_smoothing=0.25)
    assert not torch.equal(smoothed[0]["final"], run_tinynet(2, 12, eager_own_weight=weight)[0]["final"])


@pytest.mark.parametrize(("beta", "delay"), [(0.25, 1), (1.0, 2)])
def test_smoothing_one_worker_is_sync_bitwise(beta, delay):
    # M = 1: the rest R = Δ − w·Δ_m is exactly 0 (w = 1), so nothing is deferred
    assert_bitwise(run_tinynet(1, 12, eager_smoothing=beta, delay=delay), run_tinynet(1, 12, mode="sync"))


def test_weight_one_differs_from_the_papers_rule():
    a, b = run_tinynet(2, 9, eager_own_weight=1.0), run_tinynet(2, 9)
    assert not torch.equal(a[0]["final"], b[0]["final"])


@pytest.mark.parametrize(("weight", "delay"), [(1.0, 1), (0.75, 2), (None, 1)])
def test_checkpoint_round_trip_is_bitwise(weight, delay):
    # restart right after a sync point (averages in flight, own contributions stored) and mid-phase
    for restart in (6, 7):
        resumed = run_tinynet(2, 12, restart_at=restart, eager_own_weight=weight, delay=delay)
        assert_bitwise(resumed, run_tinynet(2, 12, eager_own_weight=weight, delay=delay))


@pytest.mark.parametrize(("weight", "beta", "delay"), [(0.75, 0.25, 1), (None, 0.5, 2)])
def test_smoothing_checkpoint_round_trip_is_bitwise(weight, beta, delay):
    # the deferred instalments travel with the checkpoint: right after a sync point and mid-phase
    for restart in (6, 7, 9):
        resumed = run_tinynet(2, 15, restart_at=restart, eager_own_weight=weight, eager_smoothing=beta, delay=delay)
        assert_bitwise(resumed, run_tinynet(2, 15, eager_own_weight=weight, eager_smoothing=beta, delay=delay))


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize(
    ("key", "on", "off", "section", "commit"),
    [("eager_lookahead", True, False, "4.2", "c512a86"), ("eager_swap_steps", 2, None, "4.3", "dd1063f")],
)
def test_a_checkpoint_of_a_removed_variant_is_refused_and_one_without_it_loads(key, on, off, section, commit):
    """``eager_lookahead`` (ALGORITHMS.md 4.2) and ``eager_swap_steps`` (4.3) were removed: a state saved with one
    on is refused, by the engine and by the resize, in one line naming the commit that has it; one saved with it
    off (checkpoints written while it existed) loads as it is."""
    config = DiLoCoConfig(mode="eager", sync_every=3, outer_lr=0.7, outer_momentum=0.9)

    def worker(comm):
        def build():
            model = TinyNet()
            inner = torch.optim.SGD(model.parameters(), lr=0.05)
            return inner, DiLoCo(model, inner, config, comm=comm)

        inner, loco = build()
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(comm.rank))
        for _ in range(4):  # one sync point: an average in flight with this worker's own term
            loco.model(x).pow(2).mean().backward()
            inner.step()
            inner.zero_grad()
            loco.step()
        saved = loco.state_dict()
        assert len(saved["fragments"][0]["in_flight"]) == 1 and key not in saved["config"]
        with_variant = {**saved, "config": {**saved["config"], key: on}}
        with pytest.raises(ValueError) as info:
            build()[1].load_state_dict(with_variant)
        fresh = build()[1]
        fresh.load_state_dict({**saved, "config": {**saved["config"], key: off}})
        return str(info.value), _same(fresh.state_dict(), saved), saved, with_variant

    results = run_inprocess(2, worker)
    message = (
        f"checkpoint was written with {key}={on!r}: that variant of eager was removed after its measurement "
        f"(ALGORITHMS.md {section}); continue this run with a checkout at commit {commit}"
    )
    assert [r[:2] for r in results] == [(message, True)] * 2
    with pytest.raises(ValueError) as info:
        resize_outer_states([r[3] for r in results], 3)
    assert str(info.value) == message
    without = [{**r[2], "config": {**r[2]["config"], key: off}} for r in results]
    resized = resize_outer_states(without, 3)
    assert _same(
        [r["fragments"] for r in resized], [r["fragments"] for r in resize_outer_states([r[2] for r in results], 3)]
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"eager_own_weight": 1.5}, r"^eager_own_weight=1\.5: .*\[1/M, 1\]"),
        ({"eager_own_weight": 0.0}, r"^eager_own_weight=0\.0: "),
        ({"eager_own_weight": float("nan")}, r"^eager_own_weight=nan: "),
        ({"eager_own_weight": True}, r"^eager_own_weight=True: "),
        ({"eager_own_weight": 1.0, "mode": "sync"}, r"^eager_own_weight=1\.0: .*mode 'eager' only"),
        ({"eager_smoothing": -0.25}, r"^eager_smoothing=-0\.25: .*must be a number in \[0, 1\]$"),
        ({"eager_smoothing": 1.5}, r"^eager_smoothing=1\.5: "),
        ({"eager_smoothing": float("nan")}, r"^eager_smoothing=nan: "),
        ({"eager_smoothing": None}, r"^eager_smoothing=None: "),
        ({"eager_smoothing": 0.5, "mode": "overlap"}, r"^eager_smoothing=0\.5: applies to mode 'eager' only"),
    ],
)
def test_invalid_weight_is_one_line_error(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        DiLoCoConfig(**{"mode": "eager", **overrides}).validate()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("world_size", "weight"), [(2, 0.25), (1, 0.5), (4, 0.2)])
def test_weight_below_one_over_m_is_refused_before_any_outer_collective(world_size, weight):
    message = rf"^eager_own_weight={weight}: below 1/M = {1 / world_size:g} for M={world_size} workers"
    config = DiLoCoConfig(mode="eager", sync_every=2, eager_own_weight=weight)
    with pytest.raises(ConfigError, match=message):
        make_strategy(config, world_size=world_size)
    assert make_strategy(config, world_size=int(1 / weight)).own_weight == weight  # w = 1/M itself is allowed

    def worker(comm):
        model = Quadratic()
        inner = torch.optim.SGD(model.parameters(), lr=0.5)
        with pytest.raises(ConfigError, match=message) as info:
            loco = DiLoCo(model, inner, config, comm=comm)  # refused here where the engine passes M, else:
            for _ in range(config.sync_every):  # at the first sync point, before its collective
                model(torch.tensor([1.0])).backward()
                inner.step()
                loco.step()
        assert "\n" not in str(info.value)
        return loco.stats.to_dict()["payload_bytes"] if "loco" in locals() else 0

    assert run_inprocess(world_size, worker) == [0] * world_size


def test_train_cli_refuses_a_weight_below_one_over_m_before_anything_runs():
    from eagerloco.lm.config import TrainConfig

    config = TrainConfig()
    config.outer.eager_own_weight = 0.25
    config.run.workers = 2
    with pytest.raises(ConfigError, match=r"^outer\.eager_own_weight=0\.25: below 1/M = 0\.5 for run\.workers=2;"):
        config.validate()
    config.run.workers = 4
    assert config.validate().outer.diloco().eager_own_weight == 0.25
    config.outer.mode = "sync"
    with pytest.raises(ConfigError, match=r"^eager_own_weight=0\.25: applies to mode 'eager' only"):
        config.validate()
