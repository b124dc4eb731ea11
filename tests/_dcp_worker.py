"""One rank of the DCP checkpoint tests: ``python _dcp_worker.py RANK WORLD PORT N CKPT_DIR OUT``.

WORLD ranks over gloo form WORLD/N workers of N ranks (N = 1: one rank per worker, no layout; N = 2: FSDP2 inside
each worker). For every case, TinyNet with AdamW inner steps is trained twice: straight through STEPS steps, and
stopped after STOP steps (averages in flight), saved with ``dcp.save``/``dcp.async_save`` together with the model
and the inner optimizer, loaded into a freshly built model, optimizer and wrapper, and continued. Both end with
``finalize()``; each rank saves φ (and θ, and the outer optimizer state) of both runs for the test to compare
bitwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from _toy import TinyNet, init_gloo
from eagerloco import DiLoCo, DiLoCoConfig
from eagerloco.integrations.dcp import DiLoCoState, worker_key

CASES = {
    "sync": DiLoCoConfig(mode="sync", sync_every=4, outer_momentum=0.9),
    "overlap_p2": DiLoCoConfig(mode="overlap", sync_every=4, num_fragments=2, overlap_steps=1, alpha=0.5),
    "delayed_k2": DiLoCoConfig(mode="delayed", sync_every=4, delay=2),
    "eager_k2_p2": DiLoCoConfig(mode="eager", sync_every=4, delay=2, num_fragments=2),
    "eager_async_save": DiLoCoConfig(mode="eager", sync_every=4, delay=1),
    # smoothing (ALGORITHMS.md 4.4): at STOP fragment 1's newest own term holds a deferred instalment of Δ(6), used
    # when Δ(10) arrives at 14
    "eager_smoothed_p2": DiLoCoConfig(
        mode="eager", sync_every=4, delay=1, num_fragments=2, eager_own_weight=0.75, eager_smoothing=0.5
    ),
}
STEPS, STOP, BATCH = 14, 10, 16  # at STOP = 10 (H = 4): 2 averages in flight for delayed/eager k = 2, 1 for overlap


def batches(worker: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1000 + worker)
    w = torch.randn(4, 1, generator=generator)
    out = []
    for _ in range(STEPS):
        x = torch.randn(BATCH, 4, generator=generator)
        out.append((x, x @ w + 0.1 * worker))
    return out


def build(config: DiLoCoConfig, layout, seed: int):
    model: nn.Module = TinyNet(seed=seed)
    if layout is not None:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block, mesh=layout.inner_mesh)
        fully_shard(model, mesh=layout.inner_mesh)
    inner = torch.optim.AdamW(model.parameters(), lr=0.01)
    loco = DiLoCo(model, inner, config, layout=layout) if layout is not None else DiLoCo(model, inner, config)
    return model, inner, loco


def run(model, inner, loco, data, start: int, stop: int, layout) -> None:
    for x, y in data[start:stop]:
        if layout is not None:
            x, y = layout.local_batch(x), layout.local_batch(y)
        (model(x) - y).pow(2).mean().backward()
        inner.step()
        inner.zero_grad()
        loco.step()


def snapshot(loco: DiLoCo) -> dict[str, object]:
    return {
        "phi": {k: v.clone() for k, v in loco.outer_parameters().items()},
        "outer": [
            {k: v.clone() for k, v in s.outer_optimizer.state_dict()["state"].get(0, {}).items()} for s in loco.states
        ],
    }


def main() -> None:
    rank, world, port, ranks_per_worker = (int(a) for a in sys.argv[1:5])
    ckpt, out = Path(sys.argv[5]), sys.argv[6]
    init_gloo(rank, world, port)
    import eagerloco

    layout = eagerloco.two_level_mesh(ranks_per_worker) if ranks_per_worker > 1 else None
    worker = layout.worker if layout is not None else rank
    data = batches(worker)
    saved: dict[str, object] = {}
    for name, config in CASES.items():
        model, inner, loco = build(config, layout, seed=0)
        run(model, inner, loco, data, 0, STEPS, layout)
        loco.finalize()
        straight = snapshot(loco)

        model, inner, loco = build(config, layout, seed=0)
        run(model, inner, loco, data, 0, STOP, layout)
        in_flight = [len(s.in_flight) for s in loco.states]
        model_sd, optim_sd = get_state_dict(model, inner)
        # θ and the inner optimizer differ between workers: under a per-worker key, or DCP keeps one copy
        state = {worker_key(loco): {"model": model_sd, "optim": optim_sd}, "loco": DiLoCoState(loco)}
        path = ckpt / name
        if name.endswith("async_save"):
            dcp.async_save(state, checkpoint_id=path).result()
        else:
            dcp.save(state, checkpoint_id=path)
        keys = sorted(DiLoCoState(loco).state_dict())
        del model, inner, loco

        model, inner, loco = build(config, layout, seed=7)  # another initialisation: everything must come back
        model_sd, optim_sd = get_state_dict(model, inner)
        state = {worker_key(loco): {"model": model_sd, "optim": optim_sd}, "loco": DiLoCoState(loco)}
        dcp.load(state, checkpoint_id=path)
        mine = state[worker_key(loco)]
        set_state_dict(model, inner, model_state_dict=mine["model"], optim_state_dict=mine["optim"])
        run(model, inner, loco, data, STOP, STEPS, layout)
        loco.finalize()
        saved[name] = {"straight": straight, "resumed": snapshot(loco), "in_flight": in_flight, "keys": keys}
    torch.save(saved, out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
