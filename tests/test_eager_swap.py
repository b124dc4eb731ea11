"""Eager with swap on arrival (ALGORITHMS.md 4.3, ``eager_swap_steps`` = τ_s), exact.

At t: own(t) = w·Δ_m(t); ψ_m = OuterOpt(φ, own(t)) on a copy; θ ← ψ_m. At t + τ_s: φ ← OuterOpt(φ, Δ(t));
θ ← θ + (φ − ψ_m). The hand-computed toy: worker m holds one scalar θ with loss 0.5·(θ − a_m)², a_m = 4m, inner
SGD lr 0.5 (θ → (θ + a_m)/2 per step), H = 2, outer SGD lr 0.5 without momentum: every number is a short binary
fraction and the asserts are exact.
"""

from __future__ import annotations

import pytest
import torch

from _toy import Quadratic, TinyNet, run_inprocess, run_tinynet_trace, train_tinynet
from eagerloco import DiLoCo, DiLoCoConfig
from eagerloco.comm import InProcessGroup
from eagerloco.engine.config import ConfigError
from eagerloco.engine.strategies import EagerSwapStrategy, make_strategy
from eagerloco.ft.resize import resize_outer_states

torch.set_num_threads(1)


def quadratic_trace(world_size: int, steps: int, **overrides) -> list[dict]:
    """Per worker: (φ, θ) after every ``step()``, and φ, θ after finalize."""
    config = DiLoCoConfig(
        **{"mode": "eager", "sync_every": 2, "outer_lr": 0.5, "outer_momentum": 0.0, "eager_swap_steps": 1, **overrides}
    )

    def worker(comm):
        model = Quadratic()
        inner = torch.optim.SGD(model.parameters(), lr=0.5)
        loco = DiLoCo(model, inner, config, comm=comm)
        target = torch.tensor([4.0 * comm.rank])
        trace = []
        for _ in range(steps):
            model(target).backward()
            inner.step()
            inner.zero_grad()
            loco.step()
            trace.append((loco.states[0].phi.item(), model.theta.item()))
        loco.finalize()
        return {"trace": trace, "final": (loco.states[0].phi.item(), model.theta.item())}

    return run_inprocess(world_size, worker)


def test_hand_computed_two_workers():
    # w = 1/M = 0.5, τ_s = 1. t=1: θ = (0, 2). t=2: θ = (0, 3), Δ_m = (0, −3), own = (0, −1.5),
    #   ψ = φ − 0.5·own = (0, 0.75); φ stays 0; θ ← ψ.
    # t=3: inner step θ = (0, 2.375); Δ(2) = −1.5 arrives: φ = 0.75 on both; θ += φ − ψ: (0.75, 2.375).
    # t=4: θ = (0.375, 3.1875), Δ_m = (0.375, −2.4375), own = (0.1875, −1.21875), ψ = (0.65625, 1.359375).
    # finalize: Δ(4) = −1.03125 arrives: φ = 0.75 + 0.515625 = 1.265625 on both; θ ← φ.
    w0, w1 = quadratic_trace(2, 4)
    assert w0["trace"] == [(0.0, 0.0), (0.0, 0.0), (0.75, 0.75), (0.75, 0.65625)]
    assert w1["trace"] == [(0.0, 2.0), (0.0, 0.75), (0.75, 2.375), (0.75, 1.359375)]
    assert w0["final"] == w1["final"] == (1.265625, 1.265625)


def test_hand_computed_own_weight_one():
    # w = 1, τ_s = 2 = H (the arrival at t + H runs before that step's sync point).
    # t=2: Δ_m = (0, −3), own = Δ_m, ψ = (0, 1.5), θ ← ψ. t=3: θ = (0, 2.75). t=4: θ = (0, 3.375);
    # arrival of Δ(2) = −1.5: φ = 0.75; θ += φ − ψ = (0.75, 2.625); sync: Δ_m = (0, −1.875), ψ = (0.75, 1.6875).
    # finalize: Δ(4) = −0.9375: φ = 0.75 + 0.46875 = 1.21875.
    w0, w1 = quadratic_trace(2, 4, eager_own_weight=1.0, eager_swap_steps=2)
    assert w0["trace"] == [(0.0, 0.0), (0.0, 0.0), (0.0, 0.0), (0.75, 0.75)]
    assert w1["trace"] == [(0.0, 2.0), (0.0, 1.5), (0.0, 2.75), (0.75, 1.6875)]
    assert w0["final"] == w1["final"] == (1.21875, 1.21875)
    # eager (w = 1) without the swap takes one step with Δ(2) − own(2) + own(4) at 4 and ends at the same φ
    # (ALGORITHMS.md 4.1's hand-computed case: 1.21875)


