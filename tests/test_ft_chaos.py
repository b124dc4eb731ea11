"""Chaos tests of fault tolerance (ALGORITHMS.md section 11): 3 real worker processes over torchft (gloo on 127.0.0.1),
one killed with SIGKILL at a random inner step, the survivors go on without restarting, the killed one is restarted,
rejoins from a live peer's state, and all finish with finite losses. Every process is bounded by a timeout.

The CI form (about a minute on 2 busy cores) runs eager through a kill and a rejoin, and sync through a death inside
a sync point (the store-decided drop); the full matrix (every mode, several seeds, fragments and a codec) is marked
slow.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchft")

from eagerloco.ft import LighthouseHost

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_ft_worker.py"
H = 5
PROCESS_TIMEOUT_S = 150
# The survivors train on while the killed worker restarts (seconds: hundreds of outer steps); delayed mode with the
# papers' outer lr 0.7 and Nesterov 0.9 diverges over that many on this toy problem, so the chaos runs use a milder
# outer optimizer (the momentum is still there, and part of the state compared bit for bit).
STABLE = {"outer_lr": 0.4, "outer_momentum": 0.5}


def _spawn(spec: dict, log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], env=env, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip


def _tail(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if "[INFO]" not in ln]
    return "\n".join(lines[-25:])


def _wait_all(procs: list[subprocess.Popen], logs: list[Path], codes: list[int]) -> None:
    """Every process ends within the timeout with its expected exit code (-9: killed by SIGKILL)."""
    for proc, log, code in zip(procs, logs, codes, strict=True):
        try:
            rc = proc.wait(timeout=PROCESS_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"a worker hung past {PROCESS_TIMEOUT_S} s:\n{_tail(log)}")
        assert rc == code, _tail(log)


def _kill_left(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_chaos(tmp_path: Path, config: dict, seed: int) -> tuple[list[dict], int]:
    """Start 3 workers, kill worker 2 at a random inner step, restart it; return the three results."""
    kill_at = random.Random(seed).randrange(H + 1, 5 * H)
    host = LighthouseHost(min_replicas=2, join_timeout_ms=2000, heartbeat_timeout_ms=1000)
    try:

        def spec(i: int, **kw: object) -> dict:
            out = {"lighthouse": host.lighthouse_addr, "store": host.store_addr, "replica_id": f"w{i}",
                   "config": config, "data_seed": i, "out": str(tmp_path / f"w{i}.pt"), "min_replicas": 2,
                   "timeout_s": 30.0, "extra_after_join": 3 * config["sync_every"], "start_together": 3,
                   "step_sleep_s": 0.005}  # fmt: skip
            out.update(kw)
            return out

        logs = [tmp_path / f"w{i}.log" for i in range(3)]
        procs = [_spawn(spec(i, kill_at=kill_at if i == 2 else None), logs[i]) for i in range(3)]
        try:
            assert procs[2].wait(timeout=PROCESS_TIMEOUT_S) == -9, _tail(logs[2])
            logs[2] = tmp_path / "w2-restarted.log"
            procs[2] = _spawn(spec(2, data_seed=12, start_together=None), logs[2])
            _wait_all(procs, logs, [0, 0, 0])
        finally:
            _kill_left(procs)
    finally:
        host.shutdown()
    return [torch.load(tmp_path / f"w{i}.pt", weights_only=False) for i in range(3)], kill_at


def run_three(tmp_path: Path, config: dict, steps: int, dying: dict[int, dict], **common: object) -> list[dict]:
    """Start 3 workers for ``steps`` inner steps, the ones in ``dying`` with their kill option; every survivor
    must exit 0 and every dying one by SIGKILL, within the timeout; return the survivors' results."""
    host = LighthouseHost(min_replicas=2, join_timeout_ms=2000, heartbeat_timeout_ms=1000)
    try:
        specs = [{"lighthouse": host.lighthouse_addr, "store": host.store_addr, "replica_id": f"w{i}",
                  "config": config, "data_seed": i, "out": str(tmp_path / f"w{i}.pt"), "min_replicas": 2,
                  "timeout_s": 30.0, "start_together": 3, "steps": steps, **common, **dying.get(i, {})}
                 for i in range(3)]  # fmt: skip
        logs = [tmp_path / f"w{i}.log" for i in range(3)]
        procs = [_spawn(spec, log) for spec, log in zip(specs, logs)]
        try:
            _wait_all(procs, logs, [-9 if i in dying else 0 for i in range(3)])
        finally:
            _kill_left(procs)
    finally:
        host.shutdown()
    return [torch.load(tmp_path / f"w{i}.pt", weights_only=False) for i in range(3) if i not in dying]


