"""Read the model a training run measured: ``RUN_DIR/summary.json`` written by ``eagerloco train``."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from eagerloco.simulator.config import ModelSpec, SimulatorConfigError

SUMMARY_FILE = "summary.json"
"""The file a training run writes at its end, inside its run directory."""


@dataclass(frozen=True)
class RunModel:
    """What a run's summary tells the simulator."""

    model: ModelSpec
    """Parameter count, layers and the measured mean seconds per inner step."""
    sync_every: int | None
    """H of the run, if recorded."""
    fragments: int | None
    """P of the run, if recorded."""
    workers: int | None
    """M of the run, if recorded."""


def _positive_number(summary_path: Path, key: str, value: object, *, integer: bool) -> float:
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if ok and integer and not float(value).is_integer():  # type: ignore[arg-type]
        ok = False
    if not ok:
        raise SimulatorConfigError(f"{summary_path}: {key}={value!r}: must be {kind} > 0")
    return float(value)  # type: ignore[arg-type]


def load_run_summary(run_dir: str | Path, *, layers: int | None = None) -> RunModel:
    """Read ``params`` (parameter count) and ``inner_step_time_s`` (mean seconds per inner step), and if present
    ``num_layers``, ``sync_every``, ``num_fragments`` and ``workers``. ``layers`` overrides ``num_layers`` and
    is required when the summary has none."""
    path = Path(run_dir) / SUMMARY_FILE
    if not Path(run_dir).is_dir():
        raise SimulatorConfigError(f"--from-run {run_dir}: not a directory (expected a training run directory)")
    if not path.is_file():
        raise SimulatorConfigError(f"{path}: no such file; a training run writes it when it ends (`eagerloco train`)")
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SimulatorConfigError(f"{path}: cannot read it as JSON: {exc}") from exc
    if not isinstance(summary, dict):
        raise SimulatorConfigError(f"{path}: must hold a JSON object, not {type(summary).__name__}")
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
    optional: dict[str, int | None] = {}
    for key in ("sync_every", "num_fragments", "workers"):
        value = summary.get(key)
        optional[key] = None if value is None else int(_positive_number(path, key, value, integer=True))
    name = Path(run_dir).resolve().name or "run"
    return RunModel(
        model=ModelSpec(name=name, params=params, layers=layers, step_time_s=step_time),
        sync_every=optional["sync_every"],
        fragments=optional["num_fragments"],
        workers=optional["workers"],
    )