@pytest.mark.parametrize("fragments", [1, 2])
@pytest.mark.parametrize("swap_steps", [1, 3, 4])
@pytest.mark.parametrize("steps", [19, 20])  # the last sync point's average in flight at finalize, or arrived
def test_one_worker_is_exactly_sync(fragments, swap_steps, steps):
    # M = 1: own(t) = Δ(t), the arrival's OuterOpt step recomputes ψ bit for bit and θ does not move; with Nesterov
    # momentum, streaming fragments, and through finalize.
    common = dict(sync_every=4, num_fragments=fragments, outer_lr=0.7, outer_momentum=0.9)
    sync = train_tinynet(InProcessGroup(1).communicator(0), DiLoCoConfig(mode="sync", **common), steps=steps)
    swap = train_tinynet(
        InProcessGroup(1).communicator(0), DiLoCoConfig(mode="eager", eager_swap_steps=swap_steps, **common), steps
    )
    for name in sync.phi:
        assert torch.equal(sync.phi[name], swap.phi[name]), name
        assert torch.equal(sync.theta[name], swap.theta[name]), name
    for a, b in zip(sync.outer_opt_state, swap.outer_opt_state):
        assert torch.equal(a["state"][0]["momentum_buffer"], b["state"][0]["momentum_buffer"])


@pytest.mark.parametrize("world_size,weight", [(2, None), (2, 0.75), (3, None), (3, 1.0)])
@pytest.mark.parametrize("fragments", [1, 2])
def test_outer_state_identical_on_every_worker_after_every_step(world_size, weight, fragments):
    # φ and the outer optimizer state are stepped by arrived averages only, as in DiLoCo: bit-identical on every
    # worker at every inner step (not only after finalize), and consolidate changes nothing.
    config = DiLoCoConfig(
        mode="eager", sync_every=4, num_fragments=fragments, outer_momentum=0.9, eager_own_weight=weight,
        eager_swap_steps=2,
    )  # fmt: skip
    traces = run_tinynet_trace(world_size, 18, config)
    for other in traces[1:]:
        for a, b in zip(traces[0]["phis"], other["phis"]):
            assert torch.equal(a, b)
        assert torch.equal(traces[0]["final"], other["final"])
    # after finalize θ = φ on every worker (``final`` lists φ fragment by fragment, ``theta`` in model order)
    assert all(torch.equal(tr["theta"].sort().values, tr["final"].sort().values) for tr in traces)


@pytest.mark.parametrize("world_size", [2, 3])
def test_swap_after_one_phase_without_momentum_is_eager(world_size):
    # Without momentum, τ_s = H: the arrival at t + H and the stand-in of t + H add up to eager's one step
    # Δ(t) − own(t) + own(t + H), so every φ_m after finalize equals eager's up to float rounding.
    common = dict(mode="eager", sync_every=4, outer_lr=0.7, outer_momentum=0.0, eager_own_weight=0.75)
    eager = run_inprocess(world_size, lambda c: train_tinynet(c, DiLoCoConfig(**common), 18))
    swap = run_inprocess(world_size, lambda c: train_tinynet(c, DiLoCoConfig(eager_swap_steps=4, **common), 18))
    for e, s in zip(eager, swap):
        for name in e.phi:
            torch.testing.assert_close(s.phi[name], e.phi[name], rtol=0, atol=1e-6)
    # with swap on arrival the workers already agree before any consolidation; plain eager's do not
    assert torch.equal(swap[0].phi["head.weight"], swap[1].phi["head.weight"])
    assert not torch.equal(eager[0].phi["head.weight"], eager[1].phi["head.weight"])


