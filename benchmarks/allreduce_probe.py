#!/usr/bin/env python3
"""Time gloo all-reduces of a float32 tensor; meant to run under torchrun, one process per lab site.

Each rank all-reduces (sum) a tensor of ``--size-mb`` MB ``--iters`` times after one warm-up, checks the
result, and prints one line ``PROBE {json}`` with:

* ``sec_median`` / ``sec_min`` / ``sec_all``: seconds per all-reduce (each timed between barriers);
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
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    iface = os.environ.get("GLOO_SOCKET_IFNAME", "lo")
    numel = max(1, int(args.size_mb * 1e6) // 4)
    t = torch.empty(numel, dtype=torch.float32)
    expected = float(sum(range(1, world + 1)))

    def one() -> float:
        t.fill_(float(rank + 1))
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        dt = time.perf_counter() - t0
        if not (float(t[0]) == expected and float(t[-1]) == expected):
            raise RuntimeError(f"wrong all-reduce result {float(t[0])} != {expected}")
        return dt

    one()  # warm-up: connects every pair of ranks
    rx0, tx0 = iface_bytes(iface)
    secs = [one() for _ in range(args.iters)]
    rx1, tx1 = iface_bytes(iface)
    dist.barrier()

    med = statistics.median(secs)
    nbytes = numel * 4
    tx_iter = (tx1 - tx0) / args.iters
    report = {
        "rank": rank,
        "world": world,
        "site": int(os.environ.get("NETLAB_SITE", rank)),
        "addr": os.environ.get("NETLAB_ADDR", ""),
        "iface": iface,
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
        f"rank {rank}/{world} site {report['site']}: {nbytes / 1e6:.2f} MB all-reduce {med:.4f} s "
        f"(algbw {report['algbw_mbit']:.1f} Mbit/s, sent {tx_iter / 1e6:.3f} MB/iter = "
        f"{tx_iter / nbytes:.3f} x tensor, wire {report['wire_tx_mbit']:.1f} Mbit/s)",
        flush=True,
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
