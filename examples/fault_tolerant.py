"""A fault-tolerant run, one command per site: workers fail and join without stopping the others.

On the machine that stays up (it hosts torchft's lighthouse and the coordination store)::

    python -m eagerloco.ft.lighthouse --host 10.0.0.1 --min-replicas 2

At every site (a restarted site runs the same command again: it rejoins from a live peer's state)::

    python examples/fault_tolerant.py --lighthouse http://10.0.0.1:29510 --store 10.0.0.1:29511 \
        --replica-id site-a --host 10.0.0.2 --mode eager --steps 600

Set GLOO_SOCKET_IFNAME to the interface that reaches the other sites. See docs/fault-tolerance.md.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from eagerloco import DiLoCoConfig
from eagerloco.ft import FaultTolerance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lighthouse", required=True, help="http://HOST:PORT of the lighthouse")
    parser.add_argument("--store", required=True, help="HOST:PORT of the coordination store")
    parser.add_argument("--replica-id", required=True, help="this site's name")
    parser.add_argument("--host", default="127.0.0.1", help="this site's address, as the others reach it")
    parser.add_argument("--mode", default="eager", choices=["sync", "overlap", "delayed", "eager"])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--sync-every", type=int, default=30)
    parser.add_argument("--timeout-s", type=float, default=60.0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    torch.manual_seed(0)  # the same model everywhere (the first quorum also hands every worker one φ_0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ft = FaultTolerance(args.lighthouse, args.store, args.replica_id, host=args.host, timeout_s=args.timeout_s)
    loco = ft.diloco(model, inner, DiLoCoConfig(mode=args.mode, sync_every=args.sync_every,
                                                collective_timeout_s=args.timeout_s))  # fmt: skip
    print(f"{args.replica_id}: joined at inner step {loco.inner_step} ({ft.comm.world_size} workers)", flush=True)
    data = torch.Generator().manual_seed(hash(args.replica_id) % 2**31)  # this site's own data shard
    target = torch.randn(16, 1, generator=torch.Generator().manual_seed(1))
    while loco.inner_step < args.steps:
        x = torch.randn(32, 16, generator=data)
        loss = (model(x) - x @ target).pow(2).mean()
        loss.backward()
        inner.step()
        inner.zero_grad()
        loco.step()
        if loco.inner_step % args.sync_every == 0:
            record = ft.stats.records[-1]
            print(f"{args.replica_id}: step {loco.inner_step} loss {loss.item():.4f} workers {record.members} "
                  f"dropped {loco.stats.dropped_averages}", flush=True)  # fmt: skip
    ft.finish(loco)  # finalize, then (eager) the average of φ over the workers still alive
    print(f"{args.replica_id}: done; {ft.stats.to_dict() | {'records': len(ft.stats.records)}}", flush=True)
    ft.shutdown()


if __name__ == "__main__":
    main()
