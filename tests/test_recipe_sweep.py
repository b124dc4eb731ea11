"""The recipe-study driver (benchmarks/recipe_sweep.py): keys and flags, the plans' order, resume (finished
points skipped, failed ones retried once per invocation), the lock, the exact tables, and a seconds-long run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import recipe_sweep as rs  # noqa: E402


def write(out: Path, point: rs.Point, status: str = "ok", loss: float | None = 2.0) -> None:
    rec = {"point": point.to_dict(), "key": point.key, "status": status, "eval_loss": loss,
           "source": {"commit": "abcdef0123456789"}}  # fmt: skip
    rs.atomic_write_json(out / "runs" / f"{point.key}.json", rec)


def test_point_key_and_train_flags(tmp_path):
    p = rs.Point("eager", 0.7, 0.9, True)
    assert p.key == "eager_M2_T900_lr0.7_m0.9n_s0"
    assert p.train_args() == [
        "--mode", "eager", "--delay", "1", "--launch", "simulated", "--link-mbit", "0", "--threads", "1",
        "--workers", "2", "--steps", "900", "--seed", "0", "--outer-lr", "0.7", "--outer-momentum", "0.9",
        "--nesterov", "--eager-own-weight", "0.5", "--lr", "0.003",
    ]  # fmt: skip
    # the paper's rule said explicitly (the CLI's own eager default is an own weight): 1/M where exact, else "1/M"
    assert [rs.paper_rule(m) for m in (1, 2, 3, 4, 8)] == ["1", "0.5", "1/M", "0.25", "0.125"]
    assert "--eager-own-weight" not in rs.Point("sync", 1.0, 0.5, True).train_args()
    q = rs.Point("sync", 1.0, 0.0, True, seed=2, workers=4, steps=600, own_weight=1.0)
    assert q.key == "sync_w1_M4_T600_lr1_m0_s2"  # Nesterov means nothing without momentum
    assert q.train_args()[-5:] == ["--no-nesterov", "--eager-own-weight", "1", "--lr", "0.003"]
    h = rs.Point("streaming", 1.4, 0.9, False, extra=("--sync-every", "10"))
    assert h.key.startswith("streaming_M2_T900_lr1.4_m0.9_s0_x") and len(h.key.split("_x")[1]) == 8
    assert h.train_args()[-5:] == ["--no-nesterov", "--lr", "0.003", "--sync-every", "10"]
    # the study's inner lr (the CLI's default when its results were run) unless the point sets one itself
    lr6 = rs.Point("sync", 0.7, 0.5, True, extra=("--lr=0.006",))
    assert lr6.train_args()[-2:] == ["--nesterov", "--lr=0.006"] and lr6.key.startswith("sync_M2_T900_lr0.7_m0.5n_s0_x")
    assert rs.Point.from_dict(json.loads(json.dumps(h.to_dict()))) == h
    # Mid-run evaluations leave training unchanged: a point with --eval-every is in the same panel (not the same run)
    e = rs.Point("streaming", 1.4, 0.9, False, extra=("--eval-every", "90", "--sync-every", "10"))
    assert e.group == h.group and e.key != h.key
    assert rs.Point("sync", 1.0, 0.5, True, extra=("--eval-every=90",)).group == rs.Point("sync", 1.0, 0.5, True).group
    # eager's smoothing β (ALGORITHMS.md 4.4): in the key after the own weight, passed to the CLI, its own panel
    b = rs.Point("eager", 0.7, 0.5, True, own_weight=0.875, smoothing=0.5)
    assert b.key == "eager_w0.875_b0.5_M2_T900_lr0.7_m0.5n_s0"
    assert b.train_args()[-6:] == ["--eager-own-weight", "0.875", "--eager-smoothing", "0.5", "--lr", "0.003"]
    assert b.group != rs.Point("eager", 0.7, 0.5, True, own_weight=0.875).group
    assert rs.Point.from_dict(json.loads(json.dumps(b.to_dict()))) == b
    assert rs.label(b.group) == "eager k=1, own weight w=0.875, smoothing β=0.5 (M=2, 900 steps)"
    # an engine with smoothing: an eager point without one says β = 0 (the CLI's eager default smooths); sync not
    plain = rs.Point("eager", 0.7, 0.5, True, own_weight=0.75)
    assert "--eager-smoothing" not in plain.train_args()  # engines before smoothing have no such flag
    assert plain.train_args(engine_smoothing=True)[-4:] == ["--eager-smoothing", "0", "--lr", "0.003"]
    assert b.train_args(engine_smoothing=True) == b.train_args()
    assert "--eager-smoothing" not in rs.Point("sync", 1.0, 0.5, True).train_args(engine_smoothing=True)
    assert rs.engine_has_smoothing(None)  # this checkout
    assert not rs.engine_has_smoothing(tmp_path)  # no engine there


def test_main_plan_order_and_seed_stage(tmp_path):
    points = rs.plan_points("main", {})
    assert len(points) == 24 + 36 + 20
    keys = [p.key for _, p in points]
    assert len(set(keys)) == len(keys)
    assert keys[:4] == ["sync_M2_T900_lr0.7_m0.9n_s0", "eager_M2_T900_lr0.7_m0.9n_s0",
                        "sync_M2_T900_lr1_m0_s0", "eager_M2_T900_lr1_m0_s0"]  # fmt: skip
    assert {p.method for s, p in points if s.startswith("1")} == {"sync", "eager"}
    assert [p.key for s, p in points if s.startswith("3")][:2] == ["sync_M2_T900_lr0.7_m0.9_s0",
                                                                    "sync_M2_T900_lr0.4_m0.9_s0"]  # fmt: skip
    # sync's 16 points finished (one diverged, the best at lr 1.0 without momentum): its seeds follow
    for i, (_, p) in enumerate(x for x in points if x[1].method == "sync"):
        loss = 1.5 if p.recipe == (1.0, 0.0, False) else 2.0 + i / 100
        write(tmp_path, p, "diverged" if i == 3 else "ok", None if i == 3 else loss)
    results = rs.load_results(tmp_path)
    seeds = [(s, p) for s, p in rs.plan_points("main", results) if s.startswith("4")]
    assert [p.key for _, p in seeds] == ["sync_M2_T900_lr1_m0_s1", "sync_M2_T900_lr1_m0_s2"]
    # one sync point missing again: no seeds yet
    (tmp_path / "runs" / "sync_M2_T900_lr1.4_m0.9n_s0.json").unlink()
    assert not [s for s, _ in rs.plan_points("main", rs.load_results(tmp_path)) if s.startswith("4")]


def test_variant_plan_interleaves_m4():
    points = [p for _, p in rs.plan_points("variant", {})]
    assert len(points) == 12 * 4
    assert points[0].key == "eager_w1_M2_T900_lr0.7_m0.9n_s0"
    assert [p.key for p in points[12:14]] == ["sync_M4_T600_lr0.7_m0.9n_s0", "eager_w1_M4_T600_lr0.7_m0.9n_s0"]
    assert points[-1].key == "eager_M4_T600_lr1.4_m0.9n_s0"


def custom_args(**kw):
    args = rs.argparse.Namespace(methods=["sync", "eager"], lrs=[0.4, 0.7], momenta=[0.0, 0.9], seeds=[0],
                                 workers=2, steps=10, own_weight=None, smoothing=None, heavy_ball=False,
                                 extra_args=[])  # fmt: skip
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_sweep_resumes_skips_finished_and_retries_failed_once(tmp_path):
    args = custom_args()
    calls: list[str] = []
    outcome = {"sync_M2_T10_lr0.7_m0_s0": "failed", "eager_M2_T10_lr0.7_m0.9n_s0": "diverged"}

    def runner(point, out):
        calls.append(point.key)
        status = outcome.get(point.key, "ok")
        return {"status": status, "eval_loss": 2.5 if status == "ok" else None}

    order = [p.key for _, p in rs.plan_points("custom", {}, args)]
    assert order == ["sync_M2_T10_lr0.4_m0_s0", "eager_M2_T10_lr0.4_m0_s0", "sync_M2_T10_lr0.4_m0.9n_s0",
                     "eager_M2_T10_lr0.4_m0.9n_s0", "sync_M2_T10_lr0.7_m0_s0", "eager_M2_T10_lr0.7_m0_s0",
                     "sync_M2_T10_lr0.7_m0.9n_s0", "eager_M2_T10_lr0.7_m0.9n_s0"]  # fmt: skip
    ran = rs.sweep("custom", tmp_path, runner, args=args, log=lambda s: None, max_runs=3)
    assert ran == calls == order[:3]
    ran = rs.sweep("custom", tmp_path, runner, args=args, log=lambda s: None)
    assert ran == order[3:]  # resumed after the third; the failed one tried once, not again in this call
    assert calls == order
    calls.clear()
    ran = rs.sweep("custom", tmp_path, runner, args=args, log=lambda s: None)
    assert ran == calls == ["sync_M2_T10_lr0.7_m0_s0"]  # a new invocation retries the failed point only
    outcome.clear()
    calls.clear()
    assert rs.sweep("custom", tmp_path, runner, args=args, log=lambda s: None) == ["sync_M2_T10_lr0.7_m0_s0"]
    assert rs.sweep("custom", tmp_path, runner, args=args, log=lambda s: None) == []
    recs = rs.load_results(tmp_path)
    assert {k: r["status"] for k, r in recs.items() if r["status"] != "ok"} == {
        "eager_M2_T10_lr0.7_m0.9n_s0": "diverged"}  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(f"{k}.json" for k in order)
    assert (tmp_path / "recipe_sweep.md").exists()


def test_report_tables_exact(tmp_path):
    for p, status, loss in [
        (rs.Point("sync", 0.7, 0.9, True), "ok", 1.716),
        (rs.Point("sync", 1.0, 0.0, False), "ok", 1.661),
        (rs.Point("sync", 1.0, 0.0, False, seed=1), "ok", 1.671),
        (rs.Point("sync", 1.0, 0.0, False, seed=2), "ok", 1.681),
        (rs.Point("sync", 0.4, 0.9, False), "ok", 1.8),
        (rs.Point("eager", 0.7, 0.9, True), "ok", 1.923),
        (rs.Point("eager", 1.4, 0.9, True), "diverged", None),
        (rs.Point("eager", 0.7, 0.5, True), "failed", None),
    ]:
        write(tmp_path, p, status, loss)
    text = rs.report(tmp_path)
    assert "PARTIAL unless stated otherwise: 7 runs finished (1 diverged), 1 failed (to be retried)." in text
    assert "from commit(s) abcdef0123." in text
    assert "Plans: main 5 of 80 points finished; variant 0 of 48 points finished" in text
    best = """\
