"""Compressed outer gradients: eval loss and bytes per outer step, per codec, at equal tokens.

    .venv/bin/python benchmarks/codec_loss.py                        # 7 codecs x 2 seeds x 300 steps, ~20 min
    .venv/bin/python benchmarks/codec_loss.py --smoke                # seconds: tiny model, 2 codecs, 1 seed

Every run is the default model of ``eagerloco train`` (820k parameters) with 2 simulated workers in eager mode,
k = 1, H = 30, the same seed and the same tokens for every codec (``loss_parity.run_one``: no link, the loss
does not depend on it). Codecs: fp32 (none), bf16, fp16, fp8 e4m3 and int8 (per-block scale), 4-bit E3M0 with
and without error feedback. Runs are interleaved (seed loop outermost, codec order rotated per seed).

Reported per codec: the mean final eval loss of the outer parameters and its difference to fp32, and the bytes
each worker passed to the collectives per outer step (the engine's count of the encoded payload, scales
included) with the reduction against fp32. Writes ``benchmarks/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl
from loss_parity import run_one

DEFAULT_CODECS = ["eager", "eager_bf16", "eager_fp16", "eager_fp8", "eager_int8", "eager_fp4_noef", "eager_fp4"]
CODEC_LABELS = {
    "eager": "fp32 (none)",
    "eager_bf16": "bf16",
    "eager_fp16": "fp16",
    "eager_fp8": "fp8 e4m3, block scale",
    "eager_int8": "int8, block scale",
    "eager_fp4_noef": "fp4 E3M0, block scale",
    "eager_fp4": "fp4 E3M0, block scale, error feedback",
}


def report(payload: dict[str, Any]) -> str:
    runs = payload["runs"]
    by_codec = {c: [r for r in runs if r["method"] == c] for c in payload["methods"]}
    ref = by_codec.get("eager") or []
    ref_loss = bl.spread(r["eval_loss"] for r in ref)[0] if ref else None
    ref_bytes = bl.median(r["bytes_sent_per_worker"] / r["outer_steps"] for r in ref) if ref else None
    rows = []
    for codec, rs in by_codec.items():
        if not rs:
            continue
        rs = sorted(rs, key=lambda r: r["seed"])
        mean, std, _ = bl.spread(r["eval_loss"] for r in rs)
        per_step = bl.median(r["bytes_sent_per_worker"] / r["outer_steps"] for r in rs)
        rows.append([
            CODEC_LABELS.get(codec, codec),
            f"{mean:.4f}",
            f"{std:.4f}",
            f"{(mean / ref_loss - 1) * 100:+.2f} %" if ref_loss else "-",
            f"{per_step / 1e6:.3f}",
            f"{ref_bytes / per_step:.2f}x" if ref_bytes else "-",
            ", ".join(f"{r['eval_loss']:.4f}" for r in rs),
        ])  # fmt: skip
    head = [
        f"Codecs: {payload['steps']} inner steps per worker, 2 workers, eager k=1, H = 30, "
        f"{runs[0]['tokens']:,} tokens, seeds {payload['seeds']}.",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"Machine: {bl.machine_line(payload['machine'])}",
        "",
    ]
    table = bl.md_table(
        ["codec", "eval loss (mean)", "std", "vs fp32", "MB sent per outer step per worker", "fewer bytes",
         "per seed"],
        rows,
    )  # fmt: skip
    return "\n".join(head) + "\n" + table + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--codecs", nargs="+", default=DEFAULT_CODECS, choices=sorted(bl.METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--name", default="codec_loss")
    ap.add_argument("--out", type=Path, default=bl.RESULTS)
    ap.add_argument("--runs-dir", type=Path, default=bl.ROOT / "runs" / "benchmarks")
    ap.add_argument("--smoke", action="store_true", help="seconds-long: tiny model, few steps")
    args = ap.parse_args(argv)
    # run_one's settings: final evaluation only, the CLI's default H
    args.eval_every, args.sync_every, args.extra_args = args.steps, 0, []
    if args.smoke:
        args.codecs = ["eager", "eager_fp4"] if args.codecs == DEFAULT_CODECS else args.codecs
        args.seeds = [0] if args.seeds == [0, 1] else args.seeds
        args.steps = 10 if args.steps == 300 else args.steps
        args.eval_every, args.sync_every = args.steps, 5
    payload: dict[str, Any] = {
        "benchmark": "codec_loss",
        "command": bl.command_line(),
        "machine": bl.machine(),
        "methods": args.codecs,
        "seeds": args.seeds,
        "steps": args.steps,
        "runs": [],
    }
    runs_dir = args.runs_dir / args.name
    bl.run_seeds_interleaved(payload, args.codecs, args.seeds, lambda c, seed: run_one(c, seed, args, runs_dir),
                             report, args.name, args.out)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
