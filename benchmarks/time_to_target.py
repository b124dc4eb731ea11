"""Time to a target loss on a slow link: each method's wall clock to reach DiLoCo's final eval loss.

    .venv/bin/python benchmarks/time_to_target.py            # after loss_parity.py and cu_bandwidth.py
    .venv/bin/python benchmarks/time_to_target.py --rate 8   # another link rate of the cu_bandwidth run
    .venv/bin/python benchmarks/time_to_target.py --runs R.json ... --cu C.json  # curves of recipe-sweep runs
    .venv/bin/python benchmarks/time_to_target.py --runs R.json ... --cu C30.json C10.json  # runs at two H

Combines two measurements of the same model and data (and H, or one timing per H), taken by the other drivers:

* ``loss_parity.json``: each method's eval-loss curve against inner steps (every ``--eval-every`` steps, several
  seeds; the loss does not depend on the link);
* ``cu_bandwidth.json``: each method's wall seconds per inner step on the real rate-limited link (median over
  repeats, steady state: the one-off final drain excluded, as a long run amortises it).

``--runs`` takes the curves from recipe-sweep runs instead (``recipe_sweep.py``: one JSON per run, each method
at its own outer recipe and length, e.g. eager trained longer than DiLoCo so that it gets there); the runs of a
method are its seeds, and they must share their length and evaluation steps. A run's H is its ``--sync-every``
(the CLI's 30 unless its extra flags say otherwise; a curve at another H is named by it, ``eager_fp4 ... H=10``),
and its seconds per step come from the ``--cu`` file measured at that H (one file per H).

The target is DiLoCo's (sync's; with ``--runs``, at the CLI's H) final eval loss, mean over seeds. A method's curve
is the mean over seeds at each evaluation; the step where it first reaches the target is interpolated linearly
between evaluations. Its wall clock is that step x its seconds per inner step at the chosen rate (the slowest one by
default). The mid-run evaluations are of worker 0's outer parameters; the last one is after ``finalize`` (and, for
eager, ``consolidate``), as in every run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl
import cu_bandwidth


def mean_curve(runs: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, mean eval loss over seeds) at the evaluation steps every run has."""
    steps = sorted(set.intersection(*({e["step"] for e in r["evals"]} for r in runs)))
    return [(s, sum(_at(r, s) for r in runs) / len(runs)) for s in steps]


def _at(run: dict[str, Any], step: int) -> float:
    return next(e["eval_loss"] for e in run["evals"] if e["step"] == step)


def first_crossing(curve: list[tuple[int, float]], target: float) -> float | None:
    """The first step at which the curve reaches ``target`` (linear between evaluations); None if never."""
    prev: tuple[int, float] | None = None
    for step, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return float(step)
            s0, l0 = prev
            return s0 + (l0 - target) / (l0 - loss) * (step - s0)
        prev = (step, loss)
    return None


def seconds_per_step(cu: dict[str, Any], method: str, rate: float) -> float | None:
    """Median wall seconds per inner step of ``method`` at ``rate`` (steady state), or None if not measured."""
    rs = [r for r in cu["runs"] if r["method"] == method and r["rate_mbit"] == rate]
    rs = [cu_bandwidth.steady_record(r, cu["sync_every"]) for r in rs]  # each average waited for, as a long run
    return bl.median(r["wall_steady_s"] / r["steps"] for r in rs) if rs else None


def curve_name(run: dict[str, Any]) -> str:
    """A curve's name: the method, and eager's own weight and smoothing where set (``eager w=0.875 β=0.5``)."""
    return " ".join(x for x in (run["method"], run.get("variant", "")) if x)


def curve_label_suffix(point: dict[str, Any], lr: bool = False, sync_every: int = bl.CLI_SYNC_EVERY) -> str:
    """What follows the method's label: eager's own weight and smoothing (ALGORITHMS.md 4.1, 4.4), or "the paper's
    rule" for eager without an own weight; then the outer lr where ``lr`` (one method run at several), and H where
    it is not the CLI's."""
    weight, beta = point.get("own_weight"), point.get("smoothing")
    parts = [f"own weight w={weight:g}"] if weight is not None else []
    parts += [f"smoothing β={beta:g}"] if beta else []
    if not parts and bl.is_eager(point["method"]):
        parts = ["the paper's rule"]
    parts += [f"lr {point['outer_lr']:g}"] if lr else []
    parts += [f"H = {sync_every}"] if sync_every != bl.CLI_SYNC_EVERY else []
    return "".join(f", {p}" for p in parts)


