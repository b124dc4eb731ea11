"""EmulatedLink: a wait is bounded by its timeout, even when the link would deliver later."""

from __future__ import annotations

import time

import pytest
import torch

from _toy import Quadratic
from eagerloco import DiLoCo, DiLoCoConfig, EmulatedLink
from eagerloco.comm import InProcessGroup
from eagerloco.comm.base import CollectiveTimeout

torch.set_num_threads(1)

LATE_S = 3600.0  # the link delivers an hour late: a wait that slept past its timeout would hang the test


def test_a_wait_raises_at_its_timeout_instead_of_sleeping_past_it():
    link = EmulatedLink(InProcessGroup(1).communicator(0), latency_s=LATE_S)
    work = link.all_reduce_sum(torch.ones(3))
    start = time.perf_counter()
    with pytest.raises(CollectiveTimeout, match=r"after the timeout of 0\.05 s"):
        work.wait(0.05)
    assert time.perf_counter() - start < 60.0  # not the hour (a loaded machine may add seconds, never an hour)
    assert not work.is_completed()


def test_the_default_timeout_is_the_inner_communicators():
    link = EmulatedLink(InProcessGroup(1, timeout=0.05).communicator(0), latency_s=LATE_S)
    assert link.default_timeout == 0.05
    with pytest.raises(CollectiveTimeout, match=r"after the timeout of 0\.05 s"):
        link.broadcast(torch.ones(2), src=0).wait()


def test_a_delivery_within_the_timeout_waits_for_the_link_and_delivers_the_result():
    link = EmulatedLink(InProcessGroup(1).communicator(0), latency_s=0.05)
    tensor = torch.tensor([1.5, -2.0])
    start = time.perf_counter()
    work = link.all_reduce_sum(tensor)
    work.wait(600.0)
    assert time.perf_counter() - start >= 0.05  # never earlier than the link delivers
    assert work.is_completed()
    assert tensor.tolist() == [1.5, -2.0]  # the sum over one worker


def test_the_engine_reports_a_link_slower_than_collective_timeout_s():
    link = EmulatedLink(InProcessGroup(1).communicator(0), latency_s=LATE_S)
    model = Quadratic(1.0)
    config = DiLoCoConfig(mode="sync", sync_every=2, collective_timeout_s=0.05)
    loco = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), config, comm=link)
    loco.step()
    with pytest.raises(CollectiveTimeout, match=r"outer step 1 of fragment 0 \(launched at inner step 2"):
        loco.step()
