"""Compute utilization and wall clock vs bandwidth, on real rate-limited links between network namespaces.

    sudo .venv/bin/python benchmarks/cu_bandwidth.py                 # 6 methods x 4 rates x 2 repeats, ~45 min
    sudo .venv/bin/python benchmarks/cu_bandwidth.py --smoke         # seconds: tiny model, one rate, eager only

Builds a link lab of ``--sites`` sites, 2 by default (``netlab.py``: one namespace per worker, veth + bridge,
``tc tbf`` up and down at the rate), and for every rate and method runs ``eagerloco train`` as a torchrun job of
one node per site, one worker per namespace, gloo over the shaped links, 1 torch thread per worker (so more sites
than cores share them: the inner step slows, and the simulator is given the measured one), no emulated link
(``--link-mbit 0``). The
default model (820k parameters, 3.3 MB of fp32), H = 30, ``--steps`` inner steps per worker (120 = 4 outer
steps; data-parallel runs fewer steps on slow links, see ``--dp-budget-s``, and its wall clock is scaled to the
same tokens). Order: repeat loop outermost, rates alternately up and down, methods rotated per (repeat, rate).

Reported per (rate, method), medians over repeats:

* ``CU run``: the training loop's compute utilization as the engine measures it (inner time / wall time),
  the final drain (``finalize``) included;
* ``CU steady``: the same without the final drain: eager and delayed end every run by waiting for the last
  all-reduce once, a cost a long run amortises; this is what the simulator predicts;
* time blocked per outer step (drain excluded) and in all, wall clock of the loop for the same tokens;
* bytes each site sent (``/proc/net/dev`` of ``lab0`` over the whole job, start-up included);
* the simulator's steady-state CU for the same model (parameters, layers, measured seconds per inner step),
  method and nominal rate (``eagerloco.simulator``, bits 32; fp4: ``CODEC_BITS['fp4']`` = 4.25, scales included).

Writes ``benchmarks/results/<name>.json`` / ``.md`` and the plot ``<name>.png``. Needs root (network
namespaces); exits with status 2 and the reason where a lab can't be built.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl

DEFAULT_METHODS = ["dp", "sync", "streaming", "delayed", "eager", "eager_fp4"]
DEFAULT_RATES = [100.0, 20.0, 8.0, 4.0]
MODEL_BYTES = 820_352 * 4


def dp_steps(rate_mbit: float, steps: int, budget_s: float, step_s: float = 0.2, sites: int = 2) -> int:
    """Data-parallel steps at this rate: all of ``steps`` if the predicted run fits ``budget_s``, else fewer, at
    least 8. Per step: compute plus one fp32 ring all-reduce of the model among ``sites``, in which each site
    sends 2·(sites − 1)/sites model sizes through its own link, at about 0.85 of the rate."""
    sent_bytes = MODEL_BYTES * 2 * (sites - 1) / sites
    per_step = sent_bytes * 8 / (0.85 * rate_mbit * 1e6) + step_s
    return max(8, min(steps, int(budget_s / per_step)))


def simulated_cu(
    method: str, rate_mbit: float, step_s: float, layers: int, params: int, sync_every: int, workers: int = 2
) -> float:
    """The simulator's steady-state CU for this method at ``rate_mbit`` among ``workers`` sites (no latency)."""
    from eagerloco.simulator.config import LinkSpec, ModelSpec
    from eagerloco.simulator.events import simulate

    model = ModelSpec(name="default-gpt", params=float(params), layers=layers, step_time_s=step_s)
    link = LinkSpec(bandwidth_gbps=rate_mbit / 1e3, workers=workers)
    return simulate(model, simulated_method(method, sync_every), link).cu


def measured_link_mbit(
    blocked_s: float, step_s: float, layers: int, params: int, sync_every: int, workers: int = 2
) -> float:
    """The rate in Mbit/s at which the simulator's sync all-reduce takes ``blocked_s``: what DiLoCo's measured
    blocked time per outer step says the link delivered (``eagerloco simulate --link-mbit measured``)."""
    from eagerloco.simulator.config import ModelSpec
    from eagerloco.simulator.search import link_rate_from_blocked

    model = ModelSpec(name="default-gpt", params=float(params), layers=layers, step_time_s=step_s)
    return 1e3 * link_rate_from_blocked(model, simulated_method("sync", sync_every), blocked_s, workers=workers)