def check_chaos(results: list[dict], kill_at: int, config: dict) -> None:
    survivors, rejoined = results[:2], results[2]
    sync_every = config["sync_every"] // config.get("num_fragments", 1)  # one sync point per fragment offset
    # The restarted worker joined after the kill, at a sync point, and ran to the same end as the survivors.
    assert rejoined["joined_at"] > kill_at and rejoined["joined_at"] % sync_every == 0
    assert {r["inner_step"] for r in results} == {rejoined["joined_at"] + 3 * config["sync_every"]}
    for r in results:
        assert r["losses"] and all(math.isfinite(x) for x in r["losses"])
        assert all(bool(torch.isfinite(v).all()) for v in r["phi"].values())
    # Membership, the same on every worker at every sync point they share: 3, then 2 after the kill, then 3 again;
    # or 3 throughout when the restarted worker was already waiting when the survivors noticed the death (it then
    # replaces the dead one in the same quorum).
    by_t = [{rec["t"]: (rec["quorum"], rec["members"]) for rec in r["records"]} for r in results]
    assert by_t[0] == by_t[1]
    assert all(by_t[0][t] == q for t, q in by_t[2].items())
    sizes = [m for _, (_, m) in sorted(by_t[0].items())]
    quorums = [q for _, (q, _) in sorted(by_t[0].items())]
    changes = sum(1 for a, b in itertools.pairwise(quorums) if a != b)
    if 2 in sizes:
        first_two = sizes.index(2)
        last_two = len(sizes) - 1 - sizes[::-1].index(2)
        assert set(sizes[:first_two]) == {3} and set(sizes[first_two : last_two + 1]) == {2}
        assert set(sizes[last_two + 1 :]) == {3}
        assert changes == 2
    else:
        assert set(sizes) == {3} and changes == 1
    times = sorted(by_t[0])
    first_change = times[next(i for i, (a, b) in enumerate(itertools.pairwise(quorums)) if a != b) + 1]
    assert first_change <= kill_at + sync_every  # the survivors noticed at the next sync point after the kill
    # Averages in flight when the membership changed were dropped, on the survivors only (the joiner had none):
    # with k = 1, one per change and fragment in delayed and eager, none in sync.
    mode = config["mode"]
    expected = {"sync": 0, "overlap": 0}.get(mode, changes * config.get("num_fragments", 1))
    for r in survivors:
        assert r["ft"]["dropped_on_change"] == expected
        assert r["ft"]["membership_changes"] == 1 + changes  # the start, then each change
    assert rejoined["ft"]["heals"] == 1 and rejoined["ft"]["state_bytes_received"] > 0
    assert rejoined["ft"]["dropped_on_change"] == 0
    if mode != "eager":
        # φ and the outer optimizer state bit-identical on every member at every sync point, and at the end.
        for t, digest in ((rec["t"], rec["digest"]) for rec in results[0]["records"]):
            assert digest == {rec["t"]: rec["digest"] for rec in results[1]["records"]}[t]
        joiner = {rec["t"]: rec["digest"] for rec in rejoined["records"]}
        assert joiner and all(joiner[t] == d for t, d in ((rec["t"], rec["digest"]) for rec in results[0]["records"])
                              if t in joiner)  # fmt: skip
        assert len({r["final_digest"] for r in results}) == 1


@pytest.mark.parametrize("mode", ["eager", pytest.param("delayed", marks=pytest.mark.slow)])
def test_kill_minus_9_survivors_go_on_and_the_restarted_worker_rejoins(tmp_path: Path, mode: str) -> None:
    config = {"mode": mode, "sync_every": H, "collective_timeout_s": 30.0, **STABLE}
    results, kill_at = run_chaos(tmp_path, config, seed=0)
    check_chaos(results, kill_at, config)


@pytest.mark.slow
def test_chaos_eager_with_the_own_weight(tmp_path: Path) -> None:
    """Eager as the training CLI runs it, the own weight w = 0.875 (ALGORITHMS.md 4.1, w_Q = max(w, 1/M_Q) per
    quorum) with smoothing β = 0.5 (4.4: a dropped average still delivers the instalment deferred into it), through a
    kill and a rejoin: accepted although the engine sees M = 1 before the first quorum."""
    config = {"mode": "eager", "eager_own_weight": 0.875, "eager_smoothing": 0.5, "sync_every": H,
              "collective_timeout_s": 30.0, **STABLE}  # fmt: skip
    results, kill_at = run_chaos(tmp_path, config, seed=0)
    check_chaos(results, kill_at, config)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("mode", ["sync", "overlap", "delayed", "eager"])
