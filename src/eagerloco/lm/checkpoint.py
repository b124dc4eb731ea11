"""Checkpoints of a training run: one file per worker, written atomically, committed by a manifest.

Layout under the run directory::

    checkpoints/step-000000600/worker-0.pt     # model θ, inner and outer optimizer state, eager state and the
    checkpoints/step-000000600/worker-1.pt     #   averages in flight, sampler position, RNG, counters
    checkpoints/step-000000600/COMPLETE.json   # written last, by worker 0, once every worker's file is on disk:
                                               #   format version, inner step, world size, sha256 of each file

A checkpoint counts only once its ``COMPLETE.json`` exists and every file matches its checksum: a crash while
writing, a truncated or corrupted file, leaves the previous checkpoint in use (with a warning). Every file is
written to a temporary name in the same directory, flushed, fsynced and renamed, so no reader ever sees half a
file.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from eagerloco.fileio import atomic_write_bytes

CHECKPOINT_FORMAT = 1
MANIFEST = "COMPLETE.json"


def step_dir(run_dir: Path, inner_step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{inner_step:09d}"


def save_worker(run_dir: Path, inner_step: int, rank: int, state: dict[str, Any]) -> str:
    """Write worker ``rank``'s state for ``inner_step``; return its sha256 (for the manifest)."""
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(step_dir(run_dir, inner_step) / f"worker-{rank}.pt", data)
    return hashlib.sha256(data).hexdigest()


def commit(run_dir: Path, inner_step: int, world_size: int, checksums: list[str], keep: int) -> Path:
    """Write the manifest (after every worker's file is on disk) and prune older checkpoints to ``keep``."""
    directory = step_dir(run_dir, inner_step)
    manifest = {
        "format": CHECKPOINT_FORMAT,
        "inner_step": inner_step,
        "world_size": world_size,
        "sha256": {f"worker-{r}.pt": checksums[r] for r in range(world_size)},
    }
    atomic_write_bytes(directory / MANIFEST, json.dumps(manifest, indent=1).encode())
    complete = [d for d in _candidates(run_dir) if (d / MANIFEST).exists()]
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return directory


def _candidates(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-"))


def verify(directory: Path) -> tuple[bool, str]:
    """(valid, reason): the manifest exists, has our format, and every worker file matches its checksum."""
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        return False, "no COMPLETE.json (the checkpoint was never finished)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        return False, f"unreadable manifest: {exc}"
    if manifest.get("format") != CHECKPOINT_FORMAT:
        return False, f"format {manifest.get('format')!r}, this eagerloco reads {CHECKPOINT_FORMAT}"
    for name, expected in manifest.get("sha256", {}).items():
        path = directory / name
        if not path.exists():
            return False, f"{name} is missing"
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            return False, f"{name} is corrupted or truncated (sha256 {actual[:12]} != {expected[:12]})"
    return True, ""


def latest_valid(run_dir: Path) -> Path | None:
    """The newest checkpoint directory that verifies; warns about each newer one that does not."""
    for directory in reversed(_candidates(run_dir)):
        ok, reason = verify(directory)
        if ok:
            return directory
        warnings.warn(f"skipping checkpoint {directory}: {reason}; trying the previous one", stacklevel=2)
    return None


def load_worker(directory: Path, rank: int, world_size: int) -> dict[str, Any]:
    manifest = json.loads((directory / MANIFEST).read_text())
    if manifest["world_size"] != world_size:
        raise ValueError(
            f"checkpoint {directory} was written by {manifest['world_size']} workers, this run has {world_size}: "
            "resume with the same number of workers"
        )
    state = torch.load(directory / f"worker-{rank}.pt", map_location="cpu", weights_only=False)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {directory} has format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}")
    return state
