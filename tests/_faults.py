"""Fault-injection driver for tests/test_reliability.py: ``python _faults.py JOBS.json RESULTS.json``.

One process imports torch once and forks every worker of every job (gloo on 127.0.0.1, one thread each), so a
dozen kill -9 scenarios fit in seconds. Like torchrun's agent, this driver hosts the rendezvous store, so it
outlives any worker and the survivors can say which peer stopped answering.

A job is a dict:

    kind      "train" (TinyNet with DiLoCo, checkpoints at every outer step) or "mismatch" (rank 1 builds another
              model)
    mode, world, steps, sync_every, fragments, nonfinite, timeout
    run_dir   checkpoints go here; ``resume`` continues from the newest valid one
    victim, kill_at, phase   kill -9 worker ``victim`` at inner step ``kill_at`` (1-based):
              "before"     just before the step() that launches the outer collective
              "during"     right after the collective is issued (inside step(), before any wait)
              "after"      right after that step() returned
              "checkpoint" after writing its checkpoint file, before the barrier (the checkpoint stays unfinished)
              "inner"      at an inner step that is not a sync point
    nan_rank, nan_at   write NaN into worker ``nan_rank``'s parameters before step() at inner step ``nan_at``

Per worker the result holds its exit status, the final outer parameters (when it finished), the error it
stopped with, and wall-clock times (kill, error) to measure how fast the survivors noticed.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from _toy import TinyNet
from eagerloco import DiLoCo, DiLoCoConfig, TorchDistributedCommunicator
from eagerloco.comm.base import CollectiveAborted, CollectiveTimeout, Communicator, Work
from eagerloco.engine.diloco import ModelMismatch, NonFiniteOuterGradient
from eagerloco.lm import checkpoint as ckpt

EXIT = {CollectiveTimeout: 3, CollectiveAborted: 3, NonFiniteOuterGradient: 4, ModelMismatch: 5}


class KillingComm(Communicator):
    """Delegates to ``inner``; kills this process (SIGKILL) right after issuing a collective once armed."""

    def __init__(self, inner: Communicator) -> None:
        self.inner = inner
        self.rank = inner.rank
        self.world_size = inner.world_size
        self.stats = inner.stats
        self.default_timeout = inner.default_timeout
        self.armed: str | None = None

    @property
    def backend(self) -> str:
        return self.inner.backend

    def _maybe_die(self) -> None:
        if self.armed is not None:
            die(self.armed)

    def all_reduce_sum(self, tensor: torch.Tensor) -> Work:
        work = self.inner.all_reduce_sum(tensor)
        self._maybe_die()
        return work

    def all_gather(self, output: torch.Tensor, tensor: torch.Tensor) -> Work:
        work = self.inner.all_gather(output, tensor)
        self._maybe_die()
        return work

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> Work:
        return self.inner.broadcast(tensor, src)

    def all_gather_object(self, obj: Any) -> list[Any]:
        return self.inner.all_gather_object(obj)

    def diagnose_peers(self) -> str:
        return self.inner.diagnose_peers()


_OUT: dict[str, Any] = {}


def die(where: str) -> None:
    """kill -9 this process, after noting when (for the detection latency)."""
    Path(_OUT["path"]).write_text(json.dumps({"killed": where, "kill_time": time.time()}))
    os.kill(os.getpid(), signal.SIGKILL)


def batch(rank: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Worker ``rank``'s batch at inner step t: a function of (rank, t) only, so a resumed run sees the same."""
    g = torch.Generator().manual_seed(7919 * rank + t)
    w = torch.linspace(-1.0, 1.0, 4).unsqueeze(1) * (1 + rank)
    x = torch.randn(16, 4, generator=g)
    return x, x @ w + 0.1 * rank


