"""Hugging Face ``Trainer`` as DiLoCo workers: one callback, attached in one line (marked ``# <-``).

    torchrun --nproc-per-node 2 examples/hf_trainer.py                          # 2 workers, sync, gloo on CPU
    torchrun --nproc-per-node 2 examples/hf_trainer.py --mode eager --sync-every 20
    torchrun --nproc-per-node 4 examples/hf_trainer.py --ranks-per-worker 2     # 2 workers x 2 ranks (DDP)

The model is examples/hf_gpt2.py's tiny GPT-2 built from a config (nothing downloaded). ``Trainer`` wraps it in
DDP over all ranks; ``DiLoCoCallback.attach`` confines that DDP to each worker's ranks (no gradient all-reduce
between workers), runs one outer step after every optimizer step and, when training ends, drains and
consolidates: ``trainer.evaluate()`` and ``trainer.save_model()`` then see the outer parameters, the same on every
worker (``save_model`` writes safetensors).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub: the model is built from a config
sys.path.insert(0, str(Path(__file__).resolve().parent))

import hf_gpt2
import torch
from transformers import Trainer, TrainingArguments

import eagerloco
from eagerloco.integrations.hf import DiLoCoCallback


def build_trainer(
    output_dir: str,
    steps: int = 60,
    sync_every: int = 10,
    mode: str = "sync",
    ranks_per_worker: int = 1,
) -> tuple[Trainer, DiLoCoCallback]:
    """A plain Trainer on the synthetic language of examples/hf_gpt2.py, turned into DiLoCo workers."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    data = hf_gpt2.sample(64, torch.Generator().manual_seed(5 + rank))  # Trainer shards it over the ranks too
    dataset = [{"input_ids": x, "labels": x} for x in data]
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        use_cpu=True,
        ddp_backend="gloo",
        report_to=[],
        logging_steps=1000,
        save_strategy="no",
        seed=0,
    )
    trainer = Trainer(model=hf_gpt2.make_model(), args=args, train_dataset=dataset, eval_dataset=dataset[:16])
    config = eagerloco.DiLoCoConfig(mode=mode, sync_every=sync_every, outer_lr=0.7)
    callback = DiLoCoCallback(config, ranks_per_worker=ranks_per_worker).attach(trainer)  # <-
    return trainer, callback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="sync", choices=eagerloco.MODES)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--sync-every", type=int, default=10)
    parser.add_argument("--ranks-per-worker", type=int, default=1)
    parser.add_argument("--output-dir", default="runs/hf_trainer")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not torch.distributed.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.init_process_group("gloo")
    trainer, _ = build_trainer(args.output_dir, args.steps, args.sync_every, args.mode, args.ranks_per_worker)
    trainer.train()  # the model holds the outer parameters φ when this returns
    metrics = trainer.evaluate()
    trainer.save_model()  # model.safetensors + config.json, written by the main process
    if trainer.is_world_process_zero():
        print(f"eval loss of the outer parameters: {metrics['eval_loss']:.3f} (floor ln 2 = 0.693)")


if __name__ == "__main__":
    main()
