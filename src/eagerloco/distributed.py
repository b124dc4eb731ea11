"""Two-level layouts: DiLoCo workers that are groups of ranks (DDP or FSDP2 inside, the outer step across).

Real deployments run one DiLoCo worker per site (datacenter); a worker is a group of N ranks with fast links
between them, training with DDP or FSDP2 (``torch.distributed.fsdp.fully_shard``) every inner step. Only the
outer step crosses the slow link between sites, and it runs *rank by rank*: rank n of every worker exchanges
its part of the outer gradient with rank n of the other workers, on a process group of its own. The W = M·N
ranks form a 2-D :class:`~torch.distributed.device_mesh.DeviceMesh` with dimensions ``("outer", "inner")``::

                 inner (fast, inside a site: DDP / FSDP2 collectives every inner step)
               ┌──────────────────────────────────────────────┐
    worker 0   │ rank 0      rank 1      ...   rank N-1       │   site A
               └──┬───────────┬─────────────────┬─────────────┘
                  │ outer     │ outer           │ outer         (slow, across sites: one group per
                  │ group 0   │ group 1         │ group N-1      shard position, the outer step only)
               ┌──┴───────────┴─────────────────┴─────────────┐
    worker 1   │ rank N      rank N+1    ...   rank 2N-1      │   site B
               └──────────────────────────────────────────────┘

Usage (every rank runs the same code, e.g. under ``torchrun``)::

    import torch.distributed as dist
    import eagerloco

    dist.init_process_group("cpu:gloo,cuda:nccl")               # or "gloo" on CPU
    layout = eagerloco.two_level_mesh(ranks_per_worker=4, outer_backend="gloo")
    model = fully_shard(model, mesh=layout.inner_mesh)           # FSDP2 inside the worker, or
    # model = DDP(model, process_group=layout.inner_group)       # DDP inside the worker
    inner = torch.optim.AdamW(model.parameters(), lr=3e-4)
    loco = eagerloco.DiLoCo(model, inner, config, layout=layout)  # the outer group comes from the layout

Each rank owns, in the outer step, its FSDP2 shards (``DTensor.to_local()``), or with DDP 1/N of every
fragment's replicated parameters (see :mod:`eagerloco.engine.sharding`); the outer state (φ and the outer
optimizer's momentum) of a worker is thus spread over its N ranks, and each rank sends 1/N of the worker's
outer gradient over its own connection.

The outer group may use another backend than the inner one: gloo across sites with the outer state in CPU
memory (``DiLoCoConfig(outer_device="cpu")``) while NCCL runs inside each site. Launch commands for real
clusters and a one-machine reproduction with network namespaces: ``docs/scale-out.md``.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from eagerloco.comm.torch_dist import TorchDistributedCommunicator

OUTER = "outer"
"""Name of the mesh dimension across workers (sites)."""
INNER = "inner"
"""Name of the mesh dimension inside a worker."""

_BACKENDS = ("gloo", "nccl")


@dataclass(frozen=True)
class WorkerLayout:
    """This rank's place in a two-level layout of M workers x N ranks (see the module docstring).

    Build it with :func:`two_level_mesh`. Pass :attr:`inner_mesh` to ``fully_shard`` or :attr:`inner_group` to
    ``DistributedDataParallel``, and the layout itself to :class:`eagerloco.DiLoCo` (``layout=``), which then
    runs its outer collectives on :attr:`outer_group` and operates on this rank's share of the parameters.
    """

    mesh: DeviceMesh
    """The 2-D mesh, dimensions ``("outer", "inner")``, shape (M, N)."""
    worker: int
    """m: this rank's worker (its coordinate along "outer"); also its rank in :attr:`outer_group`."""
    inner_rank: int
    """n: this rank's position inside its worker (its coordinate along "inner"); also its rank in
    :attr:`inner_group`. Rank n of every worker holds the same shard position of the model."""
    num_workers: int
    """M."""
    ranks_per_worker: int
    """N."""
    outer_backend: str
    """Backend of the outer groups ('gloo' or 'nccl')."""
    inner_backend: str
    """Backend of the inner groups."""

    @property
    def inner_mesh(self) -> DeviceMesh:
        """The 1-D mesh of this worker's ranks: ``fully_shard(model, mesh=layout.inner_mesh)``."""
        return self.mesh[INNER]

    @property
    def outer_mesh(self) -> DeviceMesh:
        """The 1-D mesh of this shard position across workers."""
        return self.mesh[OUTER]

    @property
    def inner_group(self) -> dist.ProcessGroup:
        """The process group of this worker's ranks: ``DDP(model, process_group=layout.inner_group)``."""
        return self.mesh.get_group(INNER)

    @property
    def outer_group(self) -> dist.ProcessGroup:
        """The process group of rank n of every worker: the outer collectives of this rank run on it."""
        return self.mesh.get_group(OUTER)

    @property
    def worker_ranks(self) -> list[int]:
        """Global ranks of this worker, in inner-rank order."""
        return [int(r) for r in self.mesh.mesh[self.worker].tolist()]

    @property
    def peer_ranks(self) -> list[int]:
        """Global ranks of this shard position in every worker, in worker order (the outer group)."""
        return [int(r) for r in self.mesh.mesh[:, self.inner_rank].tolist()]

    def outer_comm(self, timeout: float | None = None) -> TorchDistributedCommunicator:
        """A communicator over :attr:`outer_group` (rank = worker index, world size = M), for DiLoCo's ``comm=``
        (wrap it in :class:`eagerloco.EmulatedLink` to emulate a slow link)."""
        return TorchDistributedCommunicator(group=self.outer_group, timeout=timeout)

    def local_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of its worker's batch: rows [n·B/N, (n+1)·B/N) of a batch of B rows (dimension 0).

        With DDP or FSDP averaging gradients over the worker's N ranks, N ranks that each take their rows of
        the worker's batch compute the gradient of the whole batch, as one rank per worker would.
        """
        rows = batch.shape[0]
        if rows % self.ranks_per_worker != 0:
            raise ValueError(
                f"a worker's batch of {rows} rows does not split over ranks_per_worker={self.ranks_per_worker} "
                "ranks: the batch size must be a multiple of the ranks per worker"
            )
        size = rows // self.ranks_per_worker
        return batch[self.inner_rank * size : (self.inner_rank + 1) * size]

    def describe(self) -> str:
        return (
            f"worker {self.worker}/{self.num_workers}, inner rank {self.inner_rank}/{self.ranks_per_worker} "
            f"(outer {self.outer_backend}, inner {self.inner_backend})"
        )


def two_level_mesh(
    ranks_per_worker: int,
    *,
    device_type: str | None = None,
    outer_backend: str | None = None,
    inner_backend: str | None = None,
    site: Hashable | None = None,
) -> WorkerLayout:
    """Split the world into workers of ``ranks_per_worker`` ranks; return this rank's :class:`WorkerLayout`.

    A collective: every rank of the world must call it, with the same arguments (except ``site``), after
    ``torch.distributed.init_process_group``.

    Args:
        ranks_per_worker: N, the ranks of one worker (one site); must divide the world size W. M = W / N.
        device_type: the mesh's device type, 'cpu' or 'cuda'. Default: 'cuda' when the world's backend
            includes NCCL, else 'cpu'.
        outer_backend: backend of the groups across workers: 'gloo' (CPU tensors: the outer state must then
            live in CPU memory, ``DiLoCoConfig(outer_device="cpu")``) or 'nccl'. Default: the world's.
        inner_backend: backend of the groups inside a worker. Default: the world's.
        site: which worker this rank belongs to, as any picklable label (the site's name, or
            ``socket.gethostname()`` when each worker is one machine). ``None``: consecutive global ranks form a
            worker (ranks [m·N, (m+1)·N) are worker m), which is what ``torchrun --nproc-per-node N`` with one
            node per site gives. With labels, the ranks that share a label form a worker whatever their global
            ranks (workers ordered by their lowest global rank, ranks inside by global rank); every label must
            be held by exactly N ranks.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "two_level_mesh needs torch.distributed initialised: call torch.distributed.init_process_group(...) "
            "first (torchrun sets the environment)"
        )
    if isinstance(ranks_per_worker, bool) or not isinstance(ranks_per_worker, int) or ranks_per_worker < 1:
        raise ValueError(f"ranks_per_worker={ranks_per_worker!r}: must be an integer >= 1")
    world = dist.get_world_size()
    if world % ranks_per_worker != 0:
        raise ValueError(
            f"ranks_per_worker={ranks_per_worker} does not divide the world size {world}: every worker must have "
            "the same number of ranks"
        )
    world_backend = str(dist.get_backend())
    if device_type is None:
        device_type = "cuda" if "nccl" in world_backend else "cpu"
    for name, value in (("outer_backend", outer_backend), ("inner_backend", inner_backend)):
        if value is not None and value not in _BACKENDS:
            raise ValueError(f"{name}={value!r}: must be one of {', '.join(_BACKENDS)} (or None: the world's)")
        if value == "nccl" and device_type != "cuda":
            raise ValueError(f"{name}='nccl' needs device_type='cuda' (NCCL moves GPU tensors only)")

    num_workers = world // ranks_per_worker
    if site is None:
        grid = torch.arange(world).view(num_workers, ranks_per_worker)
    else:
        grid = _grid_from_sites(site, ranks_per_worker)
    # Every rank builds the same mesh: DeviceMesh creates one group per row and per column, collectively and
    # in the same order on every rank.
    mesh = DeviceMesh(
        device_type,
        grid,
        mesh_dim_names=(OUTER, INNER),
        backend_override=((outer_backend, None), (inner_backend, None)),
    )
    worker = mesh.get_local_rank(OUTER)
    inner_rank = mesh.get_local_rank(INNER)
    return WorkerLayout(
        mesh=mesh,
        worker=worker,
        inner_rank=inner_rank,
        num_workers=num_workers,
        ranks_per_worker=ranks_per_worker,
        outer_backend=str(dist.get_backend(mesh.get_group(OUTER))),
        inner_backend=str(dist.get_backend(mesh.get_group(INNER))),
    )


def _grid_from_sites(site: Hashable, ranks_per_worker: int) -> torch.Tensor:
    """The (M, N) rank grid in which ranks with the same site label form a row."""
    labels: list[Hashable] = [None] * dist.get_world_size()
    dist.all_gather_object(labels, site)
    rows: dict[Hashable, list[int]] = {}
    for rank, label in enumerate(labels):
        rows.setdefault(label, []).append(rank)
    wrong = {label: len(ranks) for label, ranks in rows.items() if len(ranks) != ranks_per_worker}
    if wrong:
        shown = ", ".join(f"{label!r}: {count} ranks" for label, count in wrong.items())
        raise ValueError(
            f"every site must hold ranks_per_worker={ranks_per_worker} ranks, but {shown} (labels seen: "
            f"{sorted(map(repr, rows))})"
        )
    return torch.tensor(sorted(rows.values(), key=lambda ranks: ranks[0]))
