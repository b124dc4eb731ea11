"""Resume with another number of workers (ALGORITHMS.md section 11; eagerloco.ft.resize_outer_states): exact checks,
in every mode, with fewer and with more workers than were saved. Needs only torch (in-process workers)."""

from __future__ import annotations

import pytest
import torch

from _toy import TinyNet, run_inprocess
from eagerloco import DiLoCo, DiLoCoConfig
from eagerloco.ft import resize_outer_states

H = 4
T = 9  # one average in flight in every mode: delayed/eager launched at 8, overlap (τ = 2) due at 10

MODES = {
    "sync": {},
    "overlap": {"overlap_steps": 2, "alpha": 0.5},
    "delayed": {},
    "eager": {},
}


def _config(mode: str, **extra: object) -> DiLoCoConfig:
    values = {"mode": mode, "sync_every": H, "outer_lr": 0.7, "outer_momentum": 0.9, "collective_timeout_s": 60.0}
    return DiLoCoConfig(**{**values, **MODES[mode], **extra})


def _train(loco: DiLoCo, model: TinyNet, inner: torch.optim.Optimizer, rank: int, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed + rank)
    w = torch.randn(4, 1, generator=generator)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=generator)
        loss = (model(x) - (x @ w + 0.1 * rank)).pow(2).mean()
        loss.backward()
        inner.step()
        inner.zero_grad()
        loco.step()


def _momenta(states: list) -> list[torch.Tensor]:
    out = []
    for core in states:  # SGD without momentum keeps no buffer
        buffer = core.outer_optimizer.state.get(core.phi, {}).get("momentum_buffer")
        out.append(torch.zeros(0) if buffer is None else buffer.clone())
    return out


def saved_run(mode: str, m: int, **extra: object) -> tuple[list[dict], list[dict]]:
    """M workers train T steps and save; the same workers then finalize and consolidate (the reference)."""

    def worker(comm):
        model = TinyNet()
        inner = torch.optim.SGD(model.parameters(), lr=0.05)
        loco = DiLoCo(model, inner, _config(mode, **extra), comm=comm)
        _train(loco, model, inner, comm.rank, T, seed=100)
        state = loco.state_dict()
        loco.finalize()
        loco.consolidate()
        ref = {"phi": [core.phi.clone() for core in loco.states], "momentum": _momenta(loco.states)}
        return state, ref

    out = run_inprocess(m, worker)
    return [s for s, _ in out], [r for _, r in out]


def resumed_run(mode: str, states: list[dict], steps: int, **extra: object) -> list[dict]:
    def worker(comm):
        model = TinyNet(seed=7)  # another init: everything must come from the resized state
        inner = torch.optim.SGD(model.parameters(), lr=0.05)
        loco = DiLoCo(model, inner, _config(mode, **extra), comm=comm)
        loco.load_state_dict(states[comm.rank])
        loco.reopen()
        loco.copy_outer_parameters_to(model)  # θ ← φ
        loaded = {"phi": [core.phi.clone() for core in loco.states], "momentum": _momenta(loco.states),
                  "in_flight": sum(len(core.in_flight) for core in loco.states), "t": loco.inner_step}  # fmt: skip
        _train(loco, model, inner, comm.rank, steps, seed=200)
        loco.finalize()
        loaded["final"] = [core.phi.clone() for core in loco.states]
        return loaded

    return run_inprocess(len(states), worker)


@pytest.mark.parametrize("new_m", [1, 3], ids=["fewer", "more"])
@pytest.mark.parametrize("mode", list(MODES))
def test_resume_with_another_number_of_workers_is_exact(mode: str, new_m: int) -> None:
    m = 2
    saved, refs = saved_run(mode, m)
    expected_in_flight = 0 if mode == "sync" else 1  # something to apply first, except in sync
    assert all(len(f["in_flight"]) == expected_in_flight for s in saved for f in s["fragments"])
    states = resize_outer_states(saved, new_m)
    assert [s["world_size"] for s in states] == [new_m] * new_m and [s["rank"] for s in states] == list(range(new_m))
    out = resumed_run(mode, states, steps=2 * H)
    for worker in out:
        assert worker["t"] == T and worker["in_flight"] == 0
        # φ is exactly what finalize() (and, in eager, consolidate()) of the saved run produced: the in-flight
        # averages applied first as plain steps, then (eager) the workers' φ averaged.
        for got, want in zip(worker["phi"], refs[0]["phi"]):
            assert torch.equal(got, want)
        if mode == "eager":  # every saved worker's consolidated φ is the same; the momenta are averaged in rank order
            want_momenta = [(refs[0]["momentum"][p].clone().add_(refs[1]["momentum"][p])).div_(m)
                            for p in range(len(refs[0]["momentum"]))]  # fmt: skip
        else:  # finalize leaves the momentum untouched, identical on every saved worker
            want_momenta = refs[0]["momentum"]
        for got, want in zip(worker["momentum"], want_momenta):
            assert torch.equal(got, want)
        assert all(bool(torch.isfinite(phi).all()) for phi in worker["final"])
    if mode != "eager":  # the continued run keeps φ bit-identical on its M' workers
        for worker in out[1:]:
            assert all(torch.equal(a, b) for a, b in zip(worker["final"], out[0]["final"]))