| method | best recipe so far | eval loss seed 0 | vs DiLoCo | mean over seeds | seeds | runs |
|---|---|---|---|---|---|---|
| DiLoCo (sync) (M=2, 900 steps) | lr 1, momentum 0 | 1.661 | +0.0 % | 1.671 | 0, 1, 2 | 5 |
| eager k=1 (M=2, 900 steps) | lr 0.7, momentum 0.9 (Nesterov) | 1.923 | +15.8 % | 1.923 | 0 | 2 |
"""
    assert best in text
    diloco = """\
| method | eval loss |
|---|---|
| DiLoCo (sync) (M=2, 900 steps) | 1.716 |
| eager k=1 (M=2, 900 steps) | 1.923 |
"""
    assert diloco in text
    sync_grid = """\
### DiLoCo (sync) (M=2, 900 steps)

| outer lr | momentum 0 | momentum 0.5 Nesterov | momentum 0.9 Nesterov | momentum 0.9 heavy ball |
|---|---|---|---|---|
| 0.4 | · | · | · | 1.800 |
| 0.7 | · | · | 1.716 | · |
| 1 | 1.661 (mean 1.671, 3 seeds) | · | · | · |
| 1.4 | · | · | · | · |
"""
    assert sync_grid in text
    assert "| 1.4 | · | · | diverged | · |" in text  # eager's; the failed point is not shown as finished
    assert "| 0.7 | · | · | 1.923 | · |" in text


def test_lock_is_exclusive(tmp_path, capsys):
    lock = tmp_path / "sweep.lock"
    with rs.SweepLock(lock, wait=False), pytest.raises(SystemExit) as held:
        rs.SweepLock(lock, wait=False).__enter__()
    assert held.value.code == 3  # as documented: a second sweep on the same lock exits 3
    assert re.search(r"another sweep holds .*sweep.lock .*--wait", capsys.readouterr().err)
    assert lock.read_text().strip().isdigit()  # the holder's pid
    with rs.SweepLock(lock, wait=False):  # released on exit
        pass


def test_smoke_run_then_resume_runs_nothing(tmp_path):
    """Two real seconds-long training runs through the CLI, then the same command again: nothing runs."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "recipe_sweep.py"), "--plan", "custom", "--smoke",
           "--methods", "sync", "eager", "--lrs", "0.7", "--momenta", "0.9", "--steps", "6", "--out",
           str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs"), "--lock", str(tmp_path / "lock"),
           "--no-plot"]  # fmt: skip
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert first.returncode == 0, first.stdout + first.stderr
    recs = rs.load_results(tmp_path / "out")
    assert sorted(recs) == [rs.Point(m, 0.7, 0.9, True, steps=6, extra=rs.SMOKE_EXTRA).key for m in ("eager", "sync")]
    assert {r["status"] for r in recs.values()} == {"ok"}
    for r in recs.values():
        assert r["outer_steps"] == 2 and r["tokens"] == 6 * 4 * 32 * 2 and r["eval_loss"] > 0
        assert r["train_args"][:2] == ["--mode", r["point"]["method"]]
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "runs").iterdir()}
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "0 runs this time" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "runs").iterdir()} == mtimes
    table = (tmp_path / "out" / "recipe_sweep.md").read_text()
    assert "2 runs finished (0 diverged)" in table


