"""The torch.distributed communicator's heartbeat (eagerloco.comm.torch_dist._Heartbeat) and its shutdown invariant:
no heartbeat thread is inside a store call once the process group is destroyed or the interpreter exits (a daemon
thread that takes the GIL back during finalization aborts the process with "terminate called without an active
exception"). Each check runs in a fresh process: a gloo group of one on localhost. And its all-gather of two gloo ranks,
a receive-first pairwise exchange (exchange_all_gather), with three real processes, and its failure when the peer
is already dead (at wait, as a collective's)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest

from _toy import free_port

HERE = Path(__file__).resolve().parent

PRELUDE = """
import threading, time
import torch.distributed as dist
from _toy import init_gloo
from eagerloco.comm import TorchDistributedCommunicator
from eagerloco.comm.torch_dist import _Heartbeat, stop_heartbeats

init_gloo(0, 1, PORT)
comm = TorchDistributedCommunicator(timeout=30)
beat = comm._heartbeat
assert beat is not None and beat._thread.is_alive()
"""


def run_script(body: str) -> str:
    code = PRELUDE.replace("PORT", str(free_port())) + textwrap.dedent(body)
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_the_heartbeat_beats_and_stops_within_a_beat_of_destroy_process_group():
    out = run_script("""
        deadline = time.monotonic() + 10
        while beat.counters([0])[0] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert beat.counters([0])[0] >= 2, "the heartbeat did not advance"
        dist.destroy_process_group()
        beat._thread.join(timeout=10 * _Heartbeat.interval)
        assert not beat._thread.is_alive(), "the heartbeat outlived its process group"
        assert beat._stop.is_set()
        print("stopped")
    """)
    assert out.strip() == "stopped"


def test_stop_heartbeats_waits_for_a_store_call_in_flight():
    """A store call that takes 1 s (a starved store host): stop_heartbeats returns only once the thread has left
    it, and the process then exits cleanly (return code 0, nothing on stderr about terminate)."""
    out = run_script("""
        stop_heartbeats()
        inside = threading.Event()

        class SlowStore:
            calls = 0
            def add(self, key, value):
                SlowStore.calls += 1
                inside.set()
                time.sleep(1.0)
                return SlowStore.calls

        slow = _Heartbeat.for_store(SlowStore(), 0)
        assert inside.wait(10)
        started = time.monotonic()
        stop_heartbeats()
        waited = time.monotonic() - started
        assert not slow._thread.is_alive()
        assert SlowStore.calls == 1 and waited > 0.2, (SlowStore.calls, waited)
        dist.destroy_process_group()
        print("joined")
    """)
    assert out.strip() == "joined"


@pytest.mark.parametrize("destroy", [True, False])
def test_a_worker_exits_cleanly_with_or_without_destroy_process_group(destroy):
    run_script(f"""
        comm.all_reduce_sum(__import__("torch").ones(4)).wait()
        if {destroy}:
            dist.destroy_process_group()
    """)


# ---------------------------------------------------------------------------------------------------------------
# The gloo all-gather of two ranks: a pairwise exchange that posts every receive before any send


def _exchange_worker(argv: list[str]) -> None:
    """``python test_comm_torch_dist.py RANK WORLD PORT exchange OUT`` (3 ranks): exchange_all_gather itself on the
    world group, with the ranks launching apart and two exchanges in flight at once; the communicator's all-gather
    on the world group (3 ranks: gloo's own) and on the subgroup of global ranks [0, 2] (2 ranks: the exchange,
    whose group ranks differ from the global ones). Records the results and the order of the point-to-point
    calls."""
    import torch
    import torch.distributed as dist

    from _toy import init_gloo
    from eagerloco.comm import TorchDistributedCommunicator
    from eagerloco.comm.torch_dist import EXCHANGE_TAG, exchange_all_gather

    rank, world_size, port, out = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    init_gloo(rank, world_size, port)
    calls: list[tuple[str, int]] = []
    irecv, isend = dist.irecv, dist.isend
    dist.irecv = lambda t, src, **kw: calls.append(("recv", src)) or irecv(t, src, **kw)
    dist.isend = lambda t, dst, **kw: calls.append(("send", dst)) or isend(t, dst, **kw)
    sub = dist.new_group([0, 2])
    results: dict[str, object] = {}
    try:
        payload = lambda k: torch.arange(5, dtype=torch.uint8) + 10 * rank + k  # noqa: E731
        time.sleep(0.3 * rank)  # the ranks launch apart, as workers whose inner phases end apart
        outputs = [torch.zeros(world_size, 5, dtype=torch.uint8) for _ in range(2)]
        works = [
            exchange_all_gather(
                outputs[k],
                payload(k),
                rank,
                lambda buffer, peer: dist.irecv(buffer, src=peer, tag=EXCHANGE_TAG),
                lambda data, peer: dist.isend(data, dst=peer, tag=EXCHANGE_TAG),
            )
            for k in range(2)
        ]  # two in flight
        works[1].wait()  # waited out of order
        works[0].wait(timedelta(seconds=30))
        results["exchange"] = outputs
        results["exchange_calls"] = list(calls)
        results["done"] = [w.is_completed() for w in works]
        calls.clear()
        comm = TorchDistributedCommunicator(timeout=60)
        gathered = torch.zeros(world_size, 2, dtype=torch.int64)
        comm.all_gather(gathered, torch.tensor([rank, -rank])).wait()
        results["world"] = gathered
        results["world_calls"] = list(calls)
        if rank in (0, 2):
            calls.clear()
            sub_comm = TorchDistributedCommunicator(group=sub, timeout=60)
            got = torch.zeros(2, 3, dtype=torch.float32)
            sub_comm.all_gather(got, torch.full((3,), float(rank))).wait()
            results["sub"] = got
            results["sub_calls"] = list(calls)
        dist.barrier()
        torch.save(results, out)
    finally:
        dist.destroy_process_group()


def test_the_two_rank_gloo_all_gather_is_a_receive_first_exchange(tmp_path):
    """Three gloo processes. exchange_all_gather: every row holds its rank's bytes with the ranks launching 0.3 s
    apart and two exchanges in flight (waited out of order), and every rank posts all its receives before any send
    (the invariant that keeps a slow link's two directions busy together). The communicator uses it for a group of
    two (a subgroup: peers addressed by global rank) and gloo's own all-gather for three (no point-to-point call)."""
    import torch

    from _toy import launch_ranks

    world_size = 3
    results = launch_ranks(__file__, world_size, tmp_path, "exchange", timeout=120)
    for rank, got in enumerate(results):
        for k in range(2):
            want = torch.stack([torch.arange(5, dtype=torch.uint8) + 10 * r + k for r in range(world_size)])
            assert torch.equal(got["exchange"][k], want), (rank, k)
        assert got["done"] == [True, True]
        peers = [(rank + 1) % 3, (rank + 2) % 3]
        one_exchange = [("recv", p) for p in peers] + [("send", p) for p in peers]
        assert got["exchange_calls"] == one_exchange * 2, rank
        assert torch.equal(got["world"], torch.tensor([[0, 0], [1, -1], [2, -2]]))
        assert got["world_calls"] == []
    for rank, other in ((0, 2), (2, 0)):
        sub = results[rank]
        assert torch.equal(sub["sub"], torch.tensor([[0.0] * 3, [2.0] * 3]))
        assert sub["sub_calls"] == [("recv", other), ("send", other)]  # global ranks
    assert "sub" not in results[1]


def _dead_peer_worker(argv: list[str]) -> None:
    """``python test_comm_torch_dist.py RANK 2 PORT dead-peer OUT``: one all-gather between the two ranks, then rank 1
    exits; rank 0 waits until its gloo transport has seen the connection close, then launches the next all-gather.
    Records where the failure surfaced."""
    import torch

    from _toy import init_gloo
    from eagerloco.comm import TorchDistributedCommunicator
    from eagerloco.comm.base import CollectiveTimeout

    rank, world_size, port, out = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    init_gloo(rank, world_size, port)
    comm = TorchDistributedCommunicator(timeout=10)
    comm.all_gather(torch.zeros(2, 3), torch.ones(3)).wait()
    if rank == 1:
        torch.save({}, out)
        os._exit(0)  # a dead peer: no goodbye to the process group
    time.sleep(1.0)  # gloo's transport thread reads the close and marks the pair failed
    result: dict[str, object] = {}
    try:
        work = comm.all_gather(torch.zeros(2, 3), torch.ones(3))
        result["launched"] = True
        work.wait()
    except Exception as exc:
        result.update(error=type(exc).__name__, message=str(exc), timeout=isinstance(exc, CollectiveTimeout))
    torch.save(result, out)
    os._exit(0)  # the group's peer is gone: no clean teardown to wait for


def test_a_peer_dead_before_the_exchange_fails_at_wait_as_a_collective_timeout(tmp_path):
    """Two gloo processes, the second gone before the first launches an all-gather (the exchange). gloo's
    point-to-point calls raise on the caller's thread once the pair is known closed; the communicator still returns
    a work, and its wait raises CollectiveTimeout naming the operation and the closed connection (where the engine
    turns collective failures into its "outer step n failed ... peers that did not answer" error), not a bare
    RuntimeError at launch (CI caught that one: a kill -9 run whose survivor exited with the wrong error)."""
    from _toy import launch_ranks

    got = launch_ranks(__file__, 2, tmp_path, "dead-peer", timeout=120)[0]
    assert got.get("launched") is True, got
    assert got["error"] == "CollectiveTimeout" and got["timeout"], got
    assert got["message"].startswith("all_gather of 3 x torch.float32 on gloo rank 0/2 failed after"), got
    assert "closed by peer" in got["message"].lower() or "reset by peer" in got["message"].lower(), got


def test_the_exchange_defers_a_peer_failure_raised_while_posting_to_wait():
    """exchange_all_gather with posting calls that raise: a peer failure (gloo's words) comes back as a work that is
    complete and raises it from wait, wrapped by TorchWork as CollectiveTimeout; misuse raises at the call, unless
    the caller's rule (``is_failure``) counts every error as a failure."""
    import torch

    from eagerloco.comm.base import CollectiveTimeout
    from eagerloco.comm.torch_dist import TorchWork, exchange_all_gather

    class Done:
        def wait(self, timeout=None):
            return True

        def is_completed(self):
            return True

    def post_send_raising(error):
        def post_send(payload, peer):
            raise error

        return post_send

    closed = RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:4242. This is typically caused by ...")
    output = torch.zeros(2, 3)
    work = exchange_all_gather(output, torch.ones(3), 1, lambda buffer, peer: Done(), post_send_raising(closed))
    assert work.is_completed()
    with pytest.raises(RuntimeError) as raised:
        work.wait()
    assert raised.value is closed
    assert torch.equal(output[1], torch.ones(3))  # its own row is in place before anything is posted
    wrapped = TorchWork(
        exchange_all_gather(output, torch.ones(3), 1, lambda buffer, peer: Done(), post_send_raising(closed)),
        "all_gather of 3 x torch.float32 on gloo rank 1/2",
        4.0,
    )
    with pytest.raises(CollectiveTimeout, match=r"^all_gather of 3 x torch.float32 on gloo rank 1/2 failed after "):
        wrapped.wait()
    misuse = RuntimeError("Tensors must be CPU and dense")
    with pytest.raises(RuntimeError, match="must be CPU and dense"):
        exchange_all_gather(output, torch.ones(3), 1, lambda buffer, peer: Done(), post_send_raising(misuse))
    # The fault-tolerant communicator's rule: every failure of its group surfaces at wait.
    deferred = exchange_all_gather(
        output, torch.ones(3), 1, lambda buffer, peer: Done(), post_send_raising(misuse), lambda exc: True
    )
    with pytest.raises(RuntimeError, match="must be CPU and dense"):
        deferred.wait()


if __name__ == "__main__":  # launch_ranks: SCRIPT RANK WORLD PORT MODE OUT
    worker = {"exchange": _exchange_worker, "dead-peer": _dead_peer_worker}[sys.argv[4]]
    worker([*sys.argv[1:4], sys.argv[5]])
