"""``eagerloco eval``: evaluate a run's saved model on the validation split.

    eagerloco eval runs/eager                          # model.pt on the run's own validation windows
    eagerloco eval runs/eager --batches 0              # every validation window, not the run's subset
    eagerloco eval runs/eager --checkpoint latest      # the outer parameters of the newest checkpoint
    eagerloco eval runs/eager --checkpoint 600 --worker 1 --json

The model is rebuilt from ``model.pt`` (the final outer parameters) or from a checkpoint (``--checkpoint``: the
outer parameters φ of one worker, what the training run evaluated at that step), the data and tokenizer from the
train config's data section (same corpus, split and tokenizer cache as ``eagerloco train``). The validation windows
are the fixed ones of :class:`eagerloco.lm.batches.EvalBatches`: with the default ``--batches`` and ``--batch-size``
(the run's ``eval_batches`` and ``eval_batch_size``) they are the very windows the run evaluated, and the loss
reproduces the run's ``eval_loss`` exactly.

Printed: mean cross-entropy (nats/token), perplexity e^loss, and bits per byte (byte tokenizer: one token per
byte, loss / ln 2) or bits per token (BPE).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from eagerloco.lm.runs import RunError, load_run_data, load_saved_model, run_label


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``eval`` sub-command."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate a run's saved model on the validation split",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (the --out-dir of `eagerloco train`)")
    p.add_argument(
        "--batches",
        type=int,
        metavar="N",
        help="validation batches (default: the run's eval_batches; 0: every validation window)",
    )
    p.add_argument("--batch-size", type=int, metavar="B", help="windows per batch (default: the run's eval_batch_size)")
    p.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="evaluate a checkpoint instead of model.pt: 'latest', a step number, a step-N directory or a "
        "worker-R.pt file",
    )
    p.add_argument("--worker", type=int, metavar="R", help="with --checkpoint: whose φ (default 0)")
    p.add_argument(
        "--threads", type=int, default=0, metavar="N", help="torch threads (default 0: torch's default, one per core)"
    )
    p.add_argument("--device", default="cpu", help="device to evaluate on (default cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def evaluate_run(
    run_dir: str | Path,
    *,
    batches: int | None = None,
    batch_size: int | None = None,
    checkpoint: str | None = None,
    worker: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Evaluate a run's model (see the module docstring) and return the report printed by the command.

    Keys: run_dir, source, step, worker, label, tokenizer, loss, perplexity, bits_per_byte or bits_per_token,
    batches, batch_size, windows, tokens, seq_len, parameters, run_eval_loss (what the run measured for these
    parameters, or None) and same_windows (whether the windows are the run's own).
    """
    import torch

    from eagerloco.lm.model import evaluate_loss

    if batches is not None and batches < 0:
        raise ValueError(f"--batches {batches}: must be >= 1, or 0 for every validation window")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: must be >= 1")
    if worker is not None and checkpoint is None:
        raise ValueError("--worker picks a worker's checkpoint file: give --checkpoint too (model.pt is shared)")
    if worker is not None and worker < 0:
        raise ValueError(f"--worker {worker}: must be >= 0")
    try:
        torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device {device!r}: {exc}") from exc
    saved = load_saved_model(run_dir, checkpoint=checkpoint, worker=worker or 0, device=device)
    data = load_run_data(saved)
    section = saved.train_config.get("data", {})
    run_batches = int(section.get("eval_batches", 16))
    run_batch_size = int(section.get("eval_batch_size", 32))
    max_batches = run_batches if batches is None else (batches or None)
    size = run_batch_size if batch_size is None else batch_size
    seq_len = saved.model.config.seq_len
    eval_batches = data.eval_batches(size, seq_len, max_batches)
    loss = evaluate_loss(saved.model, eval_batches, device)
    same_windows = max_batches == run_batches and size == run_batch_size
    report: dict[str, Any] = {
        "run_dir": str(run_dir),
        "source": str(saved.source),
        "step": saved.step,
        "worker": saved.worker,
        "label": run_label(saved.train_config),
        "tokenizer": data.tokenizer.fingerprint,
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,
    }
    bits = loss / math.log(2)
    if data.tokenizer.fingerprint == "byte":
        report["bits_per_byte"] = bits
    else:
        report["bits_per_token"] = bits
    report.update(
        batches=len(eval_batches),
        batch_size=size,
        windows=eval_batches.num_windows,
        tokens=eval_batches.num_tokens,
        seq_len=seq_len,
        parameters=saved.model.num_parameters(),
        run_eval_loss=saved.eval_loss,
        same_windows=same_windows,
    )
    return report


def format_report(report: dict[str, Any]) -> str:
    """The text the command prints for ``report`` (:func:`evaluate_run`)."""
    who = f", worker {report['worker']}" if report["worker"] is not None else ""
    lines = [
        f"eagerloco eval: {report['source']} ({report['label']}, step {report['step']}{who}), "
        f"{report['parameters']:,} parameters",
        f"  validation: {report['batches']} batches, {report['windows']:,} windows of {report['seq_len']} tokens = "
        f"{report['tokens']:,} tokens, tokenizer {report['tokenizer']}",
        f"  loss        {report['loss']:.4f} nats/token",
        f"  perplexity  {report['perplexity']:.3f}",
    ]
    if "bits_per_byte" in report:
        lines.append(f"  bits/byte   {report['bits_per_byte']:.4f}")
    else:
        lines.append(f"  bits/token  {report['bits_per_token']:.4f}")
    reference = report["run_eval_loss"]
    if reference is not None and report["same_windows"]:
        verdict = "identical" if reference == report["loss"] else f"differs by {report['loss'] - reference:+.3g}"
        lines.append(f"  the run measured {reference:.4f} on the same windows ({verdict})")
    elif reference is not None:
        lines.append(f"  the run measured {reference:.4f} on its own windows (other batches here)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the sub-command; print an error naming the problem and return 2 on bad input."""
    from eagerloco.lm.corpora import CorpusError

    if args.threads < 0:
        print(f"eagerloco eval: error: --threads {args.threads}: must be >= 0", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        report = evaluate_run(
            args.run_dir,
            batches=args.batches,
            batch_size=args.batch_size,
            checkpoint=args.checkpoint,
            worker=args.worker,
            device=args.device,
        )
    except (RunError, CorpusError, ValueError) as exc:
        print(f"eagerloco eval: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
