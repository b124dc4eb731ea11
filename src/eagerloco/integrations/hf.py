"""Hugging Face ``Trainer`` and Accelerate as DiLoCo workers (needs the ``hf`` extra: transformers, accelerate).

``Trainer`` under ``torchrun``: every rank runs the same script; ``ranks_per_worker`` consecutive ranks form one
worker (one site)::

    from eagerloco.integrations.hf import DiLoCoCallback

    trainer = Trainer(model=model, args=TrainingArguments(..., ddp_backend="gloo"), train_dataset=data)
    DiLoCoCallback(eagerloco.DiLoCoConfig(mode="eager", sync_every=50), ranks_per_worker=1).attach(trainer)
    trainer.train()           # the model holds the outer parameters φ when train() returns
    trainer.evaluate(); trainer.save_model()

Accelerate: :func:`confine_ddp` on the ``Accelerator`` before ``prepare``, and ``with eagerloco.DiLoCo(...)``
around the prepared loop (see ``examples/accelerate_loop.py``)::

    accelerator = Accelerator()
    layout = confine_ddp(accelerator, ranks_per_worker)                         # DDP inside the worker only
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    with eagerloco.DiLoCo(accelerator.unwrap_model(model), optimizer, config, layout=layout):
        for batch in loader: ...                                                # the loop as it was

**Why a comm hook.** With more than one process ``Trainer`` (through Accelerate) wraps the model in
``DistributedDataParallel`` over the *world*, which would average the gradients of all workers at every step: no
DiLoCo at all. :func:`worker_ddp_kwargs` (installed by :func:`confine_ddp` and :meth:`DiLoCoCallback.attach`) is
Accelerate's ``DistributedDataParallelKwargs`` whose ``register_comm_hook`` -- which Accelerate calls right after
building DDP -- installs a DDP communication hook that all-reduces the gradient buckets on the worker's *inner*
group only (``layout.inner_group``; with one rank per worker the hook does no collective at all). It also turns off
what DDP would otherwise do over the world every step: ``broadcast_buffers`` (buffers are not synchronised across
workers, as DiLoCo synchronises parameters only) and ``find_unused_parameters`` (its per-step all-reduce of the
used-parameter bitmap; a model with unused parameters must set ``requires_grad=False`` on them). What remains on the
world group is one-time: DDP's broadcast of the initial parameters at construction and of its rebuilt bucket order
at the second step, and whatever Trainer itself gathers (logged losses, evaluation); the outer step runs on
``layout.outer_group``.

**What Trainer saves and evaluates.** :meth:`DiLoCoCallback.on_train_end` drains and consolidates
(``finalize()``/``consolidate()``): after ``trainer.train()`` returns, the model holds φ, the same on every
worker, and ``trainer.evaluate()``/``trainer.save_model()`` see it. Evaluations and checkpoints *during* training
see this worker's θ (save the outer state with :class:`eagerloco.integrations.dcp.DiLoCoState` for a resumable
run).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from accelerate.utils import DistributedDataParallelKwargs
from transformers import TrainerCallback

from eagerloco.engine.config import DiLoCoConfig

if TYPE_CHECKING:
    from transformers import Trainer

    from eagerloco.distributed import WorkerLayout
    from eagerloco.engine.diloco import DiLoCo

__all__ = ["DiLoCoCallback", "WorkerDDPKwargs", "confine_ddp", "worker_ddp_kwargs", "worker_layout"]


def worker_layout(ranks_per_worker: int = 1, **mesh_kwargs: Any) -> WorkerLayout | None:
    """This rank's :class:`eagerloco.WorkerLayout` (``two_level_mesh(ranks_per_worker, **mesh_kwargs)``), or
    ``None`` when ``torch.distributed`` is not initialised (one process: one worker). A collective."""
    if not dist.is_available() or not dist.is_initialized():
        if ranks_per_worker != 1:
            raise ValueError(f"ranks_per_worker={ranks_per_worker} needs torch.distributed initialised (torchrun)")
        return None
    from eagerloco.distributed import two_level_mesh

    return two_level_mesh(ranks_per_worker, **mesh_kwargs)


def _local_only_hook(state, bucket):  # unannotated: DDP checks real annotations, and this module's are strings
    """One rank per worker: the worker's gradient is this rank's; nothing leaves the process."""
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


class WorkerDDPKwargs(DistributedDataParallelKwargs):
    """Accelerate's ``DistributedDataParallelKwargs`` for a DiLoCo worker: DDP's gradient all-reduce on the
    worker's inner group only (a comm hook), no per-step buffer broadcast or unused-parameter all-reduce. Build it
    with :func:`worker_ddp_kwargs`."""

    def to_dict(self, ignore_keys: tuple[str, ...] = ("comm_hook", "comm_wrapper", "comm_state_option")) -> dict:
        # The process group is no DDP keyword and cannot be deep-copied: kept out (private attributes).
        return {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k not in ignore_keys and k[0] != "_"}

    def to_kwargs(self) -> dict[str, Any]:
        """DDP's keyword arguments; ``broadcast_buffers=False`` is spelt ``forward_sync_buffers=False`` where torch
        has it (torch 2.13 deprecates the old name; both stop the buffer broadcast before every forward)."""
        kwargs = super().to_kwargs()
        if kwargs.get("broadcast_buffers") is False and _ddp_has("forward_sync_buffers"):
            del kwargs["broadcast_buffers"]
            kwargs["forward_sync_buffers"] = False
        return kwargs

    @property
    def layout(self) -> WorkerLayout | None:
        """This rank's layout (``None`` in one process): pass it to ``eagerloco.DiLoCo(..., layout=...)``."""
        return getattr(self, "_layout", None)

    def register_comm_hook(self, model: torch.nn.Module) -> None:
        """Called by Accelerate right after it wraps the model in DDP."""
        group = getattr(self, "_inner_group", None)
        if group is None or dist.get_world_size(group) == 1:
            model.register_comm_hook(state=None, hook=_local_only_hook)
        else:
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            model.register_comm_hook(state=group, hook=allreduce_hook)  # mean over the worker's ranks only
        self._registered_on = model


