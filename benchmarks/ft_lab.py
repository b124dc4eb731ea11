"""A site killed and restarted on the link lab: eagerloco's fault tolerance (sync, eager) and torchft's DiLoCo.

    sudo .venv/bin/python benchmarks/ft_lab.py                       # sync, eager, torchft; ~6 runs of ~2-4 min
    sudo .venv/bin/python benchmarks/ft_lab.py --methods sync --repeats 1 --steps 60   # a quick look
    .venv/bin/python benchmarks/ft_lab.py --report-only              # rebuild the report from the raw JSON

Builds a 3-site link lab (``netlab.py``: one namespace per site, veth + bridge, ``tc tbf`` up and down at
``--rate``; the driver also gives every site's ``lab0`` an IPv4 address, 10.77.0.<site+1>/24, because
``eagerloco train --fault-tolerance HOST:PORT`` and ``--ft-host`` take a bare host that is used both in a URL and
as a TCPStore host: an IPv6 address cannot be both) and runs, per method and repeat:

* **fault_free**: 3 sites train ``--steps`` inner steps each;
* **fault**: the same, but site 2 (never the lighthouse host, site 0) is killed with SIGKILL (its process group)
  once its metrics show inner step ``--kill-step`` (default: a third of the run plus half an outer step, so the kill
  lands inside an inner phase), and restarted with the same command (a fresh run directory) ``--outage-s``
  seconds after the kill. It rejoins from a live peer's state and all sites finish at step ``--steps``.

Methods: ``sync`` and ``eager`` are ``eagerloco train --config sync|eager --fault-tolerance ...`` (every site
``--workers 3 --ft-shard <site>``, one torch thread, ``--collective-timeout-s 60``, no evaluation until the end),
the CLI's default recipe for that config except ``--steps`` and ``--sync-every``. ``torchft`` is torchft's own
``DiLoCo`` (one fragment, ``fragment_sync_delay=0``: the sync method) through ``torchft_worker.py`` with the same
model, data shards, optimizers and H (as ``torchft_compare.py``), ``min_replica_size=2`` and live recovery
(torchft's HTTP checkpoint transport: the peer's model, AdamW state and its fragments' global parameters and outer
optimizer). torchft has no eager mode. Each run has its own lighthouse in site 0's namespace, with the same
timeouts for both libraries (``--join-timeout-ms``, default 8000, ``--heartbeat-timeout-ms``, default 2000):
``python -m eagerloco.ft.lighthouse`` (with the coordination store) for eagerloco, ``torchft_lighthouse`` for
torchft. Not ``eagerloco train --ft-lighthouse``: it has the lighthouse's default 1 s join window, and at start-up
on a shaped link the sites begin their loops seconds apart (all but one load the first site's state over the
link), so the first sync point leaves a live site out ("fell behind") even without a failure.

Each site runs in a cgroup with a CPU quota (``--cpu-quota``, default 0.6 CPU): three sites on 2 cores would
otherwise share them, and the survivors would speed up when a site dies, which a site on its own machine does not.

What is derived (``derive``; from each site's per-step log and membership records, so that ``--report-only``
recomputes everything from the raw JSON):

* **phases** of the survivors (sites 0, 1), on their own inner-step clocks, aligned to sync points: with c the
  sync point of the first quorum without the killed site and j the first one with it again, *before* = steps
  (0, c - H], *outage* = (c - H, j - H] (the sync points from c, where the failure is detected, to the last one
  without the joiner), *rejoin* = (j - H, j] (the outer step whose quorum admits the joiner), *after* = (j, N].
  A window (x, y] lasts t(y) - t(x), t(s) being the time of the site's inner record of step s on its loop clock
  (t(0) = 0, the loop's start); its tokens are (y - x) x batch x sequence length. The survivors' tokens/s is the
  sum of both survivors' rates; the fault-free run's same sites over the same windows are the reference.
* **detection**: the survivors' quorum time at c (``quorum_s`` of the changed record: the lighthouse's join /
  heartbeat timeouts) and ``failed_wait_s`` (time inside collectives that failed).
* **recovery**: *start-up* = restart -> the joiner's metrics file appears (Python, torch, data, before contacting
  the lighthouse); ``catch_up_s`` (eagerloco's joiner counter: attach -> end of the outer step of its join sync
  point, taken with the others, including the wait until the others reach a sync point; torchft's worker: manager
  created -> its first committed sync); *back* = restart -> the joiner has taken an outer step with the others
  (eagerloco: its first ``membership`` record, written when ``attach`` returns; torchft: its first committed
  ``sync``, which comes after H local steps of its own from the initial model, where torchft's DiLoCo takes its
  first quorum and heals), polled by the driver every 50 ms; state transfer bytes; averages dropped on every site.
* **final eval loss** of site 0 (the lighthouse host, which trains all N steps in both runs) against the
  fault-free run: equal inner steps for the survivors (N each, the same batches of their shards); the killed site
  trains fewer (it misses the outage, and restarts its shard's stream from the beginning).

The background recipe sweep (``--pause-pattern``, default ``recipe_sweep.py``) is paused with SIGSTOP (the process
group of every matching process, this driver excluded) while the lab measures, and continued with SIGCONT at the
end, also on an error or a signal (``--pause-pattern ''`` pauses nothing).

Writes ``benchmarks/results/ft_lab/ft_lab.json`` (raw: per run and site the per-step times, membership and outer
records, summaries, each site's outer recipe, the kill/restart timestamps, the checkout's commit) and ``ft_lab.md``
(whose tables name each run's outer recipe).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl

from eagerloco import configs
from eagerloco.lm.config import RECIPE_FIELDS

NAME = "ft_lab"
WORKER = Path(__file__).resolve().with_name("torchft_worker.py")
METHODS = ("sync", "eager", "torchft")
LABELS = {"sync": "eagerloco sync (DiLoCo)", "eager": "eagerloco eager k=1", "torchft": "torchft DiLoCo"}
VARIANTS = ("fault_free", "fault")
SITES = 3
VICTIM = 2
SURVIVORS = (0, 1)
IPV4 = "10.77.0.{}"


# ------------------------------------------------------------------------------------------------ pausing the sweep
def _pgids(pattern: str) -> list[int]:
    """Process groups of the processes whose command line contains ``pattern`` (``pgrep -f``), not this one's."""
    if not pattern:
        return []
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    own = {os.getpid(), os.getpgid(0)}
    pgids = set()
    for tok in out:
        pid = int(tok)
        if pid in own:
            continue
        with contextlib.suppress(ProcessLookupError):
            pgid = os.getpgid(pid)
            if pgid not in own:
                pgids.add(pgid)
    return sorted(pgids)


