"""``eagerloco train --fault-tolerance``: one process per site (docs/fault-tolerance.md). Bad input is a one-line
error before anything starts; two sites, one hosting the lighthouse, train together and log their membership."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from eagerloco import configs
from eagerloco.cli.main import main as cli

SMOKE = str(configs.path("smoke"))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--fault-tolerance", "nohost"], r"run.fault_tolerance='nohost': must be HOST:PORT of the lighthouse"),
        (["--fault-tolerance", "127.0.0.1:1", "--mode", "dp"], r"needs a DiLoCo mode"),
        (["--fault-tolerance", "127.0.0.1:1", "--ft-shard", "2"], r"run.ft_shard=2: must be in \[0, workers=2\)"),
        (["--fault-tolerance", "127.0.0.1:1", "--checkpoint-every", "1"], r"--resume and --checkpoint-every"),
        (["--fault-tolerance", "127.0.0.1:1", "--launch", "simulated"], r"one process per site"),
        (["--fault-tolerance", "127.0.0.1:1", "--ft-join-timeout-ms", "0"], r"run.ft_join_timeout_ms=0: must be >= 1"),
        (["--fault-tolerance", "[::1]:x"], r"run.fault_tolerance='\[::1\]:x': must be HOST:PORT"),
        (
            ["--fault-tolerance", "127.0.0.1:1", "--mode", "eager", "--eager-own-weight", "0.25"],
            r"outer.eager_own_weight=0.25: below 1/M = 0.5 for run.workers=2",
        ),
    ],
)
def test_fault_tolerance_bad_values_are_clear_errors_before_training(tmp_path, flags, message) -> None:
    with pytest.raises(SystemExit, match=message):
        cli(["train", "--config", SMOKE, "--out-dir", str(tmp_path / "bad"), "--workers", "2", *flags])
    assert not (tmp_path / "bad").exists()


def _free_port() -> int:
    """A port P with P and P + 1 free (the lighthouse and, on P + 1, its coordination store), drawn below the
    kernel's ephemeral range: a port the kernel hands out meanwhile to a socket bound to port 0 (the other site's own
    store, any client connection) cannot be either of them. Drawing P from port 0 could not promise that for P + 1."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    draw = random.SystemRandom()
    for _ in range(200):
        port = draw.randrange(10000, low - 1)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("0.0.0.0", port))
                b.bind(("0.0.0.0", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no two free consecutive ports found in [10000, {low})")


@pytest.mark.parametrize("host", ["127.0.0.1", pytest.param("::1", marks=pytest.mark.slow)])
def test_two_sites_train_together(tmp_path: Path, host: str) -> None:
    """Two sites on one machine; also over IPv6 (the lighthouse as [::1]:PORT, each site's own address bare)."""
    pytest.importorskip("torchft")
    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    lighthouse = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    common = ["--config", SMOKE, "--steps", "20", "--eval-every", "0", "--threads", "1", "--workers", "2",
              "--fault-tolerance", lighthouse, "--collective-timeout-s", "60", "--ft-host", host]  # fmt: skip
    sites = [
        ["--ft-lighthouse", "--ft-min-replicas", "2", "--ft-replica-id", "a", "--ft-shard", "0",
         "--ft-join-timeout-ms", "5000"],
        ["--ft-replica-id", "b", "--ft-shard", "1"],
    ]  # fmt: skip
    procs = []
    for i, flags in enumerate(sites):
        argv = [sys.executable, "-m", "eagerloco", "train", *common, *flags, "--out-dir", str(tmp_path / f"s{i}")]
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=180)
            outputs.append(out.decode(errors="replace"))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, "\n".join(ln for ln in out.splitlines() if "[INFO]" not in ln)[-3000:]
    summaries = [json.loads((tmp_path / f"s{i}" / "summary.json").read_text()) for i in range(2)]
    assert summaries[0]["eval_loss"] == summaries[1]["eval_loss"]  # eager: consolidated into one model
    for i in range(2):
        records = [json.loads(line) for line in (tmp_path / f"s{i}" / "metrics.jsonl").read_text().splitlines()]
        membership = [r for r in records if r["type"] == "membership"]
        assert [r["inner_step"] for r in membership] == [0, 5, 10, 15, 20]  # the attach, then every sync point
        assert {r["members"] for r in membership} == {2} and {r["quorum_id"] for r in membership} == {1}
        assert (tmp_path / f"s{i}" / "model.pt").exists()