def test_trends_plan_runs_each_method_at_its_measured_recipe_then_reports(tmp_path):
    points = rs.plan_points("trends", {})
    assert len(points) == 4 * 3 * len(rs.TREND_POINTS)  # 4 methods x seeds 0, 1, 2
    assert points[0][0] == "T1: trends, seed 0: tokens: 300 steps"
    assert [p.key for _, p in points[:4]] == [
        "sync_M2_T300_lr1_m0.5n_s0", "eager_M2_T300_lr1_m0_s0", "eager_w0.75_M2_T300_lr0.7_m0.5n_s0",
        "eager_w0.875_b0.5_M2_T300_lr0.7_m0.5n_s0",
    ]  # fmt: skip
    assert points[3][1].train_args()[-6:] == [
        "--eager-own-weight",
        "0.875",
        "--eager-smoothing",
        "0.5",
        "--lr",
        "0.003",
    ]
    m8 = next(p for s, p in points if s.endswith("M = 8, 115k parameters"))
    assert (m8.workers, m8.steps, m8.extra) == (8, 900, rs.SMALL_MODEL)
    assert m8.train_args()[-6:] == list(rs.SMALL_MODEL)
    m4 = next(p for s, p in points if s.endswith("M = 4, 600 steps"))
    assert m4.key == "sync_M4_T600_lr1_m0.5n_s0"  # the study's M = 4 runs
    over = next(p for s, p in points if "overtrained" in s)
    assert over.steps * 16 * 128 * 2 / 115_008 >= 100  # tokens per parameter
    n = 4 * len(rs.TREND_POINTS)  # the points of one seed
    assert [s.split(":")[0] for s, _ in points] == ["T1"] * n + ["T2"] * 2 * n
    assert [p.seed for _, p in points[n:]] == [1] * n + [2] * n
    m4_large = next(p for s, p in points if s.endswith("M = 4, 600 steps, 2.7M parameters"))
    assert m4_large.key == "sync_M4_T600_lr1_m0.5n_s0_x342e31e1"  # the 2.7M model's key, at M = 4
    # the default job at each recipe, and trend results: 300 steps for sync and eager (eager with two seeds),
    # H = 10 for sync (a point with its own flags: out of the grid tables)
    default = rs.trend_recipes()
    h10 = next(p for s, p in points if s.endswith("H = 10"))
    runs = [(default[0], 1.630), (default[1], 1.704), (points[0][1], 2.0), (points[1][1], 2.2),
            (rs.dataclasses.replace(points[1][1], seed=1), 2.4), (h10, 1.9), (default[3], 1.659)]  # fmt: skip
    for p, loss in runs:
        write(tmp_path, p, "ok", loss)
    text = rs.report(tmp_path)
    assert "| DiLoCo (sync) (M=2, 900 steps, --sync-every 10)" not in text  # H = 10 stays out of the grids
    assert (
        "| axis | point | DiLoCo (sync) (lr 1, momentum 0.5 (Nesterov)) | eager k=1 (lr 1, momentum 0) "
        "| eager k=1, w=0.75 (lr 0.7, momentum 0.5 (Nesterov)) | eager k=1, w=0.875, β=0.5 (lr 0.7, momentum 0.5 "
        "(Nesterov)) | eager k=1 vs DiLoCo | eager k=1, w=0.75 vs DiLoCo | eager k=1, w=0.875, β=0.5 vs DiLoCo |"
    ) in text
    assert (
        "| default | 900 steps, H = 30, M = 2, 820k parameters, iid | 1.630 | 1.704 | · | 1.659 | +4.5 % | - | +1.8 % |"
        in text
    )
    assert "| tokens | 300 steps | 2.000 | 2.300 ±0.100 (2 seeds) | · | · | +15.0 % | - | - |" in text
    assert "| H | H = 10 | 1.900 | · | · | · | - | - | - |" in text
    # a trend point whose group also has another recipe run (the w = 0.75 of M = 8 at lr 1 / no momentum) stays in
    # the grids with it, and the best of the two is the trend's point
    m8 = next(p for s, p in points if s.endswith("M = 8, 115k parameters") and p.own_weight == 0.75)
    write(tmp_path, m8, "ok", 1.85)
    write(tmp_path, rs.dataclasses.replace(m8, outer_lr=1.0, outer_momentum=0.0, nesterov=False), "ok", 1.89)
    text = rs.report(tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("| eager k=1, own weight w=0.75 (M=8, 900 steps"))
    assert "| lr 0.7, momentum 0.5 (Nesterov) | 1.850 |" in row and row.endswith("| 1.850 | 0 | 2 |")
    assert rs.plot_trends(rs.load_results(tmp_path), tmp_path / "t.png") == tmp_path / "t.png"


