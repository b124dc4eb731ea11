"""The outer-step engine: one core, four modes as strategies, streaming fragments, measurements."""

from eagerloco.engine.config import MODES, ConfigError, DiLoCoConfig
from eagerloco.engine.diloco import DiLoCo, ModelMismatch, NonFiniteOuterGradient
from eagerloco.engine.fragments import Fragment, build_fragments, find_blocks
from eagerloco.engine.metrics import OuterStepRecord, RunStats

__all__ = [
    "MODES",
    "ConfigError",
    "DiLoCo",
    "DiLoCoConfig",
    "Fragment",
    "ModelMismatch",
    "NonFiniteOuterGradient",
    "OuterStepRecord",
    "RunStats",
    "build_fragments",
    "find_blocks",
]
