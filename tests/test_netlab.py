"""Tests of the bandwidth-limited link lab, ``benchmarks/netlab.py``.

The pure helpers are tested everywhere. Tests marked ``netns`` build real namespaces and skip, with the reason
from ``netns_available()``, where that is impossible (not root, an unprivileged container, no iproute2).
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load_netlab() -> ModuleType:
    spec = importlib.util.spec_from_file_location("netlab", BENCH / "netlab.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["netlab"] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


netlab = _load_netlab()
RUN_PREFIX = f"nltest-{os.getpid()}-{secrets.token_hex(2)}"


def _prefix() -> str:
    return f"{RUN_PREFIX}-{secrets.token_hex(2)}"


@pytest.fixture(scope="module")
def need_netns() -> Iterator[None]:
    ok, why = netlab.netns_available()
    if not ok:
        pytest.skip(why)
    yield
    netlab.cleanup(RUN_PREFIX)  # belt and braces: nothing of ours may survive the module


# ---------------------------------------------------------------------------------------------------------------
# Everywhere


def test_netns_available_gives_a_reason() -> None:
    ok, why = netlab.netns_available()
    assert isinstance(ok, bool)
    assert ok or why, "an unavailable lab must say why"


def test_tbf_args() -> None:
    assert netlab._tbf_args(40, None, 50) == ["tbf", "rate", "40000000bit", "burst", "16384", "latency", "50ms"]
    assert netlab._tbf_args(1000, None, 50)[4] == str(10**9 // 8 // 500)  # 2 ms of tokens at high rates
    assert netlab._tbf_args(2.5, 4000, 20)[2:] == ["2500000bit", "burst", "4000", "latency", "20ms"]
    with pytest.raises(ValueError):
        netlab._tbf_args(0, None, 50)


def test_parse_proc_net_dev() -> None:
    text = textwrap.dedent("""\
        Inter-|   Receive                                                |  Transmit
         face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
            lo:     100       2    0    0    0     0          0         0      100       2    0    0    0     0       0          0
          lab0: 3181124    2106    0    0    0     0          0         0    90123     1200    0    0    0     0       0          0
        """)  # noqa: E501
    c = netlab.parse_proc_net_dev(text)
    assert c["lab0"] == netlab.IfaceCounters(rx_bytes=3181124, rx_packets=2106, tx_bytes=90123, tx_packets=1200)
    assert (c["lab0"] - c["lo"]).tx_bytes == 90023


def test_lab_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        netlab.Lab(1, 10)
    with pytest.raises(ValueError):
        netlab.Lab(2, 10, prefix="bad prefix/")
    with pytest.raises(ValueError):
        netlab.Lab(2, 10, subnet="fd00:e1::/64")
    with pytest.raises(ValueError):
        netlab.cleanup("")


def test_torchrun_argv_shape() -> None:
    lab = netlab.Lab(3, 50, prefix="shape")  # not started: only names and addresses
    assert [s.addr for s in lab.sites] == ["fd00:e1::1", "fd00:e1::2", "fd00:e1::3"]
    assert lab.namespaces == ["shape-br", "shape-s0", "shape-s1", "shape-s2"]
    host = netlab.torchrun_argv(lab, 0, ["probe.py", "--x", "1"], port=29411)
    other = netlab.torchrun_argv(lab, 2, ["-m", "pkg.mod"], port=29411)
    assert host[1:3] == ["-m", "torch.distributed.run"]

    def opt(argv: list[str], name: str) -> str:
        return argv[argv.index(name) + 1]

    for argv, site in ((host, 0), (other, 2)):
        assert opt(argv, "--nnodes") == "3"
        assert opt(argv, "--nproc-per-node") == "1"
        assert opt(argv, "--node-rank") == str(site)
        assert opt(argv, "--rdzv-backend") == "c10d"
        assert opt(argv, "--rdzv-endpoint") == "[fd00:e1::1]:29411"
        assert opt(argv, "--local-addr") == f"fd00:e1::{site + 1}"
    assert opt(host, "--rdzv-conf") == "is_host=1"
    assert opt(other, "--rdzv-conf") == "is_host=0"
    assert host[-3:] == ["probe.py", "--x", "1"]
    assert other[-2:] == ["--module", "pkg.mod"]
    env = lab.env(1, {"EXTRA": "y"})
    assert env["GLOO_SOCKET_IFNAME"] == "lab0" and env["NETLAB_ADDR"] == "fd00:e1::2" and env["EXTRA"] == "y"


# ---------------------------------------------------------------------------------------------------------------
# With namespaces

_SERVER = """
import socket, sys, time
addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port)); s.listen(1); print("ready", flush=True)
s.settimeout(20)
c, _ = s.accept(); c.settimeout(20)
if n == 0:  # echo one message
    c.sendall(c.recv(100)); sys.exit()
got, t0 = 0, None
while got < n:
    b = c.recv(1 << 20)
    if not b:
        break
    t0 = t0 or time.perf_counter()
    got += len(b)
