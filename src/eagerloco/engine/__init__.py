"""The outer-step engine: four modes as strategies over a per-fragment core, streaming fragments, one recorder of
measurements (docs/engine.md shows who calls whom)."""

from eagerloco.engine.config import MODES, ConfigError, DiLoCoConfig
from eagerloco.engine.diloco import DiLoCo
from eagerloco.engine.errors import ModelMismatch, NonFiniteOuterGradient
from eagerloco.engine.fragments import Fragment, build_fragments, find_blocks
from eagerloco.engine.metrics import OuterStepRecord, RunStats
from eagerloco.engine.recorder import Measured, Recorder

__all__ = [
    "MODES",
    "ConfigError",
    "DiLoCo",
    "DiLoCoConfig",
    "Fragment",
    "Measured",
    "ModelMismatch",
    "NonFiniteOuterGradient",
    "OuterStepRecord",
    "Recorder",
    "RunStats",
    "build_fragments",
    "find_blocks",
]
