"""Workers that are groups of ranks: a plain ``nn.Module`` (a residual MLP classifier, not a transformer) trained
with DDP or FSDP2 inside each worker and eager updates across workers. Every rank runs this script.

    # one machine, 2 workers x 2 ranks over loopback
    torchrun --standalone --nproc-per-node 4 examples/scale_out.py --ranks-per-worker 2
    torchrun --standalone --nproc-per-node 4 examples/scale_out.py --ranks-per-worker 2 --parallel fsdp
    # GPUs: NCCL inside a worker, gloo across workers, outer state in CPU memory
    torchrun --standalone --nproc-per-node 4 examples/scale_out.py --ranks-per-worker 2 --device cuda \
        --inner-backend nccl --outer-backend gloo

    # 2 sites x N ranks: on every site, with SITE0 the address of site 0 (docs/scale-out.md)
    torchrun --nnodes 2 --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint SITE0:29400 --rdzv-id job1 \\
        examples/scale_out.py --ranks-per-worker N

torchrun gives the ranks of one node consecutive global ranks, so ``two_level_mesh(N)`` makes each node (site)
one worker. Each rank trains on its rows of its worker's batch (``layout.local_batch``), DDP/FSDP2 averages the
gradients inside the worker every step, and every H steps rank n of each worker exchanges its share of the
outer gradient with rank n of the other workers over the outer group. Lines that are eagerloco's are marked
``# <-``. With ``--results DIR`` every rank also writes ``DIR/rank-<global rank>.json`` (losses, a digest of the
final model, bytes sent, time blocked) for scripts and tests.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import eagerloco

DIM, CLASSES = 32, 8


class Block(nn.Module):
    """x + W₂·gelu(W₁·LayerNorm(x))."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class ResidualMLP(nn.Module):
    """in → ``depth`` residual blocks (an ``nn.ModuleList``: eagerloco's default fragments split it) → head."""

    def __init__(self, width: int = 64, depth: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(DIM, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def batch(rows: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels of a fixed random teacher, label = argmax(x·T): the same task on every worker."""
    teacher = torch.randn(DIM, CLASSES, generator=torch.Generator().manual_seed(4321))
    x = torch.randn(rows, DIM, generator=generator)
    return x, (x @ teacher).argmax(dim=1)


def evaluate(model: nn.Module) -> float:
    """Cross-entropy of ``model`` on 512 held-out rows (every rank of a worker must call it under FSDP2)."""
    x, y = batch(512, torch.Generator().manual_seed(99))
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y))


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensors' bytes in name order: equal on two ranks iff they hold bit-identical models."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks-per-worker", type=int, required=True, help="N: ranks per worker (one site)")
    parser.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp", help="inside a worker")
    parser.add_argument("--mode", default="eager", choices=eagerloco.MODES)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--sync-every", type=int, default=10, help="H")
    parser.add_argument("--batch", type=int, default=64, help="rows per worker and inner step (split over N)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: one GPU per rank")
    parser.add_argument("--outer-backend", choices=("gloo", "nccl"), default=None, help="default: the world's")
    parser.add_argument("--inner-backend", choices=("gloo", "nccl"), default=None, help="default: the world's")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="bound on every collective")
    parser.add_argument("--results", type=Path, default=None, help="write DIR/rank-<rank>.json on every rank")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    device = torch.device(args.device)
    if device.type == "cuda":  # one GPU per rank; the world gets both backends, each level picks its own below
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        device = torch.device("cuda", torch.cuda.current_device())
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=args.timeout_s))  # torchrun sets the environment
    layout = eagerloco.two_level_mesh(  # <- M = world / N workers of N ranks
        args.ranks_per_worker, outer_backend=args.outer_backend, inner_backend=args.inner_backend
    )
    torch.manual_seed(0)  # the same initial model everywhere (DDP and eagerloco also broadcast it)
    model = ResidualMLP(args.width).to(device)
    wrapped: nn.Module = model
    if args.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, process_group=layout.inner_group)  # <- DDP inside the worker
    else:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block, mesh=layout.inner_mesh)  # <- FSDP2 inside the worker
        fully_shard(model, mesh=layout.inner_mesh)
    inner = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # gloo across workers moves CPU tensors: the outer state then lives in CPU memory (on GPUs, NCCL may keep it).
    outer_device = "cpu" if layout.outer_backend == "gloo" else None
    config = eagerloco.DiLoCoConfig(mode=args.mode, sync_every=args.sync_every, outer_device=outer_device,
                                    collective_timeout_s=args.timeout_s)  # fmt: skip
    loco = eagerloco.DiLoCo(wrapped, inner, config, layout=layout)  # <- outer collectives on layout.outer_group
    initial = evaluate(wrapped)

    data = torch.Generator().manual_seed(1 + layout.worker)  # each worker its own shard of the data
    for _ in range(args.steps):
        x, y = batch(args.batch, data)
        x, y = layout.local_batch(x).to(device), layout.local_batch(y).to(device)  # <- this rank's rows
        nn.functional.cross_entropy(wrapped(x), y).backward()
        inner.step()
        inner.zero_grad()
        loco.step()  # <- on every rank, after every inner step
    loco.finalize()  # <-
    loco.consolidate()  # <-

    final = evaluate(wrapped)
    full = loco.full_outer_parameters()  # a collective inside the worker: every rank calls it
    stats = loco.stats
    print(f"{layout.describe()}: eval loss {initial:.3f} -> {final:.3f}, utilization {stats.utilization:.3f}, "
          f"blocked {stats.blocked_s:.3f} s, {stats.payload_bytes / 1e6:.3f} MB sent", flush=True)  # fmt: skip
    if args.results is not None:
        result = {
            "rank": dist.get_rank(),
            "worker": layout.worker,
            "inner_rank": layout.inner_rank,
            "site": os.environ.get("NETLAB_SITE"),
            "outer_backend": layout.outer_backend,
            "inner_backend": layout.inner_backend,
            "initial_loss": initial,
            "final_loss": final,
            "digest": digest(full),
            "params": sum(v.numel() for v in full.values()),
            "steps": args.steps,
            "outer_steps": stats.outer_steps,
            "payload_bytes": stats.payload_bytes,
            "blocked_s": stats.blocked_s,
            "utilization": stats.utilization,
        }
        args.results.mkdir(parents=True, exist_ok=True)
        path = args.results / f"rank-{result['rank']}.json"
        path.with_suffix(".tmp").write_text(json.dumps(result))
        path.with_suffix(".tmp").replace(path)  # readers never see half a file
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
