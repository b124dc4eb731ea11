"""Pretrain a small GPT with DiLoCo, streaming, delayed or eager outer steps: eagerloco's main job.

    eagerloco train                                     # the default: 2 simulated workers, eager, 3-5 min on 2 cores
    eagerloco train --mode sync --out-dir runs/sync     # blocking DiLoCo on the same (emulated) link, to compare
    eagerloco train --mode dp --out-dir runs/dp         # the data-parallel baseline
    eagerloco train --launch processes                  # 2 real processes over gloo on this machine
    eagerloco train --config smoke                      # a shipped experiment by name (flags still override it)
    torchrun --nproc-per-node 2 -m eagerloco.train --link-mbit 0        # one rank per worker, any torchrun job
    torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        --nproc-per-node 1 -m eagerloco.train --link-mbit 0             # one worker per site

Every worker builds the same model from the same seed, samples its own shard of the text, and trains with AdamW;
the DiLoCo wrapper runs the outer loop after each inner step. The run directory (``--out-dir``; default
``runs/MODE``, then ``runs/MODE-2``, ...; a run is never written over without ``--overwrite``) receives
``config.json`` (as resolved), ``metrics.jsonl`` (per inner step: loss and lr; per outer step: the engine's
record; per evaluation: the eval loss of the outer parameters), ``summary.json``, ``checkpoints/`` and
``model.pt`` (the final outer parameters, consolidated). The loop reads top to bottom in :func:`train_worker`.
"""

# This module is one worker's training loop. Around it: eagerloco.launch (the three launchers and the run
# directory), eagerloco.report (metrics.jsonl, TensorBoard, summary.json and its table), eagerloco.cli.train (the
# one parser and the one-line errors), eagerloco.lm.config (every setting, its default and its docstring).

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch

