"""``eagerloco plot``: loss and compute-utilization plots of finished training runs, one line per run.

    eagerloco plot runs/eager runs/sync runs/dp -o compare.png
    eagerloco plot runs/eager --smooth 25 --worker 1 -o eager-worker1.png

One PNG with four panels:

1. training loss against tokens seen (all workers together), a trailing moving average over ``--smooth`` steps of
   one worker's loss (worker 0 by default);
2. eval loss of the outer parameters against tokens (markers);
3. eval loss against the training loop's wall time (evaluation and checkpoint time excluded); the smoothed training
   loss instead when a run evaluated fewer than twice;
4. compute utilization of each outer step (inner time / wall time since the previous outer step) against tokens,
   with each run's overall CU from summary.json (the final drain included) written in the panel. Data-parallel runs
   have no outer steps: they appear in the text only.

Runs are labelled by their method and key settings from config.json (``eager k=1 H=30``, ``sync H=30``, ``dp``);
the directory name is appended when two runs share a label. matplotlib is imported only here, with the Agg
backend (no display needed).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from eagerloco.lm.runs import Run, RunError, load_run, unique_labels

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_SMOOTH = 10


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``plot`` sub-command."""
    p = subparsers.add_parser(
        "plot",
        help="loss and compute-utilization plots of finished runs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (the --out-dir of `eagerloco train`)")
    p.add_argument("-o", "--output", required=True, metavar="PNG", help="the PNG file to write")
    p.add_argument(
        "--smooth",
        type=int,
        default=DEFAULT_SMOOTH,
        metavar="N",
        help=f"moving average of the training loss over N inner steps (default {DEFAULT_SMOOTH}; 1: raw)",
    )
    p.add_argument("--worker", type=int, default=0, metavar="W", help="whose losses and CU to plot (default 0)")
    p.set_defaults(func=run)


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start): as long as ``values``."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out: list[float] = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def load_runs(paths: Sequence[str | Path], worker: int = 0) -> list[Run]:
    """Load the run directories, check that ``worker`` logged in each, and make the labels unique."""
    runs = [load_run(p) for p in paths]
    for r in runs:
        r.check_worker(worker)
        if not r.inner(worker):
            raise RunError(f"{r.path}: metrics.jsonl holds no inner-step record of worker {worker}")
    unique_labels(runs)
    return runs


def make_figure(runs: Sequence[Run], smooth: int = DEFAULT_SMOOTH, worker: int = 0) -> Figure:
    """The four-panel figure of ``runs`` (see the module docstring), on an Agg canvas; nothing is written.

    Axes, in order: train loss vs tokens, eval loss vs tokens, eval (or train) loss vs wall time, CU per outer step
    vs tokens. Each panel has one line per run, except the CU panel, which has one per run with outer steps.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    if smooth < 1:
        raise ValueError(f"--smooth {smooth}: must be >= 1 (1 plots the raw loss)")
    fig = Figure(figsize=(13, 8.5))
    FigureCanvasAgg(fig)
    (ax_train, ax_eval), (ax_time, ax_cu) = fig.subplots(2, 2)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    evals_by_wall = all(len(r.evals(worker)) >= 2 for r in runs)
    text_lines = []
    for r, color in zip(runs, colors):
        inner = r.inner(worker)
        tokens = [rec["tokens"] for rec in inner]
        smoothed = moving_average([float(rec["loss"]) for rec in inner], smooth)
        ax_train.plot(tokens, smoothed, color=color, label=r.label, linewidth=1.4)

        evals = r.evals(worker)
        eval_loss = [float(rec["eval_loss"]) for rec in evals]
        ax_eval.plot([rec["tokens"] for rec in evals], eval_loss, color=color, marker="o", label=r.label)
        if evals_by_wall:
            ax_time.plot(r.eval_times(worker), eval_loss, color=color, marker="o", label=r.label)
        else:
            ax_time.plot([rec["time_s"] for rec in inner], smoothed, color=color, label=r.label, linewidth=1.4)

        outer = r.outer(worker)
        if outer:
            cu = [100.0 * float(rec["utilization"]) for rec in outer]
            ax_cu.plot([rec["tokens"] for rec in outer], cu, color=color, marker=".", label=r.label)
        overall = r.utilization
        if overall is None:
            text_lines.append(f"{r.label}: no summary.json (run unfinished?)")
        else:
            note = "" if outer else " (no outer steps)"
            text_lines.append(f"{r.label}: overall CU {100.0 * overall:.1f}%{note}")

    suffix = f", worker {worker}" if worker else ""
    smooth_note = f"moving average of {smooth} steps" if smooth > 1 else "raw"
    ax_train.set_title(f"training loss ({smooth_note}{suffix})")
    ax_train.set_xlabel("tokens (all workers)")
    ax_train.set_ylabel("loss (nats/token)")
    ax_eval.set_title(f"eval loss of the outer parameters{suffix}")
    ax_eval.set_xlabel("tokens (all workers)")
    ax_eval.set_ylabel("eval loss (nats/token)")
    if evals_by_wall:
        ax_time.set_title(f"eval loss against wall time{suffix}")
        ax_time.set_ylabel("eval loss (nats/token)")
    else:
        ax_time.set_title(f"training loss ({smooth_note}) against wall time{suffix}")
        ax_time.set_ylabel("loss (nats/token)")
    ax_time.set_xlabel("training-loop wall time (s; evaluation and checkpoints excluded)")
    ax_cu.set_title(f"compute utilization per outer step{suffix}")
    ax_cu.set_xlabel("tokens (all workers)")
    ax_cu.set_ylabel("CU (%)")
    ax_cu.set_ylim(0, 105)
    ax_cu.text(
        0.02,
        0.03,
        "\n".join(text_lines),
        transform=ax_cu.transAxes,
        fontsize=8.5,
        va="bottom",
        ha="left",
        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85, "edgecolor": "0.8"},
    )
    for ax in (ax_train, ax_eval, ax_time, ax_cu):
        ax.grid(True, alpha=0.3)
    for ax in (ax_train, ax_eval, ax_cu):
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax_train.legend(fontsize=9)
    fig.suptitle(", ".join(str(r.path) for r in runs), fontsize=9)
    fig.tight_layout()
    return fig


def plot_runs(
    paths: Sequence[str | Path], output: str | Path, smooth: int = DEFAULT_SMOOTH, worker: int = 0
) -> tuple[Path, Figure]:
    """Load ``paths``, draw :func:`make_figure` and save it as a PNG to ``output``; return the path and figure."""
    if smooth < 1:
        raise ValueError(f"--smooth {smooth}: must be >= 1 (1 plots the raw loss)")
    if worker < 0:
        raise ValueError(f"--worker {worker}: must be >= 0")
    out = Path(output)
    if out.suffix.lower() != ".png":
        raise ValueError(f"-o {output}: the output is a PNG file; name it *.png")
    fig = make_figure(load_runs(paths, worker), smooth=smooth, worker=worker)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out, fig


def run(args: argparse.Namespace) -> int:
    """Run the sub-command; print an error naming the problem and return 2 on bad input."""
    try:
        path, _ = plot_runs(args.runs, args.output, smooth=args.smooth, worker=args.worker)
    except (RunError, ValueError) as exc:
        print(f"eagerloco plot: error: {exc}", file=sys.stderr)
        return 2
    print(f"plot written to {path}")
    return 0
