"""The data-parallel baseline (ALGORITHMS.md, section 8): gradients averaged across workers every inner step.

Two implementations of the same average, measured alike (:mod:`eagerloco.engine.recorder`):

* :class:`DDPGradientAverager` -- PyTorch's ``DistributedDataParallel``: the gradient is all-reduced in buckets
  while the backward pass still runs (bucket k travels while bucket k + 1 is computed). The baseline whenever the
  workers are processes (``--launch processes``, ``torchrun``): what a practitioner would really run.
* :class:`GradientAverager` -- one fp32 all-reduce of the flat gradient after ``backward()``, no overlap. For
  simulated workers (threads, :class:`eagerloco.comm.InProcessGroup`), which DDP cannot span.

Both compute the same average; the workers stay identical.
"""

from __future__ import annotations

import inspect
import threading
import time
from contextlib import AbstractContextManager
from typing import Any

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


def torch_group_of(comm: Communicator) -> Any | None:
    """The ``torch.distributed`` process group under ``comm`` (through an :class:`eagerloco.EmulatedLink`), or
    ``None`` when the workers are not processes of a ``torch.distributed`` job."""
    from eagerloco.comm.torch_dist import TorchDistributedCommunicator

    while not isinstance(comm, TorchDistributedCommunicator):
        inner = getattr(comm, "inner", None)
        if not isinstance(inner, Communicator):
            return None
        comm = inner
    return comm.group if comm.group is not None else torch.distributed.group.WORLD


class DDPGradientAverager(GradientAverager):
    """The data-parallel baseline as ``torch.nn.parallel.DistributedDataParallel`` (bucketed, overlapping the
    backward pass), with the measurements of :class:`GradientAverager`.

    Forward through :attr:`ddp` (``ddp(x, y)``); call :meth:`average_gradients` after ``loss.backward()``, where
    :class:`GradientAverager` needs it: the average has already happened inside ``backward()``, the call only
    measures. Each bucket goes through ``comm`` (a DDP communication hook), so an
    :class:`eagerloco.EmulatedLink` shapes it and its bytes are counted; the hook returns a future that a waiter
    thread completes, so ``backward()`` keeps computing while the bucket travels.

    Blocked time: from the launch of the last bucket (the backward pass has no compute left) to the return of
    ``backward()``, i.e. the communication that DDP could not hide behind compute.

    Args:
        model: the replica (parameters equal on every worker: DDP broadcasts worker 0's at construction).
        comm: the group of workers, over a ``torch.distributed`` process group (possibly an ``EmulatedLink``).
        timeout: seconds before a pending all-reduce fails (``None``: the communicator's default).
        bucket_cap_mb: DDP's bucket size.
    """

    def __init__(
        self, model: nn.Module, comm: Communicator, timeout: float | None = None, bucket_cap_mb: float = 25.0
    ) -> None:
        group = torch_group_of(comm)
        if group is None:
            raise ValueError(
                f"DDPGradientAverager needs workers that are torch.distributed processes, got {comm.describe()}: use "
                "GradientAverager for simulated workers"
            )
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.comm = comm
        self.world_size = comm.world_size
        self.timeout = timeout
        self._recorder = Recorder(comm)
        self._last_launch: float | None = None
        self._bytes_this_step = 0
        self._buckets_this_step = 0
        self.last_step_buckets = 0
        """Buckets all-reduced in the last measured step (DDP's bucketing, for tests and reports)."""
        # No buffer broadcast before every forward (the flat averager has none either). torch 2.13 renames the
        # switch (``broadcast_buffers`` is deprecated there); buffers are still synced once, at construction.
        parameters = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
        no_sync = (
            {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else {"broadcast_buffers": False}
        )
        self.ddp = nn.parallel.DistributedDataParallel(
            model, process_group=group, bucket_cap_mb=bucket_cap_mb, **no_sync
        )
        self.ddp.register_comm_hook(state=self, hook=_ddp_hook)

    def _all_reduce_bucket(self, buffer: torch.Tensor) -> torch.futures.Future:
        """One bucket: launch its all-reduce through ``comm`` now; a thread waits and completes the future with the
        mean (DDP copies it into the gradients)."""
        self._last_launch = time.perf_counter()
        self._buckets_this_step += 1
        nbytes = buffer.numel() * buffer.element_size()
        self._bytes_this_step += nbytes
        future: torch.futures.Future = torch.futures.Future()
        work = self.comm.all_reduce_sum(buffer)

        def wait() -> None:
            try:
                work.wait(self.timeout)
                future.set_result(buffer.div_(self.world_size))
            except BaseException as exc:  # handed to backward(), which raises it
                future.set_exception(exc)

        threading.Thread(target=wait, name="ddp-bucket-wait", daemon=True).start()
        return future

    def average_gradients(self) -> None:
        """Measure the step whose gradients DDP has averaged inside ``backward()`` (see the class docstring)."""
        recorder = self._recorder
        now = time.perf_counter()
        began = self._last_launch if self._last_launch is not None else now
        recorder.enter(at=began)
        recorder.blocked(now - began)
        stats = recorder.stats
        stats.inner_steps += 1
        recorder.traffic(self._bytes_this_step, wire_bytes("all_reduce", self._bytes_this_step, self.world_size))
        self._bytes_this_step = 0
        self.last_step_buckets, self._buckets_this_step = self._buckets_this_step, 0
        self._last_launch = None
        stats.outer_steps += 1
        recorder.exit()


def _ddp_hook(state, bucket):  # unannotated: DDP checks real annotations, and this module's are strings
    return state._all_reduce_bucket(bucket.buffer())
