"""``eagerloco train``: the one parser of the training run and its one-line errors.

The run itself is :mod:`eagerloco.train` (one worker's loop) and :mod:`eagerloco.launch` (the launchers);
``python -m eagerloco.train`` and ``torchrun -m eagerloco.train`` come here too (:func:`main`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from eagerloco.lm.config import TrainConfig

HELP = "pretrain a small GPT with DiLoCo / streaming / eager updates (the main job)"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Every flag of ``eagerloco train``: ``--config``, the hidden ``--resolved-config`` and one flag per field of
    :class:`eagerloco.lm.config.TrainConfig`. Returns ``parser``."""
    from eagerloco import configs
    from eagerloco.lm.config import add_arguments as add_config_fields

    parser.add_argument(
        "--config",
        metavar="NAME|PATH",
        help=f"a shipped experiment by name ({', '.join(configs.names())}) or a TOML file; flags override it",
    )
    parser.add_argument("--resolved-config", help=argparse.SUPPRESS)  # --launch processes hands its config over
    add_config_fields(parser)
    return parser


def register(subparsers: argparse._SubParsersAction) -> None:
    from eagerloco.train import __doc__ as doc

    parser = subparsers.add_parser(
        "train", help=HELP, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The validated configuration: defaults < ``--config`` TOML < flags (or the launcher's resolved file)."""
    from eagerloco import configs
    from eagerloco.lm.config import TrainConfig, from_args

    if args.resolved_config:
        return TrainConfig.from_dict(json.loads(Path(args.resolved_config).read_text())).validate()
    if args.config:
        args.config = str(configs.resolve(args.config))  # a file, else a shipped config's name
    return from_args(args)


class TrainError(SystemExit):
    """The end of a failed ``eagerloco train``: its one line (``str()``, printed on stderr by :func:`run`) and its
    exit status ``code`` (:data:`eagerloco.cli.main.EXIT_USAGE` for bad input, ``EXIT_FAILURE`` for a failure while
    running)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _known_failure(exc: BaseException) -> BaseException | None:
    """The error a user should read, if ``exc`` is (or wraps, e.g. from a simulated worker's thread) one whose
    message says what happened: bad input, a peer that failed, non-finite outer gradients, a refused resume."""
    from torch.distributed import DistError  # rendezvous and store failures (a peer that never came)

    from eagerloco.comm.base import CollectiveAborted, CollectiveTimeout
    from eagerloco.engine.config import ConfigError
    from eagerloco.engine.errors import ModelMismatch, NonFiniteOuterGradient
    from eagerloco.lm.corpora import CorpusError

    known = (ConfigError, CorpusError, CollectiveTimeout, CollectiveAborted, NonFiniteOuterGradient, ModelMismatch,
             DistError)  # fmt: skip
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, known):
            return seen
        seen = seen.__cause__
    return None


def run(args: argparse.Namespace) -> int:
    """Run from parsed arguments; every expected failure ends in ONE line on stderr and a non-zero exit code
    (:mod:`eagerloco.cli.main`'s convention): bad input, i.e. a value that breaks a rule, a missing config file or
    corpus, a refused resume or overwrite (2, before anything is written); a failed peer or non-finite outer
    gradients (1); an interrupt (128 + signal, after the final checkpoint). Under torchrun each rank prints its own
    line, prefixed with its rank. Raises :class:`TrainError` (a ``SystemExit``) for the first two."""
    from eagerloco.cli.main import EXIT_FAILURE, EXIT_USAGE
    from eagerloco.engine.config import ConfigError
    from eagerloco.launch import run as launch
    from eagerloco.lm.corpora import CorpusError
    from eagerloco.lm.interrupt import TrainingInterrupted

    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    try:
        launch(config_from_args(args))
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
        line = f"eagerloco train: error: {prefix}{type(failure).__name__}: {text}"
        print(line, file=sys.stderr, flush=True)
        code = EXIT_USAGE if isinstance(failure, (ConfigError, CorpusError)) else EXIT_FAILURE
        raise TrainError(line, code) from None
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m eagerloco.train ARGS``: the same as ``eagerloco train ARGS`` (same parser, help and errors)."""
    from eagerloco.cli.main import main as eagerloco

    return eagerloco(["train", *(sys.argv[1:] if argv is None else argv)])
