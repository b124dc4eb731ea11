"""One rank of the Hugging Face integration tests: ``python _hf_worker.py RANK WORLD PORT CASE OUTDIR OUT``.

CASE 'trainer': examples/hf_trainer.py's ``transformers.Trainer`` on a tiny GPT-2 built from a config (nothing
downloaded) with :class:`eagerloco.integrations.hf.DiLoCoCallback`, one rank per worker ('trainer_2x2': 4 ranks, 2
workers of 2 ranks, DDP inside each worker). CASE 'accelerate':
examples/accelerate_loop.py's loop. Each rank records, per training step, how many collectives each process
group ran (gloo's sequence numbers: the world group, where Trainer's DDP would average gradients, and the outer
group of the outer step), and the final outer parameters.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import torch
import torch.distributed as dist

from _toy import init_gloo

STEPS, H = 8, 4


def seq(group) -> int:
    return group._get_sequence_number_for_group()


def run_trainer(outdir: Path, ranks_per_worker: int = 1) -> dict:
    import hf_trainer
    from transformers import TrainerCallback

    world = dist.distributed_c10d._get_default_group()
    trainer, callback = hf_trainer.build_trainer(
        str(outdir / f"trainer{dist.get_rank()}"), steps=STEPS, sync_every=H, ranks_per_worker=ranks_per_worker
    )
    counts: list[int] = []
    inner, outer = callback.layout.inner_group, callback.layout.outer_group

    class Count(TrainerCallback):  # added after DiLoCoCallback: its on_step_end runs after the outer step
        def on_step_begin(self, *a, **k):
            self.before = (seq(world), seq(inner), seq(outer))

        def on_step_end(self, *a, **k):
            counts.append(seq(world) - self.before[0])  # world-group collectives in this step
            inner_counts.append(seq(inner) - self.before[1])  # inside the worker
            outer_counts.append(seq(outer) - self.before[2])  # the outer step's group

    inner_counts: list[int] = []
    outer_counts: list[int] = []
    trainer.add_callback(Count())
    trainer.train()
    loco = callback.loco
    ddp = trainer.model_wrapped
    outer_is_world = callback.layout.outer_group == world
    phi = {k: v.clone() for k, v in loco.full_outer_parameters().items()}
    return {
        "counts": counts,
        "inner_counts": inner_counts,
        "outer_counts": outer_counts,
        "phi": phi,
        "model": {k: v.detach().clone() for k, v in trainer.model.named_parameters()},
        "ddp": type(ddp).__name__,
        "outer_is_world": outer_is_world,
        "inner_steps": loco.inner_step,
        "eval": trainer.evaluate()["eval_loss"],
        "worker": callback.layout.worker,
    }


def run_accelerate(outdir: Path) -> dict:
    import accelerate_loop

    world = dist.distributed_c10d._get_default_group()
    marks: list[int] = []
    result = accelerate_loop.train(steps=STEPS, sync_every=H, after_step=lambda t: marks.append(seq(world)))
    result["counts"] = [b - a for a, b in itertools.pairwise(marks)]  # world-group collectives per inner step
    result["control"] = plain_ddp_counts(world)
    return result


def plain_ddp_counts(world) -> list[int]:
    """The control: the same model in DDP over the world, as Trainer and Accelerate build it without
    eagerloco's handler: world-group collectives per step (the gradient all-reduce)."""
    import hf_gpt2

    model = torch.nn.parallel.DistributedDataParallel(hf_gpt2.make_model(), broadcast_buffers=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = hf_gpt2.sample(4, torch.Generator().manual_seed(dist.get_rank()))
    counts = []
    for _ in range(4):
        before = seq(world)
        model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        counts.append(seq(world) - before)
    return counts


def main() -> None:
    rank, world_size, port = (int(a) for a in sys.argv[1:4])
    case, outdir, out = sys.argv[4], Path(sys.argv[5]), sys.argv[6]
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    init_gloo(rank, world_size, port)
    if case == "trainer":
        result = run_trainer(outdir)
    elif case == "trainer_2x2":
        result = run_trainer(outdir, ranks_per_worker=2)
    else:
        result = run_accelerate(outdir)
    torch.save(result, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