@functools.cache
def simulated_method(method: str, sync_every: int) -> Any:
    """The simulator's spec of a ``benchlib.METHODS`` entry: its ``eagerloco train`` flags parsed by train's own
    parser, built as the simulator builds that mode (``mode_method``: the codec's bits, block scales included, are
    what the engine sends). Only the method asked for is built: a spec validates against H (τ < H)."""
    from eagerloco.cli.train import add_arguments
    from eagerloco.lm.config import from_args
    from eagerloco.simulator.presets import mode_method

    parser = add_arguments(argparse.ArgumentParser())
    outer = from_args(parser.parse_args([*bl.METHODS[method], "--sync-every", str(sync_every)])).outer
    return mode_method(
        outer.mode,
        sync_every=outer.sync_every,
        num_fragments=outer.num_fragments,
        overlap_steps=outer.overlap_steps,
        delay=outer.delay,
        compression=outer.compression,
    )


def loop_waits(method: str, steps: int, sync_every: int) -> tuple[int, int]:
    """(averages launched, averages waited for inside the loop) in a run of ``steps`` inner steps: fragment p
    syncs at t ≡ p·H/P (mod H); eager and delayed drain each fragment's last k, overlap those due after the last
    step (t + τ > steps), sync none (ALGORITHMS.md sections 1-5). What the engine counts since it counts them
    (``outer_launches``, ``outer_waits``), for the records measured before."""
    spec = simulated_method(method, sync_every)
    if spec.data_parallel:
        return 0, 0
    fragments = spec.fragments or 1
    launches = drained = 0
    for p in range(fragments):
        offset = p * sync_every // fragments
        syncs = [t for t in range(1, steps + 1) if t % sync_every == offset]
        launches += len(syncs)
        if spec.slack_outer_steps:
            drained += min(len(syncs), spec.slack_outer_steps)
        elif spec.overlap_steps:
            drained += sum(t + spec.overlap_steps > steps for t in syncs)
    return launches, launches - drained


def legacy_stats(
    cu_steady: float, wall_steady_s: float, blocked_s: float, drain_s: float, launches: int, waits: int
) -> Any:
    """The engine's ``RunStats`` of a run recorded before it counted its waits (means over workers, taken alike:
    exact for one worker), so that its steady state comes from the engine's own formula
    (``RunStats.steady_blocked_s``): the inner time is ``cu_steady`` × ``wall_steady_s``, every blocked second of
    the loop a wait for an average (no divergence measurement in these runs), ``launches`` and ``waits`` from
    :func:`loop_waits`."""
    from eagerloco.engine import RunStats

    inner, in_loop = cu_steady * wall_steady_s, blocked_s - drain_s
    return RunStats(
        inner_s=inner,
        overhead_s=wall_steady_s - inner - in_loop,
        blocked_s=blocked_s,
        finalize_blocked_s=drain_s,
        outer_launches=launches,
        outer_waits=waits,
        outer_wait_s=in_loop,
    )


def steady_record(run: dict[str, Any], sync_every: int) -> dict[str, Any]:
    """``run`` (a record of this driver) with the engine's steady state: as recorded where the engine counted its
    waits, restated through :func:`legacy_stats` where it did not (the old values kept as ``*_drain_only``)."""
    if run.get("outer_launches") is not None:
        return run
    launches, waits = loop_waits(run["method"], run["steps"], sync_every)
    if not 0 < waits < launches:
        return run
    stats = legacy_stats(run["cu_steady"], run["wall_steady_s"], run["blocked_s"], run["finalize_blocked_s"],
                         launches, waits)  # fmt: skip
    return {
        **run,
        "cu_steady_drain_only": run["cu_steady"],
        "wall_steady_drain_only_s": run["wall_steady_s"],
        "blocked_per_outer_step_drain_only_s": run["blocked_per_outer_step_s"],
        "cu_steady": stats.steady_utilization,
        "wall_steady_s": stats.steady_wall_s,
        "blocked_per_outer_step_s": stats.steady_blocked_s / run["outer_steps"],
        "outer_launches": launches,
        "outer_waits": waits,
    }


def shaper_drops(lab: Any) -> int:
    """Packets dropped so far by the lab's shapers (every site, upload and download)."""
    return sum(q["drops"] for site in lab.site_ids for q in lab.shaper_stats(site).values())


