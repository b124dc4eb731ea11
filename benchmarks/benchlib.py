"""Helpers shared by the benchmark drivers: run ``eagerloco train``, read its outputs, describe the machine.

Standard library only (the drivers import torch only where they train themselves). Every driver:

* runs its variants *interleaved* (repeat loop outermost, the order of variants rotated every repeat) so that
  machine noise -- the project machine has 2 cores shared with other people's test runs -- hits every variant
  alike, and reports medians;
* writes ``<name>.json`` (raw results, the machine, the command, the date) and ``<name>.md`` (the tables) under
  ``benchmarks/results/`` (``--out``);
* has a ``--smoke`` flag: a seconds-long version (tiny model, a few steps) that the CI test runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _streaming(tau: int) -> list[str]:
    """Streaming DiLoCo's flags: P = 2 fragments, each average mixed in τ inner steps after its launch, α = 0.5."""
    return ["--mode", "overlap", "--num-fragments", "2", "--overlap-steps", str(tau), "--alpha", "0.5"]


# The methods of issue 6, as `eagerloco train` flags (the model, optimizers and H are the CLI's defaults of the
# checkout that trains: 820k-parameter GPT, AdamW lr 3e-3, H = 30, each mode's outer recipe; outer SGD lr 0.7 /
# Nesterov 0.9 for every mode before the recipe study, BENCHMARKS.md 8).
METHODS: dict[str, list[str]] = {
    "dp": ["--mode", "dp"],
    "dp_1mb": ["--mode", "dp", "--ddp-bucket-mb", "1"],  # DDP with 1 MB buckets: overlap within the backward pass
    "sync": ["--mode", "sync"],
    "streaming": _streaming(1),
    # streaming's overlap sized to the link (BENCHMARKS.md 8): τ = 14 hides r = all-reduce / inner phase <= 2τ/H = 0.93
    # in fp32 at H = 30; τ = 3 with 4-bit outer gradients (7.5x fewer bytes) hides r <= 0.2, about 4 Mbit/s
    "streaming_t14": _streaming(14),
    "streaming_t3_fp4": [*_streaming(3), "--compression", "fp4", "--error-feedback"],
    # ... and τ = 7 with 4-bit outer gradients hides r <= 0.47, about 2 Mbit/s (where τ = 3 blocks)
    "streaming_t7_fp4": [*_streaming(7), "--compression", "fp4", "--error-feedback"],
    # DiLoCo with 4-bit outer gradients: blocking, on 7.5x fewer bytes (the compressed baseline eager fp4 must beat)
    "sync_fp4": ["--mode", "sync", "--compression", "fp4", "--error-feedback"],
    "delayed": ["--mode", "delayed", "--delay", "1"],
    "eager": ["--mode", "eager", "--delay", "1"],
    "eager2": ["--mode", "eager", "--delay", "2"],
    "eager_fp4": ["--mode", "eager", "--delay", "1", "--compression", "fp4", "--error-feedback"],
    # the codecs of issue 5, all in eager k=1 (codec_loss.py)
    "eager_bf16": ["--mode", "eager", "--delay", "1", "--compression", "bf16"],
    "eager_fp16": ["--mode", "eager", "--delay", "1", "--compression", "fp16"],
    "eager_fp8": ["--mode", "eager", "--delay", "1", "--compression", "fp8"],
    "eager_int8": ["--mode", "eager", "--delay", "1", "--compression", "int8"],
    "eager_fp4_noef": ["--mode", "eager", "--delay", "1", "--compression", "fp4"],
}
LABELS: dict[str, str] = {
    "dp": "data-parallel (DDP)",
    "dp_1mb": "data-parallel (DDP, 1 MB buckets)",
    "sync": "DiLoCo (sync)",
    "sync_fp4": "DiLoCo (sync), fp4 + EF",
    "streaming": "streaming, P=2, τ=1, α=0.5",
    "streaming_t14": "streaming, P=2, τ=14, α=0.5",
    "streaming_t3_fp4": "streaming, P=2, τ=3, α=0.5, fp4 + EF",
    "streaming_t7_fp4": "streaming, P=2, τ=7, α=0.5, fp4 + EF",
    "delayed": "delayed k=1 (naive)",
    "eager": "eager k=1",
    "eager2": "eager k=2",
    "eager_fp4": "eager k=1, fp4 + EF",
    "eager_bf16": "eager k=1, bf16",
    "eager_fp16": "eager k=1, fp16",
    "eager_fp8": "eager k=1, fp8 e4m3",
    "eager_int8": "eager k=1, int8",
    "eager_fp4_noef": "eager k=1, fp4 (no EF)",
}

