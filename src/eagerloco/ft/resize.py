"""Resume with another number of workers (ALGORITHMS.md section 11, last rule). Needs only torch.

The M saved outer states (one :meth:`eagerloco.DiLoCo.state_dict` per saved worker) are brought to the run's
end-of-run state, exactly as :meth:`~eagerloco.DiLoCo.finalize` and :meth:`~eagerloco.DiLoCo.consolidate` would
have brought them, and handed to M' new workers with nothing in flight:

1. on every saved worker, its saved in-flight averages are applied first, oldest first, as finalize applies them
   (the mode's strategy computes g): the plain step φ ← φ − lr·g with g = Δ(t) (sync, overlap, delayed) or
   g = Δ(t) − own_m(t) (eager), the outer optimizer's momentum untouched; an average dropped by fault tolerance,
   or not finite under ``nonfinite='skip'``, is skipped (only the instalment an earlier average deferred into it,
   eager smoothing, ALGORITHMS.md 4.4, is applied); a non-finite one under ``'raise'`` is refused;
2. sync, overlap, delayed: φ and the outer optimizer state of saved worker 0 (bit-identical on all of them);
   eager: φ = (1/M) Σ_m φ_m and every state tensor of the outer optimizer averaged the same way, summed in rank
   order like the in-process group's all-reduce (the consolidation);
3. new worker i gets that φ and outer state; i < M keeps saved worker i's reducer state (its error-feedback
   residual), i ≥ M starts without a residual.

Each returned state is marked finalized (it is an end-of-run state): load it with ``load_state_dict`` into an
engine of M' workers, then call ``reopen()`` to continue training. The model's parameters θ must be set to φ
(``loco.copy_outer_parameters_to(model)``, or load the returned φ), and each new worker's inner optimizer state
and data position come from saved worker i when i < M, fresh otherwise: they are outside the engine's state.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from eagerloco.engine.config import REMOVED_FIELDS, DiLoCoConfig
from eagerloco.engine.core import InFlight
from eagerloco.engine.diloco import check_saved_config, restored_mean
from eagerloco.engine.strategies import OuterStrategy, make_strategy


def resize_outer_states(saved: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
    """The outer states of ``world_size`` new workers from the ``len(saved)`` states saved by a run's workers (rank
    order). See the module docstring for exactly what is applied. Raises ValueError, before computing anything,
    when the saved states are not one complete, consistent set."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not saved:
        raise ValueError("no saved outer states: pass one DiLoCo.state_dict() per saved worker")
    m = len(saved)
    first = saved[0]
    for rank, state in enumerate(saved):
        if state.get("world_size") != m or state.get("rank") != rank:
            raise ValueError(
                f"saved state #{rank} is rank {state.get('rank')} of {state.get('world_size')} workers: pass the "
                f"{state.get('world_size')} states of one checkpoint, in rank order (got {m})"
            )
        if state.get("layout") is not None:
            raise ValueError(
                "saved states come from workers that are groups of ranks (layout "
                f"{state.get('layout')}): resizing those is not supported; resize runs of one rank per worker"
            )
        for key in ("config", "inner_step", "format"):
            if state.get(key) != first.get(key):
                raise ValueError(f"saved state #{rank} has another {key} than state #0: not one checkpoint")
        if len(state["fragments"]) != len(first["fragments"]):
            raise ValueError(f"saved state #{rank} has another number of fragments than state #0")
    config = first["config"]
    check_saved_config(config)
    eager = config["mode"] == "eager"
    strategy = make_strategy(DiLoCoConfig.from_dict({k: v for k, v in config.items() if k not in REMOVED_FIELDS}))
    skip_nonfinite = config.get("nonfinite", "raise") == "skip"

    fragments_out: list[list[dict[str, Any]]] = [[] for _ in range(world_size)]
    for p, ref in enumerate(first["fragments"]):
        drained = [_drain(state["fragments"][p], strategy, skip_nonfinite, rank, p) for rank, state in enumerate(saved)]
        if eager:
            phi = drained[0].clone()
            for other in drained[1:]:  # rank order, then / M: the in-process all-reduce's arithmetic
                phi.add_(other)
            phi.div_(m)
            outer = _mean_state([state["fragments"][p]["outer_optimizer"] for state in saved])
        else:
            phi = drained[0]
            outer = copy.deepcopy(ref["outer_optimizer"])
        for i in range(world_size):
            reducer = copy.deepcopy(saved[i]["fragments"][p]["reducer"]) if i < m else _fresh_reducer(ref["reducer"])
            fragments_out[i].append(
                {
                    "names": list(ref["names"]),
                    "phi": phi.clone(),
                    "outer_optimizer": copy.deepcopy(outer),
                    "reducer": reducer,
                    "in_flight": [],
                    "arrivals": [],
                }
            )
    return [
        {
            "format": first["format"],
            "config": copy.deepcopy(config),
            "world_size": world_size,
            "rank": i,
            "layout": None,
            "inner_step": first["inner_step"],
            "finalized": True,
            "fragments": fragments_out[i],
        }
        for i in range(world_size)
    ]


def _drain(
    fragment: dict[str, Any], strategy: OuterStrategy, skip_nonfinite: bool, rank: int, index: int
) -> torch.Tensor:
    """φ of one saved worker's fragment after its in-flight averages, oldest first, with the strategy's own
    formulas, as :meth:`OuterStrategy.finalize` applies them: g = ``final_gradient`` for an average that arrived,
    ``skipped_gradient`` for one that was dropped (fault tolerance) or is not finite under ``nonfinite='skip'``."""
    phi = fragment["phi"].clone()
    lr = fragment["outer_optimizer"]["param_groups"][0]["lr"]
    for saved_item in fragment["in_flight"]:  # oldest first
        item = InFlight(
            launch_step=saved_item["launch_step"],
            mean=restored_mean(saved_item, phi.device),
            own=saved_item["own"],
            share=saved_item.get("share"),
        )
        mean = saved_item["mean"]
        dropped = getattr(item.mean, "dropped", False)  # restored_mean's flag: as core.check_average, a skip
        if not dropped and bool(torch.isfinite(mean).all()):
            g = strategy.final_gradient(item, mean)
        elif dropped or skip_nonfinite:
            g = strategy.skipped_gradient(item)  # nothing of it, but an earlier average's deferred instalment (4.4)
        else:
            raise ValueError(
                f"saved worker {rank}, fragment {index}: the average launched at inner step "
                f"{saved_item['launch_step']} is not finite and the run has nonfinite='raise'"
            )
        if g is not None:
            phi.add_(g, alpha=-lr)  # φ ← φ − lr·g
    return phi


def _mean_state(states: list[dict[str, Any]]) -> dict[str, Any]:
    """An optimizer state dict whose tensors are the rank-order mean of ``states``' tensors (scalars: the first's)."""
    out = copy.deepcopy(states[0])
    for key, value in out["state"].items():
        for name, tensor in value.items():
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.dim() > 0:
                total = tensor.clone()
                for other in states[1:]:
                    total.add_(other["state"][key][name])
                value[name] = total.div_(len(states))
    return out


def _fresh_reducer(state: dict[str, Any]) -> dict[str, Any]:
    """A reducer state like ``state`` without its carried residual (a new worker has no encoding error yet)."""
    out = copy.deepcopy(state)
    if "residual" in out:
        out["residual"] = None
    return out
