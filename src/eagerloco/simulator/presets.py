"""The papers' models and methods, and the step-time helper (Kaplan's 6·N·D rule).

Model presets (PAPER_FACTS, "The compute-utilization simulator"): parameter counts from the names; step times
as stated by the Streaming DiLoCo paper (Kaplan FLOPs at 60 % MFU). Llama-405B: 405e9 parameters, 126 layers;
DeepSeek-V3: all 671e9 parameters are synchronised (35B are active per token, which sets its step time),
61 layers.

Methods come in two families.

Training modes, with ``eagerloco train``'s names and defaults (H = 30, P = 1 fragment, fp32 outer gradients by
ring all-reduce, τ = 1, k = 1), changed by the same options as ``train`` (--sync-every, --num-fragments,
--overlap-steps, --delay, --compression):

    dp          data-parallel: every layer's gradient all-reduced every inner step (fp32)
    sync        blocking DiLoCo (Streaming DiLoCo without overlap when P > 1)
    overlap     Streaming DiLoCo's overlap: each fragment's average is waited for τ inner steps later
    delayed     k outer steps of slack (ALGORITHMS.md section 3; the same timing as eager)
    eager       eager updates with k outer steps of slack

The papers' presets, which state everything they reproduce (H = 100, bf16, fragments of 3 layers strided; the
default table):

    dp_bf16              data-parallel, bf16 gradients
    diloco               one fragment, blocking: the next step waits for the whole reduction
    streaming            P = ceil(L / 3) strided fragments, each blocking (τ = 0)
    streaming_tau1       streaming, overlap τ = 1 inner step
    streaming_tau1_fp4   streaming, τ = 1, 4-bit outer gradients
    streaming_eager      streaming fragments, eager updates with k = 1 outer step of slack
    streaming_eager_fp4  streaming_eager, 4-bit outer gradients (old name: eager_fp4)

The names 'dp' and 'eager' meant the papers' bf16 data-parallel and streaming eager before the training modes
took them; they are now 'dp_bf16' and 'streaming_eager'.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from eagerloco.simulator.config import (
    ALLOWED_BITS,
    CODEC_BITS,
    TRAIN_SYNC_EVERY,
    MethodSpec,
    ModelSpec,
    SimulatorConfigError,
)

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
"""H in the papers' simulations (stated by every paper preset)."""

PAPER_BITS = 16
"""bf16: the papers' outer gradients unless a preset says fp4."""

METHOD_PRESETS: dict[str, MethodSpec] = {
    "dp_bf16": MethodSpec(name="dp_bf16", data_parallel=True, bits=PAPER_BITS, sync_every=PAPER_SYNC_EVERY),
    "diloco": MethodSpec(name="diloco", fragments=1, bits=PAPER_BITS, sync_every=PAPER_SYNC_EVERY),
    "streaming": MethodSpec(name="streaming", fragments=None, bits=PAPER_BITS, sync_every=PAPER_SYNC_EVERY),
    "streaming_tau1": MethodSpec(
        name="streaming_tau1", fragments=None, overlap_steps=1, bits=PAPER_BITS, sync_every=PAPER_SYNC_EVERY
    ),
    "streaming_tau1_fp4": MethodSpec(
        name="streaming_tau1_fp4", fragments=None, overlap_steps=1, bits=4, sync_every=PAPER_SYNC_EVERY
    ),
    "streaming_eager": MethodSpec(
        name="streaming_eager", fragments=None, slack_outer_steps=1, bits=PAPER_BITS, sync_every=PAPER_SYNC_EVERY
    ),
    "streaming_eager_fp4": MethodSpec(
        name="streaming_eager_fp4", fragments=None, slack_outer_steps=1, bits=4, sync_every=PAPER_SYNC_EVERY
    ),
}
"""The papers' method presets by name, in the order tables list them (the default methods)."""

METHOD_ALIASES: dict[str, str] = {"eager_fp4": "streaming_eager_fp4"}
"""Old preset names that still work."""

TRAIN_MODES: tuple[str, ...] = ("dp", "sync", "overlap", "delayed", "eager")
"""The modes of ``eagerloco train --mode``, usable as method names."""

TRAIN_DEFAULTS: dict[str, Any] = {
    "sync_every": TRAIN_SYNC_EVERY,
    "num_fragments": 1,
    "overlap_steps": 1,
    "delay": 1,
    "compression": "none",
}
"""``eagerloco train``'s defaults of the options a training mode takes (``DiLoCoConfig``)."""

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


def method_names() -> list[str]:
    """Every accepted method name: the training modes, the papers' presets, the old aliases."""
    return [*TRAIN_MODES, *METHOD_PRESETS, *METHOD_ALIASES]


def method_preset(name: str) -> MethodSpec:
    """The papers' preset called ``name`` (or an old alias of one), or training mode ``name`` with train's
    defaults (:func:`mode_method`)."""
    if name in TRAIN_MODES:
        return mode_method(name)
    if name in METHOD_ALIASES:
        name = METHOD_ALIASES[name]
    if name not in METHOD_PRESETS:
        raise SimulatorConfigError(f"unknown method {name!r}: known methods are {', '.join(method_names())}")
    return METHOD_PRESETS[name]


