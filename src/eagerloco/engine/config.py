"""The outer loop's configuration: one typed dataclass, validated before training starts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

Mode = Literal["sync", "overlap", "delayed", "eager"]
MODES: tuple[str, ...] = get_args(Mode)
FragmentLayout = Literal["strided", "sequential"]
Codec = Literal["none", "bf16", "fp16", "fp8", "int8", "fp4"]
"""Codec names for outer gradients, from widest to narrowest (``eagerloco.compression.CODECS`` holds the same)."""
CODEC_NAMES: tuple[str, ...] = get_args(Codec)


REMOVED_FIELDS: dict[str, tuple[object, str, str]] = {
    "eager_lookahead": (False, "4.2", "c512a86"),
    "eager_swap_steps": (None, "4.3", "dd1063f"),
}
"""Fields of :class:`DiLoCoConfig` that were removed after their measurement, each with the value that meant "off",
its ALGORITHMS.md section and the last commit that has it: a saved configuration (checkpoint, config.json) that has
it off (or lacks it) still loads; on, it is refused in one line that names that commit."""


class ConfigError(ValueError):
    """A configuration value breaks a rule. The message names the field, the value and the rule."""


@dataclass
class DiLoCoConfig:
    """How workers synchronise. Semantics: ``ALGORITHMS.md`` (sections 1-7).

    The defaults are the papers': eager with one outer step of slack and the eager paper's rule (w = 1/M), H = 30,
    DiLoCo's outer SGD (lr 0.7, Nesterov momentum 0.9; the streaming and eager papers use lr 0.4 at scale).
    ``eagerloco train`` instead runs each mode's outer optimizer measured best at small scale, by H
    (``eagerloco.lm.config.recipes_for``, BENCHMARKS.md section 8).
    """

    mode: Mode = "eager"
    """'sync' (DiLoCo, section 1), 'overlap' (Streaming DiLoCo's τ-step overlap, section 2), 'delayed' (naive
    k-outer-step delay, section 3) or 'eager' (eager updates with k outer steps of slack, section 4)."""

    sync_every: int = 30
    """H: inner steps between two sync points of a fragment."""

    num_fragments: int = 1
    """P: streaming fragments. Fragment p syncs at inner steps t ≡ p·H/P (mod H); P must divide H."""

    fragment_layout: FragmentLayout = "strided"
    """How repeated blocks map to fragments: 'strided' (block l → fragment l mod P, the papers' choice) or
    'sequential' (P contiguous runs of blocks). Ignored when the caller passes explicit fragments."""

    overlap_steps: int = 1
    """τ (mode 'overlap' only): inner steps an all-reduce may take before it is waited for; 0 ≤ τ < H. τ = 0
    waits at once and loads φ̃ into θ (no local steps were taken meanwhile, so α does not apply): that is sync."""

    alpha: float = 0.5
    """α (mode 'overlap' only): θ ← α·θ + (1 − α)·φ̃ when the average arrives. 0 discards the τ local steps
    taken meanwhile, 0.5 averages them in."""

    delay: int = 1
    """k (modes 'delayed' and 'eager'): outer steps a collective may take before anyone blocks on it; k ≥ 1."""

    eager_own_weight: float | None = None
    """w (mode 'eager' only, opt-in): the weight of a worker's own fresh outer gradient in
    Δ̃_m(t) = Δ(t − kH) + w·(Δ_m(t) − Δ_m(t − kH)), w ∈ [1/M, 1]. ``None``: w = 1/M, the eager paper's rule.
    w = 1: each worker applies its fresh Δ_m(t) as a stand-in for the fresh average and swaps it for the true
    average on arrival, so the mean over workers of what they apply is DiLoCo's fresh Δ(t) at any M
    (ALGORITHMS.md section 4.1). A w below 1/M is refused when the engine learns M."""

    eager_smoothing: float = 0.0
    """β (mode 'eager' only, opt-in): the part of each arriving average Δ(t − kH) that the worker has not applied
    yet, its rest R_m(t − kH) = Δ(t − kH) − w·Δ_m(t − kH), is applied in two instalments: (1 − β) on arrival and
    β at the next arrival, one outer step later, so that Δ̃_m(t) = w·Δ_m(t) + (1 − β)·R_m(t − kH) + β·R_m(t − 2kH)
    (ALGORITHMS.md section 4.4). β ∈ [0, 1]; 0: the rule of section 4 (or 4.1), bit for bit."""

    outer_lr: float = 0.7
    """Learning rate of the default outer optimizer (0.7 in DiLoCo; the streaming and eager papers use 0.4)."""

    outer_momentum: float = 0.9
    """Momentum of the default outer optimizer (SGD)."""

    nesterov: bool = True
    """Nesterov momentum for the default outer optimizer."""

    outer_device: str | None = None
    """Device of the outer parameters φ and the outer optimizer state ('cpu' to offload them from the GPU).
    ``None``: the model's device."""

    compression: Codec = "none"
    """Codec for outer gradients on the wire: 'none' (fp32), 'bf16', 'fp16', 'fp8', 'int8', 'fp4'."""

    error_feedback: bool = False
    """Carry each worker's encoding residual into its next outer gradient (compression only)."""

    collective_timeout_s: float | None = 600.0
    """Seconds any wait on an outer collective may block before raising :class:`CollectiveTimeout`, which names
    the outer step, the fragment and the peers that did not answer (``None``: the communicator's own, which is
    forever for an :class:`InProcessGroup` without a timeout). Raise it for collectives that legitimately take
    longer (huge fragments on slow links in mode 'sync')."""

    nonfinite: Literal["raise", "skip"] = "raise"
    """What every worker does when an outer gradient to apply holds NaN or Inf (from any worker): 'raise'
    :class:`NonFiniteOuterGradient` on every worker at the same outer step, or 'skip' that outer step on every
    worker (φ and the outer optimizer state untouched, θ ← φ). Either way φ never becomes non-finite. See
    docs/reliability.md."""

    broadcast_initial_parameters: bool = True
    """At start, overwrite every worker's parameters with worker 0's, so all workers begin from the same φ_0
    even when the user seeded them differently."""

    divergence_every: int = 0
    """Every this many outer steps of fragment 0, measure ‖φ_m − mean_m φ_m‖ across workers (one blocking
    all-reduce of φ, counted as diagnostic traffic). 0: never. Meaningful for eager, where φ_m differ."""

    def validate(self) -> DiLoCoConfig:
        """Check every rule; raise :class:`ConfigError` naming the field, the value and the rule."""

        def bad(name: str, rule: str) -> ConfigError:
            return ConfigError(f"{name}={getattr(self, name)!r}: {rule}")

        if self.mode not in MODES:
            raise bad("mode", f"must be one of {', '.join(MODES)}")
        _check_int(self, "sync_every", 1, "H must be an integer >= 1")
        _check_int(self, "num_fragments", 1, "P must be an integer >= 1")
        if self.sync_every % self.num_fragments != 0:
            raise ConfigError(
                f"num_fragments={self.num_fragments} does not divide sync_every={self.sync_every}: fragment p "
                "syncs at offset p·H/P, so P must divide H"
            )
        if self.fragment_layout not in ("strided", "sequential"):
            raise bad("fragment_layout", "must be 'strided' or 'sequential'")
        _check_int(self, "overlap_steps", 0, "τ must be an integer >= 0")
        if self.mode == "overlap" and self.overlap_steps >= self.sync_every:
            raise ConfigError(
                f"overlap_steps={self.overlap_steps} >= sync_every={self.sync_every}: τ must be < H (the "
                "average must arrive before the fragment's next sync point); use mode 'eager' or 'delayed' for a "
                "whole outer step of slack"
            )
        if not isinstance(self.alpha, (int, float)) or not 0.0 <= float(self.alpha) <= 1.0:
            raise bad("alpha", "α must be a number in [0, 1]")
        _check_int(self, "delay", 1, "k must be an integer >= 1")
        weight = self.eager_own_weight
        if weight is not None:
            number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
            if not (number and math.isfinite(weight) and 0 < weight <= 1):
                raise bad(
                    "eager_own_weight", "the own-contribution weight w must be a number in [1/M, 1], or None (1/M)"
                )
            if self.mode != "eager":
                raise bad("eager_own_weight", f"applies to mode 'eager' only (mode={self.mode!r}): leave it None")
        smoothing = self.eager_smoothing
        number = isinstance(smoothing, (int, float)) and not isinstance(smoothing, bool)
        if not (number and 0.0 <= smoothing <= 1.0):
            raise bad("eager_smoothing", "β, the share of each average's rest applied one outer step later, must be a "
                      "number in [0, 1]")  # fmt: skip
        if smoothing != 0 and self.mode != "eager":
            raise bad("eager_smoothing", f"applies to mode 'eager' only (mode={self.mode!r}): leave it 0")
        for name in ("outer_lr", "outer_momentum"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise bad(name, "must be a finite number >= 0")
        if self.outer_lr == 0:
            raise bad("outer_lr", "must be > 0 (0 would never move the outer parameters)")
        if self.outer_momentum >= 1:
            raise bad("outer_momentum", "must be < 1")
        timeout = self.collective_timeout_s
        number = isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
        if timeout is not None and not (number and math.isfinite(timeout) and timeout > 0):
            raise bad("collective_timeout_s", "must be a finite number of seconds > 0, or None")
        if self.nonfinite not in ("raise", "skip"):
            raise bad("nonfinite", "must be 'raise' or 'skip'")
        _check_int(self, "divergence_every", 0, "must be an integer >= 0 (0 disables the measurement)")
        if self.compression not in CODEC_NAMES:
            raise bad("compression", f"unknown codec; valid codecs: {', '.join(CODEC_NAMES)}")
        if self.error_feedback and self.compression == "none":
            raise ConfigError("error_feedback=True needs a lossy codec: compression='none' has no residual")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DiLoCoConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown DiLoCoConfig field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**values)


def _check_int(config: DiLoCoConfig, name: str, minimum: int, rule: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r}: {rule}")
