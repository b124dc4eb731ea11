"""One real worker process for the multi-process tests: ``python _mp_worker.py RANK WORLD PORT OUT``.

Runs every mode (and streaming fragments) in one gloo process group, in the same order on every rank, and
saves each run's final outer parameters to OUT (a torch file per rank). Also measures time blocked per outer
step with a collective slowed down by an emulated link, for sync and eager.
"""

from __future__ import annotations

import sys
import time

import torch

from _toy import init_gloo, train_tinynet
from eagerloco import DiLoCoConfig, EmulatedLink, TorchDistributedCommunicator

CASES = {
    "sync": DiLoCoConfig(mode="sync", sync_every=4, outer_momentum=0.9),
    "overlap": DiLoCoConfig(mode="overlap", sync_every=4, overlap_steps=1, alpha=0.5),
    "delayed": DiLoCoConfig(mode="delayed", sync_every=4),
    "eager": DiLoCoConfig(mode="eager", sync_every=4),
    "eager_k2_p2": DiLoCoConfig(mode="eager", sync_every=4, delay=2, num_fragments=2),
    "overlap_p2": DiLoCoConfig(mode="overlap", sync_every=4, num_fragments=2, overlap_steps=1),
}
STEPS = 14


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    init_gloo(rank, world, port)
    comm = TorchDistributedCommunicator(timeout=60)
    saved: dict[str, object] = {}
    for name, config in CASES.items():
        result = train_tinynet(comm, config, STEPS, consolidate=True)
        saved[name] = result.phi
    saved["payload_bytes"] = comm.stats.payload_bytes
    # Real overlap through gloo: a collective held back to 0.15 s, inner phase of 4 x 25 ms = 0.1 s.
    link = EmulatedLink(comm, latency_s=0.15)
    blocked = {}
    for name, config in {
        "sync": DiLoCoConfig(mode="sync", sync_every=4),
        "eager_k2": DiLoCoConfig(mode="eager", sync_every=4, delay=2),
    }.items():
        result = train_tinynet(link, config, 16, step_hook=lambda _: time.sleep(0.025))
        blocked[name] = result.stats["blocked_per_outer_step_s"]
    saved["blocked"] = blocked
    torch.save(saved, out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
