"""Compressed outer gradients inside the engine: every mode, with fragments, asynchronous, exact eager bookkeeping.

The codecs and the compressed reducer have their own tests (test_codecs.py, test_compressed_reducer.py); these
pin what the engine does with them (ALGORITHMS.md section 7).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from _toy import TinyNet, run_inprocess, train_tinynet
from eagerloco import DiLoCoConfig, EmulatedLink
from eagerloco.comm import InProcessGroup, run_workers
from eagerloco.compression import get_codec
from eagerloco.compression.reducer import _PendingCompressedMean
from eagerloco.engine.fragments import build_fragments

torch.set_num_threads(1)
PARAMS = {name: p.numel() for name, p in TinyNet().named_parameters()}
MODES = {
    "sync": {"mode": "sync"},
    "overlap": {"mode": "overlap", "overlap_steps": 1, "alpha": 0.5},
    "delayed": {"mode": "delayed", "delay": 1},
    "eager": {"mode": "eager", "delay": 1},
}


def fragment_numels(num_fragments: int) -> list[int]:
    model = TinyNet()
    return [sum(p.numel() for p in f.params) for f in build_fragments(model, num_fragments, sync_every=4)]


def plain_sgd(params):
    return torch.optim.SGD(params, lr=0.7, momentum=0.0)


@pytest.mark.parametrize("codec", ["fp4", "int8"])
@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_with_fragments_sends_exactly_the_encoded_bytes(mode, codec):
    config = DiLoCoConfig(sync_every=4, num_fragments=2, compression=codec, error_feedback=codec == "fp4",
                          **MODES[mode])  # fmt: skip
    results = run_inprocess(2, lambda comm: train_tinynet(comm, config, steps=16))
    sizes = [get_codec(codec).encoded_nbytes(n) for n in fragment_numels(2)]
    for result in results:
        steps = [r for r in result.records if r["kind"] == "step"]
        launched = [f for r in steps for f in r["fragments_synced"]]
        assert launched == [1, 0] * 4  # each fragment once per H = 4 steps, at t ≡ p·H/P: 2, 4, 6, ..., 16
        assert sum(r["payload_bytes"] for r in steps) == 4 * sum(sizes)
        for r in steps:  # every payload is the codec's size for the fragments launched there
            assert r["payload_bytes"] == sum(sizes[f] for f in r["fragments_synced"])
        assert sum(PARAMS.values()) * 4 * 4 / result.stats["payload_bytes"] > (6.0 if codec == "fp4" else 3.0)
        for name, value in result.phi.items():
            assert torch.isfinite(value).all(), name
    if mode != "eager":  # the decoded average is bit-identical on every worker, so φ and momentum are too
        for name in PARAMS:
            assert torch.equal(results[0].phi[name], results[1].phi[name]), name
        for a, b in zip(results[0].outer_opt_state, results[1].outer_opt_state):
            for sa, sb in zip(a["state"].values(), b["state"].values()):
                assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


@pytest.mark.parametrize("codec", ["fp4", "int8", "bf16"])
@pytest.mark.parametrize("delay", [1, 2])
def test_eager_swaps_its_own_raw_term_for_the_quantised_one(codec, delay, monkeypatch):
    # Spec section 7: at arrival the worker subtracts exactly the contribution it applied eagerly, so after
    # finalize its own term is in the same quantised form every other worker applied. With momentum-free SGD
    # every worker's φ then telescopes to φ_0 − lr·Σ_t mean_t over the decoded averages mean_t -- the same on
    # all workers up to float rounding, although each applied its own raw Δ_m(t)/M first.
    means: dict[int, list[torch.Tensor]] = {}
    original = _PendingCompressedMean.wait

    def recording_wait(self, timeout=None):
        first = self._mean is None
        mean = original(self, timeout)
        if first:
            means.setdefault(threading.get_ident(), []).append(mean.clone())
        return mean

    monkeypatch.setattr(_PendingCompressedMean, "wait", recording_wait)
    config = DiLoCoConfig(mode="eager", delay=delay, sync_every=3, compression=codec)
    steps = 15
    results = run_inprocess(2, lambda comm: train_tinynet(comm, config, steps=steps, outer_factory=plain_sgd))
    # before finalize the workers differ (each holds its own fresh raw term) ...
    before = sum((results[0].phi_before_finalize[n] - results[1].phi_before_finalize[n]).abs().sum() for n in PARAMS)
    assert before > 1e-6
    # ... after it both hold φ_0 − lr·Σ_t mean_t, with every worker's decoded averages bit-identical
    per_worker = list(means.values())
    assert len(per_worker) == 2 and all(len(m) == steps // 3 for m in per_worker)
    for a, b in zip(*per_worker):
        assert torch.equal(a, b)
    phi0 = torch.cat([p.detach().flatten() for p in TinyNet().parameters()])
    expected = phi0 - 0.7 * torch.stack(per_worker[0]).sum(0)
    for result in results:
        phi = torch.cat([result.phi[n].flatten() for n in PARAMS])
        torch.testing.assert_close(phi, expected, rtol=0, atol=1e-5)
    assert results[0].stats["payload_bytes"] == (steps // 3) * get_codec(codec).encoded_nbytes(sum(PARAMS.values()))


def test_compression_keeps_the_overlap_asynchronous():
    # Every collective takes 180 ms, an inner phase 120 ms: sync blocks ~180 ms per outer step, eager k=2 with
    # the fp4 codec (encode at launch, decode at arrival) still blocks ~0: compression does not re-serialise.
    def run(config: DiLoCoConfig) -> list:
        def worker(comm):
            link = EmulatedLink(comm, latency_s=0.18)
            return train_tinynet(link, config, 16, step_hook=lambda _: time.sleep(0.03))

        return run_workers(InProcessGroup(2, timeout=30), worker)

    sync = run(DiLoCoConfig(mode="sync", sync_every=4, compression="fp4"))
    eager = run(DiLoCoConfig(mode="eager", sync_every=4, delay=2, compression="fp4", error_feedback=True))
    for s, e in zip(sync, eager):
        assert 0.9 * 0.18 <= s.stats["blocked_per_outer_step_s"] < 0.5  # a loaded CPU can only add to the wait
        assert e.stats["blocked_per_outer_step_s"] < 0.1 * s.stats["blocked_per_outer_step_s"]