def _ddp_has(name: str) -> bool:
    import inspect

    return name in inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters


def worker_ddp_kwargs(layout: WorkerLayout | int | None = 1, **ddp_kwargs: Any) -> WorkerDDPKwargs:
    """``Accelerator(kwargs_handlers=[worker_ddp_kwargs(...)])``: DDP confined to this rank's worker (see the
    module docstring).

    Args:
        layout: this rank's :class:`eagerloco.WorkerLayout`, or the number of ranks per worker to build it
            (:func:`worker_layout`, a collective), or ``None`` (one process). The handler's ``layout`` attribute
            is what to pass to ``eagerloco.DiLoCo(..., layout=...)``.
        ddp_kwargs: other DDP settings (``bucket_cap_mb``, ``static_graph``, ...).
    """
    if isinstance(layout, int) and not isinstance(layout, bool):
        layout = worker_layout(layout)
    for key, bad in (("broadcast_buffers", True), ("find_unused_parameters", True)):
        if ddp_kwargs.get(key) is bad:
            raise ValueError(f"{key}=True would run a collective across all workers every step: not with DiLoCo")
    ddp_kwargs.setdefault("broadcast_buffers", False)
    ddp_kwargs["find_unused_parameters"] = False
    handler = WorkerDDPKwargs(**ddp_kwargs)
    handler._inner_group = layout.inner_group if layout is not None and layout.ranks_per_worker > 1 else None
    handler._layout = layout
    return handler


