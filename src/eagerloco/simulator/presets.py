"""The papers' models and methods, and the step-time helper (Kaplan's 6·N·D rule).

Model presets (PAPER_FACTS, "The compute-utilization simulator"): parameter counts from the names; step times
as stated by the Streaming DiLoCo paper (Kaplan FLOPs at 60 % MFU). Llama-405B: 405e9 parameters, 126 layers;
DeepSeek-V3: all 671e9 parameters are synchronised (35B are active per token, which sets its step time),
61 layers.

Method presets (H = 100, fragments of 3 layers strided, as in the papers; bits 16 = bf16 unless named fp4):

    dp                  data-parallel: every layer's gradient all-reduced every inner step
    diloco              one fragment, blocking: the next step waits for the whole reduction
    streaming           P = ceil(L / 3) strided fragments, each blocking (τ = 0)
    streaming_tau1      streaming, overlap τ = 1 inner step
    streaming_tau1_fp4  streaming, τ = 1, 4-bit outer gradients
    eager               streaming fragments, eager updates with k = 1 outer step of slack
    eager_fp4           eager, 4-bit outer gradients

Delayed updates (ALGORITHMS.md section 3) have exactly eager's timing: use ``eager``.
"""

from __future__ import annotations

from dataclasses import replace

from eagerloco.simulator.config import MethodSpec, ModelSpec, SimulatorConfigError

MODEL_PRESETS: dict[str, ModelSpec] = {
    "1B": ModelSpec(name="1B", params=1e9, layers=24, step_time_s=0.1),
    "10B": ModelSpec(name="10B", params=10e9, layers=48, step_time_s=0.8),
    "100B": ModelSpec(name="100B", params=100e9, layers=108, step_time_s=4.9),
    "llama-405B": ModelSpec(name="llama-405B", params=405e9, layers=126, step_time_s=26.9),
    "deepseek-v3": ModelSpec(name="deepseek-v3", params=671e9, layers=61, step_time_s=20.1),
}
"""Model presets by name (looked up case-insensitively)."""

DEFAULT_MODEL_PRESETS: tuple[str, ...] = ("1B", "10B", "100B")
"""Presets covered when none are asked for."""

PAPER_SYNC_EVERY = 100
"""H in the papers' simulations."""

METHOD_PRESETS: dict[str, MethodSpec] = {
    "dp": MethodSpec(name="dp", data_parallel=True),
    "diloco": MethodSpec(name="diloco", fragments=1),
    "streaming": MethodSpec(name="streaming", fragments=None),
    "streaming_tau1": MethodSpec(name="streaming_tau1", fragments=None, overlap_steps=1),
    "streaming_tau1_fp4": MethodSpec(name="streaming_tau1_fp4", fragments=None, overlap_steps=1, bits=4),
    "eager": MethodSpec(name="eager", fragments=None, slack_outer_steps=1),
    "eager_fp4": MethodSpec(name="eager_fp4", fragments=None, slack_outer_steps=1, bits=4),
}
"""Method presets by name, in the order tables list them."""

TOKENS_PER_STEP_PAPER = 512 * 2048
"""Tokens per inner step (all workers together) of the eager paper's 1B Dolma runs: batch 512 × sequence
2,048 = 2^20. Derived, not stated: its compute-only time, 0.67 h for 25e9 tokens at T = 0.1 s, means
25e9 / (0.67·3600 / 0.1) = 1.04e6 tokens per step."""


def model_preset(name: str) -> ModelSpec:
    """The model preset called ``name`` (case-insensitive)."""
    for key, spec in MODEL_PRESETS.items():
        if key.lower() == name.lower():
            return spec
    raise SimulatorConfigError(f"unknown preset {name!r}: known presets are {', '.join(MODEL_PRESETS)}")


def method_preset(name: str) -> MethodSpec:
    """The method preset called ``name``."""
    if name not in METHOD_PRESETS:
        raise SimulatorConfigError(f"unknown method {name!r}: known methods are {', '.join(METHOD_PRESETS)}")
    return METHOD_PRESETS[name]


def customize_method(
    base: MethodSpec,
    *,
    sync_every: int | None = None,
    overlap_steps: int | None = None,
    slack_outer_steps: int | None = None,
    bits: int | None = None,
    fragments: int | None = None,
    layout: str | None = None,
    outer_ready: str | None = None,
) -> MethodSpec:
    """``base`` with the given fields replaced, named after what changed, e.g. ``diloco[tau=2,bits=8]``.

    Options of the outer step (sync_every, overlap, slack, fragments, layout, outer_ready) leave data-parallel
    unchanged: it has no outer step. Setting overlap_steps clears the slack and vice versa (they are
    exclusive); giving both non-zero is an error.
    """
    if overlap_steps and slack_outer_steps:
        raise SimulatorConfigError(
            f"overlap_steps={overlap_steps} and slack_outer_steps={slack_outer_steps}: choose one (a method "
            "overlaps either τ inner steps or k outer steps)"
        )
    changes: dict[str, object] = {}
    if bits is not None:
        changes["bits"] = bits
    if not base.data_parallel:
        if sync_every is not None:
            changes["sync_every"] = sync_every
        if overlap_steps is not None:
            changes["overlap_steps"] = overlap_steps
            changes["slack_outer_steps"] = 0
        if slack_outer_steps is not None:
            changes["slack_outer_steps"] = slack_outer_steps
            changes["overlap_steps"] = 0
        if fragments is not None:
            changes["fragments"] = fragments
        if layout is not None:
            changes["layout"] = layout
        if outer_ready is not None:
            changes["outer_ready"] = outer_ready
    # Options that every outer method shares (H, layout, readiness) are reported once by the caller, not
    # in each name.
    labels = {"overlap_steps": "tau", "slack_outer_steps": "k", "bits": "bits", "fragments": "P"}
    changed = [
        f"{label}={changes[key]}"
        for key, label in labels.items()
        if key in changes and getattr(base, key) != changes[key]
    ]
    name = f"{base.name}[{','.join(changed)}]" if changed else base.name
    return replace(base, name=name, **changes)  # type: ignore[arg-type]


def step_time_from_flops(
    params: float, tokens_per_step: float, chips: int, peak_flops_per_chip: float, mfu: float
) -> float:
    """Seconds per inner step by Kaplan's rule: T = 6·N·D / (chips · peak FLOP/s · MFU).

    N: parameters active per token; D: tokens per step over all ``chips`` (all workers together);
    6·N·D: the FLOPs of a forward and backward pass over D tokens.
    """
    for name, value in (("params", params), ("tokens_per_step", tokens_per_step)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise SimulatorConfigError(f"{name}={value!r}: must be a number > 0")
    if isinstance(chips, bool) or not isinstance(chips, int) or chips < 1:
        raise SimulatorConfigError(f"chips={chips!r}: must be an integer >= 1")
    if not isinstance(peak_flops_per_chip, (int, float)) or not peak_flops_per_chip > 0:
        raise SimulatorConfigError(f"peak_flops_per_chip={peak_flops_per_chip!r}: must be a number > 0")
    if not isinstance(mfu, (int, float)) or not 0 < mfu <= 1:
        raise SimulatorConfigError(f"mfu={mfu!r}: the model FLOPs utilization must be in (0, 1]")
    return 6.0 * params * tokens_per_step / (chips * peak_flops_per_chip * mfu)