def compression_bits(value: str | float) -> tuple[float, bool]:
    """``(bits per value, gather)`` of a codec name of ``eagerloco train --compression`` (CODEC_BITS; every codec
    but 'none' travels by all-gather), or of a plain bit count 32, 16, 8 or 4 (the papers': ring all-reduce, no
    block scales)."""
    if isinstance(value, str) and value in CODEC_BITS:
        return CODEC_BITS[value], value != "none"
    try:
        bits = float(value)
    except (TypeError, ValueError):
        bits = math.nan
    if bits in ALLOWED_BITS:
        return bits, False
    raise SimulatorConfigError(
        f"compression {value!r}: must be a codec ({', '.join(CODEC_BITS)}) or bits per value "
        f"({', '.join(map(str, ALLOWED_BITS))})"
    )


def mode_method(
    mode: str,
    *,
    sync_every: int | None = None,
    num_fragments: int | None = None,
    overlap_steps: int | None = None,
    delay: int | None = None,
    compression: str | float | None = None,
    layout: str | None = None,
    outer_ready: str | None = None,
) -> MethodSpec:
    """Training mode ``mode`` ('dp', 'sync', 'overlap', 'delayed' or 'eager') as ``eagerloco train --mode`` runs
    it: options not given take train's defaults (TRAIN_DEFAULTS). As in ``train``, ``overlap_steps`` matters only
    to 'overlap' and ``delay`` only to 'delayed' and 'eager'; 'dp' averages fp32 gradients and takes none. The name
    says what differs from train's defaults (H excepted: it is printed once), e.g. ``eager[P=2,k=2,fp4]``."""
    if mode not in TRAIN_MODES:
        raise SimulatorConfigError(f"unknown mode {mode!r}: the training modes are {', '.join(TRAIN_MODES)}")
    codec = TRAIN_DEFAULTS["compression"] if compression is None or mode == "dp" else compression
    bits, gather = compression_bits(codec)
    labels = []
    if num_fragments is not None and num_fragments != TRAIN_DEFAULTS["num_fragments"] and mode != "dp":
        labels.append(f"P={num_fragments}")
    tau = TRAIN_DEFAULTS["overlap_steps"] if overlap_steps is None else overlap_steps
    k = TRAIN_DEFAULTS["delay"] if delay is None else delay
    if mode == "overlap" and tau != TRAIN_DEFAULTS["overlap_steps"]:
        labels.append(f"tau={tau}")
    if mode in ("delayed", "eager") and k != TRAIN_DEFAULTS["delay"]:
        labels.append(f"k={k}")
    if mode in ("delayed", "eager") and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise SimulatorConfigError(f"mode {mode!r}: delay={k!r}: k must be an integer >= 1")
    if codec != TRAIN_DEFAULTS["compression"]:
        labels.append(str(codec) if isinstance(codec, str) and codec in CODEC_BITS else f"bits={codec:g}")
    name = f"{mode}[{','.join(labels)}]" if labels else mode
    return MethodSpec(
        name=name,
        data_parallel=mode == "dp",
        sync_every=TRAIN_DEFAULTS["sync_every"] if sync_every is None else sync_every,
        fragments=TRAIN_DEFAULTS["num_fragments"] if num_fragments is None or mode == "dp" else num_fragments,
        layout=layout or "strided",
        overlap_steps=tau if mode == "overlap" else 0,
        slack_outer_steps=k if mode in ("delayed", "eager") else 0,
        bits=bits,
        gather=gather,
        outer_ready=outer_ready or "step-end",
    )


def customize_method(
    base: MethodSpec,
    *,
    sync_every: int | None = None,
    overlap_steps: int | None = None,
    slack_outer_steps: int | None = None,
    bits: float | None = None,
    fragments: int | None = None,
    layout: str | None = None,
    outer_ready: str | None = None,
    compression: str | float | None = None,
) -> MethodSpec:
    """``base`` with the given fields replaced, named after what changed, e.g. ``diloco[tau=2,bits=8]``.

    ``compression`` is a codec name of ``eagerloco train`` or a bit count (:func:`compression_bits`); it sets
    ``bits`` and ``gather`` and wins over ``bits``.

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
    codec_label = None
    if compression is not None:
        bits, gather = compression_bits(compression)
        changes["gather"] = gather
        if isinstance(compression, str) and compression in CODEC_BITS:
            codec_label = compression
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
        f"{label}={changes[key]:g}" if isinstance(changes[key], float) else f"{label}={changes[key]}"
        for key, label in labels.items()
        if key in changes and getattr(base, key) != changes[key]
    ]
    if codec_label is not None and (base.bits, base.gather) != (changes["bits"], changes["gather"]):
        changed = [c for c in changed if not c.startswith("bits=")] + [codec_label]
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
