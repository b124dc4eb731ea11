"""`eagerloco train --resume --workers M'` from a checkpoint written by M ≠ M' workers (ALGORITHMS.md section 11, last
rule; lm/checkpoint.py: load_resized). Exact checks of the state each resumed worker starts from: φ and the outer
optimizer state are :func:`eagerloco.ft.resize_outer_states` of the saved workers' outer states, θ = φ, nothing in
flight, the inner optimizer a saved worker's (rank < M) or fresh (rank ≥ M); then the run finishes with finite loss.
Simulated workers (threads), the shipped smoke config: seconds per run."""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path

import pytest
import torch

from eagerloco import DiLoCo, configs
from eagerloco.cli.main import main as cli
from eagerloco.ft import resize_outer_states
from eagerloco.lm import checkpoint as ckpt

SMOKE = str(configs.path("smoke"))  # 2 workers, H = 5, 20 steps, batch 4 x 32 tokens
SAVED = 10  # resume from the checkpoint at inner step 10: averages in flight in overlap, delayed and eager
MODE_FLAGS = {
    "sync": ["--mode", "sync"],
    "overlap": ["--mode", "overlap", "--overlap-steps", "1"],
    "delayed": ["--mode", "delayed"],
    "eager": ["--mode", "eager"],
    "eager-int8": ["--mode", "eager", "--num-fragments", "2", "--sync-every", "10",
                   "--compression", "int8", "--error-feedback"],
}  # fmt: skip


def train(out: Path, *flags: str) -> None:
    assert cli(["train", "--config", SMOKE, "--out-dir", str(out), "--threads", "1", *flags]) == 0


@pytest.fixture(scope="module")
def saved_runs(tmp_path_factory) -> dict[str, Path]:
    """Per mode, a 2-worker run checkpointed every outer step, cut back to its checkpoint at inner step 10."""
    root = tmp_path_factory.mktemp("saved")
    runs = {}
    for mode, flags in MODE_FLAGS.items():
        out = root / mode
        train(out, *flags, "--checkpoint-every", "1", "--keep-checkpoints", "10")
        for later in (out / "checkpoints").iterdir():
            if later.name > ckpt.step_dir(out, SAVED).name:
                shutil.rmtree(later)
        (out / "model.pt").unlink()
        (out / "summary.json").unlink()
        runs[mode] = out
    return runs


class StartRecorder:
    """Wraps DiLoCo.copy_outer_parameters_to: its first call on each engine is train_worker's θ ← φ after loading
    the resized state. Records, per rank, φ, the outer optimizer state, θ and the inner optimizer state there."""

    def __init__(self) -> None:
        self.starts: dict[int, dict] = {}
        self.lock = threading.Lock()
        self.original = DiLoCo.copy_outer_parameters_to

    def __call__(self, loco: DiLoCo, module: torch.nn.Module) -> None:
        self.original(loco, module)
        with self.lock:
            if loco.rank in self.starts:
                return
            self.starts[loco.rank] = {
                "module_is_model": module is loco.model,
                "inner_step": loco.inner_step,
                "finalized": loco.finalized,
                "in_flight": sum(len(core.in_flight) for core in loco.states),
                "phi": [core.phi.clone() for core in loco.states],
                "outer": [_tensors(core.outer_optimizer.state_dict()) for core in loco.states],
                "residual": [core.reducer.state_dict().get("residual") for core in loco.states],
                "theta": {name: p.detach().clone() for name, p in module.named_parameters()},
                "outer_parameters": {name: t.clone() for name, t in loco.outer_parameters().items()},
                "inner": _tensors(loco.inner_optimizer.state_dict()),
            }


def _tensors(optimizer_state: dict) -> dict:
    """{(param index, key): tensor} of an optimizer state dict (the scalars too, as tensors)."""
    return {
        (index, key): torch.as_tensor(value).clone()
        for index, entry in optimizer_state["state"].items()
        for key, value in entry.items()
    }


