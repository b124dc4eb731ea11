"""This rank's share of a fragment in the outer step, when a worker may be a group of ranks.

One rank per worker (no layout): the rank owns every element of the fragment. θ is read into one flat fp32
staging buffer, φ has the same length and layout, and writing φ back is one ``torch._foreach_copy_``: the
engine's original path, bitwise unchanged.

A worker of N ranks (a :class:`eagerloco.distributed.WorkerLayout`): rank n of worker m exchanges only *its own*
elements with rank n of the other workers, over its outer group. What it owns depends on how the parameter is
held inside the worker:

* **sharded** -- a ``DTensor`` sharded over the worker's inner mesh (FSDP2's ``fully_shard``): the rank holds a
  local shard (``p.to_local()``) that no other rank of the worker holds, and owns all of it. Nothing is
  exchanged inside the worker: FSDP2 all-gathers the shards itself at the next forward.
* **replicated** -- a plain tensor (DDP), or a replicated ``DTensor``: every rank of the worker holds the same
  full tensor. The fragment's replicated elements, concatenated and padded to N·c (c = ⌈R/N⌉), are cut into N
  chunks of c; rank n owns chunk n (the padding is never part of φ). After the outer step writes the owned
  chunk, one all-gather on the inner group gives every rank the whole of it again.

The staging buffer (flat fp32 on the model's device) holds the sharded local tensors first, then the replicated
ones, each in fragment order: ``[ sharded (S) | replicated (R, padded to N·c) ]``. This rank's φ is the
concatenation of its owned ranges: ``staging[0:S]`` and ``staging[S + n·c : S + n·c + r_n]`` with
r_n = clamp(R − n·c, 0, c). Every worker builds the same layout (the engine compares it at start), so the
elements of φ on rank n of worker m and on rank n of worker m' are the same elements of the model, and the
outer optimizer -- elementwise, like SGD with momentum -- computes exactly what one rank per worker computes.

Collective order (deadlocks): :meth:`FragmentView.write_theta` runs one blocking all-gather on the inner group
when the fragment has sliced replicated elements. The engine calls it at the same inner step, fragment by
fragment, on every rank of a worker (every rank runs the same schedule), after the outer collectives it waits
for; the inner collectives of DDP/FSDP happen between inner steps, never during the outer step, so the inner
group sees the same sequence of collectives on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from eagerloco.engine.errors import ModelMismatch

if TYPE_CHECKING:
    from eagerloco.distributed import WorkerLayout
    from eagerloco.engine.fragments import Fragment

try:  # torch >= 2.4 ships DTensor publicly; older builds have no FSDP2 either
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch without distributed tensors
    DTensor = None  # type: ignore[assignment,misc]
    Replicate = Shard = None  # type: ignore[assignment,misc]


def _all_gather_flat(output: torch.Tensor, mine: torch.Tensor, group: dist.ProcessGroup) -> None:
    """``output`` (N·c elements) ← the N ranks' ``mine`` (c elements each) in rank order: one blocking collective
    on ``group`` (``all_gather_single`` where torch has it, ``all_gather_into_tensor`` before, which torch 2.13
    deprecates)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, mine, group=group)


class LayoutError(ValueError):
    """The model's parameters are held in a way that the layout cannot express (the message says how)."""


