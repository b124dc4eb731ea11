"""Compute-utilization simulator: how much bandwidth does each synchronisation method need?

An event simulation of the per-layer training DAG (forward, backward w.r.t. activations and parameters,
per-layer reductions on one shared FIFO link) for data-parallel, DiLoCo, Streaming DiLoCo, overlap and
eager / delayed updates, as in the Streaming DiLoCo paper's section 3.1. Pure Python: no torch, matplotlib
only for plots. See docs/simulator.md.

    >>> from eagerloco.simulator import LinkSpec, model_preset, method_preset, simulate
    >>> round(simulate(model_preset("1B"), method_preset("diloco"), LinkSpec(bandwidth_gbps=16.0)).cu, 4)
    0.9091
"""

from eagerloco.simulator.config import (
    ALLOWED_BITS,
    FRAGMENT_LAYERS,
    LinkSpec,
    MethodSpec,
    ModelSpec,
    SimulatorConfigError,
)
from eagerloco.simulator.events import SimResult, simulate
from eagerloco.simulator.from_run import RunModel, load_run_summary
from eagerloco.simulator.presets import (
    DEFAULT_MODEL_PRESETS,
    METHOD_PRESETS,
    MODEL_PRESETS,
    TOKENS_PER_STEP_PAPER,
    customize_method,
    method_preset,
    model_preset,
    step_time_from_flops,
)
from eagerloco.simulator.search import (
    BANDWIDTH_GRID_GBPS,
    CU_TARGETS,
    WallClockEstimate,
    bits_per_outer_step,
    cu_curve,
    estimate_wall_clock,
    min_bandwidth_for_targets,
    sustained_bandwidth_bound_gbps,
)

__all__ = [
    "ALLOWED_BITS",
    "BANDWIDTH_GRID_GBPS",
    "CU_TARGETS",
    "DEFAULT_MODEL_PRESETS",
    "FRAGMENT_LAYERS",
    "METHOD_PRESETS",
    "MODEL_PRESETS",
    "TOKENS_PER_STEP_PAPER",
    "LinkSpec",
    "MethodSpec",
    "ModelSpec",
    "RunModel",
    "SimResult",
    "SimulatorConfigError",
    "WallClockEstimate",
    "bits_per_outer_step",
    "cu_curve",
    "customize_method",
    "estimate_wall_clock",
    "load_run_summary",
    "method_preset",
    "min_bandwidth_for_targets",
    "model_preset",
    "simulate",
    "step_time_from_flops",
    "sustained_bandwidth_bound_gbps",
]
