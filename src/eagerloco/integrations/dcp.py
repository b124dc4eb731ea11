"""DiLoCo's outer state in ``torch.distributed.checkpoint`` (DCP), keyed by parameter names; safetensors export.

Save it next to the model and the inner optimizer, with ``dcp.save`` or ``dcp.async_save``, on every rank::

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from eagerloco.integrations.dcp import DiLoCoState, worker_key

    # θ and the inner optimizer differ between workers: keep them under a per-worker key (worker_key)
    model_sd, optim_sd = get_state_dict(model, inner)
    state = {worker_key(loco): {"model": model_sd, "optim": optim_sd}, "loco": DiLoCoState(loco)}
    dcp.save(state, checkpoint_id=path)

    # resume: build model, inner optimizer and DiLoCo as at the start, then
    model_sd, optim_sd = get_state_dict(model, inner)
    state = {worker_key(loco): {"model": model_sd, "optim": optim_sd}, "loco": DiLoCoState(loco)}
    dcp.load(state, checkpoint_id=path)
    mine = state[worker_key(loco)]
    set_state_dict(model, inner, model_state_dict=mine["model"], optim_state_dict=mine["optim"])

:class:`DiLoCoState` is built on :meth:`eagerloco.DiLoCo.state_dict` / :meth:`~eagerloco.DiLoCo.load_state_dict`
(so a run resumed from it applies exactly what the uninterrupted run would have, bitwise on CPU), with every flat
per-fragment buffer cut into one tensor per parameter, named like the parameter:

==========================================  ======================================================================
key (under the name given to ``dcp.save``)  value
==========================================  ======================================================================
``phi.<param>``                             φ, the outer parameters
``outer_optimizer.<state>.<param>``         the outer optimizer's per-element state (SGD: ``momentum_buffer``)
``in_flight.<j>.mean.<param>``              the j-th average in flight (oldest first), Δ(t) by value
``in_flight.<j>.own.<param>``               eager only: this worker's own contribution (1/M)·Δ_m(t) in it
``in_flight.<j>.share.<param>``             eager with ``eager_smoothing`` > 0 only: that own term before smoothing
``meta.worker<m>.rank<n>``                  the rest (config, step, schedule, codec residual, ...), one per rank
==========================================  ======================================================================

In eager mode φ, the outer optimizer state and the own contributions differ between workers: their keys start
with ``worker<m>.``. Every other tensor is bit-identical on all workers, and DCP writes one copy of it.

DCP loads into tensors that exist before the load, so the in-flight slots are always present: as many as the
mode can have in flight per fragment (sync 0, overlap 1, delayed and eager k), unoccupied ones zero; the meta
says how many are occupied.

Workers of several ranks (``layout=``): an FSDP2 parameter's entries are ``DTensor`` s with the parameter's own
placements (each rank writes and reads its shard); a replicated (DDP) parameter's entries are full tensors, gathered
inside the worker when its ranks split it (a collective on the inner group: every rank saves and loads, as DCP
requires anyway). Loading needs the same mode, schedule, number of workers and layout as the save (a mode switch
after ``finalize()`` goes through ``DiLoCo.state_dict()`` and ``torch.save`` instead). ``dcp.async_save`` works
too, FSDP2 included.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.stateful import Stateful

from eagerloco.engine.sharding import DTensor, is_dtensor

if TYPE_CHECKING:
    from torch import nn

    from eagerloco.engine.diloco import DiLoCo
    from eagerloco.engine.sharding import FragmentView

__all__ = ["DiLoCoState", "export_safetensors", "in_flight_capacity", "worker_key"]


def worker_key(loco: DiLoCo) -> str:
    """``"worker<m>"``: the key to save this worker's model and inner optimizer under in a shared checkpoint.

    Workers train different θ and inner optimizer states between sync points, but DCP takes plain tensors with
    the same name on several ranks for replicas and writes one copy (and an FSDP2 shard of worker 1 for the same
    shard of worker 0): without a per-worker key every worker would resume from one worker's θ."""
    return f"worker{loco.rank}"


def in_flight_capacity(loco: DiLoCo) -> int:
    """The most averages a fragment can have in flight between two ``step()`` calls in ``loco``'s mode."""
    cfg = loco.config
    if cfg.mode == "overlap":
        return 1 if cfg.overlap_steps > 0 else 0
    if cfg.mode in ("delayed", "eager"):
        return cfg.delay
    return 0


