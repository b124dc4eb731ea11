"""The torch.distributed communicator's heartbeat (eagerloco.comm.torch_dist._Heartbeat) and its shutdown invariant:
no heartbeat thread is inside a store call once the process group is destroyed or the interpreter exits (a daemon
thread that takes the GIL back during finalization aborts the process with "terminate called without an active
exception"). Each check runs in a fresh process: a gloo group of one on localhost."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
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
