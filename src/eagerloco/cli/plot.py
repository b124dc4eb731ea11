"""``eagerloco plot``: loss, utilization and communication plots of training runs, one line per run.

    eagerloco plot runs/eager runs/sync runs/dp              # writes runs/eager/plot.png
    eagerloco plot runs/eager runs/sync -o compare.pdf       # any format matplotlib writes: png, pdf, svg, ...
    eagerloco plot runs/eager --smooth 25 --worker 1 -o eager-worker1.png

The output is FIRST_RUN_DIR/plot.png unless -o names a file; its suffix picks the format (png, pdf, svg, eps, ps,
jpg, tif, webp, ...). Eight panels, in two columns:

1. training loss against tokens seen (all workers together), a trailing moving average over --smooth steps of
   one worker's loss (worker 0 by default);
2. eval loss of the outer parameters against tokens (markers);
3. eval loss against the training loop's wall time (evaluation and checkpoint time excluded); the smoothed training
   loss instead when a run evaluated fewer than twice;
4. compute utilization of each outer step (inner time / wall time since the previous outer step) against tokens,
   with each run's overall CU from summary.json (the final drain included) written in the panel;
5. time blocked on outer collectives at each outer step (the final drain is the last point);
6. bytes this worker handed to outer collectives, cumulative, against tokens;
7. the norm of this worker's fresh outer gradient at each outer step where a fragment synced;
8. the inner learning rate against tokens.

Data-parallel runs have no outer steps: they appear in panels 1-3 and 8, and in the text of panel 4. Runs are
labelled by their method and key settings from config.json (eager k=1 w=0.75 H=30, sync H=30, dp); the directory name is
appended when two runs share a label. matplotlib is imported only here, with the Agg canvas (no display needed).
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from eagerloco.lm.runs import Run, RunError, load_run, unique_labels

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DEFAULT_SMOOTH = 10
DEFAULT_OUTPUT = "plot.png"
"""Written into the first run directory when no -o is given."""


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``plot`` sub-command."""
    p = subparsers.add_parser(
        "plot",
        help="loss, compute-utilization and communication plots of runs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (the --out-dir of `eagerloco train`)")
    p.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help=f"the file to write; its suffix picks the format (png, pdf, svg, ...; default FIRST_RUN_DIR/"
        f"{DEFAULT_OUTPUT})",
    )
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


PANEL_TITLES: tuple[str, ...] = (
    "training loss",
    "eval loss of the outer parameters",
    "against wall time",
    "compute utilization per outer step",
    "time blocked on outer collectives per outer step",
    "bytes sent to outer collectives (cumulative)",
    "outer-gradient norm",
    "inner learning rate",
)
"""A phrase in each panel's title, in the order of :func:`make_figure`'s axes."""


