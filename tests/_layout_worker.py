"""One rank of a two-level layout for the scale-out tests: ``python _layout_worker.py RANK WORLD PORT N OUT``.

WORLD ranks over gloo on 127.0.0.1 form WORLD/N workers of N ranks (``eagerloco.two_level_mesh``). Every case of
:data:`CASES` trains :class:`_toy.TinyNet` (a plain MLP with residual blocks, not a transformer) with DDP and
with FSDP2 inside each worker, each rank on its rows of its worker's batch, and saves what the tests compare:
the full outer parameters after finalize/consolidate, and this rank's own φ and outer momentum before
finalize. :func:`train_case` with ``layout=None`` is the one-rank-per-worker reference on the same global data.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from _toy import TinyNet, init_gloo
from eagerloco import DiLoCo, DiLoCoConfig
from eagerloco.comm import Communicator

CASES = {
    "sync": DiLoCoConfig(mode="sync", sync_every=4, outer_momentum=0.9),
    "overlap_p2": DiLoCoConfig(mode="overlap", sync_every=4, num_fragments=2, overlap_steps=1, alpha=0.5),
    "delayed": DiLoCoConfig(mode="delayed", sync_every=4),
    "eager_k2_p2": DiLoCoConfig(mode="eager", sync_every=4, delay=2, num_fragments=2),
    "eager_cpu_outer": DiLoCoConfig(mode="eager", sync_every=4, outer_device="cpu"),
}
# Compression encodes each rank's part with its own per-block scales, so a sharded worker sends other bytes
# than one rank would: the layout keeps workers consistent, but the result is not the one-rank run's.
CONSISTENCY_ONLY = {"eager_int8": DiLoCoConfig(mode="eager", sync_every=4, compression="int8")}
PARALLEL = ("ddp", "fsdp")
STEPS = 14
BATCH = 16  # rows per worker and inner step


def worker_batches(worker: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Worker ``worker``'s batches (the same whatever its number of ranks)."""
    generator = torch.Generator().manual_seed(1000 + worker)
    w = torch.randn(4, 1, generator=generator)
    out = []
    for _ in range(steps):
        x = torch.randn(BATCH, 4, generator=generator)
        out.append((x, x @ w + 0.1 * worker))
    return out


def train_case(
    comm: Communicator | None, config: DiLoCoConfig, steps: int, parallel: str = "ddp", layout=None
) -> dict[str, object]:
    """Train TinyNet with SGD inner steps; with a layout, DDP or FSDP2 inside the worker (``parallel``)."""
    model: nn.Module = TinyNet()
    wrapped: nn.Module = model
    if layout is not None and parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, process_group=layout.inner_group)
    elif layout is not None and parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block, mesh=layout.inner_mesh)
        fully_shard(model, mesh=layout.inner_mesh)
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    loco = DiLoCo(wrapped, inner, config, comm=comm, layout=layout)
    worker = layout.worker if layout is not None else comm.rank
    for x, y in worker_batches(worker, steps):
        if layout is not None:
            x, y = layout.local_batch(x), layout.local_batch(y)
        loss = (wrapped(x) - y).pow(2).mean()
        loss.backward()
        inner.step()
        inner.zero_grad()
        loco.step()
    own = {
        "phi": [state.phi.clone() for state in loco.states],
        "momentum": [
            state.outer_optimizer.state[state.phi].get("momentum_buffer", torch.zeros(0)).clone()
            for state in loco.states
        ],
    }
    loco.finalize()
    loco.consolidate()
    full = {name.removeprefix("module."): value.clone() for name, value in loco.full_outer_parameters().items()}
    # θ equals φ after finalize, on every rank of the worker (the last write all-gathered the replicas).
    theta = {}
    for name, p in model.named_parameters():
        theta[name] = p.full_tensor().detach().clone() if hasattr(p, "full_tensor") else p.detach().clone()
    return {"full": full, "theta": theta, **own, "payload_bytes": loco.stats.payload_bytes}


def main() -> None:
    rank, world, port, ranks_per_worker = (int(a) for a in sys.argv[1:5])
    out = sys.argv[5]
    init_gloo(rank, world, port)
    import eagerloco

    layout = eagerloco.two_level_mesh(ranks_per_worker, outer_backend="gloo")
    saved: dict[str, object] = {
        "worker": layout.worker,
        "inner_rank": layout.inner_rank,
        "outer_ranks": layout.peer_ranks,
        "inner_ranks": layout.worker_ranks,
    }
    comm = layout.outer_comm(timeout=60)
    for parallel in PARALLEL:
        for name, config in {**CASES, **CONSISTENCY_ONLY}.items():
            saved[f"{parallel}/{name}"] = train_case(comm, config, STEPS, parallel, layout)
    torch.save(saved, out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