def test_each_average_enters_phi_once_without_momentum():
    # φ moves only when an average arrives, by −lr·Δ(t) (no momentum): H = 3, τ_s = 2, 13 steps: the averages of
    # 3, 6 and 9 arrive at 5, 8 and 11, the one of 12 in finalize; after it φ = φ_0 − lr·Σ_t Δ(t) on every worker.
    lr = 0.7
    config = DiLoCoConfig(mode="eager", sync_every=3, outer_lr=lr, outer_momentum=0.0, eager_swap_steps=2)

    def flat(tensors) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in tensors]).clone()

    def worker(comm):
        model = TinyNet()
        inner = torch.optim.SGD(model.parameters(), lr=0.05)
        loco = DiLoCo(model, inner, config, comm=comm)
        generator = torch.Generator().manual_seed(comm.rank)
        phis, deltas = [loco.states[0].phi.clone()], {}
        for t in range(1, 14):
            model(torch.randn(8, 4, generator=generator)).pow(2).mean().backward()
            inner.step()
            inner.zero_grad()
            if t % 3 == 0:
                deltas[t] = phis[-1] - flat(model.parameters())  # Δ_m(t) = φ − θ_m(t)
            loco.step()
            phis.append(loco.states[0].phi.clone())
        loco.finalize()
        return phis, deltas, loco.states[0].phi.clone()

    results = run_inprocess(2, worker)
    average = {t: (results[0][1][t] + results[1][1][t]) / 2 for t in (3, 6, 9, 12)}
    for phis, _deltas, final in results:
        moves = [t for t in range(1, 14) if not torch.equal(phis[t], phis[t - 1])]
        assert moves == [5, 8, 11]
        for t, launched in zip(moves, (3, 6, 9)):
            torch.testing.assert_close(phis[t] - phis[t - 1], -lr * average[launched], rtol=0, atol=1e-6)
        torch.testing.assert_close(final, phis[0] - lr * sum(average.values()), rtol=0, atol=1e-6)
    assert torch.equal(results[0][2], results[1][2])


def test_trial_step_leaves_phi_and_the_outer_optimizer_untouched():
    # ψ = OuterOpt(φ, g) on a copy; the real step later, from the same state with the same g, gives the same bits.
    config = DiLoCoConfig(mode="eager", sync_every=2, outer_momentum=0.9, eager_swap_steps=1)
    model = TinyNet()
    loco = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.05), config, comm=InProcessGroup(1).communicator(0))
    core = loco.states[0]
    core.outer_step(torch.full_like(core.phi, 0.25), launched_at=0)  # some momentum to carry
    phi, buf = core.phi.clone(), core.outer_optimizer.state[core.phi]["momentum_buffer"].clone()
    g = torch.linspace(-1, 1, core.phi.numel())
    psi = core.trial_step(g)
    assert torch.equal(core.phi, phi)
    assert torch.equal(core.outer_optimizer.state[core.phi]["momentum_buffer"], buf)
    core.outer_step(g, launched_at=0)
    assert torch.equal(core.phi, psi)


@pytest.mark.parametrize("restart_at", [9, 10, 12])
def test_checkpoint_round_trip_mid_swap_is_bitwise(restart_at):
    # H = 4, P = 2 (offsets 0 and 2), τ_s = 3: at 9 and 10 fragment 0's average of 8 is in flight (due at 11), at
    # 10 also fragment 1's of 10; a resumed run applies exactly what the uninterrupted one does.
    config = DiLoCoConfig(
        mode="eager", sync_every=4, num_fragments=2, outer_momentum=0.9, eager_own_weight=0.75, eager_swap_steps=3
    )
    straight = run_tinynet_trace(2, 17, config)
    resumed = run_tinynet_trace(2, 17, config, restart_at=restart_at)
    for a, b in zip(straight, resumed):
        assert all(torch.equal(x, y) for x, y in zip(a["phis"], b["phis"]))
        assert torch.equal(a["final"], b["final"]) and torch.equal(a["theta"], b["theta"])


