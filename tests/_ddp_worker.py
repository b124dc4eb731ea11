"""One rank of the DDP-baseline test: ``python _ddp_worker.py RANK WORLD PORT OUT``.

The training CLI's GPT (small) with AdamW and gradient clipping, trained as train.py does in mode dp, twice from
the same seed on the same per-worker batches: with the old flat all-reduce after backward (GradientAverager) and
with PyTorch DDP (DDPGradientAverager, bucketed, small buckets so that several overlap the backward pass), plain
and behind an EmulatedLink. Each rank saves the losses, the final parameters and the measured bytes.
"""

from __future__ import annotations

import sys

import torch

from _toy import init_gloo
from eagerloco.comm import EmulatedLink, TorchDistributedCommunicator
from eagerloco.engine.data_parallel import DDPGradientAverager, GradientAverager
from eagerloco.lm.model import GPT, GPTConfig

STEPS = 6
CONFIG = GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32)


def train(kind: str, comm) -> dict:
    model = GPT(CONFIG, seed=0)
    inner = torch.optim.AdamW(model.optimizer_groups(0.1), lr=3e-3, betas=(0.9, 0.99))
    if kind == "flat":
        averager = GradientAverager(model, comm, 60)
        forward = model
    else:
        averager = DDPGradientAverager(model, comm, 60, bucket_cap_mb=0.01)  # ~2.6k floats a bucket: several
        forward = averager.ddp
    generator = torch.Generator().manual_seed(100 + comm.rank)
    losses = []
    averager.reset_clock()
    for _ in range(STEPS):
        x = torch.randint(64, (4, 16), generator=generator)
        y = torch.roll(x, -1, dims=1)
        _, loss = forward(x, y)
        loss.backward()
        averager.average_gradients()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        inner.step()
        inner.zero_grad(set_to_none=True)
        losses.append(loss.item())
    stats = averager.stats
    return {
        "losses": losses,
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "payload_bytes": stats.payload_bytes,
        "inner_steps": stats.inner_steps,
        "blocked_s": stats.blocked_s,
        "inner_s": stats.inner_s,
        "buckets": 0 if kind == "flat" else averager.last_step_buckets,
    }


def main() -> None:
    rank, world, port = (int(a) for a in sys.argv[1:4])
    out = sys.argv[4]
    init_gloo(rank, world, port)
    comm = TorchDistributedCommunicator(timeout=60)
    saved = {
        "flat": train("flat", comm),
        "ddp": train("ddp", comm),
        "ddp_link": train("ddp", EmulatedLink(comm, 200e6, 0.001)),
        "numel": sum(p.numel() for p in GPT(CONFIG).parameters()),
    }
    torch.save(saved, out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
