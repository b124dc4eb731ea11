"""Hugging Face Trainer and Accelerate as DiLoCo workers: 2 gloo processes on CPU, one rank per worker, a tiny
GPT-2 from a config (nothing downloaded). Trainer and Accelerate wrap the model in DDP over the world; the tests
count the world group's collectives at every step (gloo's sequence numbers) to show that no gradient all-reduce
crosses workers, and check that both workers end with the same outer parameters (sync mode), in the model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _toy import launch_ranks

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

HERE = Path(__file__).resolve().parent
# World-group collectives per inner step (8 steps, H = 4, one fragment). Step 2: DDP's one-time rebuild of its
# gradient buckets after the first iteration (a broadcast of the bucket order); steps 4 and 8: the outer
# all-reduce (with one rank per worker the outer group is the world group). No per-step gradient all-reduce.
EXPECTED = [0, 2, 0, 1, 0, 0, 0, 1]
# The control, DDP over the world as Trainer/Accelerate build it without eagerloco: one gradient all-reduce
# (one bucket) at every step, plus the rebuild at step 2.
CONTROL = [1, 3, 1, 1]


def _no_buffer_sync() -> dict[str, bool]:
    """DDP's switch for no buffer broadcast before every forward, as this torch spells it."""
    import inspect

    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def _launch(tmp_path_factory, case: str, world: int = 2) -> list[dict]:
    tmp = tmp_path_factory.mktemp(case)
    return launch_ranks(HERE / "_hf_worker.py", world, tmp, case, str(tmp), timeout=500)


@pytest.fixture(scope="module")
def trainer_results(tmp_path_factory) -> list[dict]:
    return _launch(tmp_path_factory, "trainer")


@pytest.fixture(scope="module")
def trainer_2x2_results(tmp_path_factory) -> list[dict]:
    return _launch(tmp_path_factory, "trainer_2x2", world=4)


@pytest.fixture(scope="module")
def accelerate_results(tmp_path_factory) -> list[dict]:
    return _launch(tmp_path_factory, "accelerate")


def _same_outer_parameters_in_the_model(results: list[dict]) -> None:
    a = results[0]
    assert len(a["phi"]) > 0
    for b in results[1:]:
        assert a["phi"].keys() == b["phi"].keys()
        for name in a["phi"]:
            assert torch.equal(a["phi"][name], b["phi"][name]), name  # one model on every worker (sync)
    for r in results:
        for name in a["phi"]:
            assert torch.equal(r["model"][name], r["phi"][name]), name  # the model holds φ at the end


@pytest.mark.slow
def test_trainer_callback_runs_workers_without_a_gradient_all_reduce(trainer_results):
    for r in trainer_results:
        assert r["ddp"] == "DistributedDataParallel"  # Trainer did wrap the model, over the world
        assert r["outer_is_world"]
        assert r["counts"] == EXPECTED
        assert r["inner_steps"] == 8
    _same_outer_parameters_in_the_model(trainer_results)
    # trainer.evaluate() after train() sees φ: the same loss on both workers
    assert trainer_results[0]["eval"] == trainer_results[1]["eval"]


@pytest.mark.slow
def test_trainer_with_workers_of_two_ranks_keeps_ddp_inside_each_worker(trainer_2x2_results):
    """4 ranks, 2 workers x 2 ranks: the world group sees only DDP's one-time bucket rebuild; the outer group one
    all-reduce per sync point; each worker's inner group DDP's gradient all-reduce every step (one bucket) plus,
    at sync points, the all-gather that restores the worker's replicas after the outer step."""
    assert sorted(r["worker"] for r in trainer_2x2_results) == [0, 0, 1, 1]
    for r in trainer_2x2_results:
        assert not r["outer_is_world"]
        assert r["counts"] == [0, 2, 0, 0, 0, 0, 0, 0]
        assert r["outer_counts"] == [0, 0, 0, 1, 0, 0, 0, 1]
        assert r["inner_counts"] == [1, 1, 1, 2, 1, 1, 1, 2]
    _same_outer_parameters_in_the_model(trainer_2x2_results)
    assert len({r["eval"] for r in trainer_2x2_results}) == 1


@pytest.mark.slow
def test_accelerate_example_runs_workers_without_a_gradient_all_reduce(accelerate_results):
    for r in accelerate_results:
        assert r["ddp"] == "DistributedDataParallel"
        assert r["counts"] == EXPECTED
        assert r["control"] == CONTROL
        assert r["inner_steps"] == 8
        assert r["final"] < r["initial"]
    _same_outer_parameters_in_the_model(accelerate_results)
    assert accelerate_results[0]["final"] == accelerate_results[1]["final"]


def test_the_callback_refuses_to_run_without_attach():
    from eagerloco import DiLoCoConfig
    from eagerloco.integrations.hf import DiLoCoCallback

    callback = DiLoCoCallback(DiLoCoConfig(sync_every=4))
    with pytest.raises(RuntimeError, match=r"without attach\(trainer\)"):
        callback.on_train_begin(None, None, None, model=torch.nn.Linear(2, 2))


def test_worker_ddp_kwargs_refuse_world_collectives_every_step():
    from eagerloco.integrations.hf import worker_ddp_kwargs

    with pytest.raises(ValueError, match="broadcast_buffers=True would run a collective across all workers"):
        worker_ddp_kwargs(None, broadcast_buffers=True)
    handler = worker_ddp_kwargs(None, bucket_cap_mb=10)
    assert handler.to_kwargs() == {"bucket_cap_mb": 10, **_no_buffer_sync()}
    assert handler.layout is None


def test_confine_ddp_replaces_the_accelerators_ddp_settings_and_keeps_the_others():
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from eagerloco.integrations.hf import WorkerDDPKwargs, confine_ddp

    accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(bucket_cap_mb=7)])
    assert confine_ddp(accelerator) is None  # one process: one worker, no layout
    assert isinstance(accelerator.ddp_handler, WorkerDDPKwargs)
    assert accelerator.ddp_handler.to_kwargs() == {"bucket_cap_mb": 7, **_no_buffer_sync()}
    confine_ddp(accelerator)  # again: the settings survive a second call
    assert accelerator.ddp_handler.to_kwargs() == {"bucket_cap_mb": 7, **_no_buffer_sync()}


def test_the_hook_fires_on_real_optimizer_steps_only_under_gradient_accumulation():
    """Accelerate's AcceleratedOptimizer skips step() on accumulation micro-batches; the hook sits on the wrapped
    torch optimizer, so those are neither inner nor outer steps."""
    from accelerate import Accelerator

    from _toy import TinyNet
    from eagerloco import DiLoCo, DiLoCoConfig, InProcessGroup

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    comm = InProcessGroup(1).communicator(0)
    with DiLoCo(model, optimizer, DiLoCoConfig(mode="sync", sync_every=2), comm=comm) as loco:
        for _ in range(6):  # 6 micro-batches = 3 optimizer steps
            with accelerator.accumulate(model):
                accelerator.backward(model(torch.ones(4, 4)).pow(2).mean())
                optimizer.step()
                optimizer.zero_grad()
        assert loco.inner_step == 3
    assert loco.finalized
