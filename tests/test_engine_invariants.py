"""The invariants of ALGORITHMS.md section 9, each its own test, on the in-process backend."""

from __future__ import annotations

import pytest
import torch

from _toy import Quadratic, TinyNet, run_inprocess, train_tinynet
from eagerloco import DiLoCo, DiLoCoConfig
from eagerloco.comm import InProcessGroup, MeanReducer

torch.set_num_threads(1)


def sgd(lr: float, momentum: float = 0.0):
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=momentum)


def test_sign_one_worker_one_sgd_step_moves_phi_by_minus_eta_g():
    # One worker, one inner SGD step (gradient g, lr η), OuterOpt SGD(lr=1, momentum=0): φ moves by −η·g.
    model = Quadratic(init=1.0)
    inner = torch.optim.SGD(model.parameters(), lr=0.25)
    comm = InProcessGroup(1).communicator(0)
    loco = DiLoCo(model, inner, DiLoCoConfig(mode="sync", sync_every=1), comm=comm, outer_optimizer=sgd(1.0))
    model(torch.tensor([5.0])).backward()  # g = θ − a = 1 − 5 = −4
    inner.step()
    loco.step()
    assert loco.states[0].phi.item() == 1.0 - 0.25 * (-4.0) == 2.0
    assert model.theta.item() == 2.0


@pytest.mark.parametrize("fragments", [1, 2])
@pytest.mark.parametrize("delay", [1, 2])
def test_one_worker_eager_is_exactly_sync(fragments, delay):
    # M = 1: Δ(t − kH) − (1/M)·Δ_m(t − kH) is exactly zero, so eager(k) applies Δ(t) at once, like sync; with
    # Nesterov momentum, streaming fragments, and through finalize (which adds exactly zero).
    common = dict(sync_every=4, num_fragments=fragments, outer_lr=0.7, outer_momentum=0.9)
    sync = train_tinynet(InProcessGroup(1).communicator(0), DiLoCoConfig(mode="sync", **common), steps=19)
    eager = train_tinynet(InProcessGroup(1).communicator(0), DiLoCoConfig(mode="eager", delay=delay, **common), 19)
    for name in sync.phi:
        assert torch.equal(sync.phi[name], eager.phi[name]), name
        assert torch.equal(sync.theta[name], eager.theta[name]), name
    for a, b in zip(sync.outer_opt_state, eager.outer_opt_state):
        assert torch.equal(a["state"][0]["momentum_buffer"], b["state"][0]["momentum_buffer"])


def test_one_worker_delayed_differs_from_sync():
    common = dict(sync_every=4, outer_lr=0.7, outer_momentum=0.9)
    sync = train_tinynet(InProcessGroup(1).communicator(0), DiLoCoConfig(mode="sync", **common), steps=12)
    delayed = train_tinynet(InProcessGroup(1).communicator(0), DiLoCoConfig(mode="delayed", **common), steps=12)
    assert not torch.equal(sync.phi["head.weight"], delayed.phi["head.weight"])


@pytest.mark.parametrize(
    "mode,extra",
    [("sync", {}), ("overlap", {"overlap_steps": 2, "alpha": 0.5}), ("delayed", {"delay": 2})],
)
@pytest.mark.parametrize("fragments", [1, 2])
def test_outer_state_bit_identical_across_workers(mode, extra, fragments):
    config = DiLoCoConfig(mode=mode, sync_every=4, num_fragments=fragments, outer_momentum=0.9, **extra)
    results = run_inprocess(3, lambda comm: train_tinynet(comm, config, steps=17))
    for other in results[1:]:
        for name in results[0].phi:
            assert torch.equal(results[0].phi[name], other.phi[name]), name
            assert torch.equal(results[0].phi_before_finalize[name], other.phi_before_finalize[name]), name
        for a, b in zip(results[0].outer_opt_state, other.outer_opt_state):
            assert torch.equal(a["state"][0]["momentum_buffer"], b["state"][0]["momentum_buffer"])
    # and the workers really exchanged something: their θ differ before the end, φ moved
    assert not torch.equal(results[0].phi["head.weight"], TinyNet().head.weight.detach())


def test_outer_state_identical_after_every_outer_step():
    # Stronger than the end state: compare φ after every step on all workers (sync/overlap/delayed).
    for mode in ("sync", "overlap", "delayed"):
        config = DiLoCoConfig(mode=mode, sync_every=3, outer_momentum=0.9, overlap_steps=1)
        traces = run_inprocess(2, lambda comm, config=config: _phi_trace(comm, config, steps=10))
        assert all(torch.equal(a, b) for a, b in zip(*traces)), mode


def _phi_trace(comm, config, steps):
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    loco = DiLoCo(model, inner, config, comm=comm)
    generator = torch.Generator().manual_seed(comm.rank)
    trace = []
    for _ in range(steps):
        x = torch.randn(8, 4, generator=generator)
        model(x).pow(2).mean().backward()
        inner.step()
        inner.zero_grad()
        loco.step()
        trace.append(loco.states[0].phi.clone())
    return trace


class RecordingReducer(MeanReducer):
    """MeanReducer that keeps every average it delivered (to check the telescoping sum)."""

    def __init__(self, comm, log):
        super().__init__(comm)
        self.log = log

    def launch(self, delta):
        pending = super().launch(delta)
        original_wait = pending.wait

        def wait(timeout=None):
            mean = original_wait(timeout)
            if not any(m is mean for m in self.log):
                self.log.append(mean)
            return mean

        pending.wait = wait
        return pending


