"""Toy models and a worker loop shared by the engine tests (in-process threads and real gloo processes)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from eagerloco import DiLoCo, DiLoCoConfig
from eagerloco.comm import Communicator, InProcessGroup, run_workers


class Quadratic(nn.Module):
    """One scalar parameter θ and the loss 0.5·(θ − a)², gradient θ − a: small enough to compute by hand."""

    def __init__(self, init: float = 0.0) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([init]))

    def forward(self, target: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.theta - target).pow(2).sum()


class TinyNet(nn.Module):
    """Embedding-free MLP with repeated blocks (for fragments): in → 4 blocks → head."""

    def __init__(self, width: int = 8, depth: int = 4, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.inp = nn.Linear(4, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.head(h)


@dataclass
class WorkerResult:
    phi: dict[str, torch.Tensor]
    theta: dict[str, torch.Tensor]
    phi_before_finalize: dict[str, torch.Tensor]
    outer_opt_state: list[dict]
    stats: dict
    records: list[dict]


def train_tinynet(
    comm: Communicator,
    config: DiLoCoConfig,
    steps: int,
    *,
    inner_lr: float = 0.05,
    outer_factory: Callable | None = None,
    consolidate: bool = False,
    step_hook: Callable[[int], None] | None = None,
) -> WorkerResult:
    """Train TinyNet on worker-specific regression data with SGD inner steps; deterministic per rank."""
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=inner_lr)
    loco = DiLoCo(model, inner, config, comm=comm, outer_optimizer=outer_factory)
    generator = torch.Generator().manual_seed(1000 + comm.rank)
    w = torch.randn(4, 1, generator=generator)
    for t in range(steps):
        x = torch.randn(16, 4, generator=generator)
        y = x @ w + 0.1 * comm.rank
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        inner.step()
        inner.zero_grad()
        if step_hook is not None:
            step_hook(t)
        loco.step()
    phi_before = {k: v.clone() for k, v in loco.outer_parameters().items()}
    loco.finalize()
    if consolidate:
        loco.consolidate()
    return WorkerResult(
        phi={k: v.clone() for k, v in loco.outer_parameters().items()},
        theta={k: v.detach().clone() for k, v in model.named_parameters()},
        phi_before_finalize=phi_before,
        outer_opt_state=[s.outer_optimizer.state_dict() for s in loco.states],
        stats=loco.stats.to_dict(),
        records=[r.to_dict() for r in loco.records],
    )


def run_inprocess(world_size: int, fn: Callable[[Communicator], object]) -> list:
    return run_workers(InProcessGroup(world_size, timeout=60), fn)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(script: str | Path, world_size: int, out_dir: Path, *args: str, timeout: float = 240) -> list:
    """Run ``python SCRIPT RANK WORLD PORT *ARGS OUT_DIR/RANK.pt`` for every rank (real processes, gloo on
    localhost, one thread each); fail with a rank's output if it exits non-zero; return what each rank saved."""
    port = free_port()
    here = Path(__file__).resolve().parent
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(here), env.get("PYTHONPATH", "")) if p)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(world_size), str(port), *args, str(out_dir / f"{r}.pt")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(world_size)
    ]
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            outputs.append(out.decode(errors="replace"))
    finally:  # a rank that hangs (its peer died) must not outlive the test
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, f"rank {rank} failed:\n{outputs[rank]}"
    return [torch.load(out_dir / f"{r}.pt", weights_only=False) for r in range(world_size)]


def init_gloo(rank: int, world_size: int, port: int) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )


def run_tinynet_trace(world_size: int, steps: int, config: DiLoCoConfig, restart_at: int | None = None) -> list[dict]:
    """TinyNet on worker-specific data (inner SGD lr 0.05, momentum 0.5), in process; per worker: φ flat after
    every inner step (``phis``); after finalize and consolidate: φ flat (``final``) and θ flat (``theta``). With
    ``restart_at``, the engine, model and inner optimizer are rebuilt from their state_dicts at that step (a
    checkpoint round trip)."""

    def worker(comm: Communicator) -> dict:
        def build() -> tuple[nn.Module, torch.optim.Optimizer, DiLoCo]:
            model = TinyNet()
            inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
            return model, inner, DiLoCo(model, inner, config, comm=comm)

        def flat(tensors) -> torch.Tensor:
            return torch.cat([p.detach().flatten() for p in tensors]).clone()

        model, inner, loco = build()
        generator = torch.Generator().manual_seed(1000 + comm.rank)
        w = torch.randn(4, 1, generator=generator)
        batches = [torch.randn(16, 4, generator=generator) for _ in range(steps)]
        phis = []
        for t in range(steps):
            if t == restart_at:
                saved = {"model": model.state_dict(), "inner": inner.state_dict(), "outer": loco.state_dict()}
                model, inner, loco = build()
                model.load_state_dict(saved["model"])
                inner.load_state_dict(saved["inner"])
                loco.load_state_dict(saved["outer"])
            x = batches[t]
            (model(x) - (x @ w + 0.1 * comm.rank)).pow(2).mean().backward()
            inner.step()
            inner.zero_grad()
            loco.step()
            phis.append(flat(loco.outer_parameters().values()))
        loco.finalize()
        loco.consolidate()
        return {"phis": phis, "final": flat(loco.outer_parameters().values()), "theta": flat(model.parameters())}

    return run_inprocess(world_size, worker)