def test_resize_by_hand_eager_sgd_without_momentum() -> None:
    """Two saved eager workers, outer SGD(lr=1, no momentum): φ' = mean_m(φ_m − (Δ(t) − own_m(t)))."""
    saved, _ = saved_run("eager", 2, outer_momentum=0.0, nesterov=False)
    frag = [s["fragments"][0] for s in saved]
    lr = frag[0]["outer_optimizer"]["param_groups"][0]["lr"]
    by_hand = [f["phi"] - lr * (f["in_flight"][0]["mean"] - f["in_flight"][0]["own"]) for f in frag]
    out = resize_outer_states(saved, 3)
    assert torch.allclose(out[0]["fragments"][0]["phi"], (by_hand[0] + by_hand[1]) / 2, rtol=0, atol=1e-7)
    assert all(torch.equal(o["fragments"][0]["phi"], out[0]["fragments"][0]["phi"]) for o in out)


def test_resize_keeps_residuals_of_saved_workers_and_none_for_new_ones() -> None:
    saved, _ = saved_run("delayed", 2, compression="int8", error_feedback=True)
    out = resize_outer_states(saved, 3)
    for i in range(2):
        assert torch.equal(
            out[i]["fragments"][0]["reducer"]["residual"], saved[i]["fragments"][0]["reducer"]["residual"]
        )
    assert out[2]["fragments"][0]["reducer"]["residual"] is None


def test_resize_refuses_an_incomplete_or_mixed_set() -> None:
    saved, _ = saved_run("sync", 2)
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        resize_outer_states(saved, 0)
    with pytest.raises(ValueError, match=r"rank 1 of 2 workers: pass the 2 states"):
        resize_outer_states(saved[1:], 2)
    with pytest.raises(ValueError, match="another inner_step"):
        resize_outer_states([saved[0], {**saved[1], "inner_step": 3}], 2)
    with pytest.raises(ValueError, match="no saved outer states"):
        resize_outer_states([], 2)


@pytest.mark.parametrize("new_m", [1, 3], ids=["fewer", "more"])
def test_resume_eager_with_smoothing_with_another_number_of_workers_is_exact(new_m: int) -> None:
    """Eager smoothing (ALGORITHMS.md 4.4): the saved own term holds a deferred instalment of the average before
    (Δ(4) arrived at 8); applying Δ(8) − own_m(8) applies it too, exactly as finalize() does."""
    extra = {"eager_smoothing": 0.5}  # the paper's own weight 1/M: valid for M' = 1 too
    saved, refs = saved_run("eager", 2, **extra)
    assert all(f["in_flight"][0]["share"] is not None for s in saved for f in s["fragments"])
    consolidated = [(refs[0]["phi"][p] + refs[1]["phi"][p]) / 2 for p in range(len(refs[0]["phi"]))]
    for worker in resumed_run("eager", resize_outer_states(saved, new_m), steps=2 * H, **extra):
        assert all(torch.equal(got, want) for got, want in zip(worker["phi"], refs[0]["phi"]))
        assert all(torch.allclose(got, want) for got, want in zip(worker["phi"], consolidated))


def test_resize_skips_an_average_fault_tolerance_dropped_whatever_nonfinite() -> None:
    """A saved average dropped by fault tolerance (its value NaN, ``dropped``: ALGORITHMS.md section 11) is skipped
    as ``core.check_average`` skips it, even under ``nonfinite='raise'``: only the instalment of the average before
    it that its own term deferred (4.4) is applied, φ'_m = φ_m − lr·(share_m − own_m). Not dropped, the same NaN
    is refused in one line."""
    saved, _ = saved_run("eager", 2, eager_smoothing=0.5, outer_momentum=0.0, nesterov=False)
    assert saved[0]["config"]["nonfinite"] == "raise"
    for state in saved:
        for fragment in state["fragments"]:
            fragment["in_flight"][0]["mean"] = torch.full_like(fragment["in_flight"][0]["mean"], float("nan"))
    with pytest.raises(ValueError, match=r"saved worker 0, fragment 0: the average launched at inner step 8 is not"):
        resize_outer_states(saved, 3)
    for state in saved:
        for fragment in state["fragments"]:
            fragment["in_flight"][0]["dropped"] = True
    out = resize_outer_states(saved, 3)
    for p in range(len(saved[0]["fragments"])):
        frag = [s["fragments"][p] for s in saved]
        lr = frag[0]["outer_optimizer"]["param_groups"][0]["lr"]
        by_hand = [f["phi"] - lr * (f["in_flight"][0]["share"] - f["in_flight"][0]["own"]) for f in frag]
        assert not torch.equal(by_hand[0], frag[0]["phi"])  # the deferred instalment is not zero
        assert torch.allclose(out[0]["fragments"][p]["phi"], (by_hand[0] + by_hand[1]) / 2, rtol=0, atol=1e-7)