def test_lookahead_plan_only_where_momentum_makes_it_differ():
    points = [p for _, p in rs.plan_points("lookahead", {})]
    assert len(points) == 3 * 8 and all(p.outer_momentum > 0 and p.extra == rs.LOOKAHEAD for p in points)
    assert points[0].train_args()[-3:] == ["--lr", "0.003", "--eager-lookahead"]
    assert points[0].key.startswith("eager_M2_T900_lr0.7_m0.9n")
    assert {p.own_weight for p in points[8:16]} == {1.0} and {(p.workers, p.steps) for p in points[16:]} == {(4, 600)}


def test_lookahead_plan_runs_only_with_src(tmp_path, capsys):
    """The variant was removed from the library (ALGORITHMS.md 4.2): the plan trains only a checkout that has it."""
    lock = tmp_path / "lock"
    assert rs.main(["--plan", "lookahead", "--out", str(tmp_path / "out"), "--lock", str(lock)]) == 2
    assert capsys.readouterr().err == (
        "recipe_sweep: plan 'lookahead' needs --src of a checkout at c512a86: eager_lookahead was removed from the "
        "library after this measurement (ALGORITHMS.md 4.2)\n"
    )
    assert not lock.exists() and not (tmp_path / "out").exists()  # refused before the lock and any run
    assert rs.main(["--plan", "lookahead", "--out", str(tmp_path / "out"), "--list"]) == 0  # listing needs no --src
    assert capsys.readouterr().out.count("pending") == 3 * 8


