"""Reading a finished (or running) training run directory: its config, metrics, summary and saved models.

A run directory written by ``eagerloco train`` (see :mod:`eagerloco.train`) holds::

    config.json        the resolved TrainConfig.to_dict()
    metrics.jsonl      one JSON object per line: "inner" (per inner step per worker), "outer" (per outer step per
                       worker, the engine's OuterStepRecord) and "eval" (per evaluation of the outer parameters)
    summary.json       written at the end: overall compute utilization, eval loss, per-worker statistics
    model.pt           the final outer parameters: {model_config, model, train_config, tokenizer, eval_loss}
    checkpoints/step-N/worker-R.pt + COMPLETE.json

:func:`load_run` reads the first three (for plots); :func:`load_saved_model` reads ``model.pt`` or a checkpoint and
rebuilds the :class:`~eagerloco.lm.model.GPT` holding the outer parameters φ, the ones every evaluation of the
training run measured; :func:`load_run_data` and :func:`load_run_tokenizer` rebuild the run's data and tokenizer
from its config and check that the tokenizer is the one the model was trained with. Every problem is a
:class:`RunError` whose message names the file and says what to do.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from eagerloco.lm.model import GPT, GPTConfig

__all__ = [
    "Run",
    "RunError",
    "SavedModel",
    "load_run",
    "load_run_data",
    "load_run_tokenizer",
    "load_saved_model",
    "read_metrics",
    "record_step",
    "resolve_checkpoint",
    "run_label",
    "unique_labels",
]

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
MODEL = "model.pt"


class RunError(ValueError):
    """A run directory, or one of its files, is missing or unreadable (the message names the file)."""


# ------------------------------------------------------------------------------------------------ config, label


def _check_run_dir(path: Path) -> None:
    if not path.exists():
        raise RunError(f"run directory {path} does not exist")
    if not path.is_dir():
        raise RunError(f"{path} is not a directory: give the run directory (the --out-dir of `eagerloco train`)")


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise RunError(f"{path.parent}: missing {path.name} ({what}); is this an `eagerloco train` run directory?")
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunError(f"{path}: unreadable JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise RunError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def run_label(config: dict[str, Any]) -> str:
    """A short label of the method of a run from its ``config.json`` dict: ``dp``, ``sync H=30``,
    ``overlap τ=1 H=30``, ``delayed k=1 H=30``, ``eager k=1 H=30`` (the paper's rule) or ``eager k=1 w=0.75 H=30``
    (an own weight, ALGORITHMS.md 4.1; ``eager k=1 w=0.875 β=0.5 H=30`` with smoothing, 4.4); `` P=4`` is appended
    for streaming (several fragments) and the codec for compressed outer gradients (e.g. `` int8``)."""
    outer = config.get("outer", {})
    mode = str(outer.get("mode", "?"))
    if mode == "dp":
        return "dp"
    H = outer.get("sync_every", "?")
    parts = [mode]
    if mode == "overlap":
        parts.append(f"τ={outer.get('overlap_steps', '?')}")
    elif mode in ("delayed", "eager"):
        parts.append(f"k={outer.get('delay', '?')}")
    weight = outer.get("eager_own_weight")
    if mode == "eager" and weight is not None:
        parts.append(f"w={weight}" if isinstance(weight, str) else f"w={weight:g}")  # "1/M": the paper's rule
    if mode == "eager" and outer.get("eager_smoothing"):
        parts.append(f"β={outer['eager_smoothing']:g}")  # smoothing, ALGORITHMS.md 4.4
    parts.append(f"H={H}")
    if (outer.get("num_fragments") or 1) > 1:
        parts.append(f"P={outer['num_fragments']}")
    if outer.get("compression", "none") not in ("none", None):
        parts.append(str(outer["compression"]))
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------------- metrics


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file, in file order. A truncated last line (a run killed while writing)
    is skipped with a warning; any other malformed line is a :class:`RunError` naming the line."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path.parent}: missing {path.name} (the training metrics); is this an `eagerloco train` run?")
    lines = path.read_text().splitlines()
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "type" not in record:
                raise ValueError("not a metrics record (a JSON object with a 'type')")
        except ValueError as exc:
            if number == len(lines):
                warnings.warn(f"{path}:{number}: skipping a truncated last line ({exc})", stacklevel=2)
                continue
            raise RunError(f"{path}:{number}: malformed line ({exc})") from exc
        records.append(record)
    return records


def record_step(record: dict[str, Any]) -> int:
    """The inner step a metrics record belongs to: ``step`` (inner and eval records) or ``inner_step`` (outer)."""
    return int(record.get("step", record.get("inner_step", 0)))


@dataclass
class Run:
    """A run directory's config, metrics records and (once finished) summary."""

    path: Path
    config: dict[str, Any]
    """``config.json``: the resolved ``TrainConfig.to_dict()``."""
    records: list[dict[str, Any]]
    """``metrics.jsonl``, in file order."""
    summary: dict[str, Any] | None = None
    """``summary.json``, or None while the run has not finished."""
    label: str = ""
    """The method and key settings (:func:`run_label`), made unique among the runs loaded together."""
    _by_type: dict[tuple[str, int], list[dict[str, Any]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.label:
            self.label = run_label(self.config)
        for record in self.records:
            self._by_type.setdefault((record["type"], int(record.get("worker", 0))), []).append(record)

    @property
    def mode(self) -> str:
        return str(self.config.get("outer", {}).get("mode", "?"))

    @property
    def workers(self) -> list[int]:
        """Ranks that logged at least one record."""
        return sorted({w for _, w in self._by_type})

    def check_worker(self, worker: int) -> None:
        """Raise :class:`RunError` when ``worker`` logged nothing in this run."""
        if worker not in self.workers:
            ranks = ", ".join(map(str, self.workers)) or "none"
            raise RunError(f"{self.path}: no metrics of worker {worker} (workers with metrics: {ranks})")

    def inner(self, worker: int = 0) -> list[dict[str, Any]]:
        """Inner-step records of ``worker`` (loss, lr, tokens, time_s), in step order."""
        return sorted(self._by_type.get(("inner", worker), []), key=lambda r: r["step"])

    def outer(self, worker: int = 0, kind: str | None = "step") -> list[dict[str, Any]]:
        """Outer-step records of ``worker``; ``kind`` 'step' (default), 'finalize' (the final drain) or None (all)."""
        records = self._by_type.get(("outer", worker), [])
        return [r for r in records if kind is None or r.get("kind") == kind]

    def evals(self, worker: int = 0) -> list[dict[str, Any]]:
        """Evaluation records of ``worker`` (step, tokens, time_s, eval_loss), in step order."""
        return sorted(self._by_type.get(("eval", worker), []), key=lambda r: r["step"])

    def eval_times(self, worker: int = 0) -> list[float]:
        """Training-loop wall time (s) at which each of :meth:`evals` was taken.

        Runs written before the loop's clock was the engine's own ran the final eval record's ``time_s`` ahead by
        the duration of that evaluation. This uses the inner-step record of the same step instead, plus the time
        of the final drain (``finalize``: blocked + overhead) for the evaluation after it, the same for every
        run; it falls back on the eval record's ``time_s`` when no inner record matches.
        """
        inner_time = {r["step"]: float(r["time_s"]) for r in self.inner(worker)}
        last = max(inner_time, default=None)
        drain = sum(
            float(r.get("blocked_s", 0.0)) + float(r.get("overhead_s", 0.0)) for r in self.outer(worker, "finalize")
        )
        times = []
        for record in self.evals(worker):
            step = record["step"]
            if step in inner_time:
                times.append(inner_time[step] + (drain if step == last else 0.0))
            else:
                times.append(float(record["time_s"]))
        return times

    @property
    def utilization(self) -> float | None:
        """The run's overall compute utilization (summary.json, mean over workers; final drain included)."""
        if self.summary is None or not isinstance(self.summary.get("utilization"), (int, float)):
            return None
        return float(self.summary["utilization"])


def load_run(path: str | Path) -> Run:
    """Read a run directory: ``config.json`` and ``metrics.jsonl`` are required, ``summary.json`` is optional
    (absent while a run is in progress)."""
    path = Path(path)
    _check_run_dir(path)
    config = _read_json(path / CONFIG, "the run's resolved configuration")
    records = read_metrics(path / METRICS)
    summary = _read_json(path / SUMMARY, "the run's summary") if (path / SUMMARY).is_file() else None
    return Run(path=path, config=config, records=records, summary=summary)


def unique_labels(runs: list[Run]) -> None:
    """Append the directory name to the labels that several of ``runs`` share (in place)."""
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.label] = counts.get(run.label, 0) + 1
    for run in runs:
        if counts[run.label] > 1:
            run.label = f"{run.label} ({run.path.name or run.path})"


# ------------------------------------------------------------------------------------------------ saved models


@dataclass
class SavedModel:
    """A model rebuilt from ``model.pt`` or from a checkpoint, with what the training run knew about it."""

    model: GPT
    """The GPT holding the outer parameters φ (the final, consolidated ones for ``model.pt``)."""
    train_config: dict[str, Any]
    """The run's ``TrainConfig.to_dict()`` (from the file itself)."""
    source: Path
    """The file the parameters were read from."""
    step: int
    """Inner steps trained."""
    tokenizer: str | None
    """The tokenizer's fingerprint recorded in ``model.pt`` (None for checkpoints, which do not record it)."""
    eval_loss: float | None
    """The eval loss the training run measured for these parameters (model.pt's ``eval_loss``, or the run's eval
    record of this worker at this step for a checkpoint), None when unknown."""
    worker: int | None = None
    """The worker whose checkpoint file was read (None for model.pt)."""


def _torch_load(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, not a torch file, unexpected contents
        raise RunError(f"{path}: cannot be read as a saved model ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict):
        raise RunError(f"{path}: expected a dict, got {type(state).__name__}")
    return state


def _require(state: dict[str, Any], keys: tuple[str, ...], path: Path, what: str) -> None:
    missing = [k for k in keys if k not in state]
    if missing:
        raise RunError(f"{path}: not {what}: missing keys {', '.join(missing)}")


def _available_checkpoints(run_dir: Path) -> str:
    root = run_dir / "checkpoints"
    names = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    return ", ".join(names) if names else "none"


def resolve_checkpoint(run_dir: str | Path, spec: str, worker: int = 0) -> Path:
    """The worker file a ``--checkpoint`` value names: 'latest' (the newest complete checkpoint), a step number, a
    ``step-N`` directory or a ``worker-R.pt`` file (absolute, relative to the working directory, or relative to the
    run directory). A directory must be a complete checkpoint (its COMPLETE.json verifies)."""
    from eagerloco.lm import checkpoint as ckpt

    run_dir = Path(run_dir)
    if spec == "latest":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            directory = ckpt.latest_valid(run_dir)
        if directory is None:
            raise RunError(f"{run_dir}: no complete checkpoint under {run_dir / 'checkpoints'}")
        path = directory
    elif spec.isdigit():
        path = ckpt.step_dir(run_dir, int(spec))
    else:
        path = Path(spec).expanduser()
        if not path.exists() and (run_dir / spec).exists():
            path = run_dir / spec
    if not path.exists():
        raise RunError(f"checkpoint {spec!r} not found (checkpoints of {run_dir}: {_available_checkpoints(run_dir)})")
    if path.is_dir():
        ok, reason = ckpt.verify(path)
        if not ok:
            raise RunError(f"checkpoint {path} is not usable: {reason}")
        path = path / f"worker-{worker}.pt"
        if not path.is_file():
            raise RunError(f"checkpoint {path.parent} has no file for worker {worker}")
    return path


def _phi_state(state: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's model state dict with the outer parameters φ in place of the worker's θ (dp: θ itself)."""
    model_state = dict(state["model"])
    outer = state.get("outer")
    if outer is None:  # data parallel: θ is the model
        return model_state
    for fragment in outer["fragments"]:
        names = fragment["names"]
        shapes = [model_state[n].shape for n in names]
        sizes = [math.prod(s) for s in shapes]
        flat = fragment["phi"]
        if flat.numel() != sum(sizes):
            raise RunError(f"{path}: outer parameters of {flat.numel()} values do not fit the model's {sum(sizes)}")
        for name, shape, chunk in zip(names, shapes, flat.split(sizes)):
            model_state[name] = chunk.view(shape).to(model_state[name].dtype)
    if "wte.weight" in model_state and "lm_head.weight" in model_state:  # the tied head is the embedding
        model_state["lm_head.weight"] = model_state["wte.weight"]
    return model_state


def _build(model_config: dict[str, Any], state_dict: dict[str, torch.Tensor], path: Path) -> GPT:
    try:
        model = GPT(GPTConfig(**model_config), seed=0)
        model.load_state_dict(state_dict)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise RunError(f"{path}: the saved parameters do not fit the saved model config ({exc})") from exc
    return model


def load_saved_model(
    run_dir: str | Path, checkpoint: str | None = None, worker: int = 0, device: str | torch.device = "cpu"
) -> SavedModel:
    """Rebuild the model of a run: ``run_dir/model.pt`` (the final consolidated outer parameters) or, with
    ``checkpoint`` (see :func:`resolve_checkpoint`), the outer parameters φ of ``worker`` in that checkpoint (θ for
    data parallel), which is what the training run evaluated at that step."""
    run_dir = Path(run_dir)
    _check_run_dir(run_dir)
    if checkpoint is None:
        path = run_dir / MODEL
        if not path.is_file() and not (run_dir / CONFIG).is_file():
            raise RunError(f"{run_dir}: missing {MODEL} and {CONFIG}: not an `eagerloco train` run directory")
        if not path.is_file():
            raise RunError(
                f"{run_dir}: missing {MODEL} (written when training finishes); for an unfinished run use "
                f"--checkpoint latest (checkpoints: {_available_checkpoints(run_dir)})"
            )
        state = _torch_load(path)
        _require(state, ("model_config", "model", "train_config", "tokenizer", "eval_loss"), path, "a model.pt")
        model = _build(state["model_config"], state["model"], path)
        steps = int(state["train_config"].get("run", {}).get("steps", 0))
        eval_loss = state["eval_loss"]
        return SavedModel(
            model=model.to(device),
            train_config=state["train_config"],
            source=path,
            step=steps,
            tokenizer=state["tokenizer"],
            eval_loss=None if eval_loss is None else float(eval_loss),
        )
    path = resolve_checkpoint(run_dir, checkpoint, worker)
    state = _torch_load(path)
    _require(state, ("model", "config", "inner_step"), path, "a checkpoint worker file")
    model_state = _phi_state(state, path)
    if "wte.weight" not in model_state:
        raise RunError(f"{path}: the saved model has no token embedding 'wte.weight'")
    model_config = {**state["config"]["model"], "vocab_size": int(model_state["wte.weight"].shape[0])}
    model = _build(model_config, model_state, path)
    step = int(state["inner_step"])
    rank = int(path.stem.split("-")[-1]) if path.stem.startswith("worker-") else worker
    eval_loss = None
    metrics = run_dir / METRICS
    if metrics.is_file():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            records = read_metrics(metrics)
        matches = [r for r in records if r["type"] == "eval" and r.get("worker") == rank and r.get("step") == step]
        if matches:
            eval_loss = float(matches[-1]["eval_loss"])
    return SavedModel(
        model=model.to(device),
        train_config=state["config"],
        source=path,
        step=step,
        tokenizer=None,
        eval_loss=eval_loss,
        worker=rank,
    )


# ------------------------------------------------------------------------------------------------ data, tokenizer


def _train_config(values: dict[str, Any]) -> Any:
    from eagerloco.engine.config import ConfigError
    from eagerloco.lm.config import TrainConfig

    try:
        return TrainConfig.from_dict(values)
    except ConfigError as exc:
        raise RunError(f"the run's training config cannot be read by this eagerloco: {exc}") from exc


def _check_tokenizer(fingerprint: str, expected: str | None, data_section: dict[str, Any]) -> None:
    if expected is not None and fingerprint != expected:
        raise RunError(
            f"the tokenizer rebuilt from the run's config ({fingerprint}) is not the one the model was trained with "
            f"({expected}): the corpus {data_section.get('corpus')!r} changed since training, or the BPE cache "
            "holds another tokenizer"
        )


def load_run_data(saved: SavedModel) -> Any:
    """The run's :class:`~eagerloco.lm.data.LMData`, rebuilt from the train config's data section exactly as
    ``eagerloco train`` builds it (same corpus, split, tokenizer and cache); checks the tokenizer and the vocabulary
    against the saved model."""
    from eagerloco.lm.data import default_cache_dir, prepare_data

    config = _train_config(saved.train_config)
    d = config.data
    data = prepare_data(
        d.corpus,
        tokenizer=d.tokenizer,
        vocab_size=d.bpe_vocab_size if d.tokenizer == "bpe" else None,
        val_fraction=d.val_fraction,
        cache_dir=default_cache_dir(),
    )
    _check_tokenizer(data.tokenizer.fingerprint, saved.tokenizer, saved.train_config.get("data", {}))
    if data.vocab_size != saved.model.config.vocab_size:
        raise RunError(
            f"the run's tokenizer has {data.vocab_size} ids but the model has {saved.model.config.vocab_size}: the "
            "corpus changed since training"
        )
    return data


def load_run_tokenizer(saved: SavedModel) -> Any:
    """The run's tokenizer (byte: no data needed; BPE: loaded from the cache, or retrained on the training split
    of the corpus, as ``eagerloco train`` does), checked against the saved model."""
    from eagerloco.lm.tokenizer import ByteTokenizer, build_tokenizer

    config = _train_config(saved.train_config)
    d = config.data
    if d.tokenizer == "byte":
        tokenizer: Any = ByteTokenizer()
    else:
        from eagerloco.lm.corpora import load_corpus, split_corpus
        from eagerloco.lm.data import default_cache_dir

        train_docs, _ = split_corpus(load_corpus(d.corpus), d.val_fraction)
        tokenizer = build_tokenizer(
            d.tokenizer, d.bpe_vocab_size, corpus=[doc.text for doc in train_docs], cache_dir=default_cache_dir()
        )
    _check_tokenizer(tokenizer.fingerprint, saved.tokenizer, saved.train_config.get("data", {}))
    if tokenizer.vocab_size != saved.model.config.vocab_size:
        raise RunError(
            f"the run's tokenizer has {tokenizer.vocab_size} ids but the model has {saved.model.config.vocab_size}"
        )
    return tokenizer
