"""Checkpoints of a training run: one file per worker, written atomically, committed by a manifest.

Layout under the run directory::

    checkpoints/step-000000600/worker-0.pt     # model θ, inner and outer optimizer state, eager state and the
    checkpoints/step-000000600/worker-1.pt     #   averages in flight, sampler position, RNG, counters
    checkpoints/step-000000600/COMPLETE.json   # written last, by worker 0, once every worker's file is on disk:
                                               #   format version, inner step, world size, sha256 of each file

A checkpoint counts only once its ``COMPLETE.json`` exists and every file matches its checksum: a crash while
writing, a truncated or corrupted file, leaves the previous checkpoint in use (with a warning). Every file is
written to a temporary name in the same directory, flushed, fsynced and renamed, so no reader ever sees half a
file. ``commit`` keeps the newest ``keep`` complete checkpoints and removes unfinished ones older than the newest.

The manifest also records the run's configuration and whether the outer loop was finalized, so that a resume
with another model or (before finalize) another mode is refused with a clear message before any worker starts
(:func:`check_compatible`); see docs/reliability.md. A resume with another number of workers is supported
(:func:`load_resized`, ALGORITHMS.md section 11, docs/fault-tolerance.md).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eagerloco.engine.config import ConfigError
from eagerloco.fileio import atomic_write_bytes
from eagerloco.lm.config import RECIPE_FIELDS

CHECKPOINT_FORMAT = 1
MANIFEST = "COMPLETE.json"


# Outer settings that may change on resume only from a finalized checkpoint (nothing in flight, the workers' φ
# consolidated): a new outer loop starts from φ with a fresh outer optimizer.
SWITCHABLE_AFTER_FINALIZE = (
    "outer.mode",
    "outer.overlap_steps",
    "outer.alpha",
    "outer.delay",
    "outer.compression",
    "outer.error_feedback",
    "outer.outer_lr",
    "outer.outer_momentum",
    "outer.nesterov",
)
# Settings a resume must keep: the model (the tensors' shapes), the tokenizer (the vocabulary), the outer schedule.
MUST_MATCH = ("model.", "data.tokenizer", "data.bpe_vocab_size", "data.corpus", "outer.sync_every",
              "outer.num_fragments", "outer.fragment_layout")  # fmt: skip


class ResumeError(ConfigError):
    """A checkpoint cannot be resumed by this run's configuration; the message says which setting and why."""


def step_dir(run_dir: Path, inner_step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{inner_step:09d}"


def save_worker(run_dir: Path, inner_step: int, rank: int, state: dict[str, Any]) -> str:
    """Write worker ``rank``'s state for ``inner_step``; return its sha256 (for the manifest)."""
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buffer)
    data = buffer.getvalue()
    atomic_write_bytes(step_dir(run_dir, inner_step) / f"worker-{rank}.pt", data)
    return hashlib.sha256(data).hexdigest()


def commit(
    run_dir: Path,
    inner_step: int,
    world_size: int,
    checksums: list[str],
    keep: int,
    config: dict[str, Any] | None = None,
    finalized: bool = False,
) -> Path:
    """Write the manifest (after every worker's file is on disk) and prune older checkpoints to ``keep``."""
    directory = step_dir(run_dir, inner_step)
    manifest = {
        "format": CHECKPOINT_FORMAT,
        "inner_step": inner_step,
        "world_size": world_size,
        "finalized": finalized,
        "sha256": {f"worker-{r}.pt": checksums[r] for r in range(world_size)},
        "config": config,
    }
    atomic_write_bytes(directory / MANIFEST, json.dumps(manifest, indent=1).encode())
    candidates = _candidates(run_dir)
    complete = [d for d in candidates if (d / MANIFEST).exists()]
    for old in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for unfinished in candidates:  # a crash mid-save left these; they can never complete now
        if unfinished < directory and not (unfinished / MANIFEST).exists():
            shutil.rmtree(unfinished, ignore_errors=True)
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


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    return {
        f"{section}.{k}": v for section, table in config.items() if isinstance(table, dict) for k, v in table.items()
    }


