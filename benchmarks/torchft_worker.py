"""One replica of a torchft DiLoCo / streaming DiLoCo run that trains exactly what ``eagerloco train`` trains.

Started by ``torchft_compare.py``, one process per link-lab namespace (torchft replicas are independent processes
with a replica group of one rank each, joined by torchft's lighthouse; no torchrun)::

    python benchmarks/torchft_worker.py --mode sync --steps 120 --sync-every 30 \\
        --replica 0 --replicas 2 --lighthouse http://[fd00:e1::1]:29510 \\
        --store-addr fd00:e1::1 --barrier-addr fd00:e1::1 --barrier-port 29600 --result r0.json

It takes every ``eagerloco train`` flag (``eagerloco.lm.config``: same defaults, same TOML files) and builds, for
replica r of M, exactly what ``eagerloco.train.train_worker`` builds for worker r: the GPT from the same config and
seed (bitwise identical on every replica), the same data shard and batches (``LMData.sampler(seed, worker=r,
num_workers=M)``), AdamW over ``model.optimizer_groups`` with the same warm-up + cosine schedule
(``eagerloco.train.lr_at``) and gradient clipping, outer SGD with (Nesterov) momentum at the same lr, one outer
optimizer per fragment, the same H and, with P fragments, the same parameter split (``build_fragments``, strided
by block). ``--mode sync`` runs torchft ``DiLoCo`` with one fragment and ``fragment_sync_delay=0``; ``--mode
overlap`` runs streaming DiLoCo with ``--num-fragments`` fragments, ``fragment_sync_delay = --overlap-steps`` and
``fragment_update_alpha = --alpha``. Other eagerloco modes do not exist in torchft.

Measured like eagerloco's engine measures a run (``eagerloco/engine/metrics.py``): the clock covers the training
loop only (start-up and the final evaluation excluded); *outer* time is what torchft's optimizer hook spends after
AdamW's own step (timed by a post-hook registered before torchft's and one registered after it), *inner* time is
the rest of the loop (data, forward, backward, clipping, AdamW), CU = inner / wall. Inside the outer time,
*blocked* is the time in ``Manager.start_quorum`` (the lighthouse quorum, a barrier across replicas; the first one
also configures the gloo process group), in waits on the all-reduces, and in ``Manager.should_commit``.

Before the loop the replicas meet at a barrier (a TCPStore on replica 0), as eagerloco's workers do in the
wrapper's start-up collectives, so that start-up skew is not counted as blocked time. ``init_sync=False``:
identical seeds make identical models (checked: the driver compares the parameter hashes), and torchft's
checkpoint transport advertises an address that does not resolve across namespaces (``shared/PEERS.md``).

Fault tolerance (``ft_lab.py``): with ``--min-replicas`` below ``--replicas`` the survivors of a killed replica go
on in smaller quorums; a replica restarted with ``--rejoin`` skips the start barrier and heals through torchft's
own recovery: at its first quorum (after its first H local steps, where torchft's DiLoCo takes a quorum) it loads
a live peer's state over torchft's HTTP checkpoint transport (advertising ``--store-addr``, not the host name):
the peer's model and AdamW state and loop step (registered here) and its fragments' global parameters and outer
optimizer state (registered by torchft's DiLoCo), then continues at the peer's step. ``--steps-log`` writes one
JSON line per inner step (``inner``: step, loop time), per quorum (``membership``: inner step, participants,
quorum id, seconds) and per sync (``sync``: committed or not), the records ``ft_lab.py`` reads.

Writes a JSON report to ``--result``. Needs ``torchft`` (``pip install torchft==0.2.0``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn


class ParamGroup(nn.Module):
    """A module that holds given parameters of another module (shared, not copied), for torchft's fragments."""

    def __init__(self, names: list[str], params: list[nn.Parameter]) -> None:
        super().__init__()
        for name, p in zip(names, params, strict=True):
            self.register_parameter(name.replace(".", "__"), p)


