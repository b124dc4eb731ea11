"""Compute-utilization simulator: how much bandwidth does each synchronisation method need?

An event simulation of the per-layer training DAG (forward, backward w.r.t. activations and parameters,
per-layer reductions on one shared FIFO link) for data-parallel, DiLoCo, Streaming DiLoCo, overlap and
eager / delayed updates, as in the Streaming DiLoCo paper's section 3.1. Methods are named as ``eagerloco train``
names its modes (``mode_method``, with train's defaults) or after the papers (``METHOD_PRESETS``). Pure Python:
no torch, matplotlib only for plots. See docs/simulator.md.

    >>> from eagerloco.simulator import LinkSpec, model_preset, method_preset, simulate
    >>> round(simulate(model_preset("1B"), method_preset("diloco"), LinkSpec(bandwidth_gbps=16.0)).cu, 4)
    0.9091
"""

from eagerloco.simulator.config import (
    ALLOWED_BITS,
    CODEC_BITS,
    FRAGMENT_LAYERS,
    TRAIN_SYNC_EVERY,
    LinkSpec,
    MethodSpec,
    ModelSpec,
    SimulatorConfigError,
)
from eagerloco.simulator.events import SimResult, simulate
from eagerloco.simulator.from_run import RunModel, load_run_summary
from eagerloco.simulator.presets import (
    DEFAULT_MODEL_PRESETS,
    METHOD_ALIASES,
    METHOD_PRESETS,
    MODEL_PRESETS,
    PAPER_SYNC_EVERY,
    TOKENS_PER_STEP_PAPER,
    TRAIN_DEFAULTS,
    TRAIN_MODES,
    compression_bits,
    customize_method,
    method_names,
    method_preset,
    mode_method,
    model_preset,
    step_time_from_flops,
)
from eagerloco.simulator.search import (
    BANDWIDTH_GRID_GBPS,
    CU_TARGETS,
    PAPER_GRID_GBPS,
    OverlapChoice,
    WallClockEstimate,
    bits_per_outer_step,
    cu_curve,
    estimate_wall_clock,
    link_rate_from_blocked,
    min_bandwidth_for_targets,
    smallest_hiding_overlap,
    sustained_bandwidth_bound_gbps,
)

__all__ = [
    "ALLOWED_BITS",
    "BANDWIDTH_GRID_GBPS",
    "CODEC_BITS",
    "CU_TARGETS",
    "DEFAULT_MODEL_PRESETS",
    "FRAGMENT_LAYERS",
    "METHOD_ALIASES",
    "METHOD_PRESETS",
    "MODEL_PRESETS",
    "PAPER_GRID_GBPS",
    "PAPER_SYNC_EVERY",
    "TOKENS_PER_STEP_PAPER",
    "TRAIN_DEFAULTS",
    "TRAIN_MODES",
    "TRAIN_SYNC_EVERY",
    "LinkSpec",
    "MethodSpec",
    "ModelSpec",
    "OverlapChoice",
    "RunModel",
    "SimResult",
    "SimulatorConfigError",
    "WallClockEstimate",
    "bits_per_outer_step",
    "compression_bits",
    "cu_curve",
    "customize_method",
    "estimate_wall_clock",
    "link_rate_from_blocked",
    "load_run_summary",
    "method_names",
    "method_preset",
    "min_bandwidth_for_targets",
    "mode_method",
    "model_preset",
    "simulate",
    "smallest_hiding_overlap",
    "step_time_from_flops",
    "sustained_bandwidth_bound_gbps",
]
