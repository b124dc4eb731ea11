"""eagerloco against torchft: DiLoCo and streaming DiLoCo of both libraries, and eagerloco's eager, side by side.

    sudo .venv/bin/pip install torchft==0.2.0                        # once (the ft extra: setup.sh --dev has it)
    sudo .venv/bin/python benchmarks/torchft_compare.py              # 5 variants x 2 rates x 2 repeats, ~25 min
    sudo .venv/bin/python benchmarks/torchft_compare.py --smoke      # ~1 min: tiny model, one rate, one repeat

Builds a 2-site link lab (``netlab.py``: one namespace per worker, veth + bridge, ``tc tbf`` up and down at the
rate) and runs, for every rate, interleaved (repeat loop outermost, rates alternately up and down, variants
rotated per (repeat, rate)):

* ``eagerloco train`` as a 2-node torchrun job, one worker per namespace, gloo over the shaped link, 1 torch
  thread per worker, no emulated link: ``sync`` (DiLoCo), ``streaming`` (P = 2, τ = 1, α = 0.5) and ``eager``
  (k = 1), the flags of ``benchlib.METHODS``;
* torchft 0.2.0's ``DiLoCo`` (one fragment, ``fragment_sync_delay=0``) and streaming DiLoCo (the same 2 fragments,
  ``fragment_sync_delay=1``, ``fragment_update_alpha=0.5``) through ``torchft_worker.py``: one replica per
  namespace, each its own replica group of one rank with a gloo ``ProcessGroupGloo`` over the same shaped link,
  torchft's lighthouse (``torchft_lighthouse``) started fresh for the run in site 0's namespace.

Both libraries train the same thing: the default GPT (820k parameters) from the same seed, the same per-worker
batches, AdamW with the same lr, schedule and clipping, the same outer SGD (the mode's recipe of ``eagerloco
train``, recorded per run), H = 30, the same fragments (see ``torchft_worker.py``). Reported per (rate, variant),
medians over repeats: tokens/s, compute utilization (inner time / wall of the training loop, as eagerloco's engine
measures it), time blocked, wall clock, bytes each site sent (``/proc/net/dev`` of ``lab0``, over the whole job,
start-up included), eval loss of the outer / global parameters on the same validation batches; for torchft also its
quorum, all-reduce wait and commit time per sync.

Writes ``benchmarks/results/<name>.json`` / ``.md``. Exits with status 2 and the reason where torchft is not
installed or a lab can't be built (network namespaces need root).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl
import cu_bandwidth

INSTALL = ".venv/bin/pip install torchft==0.2.0"
WORKER = Path(__file__).resolve().with_name("torchft_worker.py")

# variant -> (library, eagerloco method of benchlib.METHODS whose flags it runs with)
VARIANTS: dict[str, tuple[str, str]] = {
    "eagerloco_sync": ("eagerloco", "sync"),
    "eagerloco_streaming": ("eagerloco", "streaming"),
    "eagerloco_eager": ("eagerloco", "eager"),
    "torchft_diloco": ("torchft", "sync"),
    "torchft_streaming": ("torchft", "streaming"),
}
LABELS: dict[str, str] = {
    "eagerloco_sync": "eagerloco DiLoCo (sync)",
    "eagerloco_streaming": "eagerloco streaming, P=2, τ=1, α=0.5",
    "eagerloco_eager": "eagerloco eager k=1",
    "torchft_diloco": "torchft DiLoCo (τ=0)",
    "torchft_streaming": "torchft streaming, P=2, τ=1, α=0.5",
}
DEFAULT_RATES = [20.0, 8.0]

DIFFERENCES = """\
What is the same in both libraries' runs: the model class, config and seed (bitwise identical initial parameters),
each worker's batches, AdamW with the same lr, warm-up + cosine schedule and clipping, the same outer SGD (the
mode's recipe of `eagerloco train`; both read one config) with one outer optimizer per fragment, H, the parameters
of each fragment, the sign and averaging of the outer gradient (sum over gloo, then / 2), the validation batches,
and gloo over the same shaped link with one torch thread per worker. What differs, and could explain differences in
the numbers:

