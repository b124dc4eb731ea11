"""``--overlap-steps auto`` (eagerloco.lm.auto_overlap): τ sized to the run's link before the first inner step.

The choice is the simulator's (exact on given measurements), the measurement leaves the run bitwise as it would be
with that τ given, every worker agrees, the resolved τ is what config.json, the checkpoints and a resume hold, and
"auto" is refused where it has no meaning."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from eagerloco import configs
from eagerloco.cli.main import EXIT_USAGE
from eagerloco.cli.main import main as cli
from eagerloco.engine.config import ConfigError
from eagerloco.lm.auto_overlap import OverlapAuto, choose, time_inner_step
from eagerloco.lm.config import TrainConfig, apply_overrides
from eagerloco.lm.model import GPT, GPTConfig
from eagerloco.simulator import LinkSpec, ModelSpec, mode_method, smallest_hiding_overlap

SMOKE = str(configs.path("smoke"))
N, LAYERS, STEP = 820_000, 4, 0.2


def pick(probe_s: float, *, workers: int = 2, fragments: int = 1, codec: str = "none") -> tuple:
    """(τ, link Mbit/s, predicted CU, hides) for the 820k model, a 0.2 s step, H = 30."""
    return choose(params=N, layers=LAYERS, step_time_s=STEP, probe_s=probe_s, workers=workers, sync_every=30,
                  num_fragments=fragments, compression=codec, layout="strided")  # fmt: skip


# ------------------------------------------------------------------------------------------------ the choice
@pytest.mark.parametrize(
    ("probe", "workers", "fragments", "codec", "tau"),
    [
        (1e-6, 2, 1, "none", 1),  # no link to hide
        (5 * STEP, 2, 1, "none", 5),  # the all-reduce takes 5 steps: τ = 5 hides it exactly
        (10 * STEP, 2, 1, "none", 10),
        (5 * STEP, 2, 2, "none", 3),  # P = 2: half the payload per fragment sync, ceil(2.5)
        (5 * STEP, 2, 1, "fp4", 1),  # 4.25 bits per value instead of 32: 0.66 steps
        (5 * STEP, 4, 1, "none", 5),  # M = 4: the probe measured M = 4's ring, so the same τ
    ],
)
def test_tau_is_the_smallest_that_hides_the_probed_link(probe, workers, fragments, codec, tau):
    chosen, mbit, cu, hides = pick(probe, workers=workers, fragments=fragments, codec=codec)
    assert (chosen, hides) == (tau, True) and cu == pytest.approx(1.0, abs=1e-9)
    # the rate: one fp32 ring all-reduce of N values moves 2(M-1)/M · 32·N bits per worker in probe seconds
    assert mbit == pytest.approx(2 * (workers - 1) / workers * 32 * N / probe / 1e6, rel=1e-6)
    # and it is the simulator's own search at that rate
    model = ModelSpec(name="m", params=N, layers=LAYERS, step_time_s=STEP)
    method = mode_method("overlap", sync_every=30, num_fragments=fragments, overlap_steps=1, compression=codec)
    assert smallest_hiding_overlap(model, method, LinkSpec(mbit / 1e3, workers)).overlap_steps == tau


def test_a_link_no_tau_hides_takes_the_smallest_tau_of_the_highest_cu():
    chosen, _, cu, hides = pick(100 * 30 * STEP)
    assert (chosen, hides) == (29, False) and 0 < cu < 0.05


def test_the_summary_line():
    auto = OverlapAuto(overlap_steps=3, step_time_s=0.2, probe_s=0.5, probe_bytes=3_280_000, link_mbit=52.48,
                       predicted_cu=1.0, hides=True, measure_s=1.7)  # fmt: skip
    assert auto.describe() == (
        "τ = 3 (inner step 200 ms, a 3.28 MB all-reduce 0.50 s ≈ 52.5 Mbit/s; predicted CU 1.000, hides the link)"
    )
    assert OverlapAuto(**auto.to_dict()) == auto


# ------------------------------------------------------------------------------------------- the measurement
def test_timing_the_step_leaves_parameters_gradients_and_rng_as_they_were():
    model = GPT(GPTConfig(vocab_size=64, seq_len=16, n_layer=2, n_head=2, d_model=32, dropout=0.1), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = next(model.parameters())
    first.grad = torch.full_like(first, 0.5)  # a gradient already there stays; the others stay None
    rng = torch.get_rng_state()
    seconds = time_inner_step(model, 4, 16, 64, torch.device("cpu"))
    assert seconds > 0 and math.isfinite(seconds)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(first.grad, torch.full_like(first, 0.5))
    assert all(p.grad is None for p in list(model.parameters())[1:])
    assert torch.equal(torch.get_rng_state(), rng)


# ------------------------------------------------------------------------------------------------ the config
def test_auto_in_toml_and_on_the_command_line(tmp_path):
    config = TrainConfig()
    apply_overrides(config, {"outer": {"mode": "overlap", "overlap_steps": "auto"}}, source="t.toml")
    assert config.validate().outer.overlap_steps == "auto"
    resolved = config.with_overlap_steps(7)
    assert (resolved.outer.overlap_steps, config.outer.overlap_steps) == (7, "auto")  # a copy
    assert resolved.outer.diloco().overlap_steps == 7
    with pytest.raises(ConfigError, match=r"overlap_steps='auto' is resolved when the run starts"):
        config.outer.diloco()
    with pytest.raises(ConfigError, match=r"overlap_steps=30 >= sync_every=30: τ must be < H"):
        config.with_overlap_steps(30)


AUTO = ["--mode", "overlap", "--overlap-steps", "auto"]
EAGER_REFUSAL = r"overlap_steps='auto' sizes the τ of mode 'overlap' to the link; not in mode 'eager': give τ as a"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--mode", "eager", "--overlap-steps", "auto"], EAGER_REFUSAL),
        (["--mode", "overlap", "--overlap-steps", "2.5"], r"--overlap-steps: '2.5': must be an integer or 'auto'"),
        ([*AUTO, "--sync-every", "1", "--steps", "4"], r"overlap_steps=1 >= sync_every=1: τ must be < H"),
        ([*AUTO, "--fault-tolerance", "127.0.0.1:29999"], r"not with fault tolerance \(quorums change the link\)"),
    ],
    ids=["eager", "float", "H=1", "fault-tolerance"],
)
def test_auto_refusals_are_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)  # a default run directory would land here
    with pytest.raises(SystemExit) as info:
        cli(["train", "--config", SMOKE, "--threads", "1", *flags])
    text = capsys.readouterr().err.strip().splitlines()[-1]  # argparse: the usage, then one line; ours: one line
    assert info.value.code == EXIT_USAGE and re.search(message, text), text
    assert list(tmp_path.iterdir()) == []


def test_a_toml_auto_for_another_mode_is_refused_too(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[outer]\nmode = "sync"\noverlap_steps = "auto"\n')
    with pytest.raises(ConfigError, match=r"not in mode 'sync'"):
        apply_overrides(config := TrainConfig(), {"outer": {"mode": "sync", "overlap_steps": "auto"}}, "bad.toml")
        config.validate()
    with pytest.raises(ConfigError, match=r"outer.overlap_steps='often': must be an integer or 'auto'"):
        apply_overrides(TrainConfig(), {"outer": {"overlap_steps": "often"}}, "bad.toml")


# ------------------------------------------------------------------------------------------------ end to end
def run(tmp_path: Path, name: str, *flags: str) -> Path:
    out = tmp_path / name
    argv = ["train", "--config", SMOKE, "--out-dir", str(out), "--threads", "1", "--mode", "overlap", *flags]
    assert cli(argv) == 0
    return out


def records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def same_model(a: Path, b: Path) -> bool:
    ma, mb = (torch.load(d / "model.pt", weights_only=False)["model"] for d in (a, b))
    return ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


def chose_by_the_rule(record: dict, summary: dict) -> bool:
    """The recorded τ is the rule's on the recorded measurements (smoke: 2 layers, H = 5, P = 1, fp32)."""
    again = choose(params=summary["params"], layers=2, step_time_s=record["step_time_s"], probe_s=record["probe_s"],
                   workers=2, sync_every=5, num_fragments=1, compression="none", layout="strided")  # fmt: skip
    return again == (record["overlap_steps"], record["link_mbit"], record["predicted_cu"], record["hides"])