class Pause:
    """SIGSTOP the process groups matching ``pattern`` on enter, SIGCONT them on exit (always)."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.pgids: list[int] = []

    def _signal(self, sig: int) -> None:
        for pgid in self.pgids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)

    def __enter__(self) -> Pause:
        self.pgids = _pgids(self.pattern)
        self._signal(signal.SIGSTOP)
        if self.pgids:
            print(f"paused process groups {self.pgids} ({self.pattern!r})", flush=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._signal(signal.SIGCONT)
        if self.pgids:
            print(f"continued process groups {self.pgids}", flush=True)


# ------------------------------------------------------------------------------------------------ derivation (pure)
def step_times(inner: Iterable[Sequence[float]]) -> dict[int, float]:
    """``{step: time_s}`` from ``[[step, time_s], ...]``, with t(0) = 0 (the loop's start)."""
    times = {0: 0.0}
    times.update({int(s): float(t) for s, t in inner})
    return times


def changes(membership: Sequence[Mapping[str, Any]]) -> tuple[int | None, int | None]:
    """(c, j): the inner step of the first quorum with fewer members than the one before, and of the first quorum
    after it with more members again (None where there is none)."""
    c = j = None
    prev = None
    for rec in membership:
        m = rec["members"]
        if prev is not None:
            if c is None and m < prev:
                c = int(rec["inner_step"])
            elif c is not None and j is None and m > prev:
                j = int(rec["inner_step"])
        prev = m
    return c, j


def phases(c: int, j: int, steps: int, h: int) -> dict[str, tuple[int, int]]:
    """The survivors' windows (x, y] in inner steps: before, outage, rejoin, after (see the module docstring)."""
    return {"before": (0, c - h), "outage": (c - h, j - h), "rejoin": (j - h, j), "after": (j, steps)}


def window_rate(times: Mapping[int, float], window: tuple[int, int], tokens_per_step: int) -> float | None:
    """Tokens/s of one site over the window (x, y]: (y - x) x tokens_per_step / (t(y) - t(x))."""
    x, y = window
    if y <= x or x not in times or y not in times or times[y] <= times[x]:
        return None
    return (y - x) * tokens_per_step / (times[y] - times[x])


def sum_rates(rates: Iterable[float | None]) -> float | None:
    vals = list(rates)
    return None if any(v is None for v in vals) else sum(vals)  # type: ignore[arg-type]


def derive(run: Mapping[str, Any], reference: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The measured numbers of one fault run (and, with ``reference``, the fault-free run of the same method and
    repeat, over the same windows). Both are raw run records as the driver stores them."""
    h, steps, tps = run["sync_every"], run["steps"], run["tokens_per_site_step"]
    sites = run["sites"]
    out: dict[str, Any] = {"method": run["method"], "repeat": run["repeat"],
                           "recipe": recipe_label(sites["0"].get("recipe"))}  # fmt: skip
    c, j = changes(sites["0"]["membership"])
    for s in SURVIVORS:  # every survivor must see the same changes (one quorum sequence)
        if changes(sites[str(s)]["membership"]) != (c, j):
            out["error"] = f"survivors disagree on the membership changes: {changes(sites[str(s)]['membership'])}"
    out.update(drop_step=c, rejoin_step=j)
    if c is None or j is None:
        out.setdefault("error", f"no drop/rejoin in the membership records (c={c}, j={j})")
        return out
    windows = phases(c, j, steps, h)
    out["windows"] = {k: list(v) for k, v in windows.items()}
    times = {s: step_times(sites[str(s)]["inner"]) for s in SURVIVORS}
    ref_times = {s: step_times(reference["sites"][str(s)]["inner"]) for s in SURVIVORS} if reference else None
    for name, win in windows.items():
        out[f"tps_{name}"] = sum_rates(window_rate(times[s], win, tps) for s in SURVIVORS)
        if ref_times is not None:
            out[f"ref_tps_{name}"] = sum_rates(window_rate(ref_times[s], win, tps) for s in SURVIVORS)
    for name in ("outage", "rejoin", "after"):  # within one run: robust to the machine's load drifting between runs
        for key in ("tps", "ref_tps"):
            a, b = out.get(f"{key}_{name}"), out.get(f"{key}_before")
            out[f"{key.replace('tps', 'ratio')}_{name}"] = a / b if a is not None and b else None
    members = [r["members"] for r in sites["0"]["membership"]]
    out["outer_steps_at_2"] = sum(1 for m in members if m == SITES - 1)
    change = [r for r in sites["0"]["membership"] if int(r["inner_step"]) == c and r["changed"]]
    out["detect_quorum_s"] = [
        next(r["quorum_s"] for r in sites[str(s)]["membership"] if int(r["inner_step"]) == c) for s in SURVIVORS
    ]
    out["detect_changed_record"] = bool(change)
    ft = {s: sites[str(s)].get("ft", {}) for s in sites}
    out["failed_wait_s"] = [ft[str(s)].get("failed_wait_s", 0.0) for s in SURVIVORS]
    out["change_quorum_s"] = [ft[str(s)].get("change_quorum_s", 0.0) for s in SURVIVORS]
    out["dropped"] = {s: ft[s].get("dropped_on_change", 0) + ft[s].get("dropped_by_vote", 0) for s in sites}
    joiner = sites.get(f"{VICTIM}r", {})
    k = run.get("kill", {})
    out["outage_s"] = k["t_restart"] - k["t_kill"] if "t_restart" in k else None
    out["killed_at_step"] = k.get("victim_step")
    out["startup_s"] = k["t_joiner_log"] - k["t_restart"] if "t_joiner_log" in k else None
    out["total_recovery_s"] = k["t_joiner_back"] - k["t_restart"] if "t_joiner_back" in k else None
    out["catch_up_s"] = joiner.get("ft", {}).get("catch_up_s")
    out["state_bytes"] = joiner.get("ft", {}).get("state_bytes_received")
    out["heals"] = joiner.get("ft", {}).get("heals")
    jinner = joiner.get("inner", [])
    out["joiner_first_step"] = int(jinner[0][0]) - 1 if jinner else None
    victim_steps = int(k.get("victim_step") or 0)
    out["victim_steps_trained"] = victim_steps + (len(jinner) if jinner else 0)
    out["eval_loss"] = sites["0"].get("eval_loss")
    out["eval_loss_sites"] = {s: sites[s].get("eval_loss") for s in sites}
    out["wall_s_survivors"] = [sites[str(s)].get("wall_s") for s in SURVIVORS]
    if reference is not None:
        out["ref_repeat"] = reference["repeat"]
        out["ref_eval_loss"] = reference["sites"]["0"].get("eval_loss")
        if out["eval_loss"] is not None and out["ref_eval_loss"] is not None:
            out["eval_loss_delta"] = out["eval_loss"] - out["ref_eval_loss"]
        out["ref_wall_s_survivors"] = [reference["sites"][str(s)].get("wall_s") for s in SURVIVORS]
    return out


def link_ratio(run: Mapping[str, Any]) -> dict[str, float]:
    """Inner step time (median of non-sync steps of site 0) and the sync step's extra time over it (median over the
    sync points of a fault-free run), and their ratio to the inner phase H x step."""
    times = step_times(run["sites"]["0"]["inner"])
    h = run["sync_every"]
    plain, sync = [], []
    for s in sorted(times):
        if s == 0 or s - 1 not in times:
            continue
        dt = times[s] - times[s - 1]
        (sync if s % h == 0 else plain).append(dt)
    step = bl.median(plain)
    extra = bl.median(sync) - step if sync else float("nan")
    return {"inner_step_s": step, "sync_extra_s": extra, "ratio": extra / (h * step) if step > 0 else float("nan")}


# ------------------------------------------------------------------------------------------------ lab helpers
def add_ipv4(lab: Any) -> None:
    for s in lab.site_ids:
        subprocess.run(["ip", "-n", lab.sites[s].netns, "addr", "add", f"{IPV4.format(s + 1)}/24", "dev", "lab0"],
                       check=True, capture_output=True)  # fmt: skip


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def last_step(path: Path) -> int:
    """The last inner step logged in an eagerloco metrics.jsonl or a torchft worker's steps log (0: none)."""
    if not path.exists():
        return 0
    with path.open("rb") as fh:
        try:
            fh.seek(-4096, os.SEEK_END)
        except OSError:
            fh.seek(0)
        lines = fh.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            if rec.get("type") == "inner":
                return int(rec["step"])
    return 0


def kill_group(proc: subprocess.Popen[Any]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------------ one run
class CpuQuota:
    """One cgroup (v1 ``cpu`` controller) per site with a CFS quota of ``cores`` CPUs: on a 2-core machine three
    sites otherwise share the cores, and the survivors would speed up when a site dies (less contention), which is
    not what a site on its own machine sees. ``cores`` <= 0: no cgroups."""

    ROOT = Path("/sys/fs/cgroup/cpu")

    def __init__(self, cores: float) -> None:
        self.cores = cores
        self.groups: list[Path] = []

    def __enter__(self) -> CpuQuota:
        if self.cores > 0:
            if not (self.ROOT / "cgroup.procs").exists():
                raise RuntimeError(f"--cpu-quota needs the cgroup v1 cpu controller at {self.ROOT}")
            for site in range(SITES):
                group = self.ROOT / f"ftlab-{os.getpid()}-s{site}"
                group.mkdir(exist_ok=True)
                (group / "cpu.cfs_period_us").write_text("100000")
                (group / "cpu.cfs_quota_us").write_text(str(round(self.cores * 100000)))
                self.groups.append(group)
        return self

    def add(self, site: int, pid: int) -> None:
        if self.groups:
            with contextlib.suppress(ProcessLookupError, OSError):
                (self.groups[site] / "cgroup.procs").write_text(str(pid))

    def __exit__(self, *exc: object) -> None:
        for group in self.groups:
            for _ in range(50):  # a cgroup can be removed once its processes have ended
                try:
                    group.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


QUOTA = CpuQuota(0)


def site_argv(method: str, args: argparse.Namespace, site: int, port: int, out_dir: Path, rejoin: bool) -> list[str]:
    common = ["--steps", str(args.steps), "--sync-every", str(args.sync_every), "--seed", str(args.seed),
              "--threads", "1", "--eval-every", "0"]  # fmt: skip
    if method == "torchft":
        addr = IPV4.format(site + 1)
        return [
            bl.python(), str(WORKER), "--config", str(configs.path("sync")), *common,
            "--replica", str(site), "--replicas", str(SITES),
            "--min-replicas", str(SITES - 1), "--lighthouse", f"http://{IPV4.format(1)}:{port}",
            "--store-addr", addr, "--barrier-addr", IPV4.format(1), "--barrier-port", str(port + 1),
            "--result", str(out_dir / "result.json"), "--steps-log", str(out_dir / "metrics.jsonl"),
            "--timeout-s", "60", *(["--rejoin"] if rejoin else []),
        ]  # fmt: skip
    return [
        bl.python(), "-m", "eagerloco.train", "--config", method, *common, "--workers", str(SITES),
        "--no-progress", "--collective-timeout-s", "60", "--fault-tolerance", f"{IPV4.format(1)}:{port}",
        "--ft-replica-id", f"site{site}", "--ft-host", IPV4.format(site + 1), "--ft-shard", str(site),
        "--out-dir", str(out_dir),
    ]  # fmt: skip


def start_lighthouse(lab: Any, method: str, args: argparse.Namespace, port: int, out_dir: Path) -> Any:
    """The run's lighthouse in site 0's namespace, the same timeouts for both libraries: eagerloco's (with its
    coordination store on port + 1) or torchft's own ``torchft_lighthouse``. Returns once it listens."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "lighthouse.log"
    common = dict(min_replicas=SITES - 1, join=args.join_timeout_ms, heartbeat=args.heartbeat_timeout_ms)
    if method == "torchft":
        from torchft_compare import lighthouse_binary

        argv = [lighthouse_binary(), "--bind", f"[::]:{port}", "--min_replicas", str(common["min_replicas"]),
                "--join_timeout_ms", str(common["join"]), "--heartbeat_timeout_ms", str(common["heartbeat"]),
                "--quorum_tick_ms", "10"]  # fmt: skip
    else:
        argv = [bl.python(), "-m", "eagerloco.ft.lighthouse", "--host", IPV4.format(1), "--port", str(port),
                "--store-port", str(port + 1), "--min-replicas", str(common["min_replicas"]),
                "--join-timeout-ms", str(common["join"]),
                "--heartbeat-timeout-ms", str(common["heartbeat"])]  # fmt: skip
    proc = lab.popen(0, argv, stdout=log_path.open("w"), stderr=subprocess.STDOUT, cwd=bl.ROOT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        ss = subprocess.run(["ip", "netns", "exec", lab.sites[0].netns, "ss", "-ltnH"], capture_output=True,
                            text=True).stdout  # fmt: skip
        if f":{port} " in ss and (method == "torchft" or f":{port + 1} " in ss):
            return proc
        time.sleep(0.1)
    raise RuntimeError(f"the {method} lighthouse did not come up:\n{log_path.read_text()[-2000:]}")


def start_site(lab: Any, method: str, args: argparse.Namespace, site: int, port: int, out_dir: Path,
               rejoin: bool = False) -> subprocess.Popen[Any]:  # fmt: skip
    bl.fresh_run_dir(out_dir)
    out_dir.mkdir(parents=True)
    log = (out_dir / "stdout.log").open("w")
    env = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = lab.popen(site, site_argv(method, args, site, port, out_dir, rejoin), env=env, stdout=log,
                     stderr=subprocess.STDOUT, cwd=bl.ROOT)  # fmt: skip
    QUOTA.add(site, proc.pid)  # `ip netns exec` execs the trainer: the same pid
    return proc


def recipe_label(recipe: Mapping[str, Any] | None) -> str:
    """'lr 0.7, Nesterov 0.5, w 0.875, β 0.5' for a site's recipe; 'n/a' where the run did not record one (before this
    column existed: its commit then tells)."""
    if not recipe:
        return "n/a"
    m = recipe["outer_momentum"]
    parts = [f"lr {recipe['outer_lr']:g}",
             "no momentum" if m == 0 else f"{'Nesterov' if recipe['nesterov'] else 'momentum'} {m:g}"]  # fmt: skip
    if recipe.get("eager_own_weight") is not None:
        parts.append(f"w {recipe['eager_own_weight']:g}")
    if recipe.get("eager_smoothing"):  # eager's smoothing (ALGORITHMS.md 4.4); absent before it existed
        parts.append(f"β {recipe['eager_smoothing']:g}")
    return ", ".join(parts)


def collect_site(method: str, out_dir: Path) -> dict[str, Any]:
    """The raw record of one site's life: per-step times, membership and outer records, its summary's numbers,
    its outer recipe."""
    recs = read_jsonl(out_dir / "metrics.jsonl")
    site: dict[str, Any] = {
        "inner": [[r["step"], round(r["time_s"], 4)] for r in recs if r.get("type") == "inner"],
        "membership": [
            {k: v for k, v in r.items() if k not in ("type", "worker")} for r in recs if r.get("type") == "membership"
        ],
    }
    if method == "torchft":
        res = out_dir / "result.json"
        if res.exists():
            rep = json.loads(res.read_text())
            site.update(eval_loss=rep["eval_loss"], wall_s=rep["wall_s"], final_train_loss=rep["final_train_loss"],
                        ft={"heals": rep.get("heals"), "state_bytes_received": rep.get("state_bytes_received"),
                            "catch_up_s": rep.get("catch_up_s"), "failed_commits": rep.get("failed_commits")},
                        syncs=rep.get("syncs"), params=rep["params"], final_params_hash=rep["final_params_hash"],
                        inner_step_time_s=rep["inner_step_time_s"], recipe=rep.get("outer_recipe"))  # fmt: skip
        return site
    config = out_dir / "config.json"
    if config.exists():
        outer = json.loads(config.read_text())["outer"]
        site["recipe"] = {k: outer.get(k) for k in sorted(RECIPE_FIELDS)}  # as the run resolved it
    site["outer"] = [{k: r[k] for k in ("inner_step", "blocked_s", "dropped") if k in r}
                     for r in recs if r.get("type") == "outer"]  # fmt: skip
    path = out_dir / "summary.json"
    if path.exists():
        s = json.loads(path.read_text())
        w = s["per_worker"][0]
        ft = {k: v for k, v in w.get("fault_tolerance", {}).items() if not isinstance(v, list)}
        site.update(
            eval_loss=s["eval_loss"],
            wall_s=s["wall_s"],
            final_train_loss=w["final_train_loss"],
            ft=ft,
            params=s["params"],
            inner_step_time_s=s["inner_step_time_s"],
            blocked_s=w["blocked_s"],
        )
    return site


def run_one(lab: Any, method: str, variant: str, rep: int, args: argparse.Namespace, port: int) -> dict[str, Any]:
    base = args.runs_dir / f"{method}-{variant}-r{rep}"
    dirs = {str(s): base / f"site{s}" for s in lab.site_ids}
    dirs[f"{VICTIM}r"] = base / f"site{VICTIM}-restart"
    bl.fresh_run_dir(dirs[f"{VICTIM}r"])
    before = [lab.counters(s) for s in lab.site_ids]
    t0 = time.time()
    lighthouse = start_lighthouse(lab, method, args, port, base)
    procs = {str(s): start_site(lab, method, args, s, port, dirs[str(s)]) for s in lab.site_ids}
    kill: dict[str, Any] = {}
    deadline = time.monotonic() + args.timeout
    victim_log = dirs[str(VICTIM)] / "metrics.jsonl"
    joiner_log = dirs[f"{VICTIM}r"] / "metrics.jsonl"
    try:
        while any(p.poll() is None for p in procs.values()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{method} {variant}: not finished after {args.timeout:.0f} s")
            now = time.time()
            if variant == "fault":
                if "t_kill" not in kill and last_step(victim_log) >= args.kill_step:
                    kill_group(procs[str(VICTIM)])
                    kill["t_kill"] = time.time()
                    procs[str(VICTIM)].wait()
                    kill["victim_step"] = last_step(victim_log)
                    print(f"  killed site {VICTIM} at its step {kill['victim_step']}", flush=True)
                elif "t_kill" in kill and "t_restart" not in kill and now - kill["t_kill"] >= args.outage_s:
                    kill["t_restart"] = time.time()
                    procs[f"{VICTIM}r"] = start_site(lab, method, args, VICTIM, port, dirs[f"{VICTIM}r"], True)
                    print(f"  restarted site {VICTIM} after {kill['t_restart'] - kill['t_kill']:.1f} s", flush=True)
                elif "t_restart" in kill:
                    if "t_joiner_log" not in kill and joiner_log.exists():
                        kill["t_joiner_log"] = now
                    if "t_joiner_back" not in kill and joiner_back(method, joiner_log):
                        kill["t_joiner_back"] = now
            time.sleep(0.05)
    finally:
        for p in procs.values():
            if p.poll() is None:
                kill_group(p)
                p.wait()
        lighthouse.terminate()
        try:
            lighthouse.wait(timeout=10)
        except subprocess.TimeoutExpired:
            kill_group(lighthouse)
            lighthouse.wait()
    wall = time.time() - t0
    failed = {k: p.returncode for k, p in procs.items() if p.returncode not in (0, -9) and k != str(VICTIM)}
    error = None
    if failed:  # kept with its records (what happened is in the membership logs), reported as failed
        error = f"exit codes {failed}: " + "; ".join(f"site {k}: {last_error(dirs[k] / 'stdout.log')}" for k in failed)
        print(f"  failed: {error}", flush=True)
    deltas = [lab.counters(s) - b for s, b in zip(lab.site_ids, before)]
    sites = {k: collect_site(method, d) for k, d in dirs.items() if k in procs}
    return {
        "method": method,
        "variant": variant,
        "repeat": rep,
        "steps": args.steps,
        "sync_every": args.sync_every,
        "rate_mbit": args.rate,
        "tokens_per_site_step": args.batch_size * args.seq_len,
        "kill_step": args.kill_step if variant == "fault" else None,
        "kill": kill,
        "sites": sites,
        "ns_tx_bytes": [d.tx_bytes for d in deltas],
        "ns_rx_bytes": [d.rx_bytes for d in deltas],
        "driver_wall_s": wall,
        "commit": bl_commit(),
        "join_timeout_ms": args.join_timeout_ms,
        "heartbeat_timeout_ms": args.heartbeat_timeout_ms,
        "cpu_quota": args.cpu_quota,
        "error": error,
    }


def last_error(log: Path) -> str:
    """The last line of a site's output that names an exception (or its last line)."""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip() and "frame #" not in ln]
    errs = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errs or lines or [""])[-1].strip()[:300]