class DiLoCoState(Stateful):
    """DiLoCo's outer state as a DCP ``Stateful`` (see the module docstring for the keys).

    ``state_dict()`` waits for the averages in flight (as :meth:`eagerloco.DiLoCo.state_dict` does) and, with
    sliced replicas, gathers inside the worker: call ``dcp.save`` on every rank, at the same inner step.
    """

    def __init__(self, loco: DiLoCo) -> None:
        self.loco = loco
        worker = loco.rank
        self._own = "" if loco.strategy.uniform_outer_state else f"worker{worker}."
        inner_rank = loco.layout.inner_rank if loco.layout is not None else 0
        self._meta_key = f"meta.worker{worker}.rank{inner_rank}"
        self._capacity = in_flight_capacity(loco)
        self._eager_own = not loco.strategy.uniform_outer_state
        self._share = self._eager_own and bool(loco.config.eager_smoothing)  # eager smoothing's w·Δ_m(t) (4.4)
        self._elementwise = [_elementwise_state_keys(core.outer_optimizer) for core in loco.states]

    def state_dict(self) -> dict[str, Any]:
        full = self.loco.state_dict()
        out: dict[str, Any] = {}
        skeleton_fragments = []
        for core, saved in zip(self.loco.states, full["fragments"]):
            view, names, own = core.view, saved["names"], self._own
            _put(out, f"{own}phi.", names, _per_parameter(view, saved["phi"]))
            opt = saved["outer_optimizer"]
            opt_skeleton: dict[str, Any] = {"param_groups": opt["param_groups"], "state": {}}
            per_param = opt["state"].get(0, {})
            # The per-element keys are always all present (zeros before the optimizer's first step), so that a
            # fresh wrapper's state_dict() is a complete template for dcp.load.
            for key in self._elementwise[core.index]:
                value = per_param.get(key)
                _put(out, f"{own}outer_optimizer.{key}.", names, _per_parameter(view, _or_zeros(value, saved["phi"])))
            if opt["state"]:
                opt_skeleton["state"][0] = {
                    key: _ELEMENTWISE if key in self._elementwise[core.index] else value
                    for key, value in per_param.items()
                }
            in_flight = saved["in_flight"]
            if len(in_flight) > self._capacity:  # never happens in the engine's modes; guards a new mode
                raise RuntimeError(
                    f"fragment {core.index} has {len(in_flight)} averages in flight, more than the "
                    f"{self._capacity} slots of mode {self.loco.config.mode!r}: update in_flight_capacity"
                )
            # Every slot gets storage of its own: dcp.load writes into these tensors (views of them), so two
            # unoccupied slots sharing one zero buffer would overwrite each other.
            for j in range(self._capacity):
                item = in_flight[j] if j < len(in_flight) else None
                mean = None if item is None else item["mean"]
                _put(out, f"in_flight.{j}.mean.", names, _per_parameter(view, _or_zeros(mean, saved["phi"])))
                if self._eager_own:
                    own_value = None if item is None else item["own"]
                    _put(
                        out, f"{own}in_flight.{j}.own.", names, _per_parameter(view, _or_zeros(own_value, saved["phi"]))
                    )
                if self._share:
                    share = None if item is None else item["share"]
                    _put(out, f"{own}in_flight.{j}.share.", names, _per_parameter(view, _or_zeros(share, saved["phi"])))
            skeleton_fragments.append(
                {
                    "names": names,
                    "outer_optimizer": opt_skeleton,
                    "reducer": saved["reducer"],
                    "arrivals": saved["arrivals"],
                    "in_flight": [
                        {k: v for k, v in item.items() if k not in ("mean", "own", "share")}
                        | {"has_own": item["own"] is not None, "has_share": item.get("share") is not None}
                        for item in in_flight
                    ],
                }
            )
        meta = {k: v for k, v in full.items() if k != "fragments"} | {"fragments": skeleton_fragments}
        out[self._meta_key] = _Meta(meta)
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        meta = state_dict[self._meta_key].value
        fragments = []
        for core, skeleton in zip(self.loco.states, meta["fragments"]):
            view, names, own = core.view, skeleton["names"], self._own
            if names != core.fragment.names:
                raise ValueError(f"fragment {core.index} holds other parameters in the checkpoint")
            opt = skeleton["outer_optimizer"]
            state = {
                index: {
                    key: _flat(view, _get(state_dict, f"{own}outer_optimizer.{key}.", names))
                    if isinstance(value, str) and value == _ELEMENTWISE
                    else value
                    for key, value in per_param.items()
                }
                for index, per_param in opt["state"].items()
            }
            for per_param in state.values():  # back on φ's device, as the optimizer keeps them
                for key, value in per_param.items():
                    if key in self._elementwise[core.index]:
                        per_param[key] = value.to(core.phi.device)
            in_flight = []
            for j, item in enumerate(skeleton["in_flight"]):
                restored = {k: v for k, v in item.items() if k not in ("has_own", "has_share")}
                restored["mean"] = _flat(view, _get(state_dict, f"in_flight.{j}.mean.", names))
                restored["own"] = (
                    _flat(view, _get(state_dict, f"{own}in_flight.{j}.own.", names)) if item["has_own"] else None
                )
                has_share = item.get("has_share", False)
                restored["share"] = (
                    _flat(view, _get(state_dict, f"{own}in_flight.{j}.share.", names)) if has_share else None
                )
                in_flight.append(restored)
            fragments.append(
                {
                    "names": names,
                    "phi": _flat(view, _get(state_dict, f"{own}phi.", names)),
                    "outer_optimizer": {"param_groups": opt["param_groups"], "state": state},
                    "reducer": skeleton["reducer"],
                    "in_flight": in_flight,
                    "arrivals": skeleton["arrivals"],
                }
            )
        self.loco.load_state_dict({k: v for k, v in meta.items() if k != "fragments"} | {"fragments": fragments})


