"""The data-parallel baseline (ALGORITHMS.md, section 8): gradients averaged across workers every inner step.

Every worker computes its gradients, then one fp32 all-reduce of the flat gradient averages them, then each
worker takes the same inner optimizer step: the workers stay identical, like DDP. This is what DDP computes; it
does not overlap the all-reduce with the backward pass bucket by bucket, which on a slow link can hide at most
the backward time (documented in the benchmarks). Time is measured as in :mod:`eagerloco.engine.metrics`:
inner compute between calls, time blocked on the all-reduce, and the copies.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager

import torch
from torch import nn

from eagerloco.comm.base import CollectiveAborted, CollectiveTimeout, Communicator, wire_bytes
from eagerloco.engine.metrics import OuterStepRecord, RunStats
from eagerloco.engine.recorder import Recorder, RecordListener


class GradientAverager:
    """Call :meth:`average_gradients` after ``loss.backward()`` and before the inner optimizer step.

    Measures like ``DiLoCo`` (the same :class:`eagerloco.engine.recorder.Recorder`; both implement
    :class:`eagerloco.engine.recorder.Measured`): ``stats``, ``paused()``, ``reset_clock()``, ``elapsed_s()``.
    It writes no per-step records (``records`` stays empty).

    Args:
        model: the replica; its trainable parameters' ``.grad`` are averaged in place.
        comm: the group of workers.
        timeout: seconds before a pending all-reduce raises (``None``: the communicator's default).
    """

    def __init__(self, model: nn.Module, comm: Communicator, timeout: float | None = None) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.comm = comm
        self.world_size = comm.world_size
        self.timeout = timeout
        numel = sum(p.numel() for p in self.params)
        device = self.params[0].device
        self.buffer = torch.zeros(numel, dtype=torch.float32, device=device)
        self.views = [v.view_as(p) for v, p in zip(self.buffer.split([p.numel() for p in self.params]), self.params)]
        self._recorder = Recorder(comm)
        if self.world_size > 1:  # start from worker 0's parameters, like DDP's constructor
            flat = torch.cat([p.detach().reshape(-1).float() for p in self.params])
            comm.broadcast(flat, src=0).wait(timeout)
            self.buffer.copy_(flat)
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.views)

    def average_gradients(self) -> None:
        """grad ← (1/M) Σ_m grad_m for every trainable parameter (one fp32 all-reduce of the flat gradient)."""
        recorder = self._recorder
        recorder.enter()
        stats = recorder.stats
        stats.inner_steps += 1
        for p in self.params:  # a parameter unused this step still takes part in the average (as zero)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        torch._foreach_copy_(self.views, [p.grad for p in self.params])
        work = self.comm.all_reduce_sum(self.buffer)
        start = time.perf_counter()
        try:
            work.wait(self.timeout)
        except (CollectiveTimeout, CollectiveAborted) as exc:
            raise type(exc)(
                f"the gradient all-reduce of inner step {stats.inner_steps} failed on {self.comm.describe()} "
                f"(timeout {self.timeout} s): {exc}; {self.comm.diagnose_peers()}"
            ) from exc
        recorder.blocked(time.perf_counter() - start)
        self.buffer.div_(self.world_size)
        torch._foreach_copy_([p.grad for p in self.params], self.views)
        nbytes = self.buffer.numel() * self.buffer.element_size()
        recorder.traffic(nbytes, wire_bytes("all_reduce", nbytes, self.world_size))
        stats.outer_steps += 1
        recorder.exit()

    # ------------------------------------------------------------------ Measured (as DiLoCo)

    @property
    def stats(self) -> RunStats:
        """The run's totals since creation or :meth:`reset_clock`."""
        return self._recorder.stats

    @property
    def records(self) -> list[OuterStepRecord]:
        """Always empty: data parallelism has no outer steps to record."""
        return self._recorder.records

    def reset_clock(self) -> None:
        """Restart the measurements (same contract as ``DiLoCo.reset_clock``)."""
        self._recorder.reset_clock()

    def paused(self) -> AbstractContextManager[None]:
        """Time spent inside counts neither as compute nor as wall time (same contract as ``DiLoCo.paused``)."""
        return self._recorder.paused()

    def add_record_listener(self, listener: RecordListener) -> None:
        """Accepted for symmetry with ``DiLoCo``; never called (no records)."""
        self._recorder.add_record_listener(listener)

    def elapsed_s(self) -> float:
        """Wall seconds since creation or :meth:`reset_clock`, paused time excluded."""
        return self._recorder.elapsed_s()