dt = time.perf_counter() - t0
c.sendall(b"k")
print(got, dt, flush=True)
"""

_CLIENT = """
import socket, sys
addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = socket.create_connection((addr, port), timeout=20)
if n == 0:
    c.sendall(b"ping"); print(c.recv(100).decode())
else:
    c.sendall(b"x" * n); c.recv(1)
"""


def _transfer(lab: object, src: int, dst: int, nbytes: int, port: int = 5201) -> tuple[int, float, str]:
    """Send ``nbytes`` over TCP from site ``src`` to site ``dst``; (bytes received, receiver seconds, reply)."""
    addr = lab.addr(dst)  # type: ignore[attr-defined]
    server = lab.popen(  # type: ignore[attr-defined]
        dst, [sys.executable, "-c", _SERVER, addr, str(port), str(nbytes)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        client = lab.run(src, [sys.executable, "-c", _CLIENT, addr, str(port), str(nbytes)], timeout=30)  # type: ignore[attr-defined]
        out, _ = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
    if nbytes == 0:
        return 0, 0.0, client.stdout.strip()
    got, secs = out.split()
    return int(got), float(secs), ""


@pytest.mark.netns
def test_two_sites_round_trip_and_shaped_rate(need_netns: None) -> None:
    prefix = _prefix()
    with netlab.Lab(2, 40, prefix=prefix) as lab:
        assert sorted(lab.leftovers()) == sorted(lab.namespaces)
        # a TCP round trip between the sites, in both directions
        assert _transfer(lab, 0, 1, 0)[2] == "ping"
        assert _transfer(lab, 1, 0, 0, port=5202)[2] == "ping"

        # a 3 MB bulk transfer through the 40 Mbit/s shapers: TCP payload ~0.94 of the link rate
        before = lab.counters(0)
        got, secs, _ = _transfer(lab, 0, 1, 3_000_000, port=5203)
        sent = lab.counters(0) - before
        assert got == 3_000_000
        mbit = got * 8 / secs / 1e6
        assert 0.75 * 40 <= mbit <= 1.25 * 40, f"{mbit:.1f} Mbit/s through a 40 Mbit/s link"
        assert sent.tx_bytes >= 3_000_000  # payload plus headers left site 0's interface
        up = lab.shaper_stats(0)["upload"]
        assert up["bytes"] >= 3_000_000 and up["drops"] == 0

        # change the rate in place, and the reverse direction sees it
        lab.set_rate(80)
        assert lab.rates == [80.0, 80.0]
        got, secs, _ = _transfer(lab, 1, 0, 3_000_000, port=5204)
        mbit = got * 8 / secs / 1e6
        assert 0.75 * 80 <= mbit <= 1.25 * 80, f"{mbit:.1f} Mbit/s through an 80 Mbit/s link"
    assert netlab.list_labs(prefix) == {}


@pytest.mark.netns
def test_three_sites_reach_each_other(need_netns: None) -> None:
    prefix = _prefix()
    with netlab.Lab(3, None, prefix=prefix) as lab:
        assert lab.rates == [None, None, None]
        for src, dst, port in ((0, 2, 5301), (2, 1, 5302), (1, 0, 5303)):
            assert _transfer(lab, src, dst, 0, port=port)[2] == "ping"
        env = lab.run(2, [sys.executable, "-c", "import os; print(os.environ['GLOO_SOCKET_IFNAME'])"])
        assert env.stdout.strip() == "lab0"
    assert netlab.list_labs(prefix) == {}


@pytest.mark.netns
def test_teardown_when_the_body_raises(need_netns: None) -> None:
    prefix = _prefix()
    holder: list[subprocess.Popen[bytes]] = []
    with pytest.raises(RuntimeError, match="boom"), netlab.Lab(2, 10, prefix=prefix) as lab:
        holder.append(lab.popen(1, ["sleep", "60"]))
        raise RuntimeError("boom")
    assert netlab.list_labs(prefix) == {}
    assert holder[0].poll() is not None, "close() must end the processes it started"


# The child's SIGINT is Python's KeyboardInterrupt whatever this process inherited: a shell without job control
# starts background commands with SIGINT ignored, and Python then keeps it ignored in its children.
_HOLD = """
import signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {bench!r})
from netlab import Lab
with Lab(2, 10, prefix={prefix!r}) as lab:
    lab.popen(0, ["sleep", "60"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print("up", flush=True)
    {action}
"""


def _hold_lab(prefix: str, action: str) -> subprocess.Popen[str]:
    code = _HOLD.format(bench=str(BENCH), prefix=prefix, action=action)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line == "up", proc.stderr.read() if proc.stderr else line
    assert sorted(n for ns in netlab.list_labs(prefix).values() for n in ns) == [
        f"{prefix}-br",
        f"{prefix}-s0",
        f"{prefix}-s1",
    ]
    return proc


@pytest.mark.netns
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_teardown_on_signal(need_netns: None, sig: signal.Signals) -> None:
    prefix = _prefix()
    proc = _hold_lab(prefix, "time.sleep(60)")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)  # seconds when idle; margin for a loaded machine
    assert netlab.list_labs(prefix) == {}
    assert "tearing down" in err
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM
    else:
        assert "KeyboardInterrupt" in err


@pytest.mark.netns
def test_cleanup_removes_a_crashed_run(need_netns: None) -> None:
    prefix = _prefix()
    proc = _hold_lab(prefix, "import os; os._exit(3)")  # no teardown at all
    proc.communicate(timeout=60)
    assert proc.returncode == 3
    left = netlab.list_labs(prefix)
    assert sorted(left.get(prefix, [])) == [f"{prefix}-br", f"{prefix}-s0", f"{prefix}-s1"]
    assert netlab._netns_pids(f"{prefix}-s0"), "the crashed run's process still lives in its namespace"
    cli = subprocess.run(
        [sys.executable, str(BENCH / "netlab.py"), "cleanup", "--prefix", prefix],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert cli.returncode == 0, cli.stderr
    assert "removed 3 namespace(s)" in cli.stdout
    assert netlab.list_labs(prefix) == {}


@pytest.mark.netns
def test_a_clashing_lab_leaves_the_existing_one_alone(need_netns: None) -> None:
    prefix = _prefix()
    with netlab.Lab(2, None, prefix=prefix) as first:
        with pytest.raises(netlab.LabError, match="already exist"):
            netlab.Lab(2, None, prefix=prefix).start()
        assert sorted(first.leftovers()) == sorted(first.namespaces)
        assert _transfer(first, 0, 1, 0)[2] == "ping"
    assert netlab.list_labs(prefix) == {}


@pytest.mark.netns
@pytest.mark.slow
def test_torchrun_gloo_allreduce_across_sites(need_netns: None) -> None:
    """The real launcher across two namespaces: c10d rendezvous, gloo on lab0, bytes through the shaper."""
    pytest.importorskip("torch")
    prefix = _prefix()
    with netlab.Lab(2, 100, prefix=prefix) as lab:
        reports = netlab.run_probe(lab, size_mb=1, iters=2, timeout=120)
    assert netlab.list_labs(prefix) == {}
    assert [r["rank"] for r in reports] == [0, 1]
    assert sorted(r["site"] for r in reports) == [0, 1]
    for r in reports:
        assert r["world"] == 2 and r["iface"] == "lab0"
        # gloo's 2-rank all-reduce sends about one tensor per rank (plus headers and acks)
        assert 0.9 <= r["tx_bytes_per_iter"] / r["bytes"] <= 1.3, r
        # and it cannot beat the 100 Mbit/s link
        assert r["wire_tx_mbit"] <= 110, r
        assert r["ns_tx_bytes"] >= 3 * r["bytes"]  # warm-up + 2 timed all-reduces left the namespace


@pytest.mark.parametrize("op", ["all_reduce", "all_gather", "exchange"])
def test_the_probe_times_checked_collectives_on_localhost(op: str) -> None:
    """allreduce_probe.py under torchrun, 2 gloo processes on loopback (no namespace needed): each rank checks the
    result and reports the collective it timed, the idle time it slept before each, its payload in bytes (float32
    for the all-reduce, uint8 for the all-gather) and one time per iteration."""
    pytest.importorskip("torch")
    probe = [str(BENCH / "allreduce_probe.py"), "--op", op, "--size-mb", "0.01", "--iters", "2", "--idle-s", "0.05"]
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *probe]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    import json

    decoder = json.JSONDecoder()  # the two ranks share torchrun's stdout: a report may not start a line
    parts = proc.stdout.split("PROBE ")[1:]
    reports = sorted((decoder.raw_decode(part)[0] for part in parts), key=lambda r: r["rank"])
    assert [(r["rank"], r["world"], r["op"], r["idle_s"]) for r in reports] == [(0, 2, op, 0.05), (1, 2, op, 0.05)]
    assert {r["bytes"] for r in reports} == {10_000}  # 0.01 MB: 2,500 float32 or 10,000 uint8
    assert all(len(r["sec_all"]) == 2 and min(r["sec_all"]) > 0 for r in reports)


def test_the_probe_refuses_a_negative_idle_time() -> None:
    """netlab.py probe --idle-s -1: refused by argparse with the value and the rule, before any namespace."""
    with pytest.raises(SystemExit) as exc:
        netlab.main(["probe", "--idle-s", "-1"])
    assert exc.value.code == 2


def test_a_collective_is_done_when_its_slowest_rank_is() -> None:
    """collective_seconds: per iteration the max over ranks (the probe's row 'all'), so a collective that one
    rank always finishes late shows, where each rank's own median would hide it half the time."""
    reports = [{"sec_all": [0.9, 1.4, 0.95]}, {"sec_all": [1.5, 0.92, 0.97]}]
    assert netlab.collective_seconds(reports) == [1.5, 1.4, 0.97]
    with pytest.raises(ValueError):  # ranks that timed different numbers of iterations: refused
        netlab.collective_seconds([{"sec_all": [1.0]}, {"sec_all": [1.0, 2.0]}])
