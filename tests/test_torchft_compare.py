"""``benchmarks/torchft_compare.py`` (eagerloco vs torchft on the link lab) and its worker.

The pure helpers run everywhere. The smoke run needs torchft (the ``ft`` extra: ``bash scripts/setup.sh --dev`` or
``pip install torchft==0.2.0``) and network namespaces (root); it skips, saying which is missing, elsewhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import torchft_compare as tc  # noqa: E402
import torchft_worker as tw  # noqa: E402


# ---------------------------------------------------------------------------------------------------- everywhere
def test_schedule_interleaves_repeats_rates_and_variants():
    order = tc.bl.lab_schedule(["a", "b", "c"], [20.0, 8.0], repeats=2)
    assert len(order) == 12
    assert [(r, x) for r, x, _ in order[:6]] == [(0, 20.0)] * 3 + [(0, 8.0)] * 3
    assert [(r, x) for r, x, _ in order[6:]] == [(1, 8.0)] * 3 + [(1, 20.0)] * 3  # rates reversed
    assert [v for *_, v in order[:6]] == ["a", "b", "c", "b", "c", "a"]  # rotated per (repeat, rate)
    assert sorted(v for *_, v in order) == sorted(["a", "b", "c"] * 4)


def test_syncs_per_run_counts_fragment_syncs():
    assert tc.syncs_per_run("sync", 120, 30) == 4
    assert tc.syncs_per_run("eager", 120, 30) == 4
    assert tc.syncs_per_run("streaming", 120, 30) == 8


def test_variants_use_the_same_flags_as_eagerloco_methods():
    import benchlib as bl

    for library, method in tc.VARIANTS.values():
        assert method in bl.METHODS and library in ("eagerloco", "torchft")
    assert tc.VARIANTS["torchft_streaming"][1] == "streaming"  # P=2, τ=1, α=0.5 like eagerloco's streaming


def _replica(r: int, *, blocked: float, wall: float) -> dict:
    syncs = [
        {"quorum_s": 0.5, "wait_s": 1.0, "commit_s": 0.01, "outer_s": 1.6, "step": 30},  # first: builds the PG
        {"quorum_s": 0.02, "wait_s": 1.0, "commit_s": 0.01, "outer_s": 1.1, "step": 60},
    ]
    return {
        "replica": r, "wall_s": wall, "tokens_this_replica": 1000, "manager_step": 2, "utilization": 0.8,
        "blocked_s": blocked, "quorum_s": 0.52, "wait_s": 2.0, "commit_s": 0.02, "inner_step_time_s": 0.1,
        "payload_bytes": 800, "allreduces": 20, "ns_tx_bytes": 900 + r, "ns_rx_bytes": 900, "eval_loss": 3.5,
        "final_train_loss": 3.4, "init_params_hash": "x", "final_params_hash": "y", "params": 200,
        "sync_every": 30, "driver_wall_s": 20.0, "syncs": syncs,
    }  # fmt: skip


def test_record_torchft_combines_replicas():
    rec = tc.record_torchft("torchft_diloco", 8.0, 0, 60, [_replica(0, blocked=2.0, wall=10.0),
                                                         _replica(1, blocked=3.0, wall=12.5)])  # fmt: skip
    assert rec["tokens"] == 2000 and rec["tokens_per_s"] == pytest.approx(2000 / 12.5)
    assert rec["blocked_s"] == pytest.approx(2.5) and rec["blocked_per_sync_s"] == pytest.approx(1.25)
    assert rec["first_quorum_s"] == pytest.approx(0.5) and rec["quorum_per_sync_s"] == pytest.approx(0.02)
    assert rec["init_params_identical"] and rec["final_params_identical"]
    assert rec["ns_tx_bytes"] == [900, 901]
    rows = tc.aggregate([rec, {**rec, "repeat": 1, "cu_run": 0.6, "eval_loss": 3.7}], ["torchft_diloco"])
    assert len(rows) == 1 and rows[0]["n"] == 2
    assert rows[0]["cu_run"] == pytest.approx(0.7) and rows[0]["cu_run_min"] == 0.6
    assert rows[0]["ns_tx_mb"] == pytest.approx(900.5e-6)


def test_report_renders_both_tables():
    rec = tc.record_torchft("torchft_streaming", 20.0, 0, 60, [_replica(0, blocked=1, wall=9),
                                                              _replica(1, blocked=1, wall=9)])  # fmt: skip
    payload = {"runs": [rec], "variants": ["torchft_streaming"], "steps": 60, "sync_every": 30, "repeats": 1,
               "command": "x", "machine": {"date_utc": "d", "cpu": "c", "cores": 2, "mem_gib": 1, "kernel": "k",
               "python": "p", "torch": "t", "loadavg_at_start": (0.0,), "note": "n"}}  # fmt: skip
    text = tc.report(payload)
    assert "torchft streaming" in text and "first quorum s" in text and "bitwise identical" in text


def test_driver_exits_2_with_the_install_command_without_torchft(monkeypatch, capsys):
    monkeypatch.setattr(tc.importlib.util, "find_spec", lambda name: None)
    assert tc.main(["--smoke"]) == 2
    assert "pip install torchft==0.2.0" in capsys.readouterr().err


def test_param_group_shares_parameters_and_keeps_the_split():
    from eagerloco.engine.fragments import build_fragments
    from eagerloco.lm.model import GPT, GPTConfig

    model = GPT(GPTConfig(n_layer=2, n_head=2, d_model=16, seq_len=8), seed=0)
    frags = build_fragments(model, 2, 30, "strided")
    groups = [tw.ParamGroup(f.names, f.params) for f in frags]
    ids = [{id(p) for p in g.parameters()} for g in groups]
    assert ids[0].isdisjoint(ids[1])
    assert ids[0] | ids[1] == {id(p) for p in model.parameters()}  # tied head counted once
    with torch.no_grad():
        next(groups[1].parameters()).add_(1.0)  # writes through to the model
    assert tw.params_hash(model) != tw.params_hash(GPT(GPTConfig(n_layer=2, n_head=2, d_model=16, seq_len=8), seed=0))


def test_instrument_times_the_managers_blocking_calls():
    class FakeWork:
        def wait(self):
            return True

        def get_future(self):
            return "fut"

    class FakeManager:
        def start_quorum(self):
            pass

        def should_commit(self):
            return True

        def allreduce(self, tensor, should_quantize=False):
            return FakeWork()

    m, timers = FakeManager(), tw.Timers()
    tw.instrument(m, timers)
    m.start_quorum()
    work = m.allreduce(torch.zeros(10), should_quantize=False)
    assert work.wait() is True and work.get_future() == "fut"
    assert m.should_commit() is True
    assert timers.payload_bytes == 40 and timers.allreduces == 1
    assert timers.blocked_s == pytest.approx(timers.quorum_s + timers.wait_s + timers.commit_s)


# ---------------------------------------------------------------------------------------------------- the smoke run
@pytest.mark.slow
@pytest.mark.netns
def test_torchft_compare_smoke(tmp_path):
    pytest.importorskip("torchft", reason=f"torchft is not installed (the ft extra): {tc.INSTALL}")
    from netlab import netns_available

    ok, why = netns_available()
    if not ok:
        pytest.skip(why)
    variants = ["eagerloco_sync", "torchft_diloco", "torchft_streaming"]
    proc = subprocess.run(
        [sys.executable, str(BENCH / "torchft_compare.py"), "--smoke", "--variants", *variants,
         "--out", str(tmp_path), "--runs-dir", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((tmp_path / "torchft_compare.json").read_text())
    runs = {r["variant"]: r for r in payload["runs"]}
    assert set(runs) == set(variants)
    for r in runs.values():
        assert r["tokens"] == 12 * 4 * 32 * 2 and 0 < r["eval_loss"] < 5.545 and 0 < r["cu_run"] <= 1
        assert min(r["ns_tx_bytes"]) > 0
    for v in ("torchft_diloco", "torchft_streaming"):
        assert runs[v]["init_params_identical"] and runs[v]["final_params_identical"]
        assert runs[v]["syncs"] == tc.syncs_per_run(runs[v]["method"], 12, 6)
    # The same model, data, optimizers and schedule: torchft's DiLoCo is eagerloco's sync to the last bit.
    assert runs["torchft_diloco"]["eval_loss"] == runs["eagerloco_sync"]["eval_loss"]
    assert "torchft DiLoCo" in (tmp_path / "torchft_compare.md").read_text()
