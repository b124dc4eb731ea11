"""Loss parity at equal tokens: eval loss of the outer parameters per method, several seeds.

    .venv/bin/python benchmarks/loss_parity.py                       # 6 methods x 3 seeds x 300 steps, ~25 min
    .venv/bin/python benchmarks/loss_parity.py --smoke               # seconds: tiny model, 2 methods, 1 seed

Every run is ``eagerloco train --launch simulated --link-mbit 0 --threads 1``: 2 workers as threads of one
process, the default model (820k parameters), AdamW, H = 30, outer SGD with Nesterov momentum 0.9 at the CLI's
default outer lr (``--extra`` changes anything, e.g. ``--extra=--outer-lr=0.4``). The loss does not depend on
the link, so no link is emulated. Runs are interleaved: seed loop outermost, the order of methods rotated per
seed. Each run evaluates the outer parameters every ``--eval-every`` steps (worker 0's φ mid-run; the final
value is after ``finalize`` and, for eager, ``consolidate``), which gives the curves for the time-to-target
table of ``time_to_target.py``.

Writes ``benchmarks/results/<name>.json`` (every run's summary and eval curve) and ``<name>.md`` (mean, sample
std and range of the final eval loss per method, and the difference to DiLoCo).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl

DEFAULT_METHODS = ["dp", "sync", "streaming", "delayed", "eager", "eager2"]


def run_one(method: str, seed: int, args: argparse.Namespace, runs_dir: Path) -> dict[str, Any]:
    flags = [*bl.METHODS[method], *args.extra_args]
    train_args = [
        *flags,
        "--launch", "simulated", "--link-mbit", "0", "--threads", "1",
        "--steps", str(args.steps), "--seed", str(seed), "--eval-every", str(args.eval_every),
        *(bl.SMOKE_ARGS if args.smoke else []),
    ]  # fmt: skip
    if args.sync_every:
        train_args += ["--sync-every", str(args.sync_every)]
    out_dir = runs_dir / f"{method}-s{seed}"
    summary = bl.run_train(train_args, out_dir)
    return {
        "method": method,
        "seed": seed,
        "args": train_args,
        "eval_loss": summary["eval_loss"],
        "evals": summary["evals"],
        "tokens": summary["tokens"],
        "wall_s": summary["wall_s"],
        "utilization": summary["utilization"],
        "outer_steps": summary["outer_steps"],
        "bytes_sent_per_worker": summary["bytes_sent_per_worker"],
        "final_train_loss": [w["final_train_loss"] for w in summary["per_worker"]],
        "run_dir": str(out_dir),
    }


def report(payload: dict[str, Any]) -> str:
    runs = payload["runs"]
    methods = payload["methods"]
    by_method = {m: [r for r in runs if r["method"] == m] for m in methods}
    ref = by_method.get("sync")
    ref_mean = bl.spread(r["eval_loss"] for r in ref)[0] if ref else None
    rows = []
    for m in methods:
        rs = sorted(by_method[m], key=lambda r: r["seed"])
        if not rs:
            continue
        mean, std, rng = bl.spread(r["eval_loss"] for r in rs)
        vs = f"{(mean / ref_mean - 1) * 100:+.1f} %" if ref_mean else "-"
        per_seed = ", ".join(f"{r['eval_loss']:.3f}" for r in rs)
        rows.append([bl.LABELS.get(m, m), f"{mean:.3f}", f"{std:.3f}", f"{rng:.3f}", vs, per_seed])
    head = [
        f"Loss parity: {payload['steps']} inner steps per worker, 2 workers, {runs[0]['tokens']:,} tokens, "
        f"seeds {payload['seeds']}; extra flags: {' '.join(payload['extra_args']) or 'none'}.",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"Machine: {bl.machine_line(payload['machine'])}",
        "",
    ]
    table = bl.md_table(["method", "eval loss (mean)", "std", "max - min", "vs DiLoCo", "per seed (seed order)"], rows)
    return "\n".join(head) + "\n" + table + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=sorted(bl.METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=30)
    ap.add_argument("--sync-every", type=int, default=0, help="H (0: the CLI's default, 30)")
    ap.add_argument("--extra", action="append", default=[], help="extra train flag, e.g. --extra=--outer-lr=0.4")
    ap.add_argument("--name", default="loss_parity")
    ap.add_argument("--out", type=Path, default=bl.RESULTS)
    ap.add_argument("--runs-dir", type=Path, default=bl.ROOT / "runs" / "benchmarks")
    ap.add_argument("--smoke", action="store_true", help="seconds-long: tiny model, few steps")
    args = ap.parse_args(argv)
    args.extra_args = [x for e in args.extra for x in e.split("=", 1)] if args.extra else []
    if args.smoke:
        if args.methods == DEFAULT_METHODS:
            args.methods = ["sync", "eager"]
        if args.seeds == [0, 1, 2]:
            args.seeds = [0]
        if args.steps == 300:
            args.steps = 10
        if args.eval_every == 30:
            args.eval_every = 5
        if not args.sync_every:
            args.sync_every = 5
    runs_dir = args.runs_dir / args.name
    payload: dict[str, Any] = {
        "benchmark": "loss_parity",
        "command": bl.command_line(),
        "machine": bl.machine(),
        "methods": args.methods,
        "seeds": args.seeds,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "extra_args": args.extra_args,
        "runs": [],
    }
    bl.run_seeds_interleaved(payload, args.methods, args.seeds, lambda m, seed: run_one(m, seed, args, runs_dir),
                             report, args.name, args.out)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
