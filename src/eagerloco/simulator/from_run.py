"""Read what a training run measured and how it ran: ``RUN_DIR/summary.json`` and ``RUN_DIR/config.json``, both
written by ``eagerloco train``.

summary.json gives the model (parameters, layers, measured seconds per inner step) and what the run measured
(compute utilization, seconds blocked per outer step); config.json (or, for older runs, summary.json's copies)
gives the method (mode, H, P, layout, τ, k, codec) and the link (workers, emulated Mbit/s and latency)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eagerloco.simulator.config import CODEC_BITS, LAYOUTS, ModelSpec, SimulatorConfigError
from eagerloco.simulator.presets import TRAIN_MODES

SUMMARY_FILE = "summary.json"
"""The file a training run writes at its end, inside its run directory."""

CONFIG_FILE = "config.json"
"""The run's resolved configuration (``TrainConfig.to_dict()``), written when it starts."""


@dataclass(frozen=True)
class RunModel:
    """What a run's summary and configuration tell the simulator."""

    model: ModelSpec
    """Parameter count, layers and the measured mean seconds per inner step."""
    sync_every: int | None
    """H of the run, if recorded."""
    fragments: int | None
    """P of the run, if recorded."""
    workers: int | None
    """M of the run, if recorded."""
    mode: str | None = None
    """The run's mode ('dp', 'sync', 'overlap', 'delayed', 'eager'), if recorded."""
    overlap_steps: int | None = None
    """τ of the run (config.json outer.overlap_steps), if recorded."""
    delay: int | None = None
    """k of the run (config.json outer.delay), if recorded."""
    compression: str | None = None
    """The run's codec (config.json outer.compression), if recorded."""
    layout: str | None = None
    """The run's fragment layout (config.json outer.fragment_layout), if recorded."""
    link_mbit: float | None = None
    """The emulated link rate of the run in Mbit/s (0: none, the real transport only), if recorded."""
    link_latency_ms: float | None = None
    """The emulated one-way latency per collective in ms, if recorded."""
    measured_cu: float | None = None
    """The compute utilization the run measured over all of it (summary.json 'utilization': mean over workers,
    start-up and the final drain included)."""
    measured_blocked_s: float | None = None
    """Seconds the run blocked on outer collectives per outer step (summary.json 'blocked_per_outer_step_s')."""
    measured_cu_steady: float | None = None
    """The run's steady-state CU, what a long run approaches: the mean over workers of the engine's
    'steady_utilization' (summary.json 'per_worker'; ALGORITHMS.md section 10), or for runs written before it
    reported one, of inner_s / (wall_s − finalize_blocked_s)."""
    measured_blocked_per_period_s: float | None = None
    """Seconds blocked per H inner steps (the simulator's period): 'blocked_per_outer_step_s' times the outer
    steps per H inner steps (P with P fragments, each a record of its own), from summary.json's 'outer_steps' and
    the workers' 'inner_steps'; None when they are not recorded and P > 1."""


def _number(value: object) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_number(summary_path: Path, key: str, value: object, *, integer: bool) -> float:
    kind = "an integer" if integer else "a number"
    ok = _number(value) and value > 0  # type: ignore[operator]
    if ok and integer and not float(value).is_integer():  # type: ignore[arg-type]
        ok = False
    if not ok:
        raise SimulatorConfigError(f"{summary_path}: {key}={value!r}: must be {kind} > 0")
    return float(value)  # type: ignore[arg-type]


