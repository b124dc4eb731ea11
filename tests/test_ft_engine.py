"""The engine's side of fault tolerance (ALGORITHMS.md section 11), without torchft: an average marked dropped takes
exactly the path of a skipped non-finite one, in every mode; M is taken per collective from the average; and eager's
own weight follows each quorum's M_Q (w_Q = max(w, 1/M_Q), ALGORITHMS.md 4.1)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from _toy import TinyNet
from eagerloco import DiLoCo, DiLoCoConfig
from eagerloco.comm import Communicator, InProcessGroup, run_workers
from eagerloco.comm.reducer import MeanReducer

MODES: dict[str, dict[str, Any]] = {
    "sync": {},
    "overlap": {"overlap_steps": 2, "alpha": 0.5},
    "delayed": {},
    "eager": {},
}
DROP = 2  # the third average each worker launches is the one dropped (or made NaN)


class _Marked:
    """An average in flight whose wait returns NaN (``how='nan'``), or that is marked ``dropped`` (value NaN too, as
    eagerloco.ft's are)."""

    def __init__(self, inner: Any, how: str) -> None:
        self._inner = inner
        self.payload_bytes = inner.payload_bytes
        self._how = how
        if how == "dropped":
            self.dropped = True

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        mean = self._inner.wait(timeout)
        return torch.full_like(mean, float("nan"))

    def is_completed(self) -> bool:
        return self._inner.is_completed()


class _MarkingReducer(MeanReducer):
    def __init__(self, comm: Communicator, how: str) -> None:
        super().__init__(comm)
        self.launches = 0
        self.how = how

    def launch(self, delta: torch.Tensor) -> Any:
        pending = super().launch(delta)
        self.launches += 1
        return _Marked(pending, self.how) if self.how != "none" and self.launches == DROP + 1 else pending


def _train(comm: Communicator, config: DiLoCoConfig, reducer_factory: Callable, steps: int = 22) -> dict:
    """TinyNet on worker-specific data (as tests/_toy.train_tinynet), with the given reducers."""
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    loco = DiLoCo(model, inner, config, comm=comm, reducer_factory=reducer_factory)
    generator = torch.Generator().manual_seed(1000 + comm.rank)
    w = torch.randn(4, 1, generator=generator)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=generator)
        (model(x) - (x @ w + 0.1 * comm.rank)).pow(2).mean().backward()
        inner.step()
        inner.zero_grad()
        loco.step()
    before = {k: v.clone() for k, v in loco.outer_parameters().items()}
    loco.finalize()
    return {
        "phi_before_finalize": before,
        "phi": {k: v.clone() for k, v in loco.outer_parameters().items()},
        "theta": {k: v.detach().clone() for k, v in model.named_parameters()},
        "stats": loco.stats.to_dict(),
        "records": [r.to_dict() for r in loco.records],
    }


def _run(mode: str, how: str) -> list[dict]:
    config = DiLoCoConfig(mode=mode, sync_every=4, nonfinite="skip", collective_timeout_s=60.0, **MODES[mode])
    return run_workers(
        InProcessGroup(2, timeout=60), lambda comm: _train(comm, config, lambda i, c: _MarkingReducer(c, how))
    )


@pytest.mark.parametrize("mode", list(MODES))
def test_a_dropped_average_takes_exactly_the_skip_path(mode: str) -> None:
    dropped = _run(mode, "dropped")
    with pytest.warns(RuntimeWarning, match="non-finite values"):  # each worker says it skipped the average
        skipped = _run(mode, "nan")
    for d, s in zip(dropped, skipped):
        assert all(torch.equal(d["phi"][k], s["phi"][k]) for k in d["phi"])
        assert all(torch.equal(d["theta"][k], s["theta"][k]) for k in d["theta"])
        assert d["stats"]["dropped_averages"] == 1 and d["stats"]["skipped_outer_steps"] == 0
        assert s["stats"]["skipped_outer_steps"] == 1 and s["stats"]["dropped_averages"] == 0
        assert sum(r["dropped"] for r in d["records"]) == 1
    normal = _run(mode, "none")
    assert any(not torch.equal(dropped[0]["phi"][k], normal[0]["phi"][k]) for k in normal[0]["phi"])


