"""The eager lookahead variant (ALGORITHMS.md section 4.2, ``eager_lookahead=True``), exact.

The outer optimizer steps on arrived averages only (φ and its state are delayed mode's, identical on every
worker); each worker starts its inner phase from ψ_m, the outer optimizer replayed from (φ, state) over its own
terms w·Δ_m(s) of the averages in flight. The toy of tests/test_engine_variants.py: one scalar θ per worker, loss
0.5·(θ − a_m)², a_m = 4m, inner SGD lr 0.5, H = 2, outer lr 0.5: every number is a short binary fraction.
"""

from __future__ import annotations

import pytest
import torch

from _toy import Quadratic, run_inprocess, run_tinynet_trace
from eagerloco import DiLoCo, DiLoCoConfig
from eagerloco.engine.config import ConfigError
from eagerloco.engine.strategies import EagerLookaheadStrategy, make_strategy
from eagerloco.ft.resize import resize_outer_states


def run_quadratic(world_size: int, steps: int, **overrides) -> list[dict]:
    """Per worker, at every sync point t: Δ_m(t), φ, the momentum buffer and ψ_m (where θ was set); φ after
    finalize."""
    values = {"mode": "eager", "eager_lookahead": True, "sync_every": 2, "outer_lr": 0.5, "outer_momentum": 0.0,
              **overrides}  # fmt: skip
    config = DiLoCoConfig(**values)

    def worker(comm):
        model = Quadratic()
        inner = torch.optim.SGD(model.parameters(), lr=0.5)
        loco = DiLoCo(model, inner, config, comm=comm)
        core = loco.states[0]
        target = torch.tensor([4.0 * comm.rank])
        trace = {"delta": {}, "phi": {}, "buf": {}, "psi": {}}
        for _ in range(steps):
            model(target).backward()
            inner.step()
            inner.zero_grad()
            start = (core.phi if core.start is None else core.start).item()
            theta = model.theta.item()
            loco.step()
            t = loco.inner_step
            if t % config.sync_every == 0:
                trace["delta"][t] = start - theta  # Δ_m(t) = ψ_m − θ_m(t)
                trace["phi"][t] = core.phi.item()
                state = core.outer_optimizer.state.get(core.phi, {})
                trace["buf"][t] = state["momentum_buffer"].item() if "momentum_buffer" in state else None
                trace["psi"][t] = model.theta.item()
        loco.finalize()
        trace["final"] = core.phi.item()
        trace["start_after_finalize"] = core.start
        return trace

    return run_inprocess(world_size, worker)


def test_hand_computed_without_momentum_equals_the_papers_rule():
    # M = 2, k = 1, w = 1/2. t=2: θ = (0, 3), Δ = (0, −3), own = (0, −1.5); nothing arrived: φ = 0,
    # ψ = φ − 0.5·own = (0, 0.75). t=4: worker 1 from 0.75: θ = 3.1875, Δ_1 = −2.4375, own = (0, −1.21875);
    # Δ(2) = −1.5 arrives: φ = 0.75 on both; ψ = (0.75, 0.75 + 0.609375). finalize: Δ(4) = −1.21875 as a plain
    # step: φ = 1.359375. The paper's rule gives the same φ_m at every sync point here.
    w0, w1 = run_quadratic(2, 4)
    assert (w0["delta"], w1["delta"]) == ({2: 0.0, 4: 0.0}, {2: -3.0, 4: -2.4375})
    assert w0["phi"] == w1["phi"] == {2: 0.0, 4: 0.75}
    assert (w0["psi"], w1["psi"]) == ({2: 0.0, 4: 0.75}, {2: 0.75, 4: 1.359375})
    assert w0["final"] == w1["final"] == 1.359375
    assert w0["start_after_finalize"] is None


