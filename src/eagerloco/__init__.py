"""eagerloco: low-communication distributed training with DiLoCo, Streaming DiLoCo and eager updates.

The public API is small: :class:`DiLoCo` wraps a model and its inner optimizer, :class:`DiLoCoConfig` says how the
workers synchronise, and :mod:`eagerloco.comm` provides the outer process group (``torch.distributed`` or M
simulated workers in one process). See ``ALGORITHMS.md`` for the exact semantics of each mode.

Exports are resolved lazily, so that tools which need no torch (``eagerloco simulate``) start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "MODES": "eagerloco.engine",
    "ConfigError": "eagerloco.engine",
    "DiLoCo": "eagerloco.engine",
    "DiLoCoConfig": "eagerloco.engine",
    "ModelMismatch": "eagerloco.engine",
    "NonFiniteOuterGradient": "eagerloco.engine",
    "OuterStepRecord": "eagerloco.engine",
    "RunStats": "eagerloco.engine",
    "EmulatedLink": "eagerloco.comm",
    "InProcessGroup": "eagerloco.comm",
    "TorchDistributedCommunicator": "eagerloco.comm",
    "run_workers": "eagerloco.comm",
    "WorkerLayout": "eagerloco.distributed",
    "two_level_mesh": "eagerloco.distributed",
}

__all__ = [
    "MODES",
    "ConfigError",
    "DiLoCo",
    "DiLoCoConfig",
    "EmulatedLink",
    "InProcessGroup",
    "ModelMismatch",
    "NonFiniteOuterGradient",
    "OuterStepRecord",
    "RunStats",
    "TorchDistributedCommunicator",
    "WorkerLayout",
    "run_workers",
    "two_level_mesh",
]

if TYPE_CHECKING:
    from eagerloco.comm import EmulatedLink, InProcessGroup, TorchDistributedCommunicator, run_workers
    from eagerloco.distributed import WorkerLayout, two_level_mesh
    from eagerloco.engine import (
        MODES,
        ConfigError,
        DiLoCo,
        DiLoCoConfig,
        ModelMismatch,
        NonFiniteOuterGradient,
        OuterStepRecord,
        RunStats,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'eagerloco' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