@pytest.mark.parametrize(("link", "tau"), [("0", None), ("2", 4)], ids=["no-link", "2mbit"])
def test_auto_resolves_records_and_trains_bitwise_as_the_tau_it_chose(tmp_path, link, tau):
    """Smoke (H = 5): at 2 Mbit/s a 33k-parameter all-reduce takes ~0.5 s, a step ~ms, no τ < H hides it, and the
    search takes τ = H - 1 = 4. With no link the in-process all-reduce still waits for the other thread (~ms on a
    loaded machine, as long as a smoke step), so τ is whatever the rule says on what was measured. The run equals
    one given that τ, bitwise."""
    auto = run(tmp_path, "auto", "--overlap-steps", "auto", "--link-mbit", link)
    summary = json.loads((auto / "summary.json").read_text())
    chosen = summary["overlap_auto"]
    assert chose_by_the_rule(chosen, summary) and 1 <= chosen["overlap_steps"] <= 4
    if tau is not None:
        assert (chosen["overlap_steps"], chosen["hides"]) == (tau, False)
    tau = chosen["overlap_steps"]
    assert json.loads((auto / "config.json").read_text())["outer"]["overlap_steps"] == tau
    (logged,) = records(auto, "overlap_auto")
    assert {k: v for k, v in logged.items() if k not in ("type", "worker", "step")} == chosen
    assert chosen["probe_bytes"] == 4 * summary["params"] and chosen["step_time_s"] > 0
    if link == "2":  # the emulated link delivers its rate to the probe (a loaded machine only slows it)
        assert 1.0 < chosen["link_mbit"] <= 2.0 * 1.01
    given = run(tmp_path, "given", "--overlap-steps", str(tau), "--link-mbit", link)
    assert same_model(auto, given)
    assert json.loads((given / "summary.json").read_text())["eval_loss"] == summary["eval_loss"]