def record(method: str, rate: float, rep: int, steps: int, full_steps: int, s: dict[str, Any]) -> dict[str, Any]:
    steady = bl.steady_state(s)
    wall = s["wall_s"]
    return {
        "method": method,
        "rate_mbit": rate,
        "repeat": rep,
        "steps": steps,
        "cu_run": s["utilization"],
        "cu_steady": steady["cu_steady"],
        "blocked_s": s["blocked_s"],
        "blocked_per_outer_step_s": s["blocked_per_outer_step_s"],
        "finalize_blocked_s": sum(w.get("finalize_blocked_s", 0.0) for w in s["per_worker"]) / len(s["per_worker"]),
        "wall_s": wall,
        "wall_same_tokens_s": wall * full_steps / steps,
        "wall_steady_s": steady["wall_steady_s"],
        "tokens": s["tokens"],
        "tokens_per_s": s["tokens_per_s"],
        "inner_step_time_s": s["inner_step_time_s"],
        "outer_steps": s["outer_steps"],
        "payload_bytes_per_worker": s["bytes_sent_per_worker"],
        "ns_tx_bytes": s["ns_tx_bytes"],
        "ns_rx_bytes": s["ns_rx_bytes"],
        "eval_loss": s["eval_loss"],
        "outer_launches": s["per_worker"][0].get("outer_launches"),
        "outer_waits": s["per_worker"][0].get("outer_waits"),
        "params": s["params"],
        "num_layers": s["num_layers"],
        "sync_every": s["sync_every"],
        "driver_wall_s": s["driver_wall_s"],
    }


