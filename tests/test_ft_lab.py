"""benchmarks/ft_lab.py's pure parts: the phases, rates, detection and recovery numbers derived from the per-site
records of a fault run (synthetic records with exact expected values), reading a run directory, and pausing a
process group. No link lab, no training."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ft_lab

H, STEPS, TPS = 10, 60, 100


def times(step_s: float, sync_s: float, detect_at: int | None = None, detect_s: float = 0.0) -> list[list[float]]:
    """[[s, t(s)], ...]: each step takes step_s, a sync point sync_s more; the sync point detect_at detect_s more."""
    out, t = [], 0.0
    for s in range(1, STEPS + 1):
        t += step_s + (sync_s if s % H == 0 else 0.0) + (detect_s if s == detect_at else 0.0)
        out.append([s, t])
    return out


def membership(members: list[int], quorum_s: list[float]) -> list[dict]:
    recs, prev = [], None
    for i, (m, q) in enumerate(zip(members, quorum_s, strict=True)):
        recs.append({"inner_step": i * H, "quorum_id": i, "members": m, "rank": 0, "changed": prev not in (None, m),
                     "quorum_s": q, "dropped_in_flight": 0, "healed": False, "state_bytes": 0})  # fmt: skip
        prev = m
    return recs


def site(inner, members, quorum_s, ft=None, eval_loss=2.5, wall_s=40.0) -> dict:
    return {"inner": inner, "membership": membership(members, quorum_s), "ft": ft or {}, "eval_loss": eval_loss,
            "wall_s": wall_s}  # fmt: skip


FAULT_MEMBERS = [3, 3, 3, 2, 2, 3, 3]  # quorums at 0, 10, ..., 60: the drop at 30, the rejoin at 50
FREE_MEMBERS = [3] * 7


def fault_run() -> dict:
    q = [0.01, 0.02, 0.02, 2.5, 0.02, 0.3, 0.02]
    sites = {
        "0": site(times(0.5, 1.0, 30, 2.0), FAULT_MEMBERS, q,
                  {"failed_wait_s": 0.0, "change_quorum_s": 2.8, "dropped_on_change": 1, "dropped_by_vote": 0},
                  eval_loss=2.75),
        "1": site(times(0.25, 1.0, 30, 2.0), FAULT_MEMBERS, [x + 0.1 for x in q],
                  {"failed_wait_s": 0.5, "change_quorum_s": 3.0, "dropped_on_change": 1, "dropped_by_vote": 1}),
        "2": site([[s, 0.5 * s] for s in range(1, 26)], [3, 3, 3], [0.0, 0.0, 0.0]),
        "2r": {"inner": [[s, 0.5 * (s - 50)] for s in range(51, 61)], "membership": [],
               "ft": {"catch_up_s": 7.5, "state_bytes_received": 6_560_000, "heals": 1}, "eval_loss": 2.75},
    }  # fmt: skip
    kill = {"t_kill": 100.0, "victim_step": 25, "t_restart": 130.0, "t_joiner_log": 136.5, "t_joiner_back": 150.25}
    return {"method": "sync", "variant": "fault", "repeat": 0, "steps": STEPS, "sync_every": H,
            "tokens_per_site_step": TPS, "kill": kill, "sites": sites}  # fmt: skip


def free_run() -> dict:
    q = [0.01] * 7
    sites = {str(i): site(times(0.5, 1.0), FREE_MEMBERS, q, eval_loss=2.5) for i in range(3)}
    return {"method": "sync", "variant": "fault_free", "repeat": 0, "steps": STEPS, "sync_every": H,
            "tokens_per_site_step": TPS, "kill": {}, "sites": sites}  # fmt: skip


def test_changes_and_phases() -> None:
    assert ft_lab.changes(membership(FAULT_MEMBERS, [0.0] * 7)) == (30, 50)
    assert ft_lab.changes(membership(FREE_MEMBERS, [0.0] * 7)) == (None, None)
    assert ft_lab.changes(membership([3, 2, 2], [0.0] * 3)) == (10, None)
    assert ft_lab.phases(30, 50, 60, 10) == {"before": (0, 20), "outage": (20, 40), "rejoin": (40, 50),
                                             "after": (50, 60)}  # fmt: skip


def test_window_rate_is_tokens_over_the_window_time() -> None:
    t = ft_lab.step_times([[1, 2.0], [2, 3.0], [3, 5.0]])
    assert t[0] == 0.0
    assert ft_lab.window_rate(t, (0, 2), 100) == 200 / 3.0
    assert ft_lab.window_rate(t, (1, 3), 100) == 200 / 3.0
    assert ft_lab.window_rate(t, (2, 2), 100) is None  # empty window
    assert ft_lab.window_rate(t, (2, 4), 100) is None  # step 4 never logged
    assert ft_lab.sum_rates([1.0, None]) is None
    assert ft_lab.sum_rates([1.0, 2.5]) == 3.5


def test_derive_a_fault_run_against_its_fault_free_run() -> None:
    d = ft_lab.derive(fault_run(), free_run())
    assert "error" not in d
    assert (d["drop_step"], d["rejoin_step"]) == (30, 50)
    assert d["windows"] == {"before": [0, 20], "outage": [20, 40], "rejoin": [40, 50], "after": [50, 60]}
    # site 0: 0.5 s per step, +1 s per sync point, +2 s at the detection (step 30); site 1: 0.25 s per step.
    t0 = {20: 12.0, 40: 26.0, 50: 32.0, 60: 38.0}
    t1 = {20: 7.0, 40: 16.0, 50: 19.5, 60: 23.0}
    assert d["tps_before"] == pytest.approx(2000 / t0[20] + 2000 / t1[20], rel=1e-12)
    assert d["tps_outage"] == pytest.approx(2000 / (t0[40] - t0[20]) + 2000 / (t1[40] - t1[20]), rel=1e-12)
    assert d["tps_rejoin"] == pytest.approx(1000 / (t0[50] - t0[40]) + 1000 / (t1[50] - t1[40]), rel=1e-12)
    assert d["tps_after"] == pytest.approx(1000 / (t0[60] - t0[50]) + 1000 / (t1[60] - t1[50]), rel=1e-12)
    # the reference: the same sites over the same windows of the fault-free run (0.5 s per step, +1 s per sync)
    assert d["ref_tps_before"] == pytest.approx(2 * 2000 / 12.0, rel=1e-12)
    assert d["ref_tps_outage"] == pytest.approx(2 * 2000 / 12.0, rel=1e-12)
    assert d["ref_tps_rejoin"] == pytest.approx(2 * 1000 / 6.0, rel=1e-12)
    assert d["ratio_outage"] == d["tps_outage"] / d["tps_before"]
    assert d["ref_ratio_outage"] == pytest.approx(1.0) and d["ref_ratio_after"] == pytest.approx(1.0)
    assert d["outer_steps_at_2"] == 2
    assert d["detect_quorum_s"] == [2.5, pytest.approx(2.6)]
    assert d["failed_wait_s"] == [0.0, 0.5] and d["change_quorum_s"] == [2.8, 3.0]
    assert d["dropped"] == {"0": 1, "1": 2, "2": 0, "2r": 0}
    assert d["outage_s"] == 30.0 and d["startup_s"] == 6.5 and d["total_recovery_s"] == 20.25
    assert d["catch_up_s"] == 7.5 and d["state_bytes"] == 6_560_000 and d["heals"] == 1
    assert d["killed_at_step"] == 25 and d["joiner_first_step"] == 50
    assert d["victim_steps_trained"] == 25 + 10
    assert d["eval_loss"] == 2.75 and d["ref_eval_loss"] == 2.5 and d["eval_loss_delta"] == 0.25


def test_derive_reports_survivors_that_disagree_and_runs_without_a_change() -> None:
    run = fault_run()
    run["sites"]["1"]["membership"] = membership([3, 3, 3, 3, 2, 3, 3], [0.0] * 7)
    assert "disagree" in ft_lab.derive(run)["error"]
    run = free_run()
    run["kill"] = {}
    d = ft_lab.derive(run)
    assert d["error"].startswith("no drop/rejoin") and "windows" not in d


def test_link_ratio_of_a_fault_free_run() -> None:
    r = ft_lab.link_ratio(free_run())
    assert r["inner_step_s"] == pytest.approx(0.5) and r["sync_extra_s"] == pytest.approx(1.0)
    assert r["ratio"] == pytest.approx(1.0 / (H * 0.5))


def test_collect_site_reads_metrics_and_summary(tmp_path: Path) -> None:
    recs = [
        {"type": "membership", "worker": 0, "inner_step": 0, "members": 3, "quorum_s": 0.1, "changed": False},
        {"type": "inner", "worker": 0, "step": 1, "loss": 4.0, "time_s": 0.123456, "tokens": 3},
        {"type": "outer", "worker": 0, "inner_step": 1, "blocked_s": 0.5, "dropped": 0, "tokens": 3},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"type": "inn')
    ft = {"heals": 1, "catch_up_s": 2.0, "records": 4, "x": [1]}
    summary = {"eval_loss": 2.5, "wall_s": 9.0, "params": 10, "inner_step_time_s": 0.1,
               "per_worker": [{"final_train_loss": 3.0, "blocked_s": 1.5, "fault_tolerance": ft}]}  # fmt: skip
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    outer = {"mode": "eager", "outer_lr": 0.7, "outer_momentum": 0.5, "nesterov": True, "eager_own_weight": 0.875,
             "eager_smoothing": 0.5}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps({"outer": outer}))
    s = ft_lab.collect_site("sync", tmp_path)
    assert s["recipe"] == {"outer_lr": 0.7, "outer_momentum": 0.5, "nesterov": True, "eager_own_weight": 0.875,
                           "eager_smoothing": 0.5}  # fmt: skip
    assert s["inner"] == [[1, 0.1235]]
    assert s["membership"] == [{"inner_step": 0, "members": 3, "quorum_s": 0.1, "changed": False}]
    assert s["outer"] == [{"inner_step": 1, "blocked_s": 0.5, "dropped": 0}]
    assert s["ft"] == {"heals": 1, "catch_up_s": 2.0, "records": 4}  # lists left out
    assert (s["eval_loss"], s["wall_s"], s["blocked_s"]) == (2.5, 9.0, 1.5)
    assert ft_lab.last_step(tmp_path / "metrics.jsonl") == 1  # the torn last line is skipped


def test_recipe_label_names_each_outer_recipe() -> None:
    r = {"outer_lr": 0.7, "outer_momentum": 0.5, "nesterov": True, "eager_own_weight": 0.75}
    assert ft_lab.recipe_label(r) == "lr 0.7, Nesterov 0.5, w 0.75"
    assert ft_lab.recipe_label({**r, "eager_smoothing": 0.5}) == "lr 0.7, Nesterov 0.5, w 0.75, β 0.5"
    assert ft_lab.recipe_label({**r, "eager_smoothing": 0.0}) == "lr 0.7, Nesterov 0.5, w 0.75"
    assert ft_lab.recipe_label({**r, "outer_lr": 1.0, "eager_own_weight": None}) == "lr 1, Nesterov 0.5"
    assert ft_lab.recipe_label({**r, "nesterov": False, "eager_own_weight": None}) == "lr 0.7, momentum 0.5"
    assert ft_lab.recipe_label({**r, "outer_momentum": 0.0, "eager_own_weight": None}) == "lr 0.7, no momentum"
    assert ft_lab.recipe_label(None) == "n/a"  # a run recorded before the column: its commit tells
    run = fault_run()
    assert ft_lab.derive(run)["recipe"] == "n/a"
    run["sites"]["0"]["recipe"] = r
    assert ft_lab.derive(run)["recipe"] == "lr 0.7, Nesterov 0.5, w 0.75"


def test_pause_stops_and_continues_a_process_group_but_not_itself() -> None:
    marker = f"ftlab-pause-test-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker], start_new_session=True)

    def state(want: str) -> str:  # the process's state letter once it is `want` (a signal lands asynchronously)
        for _ in range(250):
            now = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if (now == "T") == (want == "T"):
                break
            time.sleep(0.02)
        return now

    try:
        for _ in range(100):  # wait until it has started
            if marker in Path(f"/proc/{proc.pid}/cmdline").read_text():
                break
            time.sleep(0.02)
        with ft_lab.Pause(marker) as pause:
            assert pause.pgids == [proc.pid]
            assert state("T") == "T"
        assert state("S") != "T"
        with ft_lab.Pause("") as pause:
            assert pause.pgids == []
    finally:
        proc.kill()
        proc.wait()
