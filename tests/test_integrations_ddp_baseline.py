"""The data-parallel baseline as PyTorch DDP (eagerloco.engine.data_parallel.DDPGradientAverager) against the old
flat all-reduce after backward (GradientAverager): 2 gloo processes, the training CLI's GPT, same seed.

With 2 workers the average of a bucket is (g₀ + g₁)/2 whatever the bucketing (one addition, one exact halving), so
DDP reproduces the old averager bitwise: the same losses at every step and the same final parameters, also when
the buckets travel through an EmulatedLink.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _ddp_worker import STEPS
from _toy import launch_ranks

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict]:
    return launch_ranks(HERE / "_ddp_worker.py", 2, tmp_path_factory.mktemp("ddp"), timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ddp", "ddp_link"])
def test_the_ddp_baseline_matches_the_old_averager_bitwise(ddp_results, kind):
    for saved in ddp_results:
        flat, ddp = saved["flat"], saved[kind]
        assert ddp["losses"] == flat["losses"]  # float tolerance 0: the same float at every step
        assert ddp["params"].keys() == flat["params"].keys()
        for name in flat["params"]:
            assert torch.equal(ddp["params"][name], flat["params"][name]), name
        # the same bytes: every step all-reduces every gradient once, in several buckets
        assert ddp["payload_bytes"] == flat["payload_bytes"] == STEPS * saved["numel"] * 4
        assert ddp["inner_steps"] == flat["inner_steps"] == STEPS
        assert ddp["buckets"] > 2
        assert ddp["blocked_s"] >= 0.0 and ddp["inner_s"] > 0.0


def test_ddp_needs_torch_distributed_workers():
    from _toy import TinyNet
    from eagerloco.comm import InProcessGroup
    from eagerloco.engine.data_parallel import DDPGradientAverager, torch_group_of

    comm = InProcessGroup(1).communicator(0)
    assert torch_group_of(comm) is None
    with pytest.raises(ValueError, match=r"needs workers that are torch\.distributed processes"):
        DDPGradientAverager(TinyNet(), comm)


@pytest.mark.slow
def test_train_dp_with_processes_runs_ddp_and_matches_the_simulated_flat_average(tmp_path):
    """``eagerloco train --mode dp``: simulated workers (threads) average with the flat all-reduce, processes with
    DDP; on the same seed both give the same loss at every step and the same final model (bitwise, M = 2)."""
    import json

    from eagerloco.cli.main import main as cli

    smoke = str(HERE.parent / "configs" / "smoke.toml")
    runs = {}
    for launch in ("simulated", "processes"):
        out = tmp_path / launch
        flags = ["train", "--config", smoke, "--mode", "dp", "--out-dir", str(out), "--threads", "1"]
        assert cli([*flags, "--launch", launch, "--link-mbit", "0"]) == 0
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses = [(r["worker"], r["step"], r["loss"]) for r in lines if r["type"] == "inner"]
        model = torch.load(out / "model.pt", weights_only=False)["model"]
        runs[launch] = (sorted(losses), model)
    (sim_losses, sim_model), (proc_losses, proc_model) = runs["simulated"], runs["processes"]
    assert len(sim_losses) > 0 and proc_losses == sim_losses
    for name in sim_model:
        assert torch.equal(sim_model[name], proc_model[name]), name