def params_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Timers:
    """Seconds spent in torchft's blocking calls, per kind, and per sync."""

    def __init__(self) -> None:
        self.quorum_s = 0.0
        self.wait_s = 0.0
        self.commit_s = 0.0
        self.payload_bytes = 0
        self.allreduces = 0

    @property
    def blocked_s(self) -> float:
        return self.quorum_s + self.wait_s + self.commit_s

    def snapshot(self) -> dict[str, float]:
        return {"quorum_s": self.quorum_s, "wait_s": self.wait_s, "commit_s": self.commit_s}


class _TimedWork:
    """Delegates to a torchft Work; times ``wait()``."""

    def __init__(self, work: Any, timers: Timers) -> None:
        self._work = work
        self._timers = timers

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self._work.wait(*args, **kwargs)
        finally:
            self._timers.wait_s += time.perf_counter() - start

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


def instrument(manager: Any, timers: Timers) -> None:
    """Time the manager's blocking calls (instance attributes shadow the methods; behaviour is unchanged)."""
    start_quorum, should_commit, allreduce = manager.start_quorum, manager.should_commit, manager.allreduce

    def timed_start_quorum(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return start_quorum(*args, **kwargs)
        finally:
            timers.quorum_s += time.perf_counter() - start

    def timed_should_commit(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return should_commit(*args, **kwargs)
        finally:
            timers.commit_s += time.perf_counter() - start

    def timed_allreduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        timers.payload_bytes += tensor.numel() * tensor.element_size()
        timers.allreduces += 1
        return _TimedWork(allreduce(tensor, *args, **kwargs), timers)

    manager.start_quorum = timed_start_quorum
    manager.should_commit = timed_should_commit
    manager.allreduce = timed_allreduce


def barrier(store: Any, key: str, count: int, timeout_s: float = 300.0) -> None:
    store.add(key, 1)
    deadline = time.monotonic() + timeout_s
    while int(store.add(key, 0)) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier {key!r}: not all {count} replicas arrived within {timeout_s:.0f} s")
        time.sleep(0.01)


def build_parser() -> argparse.ArgumentParser:
    from eagerloco.lm.config import add_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="TOML experiment file, as for eagerloco train")
    w = p.add_argument_group("torchft replica")
    w.add_argument("--replica", type=int, required=True, help="this replica's index r (its data shard is worker r's)")
    w.add_argument("--replicas", type=int, default=2, help="M: number of replicas (min_replica_size)")
    w.add_argument("--lighthouse", required=True, help="lighthouse URL, e.g. http://[fd00:e1::1]:29510")
    w.add_argument("--store-addr", required=True, help="this replica's address (its manager's TCPStore binds here)")
    w.add_argument("--barrier-addr", required=True, help="replica 0's address: it hosts the start/end barrier")
    w.add_argument("--barrier-port", type=int, required=True)
    w.add_argument("--result", required=True, help="write the JSON report here")
    w.add_argument("--bucketize", action="store_true", help="torchft's use_bucketization (one flat all-reduce)")
    w.add_argument("--timeout-s", type=float, default=120.0, help="torchft's collective and quorum timeouts")
    w.add_argument("--min-replicas", type=int, default=None, help="torchft's min_replica_size (default: --replicas)")
    w.add_argument("--rejoin", action="store_true", help="a restarted replica: no start barrier, heal from a peer")
    w.add_argument("--steps-log", default=None, help="JSON lines per inner step, quorum and sync (ft_lab.py)")
    add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from eagerloco.lm.config import RECIPE_FIELDS, from_args

    config = from_args(args)
    if config.outer.mode not in ("sync", "overlap"):
        raise SystemExit(
            f"torchft has DiLoCo (--mode sync) and streaming DiLoCo (--mode overlap), not {config.outer.mode!r}"
        )
    torch.set_num_threads(config.run.threads or 1)

    from torch.distributed import TCPStore
    from torchft import Manager, ProcessGroupGloo
    from torchft.local_sgd import DiLoCo

    from eagerloco.engine.fragments import build_fragments
    from eagerloco.launch import load_data as eagerloco_load_data
    from eagerloco.lm.model import GPT, GPTConfig, evaluate_loss
    from eagerloco.train import lr_at

    rank, world = args.replica, args.replicas
    data = eagerloco_load_data(config)
    model_cfg = GPTConfig(**{**config.model.to_dict(), "vocab_size": data.vocab_size})
    model = GPT(model_cfg, seed=config.run.seed)
    init_hash = params_hash(model)
    o, out = config.optim, config.outer
    inner = torch.optim.AdamW(model.optimizer_groups(o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2))
    eval_batches = data.eval_batches(config.data.eval_batch_size, model_cfg.seq_len, config.data.eval_batches)
    sampler = data.sampler(
        config.data.batch_size, model_cfg.seq_len, seed=config.run.seed, worker=rank, num_workers=world,
        sharding=config.data.sharding,
    )  # fmt: skip

    # Fragments: eagerloco's split. eagerloco's fragment p syncs at t = p·H/P (mod H), so fragment 0 goes last in a
    # period; torchft syncs its fragments in list order starting at H/P, so pass them rotated by one.
    num_fragments = out.num_fragments if out.mode == "overlap" else 1
    frags = build_fragments(model, num_fragments, out.sync_every, out.fragment_layout)
    order = frags[1:] + frags[:1]
    modules = [ParamGroup(f.names, f.params) for f in order]
    outer_opts = [
        torch.optim.SGD(m.parameters(), lr=out.outer_lr, momentum=out.outer_momentum,
                        nesterov=out.nesterov and out.outer_momentum > 0)
        for m in modules
    ]  # fmt: skip
    delay = out.overlap_steps if out.mode == "overlap" else 0
    alpha = out.alpha if out.mode == "overlap" else 0.0

    # Live recovery (ft_lab.py): the model, AdamW and the loop step of this replica, served to a joiner by torchft's
    # checkpoint transport; torchft's DiLoCo adds its fragments' global parameters and outer optimizers.
    progress: dict[str, Any] = {"step": 0, "resume_at": None, "heals": 0, "state_bytes": 0}

    def user_state() -> dict[str, Any]:
        return {"model": model.state_dict(), "inner": inner.state_dict(), "step": progress["step"]}

    def load_user_state(state: dict[str, Any]) -> None:
        model.load_state_dict(state["model"])
        inner.load_state_dict(state["inner"])
        progress["resume_at"] = int(state["step"])
        progress["heals"] += 1

    # Stores: this replica's manager store, and replica 0's barrier store (the same store on replica 0).
    timeout = timedelta(seconds=args.timeout_s)
    if rank == 0:
        own_store = TCPStore(args.store_addr, args.barrier_port, is_master=True, wait_for_workers=False)
        barrier_store = own_store
    else:
        own_store = TCPStore(args.store_addr, 0, is_master=True, wait_for_workers=False)
        barrier_store = TCPStore(args.barrier_addr, args.barrier_port, is_master=False, timeout=timeout)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timeout),
        load_state_dict=load_user_state,
        state_dict=user_state,
        min_replica_size=args.min_replicas or world,
        use_async_quorum=False,  # DiLoCo requires it
        timeout=timeout,
        quorum_timeout=timeout,
        connect_timeout=timeout,
        replica_id=f"replica{rank}",
        store_addr=args.store_addr,
        store_port=own_store.port,
        rank=0,
        world_size=1,
        lighthouse_addr=args.lighthouse,
        hostname=f"[{args.store_addr}]" if ":" in args.store_addr else args.store_addr,
        init_sync=False,
        checkpoint_transport=advertised_transport(args.store_addr, timeout),
    )
    attach_t = time.perf_counter()
    timers = Timers()
    instrument(manager, timers)
    steps_log = Path(args.steps_log).open("a") if args.steps_log else None  # noqa: SIM115

    def log(record: dict[str, Any]) -> None:
        if steps_log is not None:
            steps_log.write(json.dumps(record) + "\n")
            steps_log.flush()

    quorum, commit = manager.start_quorum, manager.should_commit
    last_members: dict[str, Any] = {"members": None, "committed": 0, "catch_up_s": None, "failed": 0}

    def logged_quorum(*a: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        result = quorum(*a, **kw)
        members = manager.num_participants()
        prev = last_members["members"]
        healed = progress["heals"] > 0 and prev is None
        at = progress["resume_at"] if progress["resume_at"] is not None else progress["step"]  # a heal: the peer's
        log({"type": "membership", "inner_step": at + 1, "members": members,
             "quorum_id": manager._quorum_id, "quorum_s": time.perf_counter() - start,
             "changed": prev is not None and members != prev, "healed": healed})  # fmt: skip
        last_members["members"] = members
        return result

    def logged_commit(*a: Any, **kw: Any) -> Any:
        ok = commit(*a, **kw)
        at = progress["resume_at"] if progress["resume_at"] is not None else progress["step"]
        log({"type": "sync", "step": at + 1, "committed": bool(ok),
             "manager_step": manager.current_step()})  # fmt: skip
        if ok and last_members["catch_up_s"] is None:
            last_members["catch_up_s"] = time.perf_counter() - attach_t
        last_members["failed"] += 0 if ok else 1
        return ok

    manager.start_quorum = logged_quorum
    manager.should_commit = logged_commit

    # Timing hooks around torchft's: registered before DiLoCo's (runs first) and after it (runs last).
    clock: dict[str, float] = {"outer_s": 0.0, "mark": 0.0}
    syncs: list[dict[str, Any]] = []

    def before_torchft(*_: Any) -> None:
        clock["mark"] = time.perf_counter()
        clock["timers"] = timers.snapshot()  # type: ignore[assignment]

    def after_torchft(*_: Any) -> None:
        spent = time.perf_counter() - clock["mark"]
        clock["outer_s"] += spent
        if spent > 1e-3:  # a step with outer work (prepare and/or perform)
            t0 = clock["timers"]
            rec = {k: v - t0[k] for k, v in timers.snapshot().items()}  # type: ignore[index]
            rec.update(step=step + 1, outer_s=spent, manager_step=manager.current_step())
            syncs.append(rec)

    h_before = inner.register_step_post_hook(before_torchft)
    steps = config.run.steps
    step = 0
    loss_value = float("nan")
    if not args.rejoin:
        barrier(barrier_store, "start", world)
    with DiLoCo(
        manager,
        modules,
        inner,
        outer_opts,
        sync_every=out.sync_every,
        fragment_sync_delay=delay,
        fragment_update_alpha=alpha,
        use_bucketization=args.bucketize,
    ) as diloco:
        h_after = inner.register_step_post_hook(after_torchft)
        count_state_bytes(manager, progress)
        loop_start = time.perf_counter()
        trained = 0
        step = 0
        while step < steps:
            progress["step"] = step
            lr = lr_at(step, config)
            for group in inner.param_groups:
                group["lr"] = lr
            x, y = sampler.next_batch()
            _, loss = model(x, y)
            loss.backward()
            if o.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            inner.step()  # torchft's post-hook: prepare (quorum, launch) and perform (wait, commit, outer step)
            inner.zero_grad(set_to_none=True)
            loss_value = loss.item()
            trained += 1
            if progress["resume_at"] is not None:  # healed: continue at the peer's step (its sync point)
                step, progress["resume_at"] = progress["resume_at"], None
            step += 1
            log({"type": "inner", "step": step, "time_s": time.perf_counter() - loop_start, "loss": loss_value})
        wall = time.perf_counter() - loop_start
        h_after.remove()
    h_before.remove()

    # The global (outer) parameters: torchft keeps them per fragment as `original_parameters`; load them.
    for fragment in diloco._fragments:
        fragment.restore_parameters()
    eval_loss = evaluate_loss(model, eval_batches)
    final_hash = params_hash(model)
    barrier(barrier_store, "end", world)
    if rank == 0:  # replica 0 hosts the barrier store: it leaves last
        barrier(barrier_store, "left", world)
    else:
        barrier_store.add("left", 1)

    outer_steps = sum(1 for s in syncs if s["wait_s"] > 0 or s["commit_s"] > 0)
    tokens = trained * config.data.batch_size * model_cfg.seq_len
    report = {
        "replica": rank,
        "replicas": world,
        "mode": out.mode,
        "steps": steps,
        "sync_every": out.sync_every,
        "num_fragments": num_fragments,
        "fragment_sync_delay": delay,
        "fragment_update_alpha": alpha,
        "bucketize": args.bucketize,
        "params": model.num_parameters(),
        "num_layers": model_cfg.n_layer,
        "tokens_this_replica": tokens,
        "wall_s": wall,
        "outer_s": clock["outer_s"],
        "inner_s": wall - clock["outer_s"],
        "utilization": (wall - clock["outer_s"]) / wall if wall > 0 else 1.0,
        "blocked_s": timers.blocked_s,
        "quorum_s": timers.quorum_s,
        "wait_s": timers.wait_s,
        "commit_s": timers.commit_s,
        "overhead_s": clock["outer_s"] - timers.blocked_s,
        "outer_steps": outer_steps,
        "manager_step": manager.current_step(),
        "allreduces": timers.allreduces,
        "payload_bytes": timers.payload_bytes,
        "inner_step_time_s": (wall - clock["outer_s"]) / max(1, trained),
        "trained_steps": trained,
        "rejoin": args.rejoin,
        "heals": progress["heals"],
        "state_bytes_received": progress["state_bytes"],
        "catch_up_s": last_members["catch_up_s"] if args.rejoin else None,
        "failed_commits": last_members["failed"],
        "final_train_loss": loss_value,
        "eval_loss": eval_loss,
        "outer_recipe": {k: getattr(out, k) for k in sorted(RECIPE_FIELDS)},
        "init_params_hash": init_hash,
        "final_params_hash": final_hash,
        "syncs": syncs,
        "torchft_version": _version("torchft"),
        "torch_version": torch.__version__,
        "gloo_socket_ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
    }
    Path(args.result).write_text(json.dumps(report, indent=2))
    if steps_log is not None:
        steps_log.close()
    manager.shutdown(wait=False)
    return 0


def advertised_transport(addr: str, timeout: timedelta) -> Any:
    """torchft's HTTP checkpoint transport, advertising ``addr`` (it advertises ``gethostname()``, which does not
    resolve across network namespaces: shared/PEERS.md)."""
    from torchft.checkpointing.http_transport import HTTPTransport

    host = f"[{addr}]" if ":" in addr else addr

    class Advertised(HTTPTransport):
        def address(self) -> str:
            return f"http://{host}:{self._server.socket.getsockname()[1]}/checkpoint/"

    return Advertised(timeout=timeout, num_chunks=0)


def count_state_bytes(manager: Any, progress: dict[str, Any]) -> None:
    """Count the tensor bytes every registered load function of the manager receives (a joiner's heal)."""

    def nbytes(obj: Any) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(nbytes(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(nbytes(v) for v in obj)
        return 0

    def wrap(fn: Any) -> Any:
        def counted(state: Any) -> None:
            progress["state_bytes"] += nbytes(state)
            fn(state)

        return counted

    fns = manager._load_state_dict_fns
    for key in list(fns):
        fns[key] = wrap(fns[key])


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