def recipe_runs(paths: list[Path]) -> dict[str, Any]:
    """Recipe-sweep run JSONs in the shape of ``loss_parity.json`` (method, seed, eval_loss, evals per run)."""
    runs = []
    for path in paths:
        r = json.loads(path.read_text())
        if r.get("status") != "ok":
            raise SystemExit(f"time_to_target: {path}: status {r.get('status')!r}, only finished runs have a curve")
        point = r["point"]
        weight = point.get("own_weight")  # eager's own weight (ALGORITHMS.md 4.1): a curve of its own
        beta = point.get("smoothing")  # and its smoothing (4.4)
        h = bl.sync_every_of(point.get("extra") or [])  # and its H, where not the CLI's
        variant = " ".join(([f"w={weight:g}"] if weight is not None else []) + ([f"β={beta:g}"] if beta else [])
                           + ([f"H={h}"] if h != bl.CLI_SYNC_EVERY else []))  # fmt: skip
        runs.append({"method": point["method"], "variant": variant,
                     "seed": point["seed"], "eval_loss": r["eval_loss"], "evals": r["evals"],
                     "steps": point["steps"], "sync_every": h, "recipe": point, "source": path.name})  # fmt: skip
    lrs: dict[str, set[float]] = {}
    for r in runs:
        lrs.setdefault(curve_name(r), set()).add(r["recipe"]["outer_lr"])
    for r in runs:  # one method (and variant) at several outer lrs: a curve per lr, named by it
        if len(lrs[curve_name(r)]) > 1:
            r["variant"] = " ".join(x for x in (r["variant"], f"lr={r['recipe']['outer_lr']:g}") if x)
    methods = list(dict.fromkeys(curve_name(r) for r in runs))
    steps = {m: sorted({r["steps"] for r in runs if curve_name(r) == m}) for m in methods}
    mixed = {m: s for m, s in steps.items() if len(s) > 1}
    if mixed:
        raise SystemExit(f"time_to_target: --runs mixes run lengths within a method: {mixed}; one length each")
    return {"runs": runs, "methods": methods, "steps": ", ".join(f"{m} {s[0]}" for m, s in steps.items()),
            "seeds": sorted({r["seed"] for r in runs})}  # fmt: skip