def train(job: dict[str, Any], rank: int, comm: Communicator) -> dict[str, Any]:
    config = DiLoCoConfig(
        mode=job["mode"],
        sync_every=job["sync_every"],
        num_fragments=job.get("fragments", 1),
        nonfinite=job.get("nonfinite", "raise"),
        collective_timeout_s=job["timeout"],
        compression=job.get("compression", "none"),
    )
    model = TinyNet(width=9 if job["kind"] == "mismatch" and rank == 1 else 8)
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    killer = KillingComm(comm)
    loco = DiLoCo(model, inner, config, comm=killer)
    run_dir = Path(job["run_dir"])
    start, resumed_from = 0, None
    if job.get("resume"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            directory = ckpt.latest_valid(run_dir)
        _OUT["warnings"] = [str(w.message) for w in caught]
        assert directory is not None, "no checkpoint to resume from"
        state = ckpt.load_worker(directory, rank, comm.world_size)
        model.load_state_dict(state["model"])
        inner.load_state_dict(state["inner_optimizer"])
        loco.load_state_dict(state["outer"])
        start = resumed_from = state["inner_step"]
    victim = job.get("victim") == rank
    H = job["sync_every"]
    for t in range(start + 1, job["steps"] + 1):  # t: the inner step count after this step
        x, y = batch(rank, t)
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        inner.step()
        inner.zero_grad()
        if job.get("nan_rank") == rank and job.get("nan_at") == t:
            with torch.no_grad():
                model.head.weight[0, 0] = float("nan")
        if victim and t == job["kill_at"]:
            phase = job["phase"]
            if phase in ("before", "inner"):
                die(phase)
            if phase == "during":
                killer.armed = "during"
        loco.step()
        if victim and t == job["kill_at"] and job["phase"] == "after":
            die("after")
        if t % H == 0 and t < job["steps"]:
            state = {
                "inner_step": t,
                "model": model.state_dict(),
                "inner_optimizer": inner.state_dict(),
                "outer": loco.state_dict(),
            }
            digest = ckpt.save_worker(run_dir, t, rank, state)
            if victim and t == job["kill_at"] and job["phase"] == "checkpoint":
                die("checkpoint")
            digests = comm.all_gather_object(digest)
            if rank == 0:
                ckpt.commit(run_dir, t, comm.world_size, digests, keep=3)
    loco.finalize()
    loco.consolidate()
    return {
        "phi": {k: v.clone() for k, v in loco.outer_parameters().items()},
        "resumed_from": resumed_from,
        "skipped": loco.stats.skipped_outer_steps,
        "outer_steps": loco.stats.outer_steps,
    }


def worker(job: dict[str, Any], rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    _OUT["path"] = out
    result: dict[str, Any] = {"rank": rank}
    code = 0
    try:
        store = dist.TCPStore("127.0.0.1", port, job["world"], is_master=False, timeout=timedelta(seconds=30))
        store = dist.PrefixStore(f"job-{job['id']}", store)
        timeout = timedelta(seconds=job["timeout"])
        dist.init_process_group("gloo", store=store, rank=rank, world_size=job["world"], timeout=timeout)
        comm = TorchDistributedCommunicator(timeout=job["timeout"])
        trained = train(job, rank, comm)
        torch.save(trained["phi"], out + ".phi.pt")
        result.update({k: v for k, v in trained.items() if k != "phi"})
    except Exception as exc:  # the errors a user would read: type and message
        result.update(error=type(exc).__name__, message=str(exc), error_time=time.time())
        code = next((c for cls, c in EXIT.items() if isinstance(exc, cls)), 9)
        if code == 9:
            result["traceback"] = traceback.format_exc()
    result["warnings"] = _OUT.get("warnings", [])
    Path(out).write_text(json.dumps(result))
    # No interpreter teardown: a process group whose peer died is not worth destroying cleanly.
    sys.stdout.flush()
    os._exit(code)


def run_job(job: dict[str, Any], port: int, workdir: Path) -> list[dict[str, Any]]:
    ctx = mp.get_context("fork")
    outs = [str(workdir / f"job{job['id']}-rank{r}.json") for r in range(job["world"])]
    procs = [ctx.Process(target=worker, args=(job, r, port, outs[r])) for r in range(job["world"])]
    start = time.time()
    for p in procs:
        p.start()
    deadline = start + job["timeout"] + 30
    for p in procs:
        p.join(max(0.1, deadline - time.time()))
    results = []
    for r, (p, out) in enumerate(zip(procs, outs)):
        if p.is_alive():  # a hang: the very thing this suite exists to rule out
            p.kill()
            p.join()
            results.append({"rank": r, "exitcode": "hung"})
            continue
        data = json.loads(Path(out).read_text()) if Path(out).exists() else {}
        data.update(rank=r, exitcode=p.exitcode, start=start)
        results.append(data)
    return results


def warm_up() -> None:
    """Import lazily loaded modules (torch.optim pulls in torch._dynamo: seconds) once, before forking."""
    from eagerloco.comm import InProcessGroup

    model = TinyNet()
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    loco = DiLoCo(model, inner, DiLoCoConfig(mode="eager", sync_every=1), comm=InProcessGroup(1).communicator(0))
    model(torch.zeros(1, 4)).sum().backward()
    inner.step()
    loco.step()
    torch.save({"outer": loco.state_dict(), "inner": inner.state_dict()}, os.devnull)


def host_store(port: int) -> None:
    """The rendezvous store, in a process of its own: the driver must not hold the store's server thread when it
    forks workers (a thread's lock held at fork time can deadlock the child)."""
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    while True:
        time.sleep(3600)
    del store


def main() -> None:
    torch.set_num_threads(1)  # no intra-op thread pool in the driver: every fork starts from a thread-free process
    warm_up()
    jobs = json.loads(Path(sys.argv[1]).read_text())
    workdir = Path(sys.argv[2]).parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    host = mp.get_context("fork").Process(target=host_store, args=(port,), daemon=True)
    host.start()
    try:
        results = [run_job(job, port, workdir) for job in jobs]
    finally:
        host.kill()
        host.join()
    Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    main()