def test_hand_computed_with_nesterov_momentum():
    # Nesterov 0.5: buf ← 0.5·buf + g, φ ← φ − 0.5·(g + 0.5·buf). t=2: lookahead of worker 1 over own = −1.5:
    # buf = −1.5, d = −2.25, ψ_1 = 1.125 (state untouched: no buffer yet). t=4: worker 1 from 1.125: θ = 3.28125,
    # Δ_1 = −2.15625, own = −1.078125; Δ(2) = −1.5 arrives: buf = −1.5, φ = 1.125 on both. Lookahead: worker 0
    # (own 0): buf' = −0.75, ψ_0 = 1.125 + 0.5·0.375 = 1.3125; worker 1: buf' = −1.828125,
    # d = −1.078125 − 0.9140625, ψ_1 = 1.125 + 0.99609375. The buffer keeps −1.5 on both.
    w0, w1 = run_quadratic(2, 4, outer_momentum=0.5, nesterov=True)
    assert (w0["psi"], w1["psi"]) == ({2: 0.0, 4: 1.3125}, {2: 1.125, 4: 2.12109375})
    assert w0["phi"] == w1["phi"] == {2: 0.0, 4: 1.125}
    assert w0["buf"] == w1["buf"] == {2: None, 4: -1.5}
    assert w1["delta"] == {2: -3.0, 4: -2.15625}
    # finalize: Δ(4) = −1.078125 through the optimizer (buf = −1.828125): worker 1's lookahead, as Δ_0(4) = 0 here
    assert w0["final"] == w1["final"] == 2.12109375


@pytest.mark.parametrize("delay", [1, 2])
@pytest.mark.parametrize(("world_size", "weight"), [(2, None), (2, 1.0), (4, None), (4, 0.5)])
def test_without_momentum_it_is_the_papers_rule(world_size, weight, delay):
    """ψ_m = φ − lr·Σ own(s) over the averages in flight: the paper's φ_m, and the same after finalize."""
    paper = run_quadratic(world_size, 8, eager_lookahead=False, eager_own_weight=weight, delay=delay)
    mine = run_quadratic(world_size, 8, eager_own_weight=weight, delay=delay)
    for p, q in zip(paper, mine):
        assert p["psi"] == q["psi"] and p["delta"] == q["delta"] and p["final"] == q["final"]
    assert len({q["final"] for q in mine}) == 1 and len({str(q["phi"]) for q in mine}) == 1


def run_tinynet(world_size: int, steps: int, restart_at: int | None = None, **overrides) -> list[dict]:
    """TinyNet, Nesterov momentum 0.9, compared bitwise across configurations (tests/_toy.run_tinynet_trace)."""
    values = {"mode": "eager", "eager_lookahead": True, "sync_every": 3, "outer_lr": 0.7, "outer_momentum": 0.9,
              **overrides}  # fmt: skip
    return run_tinynet_trace(world_size, steps, DiLoCoConfig(**values), restart_at)


def _equal(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def assert_bitwise(a: list[dict], b: list[dict], thetas: bool = True) -> None:
    for x, y in zip(a, b, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(x["phis"], y["phis"], strict=True))
        if thetas:
            assert all(torch.equal(p, q) for p, q in zip(x["thetas"], y["thetas"], strict=True))
        assert torch.equal(x["final"], y["final"])


@pytest.mark.parametrize("delay", [1, 2])
def test_one_worker_is_sync_bitwise(delay):
    """M = 1: the lookahead over Δ_1 is sync's outer step, and the late exact step recomputes the same bits."""
    mine, sync = run_tinynet(1, 12, delay=delay), run_tinynet(1, 12, mode="sync", eager_lookahead=False)
    # θ after each step matches sync's; φ is sync's from k outer steps before (the exact trajectory, delayed)
    assert all(torch.equal(p, q) for p, q in zip(mine[0]["thetas"], sync[0]["thetas"], strict=True))
    assert torch.equal(mine[0]["final"], sync[0]["final"])


@pytest.mark.parametrize(("world_size", "delay"), [(2, 1), (3, 1), (3, 2)])
def test_outer_state_is_identical_on_every_worker(world_size, delay):
    out = run_tinynet(world_size, 12, delay=delay)
    for other in out[1:]:
        assert all(torch.equal(p, q) for p, q in zip(out[0]["phis"], other["phis"], strict=True))
        assert all(_equal(p, q) for p, q in zip(out[0]["bufs"], other["bufs"], strict=True))
        assert torch.equal(out[0]["final"], other["final"])
    # ... while the workers' θ (started from their own ψ_m) differ
    assert not torch.equal(out[0]["thetas"][3], out[1]["thetas"][3])


def test_differs_from_the_papers_rule_with_momentum():
    a, b = run_tinynet(2, 9), run_tinynet(2, 9, eager_lookahead=False)
    assert not torch.equal(a[0]["final"], b[0]["final"])


@pytest.mark.parametrize(("weight", "delay"), [(None, 1), (1.0, 1), (None, 2)])
def test_checkpoint_round_trip_is_bitwise(weight, delay):
    # right after a sync point (ψ recomputed from φ, the state and the stored own terms) and mid-phase
    for restart in (6, 7):
        resumed = run_tinynet(2, 12, restart_at=restart, eager_own_weight=weight, delay=delay)
        assert_bitwise(resumed, run_tinynet(2, 12, eager_own_weight=weight, delay=delay))


def test_lookahead_leaves_phi_and_the_optimizer_state_untouched():
    def worker(comm):
        model = Quadratic(1.0)
        config = DiLoCoConfig(mode="eager", eager_lookahead=True, outer_lr=0.5, outer_momentum=0.5)
        loco = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.5), config, comm=comm)
        core = loco.states[0]
        assert torch.equal(core.lookahead([]), core.phi) and core.lookahead([]) is not core.phi
        psi = core.lookahead([torch.tensor([2.0]), torch.tensor([-4.0])])
        assert core.phi.item() == 1.0 and core.phi not in core.outer_optimizer.state  # no buffer was left
        # buf = 2, d = 3, φ = −0.5; buf = 1 − 4 = −3, d = −4 − 1.5: ψ = −0.5 + 2.75
        assert psi.item() == 2.25
        core.outer_step(torch.tensor([2.0]), launched_at=0)
        buf = core.outer_optimizer.state[core.phi]["momentum_buffer"]
        assert core.lookahead([torch.tensor([-4.0])]).item() == 2.25  # the same steps, the first one for real
        assert core.phi.item() == -0.5 and buf.item() == 2.0
        assert core.outer_optimizer.state[core.phi]["momentum_buffer"].item() == 2.0
        return True

    assert run_inprocess(1, worker) == [True]