def test_group_label_names_the_run_s_tau_and_its_other_extras():
    assert rs.label(("sync", None, None, 2, 900, ())) == "DiLoCo (sync) (M=2, 900 steps)"
    assert rs.label(("streaming", None, None, 2, 900, ("--overlap-steps", "14"))) == (
        "streaming, P=2, τ=14, α=0.5 (M=2, 900 steps)"
    )
    assert rs.label(("streaming", None, None, 2, 900, ("--overlap-steps", "5", "--sync-every", "10"))) == (
        "streaming, P=2, τ=5, α=0.5 (M=2, 900 steps, --sync-every 10)"
    )
    assert rs.label(("eager", 0.75, None, 4, 600, ("--overlap-steps", "5"))) == (  # only streaming's name carries τ
        "eager k=1, own weight w=0.75 (M=4, 600 steps, --overlap-steps 5)"
    )


def test_the_lr_plot_has_a_panel_per_grid_of_three_or_more_seed_0_points(tmp_path):
    """A method group is a panel when it has >= 3 (lr, momentum) points at seed 0: two points, other seeds and failed
    runs do not make one; a diverged point stays in its grid (the plot draws it on the panel's top edge)."""
    sync = [rs.Point("sync", lr, 0.5, True) for lr in (0.4, 0.7, 1.0)]
    for p, loss in zip(sync, (1.72, 1.63, 1.63)):
        write(tmp_path, p, "ok", loss)
    write(tmp_path, rs.Point("eager", 1.0, 0.0, False), "ok", 1.70)
    write(tmp_path, rs.Point("eager", 0.7, 0.9, True), "ok", 5.1)  # diverged
    write(tmp_path, rs.Point("eager", 0.4, 0.9, True, seed=1), "ok", 1.8)  # seed 1: not in the plot
    write(tmp_path, rs.Point("eager", 0.4, 0.5, True), "failed", None)
    grids = rs.lr_grids(rs.load_results(tmp_path))
    assert list(grids) == [sync[0].group] and sorted(r["eval_loss"] for r in grids[sync[0].group]) == [1.63, 1.63, 1.72]
    write(tmp_path, rs.Point("eager", 0.4, 0.5, True), "ok", 1.76)  # the third eager point: now a grid
    assert len(rs.lr_grids(rs.load_results(tmp_path))) == 2
    assert rs.plot(tmp_path, tmp_path / "p.png") == tmp_path / "p.png"
    assert rs.plot(tmp_path / "empty", tmp_path / "q.png") is None  # nothing finished: no figure


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--own-weight", "0.2", "--methods", "eager", "--workers", "4"],
         "--own-weight 0.2: must be in [1/M, 1] = [0.25, 1] for --workers 4 (ALGORITHMS.md 4.1)"),
        (["--own-weight", "1.5", "--methods", "eager"], "--own-weight 1.5: must be in [1/M, 1] = [0.5, 1]"),
        (["--smoothing", "-0.5", "--methods", "eager"], "--smoothing -0.5: must be in [0, 1] (ALGORITHMS.md 4.4)"),
        (["--smoothing", "nan", "--methods", "eager"], "--smoothing nan: must be in [0, 1]"),
        (["--smoothing", "0.5", "--methods", "eager", "sync"], "--smoothing 0.5 is eager's; --methods sync are not"),
        (["--own-weight", "0.75"], "--own-weight 0.75 is eager's; --methods sync are not eager methods"),
        (["--lrs", "0.7", "0", "--methods", "sync"], "--lrs 0: every outer learning rate must be finite and > 0"),
        (["--momenta", "1", "--methods", "sync"], "--momenta 1: every outer momentum must be in [0, 1)"),
        (["--workers", "0", "--methods", "sync"], "--workers 0: must be >= 1"),
    ],
)  # fmt: skip
def test_custom_plan_refuses_bad_values_in_one_line_before_anything(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        rs.main(["--plan", "custom", "--out", str(out), "--lock", str(tmp_path / "lock"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err
    assert not out.exists() and not (tmp_path / "lock").exists()  # nothing was created


def test_own_weight_outside_the_custom_plan_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        rs.main(["--plan", "main", "--own-weight", "0.75", "--out", str(tmp_path / "o"), "--lock", str(tmp_path / "l")])
    assert (
        "--own-weight 0.75: only the custom plan takes it (--plan custom), not --plan main" in capsys.readouterr().err
    )


def test_tuned_gaps_pair_seeds_and_read_tokens_per_parameter(tmp_path):
    sync, eager = rs.tuned_pair(rs.TunedPoint("820k", 2, 5400, 0.85, 0.85))
    assert (sync.key, eager.key) == ("sync_M2_T5400_lr0.85_m0.5n_s0", "eager_w0.875_b0.5_M2_T5400_lr0.85_m0.5n_s0")
    assert eager.train_args()[-6:] == ["--eager-own-weight", "0.875", "--eager-smoothing", "0.5", "--lr", "0.003"]
    small = rs.tuned_pair(rs.TunedPoint("115k", 4, 600, 1.0, 0.85))[0]
    assert small.key == "sync_M4_T600_lr1_m0.5n_s0_x57380869"  # the 115k model's runs of the study
    sync10, h10 = rs.tuned_pair(rs.TunedPoint("820k", 2, 900, 0.7, 0.7, sync_every=10))
    assert h10.key == "eager_w0.875_b0.5_M2_T900_lr0.7_m0.5n_s0_x2e8516e6"  # the trends' H = 10 runs
    assert h10.train_args()[-2:] == ["--sync-every", "10"]
    # at H = 100 the CLI's eager is the own weight 0.875 without smoothing: the pair is the runs of that recipe, and
    # DiLoCo's at its best lr there (0.85 with 2 workers, 1 with 4)
    h100 = [[run.key for run in rs.tuned_pair(p)] for p in rs.TUNED_POINTS if p.sync_every == 100]
    assert h100 == [
        ["sync_M2_T900_lr0.85_m0.5n_s0_x1388726d", "eager_w0.875_M2_T900_lr0.85_m0.5n_s0_x1388726d"],
        ["sync_M4_T600_lr1_m0.5n_s0_x1388726d", "eager_w0.875_M4_T600_lr0.85_m0.5n_s0_x1388726d"],
    ]
    assert rs.tuned_gap_rows({}) == [] and rs.tuned_gaps_report({}) == []
    assert rs.plot_tuned_gaps({}, tmp_path / "g.png") is None
    # seeds 0 and 1 for both, seed 2 for sync only: the gap is read over the seeds both have
    seed = rs.dataclasses.replace
    runs = [
        (sync, 1.30),
        (eager, 1.313),
        (seed(sync, seed=1), 1.32),
        (seed(eager, seed=1), 1.32),
        (seed(sync, seed=2), 1.0),
    ]
    for p, loss in runs:
        write(tmp_path, p, "ok", loss)
    results = rs.load_results(tmp_path)
    (row,) = rs.tuned_gap_rows(results)
    assert row["seeds"] == [0, 1]
    assert row["tokens_per_param"] == 5400 * 2 * 2048 / 820_352
    assert row["sync"] == pytest.approx(1.31) and row["eager"] == pytest.approx(1.3165)
    assert row["gap_pct_per_seed"] == pytest.approx([1.0, 0.0])
    line = "| 820k | 2 | 30 | 5,400 | 27.0 | 1.3100 (lr 0.85) | 1.3165 (lr 0.85, w = 0.875, β = 0.5) | 0, 1 | "
    line += "+0.50 % | +1.00 / +0.00 |"
    assert line in rs.report(tmp_path)
    # a point at H = 10 (a TUNED_POINTS entry): its own row, read apart from H = 30's; the plot draws it hollow
    write(tmp_path, sync10, "ok", 1.60)
    write(tmp_path, h10, "ok", 1.64)
    rows = rs.tuned_gap_rows(rs.load_results(tmp_path))
    assert [(r["sync_every"], r["steps"]) for r in rows] == [(30, 5400), (10, 900)]
    line = "| 820k | 2 | 10 | 900 | 4.5 | 1.6000 (lr 0.7) | 1.6400 (lr 0.7, w = 0.875, β = 0.5) | 0 | +2.50 % | +2.50 |"
    assert line in rs.report(tmp_path)
    assert rs.plot_tuned_gaps(rs.load_results(tmp_path), tmp_path / "g.png") == tmp_path / "g.png"
    # the default job: each method at its best Nesterov momentum there too (0.6 for both with 2 workers), named in
    # its cell where it is not 0.5
    (job,) = [p for p in rs.TUNED_POINTS if (p.model, p.workers, p.steps, p.sync_every) == ("820k", 2, 900, 30)]
    sync_job, eager_job = rs.tuned_pair(job)
    assert (sync_job.key, eager_job.key) == ("sync_M2_T900_lr0.8_m0.6n_s0", "eager_w0.875_b0.5_M2_T900_lr0.68_m0.6n_s0")
    write(tmp_path, sync_job, "ok", 1.60)
    write(tmp_path, eager_job, "ok", 1.62)
    line = "| 820k | 2 | 30 | 900 | 4.5 | 1.6000 (lr 0.8, N 0.6) | 1.6200 (lr 0.68, N 0.6, w = 0.875, β = 0.5) | 0 | "
    assert line + "+1.25 % | +1.25 |" in rs.report(tmp_path)
