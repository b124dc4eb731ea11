"""An Accelerate training loop turned into DiLoCo workers by two lines (marked ``# <-``); the loop is unchanged.

    accelerate launch --cpu --num_processes 2 examples/accelerate_loop.py              # 2 workers, sync
    torchrun --nproc-per-node 2 examples/accelerate_loop.py --mode eager
    torchrun --nproc-per-node 4 examples/accelerate_loop.py --ranks-per-worker 2       # 2 workers x 2 ranks (DDP)

The model is examples/hf_gpt2.py's tiny GPT-2, built from a config (nothing downloaded). Line 1 confines the
``Accelerator``'s DDP to this rank's worker (``confine_ddp``: the gradient all-reduce on the worker's ranks only,
none across workers); line 2 wraps the prepared loop in ``with eagerloco.DiLoCo(...)``,
which runs one outer step after every ``optimizer.step()`` (an optimizer hook) and, on leaving the block, drains
and consolidates: the model then holds the outer parameters, the same on every worker.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub: the model is built from a config
sys.path.insert(0, str(Path(__file__).resolve().parent))

import hf_gpt2
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

import eagerloco
from eagerloco.integrations.hf import confine_ddp


def train(
    steps: int = 60,
    sync_every: int = 10,
    mode: str = "sync",
    ranks_per_worker: int = 1,
    after_step: Callable[[int], None] | None = None,
) -> dict[str, object]:
    """One rank's loop; returns the eval loss before and after and the final outer parameters.
    ``after_step(t)`` is called before the loop (t = 0, after DiLoCo's start-up) and after every inner step (the
    tests count collectives)."""
    accelerator = Accelerator(cpu=True)
    layout = confine_ddp(accelerator, ranks_per_worker)  # <- DDP inside this rank's worker only
    model = hf_gpt2.make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1 + accelerator.process_index)  # each rank its own sequences
    # ``steps`` batches of 4 per rank: the prepared loader gives each rank its share of the list
    data = [{"input_ids": x, "labels": x} for x in hf_gpt2.sample(4 * steps * accelerator.num_processes, generator)]
    loader = DataLoader(data, batch_size=4, shuffle=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    initial = hf_gpt2.evaluate(accelerator.unwrap_model(model))

    config = eagerloco.DiLoCoConfig(mode=mode, sync_every=sync_every, outer_lr=0.7)
    with eagerloco.DiLoCo(accelerator.unwrap_model(model), optimizer, config, layout=layout) as loco:  # <-
        if after_step is not None:
            after_step(0)
        for t, batch in enumerate(loader, start=1):  # the loop as it was
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            if after_step is not None:
                after_step(t)
    final = hf_gpt2.evaluate(accelerator.unwrap_model(model))
    if accelerator.is_main_process:
        print(
            f"eval loss {initial:.3f} -> {final:.3f} (floor ln 2 = 0.693), {loco.stats.payload_bytes / 1e6:.2f} MB sent"
        )
    return {
        "initial": initial,
        "final": final,
        "phi": {k: v.clone() for k, v in loco.full_outer_parameters().items()},
        "model": {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).named_parameters()},
        "inner_steps": loco.inner_step,
        "ddp": type(model).__name__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="sync", choices=eagerloco.MODES)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--sync-every", type=int, default=10)
    parser.add_argument("--ranks-per-worker", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not torch.distributed.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("gloo")
    train(args.steps, args.sync_every, args.mode, args.ranks_per_worker)


if __name__ == "__main__":
    main()