def aggregate(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (rate, method): medians over repeats, and the simulator's CU."""
    if not payload["runs"]:
        return []
    runs = [steady_record(r, payload["sync_every"]) for r in payload["runs"]]
    step_s = bl.median(r["inner_step_time_s"] for r in runs if not r["method"].startswith("dp"))
    if math.isnan(step_s):
        step_s = bl.median(r["inner_step_time_s"] for r in runs)
    params, layers, h = runs[0]["params"], runs[0]["num_layers"], runs[0]["sync_every"]
    sites = payload.get("sites", 2)  # records from before --sites: two
    keys = (
        "cu_run", "cu_steady", "blocked_per_outer_step_s", "blocked_s", "wall_s", "wall_same_tokens_s",
        "tokens_per_s", "inner_step_time_s", "eval_loss", "payload_bytes_per_worker",
    )  # fmt: skip

    # The rate each tbf setting delivered to gloo's all-reduce, from DiLoCo's blocked time (median over repeats):
    # the simulator at that rate instead of the nominal one separates the transport's overhead from the model.
    measured = {}
    for rate in sorted({r["rate_mbit"] for r in runs}):
        sync = [r for r in runs if r["rate_mbit"] == rate and r["method"] == "sync"]
        blocked = bl.median(r["blocked_per_outer_step_s"] for r in sync)
        if not math.isnan(blocked) and blocked > 0:
            measured[rate] = measured_link_mbit(blocked, step_s, layers, params, h, sites)

    def sim(row: dict[str, Any], _: Any) -> dict[str, float | None]:
        link = measured.get(row["rate_mbit"])
        return {
            "cu_sim": simulated_cu(row["method"], row["rate_mbit"], step_s, layers, params, h, sites),
            "cu_sim_measured_link": (
                None if link is None else simulated_cu(row["method"], link, step_s, layers, params, h, sites)
            ),
        }

    rows = bl.aggregate(runs, "method", payload["methods"], keys, ("cu_run", "cu_steady"), ("steps",), sim)
    payload["sim_step_time_s"] = step_s
    payload["measured_link_mbit"] = {f"{rate:g}": link for rate, link in measured.items()}
    return rows


def report(payload: dict[str, Any]) -> str:
    if not payload["runs"]:  # every job failed: what failed, not a table
        return "\n".join(["No run finished.", "", f"Command: `{payload['command']}`", "",
                          *bl.failure_lines(payload, "method")]) + "\n"  # fmt: skip
    rows = aggregate(payload)
    payload["table"] = rows
    full, sites = payload["steps"], payload.get("sites", 2)
    queue_ms = payload.get("queue_ms", bl.netlab().DEFAULT_QUEUE_MS)  # records from before --queue-ms: the default
    lines = [
        f"CU vs bandwidth: {sites} workers in {sites} network namespaces, torchrun + gloo over a tbf-shaped link "
        f"(rate up and down per site, a {queue_ms:g} ms queue), {full} inner steps per worker "
        f"(H = {payload['sync_every']}), 1 torch thread per worker, "
        f"repeats: {payload['repeats']} (medians; min-max of CU in brackets). One fp32 outer all-reduce = "
        f"{payload['runs'][0]['params'] * 4 / 1e6:.2f} MB; "
        f"inner step {payload.get('sim_step_time_s', float('nan')):.3f} s (median), "
        f"inner phase H x step = {payload['sync_every'] * payload.get('sim_step_time_s', float('nan')):.1f} s.",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"Machine: {bl.machine_line(payload['machine'])}",
        "",
    ]
    header = [
        "rate Mbit/s", "method", "CU run", "CU steady", "CU simulator", "at the measured link",
        "blocked / outer step s", "blocked s",
        f"wall s ({full} steps)", "tokens/s", "MB sent / site", "eval loss",
    ]  # fmt: skip
    table_rows = []
    for r in rows:
        star = "*" if r["steps"] != full else ""
        table_rows.append(
            [
                f"{r['rate_mbit']:g}",
                bl.LABELS.get(r["method"], r["method"]) + (f" ({r['steps']} steps)" if star else ""),
                f"{r['cu_run']:.3f} [{r['cu_run_min']:.3f}-{r['cu_run_max']:.3f}]",
                f"{r['cu_steady']:.3f}",
                f"{r['cu_sim']:.3f}",
                "-" if r.get("cu_sim_measured_link") is None else f"{r['cu_sim_measured_link']:.3f}",
                f"{r['blocked_per_outer_step_s']:.2f}",
                f"{r['blocked_s']:.1f}",
                f"{r['wall_same_tokens_s']:.1f}{star}",
                f"{r['tokens_per_s']:,.0f}",
                f"{r['ns_tx_mb']:.1f}",
                f"{r['eval_loss']:.3f}",
            ]
        )
    lines.append(bl.md_table(header, table_rows))
    links = payload.get("measured_link_mbit") or {}
    if links:
        rates = ", ".join(f"{link:.3g} at {rate}" for rate, link in links.items())
        lines += [
            "",
            "CU simulator: at the nominal tbf rate; at the measured link: at the rate DiLoCo's blocked time per outer "
            f"step implies (the simulator's sync all-reduce taking that long; `eagerloco simulate --link-mbit "
            f"measured`), in Mbit/s: {rates}.",
        ]
    if any(r["steps"] != full for r in rows):
        lines += [
            "",
            f"\\* data-parallel ran fewer steps on slow links (an all-reduce per step); its wall clock is scaled "
            f"to {full} steps, its CU is per step and needs no scaling; its blocked time per 'outer step' is per "
            "inner step.",
        ]
    lines += bl.failure_lines(payload, "method")
    return "\n".join(lines) + "\n"


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, sites = payload["table"], payload.get("sites", 2)
    methods = [m for m in payload["methods"] if any(r["method"] == m for r in rows)]
    rates = sorted({r["rate_mbit"] for r in rows})
    grid = [10 ** (math.log10(min(rates) / 2) + i * (math.log10(max(rates) * 2) - math.log10(min(rates) / 2)) / 80)
            for i in range(81)]  # fmt: skip
    step_s = payload["sim_step_time_s"]
    r0 = payload["runs"][0]
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, method in enumerate(methods):
        color = colors[i % len(colors)]
        pts = [r for r in rows if r["method"] == method]
        xs = [r["rate_mbit"] for r in pts]
        ys = [r["cu_steady"] for r in pts]
        lo = [r["cu_steady"] - r["cu_steady_min"] for r in pts]
        hi = [r["cu_steady_max"] - r["cu_steady"] for r in pts]
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", color=color, capsize=3, label=f"{bl.LABELS.get(method, method)}")
        sim = [simulated_cu(method, g, step_s, r0["num_layers"], r0["params"], r0["sync_every"], sites) for g in grid]
        ax.plot(grid, sim, "--", color=color, linewidth=1, alpha=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("link rate per site (Mbit/s, tc tbf up and down)")
    ax.set_ylabel("compute utilization (steady state)")
    ax.set_ylim(0, 1.05)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(
        f"Measured (points, median and range of {payload['repeats']}) vs simulator (dashed)\n"
        f"{r0['params']:,}-parameter GPT, {sites} workers, H = {r0['sync_every']}, inner step {step_s:.3f} s"
    )
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bl.add_lab_arguments(ap, name="cu_bandwidth", rates=DEFAULT_RATES, port=29400,
                         smoke="seconds-long: tiny model, one rate, eager only")  # fmt: skip
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=sorted(bl.METHODS))
    ap.add_argument("--dp-budget-s", type=float, default=60.0, help="cap on a data-parallel run's predicted time")
    ap.add_argument(
        "--queue-ms",
        type=float,
        default=bl.netlab().DEFAULT_QUEUE_MS,
        help="each tbf shaper's queue, in ms at the rate: packets beyond it are dropped (default %(default)g)",
    )
    ap.add_argument("--sites", type=int, default=2, help="sites (workers), one namespace each (default 2)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="rebuild <name>.md and .png from <name>.json")
    args = ap.parse_args(argv)
    if args.report_only:
        payload = json.loads((args.out / f"{args.name}.json").read_text())
        jpath, mpath = bl.write_results(args.name, args.out, payload, report(payload))
        if not args.no_plot:
            plot(payload, args.out / f"{args.name}.png")
        print(mpath.read_text())
        return 0
    extra: list[str] = []
    if args.smoke:
        extra = list(bl.SMOKE_ARGS)
        if args.rates == DEFAULT_RATES:
            args.rates = [50.0]
        if args.methods == DEFAULT_METHODS:
            args.methods = ["eager"]
        args.steps, args.sync_every, args.repeats = min(args.steps, 10), 5, 1
    if not args.queue_ms > 0:
        ap.error(f"--queue-ms {args.queue_ms:g}: the tbf queue must be > 0 ms")
    if args.sites < 2:
        ap.error(f"--sites {args.sites}: a lab needs at least 2 sites (one worker each)")
    payload = bl.lab_payload("cu_bandwidth", args, methods=args.methods, queue_ms=args.queue_ms, sites=args.sites)
    if payload is None:
        return 2
    runs_dir = args.runs_dir / args.name
    counter = 0
    with bl.netlab().Lab(num_sites=args.sites, rate_mbit=args.rates[0], queue_ms=args.queue_ms) as lab:
        print(f"lab {lab.prefix} up", flush=True)
        for rep, rate, method in bl.lab_schedule(args.methods, args.rates, args.repeats):
            if lab.rates[0] != rate:
                lab.set_rate(rate)
            steps = args.steps
            if method.startswith("dp"):
                steps = dp_steps(rate, args.steps, args.dp_budget_s, sites=args.sites)
            if args.smoke:
                steps = args.steps
            train_args = [
                *bl.METHODS[method], *extra, "--steps", str(steps), "--sync-every", str(args.sync_every),
                "--seed", "0", "--eval-every", "0", "--workers", str(args.sites),
            ]  # fmt: skip
            summary = None
            drops_before = shaper_drops(lab)
            label = f"rep {rep} {rate:g} Mbit/s {method}"
            for attempt in bl.lab_attempts(payload, label, method=method, rate_mbit=rate, repeat=rep):
                counter += 1
                with attempt:
                    summary = bl.run_train_torchrun(
                        lab,
                        train_args,
                        runs_dir / f"{method}-{rate:g}mbit-r{rep}",
                        port=args.port + (counter % 50),
                        rdzv_id=f"{lab.prefix}-{counter}",
                    )
            if summary is None:
                continue
            rec = record(method, rate, rep, steps, args.steps, summary)
            rec["shaper_drops"] = shaper_drops(lab) - drops_before  # every site's 2 shapers (retry included)
            payload["runs"].append(rec)
            print(
                f"rep {rep} {rate:>6g} Mbit/s {method:>10}: CU {rec['cu_run']:.3f} steady "
                f"{rec['cu_steady']:.3f} blocked/outer {rec['blocked_per_outer_step_s']:.2f} s wall "
                f"{rec['wall_s']:.1f} s ({steps} steps), {rec['shaper_drops']} packets dropped",
                flush=True,
            )
            bl.write_results(args.name, args.out, payload, report(payload))
    jpath, mpath = bl.write_results(args.name, args.out, payload, report(payload))
    if not args.no_plot:
        plot(payload, args.out / f"{args.name}.png")
    print(mpath.read_text())
    print(f"wrote {jpath}, {mpath}" + ("" if args.no_plot else f", {args.out / (args.name + '.png')}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