def read_manifest(directory: Path) -> dict[str, Any]:
    """The checkpoint's ``COMPLETE.json`` (call :func:`verify` or :func:`latest_valid` first)."""
    return json.loads((Path(directory) / MANIFEST).read_text())


def check_compatible(directory: Path, world_size: int, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Refuse (:class:`ResumeError`) a checkpoint this run cannot continue; return its manifest.

    Always refused: another model, tokenizer or outer schedule (sync_every, fragments). Another mode (or delay,
    codec, outer optimizer) is refused unless the checkpoint was written after finalize, when nothing is in flight
    and the workers hold one φ: the run then continues in the new mode from there. Another number of workers is
    accepted here; :func:`check_resizable` checks that the saved outer states can be resized (it reads them)."""
    if world_size < 1:
        raise ResumeError(f"checkpoint {directory}: this run has {world_size} workers, it needs at least 1")
    manifest = read_manifest(directory)
    saved = manifest.get("config")
    if config is None or saved is None:
        return manifest
    old, new = _flat(saved), _flat(config)
    if old.get("outer.mode") == "dp" and new.get("outer.mode") != "dp":
        raise ResumeError(
            f"checkpoint {directory} was written in mode 'dp', which has no outer loop to continue: start a new "
            f"run in mode {new.get('outer.mode')!r}"
        )
    for key in sorted(new):
        if key == "model.vocab_size" or old.get(key, new[key]) == new[key]:
            continue
        if any(key == rule or (rule.endswith(".") and key.startswith(rule)) for rule in MUST_MATCH):
            raise ResumeError(
                f"checkpoint {directory} was written with {key}={old[key]!r}, this run has {key}={new[key]!r}: "
                "the model, tokenizer and outer schedule cannot change on resume"
            )
        if key in SWITCHABLE_AFTER_FINALIZE and not manifest.get("finalized", False):
            raise ResumeError(
                f"checkpoint {directory} was written with {key}={old[key]!r}, this run has {key}={new[key]!r}: "
                "the outer loop can change only at a checkpoint written after finalize (the one at the end of "
                "a run, e.g. resume it with a larger --steps); mid-run checkpoints hold averages in flight"
                + _keep_hint(key, old[key])
            )
    return manifest


# Eager's variants (ALGORITHMS.md 4.1, 4.4) may change on any resume: the own terms and deferred instalments in flight
# are stored as applied, so the outer loop continues exactly with the new values. Accepted, and said.
ACCEPTED_OUTER = ("outer.eager_own_weight", "outer.eager_smoothing")
# What a key absent from an older checkpoint's config meant when it was written.
LEGACY_DEFAULTS: dict[str, Any] = {"outer.eager_smoothing": 0.0}


def accepted_changes(directory: Path, config: dict[str, Any]) -> list[str]:
    """One line per setting that this resumed run changes from the checkpoint's configuration and that a resume
    accepts: the inner optimizer's (``optim.*``: lr, schedule, AdamW's; AdamW continues from its state with the new
    value) and eager's own weight and smoothing. Said, because a default that changes between eagerloco versions (the
    mode's outer recipes have; the inner lr may) would otherwise change a resumed run silently. Each line names the
    flag that keeps the checkpoint's value."""
    saved = read_manifest(directory).get("config")
    if saved is None:
        return []
    old, new = {**LEGACY_DEFAULTS, **_flat(saved)}, _flat(config)
    lines = []
    for key in sorted(k for k in new if (k.startswith("optim.") or k in ACCEPTED_OUTER) and k in old):
        if old[key] == new[key] or old[key] is None or new[key] is None:
            continue
        what = "the inner optimizer continues" if key.startswith("optim.") else "the outer loop continues"
        lines.append(
            f"{key}={new[key]!r} where checkpoint {directory} was written with {old[key]!r}: {what} with the new "
            f"value (pass {_flag_setting(key, old[key])} to keep the checkpoint's)"
        )
    return lines