* **torchft's control plane at every sync.** Each sync point calls `Manager.start_quorum` (a lighthouse round
  trip that returns only when both replicas have asked: a barrier, so one replica's lateness shows up as the
  other's quorum time) and `should_commit` (the commit vote); eagerloco's workers meet only in the all-reduce.
  The managers also heartbeat the lighthouse every 100 ms; that traffic crosses site 1's link and is in its bytes.
* **The first quorum builds torchft's gloo process group** inside the training loop (connections over the
  shaped link); eagerloco's process group and start-up collectives come before its clock starts.
* **All-reduce granularity.** torchft all-reduces each parameter tensor of a fragment separately (its default,
  `use_bucketization=False`), eagerloco one flat buffer per fragment.
* **Copies.** torchft keeps the global parameters as a per-tensor backup and copies model <-> backup around every
  outer step (restore, outer step on the live parameters, save, lerp); eagerloco keeps φ as one flat buffer and
  uses `torch._foreach_*` copies. This is the non-blocked part of the outer time.
* **Streaming schedule.** Both sync each fragment every H steps, one fragment every H/P steps, the later one in
  the model first. torchft launches a fragment's all-reduce τ steps *before* its sync point and applies it at the
  sync point; eagerloco launches at the sync point and applies τ steps after it: the same overlap, shifted by τ
  steps. With 120 steps eagerloco's last launch (step 120) is still in flight when the loop ends and is applied by
  `finalize()` (a plain step, no momentum; its wait is the difference between *CU run* and *CU steady*); torchft's
  last sync completes inside the loop. With τ = 0 (DiLoCo) the schedules are identical, and so are the results.
* **Launch.** eagerloco runs under torchrun (c10d rendezvous across the sites); torchft's replicas are plain
  processes that find each other through the lighthouse (in site 0's namespace), and meet at a TCPStore barrier
  before their clocks start. Job wall time (start-up) is not part of tokens/s or CU for either.
* **Measurement.** eagerloco's engine splits time at its `step()` calls; the torchft worker times the outer work
  by hooks around torchft's optimizer post-hook and its blocked time inside `start_quorum`, the all-reduce waits
  and `should_commit` (instrumented by wrapping those manager methods; behaviour unchanged). Both define
  CU = (loop wall time - outer time) / loop wall time."""


def torchft_status() -> tuple[bool, str]:
    """(True, version) if torchft and its lighthouse are installed for this interpreter, else (False, why)."""
    if importlib.util.find_spec("torchft") is None:
        return False, f"torchft is not installed for {sys.executable}: {INSTALL}"
    from importlib.metadata import version

    if lighthouse_binary() is None:
        return False, f"torchft is installed but its `torchft_lighthouse` command is missing: {INSTALL}"
    return True, version("torchft")


def lighthouse_binary() -> str | None:
    here = Path(sys.executable).parent / "torchft_lighthouse"
    return str(here) if here.exists() else shutil.which("torchft_lighthouse")


def eagerloco_source() -> dict[str, Any]:
    """Where the workers import eagerloco from (``PYTHONPATH`` may point at a snapshot of the tree), and the
    checkout's commit and number of changed files, for the results."""

    def out(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=bl.ROOT).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "imported_from": out([bl.python(), "-c", "import eagerloco; print(eagerloco.__file__)"]),
        "git_head": out(["git", "rev-parse", "--short", "HEAD"]),
        "changed_files_in_checkout": len(out(["git", "status", "--porcelain", "--", "src"]).splitlines()),
    }


