"""Outer collectives over ``torch.distributed``: gloo across sites and on CPU, NCCL on GPUs.

Collectives are issued with ``async_op=True``: gloo runs them on its own worker threads and NCCL on its own
stream, so the transfer really proceeds while the next inner steps compute. ``Work.wait(timeout)`` bounds every
wait; a peer that died makes the survivors raise :class:`CollectiveTimeout` instead of hanging.

Launch with ``torchrun`` (one process per worker, or per rank when a worker is a group of ranks) and pass the
process group that joins the workers (default: the world group)::

    torchrun --nproc-per-node 2 train.py            # one machine
    torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:29400 train.py   # two sites
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from eagerloco.comm.base import CollectiveTimeout, CommStats, Communicator, Work


class _TorchWork:
    """Adapts a ``torch.distributed`` work handle to :class:`eagerloco.comm.base.Work`, with a timeout that
    names the operation and the group."""

    def __init__(self, work: Any, what: str, default_timeout: float | None) -> None:
        self._work = work
        self._what = what
        self._default_timeout = default_timeout
        self._done = False

    def wait(self, timeout: float | None = None) -> None:
        if self._done:
            return
        timeout = self._default_timeout if timeout is None else timeout
        try:
            if timeout is None:
                self._work.wait()
            else:
                self._work.wait(timeout=timedelta(seconds=timeout))
        except RuntimeError as exc:  # gloo and NCCL report timeouts and dead peers as RuntimeError
            text = str(exc).lower()
            if "timed out" in text or "timeout" in text or "connection" in text or "closed" in text:
                raise CollectiveTimeout(f"{self._what} did not complete within {timeout} s: {exc}") from exc
            raise
        self._done = True

    def is_completed(self) -> bool:
        return self._done or bool(self._work.is_completed())


class TorchDistributedCommunicator(Communicator):
    """A :class:`Communicator` over a ``torch.distributed`` process group.

    Args:
        group: the process group joining the workers (one rank per worker, or the cross-worker group of one
            shard position when workers are groups of ranks). ``None``: the default (world) group, which must
            already be initialised with ``torch.distributed.init_process_group``.
        timeout: seconds before a pending collective raises :class:`CollectiveTimeout` (``None``: the process
            group's own timeout).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, timeout: float | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised: call torch.distributed.init_process_group(...) first "
                "(torchrun sets the environment), or use eagerloco.comm.InProcessGroup to simulate workers "
                "in one process"
            )
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.stats = CommStats()
        self.default_timeout = timeout
        self._backend = str(dist.get_backend(group))

    @property
    def backend(self) -> str:
        return self._backend

    def _wrap(self, work: Any, what: str) -> Work:
        return _TorchWork(work, f"{what} on {self._backend} rank {self.rank}/{self.world_size}", self.default_timeout)

    def all_reduce_sum(self, tensor: torch.Tensor) -> Work:
        self.stats.record("all_reduce", tensor.numel() * tensor.element_size(), self.world_size)
        work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        return self._wrap(work, f"all_reduce of {tensor.numel()} x {tensor.dtype}")

    def all_gather(self, output: torch.Tensor, tensor: torch.Tensor) -> Work:
        self.stats.record("all_gather", tensor.numel() * tensor.element_size(), self.world_size)
        # all_gather_into_tensor is one collective on every recent backend (gloo included); the rows of
        # `output` are contiguous, so rank r's contribution lands in output[r].
        work = dist.all_gather_into_tensor(output.view(-1), tensor.reshape(-1), group=self.group, async_op=True)
        return self._wrap(work, f"all_gather of {tensor.numel()} x {tensor.dtype}")

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> Work:
        self.stats.record("broadcast", tensor.numel() * tensor.element_size(), self.world_size, self.rank == src)
        global_src = dist.get_global_rank(self.group, src) if self.group is not None else src
        work = dist.broadcast(tensor, src=global_src, group=self.group, async_op=True)
        return self._wrap(work, f"broadcast of {tensor.numel()} x {tensor.dtype}")

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out
