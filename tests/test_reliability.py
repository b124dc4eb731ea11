"""Fault injection (docs/reliability.md): dead workers, non-finite outer gradients, broken checkpoints, signals,
bad input. Real processes over gloo on 127.0.0.1 where a fault needs them (driver: tests/_faults.py, which forks
every worker from one warmed-up process), the in-process group where threads show the same thing faster."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

from _toy import TinyNet, train_tinynet
from eagerloco import DiLoCo, DiLoCoConfig, NonFiniteOuterGradient
from eagerloco.comm import InProcessGroup, run_workers

HERE = Path(__file__).parent
ROOT = HERE.parent
TIMEOUT = 4  # collective_timeout_s of the fault runs
MODES = ("sync", "eager", "overlap", "delayed")


def run_driver(jobs: list[dict], tmp_path: Path) -> list[list[dict]]:
    """Run the jobs in one driver process (tests/_faults.py); per job, one result dict per worker."""
    for i, job in enumerate(jobs):
        job["id"] = i
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE), GLOO_SOCKET_IFNAME="lo")
    proc = subprocess.run(
        [sys.executable, str(HERE / "_faults.py"), str(tmp_path / "jobs.json"), str(tmp_path / "results.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((tmp_path / "results.json").read_text())


def final_phi(tmp_path: Path, job: dict, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(tmp_path / f"job{job['id']}-rank{rank}.json.phi.pt")


# ------------------------------------------------------------------------------------------------ kill -9


def kill_jobs(
    tmp_path: Path, seeds: Iterable[int], compression: str = "none", world: int | None = None
) -> tuple[list[dict], list[tuple[int, int, int, dict]]]:
    """Per seed: a run whose victim is killed at a random point, then its resume; one uninterrupted reference
    per (mode, workers, fragments). ``world``: every run with that many workers (default 2 or 3 by seed).
    Returns the jobs and (seed, kill job, resume job, reference job) indices."""
    phases = ("before", "during", "after", "checkpoint", "inner")
    jobs: list[dict] = []
    references: dict[tuple, int] = {}
    plan = []
    for seed in seeds:
        rng = random.Random(seed)
        mode, workers = MODES[seed % 4], world or 2 + seed % 2
        fragments = 2 if seed % 3 == 2 else 1
        phase = phases[seed % 5]
        base = {"kind": "train", "mode": mode, "world": workers, "steps": 24, "sync_every": 4,
                "fragments": fragments, "timeout": TIMEOUT, "compression": compression}  # fmt: skip
        key = (mode, workers, fragments)
        if key not in references:
            references[key] = len(jobs)
            jobs.append({**base, "run_dir": str(tmp_path / f"ref-{mode}-{workers}-{fragments}")})
        sync_points, between = [8, 12, 16, 20], [t for t in range(5, 21) if t % 4]
        kill_at = rng.choice(between if phase == "inner" else sync_points)
        run_dir = str(tmp_path / f"seed{seed}")
        victim = rng.randrange(workers)
        jobs.append({**base, "run_dir": run_dir, "victim": victim, "kill_at": kill_at, "phase": phase})
        jobs.append({**base, "run_dir": run_dir, "resume": True})
        plan.append((seed, len(jobs) - 2, len(jobs) - 1, references[key]))
    return jobs, plan


def test_kill_minus_9_survivors_fail_fast_and_resume_is_bitwise(tmp_path):
    """10 seeds: every mode, 2 and 3 workers, 1 and 2 fragments; worker killed (SIGKILL) before, during and
    after an outer collective, in the middle of a checkpoint, or between sync points. The survivors exit with
    the clear error, within the timeout, naming the dead rank; restarting from the last checkpoint finishes with
    final parameters bitwise equal to the uninterrupted run's."""
    jobs, plan = kill_jobs(tmp_path, range(10))
    phases_seen = check_kills(tmp_path, jobs, plan, run_driver(jobs, tmp_path))
    assert phases_seen == {"before", "during", "after", "checkpoint", "inner"}


