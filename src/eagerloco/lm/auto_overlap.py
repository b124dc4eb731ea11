"""``--overlap-steps auto``: mode overlap's τ sized to the run's own link when the run starts.

Streaming DiLoCo's overlap hides an all-reduce that takes up to τ inner steps; a larger τ hides a slower link but
mixes in staler averages (on the default job τ = 1 ends 0.6 % below DiLoCo, τ = 14 0.7 % above, BENCHMARKS.md 8).
So the τ to train with is the smallest that hides the link, and that depends on two numbers a user rarely knows:
the inner step time and the all-reduce time on this link. Before the first inner step every worker measures both:

1. the inner step: forward + backward of the run's model on a fixed batch of the run's shape, timed over
   :data:`TIMED_STEPS` steps after :data:`WARMUP_STEPS` (median); the model's parameters, its gradients (none
   before training) and the RNG are left as they were, so the run trains bitwise as it would with that τ given;
2. the link: one all-reduce of a tensor of the model's size in fp32 (a DiLoCo sync's payload) over the run's
   communicator (the emulated link included), after a one-value all-reduce that lines the workers up.

The workers agree on the fastest step and the slowest probe (one all_gather_object), so every worker derives the
same τ: the link rate the probe implies (:func:`eagerloco.simulator.link_rate_from_blocked`, as ``eagerloco
simulate --link-mbit measured`` reads a sync run) and then the smallest τ whose simulated steady-state CU reaches
the target at that rate, for this run's H, fragments and codec (:func:`eagerloco.simulator.smallest_hiding_overlap`,
as ``eagerloco simulate --overlap-steps auto``). The choice is fixed for the run and recorded (metrics.jsonl
``{"type": "overlap_auto"}``, summary.json ``overlap_auto``, config.json and the checkpoints hold the resolved τ);
``--resume`` keeps the checkpoint's τ.

The forward + backward time leaves out the inner optimizer's step and the data loading, so the step is slightly
underestimated and τ errs on the side of hiding the link.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from eagerloco.comm.base import Communicator
from eagerloco.fileio import atomic_write_bytes

if TYPE_CHECKING:
    from eagerloco.lm.config import TrainConfig
    from eagerloco.report import MetricsLog

WARMUP_STEPS = 2
"""Untimed forward + backward steps first (allocations, first-call overheads)."""
TIMED_STEPS = 5
"""Timed forward + backward steps; their median is the inner step time."""


@dataclass(frozen=True)
class OverlapAuto:
    """What ``--overlap-steps auto`` measured and chose (identical on every worker)."""

    overlap_steps: int
    """τ the run trains with."""
    step_time_s: float
    """The inner step (forward + backward; the fastest worker's median)."""
    probe_s: float
    """One fp32 all-reduce of the model's size on the run's link (the slowest worker's)."""
    probe_bytes: int
    """Bytes of that all-reduce's tensor per worker."""
    link_mbit: float
    """The link rate the probe implies (Mbit/s), as the simulator models an all-reduce."""
    predicted_cu: float
    """The simulator's steady-state compute utilization at τ on that link."""
    hides: bool
    """Whether τ reaches the CU target (else no τ < H does, and τ is the smallest of the highest CU)."""
    measure_s: float
    """Seconds the measurement took on this worker (before the training loop; not in its wall time)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line for the run's summary."""
        hides = "hides the link" if self.hides else "the most any τ < H hides"
        probe = f"a {self.probe_bytes / 1e6:.2f} MB all-reduce {self.probe_s:.2f} s ≈ {self.link_mbit:.3g} Mbit/s"
        return (
            f"τ = {self.overlap_steps} (inner step {self.step_time_s * 1e3:.0f} ms, {probe}; predicted CU "
            f"{self.predicted_cu:.3f}, {hides})"
        )


def time_inner_step(
    model: torch.nn.Module, batch_size: int, seq_len: int, vocab_size: int, device: torch.device
) -> float:
    """Median seconds of forward + backward of ``model`` on a fixed random batch (B x T tokens). Leaves the
    parameters untouched, the gradients as they were (each ``.grad`` restored) and the global RNG state as it was."""
    saved_grads = [p.grad for p in model.parameters()]
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(vocab_size, (batch_size, seq_len), generator=generator).to(device)
    y = torch.roll(x, -1, dims=1)
    devices = [device] if device.type == "cuda" else []
    times = []
    with torch.random.fork_rng(devices=devices):  # dropout draws from the RNG the run's training will use
        for i in range(WARMUP_STEPS + TIMED_STEPS):
            for p in model.parameters():
                p.grad = None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            _, loss = model(x, y)
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= WARMUP_STEPS:
                times.append(time.perf_counter() - start)
    for p, grad in zip(model.parameters(), saved_grads, strict=True):
        p.grad = grad
    return statistics.median(times)


def probe_all_reduce(comm: Communicator, numel: int, device: torch.device, timeout: float | None) -> float:
    """Seconds of one all-reduce of ``numel`` fp32 values over ``comm`` (collective: every worker calls it)."""
    comm.all_reduce_sum(torch.zeros(1, device=device)).wait(timeout)  # line the workers up
    payload = torch.zeros(numel, device=device)
    start = time.perf_counter()
    comm.all_reduce_sum(payload).wait(timeout)
    return time.perf_counter() - start


def choose(
    *,
    params: int,
    layers: int,
    step_time_s: float,
    probe_s: float,
    workers: int,
    sync_every: int,
    num_fragments: int,
    compression: str,
    layout: str,
) -> tuple[int, float, float, bool]:
    """(τ, link Mbit/s, predicted CU, hides) for a model of ``params`` in ``layers`` blocks whose inner step takes
    ``step_time_s``, on a link where one fp32 all-reduce of the model among ``workers`` took ``probe_s``: the
    simulator's rate for that all-reduce (latency folded in), then its smallest hiding τ for mode overlap with
    this H, P, codec and layout. Pure: the same inputs give the same τ on every worker."""
    from eagerloco.simulator import LinkSpec, ModelSpec, link_rate_from_blocked, mode_method, smallest_hiding_overlap

    model = ModelSpec(name="this run", params=params, layers=layers, step_time_s=step_time_s)
    sync = mode_method("sync", sync_every=sync_every, num_fragments=1, compression="none")
    gbps = link_rate_from_blocked(model, sync, max(probe_s, 1e-9), workers=workers)
    overlap = mode_method("overlap", sync_every=sync_every, num_fragments=num_fragments, overlap_steps=1,
                          compression=compression, layout=layout)  # fmt: skip
    choice = smallest_hiding_overlap(model, overlap, LinkSpec(bandwidth_gbps=gbps, workers=workers))
    return choice.overlap_steps, gbps * 1e3, choice.result.cu, choice.reached


def resolve(
    config: TrainConfig,
    comm: Communicator,
    model: Any,
    vocab_size: int,
    device: torch.device,
    log: MetricsLog,
    run_dir: Path,
) -> tuple[TrainConfig, OverlapAuto]:
    """``overlap_steps = "auto"`` for one worker (collective): measure this worker's step and the link, agree with
    the other workers, choose τ, and return the config with τ resolved (what the checkpoints and model.pt then hold)
    and the record; worker 0 logs the record to metrics.jsonl and rewrites config.json with the resolved τ."""
    o = config.outer
    start = time.perf_counter()
    step = time_inner_step(model, config.data.batch_size, config.model.seq_len, vocab_size, device)
    numel = sum(p.numel() for p in model.parameters())
    probe = probe_all_reduce(comm, numel, device, o.collective_timeout_s)
    measured = comm.all_gather_object((step, probe))
    step = min(s for s, _ in measured)  # the fastest worker reaches its merge point first: hide the link for it
    probe = max(p for _, p in measured)
    tau, mbit, cu, hides = choose(
        params=numel, layers=config.model.n_layer, step_time_s=step, probe_s=probe, workers=comm.world_size,
        sync_every=o.sync_every, num_fragments=o.num_fragments, compression=o.compression, layout=o.fragment_layout,
    )  # fmt: skip
    auto = OverlapAuto(
        overlap_steps=tau, step_time_s=step, probe_s=probe, probe_bytes=numel * 4, link_mbit=mbit, predicted_cu=cu,
        hides=hides, measure_s=time.perf_counter() - start,
    )  # fmt: skip
    resolved = config.with_overlap_steps(tau)
    if comm.rank == 0:
        log.write({"type": "overlap_auto", "worker": 0, "step": 0, **auto.to_dict()})
        atomic_write_bytes(Path(run_dir) / "config.json", json.dumps(resolved.to_dict(), indent=2).encode())
    return resolved, auto