def _keep_hint(key: str, value: Any) -> str:
    """For an outer optimizer field left to the mode's recipe (which may have changed since the checkpoint was
    written): the flag that keeps the checkpoint's value."""
    section, name = key.split(".", 1)
    if section != "outer" or name not in RECIPE_FIELDS:
        return ""
    return f"; to keep the checkpoint's value, pass {_flag_setting(key, value)}"


def _flag_setting(key: str, value: Any) -> str:
    """The ``eagerloco train`` flag that sets config field ``key`` ("section.name") to ``value``."""
    flag = "--" + key.split(".", 1)[1].replace("_", "-")
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {value:g}" if isinstance(value, (int, float)) else f"{flag} {value}"


def _read(directory: Path, rank: int) -> dict[str, Any]:
    state = torch.load(Path(directory) / f"worker-{rank}.pt", map_location="cpu", weights_only=False)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {directory} has format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}")
    return state


def load_worker(directory: Path, rank: int, world_size: int, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Worker ``rank``'s saved state, for a run of as many workers as the checkpoint (else :func:`load_resized`)."""
    manifest = check_compatible(directory, world_size, config)
    if manifest["world_size"] != world_size:
        raise ResumeError(
            f"checkpoint {directory} was written by {manifest['world_size']} workers, this run has {world_size}: "
            "load it with load_resized"
        )
    return _read(directory, rank)


def resized_outer_states(directory: Path, world_size: int) -> list[dict[str, Any]] | None:
    """The outer states of ``world_size`` workers continuing the checkpoint's M saved workers
    (:func:`eagerloco.ft.resize_outer_states` on each saved worker's ``outer`` state, read one file at a time);
    None when the run has no outer loop (mode dp). Raises :class:`ResumeError` when they cannot be resized."""
    from eagerloco.ft.resize import resize_outer_states

    saved_world = read_manifest(directory)["world_size"]
    outer = [_read(directory, r)["outer"] for r in range(saved_world)]  # the rest of each file is dropped at once
    if all(state is None for state in outer):
        return None
    if any(state is None for state in outer):
        raise ResumeError(f"checkpoint {directory}: some workers saved an outer state and some did not")
    try:
        return resize_outer_states(outer, world_size)
    except ValueError as exc:
        raise ResumeError(f"checkpoint {directory} cannot be resumed by {world_size} workers: {exc}") from exc


def check_resizable(directory: Path, world_size: int) -> None:
    """Refuse (:class:`ResumeError`), before any worker starts, a checkpoint whose saved outer states cannot be
    resized to ``world_size`` workers (e.g. a non-finite average in flight under ``nonfinite='raise'``). It reads
    every worker file once; a no-op when the worker count does not change."""
    if read_manifest(directory)["world_size"] != world_size:
        resized_outer_states(directory, world_size)


def load_resized(directory: Path, rank: int, world_size: int, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """What new worker ``rank`` of ``world_size`` starts from when the checkpoint was written by M ≠ world_size
    workers (ALGORITHMS.md section 11, docs/fault-tolerance.md): a state shaped like a saved worker file with

    - ``outer``: :func:`resized_outer_states`' state ``rank`` (in-flight averages applied, eager consolidated,
      finalized: the caller loads it, reopens, and sets θ ← φ);
    - ``model``: saved worker ``rank``'s (its buffers; θ is overwritten by φ), saved worker 0's for rank ≥ M;
    - ``inner_optimizer``, ``rng``: saved worker ``rank``'s for rank < M, None (fresh) for rank ≥ M; except when
      the new run is data-parallel (mode dp), whose workers must hold one inner optimizer state: there a new
      worker takes saved worker 0's inner optimizer state (identical on every worker of a dp checkpoint);
    - ``sampler``: None: every new worker takes a fresh data shard ``rank`` of ``world_size`` positioned at the
      saved inner step (one batch per step, like the saved workers' own counters);
    - ``elapsed_s``, ``inner_step``: the saved ones (worker 0's elapsed_s for rank ≥ M); ``resized_from``: M."""
    manifest = check_compatible(directory, world_size, config)
    saved_world = manifest["world_size"]
    outer = resized_outer_states(directory, world_size)
    own = rank < saved_world
    state = _read(directory, rank if own else 0)
    dp = (config or {}).get("outer", {}).get("mode") == "dp"  # one inner optimizer state on every worker
    return {
        **state,
        "outer": None if outer is None else outer[rank],
        "inner_optimizer": state["inner_optimizer"] if own or dp else None,
        "rng": state["rng"] if own else None,
        "sampler": None,
        "resized_from": saved_world,
    }


@dataclass(frozen=True)
class Restored:
    """Where a resumed worker continues: the inner step, the loop seconds of the run's earlier lives, and the
    global tokens to add to ``step x tokens per step`` (nonzero after a resume with another number of workers,
    whose earlier steps had another global batch)."""

    inner_step: int = 0
    elapsed_s: float = 0.0
    tokens_offset: int = 0


def restore_worker(
    run_dir: Path,
    rank: int,
    world_size: int,
    config: dict[str, Any],
    *,
    model: torch.nn.Module,
    inner_optimizer: torch.optim.Optimizer,
    sampler: Any,
    loco: Any,
    tokens_per_worker_step: int,
) -> Restored:
    """Load worker ``rank``'s state from the newest complete checkpoint of ``run_dir`` into the model, the inner
    optimizer, the sampler and the DiLoCo wrapper ``loco`` (None for dp), and the RNG. The same workers: each
    continues from its own file, bitwise (:func:`load_worker`); another number of workers: :func:`load_resized`
    (ALGORITHMS.md section 11, last rule), then θ ← φ. No checkpoint: a fresh start (``Restored()``)."""
    directory = latest_valid(run_dir)
    if directory is None:
        return Restored()
    saved_world = read_manifest(directory)["world_size"]
    if saved_world == world_size:
        state = load_worker(directory, rank, world_size, config)
    else:
        state = load_resized(directory, rank, world_size, config)
    model.load_state_dict(state["model"])
    if state["inner_optimizer"] is not None:  # None: a new worker (rank >= saved workers) starts AdamW fresh
        inner_optimizer.load_state_dict(state["inner_optimizer"])
    if state["sampler"] is not None:
        sampler.load_state_dict(state["sampler"])
    else:  # resized: shard `rank` of `world_size`, at the saved step's batch (one batch per inner step)
        sampler.load_state_dict({**sampler.state_dict(), "batches_drawn": state["inner_step"]})
    if loco is not None and state["outer"] is not None:
        loco.load_state_dict(state["outer"])
        if loco.finalized and state["inner_step"] < config["run"]["steps"]:
            loco.reopen()  # a finished run continued with more steps (possibly in another mode)
        if saved_world != world_size:
            loco.copy_outer_parameters_to(model)  # θ ← φ: the resized state has nothing in flight
    if state["rng"] is not None:  # None: a new worker keeps the RNG of a fresh run
        torch.set_rng_state(state["rng"])
    step = state["inner_step"]
    return Restored(step, state["elapsed_s"], step * tokens_per_worker_step * (saved_world - world_size))


def save_final_model(
    run_dir: Path,
    model: torch.nn.Module,
    model_config: dict[str, Any],
    train_config: dict[str, Any],
    tokenizer_fingerprint: Any,
    eval_loss: float,
) -> None:
    """Write ``run_dir/model.pt`` atomically: the model (the final outer parameters), its config, the training
    config, the tokenizer's fingerprint and the final eval loss (read by ``eagerloco eval``/``sample``)."""
    final = {"model_config": model_config, "model": model.state_dict(), "train_config": train_config,
             "tokenizer": tokenizer_fingerprint, "eval_loss": eval_loss}  # fmt: skip
    buffer = io.BytesIO()
    torch.save(final, buffer)
    atomic_write_bytes(run_dir / "model.pt", buffer.getvalue())
