"""Streaming fragments: which parameters sync together, and when (ALGORITHMS.md, section 5).

A model's parameters are split into P fragments. By default the repeated blocks of the model (the largest
``nn.ModuleList`` / ``nn.Sequential`` of modules, e.g. a transformer's layers) are assigned *strided*: block l goes
to fragment l mod P, as in the Streaming DiLoCo paper; *sequential* assigns P contiguous runs of blocks instead.

Parameters outside the repeated blocks (embeddings, final norm, output head) belong to a fragment too:

* those registered *before* the first block (typically the embeddings) go to fragment 0;
* those registered *after* the last block (final norm, head) go to fragment P − 1.

A parameter shared between modules (tied embeddings) is counted once, where it is first registered. Parameters
with ``requires_grad=False`` never change and are not synchronised. Fragment p syncs at inner steps
t ≡ t_p (mod H), t_p = p·H/P.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from eagerloco.engine.config import ConfigError


@dataclass
class Fragment:
    """One fragment: the live parameters θ it owns (in a fixed order) and their names."""

    index: int
    names: list[str]
    params: list[nn.Parameter]
    offset: int = 0
    """t_p: the fragment syncs at inner steps t ≡ offset (mod H)."""

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The model's trainable parameters in registration order, shared ones once."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def find_blocks(model: nn.Module) -> nn.ModuleList | nn.Sequential | None:
    """The model's repeated blocks: the ``ModuleList``/``Sequential`` with the most children holding trainable
    parameters (first one on ties), or ``None`` if there is none with at least two such children."""
    best: nn.Module | None = None
    best_count = 1
    for module in model.modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            count = sum(1 for child in module if any(p.requires_grad for p in child.parameters()))
            if count > best_count:
                best, best_count = module, count
    return best  # type: ignore[return-value]


def build_fragments(
    model: nn.Module,
    num_fragments: int,
    sync_every: int,
    layout: str = "strided",
    modules: Sequence[nn.Module | str | Sequence[nn.Module | str]] | None = None,
    blocks: Sequence[nn.Module] | None = None,
) -> list[Fragment]:
    """Split ``model``'s trainable parameters into fragments (see the module docstring).

    Args:
        model: the model whose parameters are synchronised.
        num_fragments: P.
        sync_every: H (for the offsets t_p = p·H/P).
        layout: 'strided' or 'sequential' (used when ``modules`` is not given).
        modules: explicit fragments: one module or list of modules per fragment; every trainable parameter of
            the model must be in exactly one of them. A module may also be given by name: a string is an
            ``fnmatch`` pattern over ``model.named_modules()`` names (``"transformer.h.[02]"``, ``"lm_head"``,
            ``"transformer.wte"``), standing for every module it matches (a pattern matching none is an error), so
            that a TOML file or a command line can name the fragments.
        blocks: the repeated blocks to stride over (default: :func:`find_blocks`).
    """
    named = trainable_named_parameters(model)
    if not named:
        raise ConfigError("the model has no trainable parameters (requires_grad=True): nothing to synchronise")
    name_of = {id(p): n for n, p in named}
    order = {id(p): i for i, (_, p) in enumerate(named)}

    if modules is not None:
        groups = [_params_of(_resolve_patterns(model, group)) for group in modules]
        if len(groups) != num_fragments:
            raise ConfigError(
                f"{len(groups)} explicit fragments given but num_fragments={num_fragments}: they must match"
            )
        assignment: dict[int, int] = {}
        for index, group in enumerate(groups):
            trainable = [p for p in group if p.requires_grad]
            if not trainable:
                raise ConfigError(f"fragment {index} is empty: its modules hold no trainable parameters")
            for p in trainable:
                if id(p) not in name_of:
                    raise ConfigError(f"fragment {index} holds a parameter that is not in the model")
                if id(p) in assignment and assignment[id(p)] != index:
                    raise ConfigError(
                        f"fragments {assignment[id(p)]} and {index} overlap: both hold parameter {name_of[id(p)]!r}"
                    )
                assignment[id(p)] = index
        missing = [n for n, p in named if id(p) not in assignment]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ConfigError(f"parameters missing from all fragments: {shown}")
    elif num_fragments == 1:
        assignment = {id(p): 0 for _, p in named}
    else:
        block_list = list(blocks) if blocks is not None else list(find_blocks(model) or [])
        block_params = [[p for p in b.parameters() if p.requires_grad] for b in block_list]
        block_params = [ps for ps in block_params if ps]
        if len(block_params) < num_fragments:
            raise ConfigError(
                f"num_fragments={num_fragments} but the model has {len(block_params)} repeated blocks with "
                "trainable parameters (the largest nn.ModuleList/nn.Sequential): each fragment needs at least one "
                "block; lower num_fragments or pass explicit fragments"
            )
        assignment = {}
        count = len(block_params)
        for index, ps in enumerate(block_params):
            frag = index % num_fragments if layout == "strided" else index * num_fragments // count
            for p in ps:
                assignment.setdefault(id(p), frag)
        first_block = min(order[id(p)] for ps in block_params for p in ps)
        for _, p in named:  # outside the blocks: before them → fragment 0, after them → fragment P − 1
            if id(p) not in assignment:
                assignment[id(p)] = 0 if order[id(p)] < first_block else num_fragments - 1

    fragments = [
        Fragment(index=i, names=[], params=[], offset=i * sync_every // num_fragments) for i in range(num_fragments)
    ]
    for n, p in named:
        fragments[assignment[id(p)]].names.append(n)
        fragments[assignment[id(p)]].params.append(p)
    for fragment in fragments:
        if not fragment.params:
            raise ConfigError(f"fragment {fragment.index} is empty")
        devices = {p.device for p in fragment.params}
        if len(devices) > 1:
            raise ConfigError(
                f"fragment {fragment.index} spans devices {sorted(map(str, devices))}: a fragment's parameters "
                "must live on one device"
            )
    return fragments


def _resolve_patterns(model: nn.Module, group: object) -> nn.Module | list[nn.Module]:
    """Replace module-name patterns (strings) in one explicit fragment by the modules they match."""
    items = [group] if isinstance(group, (str, nn.Module)) else list(group)  # type: ignore[call-overload]
    if not any(isinstance(item, str) for item in items):
        return group  # type: ignore[return-value]
    named = list(model.named_modules())
    out: list[nn.Module] = []
    for item in items:
        if not isinstance(item, str):
            out.append(item)
            continue
        matched = [module for name, module in named if fnmatch.fnmatchcase(name, item)]
        if not matched:
            sample = ", ".join(repr(name) for name, _ in named[1:6])
            raise ConfigError(f"fragment pattern {item!r} matches no module of the model (module names: {sample}, ...)")
        out.extend(matched)
    return out


def _params_of(group: nn.Module | Sequence[nn.Module]) -> list[torch.nn.Parameter]:
    modules = [group] if isinstance(group, nn.Module) else list(group)
    seen: dict[int, torch.nn.Parameter] = {}
    for module in modules:
        if not isinstance(module, nn.Module):
            raise ConfigError(f"explicit fragments must be nn.Module or lists of them, got {type(module).__name__}")
        for p in module.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())