def test_kill_minus_9_with_4bit_outer_gradients_between_two_workers(tmp_path):
    """The same with fp4 outer gradients between two gloo workers, whose all-gather is the receive-first exchange
    (point-to-point sends and receives, not a gloo collective): a worker killed before, during or after the
    exchange of an outer gradient, in every mode; the survivor fails fast naming it, the resume is bitwise."""
    jobs, plan = kill_jobs(tmp_path, [1, 6, 16, 7, 0], compression="fp4", world=2)
    phases_seen = check_kills(tmp_path, jobs, plan, run_driver(jobs, tmp_path))
    assert {"before", "during", "after"} <= phases_seen
    assert {jobs[k]["mode"] for _, k, _, _ in plan} == set(MODES)


def check_kills(tmp_path: Path, jobs: list[dict], plan: list[tuple[int, int, int, int]], results: list) -> set[str]:
    """Assert what test_kill_minus_9_survivors_fail_fast_and_resume_is_bitwise promises for every planned kill;
    return the phases the kills hit."""
    phases_seen = set()
    for seed, kill_index, resume_index, ref_index in plan:
        job, killed, resumed = jobs[kill_index], results[kill_index], results[resume_index]
        victim, t, phase, H = job["victim"], job["kill_at"], job["phase"], job["sync_every"]
        context = f"seed {seed}: {job['mode']} x{job['world']} P={job['fragments']}, kill {victim} {phase} {t}"
        assert killed[victim]["exitcode"] == -9 and killed[victim]["killed"] == phase, context
        phases_seen.add(phase)
        for rank, result in enumerate(killed):
            if rank == victim:
                continue
            assert result["exitcode"] == 3, (context, result)  # CollectiveTimeout / CollectiveAborted, no hang
            assert result["error"] == "CollectiveTimeout", (context, result)
            message = result["message"]
            assert f"peers that did not answer: ranks [{victim}] of this group" in message, (context, message)
            if "outer step" in message:  # a wait on an outer gradient (else the checkpoint barrier)
                assert "of fragment" in message and "launched at inner step" in message, message
            latency = result["error_time"] - killed[victim]["kill_time"]
            assert latency < TIMEOUT + 3, (context, latency)  # the timeout, the 1 s diagnosis, slack
        # The restart: from the last complete checkpoint before the kill, to the end, bitwise as uninterrupted.
        expected_from = (t // H) * H if phase == "inner" else t - H
        for rank, result in enumerate(resumed):
            assert result["exitcode"] == 0, (context, result)
            assert result["resumed_from"] == expected_from, (context, result)
            if phase == "checkpoint":  # the unfinished newest checkpoint was skipped, with a warning
                assert any("no COMPLETE.json" in w for w in result["warnings"]), result["warnings"]
            reference = final_phi(tmp_path, jobs[ref_index], rank)
            mine = final_phi(tmp_path, jobs[resume_index], rank)
            for name in reference:
                assert torch.equal(mine[name], reference[name]), (context, rank, name)
    return phases_seen


# ------------------------------------------------------------------------------------------------ NaN / Inf


def nan_run(config: DiLoCoConfig, world: int, nan_rank: int, nan_at: int, steps: int, codec_value=float("nan")):
    """TinyNet workers; worker ``nan_rank`` writes a non-finite value into θ just before step() at ``nan_at``."""

    def worker(comm):
        model = TinyNet()
        inner = torch.optim.SGD(model.parameters(), lr=0.05)
        loco = DiLoCo(model, inner, config, comm=comm)
        g = torch.Generator().manual_seed(1000 + comm.rank)
        phis = []
        for t in range(1, steps + 1):
            x = torch.randn(16, 4, generator=g)
            loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
            loss.backward()
            inner.step()
            inner.zero_grad()
            if comm.rank == nan_rank and t == nan_at:
                with torch.no_grad():
                    model.blocks[0].weight[0, 0] = codec_value
            loco.step()
            phis.append(torch.cat([s.phi for s in loco.states]).clone())
        loco.finalize()
        return {"phis": phis, "stats": loco.stats, "records": loco.records, "final": loco.outer_parameters()}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return run_workers(InProcessGroup(world, timeout=30), worker, join_timeout=60)


@pytest.mark.parametrize("compression", ["none", "fp4"])
@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_raise_stops_every_worker_at_the_same_outer_step(mode, compression):
    config = DiLoCoConfig(mode=mode, sync_every=4, compression=compression, nonfinite="raise")
    with pytest.raises(RuntimeError) as info:
        nan_run(config, world=3, nan_rank=1, nan_at=8, steps=20)
    cause = info.value.__cause__
    assert isinstance(cause, NonFiniteOuterGradient), info.value
    # sync and overlap apply the average of step 8 at 8 (+τ); delayed and eager one outer step later, at 12
    applied_at = {"sync": 8, "overlap": 9, "delayed": 12, "eager": 12}[mode]
    assert "outer step 2 of fragment 0 (launched at inner step 8)" in str(cause)
    assert f"at inner step {applied_at}" in str(cause)


@pytest.mark.parametrize("compression", ["none", "fp4"])
@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_skip_is_the_same_decision_on_every_worker(mode, compression):
    config = DiLoCoConfig(mode=mode, sync_every=4, compression=compression, nonfinite="skip")
    for bad in (float("nan"), float("inf")):
        results = nan_run(config, world=3, nan_rank=1, nan_at=8, steps=20, codec_value=bad)
        for r in results:
            assert r["stats"].skipped_outer_steps == 1  # exactly the one outer step, on every worker
            skipped = [rec.inner_step for rec in r["records"] if rec.skipped]
            assert skipped == [{"sync": 8, "overlap": 9, "delayed": 12, "eager": 12}[mode]]
            assert all(bool(torch.isfinite(phi).all()) for phi in r["phis"])  # φ never non-finite
            assert all(bool(torch.isfinite(v).all()) for v in r["final"].values())
        if mode != "eager":  # uniform outer state: φ bit-identical on every worker after the skip
            for r in results[1:]:
                for a, b in zip(results[0]["phis"], r["phis"]):
                    assert torch.equal(a, b)
        if mode == "sync":  # a skipped step leaves φ exactly as it was
            assert torch.equal(results[0]["phis"][7], results[0]["phis"][6])


def test_nonfinite_eager_skip_drops_the_average_keeps_own_contributions():
    """Eager, skip: Δ(8) is dropped. At 8 the bad worker applies no own share (its Δ_m(8) is not finite); at 12,
    where Δ(8) arrives, every worker applies exactly its own fresh share (1/M)·Δ_m(12) and nothing of Δ(8)."""
    config = DiLoCoConfig(mode="eager", sync_every=4, nonfinite="skip")
    results = nan_run(config, world=2, nan_rank=1, nan_at=8, steps=12)
    for rank, r in enumerate(results):
        at = {rec.inner_step: rec for rec in r["records"] if rec.kind == "step"}
        assert [t for t, rec in at.items() if rec.skipped] == [12]
        assert at[12].applied_norm == at[12].delta_norm / 2  # g = Δ_m(12)/2 exactly: the bracket is gone
        assert (at[8].delta_norm == 0.0) == (rank == 1)  # the bad worker's own share was neither sent nor applied


# ------------------------------------------------------------------------------------------------ gloo: NaN, models


def test_gloo_nonfinite_and_model_mismatch(tmp_path):
    """Real processes: NaN in worker 2's outer gradient stops all three with the same NonFiniteOuterGradient
    (raise) or is skipped by all three alike (skip); a worker with another model stops every worker before the
    first outer collective with ModelMismatch naming the parameter."""
    base = {"kind": "train", "world": 3, "steps": 16, "sync_every": 4, "timeout": TIMEOUT, "nan_rank": 2,
            "nan_at": 8}  # fmt: skip
    jobs = [
        {**base, "mode": "sync", "nonfinite": "raise", "run_dir": str(tmp_path / "a")},
        {**base, "mode": "eager", "nonfinite": "raise", "run_dir": str(tmp_path / "b"), "compression": "int8"},
        {**base, "mode": "sync", "nonfinite": "skip", "run_dir": str(tmp_path / "c")},
        {**base, "mode": "eager", "nonfinite": "skip", "run_dir": str(tmp_path / "d")},
        {**base, "kind": "mismatch", "mode": "sync", "world": 2, "steps": 8, "run_dir": str(tmp_path / "e")},
    ]
    results = run_driver(jobs, tmp_path)
    for index, at in ((0, 8), (1, 12)):
        messages = set()
        for r in results[index]:
            assert r["exitcode"] == 4 and r["error"] == "NonFiniteOuterGradient", r
            messages.add(r["message"].split(" on gloo")[0])
            assert f"at inner step {at}" in r["message"]
        # the same decision, in the same words, on every worker
        assert len(messages) == 1, messages
        assert messages.pop().startswith("the average outer gradient of outer step 2 of fragment 0 (launched at inner")
    for index in (2, 3):
        for r in results[index]:
            assert r["exitcode"] == 0 and r["skipped"] == 1, r
        phis = [final_phi(tmp_path, jobs[index], rank) for rank in range(3)]
        for other in phis[1:]:  # sync: identical by construction; eager: after consolidate
            for name in phis[0]:
                assert torch.equal(phis[0][name], other[name])
                assert bool(torch.isfinite(other[name]).all())
    for r in results[4]:
        assert r["exitcode"] == 5 and r["error"] == "ModelMismatch", r
        assert "models differ across workers at parameter #0" in r["message"], r["message"]


def test_inprocess_timeout_names_the_missing_worker():
    """A worker that never reaches the outer collective: the others stop after collective_timeout_s with the
    outer step, the fragment and the missing rank in the message (the in-process group knows it exactly)."""
    config = DiLoCoConfig(mode="sync", sync_every=2, collective_timeout_s=0.5)
    group = InProcessGroup(3)

    torch.optim.SGD(TinyNet().parameters(), lr=0.1)  # torch.optim imports torch._dynamo once: not part of the wait
    failed_after: list[float] = []

    def worker(comm):
        start = time.monotonic()
        if comm.rank == 2:
            DiLoCo(TinyNet(), None, config, comm=comm)
            time.sleep(2)  # hangs (or died) without telling anyone
            return None
        try:
            return train_tinynet(comm, config, steps=4)
        finally:
            failed_after.append(time.monotonic() - start)

    with pytest.raises(RuntimeError) as info:
        run_workers(group, worker, join_timeout=30)
    assert len(failed_after) == 2 and max(failed_after) < 1.5  # the 0.5 s timeout, not the hung worker's 2 s
    message = str(info.value)
    assert "CollectiveTimeout" in message and "outer step 1 of fragment 0 (launched at inner step 2" in message
    assert "peers that did not answer: ranks [2]" in message


def test_nonfinite_policy_is_validated():
    from eagerloco import ConfigError

    with pytest.raises(ConfigError, match=r"nonfinite='ignore': must be 'raise' or 'skip'"):
        DiLoCoConfig(nonfinite="ignore").validate()
    with pytest.raises(ConfigError, match=r"collective_timeout_s=inf: must be a finite number of seconds > 0"):
        DiLoCoConfig(collective_timeout_s=float("inf")).validate()
    assert DiLoCoConfig().collective_timeout_s == 600.0  # finite by default: nobody waits forever


# ------------------------------------------------------------------------------------------------ the training CLI

SMOKE = str(ROOT / "configs" / "smoke.toml")
CLI_STEPS = "60"  # H = 5: 12 outer steps


def cli_args(out: Path, *flags: str) -> list[str]:
    return ["train", "--config", SMOKE, "--out-dir", str(out), "--threads", "1", "--steps", CLI_STEPS,
            "--collective-timeout-s", str(TIMEOUT), "--no-progress", *flags]  # fmt: skip


def cli_in_process(out: Path, *flags: str) -> None:
    from eagerloco.cli.main import main as cli

    assert cli(cli_args(out, *flags)) == 0


def start_cli(out: Path, *flags: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    return subprocess.Popen([sys.executable, "-m", "eagerloco", *cli_args(out, *flags)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if metrics.exists() and f'"step": {step},' in metrics.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} never reached")


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=False)["model"]


def assert_same_model(a: Path, b: Path) -> None:
    x, y = final_model(a), final_model(b)
    assert x.keys() == y.keys()
    for name in x:
        assert torch.equal(x[name], y[name]), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one is compared with (eager, 2 workers, checkpoint every outer
    step, 3 kept). M = 2 makes simulated and process launches bitwise equal (tests/test_train_cli.py)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    cli_in_process(out, "--checkpoint-every", "1", "--keep-checkpoints", "3")
    return out


def stop_with_signal(out: Path, proc: subprocess.Popen, sig: int) -> int:
    """Send ``sig`` once step 12 is logged; check the one-line message and the checkpoint; return the step."""
    wait_for_step(out, 12, proc)
    proc.send_signal(sig)
    text = (out / "metrics.jsonl").read_text()
    logged = [json.loads(line) for line in text[: text.rfind("\n")].splitlines()]  # complete lines only
    reached = max(r["step"] for r in logged if r["type"] == "inner")  # at least where the signal landed
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr  # one line, no traceback
    name = signal.Signals(sig).name
    assert lines[0].startswith(f"eagerloco train: interrupted ({name}): stopped at inner step "), lines[0]
    step = int(lines[0].split("inner step ")[1].split(",")[0])
    assert step % 5 == 0 and 12 < step <= reached + 10, (step, reached)  # an outer boundary, at most 2·H later
    assert f"checkpoints/step-{step:09d}; continue with --resume" in lines[0]
    assert (out / "checkpoints" / f"step-{step:09d}" / "COMPLETE.json").exists()
    assert not (out / "model.pt").exists()
    return step


def test_sigint_simulated_stops_at_a_safe_point_and_resumes_bitwise(tmp_path, reference):
    out = tmp_path / "run"
    proc = start_cli(out, "--launch", "simulated", "--checkpoint-every", "1", "--keep-checkpoints", "3")
    stop_with_signal(out, proc, signal.SIGINT)
    cli_in_process(out, "--checkpoint-every", "1", "--keep-checkpoints", "3", "--resume")
    assert_same_model(out, reference)


def test_processes_sigterm_then_kill_minus_9_then_resume_bitwise(tmp_path, reference):
    """eagerloco train --launch processes, three lives of one run: SIGTERM to the launcher (forwarded; both
    workers stop at one agreed step with a checkpoint, exit 143); --resume, then kill -9 of worker 1 (worker 0
    stops with one line naming the outer step, the fragment and rank 1, well within the timeout); --resume
    again, simulated this time: the final model is bitwise the uninterrupted run's."""
    out = tmp_path / "run"
    flags = ("--checkpoint-every", "1", "--keep-checkpoints", "3")
    stopped_at = stop_with_signal(out, start_cli(out, "--launch", "processes", *flags), signal.SIGTERM)
    proc = start_cli(out, "--launch", "processes", "--resume", *flags)
    wait_for_step(out, stopped_at + 12, proc)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) == 2
    rank1 = next(c for c in children if b"\0RANK=1\0" in b"\0" + Path(f"/proc/{c}/environ").read_bytes())
    killed_at = time.monotonic()
    os.kill(int(rank1), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - killed_at < TIMEOUT + 5
    assert proc.returncode == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 2, stderr  # worker 0's line, the launcher's line
    assert lines[0].startswith("eagerloco train: error: [rank 0] CollectiveTimeout: "), lines[0]
    assert "peers that did not answer: ranks [1] of this group" in lines[0]
    assert "outer step" in lines[0] and ("of fragment 0" in lines[0] or "checkpoint at inner step" in lines[0])
    assert lines[1] == (
        "eagerloco train: error: worker processes exited with codes [1, -9] (negative: killed by that signal); "
        "their messages are above"
    )
    with warnings.catch_warnings(record=True) as caught:  # the kill may have left a checkpoint unfinished
        warnings.simplefilter("always")
        cli_in_process(out, "--resume", *flags)
    assert all("no COMPLETE.json" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert_same_model(out, reference)


def test_corrupted_or_truncated_newest_checkpoint_falls_back_and_resume_is_bitwise(tmp_path, reference):
    from eagerloco.lm import checkpoint as ckpt

    assert [d.name for d in (reference / "checkpoints").iterdir()] == [
        "step-000000050", "step-000000055", "step-000000060"]  # keep_last = 3  # fmt: skip
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "model.pt").unlink()
    shutil.rmtree(out / "checkpoints" / "step-000000060")
    newest = out / "checkpoints" / "step-000000055" / "worker-1.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x40  # one flipped bit
    newest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"step-000000055: worker-1.pt is corrupted or truncated"):
        assert ckpt.latest_valid(out).name == "step-000000050"
    truncated = out / "checkpoints" / "step-000000050" / "worker-0.pt"
    shutil.copy(truncated, tmp_path / "saved.pt")
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ckpt.latest_valid(out) is None  # nothing valid left: --resume refuses, clearly
    assert [str(w.message).split("checkpoints/")[1].split(" (sha256")[0] for w in caught] == [
        "step-000000055: worker-1.pt is corrupted or truncated",
        "step-000000050: worker-0.pt is corrupted or truncated",
    ]
    from eagerloco.cli.main import main as cli

    with pytest.warns(UserWarning), pytest.raises(SystemExit, match=r"--resume: no complete checkpoint under"):
        cli(cli_args(out, "--resume"))
    shutil.copy(tmp_path / "saved.pt", truncated)
    with pytest.warns(UserWarning, match=r"trying the previous one"):
        cli_in_process(out, "--checkpoint-every", "1", "--keep-checkpoints", "3", "--resume")
    assert_same_model(out, reference)


def test_resume_refusals_and_the_mode_switch_after_finalize(tmp_path, reference):
    from eagerloco.cli.main import main as cli

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for flags, pattern in [
        (["--n-layer", "3"], r"model.n_layer=2, this run has model.n_layer=3: the model, tokenizer and outer"),
        (["--sync-every", "10"], r"outer.sync_every=5, this run has outer.sync_every=10"),
    ]:
        with pytest.raises(SystemExit, match=pattern):
            cli(cli_args(out, "--resume", *flags))
    mid = tmp_path / "mid"  # a mid-run checkpoint: averages in flight, the mode cannot change
    shutil.copytree(reference, mid)
    shutil.rmtree(mid / "checkpoints" / "step-000000060")
    with pytest.raises(SystemExit, match=r"outer.mode='eager', this run has outer.mode='sync': the outer loop can "
                                         r"change only at a checkpoint written after finalize"):  # fmt: skip
        cli(cli_args(mid, "--resume", "--mode", "sync"))
    # An outer optimizer field (a mode's recipe may change between versions): the message names the flag that keeps it
    with pytest.raises(SystemExit, match=r"outer.outer_lr=(\S+), this run has outer.outer_lr=0.123: the outer loop "
                                         r"can .*; to keep the checkpoint's value, pass --outer-lr \1$"):  # fmt: skip
        cli(cli_args(mid, "--resume", "--outer-lr", "0.123"))
    with pytest.raises(SystemExit, match=r"; to keep the checkpoint's value, pass --(no-)?nesterov$"):
        nesterov = json.loads((mid / "config.json").read_text())["outer"]["nesterov"]
        cli(cli_args(mid, "--resume", "--no-nesterov" if nesterov else "--nesterov"))
    # After finalize (the checkpoint at the end of a run): eager → sync for 20 more steps is supported.
    cli_in_process(out, "--resume", "--mode", "sync", "--steps", "80")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    outer = [r for r in metrics if r["type"] == "outer" and r["worker"] == 0 and r["kind"] == "step"]
    assert [r["inner_step"] for r in outer if r["inner_step"] > 60] == [65, 70, 75, 80]
    assert all(r["staleness"] == 0 for r in outer if r["inner_step"] > 60)  # sync: applied at once
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "sync" and summary["eval_loss"] < 5.545


def test_resume_says_which_inner_optimizer_settings_it_changes(tmp_path, reference, capsys):
    """An inner optimizer setting may change on resume (AdamW continues with it), but the run says so, naming the
    flag that keeps the checkpoint's value: a default that changes between versions must not change a run
    silently. Nothing is said when every setting is the checkpoint's."""
    mid = tmp_path / "mid"
    shutil.copytree(reference, mid)
    shutil.rmtree(mid / "checkpoints" / "step-000000060")
    checkpoint = mid / "checkpoints" / "step-000000055"
    saved = json.loads((reference / "config.json").read_text())["optim"]
    capsys.readouterr()
    cli_in_process(mid, "--resume", "--lr", "0.0123", "--warmup-steps", str(saved["warmup_steps"] + 1))
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("eagerloco train --resume")]
    assert said == [
        f"eagerloco train --resume: optim.lr=0.0123 where checkpoint {checkpoint} was written with {saved['lr']!r}: "
        f"the inner optimizer continues with the new value (pass --lr {saved['lr']!r} to keep the checkpoint's)",
        f"eagerloco train --resume: optim.warmup_steps={saved['warmup_steps'] + 1} where checkpoint {checkpoint} was "
        f"written with {saved['warmup_steps']}: the inner optimizer continues with the new value (pass --warmup-steps "
        f"{saved['warmup_steps']} to keep the checkpoint's)",
    ]
    assert json.loads((mid / "config.json").read_text())["optim"]["lr"] == 0.0123
    # Eager's smoothing (ALGORITHMS.md 4.4) may change on resume too (the deferred instalments are stored), said
    smoothed = tmp_path / "smoothed"
    shutil.copytree(reference, smoothed)
    shutil.rmtree(smoothed / "checkpoints" / "step-000000060")
    checkpoint = smoothed / "checkpoints" / "step-000000055"
    beta = json.loads((smoothed / "config.json").read_text())["outer"]["eager_smoothing"]
    capsys.readouterr()
    cli_in_process(smoothed, "--resume", "--eager-smoothing", "0.125")
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("eagerloco train --resume")]
    assert said == [
        f"eagerloco train --resume: outer.eager_smoothing=0.125 where checkpoint {checkpoint} was written with "
        f"{beta!r}: the outer loop continues with the new value (pass --eager-smoothing {beta:g} to keep the "
        "checkpoint's)"
    ]
    # a checkpoint from before smoothing existed (no such key) was written without it: β = 0
    from eagerloco.lm import checkpoint as ckpt

    manifest = checkpoint / "COMPLETE.json"
    old = json.loads(manifest.read_text())
    del old["config"]["outer"]["eager_smoothing"]
    manifest.write_text(json.dumps(old))
    assert ckpt.accepted_changes(checkpoint, {"outer": {"eager_smoothing": 0.125}}) == [
        f"outer.eager_smoothing=0.125 where checkpoint {checkpoint} was written with 0.0: the outer loop continues "
        "with the new value (pass --eager-smoothing 0 to keep the checkpoint's)"
    ]
    again = tmp_path / "again"
    shutil.copytree(reference, again)
    shutil.rmtree(again / "checkpoints" / "step-000000060")
    cli_in_process(again, "--resume")
    assert "eagerloco train --resume" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "content,message",
    [
        ("[outer\nmode = 'sync'\n", r"is not valid TOML"),
        ("[outer]\nsync_evry = 3\n", r"unknown key outer.sync_evry; valid keys: .*sync_every"),
        ("[outer]\nsync_every = '30'\n", r"outer.sync_every='30': must be of type int, got str"),
        ("[outer]\nnonfinite = 'ignore'\n", r"outer.nonfinite='ignore': must be one of 'raise', 'skip'"),
        ("[outer]\ncollective_timeout_s = -1.0\n", r"collective_timeout_s=-1.0: must be a finite number of seconds"),
        ("[run]\nkeep_checkpoints = 0\n", r"run.keep_checkpoints=0: must be >= 1"),
    ],
)
def test_malformed_configs_are_one_line_errors_before_training(tmp_path, capsys, content, message):
    from eagerloco.cli.main import main as cli

    bad = tmp_path / "bad.toml"
    bad.write_text(content)
    with pytest.raises(SystemExit, match=message) as info:
        cli(["train", "--config", str(bad), "--out-dir", str(tmp_path / "out")])
    assert info.value.code == 2  # bad input: eagerloco.cli.main.EXIT_USAGE
    assert "\n" not in str(info.value) and str(info.value).startswith("eagerloco train: error: ")
    assert capsys.readouterr().err == str(info.value) + "\n"  # the one line, on stderr
    assert not (tmp_path / "out").exists()  # nothing started