def test_chaos_every_mode_several_seeds(tmp_path: Path, mode: str, seed: int) -> None:
    config = {"mode": mode, "sync_every": H, "collective_timeout_s": 30.0, **STABLE}
    results, kill_at = run_chaos(tmp_path, config, seed=seed)
    check_chaos(results, kill_at, config)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["delayed", "eager"])
def test_chaos_with_fragments_and_a_codec(tmp_path: Path, mode: str) -> None:
    config = {"mode": mode, "sync_every": 2 * H, "num_fragments": 2, "compression": "int8",
              "collective_timeout_s": 30.0, **STABLE}  # fmt: skip
    results, kill_at = run_chaos(tmp_path, config, seed=3)
    check_chaos(results, kill_at, config)


@pytest.mark.parametrize("mode", ["sync", pytest.param("overlap", marks=pytest.mark.slow)])
def test_a_worker_dies_inside_a_sync_point_and_every_survivor_drops_that_average(tmp_path: Path, mode: str) -> None:
    """Worker 2 dies after the quorum of sync point 2H, before its launch: the others' collective of that sync point
    fails, the decision record says drop, every survivor drops it (nothing applied, outer state bit-identical), and
    the next quorum goes on without worker 2."""
    config = {"mode": mode, "sync_every": H, "collective_timeout_s": 30.0, **STABLE}
    if mode == "overlap":
        config.update(overlap_steps=2, alpha=0.5)
    steps = 6 * H
    survivors = run_three(tmp_path, config, steps, dying={2: {"kill_in_launch_at": 2 * H}})
    for r in survivors:
        assert r["inner_step"] == steps and all(math.isfinite(x) for x in r["losses"])
        assert r["ft"]["dropped_by_vote"] == 1 and r["ft"]["failed_waits"] == 1
        assert r["engine"]["dropped_averages"] == 1
        assert [rec["members"] for rec in r["records"]] == [3, 3, 2, 2, 2, 2]
    assert [rec["digest"] for rec in survivors[0]["records"]] == [rec["digest"] for rec in survivors[1]["records"]]
    assert survivors[0]["final_digest"] == survivors[1]["final_digest"]


def test_a_worker_dies_before_the_final_average_and_the_survivors_finish_together(tmp_path: Path) -> None:
    """Eager: worker 2 dies after its last sync point, before the final average of φ (FaultTolerance.finish). The
    survivors' final quorum leaves it out; they average their own φ (exactly, in rank order) and end with the same
    φ and θ."""
    config = {"mode": "eager", "sync_every": H, "collective_timeout_s": 30.0, **STABLE}
    steps = 4 * H
    survivors = run_three(tmp_path, config, steps, dying={2: {"die_before_finish": True}}, finish=True)
    a, b = survivors
    for r in survivors:
        assert r["inner_step"] == steps and [rec["members"] for rec in r["records"]] == [3, 3, 3, 3]
    for name in a["phi"]:
        expected = (a["finalized_phi"][name] + b["finalized_phi"][name]) / 2
        assert torch.equal(a["phi"][name], expected) and torch.equal(b["phi"][name], expected), name
        assert torch.equal(a["theta"][name], expected) and torch.equal(b["theta"][name], expected), name
    assert not torch.equal(a["finalized_phi"][name], b["finalized_phi"][name])  # there was something to average
    assert a["ft"]["membership_changes"] == b["ft"]["membership_changes"] == 2  # the start, the final quorum


def test_the_divergence_measurement_is_refused_under_fault_tolerance() -> None:
    from _toy import TinyNet
    from eagerloco import DiLoCoConfig
    from eagerloco.engine.config import ConfigError
    from eagerloco.ft import FaultTolerance

    host = LighthouseHost()
    try:
        ft = FaultTolerance(host.lighthouse_addr, host.store_addr, "w0", timeout_s=10.0)
        model = TinyNet()
        with pytest.raises(ConfigError, match=r"^divergence_every=3: .*not fault tolerant; set it to 0") as info:
            ft.diloco(model, torch.optim.SGD(model.parameters(), lr=0.1), DiLoCoConfig(divergence_every=3))
        assert "\n" not in str(info.value) and ft.stats.quorums == 0  # refused before the first quorum
        ft.shutdown()
    finally:
        host.shutdown()