# A seconds-long model for --smoke (configs/smoke.toml's model and batch).
SMOKE_ARGS: list[str] = [
    "--n-layer", "2", "--n-head", "2", "--d-model", "32", "--seq-len", "32",
    "--batch-size", "4", "--eval-batch-size", "4", "--eval-batches", "2", "--warmup-steps", "2",
]  # fmt: skip


CLI_SYNC_EVERY = 30  # the CLI's H (`eagerloco train` default): a run that passes no --sync-every runs at it


def sync_every_of(args: Sequence[str]) -> int:
    """The H a run with these extra ``eagerloco train`` flags trains at: the last ``--sync-every N`` or
    ``--sync-every=N`` among them (argparse's reading, as the CLI's), else the CLI's."""
    ap = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    ap.add_argument("--sync-every", type=int, default=CLI_SYNC_EVERY)
    return ap.parse_known_args(list(args))[0].sync_every


def is_eager(method: str) -> bool:
    """Whether ``METHODS[method]`` trains mode eager (the methods an own weight applies to); unknown names: no."""
    args = METHODS.get(method, [])
    return "--mode" in args and args[args.index("--mode") + 1] == "eager"


def python() -> str:
    """The interpreter running the driver (the project's .venv when started as ``.venv/bin/python``)."""
    return sys.executable


def train_argv(args: Sequence[str]) -> list[str]:
    """``python -m eagerloco.train ARGS`` with this interpreter."""
    return [python(), "-m", "eagerloco.train", *args]


