"""What the compute-utilization simulator is told: the model, the method and the link.

Units used throughout the simulator: seconds, bits, Gbit/s (1 Gbit/s = 1e9 bit/s), parameter counts as plain
numbers. Every dataclass validates itself on construction and raises :class:`SimulatorConfigError` naming the
field, the value and the rule it breaks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALLOWED_BITS: tuple[int, ...] = (32, 16, 8, 4)
"""The papers' bits per transmitted value: fp32, bf16, 8-bit (fp8 / int8), 4-bit (E3M0), block scales not counted.
Any number of bits in (0, MAX_BITS] is accepted (a codec's block scales add a fraction: see CODEC_BITS)."""

MAX_BITS = 32.0
"""The most bits per value a method may send (fp32)."""

TRAIN_SYNC_EVERY = 30
"""H of ``eagerloco train`` (``DiLoCoConfig.sync_every``): the default of every method that does not state one."""

CODEC_BLOCK_SIZE = 128
"""Values per fp32 scale in the block codecs (``eagerloco.compression.codecs.DEFAULT_BLOCK_SIZE``)."""

CODEC_BITS: dict[str, float] = {
    "none": 32.0,
    "bf16": 16.0,
    "fp16": 16.0,
    "fp8": 8.0 + 32.0 / CODEC_BLOCK_SIZE,
    "int8": 8.0 + 32.0 / CODEC_BLOCK_SIZE,
    "fp4": 4.0 + 32.0 / CODEC_BLOCK_SIZE,
}
"""Bits on the wire per value of each codec of ``eagerloco train --compression`` (the same names), block scales
included: fp8 / int8 send 8 bits and fp4 4 bits per value plus one fp32 scale per 128 values."""

FRAGMENT_LAYERS = 3
"""Layers per streaming fragment when the fragment count is not given: P = ceil(L / 3) (the papers' choice)."""

LAYOUTS: tuple[str, ...] = ("strided", "sequential")
"""Fragment layouts: 'strided' puts layer l in fragment l mod P; 'sequential' in fragment floor(l·P / L)."""

OUTER_READY: tuple[str, ...] = ("step-end", "backward")
"""When a layer's outer gradient may enter the link: 'step-end' (after the sync step's inner optimizer step,
the default) or 'backward' (as soon as the layer's backward w.r.t. parameters is done, the papers' DAG)."""


class SimulatorConfigError(ValueError):
    """A simulator input breaks a rule; the message names the value and the rule."""


def _check_positive(name: str, value: float, *, allow_inf: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise SimulatorConfigError(f"{name}={value!r}: must be a number")
    if value <= 0:
        raise SimulatorConfigError(f"{name}={value!r}: must be > 0")
    if math.isinf(value) and not allow_inf:
        raise SimulatorConfigError(f"{name}={value!r}: must be finite")


def _check_int(name: str, value: int, minimum: int, rule: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SimulatorConfigError(f"{name}={value!r}: {rule}")


@dataclass(frozen=True)
class ModelSpec:
    """A model as the simulator sees it: N parameters spread evenly over L layers, T seconds per inner step.

    Each layer holds N / L parameters (embeddings and head are folded into the layers) and costs T / L of
    compute per step, split into forward, backward w.r.t. activations and backward w.r.t. parameters.
    """

    name: str
    """Label used in tables, JSON and plots."""

    params: float
    """N: parameters synchronised by a reduction of the whole model (count)."""

    layers: int
    """L: repeated blocks (transformer layers); the unit of compute and of reduction."""

    step_time_s: float
    """T: seconds of compute per inner step of one worker (forward + backward, every layer)."""

    def __post_init__(self) -> None:
        _check_positive(f"{self.name}: params", self.params)
        _check_int(f"{self.name}: layers", self.layers, 1, "L must be an integer >= 1")
        _check_positive(f"{self.name}: step_time_s", self.step_time_s)

    @property
    def params_per_layer(self) -> float:
        """N / L."""
        return self.params / self.layers

    def default_fragments(self) -> int:
        """P for 3-layer fragments: ceil(L / 3), at least 1."""
        return max(1, math.ceil(self.layers / FRAGMENT_LAYERS))


@dataclass(frozen=True)
class MethodSpec:
    """A synchronisation method: when each layer is reduced and when its reduction must be back.

    Data-parallel reduces every layer's gradient every step and the next step waits for all of them. The
    outer methods reduce each fragment's outer gradient once every H steps, at the fragment's offset
    t_p = floor(p·H / P); the reduction launched after step s must be complete before the fragment's first
    forward of step s + 1 + D, with the delay D = τ (overlap τ inner steps) or D = k·H (delayed or eager with
    k outer steps of slack; both have the same timing) and D = 0 for blocking DiLoCo.
    """

    name: str
    """Label used in tables, JSON and plots."""

    data_parallel: bool = False
    """Reduce gradients every inner step (DDP baseline). The outer fields below are then ignored."""

    sync_every: int = TRAIN_SYNC_EVERY
    """H: inner steps between two sync points of a fragment (default 30, as ``eagerloco train``; the papers'
    presets state their H = 100)."""

    fragments: int | None = 1
    """P: fragments; None means one fragment per 3 layers of the model, ceil(L / 3)."""

    layout: str = "strided"
    """'strided' (layer l in fragment l mod P) or 'sequential' (fragment floor(l·P / L))."""

    overlap_steps: int = 0
    """τ: inner steps a fragment's next forward may run before its reduction must be back (0: blocking)."""

    slack_outer_steps: int = 0
    """k: outer steps of slack of delayed / eager updates (0: none). Exclusive with overlap_steps."""

    bits: float = 32.0
    """Bits per transmitted value: 32 (fp32, the default, as ``eagerloco train``), 16 (bf16), 8, 4 (FP4 E3M0), or
    a codec's bits with its block scales (CODEC_BITS: 8.25 for fp8 / int8, 4.25 for fp4); any number in (0, 32]."""

    gather: bool = False
    """Outer gradients travel by all-gather, each worker sending (M − 1)× its payload (the training engine's
    compressed reducer, any codec but 'none'), instead of a ring all-reduce, 2(M − 1)/M×. Same for M = 2."""

    outer_ready: str = "step-end"
    """When an outer gradient may enter the link: 'step-end' or 'backward' (see OUTER_READY)."""

    def __post_init__(self) -> None:
        label = f"method {self.name!r}"
        bits_ok = isinstance(self.bits, (int, float)) and not isinstance(self.bits, bool)
        if not (bits_ok and math.isfinite(self.bits) and 0 < self.bits <= MAX_BITS):
            raise SimulatorConfigError(
                f"{label}: bits={self.bits!r}: must be a number of bits per value in (0, {MAX_BITS:g}] "
                f"(the papers use {', '.join(map(str, ALLOWED_BITS))})"
            )
        _check_int(f"{label}: sync_every", self.sync_every, 1, "H must be an integer >= 1")
        if self.fragments is not None:
            _check_int(f"{label}: fragments", self.fragments, 1, "P must be an integer >= 1")
            if self.fragments > self.sync_every and not self.data_parallel:
                raise SimulatorConfigError(
                    f"{label}: fragments={self.fragments} > sync_every={self.sync_every}: each fragment needs "
                    "its own sync step inside the H inner steps, so P must be <= H"
                )
        if self.layout not in LAYOUTS:
            raise SimulatorConfigError(f"{label}: layout={self.layout!r}: must be one of {', '.join(LAYOUTS)}")
        _check_int(f"{label}: overlap_steps", self.overlap_steps, 0, "τ must be an integer >= 0")
        _check_int(f"{label}: slack_outer_steps", self.slack_outer_steps, 0, "k must be an integer >= 0")
        if self.overlap_steps >= self.sync_every and not self.data_parallel:
            raise SimulatorConfigError(
                f"{label}: overlap_steps={self.overlap_steps} >= sync_every={self.sync_every}: τ must be < H; "
                "for a whole outer step of slack use slack_outer_steps (eager / delayed)"
            )
        if self.overlap_steps and self.slack_outer_steps:
            raise SimulatorConfigError(
                f"{label}: overlap_steps={self.overlap_steps} and slack_outer_steps={self.slack_outer_steps}: "
                "a method overlaps either τ inner steps or k outer steps, not both"
            )
        if self.outer_ready not in OUTER_READY:
            raise SimulatorConfigError(
                f"{label}: outer_ready={self.outer_ready!r}: must be one of {', '.join(OUTER_READY)}"
            )

    def wire_factor(self, workers: int) -> float:
        """Data each worker sends per reduction, as a multiple of the reduced data: 2(M − 1)/M (ring all-reduce)
        or M − 1 (all-gather, ``gather``)."""
        if workers <= 1:
            return 0.0
        return float(workers - 1) if self.gather and not self.data_parallel else 2.0 * (workers - 1) / workers

    @property
    def delay_steps(self) -> int:
        """D: steps after the sync step at which the reduction is needed (0, τ or k·H); 0 for data-parallel."""
        if self.data_parallel:
            return 0
        return self.overlap_steps + self.slack_outer_steps * self.sync_every

    def num_fragments(self, model: ModelSpec) -> int:
        """P for this model: 1 for data-parallel, the given count, or ceil(L / 3); validated against L."""
        if self.data_parallel:
            return 1
        count = model.default_fragments() if self.fragments is None else self.fragments
        if count > model.layers:
            raise SimulatorConfigError(
                f"method {self.name!r}: fragments={count} > layers={model.layers} of model {model.name!r}: "
                "each fragment needs at least one layer"
            )
        if count > self.sync_every:
            raise SimulatorConfigError(
                f"method {self.name!r}: fragments={count} > sync_every={self.sync_every} for model "
                f"{model.name!r}: P must be <= H"
            )
        return count


@dataclass(frozen=True)
class LinkSpec:
    """The one link between the sites that every reduction shares, first in, first out.

    One per-layer reduction occupies the link for
        2(M − 1)·latency_s + (N / L)·bits·2(M − 1)/M / (bandwidth_gbps·1e9)   seconds
    (the α-β cost of a ring all-reduce over M workers; each worker sends 2(M − 1)/M of the data).
    """

    bandwidth_gbps: float
    """Link bandwidth in Gbit/s (1e9 bit/s); math.inf for an infinitely fast link."""

    workers: int = 2
    """M: workers (sites) taking part in every all-reduce."""

    latency_s: float = 0.0
    """One-way latency per ring hop, seconds (0: only bandwidth is modelled, as in the papers)."""

    def __post_init__(self) -> None:
        _check_positive("bandwidth_gbps", self.bandwidth_gbps, allow_inf=True)
        _check_int("workers", self.workers, 1, "M must be an integer >= 1")
        if isinstance(self.latency_s, bool) or not isinstance(self.latency_s, (int, float)):
            raise SimulatorConfigError(f"latency_s={self.latency_s!r}: must be a number")
        if not math.isfinite(self.latency_s) or self.latency_s < 0:
            raise SimulatorConfigError(f"latency_s={self.latency_s!r}: must be a finite number of seconds >= 0")

    @property
    def ring_factor(self) -> float:
        """2(M − 1)/M: data each worker sends in a ring all-reduce, as a multiple of the reduced data."""
        return 2.0 * (self.workers - 1) / self.workers

    def transfer_s(self, values: float, bits: float, factor: float | None = None) -> float:
        """Seconds one all-reduce of ``values`` values at ``bits`` bits holds the link:
        2(M − 1)·latency + values·bits·factor / (bandwidth·1e9), factor = 2(M − 1)/M unless given (the all-gather
        of a compressed method sends M − 1: :meth:`MethodSpec.wire_factor`)."""
        payload_bits = values * bits * (self.ring_factor if factor is None else factor)
        wire = 0.0 if payload_bits == 0 else payload_bits / (self.bandwidth_gbps * 1e9)
        return 2 * (self.workers - 1) * self.latency_s + wire
