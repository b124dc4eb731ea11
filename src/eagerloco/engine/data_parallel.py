"""The data-parallel baseline (ALGORITHMS.md, section 8): gradients averaged across workers every inner step.

Every worker computes its gradients, then one fp32 all-reduce of the flat gradient averages them, then each
worker takes the same inner optimizer step: the workers stay identical, like DDP. This is what DDP computes; it
does not overlap the all-reduce with the backward pass bucket by bucket, which on a slow link can hide at most
the backward time (documented in the benchmarks). Time is measured as in :mod:`eagerloco.engine.metrics`:
inner compute between calls, time blocked on the all-reduce, and the copies.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
from torch import nn

from eagerloco.comm.base import CollectiveAborted, CollectiveTimeout, Communicator, wire_bytes
from eagerloco.engine.metrics import RunStats


class GradientAverager:
    """Call :meth:`average_gradients` after ``loss.backward()`` and before the inner optimizer step.

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
        self.stats = RunStats()
        self._last_exit = time.perf_counter()
        if self.world_size > 1:  # start from worker 0's parameters, like DDP's constructor
            flat = torch.cat([p.detach().reshape(-1).float() for p in self.params])
            comm.broadcast(flat, src=0).wait(timeout)
            self.buffer.copy_(flat)
            with torch.no_grad():
                torch._foreach_copy_(self.params, self.views)

    def average_gradients(self) -> None:
        """grad ← (1/M) Σ_m grad_m for every trainable parameter (one fp32 all-reduce of the flat gradient)."""
        enter = time.perf_counter()
        self.stats.inner_s += enter - self._last_exit
        self.stats.inner_steps += 1
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
                f"the gradient all-reduce of inner step {self.stats.inner_steps} failed on {self.comm.describe()} "
                f"(timeout {self.timeout} s): {exc}; {self.comm.diagnose_peers()}"
            ) from exc
        blocked = time.perf_counter() - start
        self.buffer.div_(self.world_size)
        torch._foreach_copy_([p.grad for p in self.params], self.views)
        nbytes = self.buffer.numel() * self.buffer.element_size()
        self.stats.blocked_s += blocked
        self.stats.payload_bytes += nbytes
        self.stats.wire_bytes += wire_bytes("all_reduce", nbytes, self.world_size)
        self.stats.outer_steps += 1
        exit_ = time.perf_counter()
        self.stats.overhead_s += (exit_ - enter) - blocked
        self._last_exit = exit_

    def reset_clock(self) -> None:
        """Restart the measurements (same contract as ``DiLoCo.reset_clock``)."""
        self.stats = RunStats(inner_steps=self.stats.inner_steps)
        self._last_exit = time.perf_counter()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside counts neither as compute nor as wall time (same contract as ``DiLoCo.paused``)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._last_exit += time.perf_counter() - start