def run_train(
    args: Sequence[str], out_dir: Path, *, timeout: float = 3600.0, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Run ``eagerloco train ARGS --out-dir OUT --no-progress`` to completion; return its summary.json (plus
    ``driver_wall_s``, the whole command's wall time). Raises RuntimeError with the output tail on failure."""
    out_dir = fresh_run_dir(out_dir)
    argv = train_argv([*args, "--out-dir", str(out_dir), "--no-progress"])
    start = time.perf_counter()
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=dict(env) if env is not None else None, cwd=ROOT
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    summary = read_summary(out_dir)
    summary["driver_wall_s"] = time.perf_counter() - start
    return summary


def fresh_run_dir(out_dir: Path) -> Path:
    """``out_dir``, emptied: a benchmark point that runs again (a repeat, a retry, a second invocation) replaces its
    scratch run directory, which ``eagerloco train`` would refuse to write over. Removing it rather than passing
    ``--overwrite`` keeps the drivers working with checkouts from before that flag (``recipe_sweep.py --src``)."""
    out_dir = Path(out_dir)
    if out_dir.is_dir():
        shutil.rmtree(out_dir)
    return out_dir


def read_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def steady_state(summary: Mapping[str, Any]) -> dict[str, float]:
    """CU and wall time without the final drain (``finalize``), averaged (CU) or maxed (wall) over workers.

    A run of a few outer steps ends with ``finalize()`` waiting for the collectives still in flight: for eager
    and delayed that is one whole all-reduce, paid once per run however long it is. The steady-state CU is
    inner / (wall - finalize_blocked), what a long run approaches (and what the simulator predicts): the engine's
    own ``steady_utilization`` (ALGORITHMS.md section 10), recomputed here only for summaries written before it.
    """
    cus, walls = [], []
    for w in summary["per_worker"]:
        wall = w.get("steady_wall_s", w["wall_s"] - w.get("finalize_blocked_s", 0.0))
        steady = w.get("steady_utilization")
        cus.append(steady if steady is not None else (w["inner_s"] / wall if wall > 0 else 1.0))
        walls.append(wall)
    return {"cu_steady": sum(cus) / len(cus), "wall_steady_s": max(walls)}


def rotate(items: Sequence[Any], k: int) -> list[Any]:
    """``items`` rotated left by k (the order of variants in repeat k)."""
    items = list(items)
    if not items:
        return items
    k %= len(items)
    return items[k:] + items[:k]


def lab_schedule(variants: Sequence[str], rates: Sequence[float], repeats: int) -> list[tuple[int, float, str]]:
    """A link-lab driver's run order: repeat loop outermost, rates alternately up and down, variants rotated per
    (repeat, rate)."""
    order = []
    for rep in range(repeats):
        rs = list(rates) if rep % 2 == 0 else list(reversed(rates))
        for ri, rate in enumerate(rs):
            for v in rotate(variants, rep + ri):
                order.append((rep, rate, v))
    return order


def add_lab_arguments(ap: Any, *, name: str, rates: Sequence[float], port: int, smoke: str) -> None:
    """The options every link-lab driver takes (its variants or methods it adds itself)."""
    ap.add_argument("--rates", nargs="+", type=float, default=list(rates), help="Mbit/s")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--sync-every", type=int, default=CLI_SYNC_EVERY)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--name", default=name)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "benchmarks")
    ap.add_argument("--port", type=int, default=port)
    ap.add_argument("--smoke", action="store_true", help=smoke)


def lab_payload(benchmark: str, args: Any, **fields: Any) -> dict[str, Any] | None:
    """A link-lab driver's results record (command, machine, schedule, ``fields``), or None after saying on
    stderr why no lab can be built here (the driver then exits with status 2)."""
    ok, why = netlab().netns_available()
    if not ok:
        print(f"{benchmark}: cannot build a link lab here: {why}", file=sys.stderr)
        return None
    return {
        "benchmark": benchmark, "command": command_line(), "machine": machine(), **fields,
        "rates_mbit": args.rates, "steps": args.steps, "sync_every": args.sync_every, "repeats": args.repeats,
        "runs": [], "failures": [],
    }  # fmt: skip


class LabAttempt:
    """One try of a link-lab job (see :func:`lab_attempts`): ``with attempt:`` around the job; a RuntimeError
    (a failed torchrun) is printed, recorded in the payload's failures and swallowed, anything else propagates."""

    def __init__(self, number: int, failures: list[dict[str, Any]], label: str, fields: Mapping[str, Any]):
        self.number = number
        """1 for the first try, 2 for the retry."""
        self.ok = False
        self._failures, self._label, self._fields = failures, label, fields

    def __enter__(self) -> LabAttempt:
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if kind is None:
            self.ok = True
            return False
        if not issubclass(kind, RuntimeError):
            return False
        print(f"{self._label}: attempt {self.number} failed:\n{exc}", flush=True)
        self._failures.append({**self._fields, "attempt": self.number, "error": str(exc)[-3000:]})
        return True


def lab_attempts(payload: dict[str, Any], label: str, tries: int = 2, **fields: Any) -> Iterator[LabAttempt]:
    """A link-lab job tried up to ``tries`` times (a failed job is reported, retried once, then recorded as
    failed): ``for attempt in lab_attempts(payload, "rep 0 4 Mbit/s sync", method=..., rate_mbit=..., repeat=...):
    with attempt: summary = run(...)``. Each failure lands in ``payload["failures"]`` with ``fields``; the loop
    ends at the first attempt that raises nothing."""
    for number in range(1, tries + 1):
        attempt = LabAttempt(number, payload["failures"], label, fields)
        yield attempt
        if attempt.ok:
            return