@dataclass
class _Meta:
    """Everything but the per-parameter tensors, as one opaque object: DCP pickles it whole instead of
    flattening its dicts and lists (whose lengths differ between a fresh wrapper and the saved one)."""

    value: dict[str, Any]


_ELEMENTWISE = "<per-parameter tensors>"
"""Stands for an outer-optimizer state tensor stored per parameter (under ``outer_optimizer.<state>.``)."""


def _elementwise_state_keys(optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's per-element state tensors (SGD with momentum: ``momentum_buffer``), found by
    one step of a deep copy on a zero gradient (the optimizer and φ are untouched)."""
    probe = copy.deepcopy(optimizer)
    params = [p for group in probe.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    probe.step()
    state = probe.state[params[0]] if params else {}
    return sorted(k for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == params[0].shape)


def _or_zeros(value: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if value is None else value


def _put(out: dict[str, Any], prefix: str, names: list[str], values: list[torch.Tensor]) -> None:
    out.update((prefix + name, value) for name, value in zip(names, values))


def _get(state_dict: dict[str, Any], prefix: str, names: list[str]) -> list[torch.Tensor]:
    return [state_dict[prefix + name] for name in names]


def _per_parameter(view: FragmentView, flat: torch.Tensor) -> list[torch.Tensor]:
    """A flat buffer in φ's layout (this rank's owned elements) → one tensor per parameter: a DTensor with the
    parameter's placements for an FSDP2 parameter, the full tensor for a replicated one (gathered inside the worker
    when its ranks split it: a collective on the inner group)."""
    values = view.local_values(flat)
    out = []
    for p, value, kind in zip(view.fragment.params, values, view.kinds):
        if kind == "sharded":
            # A copy, not a view of the flat buffer: torch 2.13's dcp.async_save stager fails on a DTensor whose
            # local tensor is a view into a larger storage ("copy_() on an invalid python storage").
            local = value.clone()
            value = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        out.append(value)
    return out


def _flat(view: FragmentView, values: list[torch.Tensor]) -> torch.Tensor:
    """The inverse of :func:`_per_parameter`: this rank's owned elements, flat fp32, in φ's layout (no
    collective: a replicated parameter's entry holds every element, the rank takes its chunk)."""
    buffer = torch.zeros(view.staging.numel(), dtype=torch.float32)
    cursor = {"sharded": 0, "replicated": view.sharded_numel}
    for value, kind in zip(values, view.kinds):
        local = value.to_local() if is_dtensor(value) else value
        n = local.numel()
        buffer[cursor[kind] : cursor[kind] + n].copy_(local.reshape(-1))
        cursor[kind] += n
    return torch.cat([buffer[a : a + n] for a, n in view.ranges])


def export_safetensors(source: DiLoCo | nn.Module, path: str | Path, *, rank: int | None = None) -> Path | None:
    """Write the final model as safetensors (call after ``finalize()``/``consolidate()``).

    ``source``: a :class:`eagerloco.DiLoCo` (its full outer parameters φ, gathered inside the worker: every rank of
    the worker must call this) or a module (its parameters). A Hugging Face ``PreTrainedModel`` is written with
    ``save_pretrained(path)`` (a directory: config and ``model.safetensors``, tied weights handled by transformers);
    anything else as one ``path`` file with a tensor per parameter name. Only global rank 0 (or ``rank``'s value,
    when given, 0) writes; returns the path written, or ``None`` on ranks that did not write.
    """
    from eagerloco.engine.diloco import DiLoCo

    if isinstance(source, DiLoCo):
        tensors = {name: value.detach().cpu().contiguous() for name, value in source.full_outer_parameters().items()}
        model = source.model.module if hasattr(source.model, "module") else source.model
    else:
        model = source
        tensors = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters()}
    if rank is None:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank != 0:
        return None
    path = Path(path)
    if hasattr(model, "save_pretrained"):
        if isinstance(source, DiLoCo) and not source.finalized:  # θ = φ only after finalize()
            raise RuntimeError("export_safetensors(loco) before loco.finalize(): the model does not hold φ yet")
        model.save_pretrained(path, safe_serialization=True)
        return path
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path
