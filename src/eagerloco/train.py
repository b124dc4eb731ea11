"""Pretrain a small GPT with DiLoCo, streaming, delayed or eager outer steps: eagerloco's main job.

    eagerloco train                                     # the default: 2 simulated workers, eager, 3-5 min on 2 cores
    eagerloco train --mode sync --out-dir runs/sync     # blocking DiLoCo on the same (emulated) link, to compare
    eagerloco train --mode dp --out-dir runs/dp         # the data-parallel baseline
    eagerloco train --launch processes                  # 2 real processes over gloo on this machine
    eagerloco train --config configs/smoke.toml         # a named experiment (flags still override it)
    torchrun --nproc-per-node 2 -m eagerloco.train --link-mbit 0        # one rank per worker, any torchrun job
    torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        --nproc-per-node 1 -m eagerloco.train --link-mbit 0             # one worker per site

Every worker builds the same model from the same seed, samples its own shard of the text, and trains with AdamW;
the DiLoCo wrapper runs the outer loop after each inner step. The run directory (``--out-dir``) receives
``config.json`` (as resolved), ``metrics.jsonl`` (per inner step: loss and lr; per outer step: the engine's
record; per evaluation: the eval loss of the outer parameters), ``summary.json``, ``checkpoints/`` and
``model.pt`` (the final outer parameters, consolidated). The loop reads top to bottom in :func:`train_worker`.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from eagerloco.comm import Communicator, EmulatedLink, InProcessGroup, TorchDistributedCommunicator, run_workers
from eagerloco.comm.base import CollectiveTimeout
from eagerloco.engine import DiLoCo, RunStats
from eagerloco.engine.config import ConfigError
from eagerloco.engine.data_parallel import GradientAverager
from eagerloco.fileio import atomic_write_bytes
from eagerloco.lm import checkpoint as ckpt
from eagerloco.lm.config import TrainConfig, add_arguments, from_args
from eagerloco.lm.data import LMData, default_cache_dir, prepare_data
from eagerloco.lm.interrupt import AgreedStop, StopSignal, TrainingInterrupted
from eagerloco.lm.model import GPT, GPTConfig, evaluate_loss


# ----------------------------------------------------------------------------------------------- bookkeeping
class MetricsLog:
    """Appends JSON lines to ``metrics.jsonl``; shared by simulated workers (thread-safe)."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self._lock = threading.Lock()
        self._fh = path.open("a") if enabled else None
        self._tb: Any = None

    def attach_tensorboard(self, directory: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise RuntimeError("run.tensorboard=true needs the tensorboard package: pip install tensorboard") from exc
        self._tb = SummaryWriter(str(directory))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps(record)
        with self._lock:
            assert self._fh is not None
            self._fh.write(line + "\n")
            self._fh.flush()  # visible at once to `tail -f`, plots of a live run, and what survives a crash
            if self._tb is not None and record.get("worker", 0) == 0:
                step = record.get("step", record.get("inner_step", 0))
                for key in ("loss", "lr", "eval_loss", "utilization", "blocked_s"):
                    if isinstance(record.get(key), (int, float)):
                        self._tb.add_scalar(f"{record['type']}/{key}", record[key], step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        if self._tb is not None:
            self._tb.close()


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to lr over warmup_steps, then cosine decay to lr·min_lr_ratio at the last step."""
    o, total = config.optim, config.run.steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@dataclass
class WorkerResult:
    """What one worker reports at the end (gathered into summary.json)."""

    rank: int
    params: int
    stats: dict[str, Any]
    final_train_loss: float
    eval_loss: float | None
    comm_payload_bytes: int
    comm_wire_bytes: int
    inner_steps: int
    evals: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- one worker
def train_worker(
    config: TrainConfig,
    comm: Communicator,
    data: LMData,
    run_dir: Path,
    log: MetricsLog,
    control: Communicator | None = None,
    stop: StopSignal | None = None,
) -> WorkerResult:
    """One worker's run. ``control`` (a communicator on a group of its own) and ``stop`` enable the agreed stop
    on SIGINT/SIGTERM (:mod:`eagerloco.lm.interrupt`): it raises :class:`TrainingInterrupted` after writing a
    checkpoint at the agreed inner step."""
    rank, world = comm.rank, comm.world_size
    device = torch.device(config.run.device)
    if config.run.link_mbit > 0 or config.run.link_latency_ms > 0:
        comm = EmulatedLink(comm, config.run.link_mbit * 1e6 or None, config.run.link_latency_ms / 1e3)

    # Model: identical on every worker (same seed); the wrapper also broadcasts worker 0's φ_0 to be sure.
    model_cfg = GPTConfig(**{**config.model.to_dict(), "vocab_size": data.vocab_size})
    model = GPT(model_cfg, seed=config.run.seed).to(device)
    o = config.optim
    inner = torch.optim.AdamW(model.optimizer_groups(o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2))
    dp = config.outer.mode == "dp"
    loco = None if dp else DiLoCo(model, inner, config.outer.diloco(), comm=comm)
    averager = GradientAverager(model, comm, config.outer.collective_timeout_s) if dp else None
    timer: DiLoCo | GradientAverager = averager if dp else loco  # type: ignore[assignment]
    eval_model = GPT(model_cfg, seed=0).to(device)  # evaluates the outer parameters φ mid-run
    eval_batches = data.eval_batches(config.data.eval_batch_size, model_cfg.seq_len, config.data.eval_batches)
    sampler = data.sampler(
        config.data.batch_size, model_cfg.seq_len, seed=config.run.seed, worker=rank, num_workers=world,
        sharding=config.data.sharding,
    )  # fmt: skip
    tokens_per_step = config.data.batch_size * model_cfg.seq_len * world  # global tokens per inner step

    start_step = 0
    elapsed_before = 0.0
    if config.run.resume and (directory := ckpt.latest_valid(run_dir)) is not None:
        state = ckpt.load_worker(directory, rank, world, config.to_dict())
        model.load_state_dict(state["model"])
        inner.load_state_dict(state["inner_optimizer"])
        sampler.load_state_dict(state["sampler"])
        if loco is not None and state["outer"] is not None:
            loco.load_state_dict(state["outer"])
            if loco.finalized and state["inner_step"] < config.run.steps:
                loco.reopen()  # a finished run continued with more steps (possibly in another mode)
        torch.set_rng_state(state["rng"])
        start_step = state["inner_step"]
        elapsed_before = state["elapsed_s"]
    if loco is not None:
        loco.add_record_listener(
            lambda r: log.write(
                {"type": "outer", "worker": rank, "tokens": r.inner_step * tokens_per_step, **r.to_dict()}
            )
        )

    def evaluate(step: int) -> float:
        """Eval loss of this worker's outer parameters φ (θ for dp), on the fixed validation windows."""
        with timer.paused():
            if loco is not None:
                loco.copy_outer_parameters_to(eval_model)
            else:
                eval_model.load_state_dict(model.state_dict())
            loss = evaluate_loss(eval_model, eval_batches, device)
            log.write({"type": "eval", "worker": rank, "step": step, "tokens": step * tokens_per_step,
                       "time_s": elapsed(), "eval_loss": loss})  # fmt: skip
        return loss

    def save_checkpoint(step: int) -> None:
        """Every worker writes its file; worker 0 commits the manifest once all are on disk. Collective: every
        worker calls it at the same inner step (state_dict waits for the averages in flight, then a barrier)."""
        with timer.paused():
            state = {
                "inner_step": step,
                "model": model.state_dict(),
                "inner_optimizer": inner.state_dict(),
                "outer": loco.state_dict() if loco is not None else None,  # waits for averages in flight
                "sampler": sampler.state_dict(),
                "rng": torch.get_rng_state(),
                "elapsed_s": elapsed(),
                "config": config.to_dict(),
            }
            digest = ckpt.save_worker(run_dir, step, rank, state)
            try:
                digests = comm.all_gather_object(digest)  # also the barrier: every file is on disk
            except CollectiveTimeout as exc:
                raise CollectiveTimeout(
                    f"the checkpoint at inner step {step} (outer step {step // config.outer.sync_every}) could not "
                    f"be committed: {exc}"
                ) from exc
            if rank == 0:
                finalized = loco.finalized if loco is not None else True
                ckpt.commit(run_dir, step, world, digests, config.run.keep_checkpoints, config.to_dict(), finalized)

    progress = None
    if rank == 0 and config.run.progress:
        from tqdm import tqdm

        progress = tqdm(total=config.run.steps, initial=start_step, desc=f"{config.outer.mode} x{world}", unit="step")

    # ------------------------------------------------------------------------------------------- the loop
    loop_start = time.perf_counter()
    paused_total = 0.0
    paused_since: float | None = None  # set while evaluating/checkpointing: the clock stands still

    def elapsed() -> float:
        now = time.perf_counter() if paused_since is None else paused_since
        return elapsed_before + now - loop_start - paused_total

    evals: list[dict[str, Any]] = []
    loss_value = float("nan")
    agreed = AgreedStop(control, stop, config.outer.collective_timeout_s) if control and stop else None
    timer.reset_clock()  # measure the loop only, not data preparation and start-up
    for step in range(start_step, config.run.steps):
        lr = lr_at(step, config)
        for group in inner.param_groups:
            group["lr"] = lr
        x, y = sampler.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        _, loss = model(x, y)
        loss.backward()
        if averager is not None:
            averager.average_gradients()  # dp: every step, blocking
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        inner.step()
        inner.zero_grad(set_to_none=True)
        if loco is not None:
            loco.step()  # the outer loop: launches, waits and outer steps happen here
        done = step + 1
        loss_value = loss.item()
        log.write({"type": "inner", "worker": rank, "step": done, "loss": loss_value, "lr": lr,
                   "tokens": done * tokens_per_step, "time_s": elapsed()})  # fmt: skip
        if progress is not None:
            stats = timer.stats
            progress.set_postfix(loss=f"{loss_value:.3f}", cu=f"{stats.utilization:.3f}", refresh=False)
            progress.update(1)
        paused_since = time.perf_counter()
        if config.run.eval_every and done % config.run.eval_every == 0 and done < config.run.steps:
            evals.append({"step": done, "eval_loss": evaluate(done)})
        at_outer_boundary = done % config.outer.sync_every == 0
        outer_index = done // config.outer.sync_every
        every = config.run.checkpoint_every
        checkpointed = bool(every and at_outer_boundary and outer_index % every == 0 and done < config.run.steps)
        if checkpointed:
            save_checkpoint(done)
        # Ctrl+C / SIGTERM: every worker reaches the same decision at the same boundary (interrupt.py).
        if agreed is not None and at_outer_boundary and done < config.run.steps and (signum := agreed.at_boundary()):
            if not checkpointed:
                save_checkpoint(done)
            if progress is not None:
                progress.close()
            raise TrainingInterrupted(signum, done, str(ckpt.step_dir(run_dir, done)))
        paused_total += time.perf_counter() - paused_since
        paused_since = None
    if progress is not None:
        progress.close()

    # Drain what is still in flight, then (eager) average the workers' φ into one model: the model to keep.
    if loco is not None:
        loco.finalize()
        with loco.paused():
            loco.consolidate()
    stats: RunStats = timer.stats
    final_eval = evaluate(config.run.steps)
    evals.append({"step": config.run.steps, "eval_loss": final_eval})
    save_checkpoint(config.run.steps)
    if rank == 0:
        final = {"model_config": model_cfg.to_dict(), "model": model.state_dict(), "train_config": config.to_dict(),
                 "tokenizer": data.tokenizer.fingerprint, "eval_loss": final_eval}  # fmt: skip
        buffer = io.BytesIO()
        torch.save(final, buffer)
        atomic_write_bytes(run_dir / "model.pt", buffer.getvalue())
    return WorkerResult(
        rank=rank,
        params=model.num_parameters(),
        stats=stats.to_dict(),
        final_train_loss=loss_value,
        eval_loss=final_eval,
        comm_payload_bytes=comm.stats.payload_bytes,
        comm_wire_bytes=comm.stats.wire_bytes,
        inner_steps=config.run.steps,
        evals=evals,
    )


# ----------------------------------------------------------------------------------------------- launchers
def load_data(config: TrainConfig) -> LMData:
    """The run's corpus, split and tokenised; sets ``config.model.vocab_size`` from the tokenizer."""
    data = prepare_data(
        config.data.corpus,
        tokenizer=config.data.tokenizer,
        vocab_size=config.data.bpe_vocab_size if config.data.tokenizer == "bpe" else None,
        val_fraction=config.data.val_fraction,
        cache_dir=default_cache_dir(),
    )
    config.model.vocab_size = data.vocab_size
    return data


def prepare_run_dir(config: TrainConfig) -> Path:
    run_dir = Path(config.run.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    if config.run.resume:
        directory = check_resume(config)
        step = int(directory.name.split("-")[1])
        if metrics.exists():  # drop what the interrupted run logged after its checkpoint
            kept = [line for line in metrics.read_text().splitlines() if _step_of(line) <= step]
            atomic_write_bytes(metrics, ("\n".join(kept) + "\n" if kept else "").encode())
    else:
        if (run_dir / "checkpoints").exists():
            import shutil

            shutil.rmtree(run_dir / "checkpoints")
        metrics.write_text("")
    atomic_write_bytes(run_dir / "config.json", json.dumps(config.to_dict(), indent=2).encode())
    return run_dir


def check_resume(config: TrainConfig) -> Path:
    """The checkpoint ``--resume`` will continue from; a clear error (before any worker starts) when there is none
    or when this configuration cannot continue it (lm/checkpoint.py: check_compatible)."""
    run_dir = Path(config.run.out_dir)
    directory = ckpt.latest_valid(run_dir)
    if directory is None:
        raise ckpt.ResumeError(f"--resume: no complete checkpoint under {run_dir / 'checkpoints'}")
    ckpt.check_compatible(directory, config.run.workers, config.to_dict())
    return directory


def _step_of(line: str) -> int:
    record = json.loads(line)
    return int(record.get("step", record.get("inner_step", 0)))


def set_threads(config: TrainConfig, workers_here: int) -> None:
    threads = config.run.threads or max(1, (os.cpu_count() or 1) // workers_here)
    torch.set_num_threads(threads)


def run_simulated(config: TrainConfig, stop: StopSignal | None = None) -> list[WorkerResult]:
    stop = stop or StopSignal()
    set_threads(config, config.run.workers)
    data = load_data(config)
    run_dir = prepare_run_dir(config)
    log = MetricsLog(run_dir / "metrics.jsonl")
    if config.run.tensorboard:
        log.attach_tensorboard(run_dir / "tb")
    group = InProcessGroup(config.run.workers, timeout=config.outer.collective_timeout_s)
    control = InProcessGroup(config.run.workers, timeout=config.outer.collective_timeout_s)  # the stop vote

    def worker(comm: Communicator) -> WorkerResult:
        return train_worker(config, comm, data, run_dir, log, control.communicator(comm.rank), stop)

    try:
        return run_workers(group, worker)
    except RuntimeError as exc:
        if isinstance(exc.__cause__, TrainingInterrupted):  # every worker stopped at the same step
            raise exc.__cause__ from None
        raise
    finally:
        log.close()


def run_torchrun(config: TrainConfig, stop: StopSignal | None = None) -> list[WorkerResult] | None:
    """This process is one rank of a torchrun (or ``--launch processes``) job; rank 0 returns all results."""
    import torch.distributed as dist

    stop = stop or StopSignal()
    world = int(os.environ["WORLD_SIZE"])
    if world != config.run.workers:
        raise SystemExit(f"torchrun started {world} ranks but run.workers={config.run.workers}: pass --workers {world}")
    set_threads(config, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    backend = "nccl" if config.run.device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        config.run.device = f"cuda:{torch.cuda.current_device()}"
    timeout = config.outer.collective_timeout_s
    # The process group's timeout bounds its blocking calls (start-up checks, checkpoint barriers) as
    # collective_timeout_s bounds the outer collectives: a dead peer never blocks anyone for longer.
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout) if timeout else None)
    try:
        rank = dist.get_rank()
        comm = TorchDistributedCommunicator(timeout=timeout)
        # The stop vote on Ctrl+C / SIGTERM runs on a gloo group of its own (interrupt.py); same order on all ranks.
        control = TorchDistributedCommunicator(dist.new_group(backend="gloo"), timeout=timeout)
        check_same_config(config, comm)
        data = load_data(config)
        run_dir = Path(config.run.out_dir)
        if config.run.resume:
            check_resume(config)  # on every rank: a refusal must stop all of them, not leave them at the barrier
        if rank == 0:
            prepare_run_dir(config)
        comm.all_gather_object(None)  # the run directory is ready
        log = MetricsLog(run_dir / "metrics.jsonl")
        if rank == 0 and config.run.tensorboard:
            log.attach_tensorboard(run_dir / "tb")
        try:
            result = train_worker(config, comm, data, run_dir, log, control, stop)
        finally:
            log.close()
        results = comm.all_gather_object(result)
        return results if rank == 0 else None
    finally:
        from eagerloco.comm.torch_dist import stop_heartbeats

        stop_heartbeats()  # no heartbeat thread inside the store while the process group is destroyed
        dist.destroy_process_group()


def check_same_config(config: TrainConfig, comm: Communicator) -> None:
    """Every rank must run the same configuration (else the collectives would not match, or models differ):
    compare before anything else, naming the first difference. Per-machine settings may differ."""
    local = {"run.device", "run.threads", "run.progress", "run.tensorboard"}
    mine = {f"{section}.{k}": v for section, table in config.to_dict().items() for k, v in table.items()}
    mine = {k: v for k, v in mine.items() if k not in local}
    for rank, other in enumerate(comm.all_gather_object(mine)):
        diff = sorted(k for k in mine if other.get(k) != mine[k])
        if diff:
            raise ConfigError(
                f"worker {rank} runs another configuration than worker {comm.rank}: "
                + ", ".join(f"{k}={other.get(k)!r} vs {mine[k]!r}" for k in diff[:5])
            )


def run_processes(config: TrainConfig) -> list[WorkerResult]:
    """Spawn ``workers`` local processes that run :func:`run_torchrun` over gloo; worker 0 writes the summary.

    Like torchrun's agent, this process hosts the rendezvous store, so it outlives any worker and the survivors
    of a crash can still tell which peer stopped answering (comm/torch_dist.py). SIGINT and SIGTERM are
    forwarded to the workers, which stop at an agreed safe point (interrupt.py)."""
    import signal
    import socket

    import torch.distributed as dist

    load_data(config)  # fail here on bad data, and build the tokenizer cache once for all children
    if config.run.resume:
        check_resume(config)
    run_dir = Path(config.run.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = run_dir / "config.launch.json"
    child = TrainConfig.from_dict(config.to_dict())
    child.run.launch = "torchrun"
    resolved.write_text(json.dumps(child.to_dict(), indent=2))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    timeout = timedelta(seconds=config.outer.collective_timeout_s or 1800)
    store = dist.TCPStore("127.0.0.1", port, config.run.workers, is_master=True, wait_for_workers=False,
                          timeout=timeout)  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, frame: Any) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for rank in range(config.run.workers):
            env = dict(os.environ, EAGERLOCO_PARENT=str(os.getpid()), RANK=str(rank), LOCAL_RANK=str(rank),
                       WORLD_SIZE=str(config.run.workers), LOCAL_WORLD_SIZE=str(config.run.workers),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="0",  # the store is ours
                       GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))  # fmt: skip
            cmd = [sys.executable, "-m", "eagerloco.train", "--resolved-config", str(resolved)]
            procs.append(subprocess.Popen(cmd, env=env))
        codes = [p.wait() for p in procs]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        del store
    if any(codes):
        if len(set(codes)) == 1 and codes[0] > 128:  # interrupted: worker 0 said where it stopped
            raise SystemExit(codes[0])
        raise SystemExit(
            f"eagerloco train: error: worker processes exited with codes {codes} (negative: killed by that "
            "signal); their messages are above"
        )
    return [WorkerResult(**r) for r in json.loads((run_dir / "results.json").read_text())]


# ----------------------------------------------------------------------------------------------- summary
def summarize(config: TrainConfig, results: list[WorkerResult], data_summary: str | None = None) -> dict[str, Any]:
    world = len(results)
    steps = config.run.steps
    tokens = steps * config.data.batch_size * config.model.seq_len * world
    walls = [r.stats["wall_s"] for r in results]
    summary = {
        "mode": config.outer.mode,
        "workers": world,
        "launch": config.run.launch,
        "eval_loss": results[0].eval_loss,
        "tokens": tokens,
        "tokens_per_s": tokens / max(walls),
        "wall_s": max(walls),
        "utilization": sum(r.stats["utilization"] for r in results) / world,
        "blocked_s": sum(r.stats["blocked_s"] for r in results) / world,
        "blocked_per_outer_step_s": sum(r.stats["blocked_per_outer_step_s"] for r in results) / world,
        "bytes_sent_per_worker": sum(r.stats["payload_bytes"] for r in results) // world,
        "wire_bytes_per_worker": sum(r.stats["wire_bytes"] for r in results) // world,
        "outer_steps": results[0].stats["outer_steps"],
        # for `eagerloco simulate --from-run`
        "params": results[0].params,
        "num_layers": config.model.n_layer,
        "inner_step_time_s": sum(r.stats["inner_s"] / max(1, r.stats["inner_steps"]) for r in results) / world,
        "sync_every": config.outer.sync_every,
        "num_fragments": config.outer.num_fragments,
        "link_mbit": config.run.link_mbit,
        "link_latency_ms": config.run.link_latency_ms,
        "per_worker": [
            {"rank": r.rank, "eval_loss": r.eval_loss, "final_train_loss": r.final_train_loss, **r.stats}
            for r in results
        ],
        "evals": results[0].evals,
    }
    return summary


def print_summary(summary: dict[str, Any], config: TrainConfig) -> None:
    mode = summary["mode"]
    detail = {
        "dp": "gradients averaged every step",
        "sync": f"H={config.outer.sync_every}",
        "overlap": f"H={config.outer.sync_every}, τ={config.outer.overlap_steps}, α={config.outer.alpha}",
        "delayed": f"H={config.outer.sync_every}, k={config.outer.delay}",
        "eager": f"H={config.outer.sync_every}, k={config.outer.delay}",
    }[mode]
    link = f"emulated {config.run.link_mbit:g} Mbit/s" if config.run.link_mbit else "no emulated link"
    print()
    print(f"eagerloco train: {mode} ({detail}, P={config.outer.num_fragments}), {summary['workers']} workers "
          f"({config.run.launch}), {link}, {summary['params']:,} parameters")  # fmt: skip
    rows = [
        ("eval loss of the outer parameters", f"{summary['eval_loss']:.4f}"),
        ("tokens seen (all workers)", f"{summary['tokens']:,}"),
        ("tokens/s (all workers)", f"{summary['tokens_per_s']:,.0f}"),
        ("wall time of the training loop", f"{summary['wall_s']:.1f} s"),
        ("compute utilization", f"{summary['utilization']:.3f}"),
        ("time blocked on collectives", f"{summary['blocked_s']:.2f} s"),
        ("  per outer step", f"{summary['blocked_per_outer_step_s'] * 1e3:.1f} ms"),
        ("outer steps", f"{summary['outer_steps']}"),
        ("bytes sent per worker", _human(summary["bytes_sent_per_worker"])),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    workers = summary["per_worker"]
    if len(workers) > 1:
        print(f"  {'per worker':<{width}}  " + "  ".join(f"{'worker ' + str(w['rank']):>12}" for w in workers))
        for key, fmt in (("utilization", "{:.3f}"), ("blocked_s", "{:.2f} s"), ("final_train_loss", "{:.4f}")):
            print(f"  {'  ' + key:<{width}}  " + "  ".join(f"{fmt.format(w[key]):>12}" for w in workers))


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000:
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} PB"


# ----------------------------------------------------------------------------------------------- entry
def run(config: TrainConfig) -> dict[str, Any] | None:
    """Run the configured training; return the summary (on the process that writes it, else None)."""
    launch = config.run.launch
    if launch == "auto":
        launch = "torchrun" if "RANK" in os.environ and "WORLD_SIZE" in os.environ else "simulated"
        config.run.launch = launch
    # SIGINT/SIGTERM only set a flag from here on (interrupt.py); the workers agree where to stop. A signal after
    # the training loop lets the run finish normally. The processes launcher forwards signals to its workers.
    stop = StopSignal()
    if launch == "processes":
        results = run_processes(config)
    elif launch == "torchrun":
        with stop.installed():
            gathered = run_torchrun(config, stop)
        if gathered is None:
            return None
        results = gathered
    else:
        with stop.installed():
            results = run_simulated(config, stop)
    summary = summarize(config, results)
    run_dir = Path(config.run.out_dir)
    atomic_write_bytes(run_dir / "summary.json", json.dumps(summary, indent=2).encode())
    if launch == "torchrun":
        atomic_write_bytes(run_dir / "results.json", json.dumps([r.__dict__ for r in results]).encode())
    if launch != "torchrun" or "EAGERLOCO_PARENT" not in os.environ:
        print_summary(summary, config)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eagerloco train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--config", help="TOML experiment file (see configs/); flags override it")
    parser.add_argument("--resolved-config", help=argparse.SUPPRESS)  # --launch processes hands its config over
    add_arguments(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    if args.resolved_config:
        return TrainConfig.from_dict(json.loads(Path(args.resolved_config).read_text())).validate()
    return from_args(args)


def _known_failure(exc: BaseException) -> BaseException | None:
    """The error a user should read, if ``exc`` is (or wraps, e.g. from a simulated worker's thread) one whose
    message says what happened: bad input, a peer that failed, non-finite outer gradients, a refused resume."""
    from torch.distributed import DistError  # rendezvous and store failures (a peer that never came)

    from eagerloco.comm.base import CollectiveAborted, CollectiveTimeout
    from eagerloco.engine.diloco import ModelMismatch, NonFiniteOuterGradient
    from eagerloco.lm.data import CorpusError

    known = (ConfigError, CorpusError, CollectiveTimeout, CollectiveAborted, NonFiniteOuterGradient, ModelMismatch,
             DistError)  # fmt: skip
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, known):
            return seen
        seen = seen.__cause__
    return None


def cli_main(args: argparse.Namespace) -> int:
    """Run from parsed arguments; every expected failure ends in ONE line on stderr and a non-zero exit code:
    bad input or a refused resume (1), a failed peer or non-finite outer gradients (1), an interrupt (128 +
    signal, after the final checkpoint). Under torchrun each rank prints its own line, prefixed with its rank."""
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    try:
        run(config_from_args(args))
    except TrainingInterrupted as exc:
        if rank in (None, "0"):
            print(f"eagerloco train: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(exc.exit_code) from None
    except KeyboardInterrupt:
        print(f"eagerloco train: {prefix}aborted (second signal): no final checkpoint", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except BaseException as exc:
        failure = _known_failure(exc)
        if failure is None:
            raise
        text = " ".join(str(failure).split())  # one line, whatever the message held
        raise SystemExit(f"eagerloco train: error: {prefix}{type(failure).__name__}: {text}") from None
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