def test_resize_applies_the_whole_average():
    """Resume with another M: the averages in flight go into φ whole (nothing of them was applied to φ)."""
    config = DiLoCoConfig(mode="eager", eager_lookahead=True, sync_every=2, outer_lr=0.5, outer_momentum=0.0)

    def worker(comm):
        model = Quadratic()
        inner = torch.optim.SGD(model.parameters(), lr=0.5)
        loco = DiLoCo(model, inner, config, comm=comm)
        for _ in range(4):
            model(torch.tensor([4.0 * comm.rank])).backward()
            inner.step()
            inner.zero_grad()
            loco.step()
        return loco.state_dict()

    saved = run_inprocess(2, worker)
    assert [s["fragments"][0]["phi"].item() for s in saved] == [0.75, 0.75]  # as in the hand-computed test
    resized = resize_outer_states(saved, 3)
    assert [r["fragments"][0]["phi"].item() for r in resized] == [1.359375] * 3  # 0.75 − 0.5·Δ(4), Δ(4) = −1.21875


def test_strategy_and_config():
    config = DiLoCoConfig(mode="eager", eager_lookahead=True)
    strategy = make_strategy(config, world_size=2)
    assert isinstance(strategy, EagerLookaheadStrategy) and strategy.uniform_outer_state and strategy.own_terms
    assert not isinstance(make_strategy(DiLoCoConfig(mode="eager"), 2), EagerLookaheadStrategy)
    with pytest.raises(ConfigError, match=r"^eager_lookahead=True: applies to mode 'eager' only \(mode='delayed'\)"):
        DiLoCoConfig(mode="delayed", eager_lookahead=True).validate()
    with pytest.raises(ConfigError, match=r"^eager_lookahead=1: must be True or False"):
        DiLoCoConfig(mode="eager", eager_lookahead=1).validate()


def test_a_checkpoint_of_the_papers_rule_is_refused_mid_run():
    def worker(comm):
        def run(lookahead):
            model = Quadratic()
            inner = torch.optim.SGD(model.parameters(), lr=0.5)
            return DiLoCo(model, inner, DiLoCoConfig(mode="eager", eager_lookahead=lookahead, sync_every=2), comm=comm)

        paper = run(False)
        state = paper.state_dict()
        state["fragments"][0]["in_flight"] = [{"launch_step": 2, "mean": torch.zeros(1), "own": torch.zeros(1),
                                               "own_finite": True, "payload_bytes": 4, "dropped": False}]  # fmt: skip
        with pytest.raises(ValueError, match=r"eager_lookahead=False, this run has eager_lookahead=True"):
            run(True).load_state_dict(state)
        old = paper.state_dict()
        del old["config"]["eager_lookahead"]  # a checkpoint from before the variant existed
        run(False).load_state_dict(old)
        return True

    assert run_inprocess(1, worker) == [True]