def test_a_dropped_average_is_dropped_with_nonfinite_raise_too() -> None:
    config = DiLoCoConfig(mode="eager", sync_every=4, nonfinite="raise", collective_timeout_s=60.0)
    out = run_workers(
        InProcessGroup(2, timeout=60), lambda comm: _train(comm, config, lambda i, c: _MarkingReducer(c, "dropped"))
    )
    assert [o["stats"]["dropped_averages"] for o in out] == [1, 1]


class _WeightedMean:
    """An average that says M_Q = ``world_size`` and whose value is ``scale``·Δ_m: the average an eager worker's own
    term w_Q·Δ_m cancels exactly when ``scale`` = w_Q (its bracket Δ − own is then exactly 0)."""

    def __init__(self, delta: torch.Tensor, scale: float, world_size: int) -> None:
        self._mean = delta.clone().mul_(scale)
        self.world_size = world_size
        self.payload_bytes = delta.numel() * 4

    def wait(self, timeout: float | None = None) -> torch.Tensor:
        return self._mean

    def is_completed(self) -> bool:
        return True


class _WeightedReducer(MeanReducer):
    name = "weighted"

    def __init__(self, comm: Communicator, scale: float, world_size: int) -> None:
        super().__init__(comm)
        self.scale, self.m_q = scale, world_size

    def launch(self, delta: torch.Tensor) -> _WeightedMean:
        return _WeightedMean(delta, self.scale, self.m_q)


def _phi_with_quorums(mode: str, own_weight: float | None, m_q: int, scale: float) -> dict[str, torch.Tensor]:
    """One worker in a group whose membership changes (its engine sees M = 1 at construction, as eagerloco.ft's
    does before the first quorum) and whose averages say M_Q = ``m_q``."""
    config = DiLoCoConfig(mode=mode, sync_every=4, collective_timeout_s=60.0, eager_own_weight=own_weight)

    def worker(comm: Communicator) -> dict:
        comm.fixed_membership = False
        return _train(comm, config, lambda i, c: _WeightedReducer(c, scale, m_q))

    return run_workers(InProcessGroup(1, timeout=60), worker)[0]["phi_before_finalize"]


@pytest.mark.parametrize(
    ("own_weight", "m_q", "w_q"),
    [
        (0.75, 4, 0.75),  # w >= 1/M_Q: w itself
        (0.75, 1, 1.0),  # a worker alone: 1/M_Q = 1, eager is sync
        (0.25, 2, 0.5),  # w below 1/M_Q in this quorum: 1/M_Q (a fixed group of 2 refuses w = 0.25)
        (None, 4, 0.25),  # the paper's rule: 1/M_Q (the group's M = 1 would give Δ_m, and eager would differ)
    ],
)
def test_own_weight_follows_each_quorums_m(own_weight: float | None, m_q: int, w_q: float) -> None:
    """The own term of an average launched in a quorum of M_Q is w_Q·Δ_m with w_Q = max(w, 1/M_Q): fed averages of
    exactly w_Q·Δ_m, eager's bracket is exactly 0 and it applies what sync applies with the same averages, bitwise;
    with any other own term it would not."""
    eager = _phi_with_quorums("eager", own_weight, m_q, w_q)
    sync = _phi_with_quorums("sync", None, m_q, w_q)
    assert all(torch.equal(eager[k], sync[k]) for k in sync)
    other = _phi_with_quorums("eager", own_weight, m_q, w_q * 0.9)
    assert not all(torch.equal(other[k], _phi_with_quorums("sync", None, m_q, w_q * 0.9)[k]) for k in sync)


def test_own_weight_is_checked_against_m_only_in_a_fixed_group() -> None:
    """With a fixed group of one worker, w = 0.75 < 1/M = 1 is refused at construction, before any collective; a
    membership that changes (M = 1 before the first quorum) accepts it."""
    config = DiLoCoConfig(mode="eager", sync_every=4, eager_own_weight=0.75)

    def build(comm: Communicator, fixed: bool) -> str:
        comm.fixed_membership = fixed
        model = TinyNet()
        DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.05), config, comm=comm)
        return "built"

    with pytest.raises(RuntimeError, match=r"ConfigError: eager_own_weight=0\.75: below 1/M = 1 for M=1 workers"):
        run_workers(InProcessGroup(1, timeout=60), lambda comm: build(comm, fixed=True))
    assert run_workers(InProcessGroup(1, timeout=60), lambda comm: build(comm, fixed=False)) == ["built"]
