"""eagerloco: low-communication distributed training with DiLoCo, Streaming DiLoCo and eager updates.

The public API is small: :class:`DiLoCo` wraps a model and its inner optimizer, :class:`DiLoCoConfig` says how the
workers synchronise, and :mod:`eagerloco.comm` provides the outer process group (``torch.distributed`` or M
simulated workers in one process). See ``ALGORITHMS.md`` for the exact semantics of each mode.
"""

from eagerloco.comm import EmulatedLink, InProcessGroup, TorchDistributedCommunicator, run_workers
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

__version__ = "0.1.0"

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
    "run_workers",
]