def failure_lines(payload: Mapping[str, Any], what: str) -> list[str]:
    """The report's lines on failed attempts (none if every job ran first time); ``what`` is the key that names
    the job's variant or method."""
    failures = payload.get("failures", [])
    if not failures:
        return []
    return ["", f"Failed attempts (each job retried once; the tables hold the successful ones): {len(failures)}"] + [
        f"- rep {f['repeat']}, {f['rate_mbit']:g} Mbit/s, {f[what]}, attempt {f['attempt']}: "
        f"{f['error'].strip().splitlines()[-1][:200]}"
        for f in failures
    ]


def median(values: Iterable[float]) -> float:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else float("nan")


def aggregate(
    runs: Sequence[Mapping[str, Any]],
    by: str,
    order: Sequence[str],
    medians: Sequence[str],
    ranges: Sequence[str] = (),
    first: Sequence[str] = (),
    extra: Callable[[dict[str, Any], list[Mapping[str, Any]]], Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per (link rate, ``by`` value) of link-lab ``runs``, over the repeats of that pair.

    Rows go from the fastest rate to the slowest, and within a rate in ``order`` (values without runs are left
    out). A row holds ``rate_mbit``, ``by``, ``n`` (the repeats), each of ``first`` as the first repeat has it, the
    median of each of ``medians``, ``KEY_min`` and ``KEY_max`` of each of ``ranges``, ``ns_tx_mb`` (the median
    over repeats of the bytes a site sent, averaged over sites, in MB), then what ``extra(row, repeats)`` adds.
    """
    rows = []
    for rate in sorted({r["rate_mbit"] for r in runs}, reverse=True):
        for value in order:
            rs = [r for r in runs if r["rate_mbit"] == rate and r[by] == value]
            if not rs:
                continue
            row: dict[str, Any] = {"rate_mbit": rate, by: value, "n": len(rs)}
            row.update({key: rs[0][key] for key in first})
            row.update({key: median(r[key] for r in rs) for key in medians})
            for key in ranges:
                row[f"{key}_min"] = min(r[key] for r in rs)
                row[f"{key}_max"] = max(r[key] for r in rs)
            row["ns_tx_mb"] = median(sum(r["ns_tx_bytes"]) / len(r["ns_tx_bytes"]) / 1e6 for r in rs)
            if extra is not None:
                row.update(extra(row, rs))
            rows.append(row)
    return rows


def spread(values: Iterable[float]) -> tuple[float, float, float]:
    """(mean, sample std, max - min) of the values."""
    vals = list(values)
    mean = statistics.fmean(vals)
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return mean, std, max(vals) - min(vals)


def machine() -> dict[str, Any]:
    """What ran the benchmark: CPU model, cores, memory, kernel, Python, torch, load, date (UTC)."""
    cpu = "unknown"
    with _suppress():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with _suppress():
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    torch_version = None
    with _suppress():
        torch_version = subprocess.run(
            [python(), "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True, timeout=60
        ).stdout.strip()
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": mem_gib,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch_version,
        "loadavg_at_start": os.getloadavg(),
        "note": "2 cores shared with other engineers' test runs: variants interleaved, medians reported",
    }


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def write_results(name: str, out: Path, payload: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``out/name.json`` and ``out/name.md``; return both paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / f"{name}.json", out / f"{name}.md"
    jpath.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    mpath.write_text(markdown.rstrip() + "\n")
    return jpath, mpath


def run_seeds_interleaved(
    payload: dict[str, Any],
    variants: Sequence[str],
    seeds: Sequence[int],
    run_one: Callable[[str, int], dict[str, Any]],
    report: Callable[[dict[str, Any]], str],
    name: str,
    out: Path,
) -> None:
    """Run ``run_one(variant, seed)`` for every seed and variant, interleaved (seed loop outermost, the order of
    variants rotated per seed), appending each result to ``payload["runs"]`` and rewriting ``name.json`` /
    ``name.md`` after every run (partial results survive a crash); print the final table."""
    for k, seed in enumerate(seeds):
        for variant in rotate(variants, k):
            result = run_one(variant, seed)
            payload["runs"].append(result)
            print(f"seed {seed} {variant:>15}: eval loss {result['eval_loss']:.4f}  ({result['wall_s']:.0f} s)",
                  flush=True)  # fmt: skip
            write_results(name, out, payload, report(payload))
    jpath, mpath = write_results(name, out, payload, report(payload))
    print(mpath.read_text())
    print(f"wrote {jpath} and {mpath}")


def command_line() -> str:
    """The command that started this driver, as one shell line (for the results files)."""
    exe = sys.executable
    with _suppress():
        exe = os.path.relpath(exe, ROOT)
    script = sys.argv[0]
    with _suppress():
        script = os.path.relpath(script, ROOT)
    return shlex.join([exe, script, *sys.argv[1:]])


def machine_line(m: Mapping[str, Any]) -> str:
    load = ", ".join(f"{x:.2f}" for x in m.get("loadavg_at_start", ()))
    return (
        f"{m['date_utc']}; {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB, kernel {m['kernel']}, "
        f"Python {m['python']}, torch {m['torch']}; load average at start {load}. {m['note']}."
    )


# ------------------------------------------------------------------------------------------------ link lab runs
def netlab():  # type: ignore[no-untyped-def]
    """The link lab module (``benchmarks/netlab.py``), imported on first use."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import netlab as module

    return module


def run_train_torchrun(
    lab: Any, args: Sequence[str], out_dir: Path, *, port: int, rdzv_id: str, timeout: float = 1800.0
) -> dict[str, Any]:
    """Run ``eagerloco train ARGS`` as a 2-site torchrun job across ``lab`` (one worker per namespace, gloo over
    the shaped links, no emulated link, 1 torch thread per worker); return rank 0's summary.json plus
    ``ns_tx_bytes`` / ``ns_rx_bytes`` (each site's ``lab0`` counters over the whole job, start-up included)
    and ``driver_wall_s``."""
    nl = netlab()
    out_dir = fresh_run_dir(out_dir)
    summary_path = out_dir / "summary.json"
    script = [
        "-m", "eagerloco.train", *args, "--launch", "torchrun", "--link-mbit", "0", "--threads", "1",
        "--out-dir", str(out_dir), "--no-progress",
    ]  # fmt: skip
    before = [lab.counters(s) for s in lab.site_ids]
    start = time.perf_counter()
    procs = [
        lab.popen(
            s,
            nl.torchrun_argv(lab, s, script, port, rdzv_id=rdzv_id, python=python()),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
        for s in lab.site_ids
    ]
    outputs = _wait_all(procs, timeout)
    wall = time.perf_counter() - start
    failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode]
    if failed or not summary_path.exists():
        tail = "\n".join(f"--- site {i}:\n{out[-3000:]}" for i, out in enumerate(outputs))
        raise RuntimeError(f"torchrun job failed (exit codes {[p.returncode for p in procs]}):\n{tail}")
    deltas = [lab.counters(s) - b for s, b in zip(lab.site_ids, before)]
    summary = read_summary(out_dir)
    summary["ns_tx_bytes"] = [d.tx_bytes for d in deltas]
    summary["ns_rx_bytes"] = [d.rx_bytes for d in deltas]
    summary["driver_wall_s"] = wall
    return summary


def _wait_all(procs: Sequence[subprocess.Popen[str]], timeout: float) -> list[str]:
    """Collect every process's output; on timeout kill them all and raise."""
    import signal

    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out or "")
    except subprocess.TimeoutExpired:
        for p in procs:
            with _suppress():
                os.killpg(p.pid, signal.SIGKILL)
        raise RuntimeError(f"job did not finish within {timeout:.0f} s") from None
    return outputs
