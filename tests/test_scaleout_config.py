"""Choosing the two-level layout: the arguments of ``two_level_mesh`` (ranks per worker, the outer and inner
backends, site labels), its rules and their messages, and DiLoCo's checks of a layout. A 1-rank gloo world in
this process is enough for the rules; the 2 x 2 behaviour is in ``test_scaleout_layout.py``."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

import eagerloco
from _toy import TinyNet, free_port
from eagerloco import ConfigError, DiLoCo, DiLoCoConfig, InProcessGroup
from eagerloco.engine.sharding import LayoutError


def test_two_level_mesh_needs_an_initialised_world() -> None:
    if dist.is_initialized():
        pytest.skip("another test left torch.distributed initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        eagerloco.two_level_mesh(1)


@pytest.fixture(scope="module")
def world() -> Iterator[None]:
    if dist.is_initialized():
        pytest.skip("another test left torch.distributed initialised in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ranks_per_worker": 0}, "ranks_per_worker=0: must be an integer >= 1"),
        ({"ranks_per_worker": True}, "ranks_per_worker=True: must be an integer >= 1"),
        ({"ranks_per_worker": 2}, "ranks_per_worker=2 does not divide the world size 1"),
        ({"ranks_per_worker": 1, "outer_backend": "mpi"}, "outer_backend='mpi': must be one of gloo, nccl"),
        ({"ranks_per_worker": 1, "inner_backend": "nccl"}, "inner_backend='nccl' needs device_type='cuda'"),
    ],
)
def test_bad_layout_arguments_name_the_value_and_the_rule(world: None, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        eagerloco.two_level_mesh(**kwargs)


def test_the_backends_are_chosen_per_level(world: None) -> None:
    layout = eagerloco.two_level_mesh(1, outer_backend="gloo", inner_backend="gloo", site="site-a")
    assert (layout.worker, layout.inner_rank, layout.num_workers, layout.ranks_per_worker) == (0, 0, 1, 1)
    assert (layout.outer_backend, layout.inner_backend) == ("gloo", "gloo")
    assert dist.get_backend(layout.outer_group) == "gloo" and dist.get_backend(layout.inner_group) == "gloo"
    assert layout.worker_ranks == [0] and layout.peer_ranks == [0]
    assert layout.describe() == "worker 0/1, inner rank 0/1 (outer gloo, inner gloo)"
    default = eagerloco.two_level_mesh(1)  # None: the world's backend on both levels
    assert (default.outer_backend, default.inner_backend) == ("gloo", "gloo")


def test_local_batch_takes_this_ranks_rows(world: None) -> None:
    layout = dataclasses.replace(eagerloco.two_level_mesh(1), ranks_per_worker=4, inner_rank=2)
    batch = torch.arange(16).view(8, 2)
    assert torch.equal(layout.local_batch(batch), batch[4:6])
    with pytest.raises(ValueError, match="batch of 6 rows does not split over ranks_per_worker=4"):
        layout.local_batch(torch.zeros(6, 2))


def test_gloo_outer_group_needs_the_outer_state_in_cpu_memory(world: None) -> None:
    layout = eagerloco.two_level_mesh(1, outer_backend="gloo")
    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"outer_device='meta' puts the outer state on meta.*backend is gloo"):
        DiLoCo(model, inner, DiLoCoConfig(outer_device="meta"), layout=layout)
    loco = DiLoCo(model, inner, DiLoCoConfig(outer_device="cpu"), layout=layout)  # the rule's fix
    assert loco.states[0].phi.device.type == "cpu"


def test_a_comm_that_is_not_the_layouts_outer_group_is_refused(world: None) -> None:
    layout = eagerloco.two_level_mesh(1)
    model = TinyNet()
    comm = InProcessGroup(2).communicator(1)
    with pytest.raises(ConfigError, match="comm is rank 1 of 2 but the layout puts this rank in worker 0 of 1"):
        DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), comm=comm, layout=layout)


def test_a_sharded_model_without_a_layout_is_refused(world: None) -> None:
    from torch.distributed.fsdp import fully_shard

    layout = eagerloco.two_level_mesh(1)
    model = TinyNet()
    fully_shard(model, mesh=layout.inner_mesh)
    with pytest.raises(LayoutError, match=r"is a DTensor .* but DiLoCo was given no layout"):
        DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), comm=layout.outer_comm())
