"""What a training run reports: ``metrics.jsonl`` (and TensorBoard) while it runs, ``summary.json`` and a table at
the end. Readers of these files are in :mod:`eagerloco.lm.runs`."""

from __future__ import annotations

import dataclasses
import json
import shlex
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eagerloco.units import format_bytes

if TYPE_CHECKING:
    from eagerloco.lm.config import TrainConfig

__all__ = ["MetricsLog", "WorkerResult", "next_commands", "print_summary", "summarize"]


@dataclass
class WorkerResult:
    """What one worker reports at the end (gathered into summary.json)."""

    rank: int
    params: int
    stats: dict[str, Any]
    final_train_loss: float
    eval_loss: float | None
    comm_payload_bytes: int
    comm_wire_bytes: int
    inner_steps: int
    evals: list[dict[str, Any]] = field(default_factory=list)
    tokens: int | None = None
    """Global tokens trained by the end of the run, over every life of it (a life before a resume with another
    number of workers counted with its own worker count); None: ``steps`` x batch x sequence x workers."""
    tokens_this_life: int | None = None
    """Global tokens trained since this process started (after a ``--resume``: since the checkpoint), the ones
    ``stats['wall_s']`` measured; None: all of ``tokens``."""
    overlap_auto: dict[str, Any] | None = None
    """``--overlap-steps auto``: what was measured and the τ chosen (lm/auto_overlap.py OverlapAuto); else None."""