def _read_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SimulatorConfigError(f"{path}: cannot read it as JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise SimulatorConfigError(f"{path}: must hold a JSON object, not {type(data).__name__}")
    return data


def _choice(path: Path, key: str, value: object, choices: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    if value not in choices:
        raise SimulatorConfigError(f"{path}: {key}={value!r}: must be one of {', '.join(choices)}")
    return str(value)


def _steady_cu(per_worker: object) -> float | None:
    """Mean over workers of 'steady_utilization', or (older runs) of inner_s / (wall_s − finalize_blocked_s);
    None unless every worker recorded one of them."""
    if not isinstance(per_worker, list) or not per_worker:
        return None
    if all(isinstance(w, dict) and _number(w.get("steady_utilization")) for w in per_worker):
        return sum(w["steady_utilization"] for w in per_worker) / len(per_worker)
    cus = []
    for worker in per_worker:
        values = [worker.get(k) if isinstance(worker, dict) else None for k in ("inner_s", "wall_s")]
        drain = worker.get("finalize_blocked_s", 0.0) if isinstance(worker, dict) else None
        numbers = [*values, drain]
        if not all(_number(v) for v in numbers):
            return None
        inner, wall = values
        if wall - drain <= 0:  # type: ignore[operator]
            return None
        cus.append(inner / (wall - drain))  # type: ignore[operator]
    return sum(cus) / len(cus)


def load_run_summary(run_dir: str | Path, *, layers: int | None = None) -> RunModel:
    """Read ``params`` (parameter count) and ``inner_step_time_s`` (mean seconds per inner step), and if present
    ``num_layers``, ``sync_every``, ``num_fragments``, ``workers``, ``mode``, ``link_mbit``, ``link_latency_ms``,
    ``utilization`` and ``blocked_per_outer_step_s`` from summary.json; then the method and link from config.json
    if the run wrote one (its values win: they are what the run was told). ``layers`` overrides ``num_layers``
    and is required when the summary has none."""
    path = Path(run_dir) / SUMMARY_FILE
    if not Path(run_dir).is_dir():
        raise SimulatorConfigError(f"--from-run {run_dir}: not a directory (expected a training run directory)")
    if not path.is_file():
        raise SimulatorConfigError(f"{path}: no such file; a training run writes it when it ends (`eagerloco train`)")
    summary = _read_object(path)
    meanings = {"params": "the parameter count", "inner_step_time_s": "mean seconds per inner step"}
    for key, meaning in meanings.items():
        if key not in summary:
            raise SimulatorConfigError(f"{path}: missing key {key!r} ({meaning})")
    params = _positive_number(path, "params", summary["params"], integer=True)
    step_time = _positive_number(path, "inner_step_time_s", summary["inner_step_time_s"], integer=False)
    if layers is None:
        if "num_layers" not in summary:
            raise SimulatorConfigError(f"{path}: missing key 'num_layers' (the layer count): pass --layers")
        layers = int(_positive_number(path, "num_layers", summary["num_layers"], integer=True))

    # summary.json's copies, then config.json's sections (what the run was told) over them.
    found: dict[str, tuple[Path, object]] = {}
    for key in ("sync_every", "num_fragments", "workers", "mode", "link_mbit", "link_latency_ms"):
        if summary.get(key) is not None:
            found[key] = (path, summary[key])
    config_path = Path(run_dir) / CONFIG_FILE
    if config_path.is_file():
        config = _read_object(config_path)
        sections = {"outer": ("mode", "sync_every", "num_fragments", "overlap_steps", "delay", "compression",
                              "fragment_layout"),
                    "run": ("workers", "link_mbit", "link_latency_ms")}  # fmt: skip
        for section, keys in sections.items():
            table = config.get(section)
            if not isinstance(table, dict):
                continue
            for key in keys:
                if table.get(key) is not None:
                    found[key] = (config_path, table[key])

    def integer(key: str) -> int | None:
        if key not in found:
            return None
        where, value = found[key]
        return int(_positive_number(where, key, value, integer=True))

    def rate(key: str) -> float | None:
        if key not in found:
            return None
        where, value = found[key]
        ok = _number(value) and value >= 0  # type: ignore[operator]
        if not ok:
            raise SimulatorConfigError(f"{where}: {key}={value!r}: must be a number >= 0")
        return float(value)  # type: ignore[arg-type]

    def choice(key: str, choices: tuple[str, ...]) -> str | None:
        if key not in found:
            return None
        where, value = found[key]
        return _choice(where, key, value, choices)

    overlap = None
    if "overlap_steps" in found:
        where, value = found["overlap_steps"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SimulatorConfigError(f"{where}: overlap_steps={value!r}: must be an integer >= 0")
        overlap = value
    measured = {}
    for key in ("utilization", "blocked_per_outer_step_s", "blocked_per_period_s"):
        value = summary.get(key)
        ok = _number(value) and value >= 0  # type: ignore[operator]
        measured[key] = float(value) if ok else None  # type: ignore[arg-type]
    sync_every, fragments = integer("sync_every"), integer("num_fragments")
    # Blocked time per H inner steps: the summary's own figure (P fragment syncs per H steps); a run written before
    # it had that field gives it as blocked per outer step (= per fragment sync) x outer steps per H inner steps.
    per_period = measured["blocked_per_period_s"]
    blocked = measured["blocked_per_outer_step_s"]
    if per_period is None and blocked is not None:
        workers = summary.get("per_worker")
        first = workers[0] if isinstance(workers, list) and workers else None
        inner = first.get("inner_steps") if isinstance(first, dict) else None
        outer = summary.get("outer_steps")
        if _number(inner) and _number(outer) and inner > 0 and sync_every is not None:  # type: ignore[operator]
            per_period = blocked * outer * sync_every / inner  # type: ignore[operator]
        elif fragments in (None, 1):
            per_period = blocked
    name = Path(run_dir).resolve().name or "run"
    return RunModel(
        measured_blocked_per_period_s=per_period,
        measured_cu_steady=_steady_cu(summary.get("per_worker")),
        model=ModelSpec(name=name, params=params, layers=layers, step_time_s=step_time),
        sync_every=sync_every,
        fragments=fragments,
        workers=integer("workers"),
        mode=choice("mode", TRAIN_MODES),
        overlap_steps=overlap,
        delay=integer("delay"),
        compression=choice("compression", tuple(CODEC_BITS)),
        layout=choice("fragment_layout", LAYOUTS),
        link_mbit=rate("link_mbit"),
        link_latency_ms=rate("link_latency_ms"),
        measured_cu=measured["utilization"],
        measured_blocked_s=measured["blocked_per_outer_step_s"],
    )