from eagerloco.comm import Communicator, EmulatedLink
from eagerloco.comm.base import CollectiveTimeout
from eagerloco.engine import DiLoCo, Measured
from eagerloco.engine.data_parallel import DDPGradientAverager, GradientAverager, torch_group_of
from eagerloco.lm import auto_overlap
from eagerloco.lm import checkpoint as ckpt
from eagerloco.lm.config import AUTO, TrainConfig
from eagerloco.lm.data import LMData
from eagerloco.lm.interrupt import AgreedStop, StopSignal, TrainingInterrupted
from eagerloco.lm.model import GPT, GPTConfig, evaluate_loss
from eagerloco.report import MetricsLog, WorkerResult, log_membership


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to lr over warmup_steps, then cosine decay to lr·min_lr_ratio at the last step."""
    o, total = config.optim, config.run.steps  # defaults: lr 3e-3, 50 warm-up steps, floor 0.1·lr, 900 steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_worker(
    config: TrainConfig,
    comm: Communicator,
    data: LMData,
    run_dir: Path,
    log: MetricsLog,
    control: Communicator | None = None,
    stop: StopSignal | None = None,
    ft: Any = None,
) -> WorkerResult:
    """One worker's run. ``control`` (a communicator on a group of its own) and ``stop`` enable the agreed stop
    on SIGINT/SIGTERM (:mod:`eagerloco.lm.interrupt`): it raises :class:`TrainingInterrupted` after writing a
    checkpoint at the agreed inner step. ``ft`` (an :class:`eagerloco.ft.FaultTolerance` whose ``comm`` is
    ``comm``): a fault-tolerant site (docs/fault-tolerance.md): it joins at the others' inner step, reads its data
    shard ``run.ft_shard`` of ``run.workers``, runs on the real link, and writes its own model.pt (no collective
    checkpoints)."""
    rank, world = comm.rank, comm.world_size  # default: 2 workers
    if ft is not None:  # the membership changes; the data shard does not
        rank, world = config.run.ft_shard, config.run.workers
    device = torch.device(config.run.device)  # default: cpu
    if ft is None and (config.run.link_mbit > 0 or config.run.link_latency_ms > 0):  # default: emulated 20 Mbit/s
        comm = EmulatedLink(comm, config.run.link_mbit * 1e6 or None, config.run.link_latency_ms / 1e3)

    # Model: identical on every worker (same seed); the wrapper also broadcasts worker 0's φ_0 to be sure.
    model_cfg = GPTConfig(**{**config.model.to_dict(), "vocab_size": data.vocab_size})  # default: 820k params
    model = GPT(model_cfg, seed=config.run.seed).to(device)
    o = config.optim  # AdamW, lr 3e-3, β = (0.9, 0.99), weight decay 0.1 on matrices, clip at norm 1.0
    inner = torch.optim.AdamW(model.optimizer_groups(o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2))
    dp = config.outer.mode == "dp"  # default mode: eager, H = 30, k = 1, outer SGD lr 0.7 Nesterov 0.9
    timeout = config.outer.collective_timeout_s  # default: 300 s for any wait on a collective
    overlap_auto = None  # --overlap-steps auto: τ sized to this link now, before the first step (collective)
    if config.outer.overlap_steps == AUTO:
        config, overlap_auto = auto_overlap.resolve(config, comm, model, data.vocab_size, device, log, run_dir)
    if dp and torch_group_of(comm) is not None:  # workers are processes: the baseline is PyTorch's DDP (bucketed)
        engine: DiLoCo | GradientAverager = DDPGradientAverager(model, comm, timeout, config.outer.ddp_bucket_mb)
    elif dp:  # simulated workers (threads): one flat all-reduce after backward, the same average
        engine = GradientAverager(model, comm, timeout)
    elif ft is not None:  # joins the run: the first quorum, a live peer's state when behind (eagerloco.ft)
        engine = ft.diloco(model, inner, config.outer.diloco())
    else:
        engine = DiLoCo(model, inner, config.outer.diloco(), comm=comm)
    forward = engine.ddp if isinstance(engine, DDPGradientAverager) else model  # DDP all-reduces inside backward
    timer: Measured = engine  # both engines measure the loop alike (engine/recorder.py)
    loco = engine if isinstance(engine, DiLoCo) else None  # the outer loop
    averager = engine if isinstance(engine, GradientAverager) else None  # dp: gradients averaged every step
    eval_model = GPT(model_cfg, seed=0).to(device)  # evaluates the outer parameters φ mid-run (seed: unused)
    eval_batches = data.eval_batches(config.data.eval_batch_size, model_cfg.seq_len, config.data.eval_batches)
    sampler = data.sampler(
        config.data.batch_size, model_cfg.seq_len, seed=config.run.seed, worker=rank, num_workers=world,
        sharding=config.data.sharding,
    )  # fmt: skip
    tokens_per_step = config.data.batch_size * model_cfg.seq_len * world  # global tokens per inner step

    restored = ckpt.Restored()  # a fresh run; --resume: the newest complete checkpoint (any number of workers)
    if config.run.resume:
        restored = ckpt.restore_worker(
            run_dir, rank, world, config.to_dict(), model=model, inner_optimizer=inner, sampler=sampler, loco=loco,
            tokens_per_worker_step=config.data.batch_size * model_cfg.seq_len,
        )  # fmt: skip
    start_step, elapsed_before, tokens_offset = restored.inner_step, restored.elapsed_s, restored.tokens_offset

    def tokens_at(step: int) -> int:
        """Global tokens trained up to inner step ``step`` (the lives before a resize counted with their M)."""
        return step * tokens_per_step + tokens_offset

    if ft is not None and loco is not None:
        start_step = loco.inner_step  # a joiner continues at the others' inner step
    timer.add_record_listener(
        lambda r: log.write({"type": "outer", "worker": rank, "tokens": tokens_at(r.inner_step), **r.to_dict()})
    )
    if ft is not None:  # membership per quorum: M, changes, drops, state transfers (docs/fault-tolerance.md)
        log_membership(ft, timer, log, rank)

    def elapsed() -> float:
        """Seconds of the training loop: the engine's clock, which stands still while paused (eval, checkpoint)."""
        return elapsed_before + timer.elapsed_s()

    def evaluate(step: int) -> float:
        """Eval loss of this worker's outer parameters φ (θ for dp), on the fixed validation windows."""
        with timer.paused():
            if loco is not None:
                loco.copy_outer_parameters_to(eval_model)
            else:
                eval_model.load_state_dict(model.state_dict())
            loss = evaluate_loss(eval_model, eval_batches, device)
            log.write({"type": "eval", "worker": rank, "step": step, "tokens": tokens_at(step),
                       "time_s": elapsed(), "eval_loss": loss})  # fmt: skip
        if rank == 0 and config.run.progress:  # one line per evaluation, printed above the progress bar
            from tqdm import tqdm

            tqdm.write(f"step {step}/{config.run.steps}: eval loss {loss:.4f} (outer parameters), "
                       f"{tokens_at(step):,} tokens, {elapsed():.1f} s", file=sys.stderr)  # fmt: skip
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
    if rank == 0 and config.run.progress:  # default: a progress bar on worker 0
        from tqdm import tqdm

        progress = tqdm(total=config.run.steps, initial=start_step, desc=f"{config.outer.mode} x{world}", unit="step")

    # ------------------------------------------------------------------------------------------- the loop
    evals: list[dict[str, Any]] = []
    loss_value = float("nan")
    agreed = AgreedStop(control, stop, timeout) if control and stop else None
    timer.reset_clock()  # measure the loop only, not data preparation and start-up
    for step in range(start_step, config.run.steps):
        lr = lr_at(step, config)
        for group in inner.param_groups:
            group["lr"] = lr
        x, y = sampler.next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        _, loss = forward(x, y)
        loss.backward()
        if averager is not None:
            averager.average_gradients()  # dp: every step, blocking (DDP: measures the wait inside backward)
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        inner.step()
        inner.zero_grad(set_to_none=True)
        if loco is not None:
            loco.step()  # the outer loop: launches, waits and outer steps happen here
        done = step + 1
        loss_value = loss.item()
        log.write({"type": "inner", "worker": rank, "step": done, "loss": loss_value, "lr": lr,
                   "tokens": tokens_at(done), "time_s": elapsed()})  # fmt: skip
        if progress is not None:
            progress.set_postfix(loss=f"{loss_value:.3f}", cu=f"{timer.stats.utilization:.3f}", refresh=False)
            progress.update(1)
        with timer.paused():  # evaluation, checkpoints and the stop vote: neither compute nor loop time
            if config.run.eval_every and done % config.run.eval_every == 0 and done < config.run.steps:  # 300
                evals.append({"step": done, "eval_loss": evaluate(done)})
            at_outer_boundary = done % config.outer.sync_every == 0
            outer_index = done // config.outer.sync_every
            every = config.run.checkpoint_every  # default 0: only the final checkpoint
            checkpointed = bool(every and at_outer_boundary and outer_index % every == 0 and done < config.run.steps)
            if checkpointed:
                save_checkpoint(done)
            # Ctrl+C / SIGTERM: every worker reaches the same decision at the same boundary (interrupt.py).
            if agreed and at_outer_boundary and done < config.run.steps and (signum := agreed.at_boundary()):
                if not checkpointed:
                    save_checkpoint(done)
                if progress is not None:
                    progress.close()
                raise TrainingInterrupted(signum, done, str(ckpt.step_dir(run_dir, done)))
    if progress is not None:
        progress.close()

    # Drain what is still in flight, then (eager) average the workers' φ into one model: the model to keep
    # (fault tolerance: over the workers still alive, in a final quorum; FaultTolerance.finish).
    if loco is not None:
        loco.finalize()
        with loco.paused():
            ft.finish(loco) if ft is not None else loco.consolidate()
    stats = timer.stats
    final_eval = evaluate(config.run.steps)
    evals.append({"step": config.run.steps, "eval_loss": final_eval})
    if ft is None:  # fault tolerance: no collective checkpoint (members come and go); each site keeps its model
        save_checkpoint(config.run.steps)
    if rank == 0 or ft is not None:  # model.pt: the final outer parameters, what eval/sample/plot read
        ckpt.save_final_model(run_dir, model, model_cfg.to_dict(), config.to_dict(), data.tokenizer.fingerprint,
                              final_eval)  # fmt: skip
    return WorkerResult(
        rank=rank,
        params=model.num_parameters(),
        stats=stats.to_dict()
        | ({"fault_tolerance": ft.stats.to_dict() | {"records": len(ft.stats.records)}} if ft else {}),
        final_train_loss=loss_value,
        eval_loss=final_eval,
        comm_payload_bytes=comm.stats.payload_bytes,
        comm_wire_bytes=comm.stats.wire_bytes,
        inner_steps=config.run.steps,
        evals=evals,
        tokens=tokens_at(config.run.steps),
        tokens_this_life=tokens_at(config.run.steps) - tokens_at(start_step),
        overlap_auto=overlap_auto.to_dict() if overlap_auto is not None else None,
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m eagerloco.train`` / ``torchrun -m eagerloco.train``: the same as ``eagerloco train``."""
    from eagerloco.cli.train import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