class MetricsLog:
    """Appends JSON lines to ``metrics.jsonl``; shared by simulated workers (thread-safe)."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self._lock = threading.Lock()
        self._fh = path.open("a") if enabled else None
        self._tb: Any = None

    def attach_tensorboard(self, directory: Path) -> None:
        """Also write worker 0's scalars (loss, lr, eval loss, utilization, blocked time) as TensorBoard events."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise RuntimeError("run.tensorboard=true needs the tensorboard package: pip install tensorboard") from exc
        self._tb = SummaryWriter(str(directory))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (a JSON object with a ``type``: 'inner', 'outer' or 'eval')."""
        if not self.enabled:
            return
        line = json.dumps(record)
        with self._lock:
            assert self._fh is not None
            self._fh.write(line + "\n")
            self._fh.flush()  # visible at once to `tail -f`, plots of a live run, and what survives a crash
            if self._tb is not None and record.get("worker", 0) == 0:
                step = record.get("step", record.get("inner_step", 0))
                for key in ("loss", "lr", "eval_loss", "utilization", "blocked_s"):
                    if isinstance(record.get(key), (int, float)):
                        self._tb.add_scalar(f"{record['type']}/{key}", record[key], step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        if self._tb is not None:
            self._tb.close()


def log_membership(ft: Any, timer: Any, log: MetricsLog, worker: int) -> None:
    """Write a ``membership`` record per quorum of the fault-tolerant site ``ft`` (an
    :class:`eagerloco.ft.FaultTolerance`) into ``log``: the ones so far now, each later one with the engine's next
    outer-step record (``timer.add_record_listener``)."""
    logged = 0

    def flush(_record: Any = None) -> None:
        nonlocal logged
        for rec in ft.stats.records[logged:]:
            log.write({"type": "membership", "worker": worker, **dataclasses.asdict(rec)})
        logged = len(ft.stats.records)

    flush()
    timer.add_record_listener(flush)


def summarize(config: TrainConfig, results: list[WorkerResult], data_summary: str | None = None) -> dict[str, Any]:
    """``summary.json``: the run's totals from every worker's result (means over workers, the slowest wall time)."""
    world = len(results)
    steps = config.run.steps
    tokens = results[0].tokens
    if tokens is None:
        tokens = steps * config.data.batch_size * config.model.seq_len * world
    trained = results[0].tokens_this_life if results[0].tokens_this_life is not None else tokens
    walls = [r.stats["wall_s"] for r in results]
    blocked_per_outer_step = sum(r.stats["blocked_per_outer_step_s"] for r in results) / world
    fragments = config.outer.num_fragments if config.outer.mode != "dp" else 1
    summary = {
        "mode": config.outer.mode,
        "workers": world,
        "launch": config.run.launch,
        "eval_loss": results[0].eval_loss,
        "tokens": tokens,
        "tokens_per_s": trained / max(walls) if max(walls) > 0 else 0.0,  # this life's tokens over its wall time
        "wall_s": max(walls),
        "utilization": sum(r.stats["utilization"] for r in results) / world,
        "steady_utilization": sum(r.stats["steady_utilization"] for r in results) / world,
        "blocked_s": sum(r.stats["blocked_s"] for r in results) / world,
        "blocked_per_outer_step_s": blocked_per_outer_step,
        # per H inner steps: P fragment syncs (one outer-step record each), so P x the figure above
        "blocked_per_period_s": blocked_per_outer_step * fragments,
        "bytes_sent_per_worker": sum(r.stats["payload_bytes"] for r in results) // world,
        "wire_bytes_per_worker": sum(r.stats["wire_bytes"] for r in results) // world,
        "outer_steps": results[0].stats["outer_steps"],
        # for `eagerloco simulate --from-run`
        "params": results[0].params,
        "num_layers": config.model.n_layer,
        "inner_step_time_s": sum(r.stats["inner_s"] / max(1, r.stats["inner_steps"]) for r in results) / world,
        "sync_every": config.outer.sync_every,
        "num_fragments": config.outer.num_fragments,
        "link_mbit": config.run.link_mbit,
        "link_latency_ms": config.run.link_latency_ms,
        "per_worker": [
            {"rank": r.rank, "eval_loss": r.eval_loss, "final_train_loss": r.final_train_loss, **r.stats}
            for r in results
        ],
        "evals": results[0].evals,
    }
    if results[0].overlap_auto is not None:
        summary["overlap_auto"] = results[0].overlap_auto
    return summary


def print_summary(summary: dict[str, Any], config: TrainConfig) -> None:
    """The end-of-run table on stdout: the method, then the summary's headline numbers, then per worker."""
    from eagerloco.lm.auto_overlap import OverlapAuto

    mode = summary["mode"]
    auto = summary.get("overlap_auto")
    tau = config.outer.overlap_steps if auto is None else auto["overlap_steps"]
    detail = {
        "dp": "gradients averaged every step",
        "sync": f"H={config.outer.sync_every}",
        "overlap": f"H={config.outer.sync_every}, τ={tau}{' (auto)' if auto else ''}, α={config.outer.alpha}",
        "delayed": f"H={config.outer.sync_every}, k={config.outer.delay}",
        "eager": f"H={config.outer.sync_every}, k={config.outer.delay}",
    }[mode]
    link = f"emulated {config.run.link_mbit:g} Mbit/s" if config.run.link_mbit else "no emulated link"
    print()
    print(f"eagerloco train: {mode} ({detail}, P={config.outer.num_fragments}), {summary['workers']} workers "
          f"({config.run.launch}), {link}, {summary['params']:,} parameters")  # fmt: skip
    rows = [
        ("eval loss of the outer parameters", f"{summary['eval_loss']:.4f}"),
        ("outer optimizer", config.outer.recipe_note(config.run.workers)),
        ("tokens seen (all workers)", f"{summary['tokens']:,}"),
        ("tokens/s (all workers)", f"{summary['tokens_per_s']:,.0f}"),
        ("wall time of the training loop", f"{summary['wall_s']:.1f} s"),
        ("compute utilization", f"{summary['utilization']:.3f}"),
        ("  in steady state", f"{summary['steady_utilization']:.3f}"),
        ("time blocked on collectives", f"{summary['blocked_s']:.2f} s"),
        *(
            [("  per outer step, steady state", f"{summary['blocked_per_outer_step_s'] * 1e3:.1f} ms")]
            if config.outer.num_fragments == 1 or mode == "dp"
            else [
                ("  per fragment sync, steady state", f"{summary['blocked_per_outer_step_s'] * 1e3:.1f} ms"),
                (f"  per H = {config.outer.sync_every} inner steps", f"{summary['blocked_per_period_s'] * 1e3:.1f} ms"),
            ]
        ),
        *([("overlap sized to the link", OverlapAuto(**auto).describe())] if auto else []),
        ("outer steps", f"{summary['outer_steps']}"),
        ("bytes sent per worker", format_bytes(summary["bytes_sent_per_worker"])),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    workers = summary["per_worker"]
    if len(workers) > 1:
        print(f"  {'per worker':<{width}}  " + "  ".join(f"{'worker ' + str(w['rank']):>12}" for w in workers))
        for key, fmt in (("utilization", "{:.3f}"), ("blocked_s", "{:.2f} s"), ("final_train_loss", "{:.4f}")):
            print(f"  {'  ' + key:<{width}}  " + "  ".join(f"{fmt.format(w[key]):>12}" for w in workers))
    print(next_commands(config.run.out_dir))


def next_commands(run_dir: str) -> str:
    """Where the run is, and the commands that look at it (printed at the end of every run)."""
    where = shlex.quote(run_dir)
    commands = [
        (f"eagerloco plot {where}", f"# loss, utilization, blocked time, bytes: {Path(run_dir) / 'plot.png'}"),
        (f"eagerloco eval {where}", "# eval loss of the saved model"),
        (f"eagerloco sample {where}", "# text from the saved model"),
    ]
    width = max(len(c) for c, _ in commands)
    return f"\nrun directory: {run_dir}; next:\n" + "\n".join(f"  {c:<{width}}  {note}" for c, note in commands)
