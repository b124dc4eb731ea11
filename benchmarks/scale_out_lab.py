#!/usr/bin/env python3
"""Two sites x N ranks on one machine: the multi-node torchrun launch of ``docs/scale-out.md`` reproduced in
network namespaces (``netlab.Lab``), one namespace per site, a rate-limited link between the sites.

    .venv/bin/python benchmarks/scale_out_lab.py                  # as root: 2 sites x 2 ranks, 20 Mbit/s, eager
    .venv/bin/python benchmarks/scale_out_lab.py --mode sync --rate 10 --parallel fsdp --json

Each site runs one torchrun agent with ``--nproc-per-node N`` (the exact command lines are printed), c10d
rendezvous hosted by site 0 on ``[fd00:e1::1]:PORT``, ``GLOO_SOCKET_IFNAME=lab0``; every rank runs
``examples/scale_out.py --ranks-per-worker N``, so each site is one DiLoCo worker of N ranks (DDP or FSDP2
inside). Traffic between the ranks of a site stays inside its namespace (the kernel routes a namespace's own
addresses over loopback); only the outer step, the rendezvous and the start-up checks cross the shaped link.

What it prints and checks (exit status 1 when a check fails):

* every rank's eval loss before and after training: it must fall;
* the digest (sha256) of every rank's final model: all equal (the workers consolidated into one model);
* per site, the bytes its link carried (``lab0`` tx, ``/proc/net/dev`` in the namespace) against what its ranks
  put into outer collectives (``payload_bytes``) and what DDP moved inside the site (2(N−1)/N · 4 bytes per
  parameter per rank and step): the link must carry at least the outer payload, and less than the site's
  inner traffic (it never crossed);
* sync mode: the time the site's ranks spent blocked must be at least the serialisation time of their outer
  payload at the link rate (Σ blocked ≥ 0.8 · bytes · 8 / R), i.e. the shaper really slowed the outer step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from netlab import Lab, LabError, netns_available, torchrun_argv  # noqa: E402

EXAMPLE = HERE.parent / "examples" / "scale_out.py"


def run_lab(
    *,
    ranks_per_site: int = 2,
    rate_mbit: float = 20.0,
    mode: str = "eager",
    parallel: str = "ddp",
    steps: int = 40,
    sync_every: int = 10,
    port: int = 29400,
    timeout_s: float = 240.0,
    echo: bool = True,
) -> dict[str, Any]:
    """Build a 2-site lab, run ``examples/scale_out.py`` under torchrun on both sites, return the reports.

    Returns ``{"argv": [per-site command lines], "ranks": [the ranks' reports (rank-R.json) by global rank],
    "sites": [{"tx_bytes", "rx_bytes"} per site], "rate_mbit", "ranks_per_site", "mode", "parallel", "wall_s"}``.
    """
    if ranks_per_site < 1:
        raise ValueError(f"ranks_per_site={ranks_per_site}: must be >= 1")
    if not rate_mbit > 0:
        raise ValueError(f"rate_mbit={rate_mbit}: must be > 0 (Mbit/s of the link between the sites)")
    with tempfile.TemporaryDirectory(prefix="scale-out-lab-") as tmp, Lab(num_sites=2, rate_mbit=rate_mbit) as lab:
        results = Path(tmp)  # the namespaces separate networks only: every rank writes its report here
        script = [str(EXAMPLE), "--ranks-per-worker", str(ranks_per_site), "--mode", mode, "--parallel", parallel,
                  "--steps", str(steps), "--sync-every", str(sync_every), "--timeout-s", "120",
                  "--results", str(results)]  # fmt: skip
        argvs = [torchrun_argv(lab, s, script, port, nproc_per_node=ranks_per_site) for s in lab.site_ids]
        if echo:
            print(f"lab {lab.prefix}: 2 sites x {ranks_per_site} ranks, {rate_mbit:g} Mbit/s per site link")
            for s, argv in zip(lab.site_ids, argvs):
                print(f"  site {s}: GLOO_SOCKET_IFNAME=lab0 ip netns exec {lab.sites[s].netns} {' '.join(argv)}")
        before = [lab.counters(s) for s in lab.site_ids]
        start = time.monotonic()
        procs = [
            lab.popen(
                s, argv, env={"OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            for s, argv in zip(lab.site_ids, argvs)
        ]
        outputs: list[str] = []
        try:
            for proc in procs:
                out, _ = proc.communicate(timeout=max(1.0, start + timeout_s - time.monotonic()))
                outputs.append(out)
        except subprocess.TimeoutExpired:
            raise LabError(f"torchrun did not finish within {timeout_s:g} s") from None
        wall = time.monotonic() - start
        for s, (proc, out) in enumerate(zip(procs, outputs)):
            if proc.returncode != 0:
                raise LabError(f"torchrun on site {s} exited {proc.returncode}:\n{out[-4000:]}")
        after = [lab.counters(s) for s in lab.site_ids]
        ranks = [json.loads(path.read_text()) for path in results.glob("rank-*.json")]
    return {
        "argv": argvs,
        "ranks": sorted(ranks, key=lambda r: r["rank"]),
        "sites": [
            {"tx_bytes": a.tx_bytes - b.tx_bytes, "rx_bytes": a.rx_bytes - b.rx_bytes} for a, b in zip(after, before)
        ],
        "rate_mbit": rate_mbit,
        "ranks_per_site": ranks_per_site,
        "mode": mode,
        "parallel": parallel,
        "wall_s": wall,
    }


def check(report: dict[str, Any]) -> list[str]:
    """The invariants listed in the module docstring; returns the failures (empty: all hold)."""
    failures: list[str] = []
    ranks, n = report["ranks"], report["ranks_per_site"]
    if len(ranks) != 2 * n:
        return [f"expected {2 * n} RESULT lines, got {len(ranks)}"]
    for r in ranks:
        if not r["final_loss"] < r["initial_loss"]:
            failures.append(f"rank {r['rank']}: eval loss did not fall ({r['initial_loss']} -> {r['final_loss']})")
    if len({r["digest"] for r in ranks}) != 1:
        failures.append(f"ranks hold different final models: {[r['digest'][:12] for r in ranks]}")
    for site, counters in enumerate(report["sites"]):
        mine = [r for r in ranks if r["site"] == str(site)]
        if len(mine) != n or len({r["worker"] for r in mine}) != 1:
            failures.append(f"site {site}: its ranks {[r['rank'] for r in mine]} are not the {n} ranks of one worker")
            continue
        payload = sum(r["payload_bytes"] for r in mine)
        inner = sum(2 * (n - 1) / n * 4 * r["params"] * r["steps"] for r in mine) if report["parallel"] == "ddp" else 0
        tx = counters["tx_bytes"]
        if tx < payload:
            failures.append(f"site {site}: link sent {tx} B < outer payload {payload} B")
        if inner and tx >= inner:
            failures.append(f"site {site}: link sent {tx} B >= the site's inner DDP traffic {inner:.0f} B")
        if report["mode"] == "sync":
            floor = 0.8 * payload * 8 / (report["rate_mbit"] * 1e6)
            blocked = sum(r["blocked_s"] for r in mine)
            if blocked < floor:
                failures.append(f"site {site}: blocked {blocked:.3f} s < {floor:.3f} s, the payload's time at the rate")
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks-per-site", type=int, default=2, help="N: torchrun --nproc-per-node on each site")
    parser.add_argument("--rate", type=float, default=20.0, help="Mbit/s of each site's link, up and down")
    parser.add_argument("--mode", default="eager", choices=("sync", "overlap", "delayed", "eager"))
    parser.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp", help="inside each site")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--sync-every", type=int, default=10)
    parser.add_argument("--port", type=int, default=29400, help="rendezvous port on site 0")
    parser.add_argument("--json", action="store_true", help="also print the whole report as one JSON line")
    args = parser.parse_args(argv)
    ok, why = netns_available()
    if not ok:
        print(f"skipped: {why}", file=sys.stderr)
        return 2
    try:
        report = run_lab(
            ranks_per_site=args.ranks_per_site,
            rate_mbit=args.rate,
            mode=args.mode,
            parallel=args.parallel,
            steps=args.steps,
            sync_every=args.sync_every,
            port=args.port,
        )
    except LabError as exc:
        print(f"scale_out_lab: {exc}", file=sys.stderr)
        return 1
    print(f"{'rank':>4} {'site':>4} {'worker':>6} {'inner':>5} {'loss before':>11} {'after':>7} {'MB sent':>8} "
          f"{'blocked s':>9} {'util':>5}  digest")  # fmt: skip
    for r in report["ranks"]:
        print(f"{r['rank']:>4} {r['site']:>4} {r['worker']:>6} {r['inner_rank']:>5} {r['initial_loss']:>11.4f} "
              f"{r['final_loss']:>7.4f} {r['payload_bytes'] / 1e6:>8.3f} {r['blocked_s']:>9.3f} "
              f"{r['utilization']:>5.2f}  {r['digest'][:12]}")  # fmt: skip
    for site, c in enumerate(report["sites"]):
        print(f"site {site} link: {c['tx_bytes'] / 1e6:.3f} MB sent, {c['rx_bytes'] / 1e6:.3f} MB received")
    print(f"wall {report['wall_s']:.1f} s")
    if args.json:
        print("JSON " + json.dumps(report))
    failures = check(report)
    for failure in failures:
        print(f"FAILED: {failure}")
    if not failures:
        print("ok: loss fell on every rank, one final model everywhere, only the outer step crossed the link")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
