"""The namespace reproduction of docs/scale-out.md: 2 sites x 2 ranks, one network namespace per site, a
rate-limited link between them, each site launched by its own multi-node torchrun agent; run through the one
documented command, ``benchmarks/scale_out_lab.py``. Skips where namespaces can't be made (not root, an
unprivileged container), with ``netns_available()``'s reason."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _netlab() -> ModuleType:
    if "netlab" in sys.modules:  # test_netlab.py loaded it already
        return sys.modules["netlab"]
    spec = importlib.util.spec_from_file_location("netlab", BENCH / "netlab.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["netlab"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.mark.netns
@pytest.mark.slow
def test_two_sites_of_two_ranks_over_a_shaped_link() -> None:
    ok, why = _netlab().netns_available()
    if not ok:
        pytest.skip(why)
    rate, steps, sync_every, n = 5.0, 20, 10, 2
    cmd = [sys.executable, str(BENCH / "scale_out_lab.py"), "--mode", "sync", "--rate", str(rate),
           "--steps", str(steps), "--sync-every", str(sync_every), "--ranks-per-site", str(n), "--json"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "ok: loss fell on every rank" in proc.stdout
    report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("JSON "))[5:])

    # The launch: each site one torchrun agent with --nproc-per-node 2, c10d rendezvous hosted by site 0.
    for site, argv in enumerate(report["argv"]):
        line = " ".join(argv)
        assert "--nnodes 2 --nproc-per-node 2" in line and "--rdzv-backend c10d" in line
        assert f"--rdzv-conf is_host={int(site == 0)}" in line

    ranks = report["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    for site in range(2):  # one site = one worker of 2 ranks, whatever order the agents joined in
        mine = [r for r in ranks if r["site"] == str(site)]
        assert len({r["worker"] for r in mine}) == 1 and sorted(r["inner_rank"] for r in mine) == [0, 1]
        payload = sum(r["payload_bytes"] for r in mine)
        assert payload == steps // sync_every * 4 * mine[0]["params"]  # each rank sent only its share
        tx = report["sites"][site]["tx_bytes"]
        inner = sum(2 * (n - 1) / n * 4 * r["params"] * r["steps"] for r in mine)
        # The outer step crossed the link, DDP's traffic inside the site did not (it would be 10x the payload).
        assert payload <= tx < inner, (payload, tx, inner)
        # Sync blocks for the whole all-reduce: at least the payload's serialisation time at the link rate.
        assert sum(r["blocked_s"] for r in mine) >= 0.8 * payload * 8 / (rate * 1e6)
    assert len({r["digest"] for r in ranks}) == 1  # one final model on all 4 ranks
    assert all(r["final_loss"] < r["initial_loss"] for r in ranks)