def test_resume_keeps_the_runs_tau_and_a_switch_to_overlap_measures_afresh(tmp_path):
    auto = run(tmp_path, "auto", "--overlap-steps", "auto", "--link-mbit", "2", "--steps", "10",
               "--checkpoint-every", "1")  # fmt: skip
    # a mid-run checkpoint (averages in flight) continues with the τ the run chose, measured once
    (auto / "checkpoints" / "step-000000010").rename(auto / "gone")  # the newest left is mid-run, step 5
    run(tmp_path, "auto", "--overlap-steps", "auto", "--link-mbit", "2", "--steps", "20", "--resume")
    assert len(records(auto, "overlap_auto")) == 1
    given = run(tmp_path, "given", "--overlap-steps", "4", "--link-mbit", "2", "--steps", "20")
    assert same_model(auto, given)
    # a finished sync run switched to overlap: nothing in flight, τ is measured for the new mode
    sync = tmp_path / "sync"
    assert cli(["train", "--config", SMOKE, "--out-dir", str(sync), "--threads", "1", "--mode", "sync",
                "--link-mbit", "0", "--steps", "10"]) == 0  # fmt: skip
    run(tmp_path, "sync", "--overlap-steps", "auto", "--link-mbit", "0", "--steps", "20", "--resume")
    (measured,) = records(sync, "overlap_auto")
    assert chose_by_the_rule(measured, json.loads((sync / "summary.json").read_text()))
    assert json.loads((sync / "config.json").read_text())["outer"]["overlap_steps"] == measured["overlap_steps"]


@pytest.mark.slow
def test_process_workers_agree_on_tau(tmp_path):
    auto = run(tmp_path, "auto", "--overlap-steps", "auto", "--link-mbit", "2", "--launch", "processes")
    given = run(tmp_path, "given", "--overlap-steps", "4", "--link-mbit", "2")
    assert json.loads((auto / "summary.json").read_text())["overlap_auto"]["overlap_steps"] == 4
    assert same_model(auto, given)