def test_nonfinite_skip_drops_the_average_and_the_stand_in():
    # A worker's θ goes NaN before the sync point at 8: Δ(8) is not finite on every worker. With 'skip' nothing of
    # it enters φ, the outer optimizer is untouched, and θ ← φ on every worker when it is due (8 + τ_s = 10).
    import warnings

    config = DiLoCoConfig(mode="eager", sync_every=4, outer_momentum=0.9, eager_swap_steps=2, nonfinite="skip")

    def worker(comm):
        model = TinyNet()
        inner = torch.optim.SGD(model.parameters(), lr=0.05)
        loco = DiLoCo(model, inner, config, comm=comm)
        generator = torch.Generator().manual_seed(comm.rank)
        phis, thetas = [], []
        for t in range(1, 13):
            model(torch.randn(8, 4, generator=generator)).pow(2).mean().backward()
            inner.step()
            inner.zero_grad()
            if comm.rank == 1 and t == 8:
                with torch.no_grad():
                    model.blocks[0].weight[0, 0] = float("nan")
            loco.step()
            phis.append(loco.states[0].phi.clone())
            thetas.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone())
        return phis, thetas, loco.stats.skipped_outer_steps, [r.inner_step for r in loco.records if r.skipped]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        results = run_inprocess(2, worker)
    for phis, thetas, skipped, at in results:
        assert (skipped, at) == (1, [10])
        assert torch.equal(phis[9], phis[8])  # step 10 (index 9): nothing applied
        assert torch.equal(thetas[9], phis[9])  # θ ← φ
        assert all(bool(torch.isfinite(phi).all()) for phi in phis)
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"eager_swap_steps": 0}, r"eager_swap_steps=0: τ_s must be an integer in \[1, H\] = \[1, 30\]"),
        ({"eager_swap_steps": 31}, r"eager_swap_steps=31: τ_s must be an integer in \[1, H\]"),
        ({"eager_swap_steps": 2.0}, r"eager_swap_steps=2.0: τ_s must be an integer"),
        ({"eager_swap_steps": True}, r"eager_swap_steps=True: τ_s must be an integer"),
        ({"eager_swap_steps": 5, "mode": "overlap"}, r"eager_swap_steps=5: applies to mode 'eager' only"),
        ({"eager_swap_steps": 5, "delay": 2}, r"eager_swap_steps=5 with delay=2: swap on arrival needs delay=1"),
    ],
)
def test_bad_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        DiLoCoConfig(**{"mode": "eager", **overrides}).validate()


def test_the_strategy_and_its_refusals():
    config = DiLoCoConfig(mode="eager", eager_swap_steps=5, eager_own_weight=0.75).validate()
    strategy = make_strategy(config, 2)
    assert isinstance(strategy, EagerSwapStrategy) and strategy.uniform_outer_state
    assert (strategy.swap_steps, strategy.own_weight, strategy.delay) == (5, 0.75, 1)
    with pytest.raises(ConfigError, match=r"eager_own_weight=0.75: below 1/M = 1 for M=1"):
        make_strategy(config, 1)
    with pytest.raises(ConfigError, match=r"eager_swap_steps=5: swap on arrival is not supported with fault"):
        make_strategy(config, 2, fixed_membership=False)


def test_resize_refuses_a_state_with_averages_in_flight_and_takes_a_finalized_one():
    config = DiLoCoConfig(mode="eager", sync_every=4, eager_swap_steps=3)

    def worker(comm):
        model = TinyNet()
        loco = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.05), config, comm=comm)
        for _ in range(5):  # the average of 4 is due at 7: in flight
            model(torch.ones(2, 4)).pow(2).mean().backward()
            loco.inner_optimizer.step()
            loco.inner_optimizer.zero_grad()
            loco.step()
        mid = loco.state_dict()
        loco.finalize()
        return mid, loco.state_dict()

    saved = run_inprocess(2, worker)
    with pytest.raises(ValueError, match=r"eager_swap_steps=3 have averages in flight: their arrival is an outer"):
        resize_outer_states([mid for mid, _ in saved], 3)
    resized = resize_outer_states([done for _, done in saved], 3)
    assert len(resized) == 3 and torch.equal(resized[2]["fragments"][0]["phi"], saved[0][1]["fragments"][0]["phi"])
