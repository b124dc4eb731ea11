"""``eagerloco sample``: generate text with a run's saved model.

    eagerloco sample runs/eager
    eagerloco sample runs/eager --prompt "ROMEO:" --tokens 300 --temperature 0.8 --top-k 40
    eagerloco sample runs/eager --num-samples 3 --seed 7 --checkpoint latest

The model is rebuilt from ``model.pt`` (or a checkpoint's outer parameters, ``--checkpoint``) and the tokenizer
from the run's config. The prompt is encoded, then ``--tokens`` new tokens are sampled by
:meth:`eagerloco.lm.model.GPT.generate` (softmax of the last position's logits / temperature, restricted to the
``--top-k`` most likely tokens when given; the context is the last ``seq_len`` tokens). All samples are drawn in one
batch from one generator seeded with ``--seed``: the same (seed, number of samples, settings) give the same text.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from eagerloco.lm.runs import RunError, load_run_tokenizer, load_saved_model

DEFAULT_PROMPT = "\n"
DEFAULT_TOKENS = 200
DEFAULT_TEMPERATURE = 0.8


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``sample`` sub-command."""
    p = subparsers.add_parser(
        "sample",
        help="generate text from a run's saved model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (the --out-dir of `eagerloco train`)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, metavar="TEXT", help="text to continue (default: a newline)")
    p.add_argument(
        "--tokens", type=int, default=DEFAULT_TOKENS, metavar="N", help=f"new tokens (default {DEFAULT_TOKENS})"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=DEFAULT_TEMPERATURE,
        metavar="T",
        help=f"softmax temperature, > 0 (default {DEFAULT_TEMPERATURE}); lower is more conservative",
    )
    p.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely tokens only (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler (default 0)")
    p.add_argument("--num-samples", type=int, default=1, metavar="n", help="independent samples (default 1)")
    p.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="sample from a checkpoint's outer parameters (worker 0) instead of model.pt: 'latest', a step "
        "number, a step-N directory or a worker-R.pt file",
    )
    p.add_argument(
        "--threads", type=int, default=0, metavar="N", help="torch threads (default 0: torch's default, one per core)"
    )
    p.add_argument("--device", default="cpu", help="device to run the model on (default cpu)")
    p.add_argument("--json", action="store_true", help="print a JSON list of samples instead of text")
    p.set_defaults(func=run)


@dataclass
class Sample:
    """One generated sample."""

    prompt: str
    text: str
    """The prompt and its continuation, decoded together."""
    prompt_ids: list[int]
    new_ids: list[int]
    """The sampled token ids (``--tokens`` of them)."""

    @property
    def continuation(self) -> str:
        """The decoded text after the prompt (``text`` minus the prompt when it decodes back to itself)."""
        return self.text[len(self.prompt) :] if self.text.startswith(self.prompt) else self.text


def generate_samples(
    run_dir: str | Path,
    *,
    prompt: str = DEFAULT_PROMPT,
    tokens: int = DEFAULT_TOKENS,
    temperature: float = DEFAULT_TEMPERATURE,
    top_k: int | None = None,
    seed: int = 0,
    num_samples: int = 1,
    checkpoint: str | None = None,
    device: str = "cpu",
) -> list[Sample]:
    """Sample ``num_samples`` continuations of ``prompt`` from the run's model (see the module docstring)."""
    import torch

    if tokens < 1:
        raise ValueError(f"--tokens {tokens}: must be >= 1")
    if not temperature > 0:
        raise ValueError(f"--temperature {temperature}: must be > 0 (small values approach greedy decoding)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"--top-k {top_k}: must be >= 1")
    if num_samples < 1:
        raise ValueError(f"--num-samples {num_samples}: must be >= 1")
    if not prompt:
        raise ValueError("--prompt is empty: give at least one character to condition on (the default is a newline)")
    try:
        torch_device = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device {device!r}: {exc}") from exc
    saved = load_saved_model(run_dir, checkpoint=checkpoint, device=torch_device)
    tokenizer = load_run_tokenizer(saved)
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise ValueError(f"--prompt {prompt!r} encodes to no tokens")
    idx = torch.tensor([prompt_ids] * num_samples, dtype=torch.long, device=torch_device)
    generator = torch.Generator(device=torch_device).manual_seed(seed)
    out = saved.model.generate(idx, tokens, temperature=temperature, top_k=top_k, generator=generator)
    samples = []
    for row in out.tolist():
        samples.append(
            Sample(
                prompt=prompt, text=tokenizer.decode(row), prompt_ids=list(prompt_ids), new_ids=row[len(prompt_ids) :]
            )
        )
    return samples


def run(args: argparse.Namespace) -> int:
    """Run the sub-command; print an error naming the problem and return 2 on bad input."""
    from eagerloco.lm.corpora import CorpusError

    if args.threads < 0:
        print(f"eagerloco sample: error: --threads {args.threads}: must be >= 0", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        samples = generate_samples(
            args.run_dir,
            prompt=args.prompt,
            tokens=args.tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            seed=args.seed,
            num_samples=args.num_samples,
            checkpoint=args.checkpoint,
            device=args.device,
        )
    except (RunError, CorpusError, ValueError) as exc:
        print(f"eagerloco sample: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{**asdict(s), "continuation": s.continuation} for s in samples], indent=2))
        return 0
    for i, sample in enumerate(samples):
        if len(samples) > 1:
            print(f"----- sample {i + 1} of {len(samples)} -----")
        print(sample.text)
    return 0