def make_figure(runs: Sequence[Run], smooth: int = DEFAULT_SMOOTH, worker: int = 0) -> Figure:
    """The eight-panel figure of ``runs`` (see the module docstring), on an Agg canvas; nothing is written.

    Axes, in order: train loss vs tokens, eval loss vs tokens, eval (or train) loss vs wall time, CU per outer step
    vs tokens, blocked seconds per outer step, cumulative bytes sent, outer-gradient norm, inner lr. Each panel
    has one line per run, except the four outer-step panels (4-7), which have one per run with outer steps.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    if smooth < 1:
        raise ValueError(f"--smooth {smooth}: must be >= 1 (1 plots the raw loss)")
    fig = Figure(figsize=(13, 16))
    FigureCanvasAgg(fig)
    (ax_train, ax_eval), (ax_time, ax_cu), (ax_blocked, ax_bytes), (ax_norm, ax_lr) = fig.subplots(4, 2)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    evals_by_wall = all(len(r.evals(worker)) >= 2 for r in runs)
    text_lines = []
    for r, color in zip(runs, colors):
        inner = r.inner(worker)
        tokens = [rec["tokens"] for rec in inner]
        smoothed = moving_average([float(rec["loss"]) for rec in inner], smooth)
        ax_train.plot(tokens, smoothed, color=color, label=r.label, linewidth=1.4)
        ax_lr.plot(tokens, [float(rec.get("lr", math.nan)) for rec in inner], color=color, label=r.label)

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
            every = r.outer(worker, kind=None)  # the final drain too: it blocks and may send
            ax_blocked.plot(
                [rec["tokens"] for rec in every],
                [float(rec.get("blocked_s", 0.0)) for rec in every],
                color=color,
                marker=".",
                label=r.label,
            )
            sent = list(itertools.accumulate(int(rec.get("payload_bytes", 0)) for rec in every))
            ax_bytes.step([0, *(rec["tokens"] for rec in every)], [0, *sent], where="post", color=color, label=r.label)
            synced = [rec for rec in outer if rec.get("fragments_synced")]
            ax_norm.plot(
                [rec["tokens"] for rec in synced],
                [float(rec.get("delta_norm", math.nan)) for rec in synced],
                color=color,
                marker=".",
                label=r.label,
            )
        overall = r.utilization
        if overall is None:
            text_lines.append(f"{r.label}: no summary.json (run unfinished?)")
        else:
            note = "" if outer else " (no outer steps)"
            text_lines.append(f"{r.label}: overall CU {100.0 * overall:.1f}%{note}")

    suffix = f", worker {worker}" if worker else ""
    smooth_note = f"moving average of {smooth} steps" if smooth > 1 else "raw"
    ax_train.set_title(f"training loss ({smooth_note}{suffix})")
    ax_train.set_ylabel("loss (nats/token)")
    ax_eval.set_title(f"eval loss of the outer parameters{suffix}")
    ax_eval.set_ylabel("eval loss (nats/token)")
    if evals_by_wall:
        ax_time.set_title(f"eval loss against wall time{suffix}")
        ax_time.set_ylabel("eval loss (nats/token)")
    else:
        ax_time.set_title(f"training loss ({smooth_note}) against wall time{suffix}")
        ax_time.set_ylabel("loss (nats/token)")
    ax_time.set_xlabel("training-loop wall time (s; evaluation and checkpoints excluded)")
    ax_cu.set_title(f"compute utilization per outer step{suffix}")
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
    ax_blocked.set_title(f"time blocked on outer collectives per outer step{suffix}")
    ax_blocked.set_ylabel("blocked (s)")
    ax_bytes.set_title(f"bytes sent to outer collectives (cumulative){suffix}")
    ax_bytes.set_ylabel("bytes handed to collectives")
    ax_bytes.yaxis.set_major_formatter(EngFormatter(unit="B", sep=""))
    ax_bytes.set_ylim(bottom=0)
    ax_norm.set_title(f"outer-gradient norm ‖Δ‖ at each sync{suffix}")
    ax_norm.set_ylabel("‖Δ‖₂ (synced fragments)")
    ax_lr.set_title(f"inner learning rate{suffix}")
    ax_lr.set_ylabel("lr")
    for ax in fig.get_axes():
        ax.grid(True, alpha=0.3)
        if ax is not ax_time:
            ax.set_xlabel("tokens (all workers)")
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax_train.legend(fontsize=9)
    fig.suptitle(", ".join(str(r.path) for r in runs), fontsize=9)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 0.985))  # leave the suptitle its own line
    return fig


def supported_formats() -> dict[str, str]:
    """File suffixes matplotlib can write (without the dot) and what each is."""
    from matplotlib.backend_bases import FigureCanvasBase

    return dict(FigureCanvasBase.get_supported_filetypes())


def output_path(paths: Sequence[str | Path], output: str | Path | None) -> Path:
    """``output``, or FIRST_RUN_DIR/plot.png; raise ValueError if matplotlib cannot write its suffix."""
    if output is None:
        if not paths:
            raise ValueError("no run directory given")
        return Path(paths[0]) / DEFAULT_OUTPUT
    out = Path(output)
    formats = supported_formats()
    if out.suffix.lower().lstrip(".") not in formats:
        raise ValueError(
            f"-o {output}: the suffix picks the format; matplotlib writes {', '.join(sorted(formats))} "
            "(e.g. -o compare.pdf)"
        )
    return out


def plot_runs(
    paths: Sequence[str | Path], output: str | Path | None = None, smooth: int = DEFAULT_SMOOTH, worker: int = 0
) -> tuple[Path, Figure]:
    """Load ``paths``, draw :func:`make_figure` and save it to ``output`` (default FIRST_RUN_DIR/plot.png; the
    suffix picks the format); return the path and the figure. Every input is checked before anything is written."""
    if smooth < 1:
        raise ValueError(f"--smooth {smooth}: must be >= 1 (1 plots the raw loss)")
    if worker < 0:
        raise ValueError(f"--worker {worker}: must be >= 0")
    out = output_path(paths, output)
    fig = make_figure(load_runs(paths, worker), smooth=smooth, worker=worker)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out, fig


def run(args: argparse.Namespace) -> int:
    """Run the sub-command; one line on stderr and exit status 2 on bad input, 1 when the file cannot be written."""
    try:
        path, _ = plot_runs(args.runs, args.output, smooth=args.smooth, worker=args.worker)
    except (RunError, ValueError) as exc:
        print(f"eagerloco plot: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"eagerloco plot: error: cannot write the plot: {exc}", file=sys.stderr)
        return 1
    print(f"plot written to {path}")
    return 0