def joiner_back(method: str, path: Path) -> bool:
    """The joiner has completed an outer step with the others: eagerloco's first ``membership`` record (written once
    ``attach`` returns: the join quorum, the peer's state loaded, the outer step of that sync point taken with the
    others), or torchft's first committed ``sync`` (its first quorum comes after H local steps of its own; it heals
    there and commits that sync with the others)."""
    recs = read_jsonl(path)
    if method != "torchft":
        return any(r.get("type") == "membership" for r in recs)
    return any(r.get("type") == "sync" and r.get("committed") for r in recs)


def bl_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=bl.ROOT,
                              timeout=30).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return ""


# ------------------------------------------------------------------------------------------------ report
def _f(v: Any, fmt: str, unit: str = "") -> str:
    return "n/a" if v is None else f"{format(v, fmt)}{unit}"


def table(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    runs = payload["runs"]
    rows = []
    for r in runs:
        if r["variant"] != "fault":
            continue
        refs = [x for x in runs if x["variant"] == "fault_free" and x["method"] == r["method"] and not x.get("error")]
        # the fault-free run of the same repeat, else the one of the nearest repeat
        ref = min(refs, key=lambda x: abs(x["repeat"] - r["repeat"]), default=None)
        rows.append(derive(r, ref))
    return rows


def report(payload: dict[str, Any]) -> str:
    rows = table(payload)
    payload["derived"] = rows
    free = [r for r in payload["runs"] if r["variant"] == "fault_free"]
    steps, h = payload["steps"], payload["sync_every"]
    lines = [
        f"A site killed and restarted: 3 sites in 3 network namespaces, gloo over a tbf-shaped link of "
        f"{payload['rate_mbit']:g} Mbit/s up and down per site, {steps} inner steps per site, H = {h}, "
        f"1 torch thread per site; site {VICTIM} killed (SIGKILL) at its inner step {payload['kill_step']} and "
        f"restarted {payload['outage_s']:g} s later. Repeats: {payload['repeats']}.",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"Machine: {bl.machine_line(payload['machine'])}",
        "",
        f"Commits: {', '.join(sorted({r['commit'][:10] for r in payload['runs']}))}",
        "",
    ]
    if free:
        free_header = ["method", "outer recipe", "rep", "inner step s", "sync extra s", "ratio to inner phase",
                       "wall s", "eval loss"]  # fmt: skip
        lr = [[LABELS[r["method"]], recipe_label(r["sites"]["0"].get("recipe")), r["repeat"],
               _f(link_ratio(r)["inner_step_s"], ".3f"),
               _f(link_ratio(r)["sync_extra_s"], ".2f"), _f(link_ratio(r)["ratio"], ".2f"),
               _f(r["sites"]["0"].get("wall_s"), ".1f"), _f(r["sites"]["0"].get("eval_loss"), ".4f")]
              for r in free]  # fmt: skip
        lines += [
            "Fault-free runs (site 0): inner step = median time of a step without a sync point; sync extra = median "
            "extra time of a step with one (quorum, all-reduce wait and outer step); ratio = sync extra / (H x step).",
            "",
            bl.md_table(free_header, lr),
            "",
        ]
    hdr = ["method", "outer recipe", "rep", "drop / rejoin step", "outer steps at M=2", "tok/s before (ref)",
           "tok/s outage (ref)", "tok/s rejoin step (ref)", "tok/s after (ref)", "outage / before (ref)",
           "after / before (ref)", "detect: quorum s",
           "failed wait s", "start-up s", "catch-up s", "restart to back s", "state MB", "dropped (0/1/2 -> 2r)",
           "eval loss site 0", "fault-free", "delta"]  # fmt: skip
    trs = []
    for d in rows:
        if "error" in d and "windows" not in d:
            trs.append([LABELS[d["method"]], d["recipe"], d["repeat"], d["error"], *[""] * (len(hdr) - 4)])
            continue

        def tp(name: str, d: Mapping[str, Any] = d) -> str:
            return f"{_f(d.get(f'tps_{name}'), ',.0f')} ({_f(d.get(f'ref_tps_{name}'), ',.0f')})"

        dropped = d["dropped"]
        trs.append([
            LABELS[d["method"]], d["recipe"], d["repeat"], f"{d['drop_step']} / {d['rejoin_step']}",
            d["outer_steps_at_2"],
            tp("before"), tp("outage"), tp("rejoin"), tp("after"),
            f"{_f(d.get('ratio_outage'), '.2f')} ({_f(d.get('ref_ratio_outage'), '.2f')})",
            f"{_f(d.get('ratio_after'), '.2f')} ({_f(d.get('ref_ratio_after'), '.2f')})",
            "/".join(f"{x:.2f}" for x in d["detect_quorum_s"]), "/".join(f"{x:.2f}" for x in d["failed_wait_s"]),
            _f(d["startup_s"], ".1f"), _f(d["catch_up_s"], ".1f"), _f(d["total_recovery_s"], ".1f"),
            _f(d["state_bytes"] / 1e6 if d["state_bytes"] else None, ".2f"),
            "/".join(str(dropped.get(k)) for k in ("0", "1", "2", "2r")),
            _f(d["eval_loss"], ".4f"), _f(d.get("ref_eval_loss"), ".4f"), _f(d.get("eval_loss_delta"), "+.4f"),
        ])  # fmt: skip
    lines += [
        "Fault runs: the survivors' (sites 0 + 1) tokens/s per phase, in brackets the same sites over the same "
        "inner-step windows in the fault-free run; detection, recovery and the final eval loss of site 0.",
        "",
        bl.md_table(hdr, trs),
    ]
    errs = [d for d in rows if "error" in d]
    if errs:
        lines += ["", *[f"- {LABELS[d['method']]} rep {d['repeat']}: {d['error']}" for d in errs]]
    lines += ["", "Members of every quorum, per site (the killed site's second life as 2r), and the lighthouse's join "
              "window of each fault run:", ""]  # fmt: skip
    for r in payload["runs"]:
        if r["variant"] != "fault":
            continue
        seqs = ", ".join(f"{k}: {''.join(str(m['members']) for m in site['membership'])}"
                         for k, site in r["sites"].items() if site["membership"])  # fmt: skip
        note = f"; FAILED: {r['error']}" if r.get("error") else ""
        lines.append(f"- {LABELS[r['method']]} rep {r['repeat']} (join window {r.get('join_timeout_ms', '?')} ms): "
                     f"{seqs}{note}")  # fmt: skip
    fails = payload.get("failures", [])
    if fails:
        lines += ["", f"Failed runs: {len(fails)}"]
        lines += [f"- {f['method']} {f['variant']} rep {f['repeat']}: {f['error'].strip().splitlines()[0][:300]}"
                  for f in fails]  # fmt: skip
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--rate", type=float, default=20.0, help="Mbit/s per site, up and down (default 20)")
    ap.add_argument("--steps", type=int, default=450, help="inner steps per site (default 450)")
    ap.add_argument("--sync-every", type=int, default=30, help="H (default 30, the configs': 15 outer steps)")
    ap.add_argument("--kill-step", type=int, default=None, help="kill site 2 at this inner step (default N/3 + H/2)")
    ap.add_argument("--outage-s", type=float, default=30.0, help="seconds from the kill to the restart")
    ap.add_argument(
        "--join-timeout-ms",
        type=int,
        default=8000,
        help="the lighthouse's join window (default 8000: above the sites' start-up skew on the link)",
    )
    ap.add_argument("--heartbeat-timeout-ms", type=int, default=2000, help="the lighthouse's (default 2000)")
    ap.add_argument(
        "--cpu-quota",
        type=float,
        default=0.6,
        help="CPUs per site (a cgroup CFS quota; default 0.6: 3 sites fit in 2 cores; 0: none)",
    )
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--first-repeat", type=int, default=0, help="index of the first repeat (with --append: more)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=480.0, help="seconds a run may take before it is killed")
    ap.add_argument("--port", type=int, default=29510)
    ap.add_argument("--out", type=Path, default=bl.RESULTS / NAME, help="where ft_lab.json / .md go")
    ap.add_argument("--runs-dir", type=Path, default=bl.ROOT / "runs" / NAME)
    ap.add_argument("--append", action="store_true", help="add the runs to an existing ft_lab.json")
    ap.add_argument("--pause-pattern", default="recipe_sweep.py",
                    help="SIGSTOP the process groups of processes matching this (pgrep -f) while measuring, SIGCONT "
                         "after (default recipe_sweep.py; '' pauses nothing)")  # fmt: skip
    ap.add_argument("--report-only", action="store_true", help="rebuild ft_lab.md from ft_lab.json; run nothing")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    jpath = args.out / f"{NAME}.json"
    if args.report_only:
        payload = json.loads(jpath.read_text())
        bl.write_results(NAME, args.out, payload, report(payload))
        print((args.out / f"{NAME}.md").read_text())
        return 0
    if args.kill_step is None:
        args.kill_step = args.steps // 3 + args.sync_every // 2
    from eagerloco.lm.config import TrainConfig

    defaults = TrainConfig()
    args.batch_size, args.seq_len = defaults.data.batch_size, defaults.model.seq_len
    if "torchft" in args.methods:
        from torchft_compare import torchft_status

        ok, why = torchft_status()
        if not ok:
            print(f"ft_lab: {why}", file=sys.stderr)
            return 2
    nl = bl.netlab()
    ok, why = nl.netns_available()
    if not ok:
        print(f"ft_lab: cannot build a link lab here: {why}", file=sys.stderr)
        return 2
    payload: dict[str, Any] = json.loads(jpath.read_text()) if args.append and jpath.exists() else {
        "benchmark": NAME, "command": bl.command_line(), "machine": bl.machine(), "rate_mbit": args.rate,
        "steps": args.steps, "sync_every": args.sync_every, "kill_step": args.kill_step, "outage_s": args.outage_s,
        "cpu_quota": args.cpu_quota, "join_timeout_ms": args.join_timeout_ms,
        "heartbeat_timeout_ms": args.heartbeat_timeout_ms,
        "repeats": args.repeats, "seed": args.seed, "runs": [], "failures": [],
    }  # fmt: skip
    if args.append:
        payload.setdefault("commands", []).append(bl.command_line())
        payload["repeats"] = max(payload["repeats"], args.first_repeat + args.repeats)
    counter = 0
    global QUOTA
    QUOTA = CpuQuota(args.cpu_quota)
    with Pause(args.pause_pattern), QUOTA, nl.Lab(num_sites=SITES, rate_mbit=args.rate) as lab:
        add_ipv4(lab)
        print(f"lab {lab.prefix} up: {SITES} sites at {args.rate:g} Mbit/s", flush=True)
        for rep in range(args.first_repeat, args.first_repeat + args.repeats):
            for method in bl.rotate(args.methods, rep):
                for variant in args.variants:
                    port = args.port + 10 * (counter % 40)
                    counter += 1
                    print(f"rep {rep} {method} {variant} ...", flush=True)
                    try:
                        rec = run_one(lab, method, variant, rep, args, port)
                    except RuntimeError as exc:
                        print(f"  failed: {str(exc)[-3000:]}", flush=True)
                        payload["failures"].append({"method": method, "variant": variant, "repeat": rep,
                                                    "error": str(exc)[-4000:]})  # fmt: skip
                        bl.write_results(NAME, args.out, payload, report(payload))
                        continue
                    payload["runs"].append(rec)
                    s0 = rec["sites"]["0"]
                    print(f"  done in {rec['driver_wall_s']:.0f} s: site 0 wall {s0.get('wall_s', 0):.1f} s, "
                          f"eval {s0.get('eval_loss', float('nan')):.4f}", flush=True)  # fmt: skip
                    bl.write_results(NAME, args.out, payload, report(payload))
    bl.write_results(NAME, args.out, payload, report(payload))
    print((args.out / f"{NAME}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
