"""Hand-computed numbers for a two-worker toy problem, one per mode (ALGORITHMS.md, section 9).

Worker m holds one scalar θ with loss 0.5·(θ − a_m)², a_0 = 0, a_1 = 4, so one inner SGD step with lr 0.5 maps
θ → (θ + a_m)/2. Two inner steps from x give x/4 on worker 0 and x/4 + 3 on worker 1. H = 2, four inner steps,
outer SGD lr 0.5 without momentum, all numbers exact binary fractions (so the asserts are exact).
"""

from __future__ import annotations

import pytest
import torch

from _toy import Quadratic, run_inprocess
from eagerloco import DiLoCo, DiLoCoConfig

TARGETS = (0.0, 4.0)


def run_toy(mode: str, steps: int = 4, world_size: int = 2, **overrides) -> list[dict[str, float]]:
    config = DiLoCoConfig(mode=mode, sync_every=2, outer_lr=0.5, outer_momentum=0.0, **overrides)

    def worker(comm):
        model = Quadratic()
        inner = torch.optim.SGD(model.parameters(), lr=0.5)
        loco = DiLoCo(model, inner, config, comm=comm)
        target = torch.tensor([TARGETS[comm.rank]])
        trace = {}
        for _ in range(steps):
            model(target).backward()
            inner.step()
            inner.zero_grad()
            loco.step()
            trace[f"theta{loco.inner_step}"] = model.theta.item()
            trace[f"phi{loco.inner_step}"] = loco.states[0].phi.item()
        loco.finalize()
        trace["final"] = loco.states[0].phi.item()
        trace["model_after_finalize"] = model.theta.item()
        loco.consolidate()
        trace["consolidated"] = loco.states[0].phi.item()
        return trace

    return run_inprocess(world_size, worker)


def test_sync_hand_computed():
    # t=2: θ = (0, 3), Δ = (0, −3), avg −1.5, φ = 0 + 0.5·1.5 = 0.75.
    # t=4: θ = (0.1875, 3.1875), Δ = (0.5625, −2.4375), avg −0.9375, φ = 0.75 + 0.46875 = 1.21875.
    w0, w1 = run_toy("sync")
    for w in (w0, w1):
        assert w["phi2"] == 0.75 and w["theta2"] == 0.75
        assert w["phi4"] == 1.21875 and w["final"] == 1.21875 and w["model_after_finalize"] == 1.21875


def test_eager_hand_computed():
    # t=2: own = Δ_m/2 = (0, −1.5), nothing arrived: φ = (0, 0.75).
    # t=4: worker 0 from 0: Δ_0 = 0, g_0 = (avg(2) − 0) + 0 = −1.5, φ_0 = 0.75.
    #      worker 1 from 0.75: θ = 3.1875, Δ_1 = −2.4375, own 1.21875 below zero,
    #      g_1 = (−1.5 − (−1.5)) + (−1.21875), φ_1 = 0.75 + 0.609375 = 1.359375.
    # finalize: avg(4) = −1.21875; g_0 = −1.21875 − 0 → φ_0 = 1.359375; g_1 = −1.21875 + 1.21875 = 0.
    w0, w1 = run_toy("eager")
    assert (w0["phi2"], w1["phi2"]) == (0.0, 0.75)
    assert (w0["phi4"], w1["phi4"]) == (0.75, 1.359375)
    assert w0["final"] == w1["final"] == 1.359375
    # Telescoping (no momentum): φ_final = φ_0 − lr·Σ_t Δ(t) = 0 − 0.5·(−1.5 − 1.21875).
    assert w0["final"] == 0.0 - 0.5 * (-1.5 - 1.21875)
    assert w0["consolidated"] == w1["consolidated"] == 1.359375


def test_delayed_hand_computed():
    # t=2: avg(2) = −1.5 launched, nothing arrived: θ ← φ = 0 (the local progress waits inside Δ(2)).
    # t=4: from 0 again, avg(4) = −1.5 launched; avg(2) applied: φ = 0.75. finalize: φ = 0.75 + 0.75 = 1.5.
    w0, w1 = run_toy("delayed")
    for w in (w0, w1):
        assert w["phi2"] == 0.0 and w["theta2"] == 0.0
        assert w["phi4"] == 0.75 and w["theta4"] == 0.75
        assert w["final"] == 1.5


def test_overlap_hand_computed():
    # τ = 1, α = 0.5. t=2: launch avg(2) = −1.5. t=3: θ = (0, 3.5); arrival: φ = 0.75,
    # θ = 0.5·θ + 0.5·0.75 = (0.375, 2.125). t=4: θ = (0.1875, 3.0625), Δ = (0.5625, −2.3125), avg −0.875
    # launched. finalize: φ = 0.75 + 0.5·0.875 = 1.1875.
    w0, w1 = run_toy("overlap", overlap_steps=1, alpha=0.5)
    assert (w0["theta3"], w1["theta3"]) == (0.375, 2.125)
    assert w0["phi3"] == w1["phi3"] == 0.75
    assert w0["phi4"] == 0.75
    assert w0["final"] == w1["final"] == 1.1875


def test_overlap_alpha_zero_discards_local_steps():
    # α = 0: at the arrival θ ← φ̃ exactly, the τ local steps are discarded.
    w0, w1 = run_toy("overlap", overlap_steps=1, alpha=0.0)
    assert w0["theta3"] == w1["theta3"] == 0.75


FINALS = {"sync": 1.21875, "delayed": 1.5, "eager": 1.359375}  # three different numbers: the modes differ


@pytest.mark.parametrize("mode", sorted(FINALS))
def test_modes_differ_as_the_spec_says(mode):
    assert len(set(FINALS.values())) == len(FINALS)
    assert run_toy(mode)[0]["final"] == FINALS[mode]


def test_every_mode_has_a_strategy_and_every_strategy_a_mode():
    from eagerloco.engine.config import MODES
    from eagerloco.engine.strategies import STRATEGIES

    assert tuple(STRATEGIES) == MODES
    assert all(cls.name == mode for mode, cls in STRATEGIES.items())
