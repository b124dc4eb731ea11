"""CU-versus-bandwidth curves: one panel per model, one line per method (matplotlib imported lazily)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def x_start(curves: Mapping[str, Mapping[str, Sequence[float]]], grid: Sequence[float]) -> float:
    """The grid point just below the first bandwidth at which any curve reaches 1 % CU (the grid's start if none
    is below it): the grid reaches down to 0.1 Mbit/s for small models, where large ones are all at zero."""
    first = next(
        (i for i in range(len(grid)) if any(cus[i] >= 0.01 for by in curves.values() for cus in by.values())),
        0,
    )
    return grid[max(0, first - 1)]


def plot_cu_curves(
    curves: Mapping[str, Mapping[str, Sequence[float]]],
    grid: Sequence[float],
    path: str | Path,
    *,
    targets: Sequence[float] = (),
    title: str | None = None,
) -> Path:
    """Save a figure of CU (y, 0 to 1) against bandwidth (x, Gbit/s, log scale) to ``path``; its suffix picks
    the format (png, pdf, svg, ...).

    ``curves[model][method]`` holds one CU per bandwidth of ``grid``. Dotted horizontal lines mark
    ``targets``. The x axis starts one grid point below the first where any curve reaches 1 % CU (:func:`x_start`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(curves)
    low = x_start(curves, grid)
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.6), sharey=True, squeeze=False)
    for ax, model in zip(axes[0], names):
        for method, cus in curves[model].items():
            ax.plot(list(grid), [100.0 * cu for cu in cus], label=method, linewidth=1.6)
        for target in targets:
            ax.axhline(100.0 * target, color="0.7", linestyle=":", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlim(low, max(grid))
        ax.set_ylim(0, 102)
        ax.set_title(model)
        ax.set_xlabel("bandwidth (Gbit/s)")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel("compute utilization (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0.0, 0.09, 1.0, 1.0))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def check_plot_path(path: str | Path) -> Path:
    """``path`` if matplotlib can write its suffix (png, pdf, svg, ...); else SimulatorConfigError naming them."""
    from matplotlib.backend_bases import FigureCanvasBase

    from eagerloco.simulator.config import SimulatorConfigError

    formats = FigureCanvasBase.get_supported_filetypes()
    out = Path(path)
    if out.suffix.lower().lstrip(".") not in formats:
        raise SimulatorConfigError(
            f"--plot {path}: the suffix picks the format; matplotlib writes {', '.join(sorted(formats))}"
        )
    return out