def confine_ddp(
    accelerator: Any, ranks_per_worker: int = 1, *, layout: WorkerLayout | None = None
) -> WorkerLayout | None:
    """Make ``accelerator`` (an ``accelerate.Accelerator``, before ``prepare``) build its DDP for one DiLoCo worker
    (see the module docstring): its DDP settings are kept, except ``broadcast_buffers`` and
    ``find_unused_parameters`` (off). The layout is built from ``ranks_per_worker`` (a collective: every rank calls
    this) unless given. Returns it, for ``eagerloco.DiLoCo(..., layout=...)`` (``None`` in one process). (Accelerate
    accepts only its own handler classes in ``Accelerator(kwargs_handlers=...)``, hence the replacement of
    ``accelerator.ddp_handler``, which its ``prepare_model`` reads.)"""
    old = accelerator.ddp_handler
    kwargs = DistributedDataParallelKwargs.to_kwargs(old) if old is not None else {}  # Accelerate's names
    for key in ("broadcast_buffers", "find_unused_parameters", "comm_hook", "comm_wrapper", "comm_state_option"):
        kwargs.pop(key, None)
    handler = worker_ddp_kwargs(layout if layout is not None else ranks_per_worker, **kwargs)
    accelerator.ddp_handler = handler
    return handler.layout


class DiLoCoCallback(TrainerCallback):
    """Turns ``transformers.Trainer`` into a DiLoCo worker: one outer ``step()`` after every optimizer step, and
    ``finalize()``/``consolidate()`` at the end of training (see the module docstring).

    Args:
        config: the outer loop's settings.
        ranks_per_worker: N, consecutive ranks per worker (DDP over them inside the worker).
        **diloco_kwargs: passed to :class:`eagerloco.DiLoCo` (``outer_optimizer``, ``fragments``, ``comm``, ...).
    """

    def __init__(self, config: DiLoCoConfig, *, ranks_per_worker: int = 1, **diloco_kwargs: Any) -> None:
        self.config = config.validate()
        self.ranks_per_worker = ranks_per_worker
        self.diloco_kwargs = diloco_kwargs
        self.layout: WorkerLayout | None = None
        self.loco: DiLoCo | None = None
        self._handler: WorkerDDPKwargs | None = None
        self._attached = False

    def attach(self, trainer: Trainer) -> DiLoCoCallback:
        """Confine the Trainer's DDP to this rank's worker and add this callback. A collective (it builds the
        layout): every rank calls it, after ``Trainer(...)`` and before ``trainer.train()``."""
        self.layout = confine_ddp(trainer.accelerator, self.ranks_per_worker)
        self._handler = trainer.accelerator.ddp_handler
        trainer.add_callback(self)
        self._attached = True
        return self

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not self._attached:
            raise RuntimeError(
                "DiLoCoCallback was passed to Trainer(callbacks=...) without attach(trainer): Trainer's DDP would "
                "average gradients across all workers; use DiLoCoCallback(...).attach(trainer)"
            )
        if model is None:
            raise RuntimeError("Trainer gave the callback no model")
        from eagerloco.engine.diloco import DiLoCo

        extra = dict(self.diloco_kwargs)
        if self.layout is None and "comm" not in extra:
            from eagerloco.comm import InProcessGroup

            extra["comm"] = InProcessGroup(1).communicator(0)  # one process: one worker
        self.loco = DiLoCo(model, optimizer, self.config, layout=self.layout, **extra)

    def on_step_end(self, args, state, control, **kwargs):
        assert self.loco is not None
        if self.loco.inner_step == 0 and dist.is_initialized() and dist.get_world_size() > 1:
            ddp = getattr(self._handler, "_registered_on", None)
            if ddp is None:
                raise RuntimeError(
                    "Trainer did not build its DDP through the worker's handler: gradients would be averaged across "
                    "workers (was the Accelerator re-created after attach()?)"
                )
        self.loco.step()

    def on_train_end(self, args, state, control, **kwargs):
        assert self.loco is not None
        self.loco.finalize()
        self.loco.consolidate()
