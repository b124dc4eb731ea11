"""The DiLoCo wrapper's own cost in a training loop with no communication.

    .venv/bin/python benchmarks/wrapper_overhead.py [--repeats 30] [--sync-every 30] [--json PATH]

One worker (M = 1, in-process group: collectives complete at once), the default small GPT of the training CLI,
AdamW inner steps on random tokens. Three variants advance interleaved, one chunk of H inner steps at a time (each
chunk holds every fragment's sync point), in rotating order: the plain loop, the loop with ``DiLoCo.step()`` in
sync mode, and in eager mode, both with H = --sync-every and 2 streaming fragments. Reports the median time per
inner step and the wrapper's overhead relative to the plain loop, as the median of paired differences between
chunks of the same round (adjacent in time, so machine drift cancels); it must stay below 1 %. It also reports
the cost of one ``step()`` call off sync points and at a sync point, measured directly. ``--json`` also writes
every number (and the machine's load average before and after, since a loaded machine widens the spread).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from eagerloco import DiLoCo, DiLoCoConfig, InProcessGroup
from eagerloco.lm.model import GPT, GPTConfig


def build(seed: int = 0) -> tuple[GPT, torch.optim.Optimizer]:
    model = GPT(GPTConfig(vocab_size=256, seq_len=128, n_layer=4, n_head=4, d_model=128), seed=seed)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)


class Loop:
    """One variant's model, optimizer and (optional) wrapper, advanced H inner steps at a time."""

    def __init__(self, variant: str, sync_every: int) -> None:
        self.model, self.inner = build()
        self.loco = None
        if variant != "plain":
            config = DiLoCoConfig(mode=variant, sync_every=sync_every, num_fragments=2)
            self.loco = DiLoCo(self.model, self.inner, config, comm=InProcessGroup(1).communicator(0))
        self.step = 0

    def run_chunk(self, steps: int, batches: list[torch.Tensor]) -> float:
        """Seconds per inner step over ``steps`` steps (one chunk of H covers every fragment's sync point)."""
        start = time.perf_counter()
        for _ in range(steps):
            x = batches[self.step % len(batches)]
            _, loss = self.model(x[:, :-1], x[:, 1:])
            loss.backward()
            self.inner.step()
            self.inner.zero_grad(set_to_none=True)
            if self.loco is not None:
                self.loco.step()
            self.step += 1
        return (time.perf_counter() - start) / steps


def step_call_cost(sync_every: int, calls: int = 20000) -> tuple[float, float]:
    """(seconds per step() call off sync points, median seconds per step() call at a sync point)."""
    comm = InProcessGroup(1).communicator(0)
    model, inner = build()
    never = DiLoCo(model, inner, DiLoCoConfig(mode="eager", sync_every=10**9), comm=comm)
    start = time.perf_counter()
    for _ in range(calls):
        never.step()
    per_call = (time.perf_counter() - start) / calls
    model, inner = build()
    loco = DiLoCo(model, inner, DiLoCoConfig(mode="eager", sync_every=sync_every), comm=comm)
    for _ in range(sync_every * 20):
        loco.step()
    syncs = [r.overhead_s + r.blocked_s for r in loco.records if r.kind == "step"]
    return per_call, statistics.median(syncs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30, help="interleaved chunks of H steps per variant")
    parser.add_argument("--sync-every", type=int, default=30, help="H")
    parser.add_argument("--batch", type=int, default=16, help="sequences per inner step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (args.batch, 129), generator=generator) for _ in range(8)]
    variants = ["plain", "sync", "eager"]
    loops = {v: Loop(v, args.sync_every) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for loop in loops.values():  # warm-up
        loop.run_chunk(args.sync_every, batches)
    # Chunks of H steps, interleaved and in rotating order: drift and noise hit every variant alike.
    for repeat in range(args.repeats):
        order = variants[repeat % 3 :] + variants[: repeat % 3]
        for variant in order:
            times[variant].append(loops[variant].run_chunk(args.sync_every, batches))
    plain = statistics.median(times["plain"])
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {args.repeats} interleaved chunks of H steps each, "
        f"H = {args.sync_every}, 2 fragments"
    )
    # Paired: each chunk of a variant against the plain chunk of the same round (adjacent in time), so slow
    # drift of the machine cancels; the median of the paired differences is the wrapper's cost.
    print(f"{'variant':8} {'median s/step':>14} {'paired overhead':>16}   all chunks (ms/step)")
    paired: dict[str, float] = {}
    for variant in variants:
        med = statistics.median(times[variant])
        paired[variant] = statistics.median(v - p for v, p in zip(times[variant], times["plain"])) / plain
        runs = " ".join(f"{t * 1e3:.1f}" for t in times[variant])
        print(f"{variant:8} {med:14.5f} {paired[variant]:+15.2%}   {runs}")
    per_call, per_sync = step_call_cost(args.sync_every)
    amortised = (per_call + per_sync / args.sync_every) / plain
    print(
        f"step() off sync points: {per_call * 1e6:.2f} us/call; at a sync point (one fragment, M = 1): "
        f"{per_sync * 1e3:.3f} ms; amortised over H: {amortised:.3%} of an inner step"
    )
    if args.json is not None:
        result = {
            "torch": torch.__version__,
            "threads": args.threads,
            "repeats": args.repeats,
            "sync_every": args.sync_every,
            "batch": args.batch,
            "num_fragments": 2,
            "loadavg_before": list(load_before),
            "loadavg_after": list(os.getloadavg()),
            "cpu_count": os.cpu_count(),
            "median_s_per_step": {v: statistics.median(times[v]) for v in variants},
            "paired_overhead": paired,
            "chunk_s_per_step": times,
            "step_call_off_sync_s": per_call,
            "step_call_at_sync_s": per_sync,
            "amortised_overhead": amortised,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
