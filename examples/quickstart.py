"""Eager updates on any model in a few lines: M workers simulated in one process, or real processes via torchrun.

    python examples/quickstart.py                              # 2 simulated workers (threads), eager mode
    python examples/quickstart.py --mode sync --workers 3
    torchrun --nproc-per-node 2 examples/quickstart.py --torchrun   # 2 real processes over gloo

Each worker fits a small regression MLP (noisy y = tanh(x·w/2)) on its own data shard; eagerloco runs the outer
loop. Expect sync < eager < delayed in final error, as in the eager-updates paper. The only lines that
are eagerloco's are marked ``# <-``.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import eagerloco


def train_one_worker(comm, args) -> str:
    torch.manual_seed(0)  # the same initial model on every worker (eagerloco also broadcasts worker 0's)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    inner = torch.optim.AdamW(model.parameters(), lr=3e-3)
    config = eagerloco.DiLoCoConfig(mode=args.mode, sync_every=args.sync_every, outer_lr=0.7)  # <-
    loco = eagerloco.DiLoCo(model, inner, config, comm=comm)  # <-

    data = torch.Generator().manual_seed(1 + comm.rank)  # each worker its own shard
    w_true = torch.randn(16, 1, generator=torch.Generator().manual_seed(42))
    for _ in range(args.steps):
        x = torch.randn(64, 16, generator=data)
        y = torch.tanh(x @ w_true / 2) + 0.1 * torch.randn(64, 1, generator=data)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        inner.step()
        inner.zero_grad()
        loco.step()  # <- after every inner step
    loco.finalize()  # <- apply what is still in flight
    loco.consolidate()  # <- eager: average the workers' outer parameters into one model

    x = torch.randn(1024, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        final = nn.functional.mse_loss(model(x), torch.tanh(x @ w_true / 2)).item()
    stats = loco.stats
    return (f"worker {comm.rank}: eval mse {final:.4f}, compute utilization {stats.utilization:.3f}, "
            f"blocked {stats.blocked_s:.3f} s, {stats.payload_bytes / 1e6:.2f} MB sent")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="eager", choices=eagerloco.MODES)
    parser.add_argument("--workers", type=int, default=2, help="simulated workers")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--sync-every", type=int, default=30, help="H")
    parser.add_argument("--torchrun", action="store_true", help="run as one rank of a torchrun job")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.torchrun:
        torch.distributed.init_process_group("gloo")
        print(train_one_worker(eagerloco.TorchDistributedCommunicator(), args))  # <- the world group
        torch.distributed.destroy_process_group()
    else:
        group = eagerloco.InProcessGroup(args.workers)  # <- M workers as threads of this process
        lines = eagerloco.run_workers(group, lambda comm: train_one_worker(comm, args))
        print("\n".join(lines))  # in rank order, once the worker threads are done


if __name__ == "__main__":
    main()
