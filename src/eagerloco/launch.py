"""Launching ``eagerloco train``: the run directory, the data, and the three ways to start the workers.

* ``simulated``: M threads of this process over an in-process group (:func:`run_simulated`);
* ``torchrun``: this process is one rank of a torchrun job, gloo or NCCL (:func:`run_torchrun`);
* ``processes``: M local processes that run the torchrun path, this process hosting their TCPStore and
  forwarding SIGINT/SIGTERM to them (:func:`run_processes`).

:func:`run` picks one, then writes ``summary.json`` and prints the table (:mod:`eagerloco.report`). Each worker
runs :func:`eagerloco.train.train_worker`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from eagerloco.comm import Communicator, InProcessGroup, TorchDistributedCommunicator, run_workers
from eagerloco.engine.config import ConfigError
from eagerloco.fileio import atomic_write_bytes
from eagerloco.lm import checkpoint as ckpt
from eagerloco.lm.config import AUTO, TrainConfig
from eagerloco.lm.data import LMData, default_cache_dir, prepare_data
from eagerloco.lm.interrupt import StopSignal, TrainingInterrupted
from eagerloco.lm.runs import read_metrics, record_step
from eagerloco.report import MetricsLog, WorkerResult, print_summary, summarize
from eagerloco.train import train_worker

__all__ = [
    "RunDirectoryError",
    "check_environment",
    "check_resume",
    "check_run_dir",
    "check_same_config",
    "default_run_dir",
    "load_data",
    "prepare_run_dir",
    "run",
    "run_processes",
    "run_simulated",
    "run_torchrun",
]


RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "model.pt", "checkpoints")
"""What makes a directory hold a run (a fresh run refuses to write over them without ``--overwrite``)."""


class RunDirectoryError(ConfigError):
    """The run directory cannot take this run: it holds another one (and neither --overwrite nor --resume)."""


def run(config: TrainConfig) -> dict[str, Any] | None:
    """Run the configured training; return the summary (on the process that writes it, else None).

    Everything the configuration asks of this machine and of the run directory is checked first
    (:func:`check_environment`, :func:`check_run_dir`): bad input never leaves a directory or a file behind."""
    if config.run.fault_tolerance:  # one site of a fault-tolerant run (docs/fault-tolerance.md)
        return run_fault_tolerant(config)
    launch = config.run.launch
    if launch == "auto":
        launch = "torchrun" if "RANK" in os.environ and "WORLD_SIZE" in os.environ else "simulated"
        config.run.launch = launch
    check_environment(config)
    if not config.run.out_dir and launch != "torchrun":  # under torchrun rank 0 names it (run_torchrun)
        config.run.out_dir = str(default_run_dir(config))
    if config.run.out_dir:
        check_run_dir(config)
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


# ----------------------------------------------------------------------------------------------- data, run dir
def load_data(config: TrainConfig) -> LMData:
    """The run's corpus, split and tokenised; sets ``config.model.vocab_size`` from the tokenizer. Says what it
    does while the user waits (reading, BPE training, caches reused: :func:`progress_log`)."""
    data = prepare_data(
        config.data.corpus,
        tokenizer=config.data.tokenizer,
        vocab_size=config.data.bpe_vocab_size if config.data.tokenizer == "bpe" else None,
        val_fraction=config.data.val_fraction,
        cache_dir=default_cache_dir(),
        log=progress_log(config),
    )
    config.model.vocab_size = data.vocab_size
    return data


def progress_log(config: TrainConfig) -> Callable[[str], None] | None:
    """Where this process prints progress lines (data preparation; evaluations: train.py): stderr, next to the
    progress bar, on the one process that reports (worker 0; the parent of ``--launch processes``, not its
    children, for the data); ``None`` (silent) with ``--no-progress`` and everywhere else."""
    if not config.run.progress or os.environ.get("RANK", "0") != "0" or "EAGERLOCO_PARENT" in os.environ:
        return None

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    return say


def check_environment(config: TrainConfig) -> None:
    """What the configuration asks of this machine: the device exists, optional packages are installed. Raises
    :class:`ConfigError` naming the value, before anything is written."""
    import importlib.util

    name = config.run.device
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"run.device={name!r}: not a device; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            built = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ConfigError(
                f"run.device={name!r}: this torch ({torch.__version__}, {built}) sees no CUDA device; use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"run.device={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ConfigError(f"run.device={name!r}: eagerloco train runs on 'cpu' or 'cuda' devices")
    if config.run.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("run.tensorboard=True needs the tensorboard package: pip install tensorboard")


def default_run_dir(config: TrainConfig, root: Path = Path("runs")) -> Path:
    """The run directory named after the run: ``runs/MODE`` for the first run of a mode, then ``runs/MODE-2``,
    ``runs/MODE-3``, ... (one past the highest in use); with ``resume``, the highest in use (the newest run)."""
    mode = config.outer.mode
    names = {p.name for p in root.iterdir()} if root.is_dir() else set()
    counters = [1] if mode in names else []
    counters += [int(n[len(mode) + 1 :]) for n in names if n.startswith(f"{mode}-") and n[len(mode) + 1 :].isdigit()]
    last = max(counters, default=0)
    number = last if config.run.resume else last + 1
    return root / (mode if number <= 1 else f"{mode}-{number}")


def check_run_dir(config: TrainConfig) -> None:
    """A fresh run refuses a directory that already holds a run (:data:`RUN_FILES`) unless ``overwrite``;
    ``resume`` needs a checkpoint this configuration can continue (:func:`check_resume`)."""
    run_dir = Path(config.run.out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirectoryError(f"run directory {run_dir} is a file, not a directory: choose another --out-dir")
    if config.run.resume:
        check_resume(config)
        return
    held = [name for name in RUN_FILES if (run_dir / name).exists()]
    if held and not config.run.overwrite:
        raise RunDirectoryError(
            f"run directory {run_dir} already holds a run ({', '.join(held)}): pass --overwrite to replace it, "
            "--resume to continue it, or choose another --out-dir"
        )


def prepare_run_dir(config: TrainConfig) -> Path:
    """Create the run directory and write ``config.json``. A fresh run (the directory was checked by
    :func:`check_run_dir`) removes what an overwritten run left; ``--resume`` keeps what was logged up to the
    checkpoint it continues from."""
    run_dir = Path(config.run.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    if config.run.resume:
        directory = check_resume(config)
        for line in ckpt.accepted_changes(directory, config.to_dict()):  # once per run: worker 0 prepares the directory
            print(f"eagerloco train --resume: {line}", file=sys.stderr, flush=True)
        step = int(directory.name.split("-")[1])
        if metrics.exists():  # drop what the interrupted run logged after its checkpoint
            kept = [record for record in read_metrics(metrics) if record_step(record) <= step]
            atomic_write_bytes(metrics, "".join(json.dumps(record) + "\n" for record in kept).encode())
    else:
        for name in ("checkpoints", "tb"):
            if (run_dir / name).is_dir():
                shutil.rmtree(run_dir / name)
        for name in ("summary.json", "model.pt", "results.json"):
            (run_dir / name).unlink(missing_ok=True)
        metrics.write_text("")
    atomic_write_bytes(run_dir / "config.json", json.dumps(config.to_dict(), indent=2).encode())
    return run_dir


def check_resume(config: TrainConfig) -> Path:
    """The checkpoint ``--resume`` will continue from; a clear error (before any worker starts) when there is none
    or when this configuration cannot continue it (lm/checkpoint.py: check_compatible). With another number of
    workers than the checkpoint's, it also resizes the saved outer states once (check_resizable: every worker
    file is read) so that a checkpoint that cannot be resized is refused here, not inside the workers."""
    run_dir = Path(config.run.out_dir)
    directory = ckpt.latest_valid(run_dir)
    if directory is None:
        raise ckpt.ResumeError(f"--resume: no complete checkpoint under {run_dir / 'checkpoints'}")
    saved = ckpt.read_manifest(directory).get("config") or {}
    if config.outer.overlap_steps == AUTO and saved.get("outer", {}).get("mode") == "overlap":
        config.outer.overlap_steps = saved["outer"]["overlap_steps"]  # the τ the run chose: averages in flight need it
    ckpt.check_compatible(directory, config.run.workers, config.to_dict())
    step = int(directory.name.split("-")[1])
    if step >= config.run.steps:  # nothing left to train: a finished run continues only with more steps
        raise ckpt.ResumeError(
            f"--resume: the run in {run_dir} is complete (checkpoint at inner step {step}, run.steps="
            f"{config.run.steps}); pass --steps N with N > {step} to train it further"
        )
    ckpt.check_resizable(directory, config.run.workers)
    return directory


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


def set_threads(config: TrainConfig, workers_here: int) -> None:
    """torch threads per worker: ``run.threads``, else this machine's cores shared by its workers."""
    threads = config.run.threads or max(1, (os.cpu_count() or 1) // workers_here)
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------- launchers
def check_fault_tolerance(config: TrainConfig) -> tuple[str, int]:
    """What ``--fault-tolerance`` needs, checked before anything starts; returns the lighthouse's host and port."""
    r = config.run
    from eagerloco.ft.lighthouse import bare_host

    host, _, port = r.fault_tolerance.rpartition(":")  # an IPv6 host: [fd00::1]:29510 (or fd00::1:29510)
    host = bare_host(host)
    if not host or not port.isdigit() or not 0 < int(port) < 65535:
        raise ConfigError(f"run.fault_tolerance={r.fault_tolerance!r}: must be HOST:PORT of the lighthouse")
    if config.outer.mode == "dp":
        raise ConfigError("run.fault_tolerance needs a DiLoCo mode (sync, overlap, delayed, eager), not 'dp'")
    if r.launch not in ("auto", "processes"):
        raise ConfigError(f"run.fault_tolerance: one process per site; run.launch={r.launch!r} does not apply")
    if r.resume or r.checkpoint_every:
        raise ConfigError(
            "run.fault_tolerance: a site joins from a live peer's state; --resume and --checkpoint-every are not "
            "supported with it"
        )
    if not 0 <= r.ft_shard < r.workers:
        raise ConfigError(f"run.ft_shard={r.ft_shard}: must be in [0, workers={r.workers})")
    if r.ft_min_replicas < 1:
        raise ConfigError(f"run.ft_min_replicas={r.ft_min_replicas}: must be >= 1")
    if r.ft_join_timeout_ms < 1:
        raise ConfigError(f"run.ft_join_timeout_ms={r.ft_join_timeout_ms}: must be >= 1 (milliseconds)")
    return host, int(port)


def run_fault_tolerant(config: TrainConfig) -> dict[str, Any]:
    """One site of a fault-tolerant run: joins the lighthouse at ``run.fault_tolerance`` (starting it and the
    coordination store first with ``run.ft_lighthouse``), trains with live membership (eagerloco.ft), writes its own
    run directory (metrics with one ``membership`` record per quorum, summary.json, model.pt)."""
    from eagerloco.ft import FaultTolerance, LighthouseHost
    from eagerloco.ft._deps import require_torchft
    from eagerloco.ft.lighthouse import url_host

    host, port = check_fault_tolerance(config)
    try:
        require_torchft()
    except ImportError as exc:
        raise ConfigError(str(exc)) from None
    check_environment(config)
    if not config.run.out_dir:
        config.run.out_dir = str(default_run_dir(config))
    check_run_dir(config)
    lighthouse = None
    if config.run.ft_lighthouse:
        lighthouse = LighthouseHost(host, port, port + 1, min_replicas=config.run.ft_min_replicas,
                                    join_timeout_ms=config.run.ft_join_timeout_ms)  # fmt: skip
    set_threads(config, 1)
    data = load_data(config)
    run_dir = prepare_run_dir(config)
    log = MetricsLog(run_dir / "metrics.jsonl")
    replica_id = config.run.ft_replica_id or f"{socket.gethostname()}-{os.getpid()}"
    timeout = config.outer.collective_timeout_s or 300.0
    ft = FaultTolerance(f"http://{url_host(host)}:{port}", f"{url_host(host)}:{port + 1}", replica_id,
                        timeout_s=timeout, host=config.run.ft_host)  # fmt: skip
    try:
        result = train_worker(config, ft.comm, data, run_dir, log, ft=ft)
    finally:
        log.close()
        ft.shutdown()
        if lighthouse is not None:
            lighthouse.shutdown()
    summary = summarize(config, [result])
    atomic_write_bytes(run_dir / "summary.json", json.dumps(summary, indent=2).encode())
    print_summary(summary, config)
    return summary


def run_simulated(config: TrainConfig, stop: StopSignal | None = None) -> list[WorkerResult]:
    """``run.workers`` threads of this process, one worker each, over an in-process group."""
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
        raise ConfigError(f"torchrun started {world} ranks, run.workers={config.run.workers}: pass --workers {world}")
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
        if not config.run.out_dir:  # named after the run by rank 0, for every rank
            config.run.out_dir = comm.all_gather_object(str(default_run_dir(config)))[0]
            check_run_dir(config)
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
        if set(codes) == {2}:  # every worker refused its input before training (one-line errors above): bad input
            raise SystemExit(2)
        raise SystemExit(
            f"eagerloco train: error: worker processes exited with codes {codes} (negative: killed by that "
            "signal); their messages are above"
        )
    return [WorkerResult(**r) for r in json.loads((run_dir / "results.json").read_text())]
