"""A Hugging Face ``transformers`` model under eager updates, with the same three calls as any nn.Module.

    python examples/hf_gpt2.py                                  # 2 simulated workers (threads), eager, P = 2
    python examples/hf_gpt2.py --mode sync --workers 3
    torchrun --nproc-per-node 2 examples/hf_gpt2.py --torchrun  # 2 real processes over gloo
    torchrun --nproc-per-node 4 examples/hf_gpt2.py --torchrun --ranks-per-worker 2   # 2 workers x 2 ranks (DDP)

The model is ``GPT2LMHeadModel`` built from a small ``GPT2Config`` and randomly initialised: nothing is
downloaded (``HF_HUB_OFFLINE=1`` is set before transformers is imported). It learns a synthetic language: a
fixed random table gives every token two possible successors, each with probability 1/2, so the best possible
loss is ln 2 ≈ 0.69 nats per predicted token, down from ln V at initialisation (ln 64 ≈ 4.16). Each worker draws
its own sequences. eagerloco sees only ``model.parameters()``: its default fragments split GPT-2's block list
``transformer.h`` (the embeddings go to fragment 0, the final norm to the last one; ``lm_head`` is tied to
``wte`` and counted once). The only lines that are eagerloco's are marked ``# <-``.
"""

from __future__ import annotations

import argparse
import os
import threading
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub: the model is built from a config

import torch
from transformers import GPT2Config, GPT2LMHeadModel  # at import time: its lazy imports are not thread-safe

import eagerloco

VOCAB, SEQ_LEN = 64, 32
_BUILD = threading.Lock()


@dataclass
class Result:
    """What one worker (rank) reports: eval loss of the outer parameters before and after training."""

    initial_loss: float
    final_loss: float
    train_losses: list[float]
    parameters: dict[str, torch.Tensor]
    payload_bytes: int


def make_model(seed: int = 0) -> torch.nn.Module:
    """A 2-layer GPT-2 (≈ 33 k parameters), randomly initialised from ``seed``."""
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    with _BUILD:  # simulated workers are threads: seeding and drawing from the global RNG must not interleave
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)


def successors() -> torch.Tensor:
    """The language: token v may be followed by ``table[v, 0]`` or ``table[v, 1]`` (fixed, shared by all)."""
    return torch.randint(VOCAB, (VOCAB, 2), generator=torch.Generator().manual_seed(1234))


def sample(batch: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` sequences of SEQ_LEN tokens of the language."""
    table = successors()
    x = torch.empty(batch, SEQ_LEN, dtype=torch.long)
    x[:, 0] = torch.randint(VOCAB, (batch,), generator=generator)
    for i in range(1, SEQ_LEN):
        choice = torch.randint(2, (batch,), generator=generator)
        x[:, i] = table[x[:, i - 1], choice]
    return x


def evaluate(model: torch.nn.Module) -> float:
    """Mean next-token loss (nats) on 64 held-out sequences, the same on every worker."""
    x = sample(64, torch.Generator().manual_seed(99))
    with torch.no_grad():
        return float(model(input_ids=x, labels=x).loss)


def train(comm: eagerloco.comm.Communicator | None, args: argparse.Namespace, layout=None) -> Result:
    """One worker's (or, with a layout, one rank's) training loop: the user's loop plus three eagerloco calls."""
    model = make_model()
    wrapped = model
    if layout is not None:  # a worker is a group of ranks: DDP inside it, the outer step across workers
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, process_group=layout.inner_group)
    inner = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    config = eagerloco.DiLoCoConfig(mode=args.mode, sync_every=args.sync_every, num_fragments=args.fragments,
                                    outer_lr=0.7)  # <-  # fmt: skip
    loco = eagerloco.DiLoCo(wrapped, inner, config, comm=comm, layout=layout)  # <-
    initial = evaluate(model)

    worker = layout.worker if layout is not None else loco.rank
    data = torch.Generator().manual_seed(1 + worker)  # each worker its own sequences
    losses = []
    for _ in range(args.steps):
        x = sample(args.batch, data)
        if layout is not None:
            x = layout.local_batch(x)  # this rank's rows of its worker's batch
        loss = wrapped(input_ids=x, labels=x).loss
        loss.backward()
        inner.step()
        inner.zero_grad()
        loco.step()  # <- after every inner step
        losses.append(float(loss.detach()))
    loco.finalize()  # <- apply what is still in flight; the model now holds φ
    loco.consolidate()  # <- eager: average the workers' outer parameters into one model

    final = evaluate(model)
    stats = loco.stats
    if layout is None or layout.inner_rank == 0:
        print(f"worker {worker}: eval loss {initial:.3f} -> {final:.3f} (floor ln 2 = 0.693), compute utilization "
              f"{stats.utilization:.3f}, {stats.payload_bytes / 1e6:.2f} MB sent\n", end="", flush=True)  # fmt: skip
    params = {name: value.detach().clone() for name, value in loco.full_outer_parameters().items()}
    return Result(initial, final, losses, params, stats.payload_bytes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="eager", choices=eagerloco.MODES)
    parser.add_argument("--workers", type=int, default=2, help="simulated workers")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=16, help="sequences per worker and inner step")
    parser.add_argument("--lr", type=float, default=3e-3, help="inner AdamW learning rate")
    parser.add_argument("--sync-every", type=int, default=20, help="H")
    parser.add_argument("--fragments", type=int, default=2, help="P, streaming fragments")
    parser.add_argument("--torchrun", action="store_true", help="run as one rank of a torchrun job")
    parser.add_argument("--ranks-per-worker", type=int, default=1, help="with --torchrun: ranks per worker (DDP)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    if args.torchrun:
        torch.distributed.init_process_group("gloo")
        if args.ranks_per_worker > 1:
            layout = eagerloco.two_level_mesh(args.ranks_per_worker)  # <- workers of N ranks
            train(None, args, layout)  # the outer group comes from the layout
        else:
            train(eagerloco.TorchDistributedCommunicator(), args)  # <- the world group
        torch.distributed.destroy_process_group()
    else:
        group = eagerloco.InProcessGroup(args.workers)  # <- M workers as threads of this process
        eagerloco.run_workers(group, lambda comm: train(comm, args))


if __name__ == "__main__":
    main()