def syncs_per_run(method: str, steps: int, sync_every: int) -> int:
    """Fragment syncs (outer all-reduces launched) in a run: steps / H per fragment."""
    fragments = 2 if method == "streaming" else 1
    return fragments * (steps // sync_every)


# ------------------------------------------------------------------------------------------------ one eagerloco run
def run_eagerloco(lab: Any, args: Sequence[str], out_dir: Path, *, port: int, rdzv_id: str) -> dict[str, Any]:
    """``benchlib.run_train_torchrun``, except that a job whose workers crash *after* writing a fresh
    summary.json (e.g. while tearing down at exit) counts: its summary gets ``exit_error``."""
    summary_path = Path(out_dir) / "summary.json"
    before = [lab.counters(s) for s in lab.site_ids]
    start, t0 = time.time(), time.perf_counter()
    try:
        return bl.run_train_torchrun(lab, args, out_dir, port=port, rdzv_id=rdzv_id)
    except RuntimeError as exc:
        if not summary_path.exists() or summary_path.stat().st_mtime < start:
            raise
        deltas = [lab.counters(s) - b for s, b in zip(lab.site_ids, before)]
        summary = bl.read_summary(out_dir)
        summary.update(ns_tx_bytes=[d.tx_bytes for d in deltas], ns_rx_bytes=[d.rx_bytes for d in deltas],
                       driver_wall_s=time.perf_counter() - t0)  # fmt: skip
        summary["exit_error"] = str(exc).strip().splitlines()[-1][:300]
        return summary


# ------------------------------------------------------------------------------------------------ one torchft run
def run_torchft(
    lab: Any, args: Sequence[str], out_dir: Path, *, port: int, timeout: float = 1800.0
) -> list[dict[str, Any]]:
    """Run ``torchft_worker.py ARGS`` on every site of ``lab`` with a fresh lighthouse in site 0; return the
    replicas' reports, each with ``ns_tx_bytes`` / ``ns_rx_bytes`` (its site's ``lab0`` counters over the whole
    job, lighthouse start included) and ``driver_wall_s``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("replica*.json"):
        old.unlink()
    addr0 = lab.addr(0)
    before = [lab.counters(s) for s in lab.site_ids]
    start = time.perf_counter()
    lh_log = (out_dir / "lighthouse.log").open("w")
    lighthouse = lab.popen(
        0,
        [lighthouse_binary(), "--bind", f"[::]:{port}", "--min_replicas", str(lab.num_sites),
         "--join_timeout_ms", "1000", "--quorum_tick_ms", "10"],
        stdout=lh_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    procs, logs = [], []
    try:
        for s in lab.site_ids:
            argv = [
                bl.python(), str(WORKER), *args, "--threads", "1",
                "--replica", str(s), "--replicas", str(lab.num_sites),
                "--lighthouse", f"http://[{addr0}]:{port}", "--store-addr", lab.addr(s),
                "--barrier-addr", addr0, "--barrier-port", str(port + 1),
                "--result", str(out_dir / f"replica{s}.json"),
            ]  # fmt: skip
            log = (out_dir / f"replica{s}.log").open("w")
            logs.append(log)
            procs.append(lab.popen(s, argv, stdout=log, stderr=subprocess.STDOUT, cwd=bl.ROOT))
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                raise RuntimeError(f"torchft job did not finish within {timeout:.0f} s") from None
    finally:
        lighthouse.terminate()
        try:
            lighthouse.wait(timeout=5)
        except subprocess.TimeoutExpired:
            lighthouse.kill()
        lh_log.close()
        for log in logs:
            log.close()
    wall = time.perf_counter() - start
    deltas = [lab.counters(s) - b for s, b in zip(lab.site_ids, before)]
    reports = []
    for s, p in zip(lab.site_ids, procs):
        path = out_dir / f"replica{s}.json"
        if p.returncode or not path.exists():
            tails = "\n".join(
                f"--- site {i}:\n{(out_dir / f'replica{i}.log').read_text()[-3000:]}" for i in lab.site_ids
            )
            raise RuntimeError(f"torchft job failed (exit codes {[q.returncode for q in procs]}):\n{tails}")
        rep = json.loads(path.read_text())
        rep.update(ns_tx_bytes=deltas[s].tx_bytes, ns_rx_bytes=deltas[s].rx_bytes, driver_wall_s=wall)
        reports.append(rep)
    return reports


# ------------------------------------------------------------------------------------------------ records
def record_eagerloco(variant: str, rate: float, rep: int, steps: int, s: dict[str, Any]) -> dict[str, Any]:
    steady = bl.steady_state(s)
    method = VARIANTS[variant][1]
    syncs = syncs_per_run(method, steps, s["sync_every"])
    workers = s["per_worker"]
    finalize = sum(w.get("finalize_blocked_s", 0.0) for w in workers) / len(workers)
    # the engine's steady state: the final drain out, every average launched counted as waited for
    steady_blocked = sum(w.get("steady_blocked_s", w["blocked_s"] - w.get("finalize_blocked_s", 0.0)) for w in workers)
    return {
        "variant": variant,
        "library": "eagerloco",
        "method": method,
        "rate_mbit": rate,
        "repeat": rep,
        "steps": steps,
        "tokens": s["tokens"],
        "tokens_per_s": s["tokens_per_s"],
        "wall_s": s["wall_s"],
        "cu_run": s["utilization"],
        "cu_steady": steady["cu_steady"],
        "blocked_s": s["blocked_s"],
        "finalize_blocked_s": finalize,
        "syncs": syncs,
        "blocked_per_sync_s": steady_blocked / len(workers) / syncs if syncs else 0.0,
        "outer_launches": workers[0].get("outer_launches"),
        "outer_waits": workers[0].get("outer_waits"),
        "inner_step_time_s": s["inner_step_time_s"],
        "payload_bytes_per_worker": s["bytes_sent_per_worker"],
        "ns_tx_bytes": s["ns_tx_bytes"],
        "ns_rx_bytes": s["ns_rx_bytes"],
        "eval_loss": s["eval_loss"],
        "final_train_loss": [w["final_train_loss"] for w in s["per_worker"]],
        "params": s["params"],
        "sync_every": s["sync_every"],
        "driver_wall_s": s["driver_wall_s"],
    }


def record_torchft(variant: str, rate: float, rep: int, steps: int, reps: list[dict[str, Any]]) -> dict[str, Any]:
    method = VARIANTS[variant][1]
    n = len(reps)
    walls = [r["wall_s"] for r in reps]
    tokens = sum(r["tokens_this_replica"] for r in reps)
    commits = reps[0]["manager_step"]
    quorums, commits_s, first_quorum = [], [], []
    for r in reps:
        launches = [x["quorum_s"] for x in r["syncs"] if x["quorum_s"] > 0]
        first_quorum += launches[:1]  # the first quorum also configures the process group: reported apart
        quorums += launches[1:]
        commits_s += [x["commit_s"] for x in r["syncs"] if x["commit_s"] > 0]
    blocked = sum(r["blocked_s"] for r in reps) / n
    return {
        "variant": variant,
        "library": "torchft",
        "method": method,
        "rate_mbit": rate,
        "repeat": rep,
        "steps": steps,
        "tokens": tokens,
        "tokens_per_s": tokens / max(walls),
        "wall_s": max(walls),
        "cu_run": sum(r["utilization"] for r in reps) / n,
        "cu_steady": sum(r["utilization"] for r in reps) / n,  # no drain: every sync completes inside the loop
        "blocked_s": blocked,
        "finalize_blocked_s": 0.0,
        "syncs": commits,
        "blocked_per_sync_s": blocked / commits if commits else 0.0,
        "quorum_s": sum(r["quorum_s"] for r in reps) / n,
        "wait_s": sum(r["wait_s"] for r in reps) / n,
        "commit_s": sum(r["commit_s"] for r in reps) / n,
        "first_quorum_s": sum(first_quorum) / len(first_quorum) if first_quorum else 0.0,
        "quorum_per_sync_s": bl.median(quorums) if quorums else 0.0,
        "commit_per_sync_s": bl.median(commits_s) if commits_s else 0.0,
        "inner_step_time_s": sum(r["inner_step_time_s"] for r in reps) / n,
        "payload_bytes_per_worker": sum(r["payload_bytes"] for r in reps) // n,
        "allreduces_per_worker": reps[0]["allreduces"],
        "ns_tx_bytes": [r["ns_tx_bytes"] for r in reps],
        "ns_rx_bytes": [r["ns_rx_bytes"] for r in reps],
        "eval_loss": reps[0]["eval_loss"],
        "eval_loss_replicas": [r["eval_loss"] for r in reps],
        "final_train_loss": [r["final_train_loss"] for r in reps],
        "init_params_identical": len({r["init_params_hash"] for r in reps}) == 1,
        "final_params_identical": len({r["final_params_hash"] for r in reps}) == 1,
        "params": reps[0]["params"],
        "sync_every": reps[0]["sync_every"],
        "driver_wall_s": reps[0]["driver_wall_s"],
    }


# ------------------------------------------------------------------------------------------------ report
AGG_KEYS = (
    "tokens_per_s", "wall_s", "cu_run", "cu_steady", "blocked_s", "blocked_per_sync_s", "eval_loss",
    "inner_step_time_s", "payload_bytes_per_worker", "driver_wall_s",
)  # fmt: skip
TORCHFT_KEYS = ("quorum_s", "wait_s", "commit_s", "first_quorum_s", "quorum_per_sync_s", "commit_per_sync_s")


def steady_record(run: dict[str, Any]) -> dict[str, Any]:
    """An eagerloco record from before the engine counted its waits, its steady state restated as the engine
    now states it (``cu_bandwidth.legacy_stats``: eagerloco's streaming drains the average it launches at the last
    step, which its loop never waited for; torchft's last sync completes inside its loop). Others as they are."""
    if run["library"] != "eagerloco" or run.get("outer_launches") is not None:
        return run
    launches, waits = cu_bandwidth.loop_waits(run["method"], run["steps"], run["sync_every"])
    if not 0 < waits < launches:
        return run
    wall_steady = run["cu_run"] * run["wall_s"] / run["cu_steady"]  # inner time / steady CU
    stats = cu_bandwidth.legacy_stats(run["cu_steady"], wall_steady, run["blocked_s"], run["finalize_blocked_s"],
                                      launches, waits)  # fmt: skip
    return {
        **run,
        "cu_steady_drain_only": run["cu_steady"],
        "blocked_per_sync_drain_only_s": run["blocked_per_sync_s"],
        "cu_steady": stats.steady_utilization,
        "blocked_per_sync_s": stats.steady_blocked_s / run["syncs"],
    }


def aggregate(runs: list[dict[str, Any]], variants: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (rate, variant): medians over repeats (min-max of CU and eval loss)."""
    runs = [steady_record(r) for r in runs]

    def extra(row: dict[str, Any], rs: list[Any]) -> dict[str, Any]:
        torchft = {key: bl.median(r[key] for r in rs) for key in TORCHFT_KEYS} if row["library"] == "torchft" else {}
        return {**torchft, "syncs": rs[0]["syncs"]}

    return bl.aggregate(runs, "variant", variants, AGG_KEYS, ("cu_run", "eval_loss"), ("library",), extra)


def _range(row: dict[str, Any], key: str, fmt: str) -> str:
    lo, hi = row[f"{key}_min"], row[f"{key}_max"]
    mid = format(row[key], fmt)
    return mid if row["n"] == 1 or lo == hi else f"{mid} [{format(lo, fmt)}-{format(hi, fmt)}]"


def report(payload: dict[str, Any]) -> str:
    rows = aggregate(payload["runs"], payload["variants"])
    payload["table"] = rows
    steps, h = payload["steps"], payload["sync_every"]
    step_s = bl.median(r["inner_step_time_s"] for r in payload["runs"]) if payload["runs"] else float("nan")
    params = payload["runs"][0]["params"] if payload["runs"] else 0
    lines = [
        f"eagerloco vs torchft {payload.get('torchft_version', '?')}: 2 workers in 2 network namespaces, gloo over a "
        f"tbf-shaped link (rate up and down per site), {params:,}-parameter GPT ({params * 4 / 1e6:.2f} MB fp32), "
        f"{steps} inner steps per worker, H = {h}, 1 torch thread per worker, repeats: {payload['repeats']} "
        f"(medians; min-max in brackets). Inner step {step_s:.3f} s (median), inner phase H x step = "
        f"{h * step_s:.1f} s.",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"Machine: {bl.machine_line(payload['machine'])}",
        "",
    ]
    header = [
        "rate Mbit/s", "variant", "tokens/s", "CU run", "CU steady", "blocked s", "blocked / sync s",
        f"wall s ({steps} steps)", "MB sent / site", "eval loss",
    ]  # fmt: skip
    table = []
    for r in rows:
        table.append(
            [
                f"{r['rate_mbit']:g}",
                LABELS.get(r["variant"], r["variant"]),
                f"{r['tokens_per_s']:,.0f}",
                _range(r, "cu_run", ".3f"),
                f"{r['cu_steady']:.3f}",
                f"{r['blocked_s']:.1f}",
                f"{r['blocked_per_sync_s']:.2f}",
                f"{r['wall_s']:.1f}",
                f"{r['ns_tx_mb']:.1f}",
                _range(r, "eval_loss", ".4f"),
            ]
        )
    lines.append(bl.md_table(header, table))
    tft = [r for r in rows if r["library"] == "torchft"]
    if tft:
        tft_header = ["rate Mbit/s", "variant", "syncs", "first quorum s", "quorum / sync s", "all-reduce wait s",
                      "commit / sync s", "blocked s"]  # fmt: skip
        tft_rows = [
            [f"{r['rate_mbit']:g}", LABELS.get(r["variant"], r["variant"]), r["syncs"], f"{r['first_quorum_s']:.3f}",
             f"{r['quorum_per_sync_s']:.3f}", f"{r['wait_s']:.2f}", f"{r['commit_per_sync_s']:.4f}",
             f"{r['blocked_s']:.2f}"]
            for r in tft
        ]  # fmt: skip
        lines += [
            "",
            "torchft's blocked time by kind (per replica, medians over repeats): the lighthouse quorum at every sync "
            "(a barrier across replicas; the first one also builds the gloo process group, shown apart), waits on "
            "the all-reduces, and the commit vote.",
            "",
            bl.md_table(tft_header, tft_rows),
        ]
    cmp_header = ["rate Mbit/s", "pair", "tokens/s", "CU run", "blocked s", "MB sent / site", "eval loss"]
    pairs = [("torchft_diloco", "eagerloco_sync"), ("torchft_streaming", "eagerloco_streaming")]
    by = {(r["rate_mbit"], r["variant"]): r for r in rows}
    cmp_rows = []
    for rate in sorted({r["rate_mbit"] for r in rows}, reverse=True):
        for a, b in pairs:
            ra, rb = by.get((rate, a)), by.get((rate, b))
            if ra is None or rb is None:
                continue
            cmp_rows.append([
                f"{rate:g}", f"{LABELS[a]} vs {LABELS[b]}",
                f"{100 * (ra['tokens_per_s'] / rb['tokens_per_s'] - 1):+.1f} %",
                f"{ra['cu_run'] - rb['cu_run']:+.3f}", f"{ra['blocked_s'] - rb['blocked_s']:+.2f}",
                f"{ra['ns_tx_mb'] - rb['ns_tx_mb']:+.2f}", f"{ra['eval_loss'] - rb['eval_loss']:+.4f}",
            ])  # fmt: skip
    if cmp_rows:
        lines += [
            "",
            "torchft minus eagerloco, same method (medians):",
            "",
            bl.md_table(cmp_header, cmp_rows),
        ]
    lines += bl.failure_lines(payload, "variant")
    crashed = [r for r in payload["runs"] if r.get("exit_error")]
    if crashed:
        lines += ["", f"Jobs that crashed after writing their summary (counted): "
                  f"{len(crashed)}"]  # fmt: skip
        lines += [f"- rep {r['repeat']}, {r['rate_mbit']:g} Mbit/s, {r['variant']}: {r['exit_error']}" for r in crashed]
    lines += ["", DIFFERENCES]
    checks = [r for r in payload["runs"] if r["library"] == "torchft"]
    if checks:
        init_ok = all(r["init_params_identical"] for r in checks)
        final_ok = all(r["final_params_identical"] for r in checks)
        lines += [
            "",
            f"torchft replicas started from bitwise identical parameters in {'every' if init_ok else 'NOT every'} run "
            f"and ended with identical global parameters in {'every' if final_ok else 'NOT every'} run.",
        ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bl.add_lab_arguments(ap, name="torchft_compare", rates=DEFAULT_RATES, port=29400,
                         smoke="seconds-long: tiny model, one rate, one repeat")  # fmt: skip
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    ok, version = torchft_status()
    if not ok:
        print(f"torchft_compare: {version}", file=sys.stderr)
        return 2
    extra: list[str] = []
    if args.smoke:
        extra = list(bl.SMOKE_ARGS)
        if args.rates == DEFAULT_RATES:
            args.rates = [50.0]
        args.steps, args.sync_every, args.repeats = min(args.steps, 12), 6, 1
    payload = bl.lab_payload("torchft_compare", args, torchft_version=version, eagerloco_source=eagerloco_source(),
                             variants=args.variants, seed=args.seed)  # fmt: skip
    if payload is None:
        return 2
    runs_dir = args.runs_dir / args.name
    with bl.netlab().Lab(num_sites=2, rate_mbit=args.rates[0]) as lab:
        print(f"lab {lab.prefix} up; torchft {version}", flush=True)
        for counter, (rep, rate, variant) in enumerate(bl.lab_schedule(args.variants, args.rates, args.repeats)):
            if lab.rates[0] != rate:
                lab.set_rate(rate)
            library, method = VARIANTS[variant]
            train_args = [
                *bl.METHODS[method], *extra, "--steps", str(args.steps), "--sync-every", str(args.sync_every),
                "--seed", str(args.seed), "--eval-every", "0",
            ]  # fmt: skip
            out_dir = runs_dir / f"{variant}-{rate:g}mbit-r{rep}"
            port = args.port + 2 * (counter % 50)
            rec = None
            label = f"rep {rep} {rate:g} Mbit/s {variant}"
            for attempt in bl.lab_attempts(payload, label, variant=variant, rate_mbit=rate, repeat=rep):
                retry = attempt.number - 1
                with attempt:
                    if library == "eagerloco":
                        rdzv = f"{lab.prefix}-{counter}-{retry}"
                        summary = run_eagerloco(lab, train_args, out_dir, port=port + 100 * retry, rdzv_id=rdzv)
                        rec = record_eagerloco(variant, rate, rep, args.steps, summary)
                        rec["exit_error"] = summary.get("exit_error")
                    else:
                        reps = run_torchft(lab, train_args, out_dir, port=port + 100 * retry)
                        rec = record_torchft(variant, rate, rep, args.steps, reps)
            if rec is None:
                continue
            payload["runs"].append(rec)
            print(
                f"rep {rep} {rate:>5g} Mbit/s {variant:>20}: {rec['tokens_per_s']:>7,.0f} tok/s CU {rec['cu_run']:.3f} "
                f"blocked {rec['blocked_s']:.2f} s wall {rec['wall_s']:.1f} s eval {rec['eval_loss']:.4f} "
                f"(job {rec['driver_wall_s']:.0f} s)",
                flush=True,
            )
            bl.write_results(args.name, args.out, payload, report(payload))
    jpath, mpath = bl.write_results(args.name, args.out, payload, report(payload))
    print(mpath.read_text())
    print(f"wrote {jpath}, {mpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
