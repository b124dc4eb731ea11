"""The outer state through torch.distributed.checkpoint (eagerloco.integrations.dcp) and the safetensors export.

Real gloo processes (tests/_dcp_worker.py): a run stopped with averages in flight, saved with dcp.save (and
dcp.async_save), loaded into a freshly built model, optimizer and wrapper and continued ends bitwise where the
uninterrupted run ends: one rank per worker (2 workers), and FSDP2 inside 2 workers of 2 ranks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from _dcp_worker import CASES, STOP
from _toy import TinyNet, launch_ranks

HERE = Path(__file__).resolve().parent
EXPECTED_IN_FLIGHT = {  # at STOP = 10, H = 4: what each case has in flight per fragment when it is saved
    "sync": [0],
    "overlap_p2": [0, 1],
    "delayed_k2": [2],
    "eager_k2_p2": [2, 2],
    "eager_async_save": [1],
    "eager_smoothed_p2": [1, 1],
}


def _launch(tmp_path_factory, world: int, ranks_per_worker: int) -> list[dict]:
    tmp = tmp_path_factory.mktemp(f"dcp{world}x{ranks_per_worker}")
    (tmp / "ckpt").mkdir()
    return launch_ranks(HERE / "_dcp_worker.py", world, tmp, str(ranks_per_worker), str(tmp / "ckpt"), timeout=400)


@pytest.fixture(scope="module")
def one_rank_per_worker(tmp_path_factory) -> list[dict]:
    return _launch(tmp_path_factory, 2, 1)


@pytest.fixture(scope="module")
def fsdp_workers(tmp_path_factory) -> list[dict]:
    return _launch(tmp_path_factory, 4, 2)


def _assert_bitwise(result: dict) -> None:
    straight, resumed = result["straight"], result["resumed"]
    assert straight["phi"].keys() == resumed["phi"].keys()
    for name in straight["phi"]:
        assert torch.equal(straight["phi"][name], resumed["phi"][name]), name
    for a, b in zip(straight["outer"], resumed["outer"]):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_dcp_resume_mid_flight_is_bitwise_the_uninterrupted_run(one_rank_per_worker, case):
    for rank, saved in enumerate(one_rank_per_worker):
        result = saved[case]
        assert result["in_flight"] == EXPECTED_IN_FLIGHT[case], (rank, STOP)
        _assert_bitwise(result)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_dcp_resume_under_fsdp2_is_bitwise(fsdp_workers, case):
    for saved in fsdp_workers:
        assert saved[case]["in_flight"] == EXPECTED_IN_FLIGHT[case]
        _assert_bitwise(saved[case])


@pytest.mark.slow
def test_keys_are_parameter_names_with_per_worker_keys_only_in_eager(one_rank_per_worker):
    params = [n for n, _ in TinyNet().named_parameters()]
    for rank, saved in enumerate(one_rank_per_worker):
        sync_keys = set(saved["sync"]["keys"])
        assert sync_keys == {f"phi.{n}" for n in params} | {f"outer_optimizer.momentum_buffer.{n}" for n in params} | {
            f"meta.worker{rank}.rank0"
        }
        eager = set(saved["eager_k2_p2"]["keys"])
        own = {f"worker{rank}.in_flight.{j}.own.{n}" for j in range(2) for n in params}
        means = {f"in_flight.{j}.mean.{n}" for j in range(2) for n in params}
        assert own <= eager and means <= eager
        assert {f"worker{rank}.phi.{n}" for n in params} <= eager  # φ_m differs between eager workers
        assert not any(k.startswith("phi.") for k in eager)
        assert not any(".share." in k for k in eager)  # no smoothing: no slots for the own terms before it
        smoothed = set(saved["eager_smoothed_p2"]["keys"])
        assert {f"worker{rank}.in_flight.0.share.{n}" for n in params} <= smoothed


def test_safetensors_export_of_a_plain_module_and_a_loco(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    from eagerloco import DiLoCo, DiLoCoConfig, InProcessGroup
    from eagerloco.integrations.dcp import export_safetensors

    model = TinyNet()
    path = export_safetensors(model, tmp_path / "m.safetensors", rank=0)
    loaded = safetensors.load_file(str(path))
    assert loaded.keys() == dict(model.named_parameters()).keys()
    assert all(torch.equal(loaded[n], p.detach()) for n, p in model.named_parameters())
    assert export_safetensors(model, tmp_path / "other.safetensors", rank=1) is None
    assert not (tmp_path / "other.safetensors").exists()

    loco = DiLoCo(model, None, DiLoCoConfig(sync_every=2), comm=InProcessGroup(1).communicator(0))
    with torch.no_grad():
        model.head.bias.add_(1.0)  # θ drifts; φ is what is exported
    loco.finalize()
    loaded = safetensors.load_file(str(export_safetensors(loco, tmp_path / "phi.safetensors", rank=0)))
    assert all(torch.equal(loaded[n], v) for n, v in loco.full_outer_parameters().items())


def test_safetensors_export_of_a_hugging_face_model_is_save_pretrained(tmp_path):
    pytest.importorskip("safetensors")
    transformers = pytest.importorskip("transformers")
    import sys

    sys.path.insert(0, str(HERE.parent / "examples"))
    import hf_gpt2

    from eagerloco import DiLoCo, DiLoCoConfig, InProcessGroup
    from eagerloco.integrations.dcp import export_safetensors

    model = hf_gpt2.make_model()
    loco = DiLoCo(model, None, DiLoCoConfig(sync_every=2), comm=InProcessGroup(1).communicator(0))
    with pytest.raises(RuntimeError, match=r"before loco\.finalize\(\)"):
        export_safetensors(loco, tmp_path / "early", rank=0)
    loco.finalize()
    out = export_safetensors(loco, tmp_path / "gpt2", rank=0)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out)
    params = dict(loaded.named_parameters())
    for name, value in loco.full_outer_parameters().items():
        assert torch.equal(params[name].detach(), value), name
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # still tied


def test_the_integrations_import_nothing_beyond_torch_until_used():
    import subprocess
    import sys

    code = (
        "import sys, eagerloco, eagerloco.integrations, eagerloco.integrations.dcp;"
        "print(sorted(m for m in ('transformers', 'accelerate', 'safetensors') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
