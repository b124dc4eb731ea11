#!/usr/bin/env python3
"""Time gloo all-reduces of a float32 tensor (or all-gathers of a byte payload); meant to run under torchrun, one
process per lab site.

Each rank all-reduces (sum) a tensor of ``--size-mb`` MB ``--iters`` times after one warm-up (``--op all_gather``:
gloo's all-gather of ``--size-mb`` MB of uint8 from every rank; ``--op exchange``: the same bytes by eagerloco's
receive-first exchange, what its gloo communicator runs to gather the compressed reducer's encoded outer
gradients), checks the result, and prints one line ``PROBE {json}`` with:

* ``sec_median`` / ``sec_min`` / ``sec_all``: seconds per collective (each timed after a barrier; with
  ``--idle-s S`` every rank first sleeps S seconds, as a training job's inner phase leaves the link idle);
* ``algbw_mbit``: tensor bits / ``sec_median`` (the "effective rate" of one all-reduce);
* ``tx_bytes_per_iter`` / ``rx_bytes_per_iter``: bytes the site interface (``GLOO_SOCKET_IFNAME``) sent and
  received per timed all-reduce, from ``/proc/net/dev`` inside this process's network namespace (barriers
  included, a few hundred bytes);
* ``wire_tx_mbit``: ``tx_bytes_per_iter`` · 8 / ``sec_median``, the rate at which this rank's link carried
  its share of the all-reduce.

Usage (what ``netlab.py probe`` runs on every site)::

    torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint [fd00:e1::1]:29400 \\
        --rdzv-conf is_host=1 --local-addr fd00:e1::1 benchmarks/allreduce_probe.py --size-mb 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from netlab import PROBE_OPS  # this script's folder is on sys.path when run

from eagerloco.comm.torch_dist import EXCHANGE_TAG, exchange_all_gather


def iface_bytes(iface: str) -> tuple[int, int]:
    """(rx_bytes, tx_bytes) of ``iface`` from ``/proc/net/dev`` in this process's namespace; (0, 0) if absent."""
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        name, _, rest = line.partition(":")
        if name.strip() == iface:
            f = rest.split()
            return int(f[0]), int(f[8])
    return 0, 0


def main() -> None:
    """Parse arguments, run the timed all-reduces and print the report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mb", type=float, default=4.0, help="tensor size in MB (10^6 bytes)")
    ap.add_argument("--iters", type=int, default=5, help="timed all-reduces after one warm-up")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="process-group timeout")
    ap.add_argument("--op", choices=PROBE_OPS, default="all_reduce", help="the collective timed (default all_reduce)")
    ap.add_argument("--idle-s", type=float, default=0.0, help="seconds every rank sleeps before each collective")
    args = ap.parse_args()
    if not args.idle_s >= 0:
        ap.error(f"--idle-s {args.idle_s:g}: the idle time must be >= 0 s")

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    iface = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
    if args.op == "all_reduce":
        numel = max(1, int(args.size_mb * 1e6) // 4)
        t = torch.empty(numel, dtype=torch.float32)
        expected = float(sum(range(1, world + 1)))
    else:  # every rank's payload holds its rank + 1; row r of the gathered buffer must be rank r's
        numel = max(1, int(args.size_mb * 1e6))
        t = torch.empty(numel, dtype=torch.uint8)
        gathered = torch.empty((world, numel), dtype=torch.uint8)

    def collective() -> None:
        if args.op == "all_reduce":
            dist.all_reduce(t)
            if not (float(t[0]) == expected and float(t[-1]) == expected):
                raise RuntimeError(f"wrong all-reduce result {float(t[0])} != {expected}")
        else:
            if args.op == "exchange":  # what eagerloco's gloo communicator runs for an all-gather
                exchange_all_gather(
                    gathered,
                    t,
                    rank,
                    lambda buffer, peer: dist.irecv(buffer, src=peer, tag=EXCHANGE_TAG),
                    lambda payload, peer: dist.isend(payload, dst=peer, tag=EXCHANGE_TAG),
                ).wait()
            else:
                dist.all_gather_into_tensor(gathered.view(-1), t)
            rows = [(int(gathered[r, 0]), int(gathered[r, -1])) for r in range(world)]
            if rows != [(r + 1, r + 1) for r in range(world)]:
                raise RuntimeError(f"wrong all-gather result: first/last byte per row {rows}")

    def one() -> float:
        t.fill_(rank + 1)
        if args.idle_s:
            time.sleep(args.idle_s)
        dist.barrier()
        t0 = time.perf_counter()
        collective()
        return time.perf_counter() - t0

    one()  # warm-up: connects every pair of ranks
    rx0, tx0 = iface_bytes(iface)
    secs = [one() for _ in range(args.iters)]
    rx1, tx1 = iface_bytes(iface)
    dist.barrier()

    med = statistics.median(secs)
    nbytes = numel * t.element_size()
    tx_iter = (tx1 - tx0) / args.iters
    report = {
        "rank": rank,
        "world": world,
        "site": int(os.environ.get("NETLAB_SITE", rank)),
        "addr": os.environ.get("NETLAB_ADDR", ""),
        "iface": iface,
        "op": args.op,
        "idle_s": args.idle_s,
        "bytes": nbytes,
        "iters": args.iters,
        "sec_median": med,
        "sec_min": min(secs),
        "sec_all": secs,
        "algbw_mbit": nbytes * 8 / med / 1e6,
        "tx_bytes_per_iter": tx_iter,
        "rx_bytes_per_iter": (rx1 - rx0) / args.iters,
        "wire_tx_mbit": tx_iter * 8 / med / 1e6,
    }
    print("PROBE " + json.dumps(report), flush=True)
    print(
        f"rank {rank}/{world} site {report['site']}: {nbytes / 1e6:.2f} MB {args.op} {med:.4f} s "
        f"(algbw {report['algbw_mbit']:.1f} Mbit/s, sent {tx_iter / 1e6:.3f} MB/iter = "
        f"{tx_iter / nbytes:.3f} x tensor, wire {report['wire_tx_mbit']:.1f} Mbit/s)",
        flush=True,
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