def plot(payload: dict[str, Any], path: Path) -> None:
    """Eval loss against wall seconds on the link, one line per method (its mean curve, each evaluation's step x
    its seconds per inner step), the target dashed and each method's crossing marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    timed = [r for r in payload["rows"] if r["seconds_per_step"] is not None]
    for i, row in enumerate(timed):
        color = colors[i % len(colors)]
        xs = [step * row["seconds_per_step"] for step, _ in row["curve"]]
        ax.plot(xs, [loss for _, loss in row["curve"]], "-o", markersize=3, color=color, label=row["label"])
        if row["wall_s"] is not None:
            ax.plot([row["wall_s"]], [payload["target"]], "x", color=color, markersize=9, markeredgewidth=2)
    ax.axhline(payload["target"], color="black", linestyle="--", linewidth=1, label="DiLoCo's final loss (target)")
    ax.set_xlabel(f"wall seconds on the {payload['rate_mbit']:g} Mbit/s link (inner steps x measured s / step)")
    ax.set_ylabel("eval loss (mean over seeds)")
    losses = [loss for r in timed for _, loss in r["curve"]]
    ax.set_ylim(min(losses) - 0.02, payload["target"] + 0.5)  # the approach to the target, not the first steps
    ax.grid(True, alpha=0.3)
    ax.set_title(f"Time to DiLoCo's final loss at {payload['rate_mbit']:g} Mbit/s (x: where each reaches it)")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loss", type=Path, default=bl.RESULTS / "loss_parity.json")
    ap.add_argument(
        "--cu",
        type=Path,
        nargs="+",
        default=[bl.RESULTS / "cu_bandwidth.json"],
        help="cu_bandwidth JSONs, one per H (each run's seconds per step come from the one at its H)",
    )
    ap.add_argument("--runs", type=Path, nargs="+", default=None, help="recipe-sweep run JSONs (instead of --loss)")
    ap.add_argument("--rate", type=float, default=None, help="Mbit/s (default: the slowest rate measured)")
    ap.add_argument("--name", default="time_to_target")
    ap.add_argument("--out", type=Path, default=bl.RESULTS)
    ap.add_argument("--no-plot", action="store_true", help="skip NAME.png (loss against wall seconds)")
    args = ap.parse_args(argv)
    missing = [str(p) for p in (*args.cu, *(args.runs or [args.loss])) if not p.is_file()]
    if missing:  # before any work: one line naming the files
        raise SystemExit(f"time_to_target: no such file: {', '.join(missing)}")
    cu_at: dict[int, dict[str, Any]] = {}  # H -> the link timing measured at it
    for path in args.cu:
        cu = json.loads(path.read_text())
        if cu["sync_every"] in cu_at:
            raise SystemExit(f"time_to_target: two --cu files at H = {cu['sync_every']}: give one per H")
        cu_at[cu["sync_every"]] = cu
    loss = recipe_runs(args.runs) if args.runs else json.loads(args.loss.read_text())
    rate = args.rate if args.rate is not None else min(r["rate_mbit"] for c in cu_at.values() for r in c["runs"])
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in loss["runs"]:
        by_method.setdefault(curve_name(r), []).append(r)
    if "sync" not in by_method:
        where = f"--runs has no DiLoCo ('sync') runs at the CLI's H = {bl.CLI_SYNC_EVERY}" if args.runs else (
            f"{args.loss.name} has no DiLoCo ('sync') runs")  # fmt: skip
        raise SystemExit(f"time_to_target: {where} to take the target from")
    target = sum(r["eval_loss"] for r in by_method["sync"]) / len(by_method["sync"])
    rows, table = [], []
    for method in loss["methods"]:
        runs = by_method.get(method, [])
        if not runs:
            continue
        curve = mean_curve(runs)
        step = first_crossing(curve, target)
        base, variant = runs[0]["method"], runs[0].get("variant", "")
        h = runs[0].get("sync_every", next(iter(cu_at)))  # loss_parity.json: the H of the (first) --cu
        # own weight, smoothing, outer lr: the same step (the same bytes); H changes it, so the timing at the run's H
        per_step = seconds_per_step(cu_at[h], base, rate) if h in cu_at else None
        wall = step * per_step if step is not None and per_step is not None else None
        label = bl.LABELS.get(base, base) + curve_label_suffix(
            runs[0].get("recipe") or {"method": base}, "lr=" in variant, h
        )
        rows.append({"method": method, "label": label, "seeds": len(runs), "step": step, "seconds_per_step": per_step,
                     "wall_s": wall, "final_mean_loss": curve[-1][1], "curve": curve})  # fmt: skip
        table.append([
            label,
            f"{curve[-1][1]:.3f}",
            f"{step:.0f}" if step is not None else f"not in {curve[-1][0]}",
            f"{per_step:.3f}" if per_step is not None else "not measured",
            f"{wall:.0f}" if wall is not None else "-",
        ])  # fmt: skip
    source = f"{len(args.runs)} recipe-sweep runs" if args.runs else args.loss.name
    sync_wall = next((r["wall_s"] for r in rows if r["method"] == "sync"), None)
    for row, cells in zip(rows, table):
        cells.append(f"{row['wall_s'] / sync_wall:.2f}x" if row["wall_s"] and sync_wall else "-")
    text = "\n".join([
        f"Time to DiLoCo's final eval loss ({target:.4f}, mean of {len(by_method['sync'])} seeds) at {rate:g} "
        f"Mbit/s: loss curves from `{source}` ({loss['steps']} steps, seeds {loss['seeds']}), seconds per "
        f"inner step on the link from {', '.join(f'`{p.name}`' for p in args.cu)} (steady state, median of repeats).",
        "",
        f"Command: `{bl.command_line()}`",
        "",
        bl.md_table(["method", "final eval loss (mean)", "inner steps to target", f"s / inner step at {rate:g} Mbit/s",
                     "wall s to target", "vs DiLoCo"], table),
    ])  # fmt: skip
    payload = {"benchmark": "time_to_target", "target": target, "rate_mbit": rate, "rows": rows,
               "sources": [*map(str, args.runs or [args.loss]), *map(str, args.cu)]}  # fmt: skip
    jpath, mpath = bl.write_results(args.name, args.out, payload, text)
    print(mpath.read_text())
    if not args.no_plot:
        plot(payload, args.out / f"{args.name}.png")
    print(f"wrote {jpath} and {mpath}" + ("" if args.no_plot else f", {args.out / (args.name + '.png')}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