def assert_equal_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    "mode,workers",
    [("sync", 1), ("sync", 3), ("eager", 1), ("eager", 3), ("overlap", 3), ("delayed", 1), ("eager-int8", 3)],
)
def test_resume_with_another_number_of_workers(tmp_path, saved_runs, monkeypatch, mode, workers):
    out = tmp_path / "run"
    shutil.copytree(saved_runs[mode], out)
    directory = ckpt.step_dir(out, SAVED)
    saved = [torch.load(directory / f"worker-{r}.pt", weights_only=False) for r in range(2)]
    expected = resize_outer_states([s["outer"] for s in saved], workers)
    if mode != "sync":  # the checkpoint holds averages in flight: resizing applies them first
        assert any(f["in_flight"] for s in saved for f in s["outer"]["fragments"])

    recorder = StartRecorder()
    monkeypatch.setattr(DiLoCo, "copy_outer_parameters_to", lambda loco, module: recorder(loco, module))
    train(out, *MODE_FLAGS[mode], "--workers", str(workers), "--resume")
    feedback = mode == "eager-int8"  # a worker's error-feedback residual

    assert sorted(recorder.starts) == list(range(workers))
    for rank, start in recorder.starts.items():
        assert start["module_is_model"]  # the first call is θ ← φ on the trained model, not an evaluation
        assert start["inner_step"] == SAVED and start["in_flight"] == 0 and not start["finalized"]  # reopened
        want = expected[rank]["fragments"]
        assert len(start["phi"]) == len(want)
        for p, (phi, fragment, outer) in enumerate(zip(start["phi"], want, start["outer"])):
            assert torch.equal(phi, fragment["phi"])  # exactly resize_outer_states' φ
            assert_equal_tensors(outer, _tensors(fragment["outer_optimizer"]))  # and its outer momentum
            residual = start["residual"][p]  # error feedback: a saved worker's residual, none for a new one
            if rank < 2 and feedback:
                assert torch.equal(residual, saved[rank]["outer"]["fragments"][p]["reducer"]["residual"])
            else:
                assert residual is None
        assert_equal_tensors(start["theta"], start["outer_parameters"])  # θ ← φ
        if rank < 2:  # a worker that existed keeps its inner optimizer (AdamW moments and step count)
            assert_equal_tensors(start["inner"], _tensors(saved[rank]["inner_optimizer"]))
        else:  # a new worker starts AdamW fresh
            assert start["inner"] == {}
    if mode.startswith("eager"):  # consolidation: φ = the mean of the saved workers' drained φ_m, not worker 0's
        assert not torch.equal(expected[0]["fragments"][0]["phi"], saved[0]["outer"]["fragments"][0]["phi"])

    # The resumed run finishes: every new worker trains steps 11..20 with a finite loss, the token count goes on
    # from the 2-worker steps, and the final checkpoint is one of `workers` workers.
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_step = 4 * 32  # batch 4 x seq_len 32 per worker
    for rank in range(workers):
        inner = [r for r in metrics if r["type"] == "inner" and r["worker"] == rank]
        resumed = [r for r in inner if r["step"] > SAVED]
        assert [r["step"] for r in resumed] == list(range(SAVED + 1, 21))
        assert all(math.isfinite(r["loss"]) for r in resumed)
        assert resumed[-1]["tokens"] == SAVED * per_step * 2 + (20 - SAVED) * per_step * workers
    assert [r["step"] for r in metrics if r["type"] == "inner" and r["worker"] == 0][:SAVED] == list(range(1, 11))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["workers"] == workers and math.isfinite(summary["eval_loss"])
    final = ckpt.latest_valid(out)
    assert final.name == "step-000000020"
    assert ckpt.read_manifest(final)["world_size"] == workers
    # Data: every new worker drew shard `rank` of `workers` from the saved step's batch on (iid sampling: a worker
    # that existed continued its own stream, the same shard and seed stream as the saved sampler).
    for rank in range(workers):
        sampler = torch.load(final / f"worker-{rank}.pt", weights_only=False)["sampler"]
        assert sampler["worker"] == rank and sampler["batches_drawn"] == 20
        if rank < 2:
            assert sampler["shard"] == saved[rank]["sampler"]["shard"]


def test_resized_resume_still_refuses_what_it_cannot_continue(tmp_path, saved_runs, capsys):
    out = tmp_path / "run"
    shutil.copytree(saved_runs["eager"], out)
    before = (out / "metrics.jsonl").read_bytes()
    # Another mode from a mid-run checkpoint stays refused, with or without another worker count.
    with pytest.raises(SystemExit, match=r"outer.mode='eager', this run has outer.mode='sync': the outer loop can "):
        train(out, "--mode", "sync", "--workers", "3", "--resume")
    # A non-finite average in flight under nonfinite='raise' cannot be applied: refused before any worker starts.
    directory = ckpt.step_dir(out, SAVED)
    digests = []
    for rank in range(2):
        state = torch.load(directory / f"worker-{rank}.pt", weights_only=False)
        if rank == 1:
            state["outer"]["fragments"][0]["in_flight"][0]["mean"][0] = float("nan")
        state.pop("format")
        digests.append(ckpt.save_worker(out, SAVED, rank, state))
    manifest = ckpt.read_manifest(directory)
    ckpt.commit(out, SAVED, 2, digests, keep=10, config=manifest["config"], finalized=manifest["finalized"])
    with pytest.raises(SystemExit, match=r"cannot be resumed by 3 workers: saved worker 1, fragment 0: the average "
                                         r"launched at inner step 10 is not finite") as info:  # fmt: skip
        train(out, "--mode", "eager", "--workers", "3", "--resume")
    assert info.value.code == 2 and "\n" not in str(info.value)
    assert (out / "metrics.jsonl").read_bytes() == before  # nothing was touched
    assert not (out / "summary.json").exists()


def test_dp_resumes_with_more_workers_as_one_model(tmp_path):
    # Data parallel has no outer loop: every worker holds the same θ and AdamW state, and a new worker takes saved
    # worker 0's (a fresh AdamW would make its θ drift from the others'). 2 → 3 workers: the three stay identical.
    out = tmp_path / "dp"
    train(out, "--mode", "dp", "--checkpoint-every", "1", "--keep-checkpoints", "10")
    for later in (out / "checkpoints").iterdir():
        if later.name > ckpt.step_dir(out, SAVED).name:
            shutil.rmtree(later)
    (out / "summary.json").unlink()
    train(out, "--mode", "dp", "--workers", "3", "--resume")
    final = [torch.load(ckpt.step_dir(out, 20) / f"worker-{r}.pt", weights_only=False) for r in range(3)]
    for state in final[1:]:
        assert_equal_tensors(state["model"], final[0]["model"])
        assert_equal_tensors(_tensors(state["inner_optimizer"]), _tensors(final[0]["inner_optimizer"]))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in metrics if r["type"] == "inner" and r["step"] > SAVED]
    assert len(losses) == 3 * (20 - SAVED) and all(math.isfinite(x) for x in losses)
