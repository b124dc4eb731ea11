"""``--overlap-steps auto`` on real rate-limited links: does the τ a run picks for itself hide the link?

    sudo .venv/bin/python benchmarks/auto_overlap_lab.py                # 2 rates x (auto, τ = 1) x 2 repeats
    sudo .venv/bin/python benchmarks/auto_overlap_lab.py --compression fp4 --rates 4 --name auto_overlap_lab_fp4
    sudo .venv/bin/python benchmarks/auto_overlap_lab.py --compression fp4 --rates 4 --variants tau5 tau6  # fixed τ
    sudo .venv/bin/python benchmarks/auto_overlap_lab.py --smoke        # seconds: tiny model, one rate, auto only

The link lab of ``cu_bandwidth.py`` (two network namespaces, veth + bridge, ``tc tbf`` at the rate, one torchrun
agent per namespace, gloo over the shaped link, 1 torch thread per worker, no emulated link). At each rate the
default model trains in mode overlap with P = 2 fragments, H = 30, ``--steps`` inner steps (120: 8 fragment
syncs), once with ``--overlap-steps auto`` and once with the CLI's τ = 1 as the contrast; repeats outermost,
the two variants alternated. Reported per run: the τ chosen, what it measured (inner step, probe all-reduce, the
rate that probe implies) and the simulator's predicted steady-state CU at that τ, against the run's measured
steady-state CU and its blocked time per H inner steps.

Writes ``benchmarks/results/<name>.json`` / ``.md``. Needs root (network namespaces); exits with status 2 and the
reason where a lab can't be built.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl


def parse_variant(name: str) -> str:
    """argparse type of ``--variants``: 'auto', or 'tau<N>' for a fixed τ = N >= 1 (the CLI's is tau1)."""
    if name == "auto" or (name.startswith("tau") and name[3:].isdigit() and int(name[3:]) >= 1):
        return name
    raise argparse.ArgumentTypeError(f"variant {name!r}: must be 'auto' or 'tau<N>' with N >= 1, e.g. tau1")


def variant_flags(name: str) -> list[str]:
    return ["--overlap-steps", "auto" if name == "auto" else name[3:]]


BASE = ["--mode", "overlap", "--num-fragments", "2"]


def record(variant: str, rate: float, rep: int, summary: dict[str, Any]) -> dict[str, Any]:
    auto = summary.get("overlap_auto") or {}
    return {
        "variant": variant,
        "rate_mbit": rate,
        "repeat": rep,
        "tau": auto["overlap_steps"] if auto else int(variant[3:]),
        "probe_s": auto.get("probe_s"),
        "probe_link_mbit": auto.get("link_mbit"),
        "predicted_cu": auto.get("predicted_cu"),
        "hides": auto.get("hides"),
        "measure_s": auto.get("measure_s"),
        "calibrated_step_s": auto.get("step_time_s"),
        "inner_step_s": summary["inner_step_time_s"],
        "cu_run": summary["utilization"],
        "cu_steady": summary["steady_utilization"],
        "blocked_per_period_s": summary["blocked_per_period_s"],
        "wall_s": summary["wall_s"],
        "eval_loss": summary["eval_loss"],
        "ns_tx_bytes": summary["ns_tx_bytes"],
    }


def report(payload: dict[str, Any]) -> str:
    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    rows = []
    for r in sorted(payload["runs"], key=lambda r: (-r["rate_mbit"], r["variant"], r["repeat"])):
        rows.append([
            f"{r['rate_mbit']:g}", r["variant"], r["repeat"], r["tau"], num(r["calibrated_step_s"], ".3f"),
            f"{r['inner_step_s']:.3f}", num(r["probe_s"], ".2f"), num(r["probe_link_mbit"], ".2f"),
            num(r["predicted_cu"], ".3f"), f"{r['cu_steady']:.3f}", f"{r['cu_run']:.3f}",
            f"{r['blocked_per_period_s']:.2f}", f"{r['eval_loss']:.4f}",
        ])  # fmt: skip
    header = ["rate Mbit/s", "variant", "repeat", "τ", "step measured at start s", "inner step s (run)",
              "probe s", "link from probe Mbit/s", "CU predicted", "CU steady", "CU run", "blocked / H steps s",
              "eval loss"]  # fmt: skip
    lines = [
        f"# --overlap-steps auto on the link lab ({payload['steps']} inner steps, H = {payload['sync_every']}, P = 2, "
        f"codec {payload.get('compression', 'none')})",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"Machine: {bl.machine_line(payload['machine'])}",
        "",
        bl.md_table(header, rows),
    ]
    lines += bl.failure_lines(payload, "variant")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bl.add_lab_arguments(ap, name="auto_overlap_lab", rates=[4.0, 6.0], port=29700,
                         smoke="seconds-long: tiny model, one rate, auto only")  # fmt: skip
    ap.add_argument("--variants", nargs="+", type=parse_variant, default=["auto", "tau1"],
                    help="'auto' and fixed τ as 'tau<N>' (default: auto tau1)")  # fmt: skip
    ap.add_argument("--compression", default="none", help="the outer gradients' codec (train --compression)")
    args = ap.parse_args(argv)
    extra: list[str] = []
    if args.smoke:
        extra = list(bl.SMOKE_ARGS)
        args.rates, args.variants, args.repeats = [50.0], ["auto"], 1
        args.steps, args.sync_every = min(args.steps, 12), 6
    payload = bl.lab_payload("auto_overlap_lab", args, variants=args.variants, compression=args.compression)
    if payload is None:
        return 2
    with bl.netlab().Lab(num_sites=2, rate_mbit=args.rates[0]) as lab:
        print(f"lab {lab.prefix} up", flush=True)
        for counter, (rep, rate, variant) in enumerate(bl.lab_schedule(args.variants, args.rates, args.repeats)):
            if lab.rates[0] != rate:
                lab.set_rate(rate)
            train_args = [
                *BASE, *variant_flags(variant), "--compression", args.compression, *extra, "--steps", str(args.steps),
                "--sync-every", str(args.sync_every), "--seed", "0", "--eval-every", "0",
            ]  # fmt: skip
            summary = None
            label = f"rep {rep} {rate:g} Mbit/s {variant}"
            for attempt in bl.lab_attempts(payload, label, variant=variant, rate_mbit=rate, repeat=rep):
                with attempt:
                    summary = bl.run_train_torchrun(
                        lab, train_args, args.runs_dir / args.name / f"{variant}-{rate:g}mbit-r{rep}",
                        port=args.port + (counter % 50) + 100 * (attempt.number - 1),
                        rdzv_id=f"{lab.prefix}-{counter}-{attempt.number}",
                    )  # fmt: skip
            if summary is None:
                continue
            rec = record(variant, rate, rep, summary)
            payload["runs"].append(rec)
            print(f"rep {rep} {rate:g} Mbit/s {variant}: τ {rec['tau']}, CU steady {rec['cu_steady']:.3f} "
                  f"(predicted {rec['predicted_cu']})", flush=True)  # fmt: skip
            bl.write_results(args.name, args.out, payload, report(payload))
    jpath, mpath = bl.write_results(args.name, args.out, payload, report(payload))
    print(mpath.read_text())
    print(f"wrote {jpath} and {mpath}")
    return 0 if payload["runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