@pytest.mark.parametrize("world_size,delay", [(2, 1), (3, 1), (3, 2)])
def test_eager_telescoping_without_momentum(world_size, delay):
    # Outer SGD without momentum: after finalize every worker's φ is the same up to float rounding and equals
    # φ_0 − lr·Σ_t Δ(t) over the averages Δ(t) that were exchanged.
    lr = 0.7
    config = DiLoCoConfig(mode="eager", sync_every=3, delay=delay, outer_lr=lr, outer_momentum=0.0)
    logs: dict[int, list] = {}

    def worker(comm):
        logs[comm.rank] = []
        model = TinyNet()
        phi0 = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
        inner = torch.optim.SGD(model.parameters(), lr=0.05)
        loco = DiLoCo(
            model, inner, config, comm=comm, reducer_factory=lambda i, c: RecordingReducer(c, logs[comm.rank])
        )
        generator = torch.Generator().manual_seed(comm.rank)
        for _ in range(14):  # 4 sync points, the last k still in flight at the end
            x = torch.randn(8, 4, generator=generator)
            model(x).pow(2).mean().backward()
            inner.step()
            inner.zero_grad()
            loco.step()
        before = loco.states[0].phi.clone()
        loco.finalize()
        return phi0, before, loco.states[0].phi.clone()

    results = run_inprocess(world_size, worker)
    phi0 = results[0][0]
    expected = phi0 - lr * torch.stack(logs[0]).sum(0)
    assert len(logs[0]) == 4
    for _, _before, after in results:
        torch.testing.assert_close(after, expected, rtol=0, atol=1e-6)
    # before finalize the workers' φ differed (each had applied its own fresh contribution only)
    assert not torch.equal(results[0][1], results[1][1])


def test_eager_workers_reflect_each_others_contributions():
    # The bug PEERS.md reports in a public attempt: the average was never used and each worker trained alone.
    # Here a worker's φ after finalize must depend on the other worker's data.
    config = DiLoCoConfig(mode="eager", sync_every=3, outer_momentum=0.9)
    together = run_inprocess(2, lambda comm: train_tinynet(comm, config, steps=12))
    alone = train_tinynet(InProcessGroup(1).communicator(0), config, steps=12)
    gap = (together[0].phi["head.weight"] - alone.phi["head.weight"]).abs().max()
    assert gap > 1e-3


def test_overlap_tau_zero_is_sync():
    common = dict(sync_every=4, outer_momentum=0.9)
    sync = run_inprocess(2, lambda c: train_tinynet(c, DiLoCoConfig(mode="sync", **common), steps=13))
    over = run_inprocess(
        2, lambda c: train_tinynet(c, DiLoCoConfig(mode="overlap", overlap_steps=0, alpha=0.5, **common), steps=13)
    )
    for a, b in zip(sync, over):
        for name in a.phi:
            assert torch.equal(a.phi[name], b.phi[name])
            assert torch.equal(a.theta[name], b.theta[name])


@pytest.mark.parametrize("mode", ["sync", "overlap", "delayed", "eager"])
def test_fragment_schedule_and_offsets(mode):
    # P = 2, H = 4: fragment 0 syncs at t ≡ 0 (mod 4), fragment 1 at t ≡ 2: each once every H steps.
    config = DiLoCoConfig(mode=mode, sync_every=4, num_fragments=2)
    result = train_tinynet(InProcessGroup(1).communicator(0), config, steps=12)
    synced = {r["inner_step"]: r["fragments_synced"] for r in result.records if r["fragments_synced"]}
    assert synced == {2: [1], 4: [0], 6: [1], 8: [0], 10: [1], 12: [0]}


def test_strided_fragment_assignment():
    # blocks l → fragment l mod P; parameters before the blocks → fragment 0, after them → fragment P − 1.
    from eagerloco.engine import build_fragments

    fragments = build_fragments(TinyNet(depth=4), num_fragments=2, sync_every=4, layout="strided")
    assert fragments[0].names == ["inp.weight", "inp.bias", "blocks.0.weight", "blocks.0.bias",
                                  "blocks.2.weight", "blocks.2.bias"]  # fmt: skip
    assert fragments[1].names == ["blocks.1.weight", "blocks.1.bias", "blocks.3.weight", "blocks.3.bias",
                                  "head.weight", "head.bias"]  # fmt: skip
    assert [f.offset for f in fragments] == [0, 2]
    sequential = build_fragments(TinyNet(depth=4), num_fragments=2, sync_every=4, layout="sequential")
    assert sequential[0].names[2:] == ["blocks.0.weight", "blocks.0.bias", "blocks.1.weight", "blocks.1.bias"]


def test_tied_parameters_are_synchronised_once():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(5, 3)
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(3, 3) for _ in range(2))
            self.head = torch.nn.Linear(3, 5, bias=False)
            self.head.weight = self.emb.weight

    from eagerloco.engine import build_fragments

    fragments = build_fragments(Tied(), num_fragments=2, sync_every=2)
    names = [n for f in fragments for n in f.names]
    assert names.count("emb.weight") == 1 and "head.weight" not in names


def test_consolidate_averages_eager_workers():
    config = DiLoCoConfig(mode="eager", sync_every=3)
    results = run_inprocess(2, lambda comm: train_tinynet(comm, config, steps=9, consolidate=True))
    for name in results[0].phi:
        assert torch.equal(results[0].phi[name], results[1].phi[name])
        assert torch.equal(results[0].theta[name], results[0].phi[name])
