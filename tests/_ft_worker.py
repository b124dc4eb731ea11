"""One fault-tolerant worker process for tests/test_ft_*.py (a real process: gloo over 127.0.0.1, torchft).

Usage: python _ft_worker.py JSON_SPEC. The spec names the lighthouse and store, this worker's replica id, the mode,
the schedule, where to write its results, an optional inner step at which it kills itself with SIGKILL, and how
long to train: ``steps`` inner steps, or until the coordination store's key ``test/stop_at`` (set by a worker that
joined: its join step plus ``extra_after_join`` inner steps).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time

import torch

torch.set_num_threads(1)

from _toy import TinyNet  # noqa: E402
from eagerloco import DiLoCoConfig  # noqa: E402
from eagerloco.ft import FaultTolerance  # noqa: E402


def digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def outer_digest(loco) -> str:
    tensors = []
    for state in loco.states:
        tensors.append(state.phi)
        for value in state.outer_optimizer.state.values():
            tensors.extend(v for v in value.values() if isinstance(v, torch.Tensor))
    return digest(tensors)


def main() -> None:
    spec = json.loads(sys.argv[1])
    config = DiLoCoConfig(**spec["config"])
    ft = FaultTolerance(spec["lighthouse"], spec["store"], spec["replica_id"], min_replicas=spec.get("min_replicas", 1),
                        timeout_s=spec.get("timeout_s", 10.0))  # fmt: skip
    if spec.get("kill_in_launch_at") is not None:  # die inside a sync point: after its quorum, before the launch
        take_quorum = ft._quorum_for_launch

        def quorum_then_die() -> None:
            take_quorum()
            if ft.engine is not None and ft.engine.inner_step == spec["kill_in_launch_at"]:
                os.kill(os.getpid(), signal.SIGKILL)

        ft._quorum_for_launch = quorum_then_die
    model = TinyNet(seed=spec.get("model_seed", 0))
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    if spec.get("start_together"):  # the first quorum holds every initial worker (a slow start is not a join)
        ft.coord.add("test/ready", 1)
        while int(ft.coord.add("test/ready", 0)) < spec["start_together"]:
            time.sleep(0.05)
    start = time.perf_counter()
    loco = ft.diloco(model, inner, config)
    attach_s = time.perf_counter() - start
    joined_at = loco.inner_step
    if spec.get("extra_after_join") is not None and ft.stats.heals and joined_at > 0:
        ft.coord.compare_set("test/stop_at", "", str(joined_at + spec["extra_after_join"]))
    generator = torch.Generator().manual_seed(1000 + spec["data_seed"])
    w = torch.randn(4, 1, generator=generator)
    records = []
    losses = []
    stop_at = spec.get("steps")
    H = config.sync_every // config.num_fragments  # one sync point per fragment offset
    print(f"{spec['replica_id']} attached at inner step {joined_at}", flush=True)
    while True:
        t = loco.inner_step
        if stop_at is not None and t >= stop_at:
            break
        if spec.get("kill_at") is not None and t == spec["kill_at"]:
            os.kill(os.getpid(), signal.SIGKILL)
        x = torch.randn(16, 4, generator=generator)
        y = x @ w + 0.1 * spec["data_seed"]
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        inner.step()
        inner.zero_grad()
        losses.append(float(loss.detach()))
        loco.step()
        if spec.get("step_sleep_s"):  # leave CPU to a restarting worker on a small machine
            time.sleep(spec["step_sleep_s"])
        if loco.inner_step % H == 0:
            rec = ft.stats.records[-1]
            records.append({"t": loco.inner_step, "digest": outer_digest(loco), "quorum": rec.quorum_id,
                            "members": rec.members})  # fmt: skip
            if spec.get("steps") is None and ft.coord.check(["test/stop_at"]):
                stop_at = int(ft.coord.get("test/stop_at"))
    if spec.get("die_before_finish"):  # dies between its last sync point and the final average of φ
        os.kill(os.getpid(), signal.SIGKILL)
    loco.finalize()
    finalized_phi = {k: v.clone() for k, v in loco.outer_parameters().items()}
    if spec.get("finish"):
        ft.finish(loco)  # (finalize again is a no-op) then, in eager, the average of φ over the survivors
    final_digest = outer_digest(loco)
    torch.save(
        {
            "records": records,
            "losses": losses,
            "joined_at": joined_at,
            "attach_s": attach_s,
            "final_digest": final_digest,
            "phi": {k: v.clone() for k, v in loco.outer_parameters().items()},
            "finalized_phi": finalized_phi,
            "theta": {k: v.detach().clone() for k, v in model.named_parameters()},
            "ft": ft.stats.to_dict(),
            "engine": loco.stats.to_dict(),
            "inner_step": loco.inner_step,
        },
        spec["out"],
    )
    print(f"{spec['replica_id']} done at inner step {loco.inner_step}", flush=True)
    ft.shutdown()
    os._exit(0)  # torchft's server threads may linger; the results are written


if __name__ == "__main__":
    main()