def test_workers_with_different_configurations_refuse_before_training():
    """Under torchrun every rank compares its whole configuration with the others' before building anything
    (train.check_same_config): each stops with an error naming the first difference."""
    from eagerloco.engine.config import ConfigError
    from eagerloco.launch import check_same_config
    from eagerloco.lm.config import TrainConfig

    configs = [TrainConfig(), TrainConfig()]
    configs[1].model.n_layer = 3
    configs[1].run.threads = 7  # per-machine settings may differ

    def worker(comm):
        check_same_config(configs[comm.rank], comm)

    with pytest.raises(RuntimeError) as info:
        run_workers(InProcessGroup(2, timeout=10), worker)
    assert isinstance(info.value.__cause__, ConfigError)
    assert str(info.value.__cause__) in (
        "worker 1 runs another configuration than worker 0: model.n_layer=3 vs 4",
        "worker 0 runs another configuration than worker 1: model.n_layer=4 vs 3",
    )


def test_commit_keeps_the_newest_n_and_clears_unfinished_checkpoints(tmp_path):
    """keep_last = N complete checkpoints; a checkpoint a crash left without its manifest is removed once a newer
    one commits (it can never complete), never before (resume must be able to warn about it)."""
    from eagerloco.lm import checkpoint as ckpt

    for step in (5, 10, 15, 20):
        digests = [ckpt.save_worker(tmp_path, step, rank, {"inner_step": step, "rank": rank}) for rank in (0, 1)]
        if step != 15:  # 15: a crash between the workers' files and the manifest
            ckpt.commit(tmp_path, step, 2, digests, keep=2, config={"run": {"workers": 2}}, finalized=step == 20)
        if step == 15:
            assert sorted(d.name for d in (tmp_path / "checkpoints").iterdir())[-1] == "step-000000015"
    assert sorted(d.name for d in (tmp_path / "checkpoints").iterdir()) == ["step-000000010", "step-000000020"]
    manifest = json.loads((tmp_path / "checkpoints" / "step-000000020" / "COMPLETE.json").read_text())
    assert (manifest["format"], manifest["world_size"], manifest["finalized"]) == (1, 2, True)
    assert set(manifest["sha256"]) == {"worker-0.pt", "worker-1.pt"}
    assert ckpt.load_worker(ckpt.latest_valid(tmp_path), 1, 2)["rank"] == 1
    assert not list((tmp_path / "checkpoints").rglob(".*.tmp"))  # no temporary file is left behind