def is_dtensor(p: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(p, DTensor)


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds for ``p``: the local shard of a DTensor, else ``p`` itself (detached).

    Always called afresh, never cached: FSDP2 re-points a sharded parameter's local tensor at its first forward
    (``reset_sharded_param`` pads it), so a tensor taken before that would no longer be the parameter's storage.
    """
    if is_dtensor(p):
        return p.to_local().detach()
    return p.detach()


def local_shape(p: torch.Tensor) -> tuple[int, ...]:
    """Shape of :func:`local_tensor` (the global shape for plain tensors)."""
    return tuple(p.to_local().shape) if is_dtensor(p) else tuple(p.shape)


def _placement_kind(name: str, p: torch.Tensor, layout: WorkerLayout | None) -> str:
    """'sharded' or 'replicated' (see the module docstring); raise :class:`LayoutError` if neither applies."""
    if not is_dtensor(p):
        return "replicated"
    if layout is None:
        raise LayoutError(
            f"parameter {name!r} is a DTensor (FSDP2 or tensor parallel) but DiLoCo was given no layout: pass "
            "layout=eagerloco.two_level_mesh(...) and shard the model over layout.inner_mesh, so that the outer "
            "step knows which ranks hold which shard"
        )
    mesh_ranks = [int(r) for r in p.device_mesh.mesh.flatten().tolist()]
    if p.device_mesh.ndim != 1 or mesh_ranks != layout.worker_ranks:
        raise LayoutError(
            f"parameter {name!r} is a DTensor on mesh {mesh_ranks} (ndim {p.device_mesh.ndim}), but this worker's "
            f"inner mesh is {layout.worker_ranks}: shard the model with fully_shard(model, mesh=layout.inner_mesh) "
            "(2-D inner meshes -- HSDP, tensor parallel -- are not supported)"
        )
    placement = p.placements[0]
    if isinstance(placement, Shard):
        return "sharded"
    if isinstance(placement, Replicate):
        return "replicated"
    raise LayoutError(f"parameter {name!r} has placement {placement}: only Shard and Replicate parameters can sync")


class FragmentView:
    """How this rank reads and writes one fragment's parameters in the outer step (see the module docstring).

    Args:
        fragment: the fragment (its parameters, as the model registers them: plain tensors or DTensors).
        layout: this rank's place in a two-level layout, or ``None`` for one rank per worker.

    Attributes:
        staging: flat fp32 buffer on the model's device, ``[sharded | replicated padded]``.
        staging_views: one view of ``staging`` per parameter (fragment order), shaped like its local tensor.
        numel: elements this rank owns in the outer step: the length of its φ.
    """

    def __init__(self, fragment: Fragment, layout: WorkerLayout | None = None) -> None:
        self.fragment = fragment
        self.layout = layout
        self.inner_size = 1 if layout is None else layout.ranks_per_worker
        self.inner_rank = 0 if layout is None else layout.inner_rank
        params = fragment.params
        self.kinds = [_placement_kind(n, p, layout) for n, p in zip(fragment.names, params)]
        self.shapes = [local_shape(p) for p in params]
        sizes = [torch.Size(s).numel() for s in self.shapes]
        self.sharded_numel = sum(n for n, k in zip(sizes, self.kinds) if k == "sharded")
        self.replicated_numel = sum(n for n, k in zip(sizes, self.kinds) if k == "replicated")
        s, r, n_ranks = self.sharded_numel, self.replicated_numel, self.inner_size
        self.chunk = -(-r // n_ranks)  # c = ⌈R/N⌉
        devices = {local_tensor(p).device for p in params}
        device = next(iter(devices))
        self.staging = torch.zeros(s + self.chunk * n_ranks, dtype=torch.float32, device=device)
        # Offsets: sharded parameters first, then replicated ones, each in fragment order.
        offsets: list[int] = []
        cursor = {"sharded": 0, "replicated": s}
        for size, kind in zip(sizes, self.kinds):
            offsets.append(cursor[kind])
            cursor[kind] += size
        self.staging_views = [
            self.staging[o : o + size].view(shape) for o, size, shape in zip(offsets, sizes, self.shapes)
        ]
        self._offsets = offsets
        self._sizes = sizes
        # This rank's owned ranges of staging, in φ order: (start, length).
        self.sliced = n_ranks > 1 and r > 0
        if self.sliced:
            start = s + self.inner_rank * self.chunk
            owned_r = max(0, min(self.chunk, r - self.inner_rank * self.chunk))
            ranges = [(0, s), (start, owned_r)]
        else:
            ranges = [(0, s + r)]
        self.ranges = [(a, n) for a, n in ranges if n > 0] or [(0, 0)]
        self.numel = sum(n for _, n in self.ranges)

    # ------------------------------------------------------------------ θ ↔ the flat buffers

    def read_theta(self) -> torch.Tensor:
        """θ's owned elements, flat fp32 (a view of :attr:`staging` when they are one range, else a copy): valid
        until the next read or write; modify it only to hand it to :meth:`write_theta`."""
        torch._foreach_copy_(self.staging_views, [local_tensor(p) for p in self.fragment.params])
        if len(self.ranges) == 1:
            a, n = self.ranges[0]
            return self.staging if (a, n) == (0, self.staging.numel()) else self.staging[a : a + n]
        return torch.cat([self.staging[a : a + n] for a, n in self.ranges])

    def write_theta(self, values: torch.Tensor) -> None:
        """θ ← ``values`` on the owned elements (flat, φ's layout; any device), then restore the worker's replicas
        (inner all-gather, blocking, when replicated elements are sliced) and copy everything into the parameters.
        Moves values only: the algorithm's arithmetic (θ ← α·θ + (1 − α)·φ) is the strategy's, on the tensor
        :meth:`read_theta` returned."""
        params = [local_tensor(p) for p in self.fragment.params]
        with torch.no_grad():
            # Every element of the staging buffer that reaches a parameter is written here: the owned ranges from
            # ``values``, the others (sliced replicas only) by the all-gather below, which overwrites the whole
            # replicated part, padding included, with the owners' values.
            offset = 0
            for a, n in self.ranges:
                target = self.staging[a : a + n]
                source = values[offset : offset + n]
                if source.device != target.device or source.data_ptr() != target.data_ptr():
                    target.copy_(source)  # (``values`` may be read_theta()'s view of this very range)
                offset += n
            if self.sliced:
                assert self.layout is not None
                s, c = self.sharded_numel, self.chunk
                mine = self.staging[s + self.inner_rank * c : s + (self.inner_rank + 1) * c].clone()
                # Invariant: the replicas of a worker hold the same θ. This rank only computed its own chunk of
                # φ; without this all-gather the other chunks would keep this rank's local θ, every rank of the
                # worker would hold a different model, and nothing repairs it later (DDP broadcasts parameters
                # once, at construction, then only averages gradients). Every rank of the worker reaches this call
                # at the same inner step for the same fragment (see the module docstring), so the inner group's
                # collectives pair up.
                _all_gather_flat(self.staging[s : s + c * self.inner_size], mine, self.layout.inner_group)
            torch._foreach_copy_(params, self.staging_views)

    # ------------------------------------------------------------------ φ in the model's shapes

    def local_values(self, phi: torch.Tensor) -> list[torch.Tensor]:
        """φ for every parameter (fragment order) in the form this rank holds it: the local shard of a sharded
        parameter, the full tensor of a replicated one.

        When this rank owns every element it holds (one rank per worker, or FSDP2 only): views into ``phi``, on
        the outer device. Otherwise (sliced replicas): copies on the model's device, gathered with one
        collective on the worker's inner group, which every rank of the worker must call."""
        if not self.sliced:
            return [phi[o : o + n].view(shape) for o, n, shape in zip(self._offsets, self._sizes, self.shapes)]
        assert self.layout is not None
        s, c = self.sharded_numel, self.chunk
        # On the model's device: the inner group's backend moves tensors of that device (NCCL: GPU only).
        buffer = torch.zeros_like(self.staging)
        buffer[:s].copy_(phi[:s])
        mine = torch.zeros(c, dtype=buffer.dtype, device=buffer.device)
        mine[: phi.numel() - s].copy_(phi[s:])  # φ = [sharded (S) | the owned replicated chunk (r_n ≤ c)]
        _all_gather_flat(buffer[s:], mine, self.layout.inner_group)
        return [buffer[o : o + n].view(shape) for o, n, shape in zip(self._offsets, self._sizes, self.shapes)]

    def full_values(self, phi: torch.Tensor) -> list[torch.Tensor]:
        """φ for every parameter as the full (unsharded) tensor, fragment order. A collective on the worker's
        inner group when any parameter is sharded or sliced (every rank of the worker must call it)."""
        values = self.local_values(phi)
        out = []
        for p, value, kind in zip(self.fragment.params, values, self.kinds):
            if kind == "sharded":
                on_mesh = value.to(p.device_mesh.device_type)
                full = DTensor.from_local(on_mesh, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                value = full.full_tensor().to(phi.device)
            out.append(value)
        return out

    def fingerprint(self) -> list[tuple[str, tuple[int, ...], str, str]]:
        """(name, local shape, dtype, kind) per parameter: equal on rank n of every worker when the models and
        layouts agree."""
        return [
            (name, shape, str(p.dtype), kind)
            for name, p, shape, kind in zip(self.fragment.names, self.fragment.params, self.shapes, self.kinds)
        ]


def check_replicas_agree(views: Sequence[FragmentView], layout: WorkerLayout | None) -> None:
    """Every rank of a worker must hold the same replicated parameters (DDP replicas); compare a checksum of
    them across the worker's inner group once, at start, so that a model built differently per rank (and not
    wrapped in DDP) fails loudly instead of silently mixing replicas. A collective on the inner group."""
    if layout is None or layout.ranks_per_worker == 1:
        return
    sums = []
    for view in views:
        view.read_theta()
        replicated = view.staging[view.sharded_numel : view.sharded_numel + view.replicated_numel].double()
        sums.append((float(replicated.sum()), float(replicated.abs().sum())))
    everyone: list[object] = [None] * layout.ranks_per_worker
    dist.all_gather_object(everyone, sums, group=layout.inner_group)
    for inner_rank, other in enumerate(everyone):
        if other != sums:
            raise ModelMismatch(
                f"worker {layout.worker}: inner ranks {layout.inner_rank} and {inner_rank} hold different values of "
                "the parameters that are plain tensors (replicas): wrap the model in "
                "DistributedDataParallel(model, process_group=layout.inner_group) before DiLoCo, or shard it with "
                "fully_shard(model, mesh=layout.inner_mesh)"
            )
