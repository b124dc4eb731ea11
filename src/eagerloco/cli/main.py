"""The ``eagerloco`` command: one entry point, one sub-command per module.

Each sub-command lives in its own module of this package and exposes ``register(subparsers)``, which adds an
``argparse`` parser and sets ``func`` to the function that runs it (``func(args) -> int``). Modules are imported
lazily so that ``eagerloco simulate`` does not pay for importing the training stack.

    eagerloco train ...      # the language-model pretraining run (eagerloco.cli.train)
    eagerloco simulate ...   # compute-utilization simulator (eagerloco.cli.simulate)
    eagerloco plot RUN...    # loss / utilization plots of finished runs (eagerloco.cli.plot)
    eagerloco eval RUN       # evaluate a saved model (eagerloco.cli.evaluate)
    eagerloco sample RUN     # generate text from a saved model (eagerloco.cli.sample)
    eagerloco --version

Exit status, the same for every sub-command (argparse's convention): 0 on success; 2 for bad input, i.e. anything
the user can fix before running (an unknown or misspelt flag, a value that breaks a rule, a run directory or file
that does not exist or cannot be read); 1 for a failure while the work runs (a peer that died, non-finite outer
gradients, an output that cannot be written); 128 + N after signal N (``eagerloco train``). Bad input prints
the sub-command's own usage or one line naming the value and the rule.

Help text is plain text: reST markup of the docstrings it comes from is removed here, once, for every parser
(:func:`eagerloco.cli.helptext.plain_help`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from eagerloco import __version__
from eagerloco.cli.helptext import plain_help

EXIT_OK = 0
EXIT_FAILURE = 1
"""A failure while the work runs."""
EXIT_USAGE = 2
"""Bad input: argparse's own code for usage errors, and every sub-command's for a value that breaks a rule."""

# Sub-command name -> module inside eagerloco.cli that implements it.
SUBCOMMANDS: dict[str, str] = {
    "train": "train",
    "simulate": "simulate",
    "plot": "plot",
    "eval": "evaluate",
    "sample": "sample",
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eagerloco",
        description="Low-communication distributed training: DiLoCo, streaming and eager updates.",
    )
    parser.add_argument("--version", action="version", version=f"eagerloco {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    # Import only the module that is asked for (or all of them, for --help).
    wanted = [a for a in argv[:1] if a in SUBCOMMANDS] or list(SUBCOMMANDS)
    for name in SUBCOMMANDS:
        if name not in wanted:
            sub.add_parser(name, help=f"(see `eagerloco {name} --help`)")
            continue
        try:
            module = importlib.import_module(f"eagerloco.cli.{SUBCOMMANDS[name]}")
        except ModuleNotFoundError as exc:  # a sub-command whose optional dependencies are missing
            if exc.name and exc.name.startswith("eagerloco.cli."):
                continue
            raise
        module.register(sub)
    return plain_help(parser)


def _subparser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    """The parser of sub-command ``command`` (``parser`` itself when there is none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # A misspelt flag of a sub-command (`eagerloco train --stepz 5`): show that sub-command's usage, not the
        # top-level one that parse_args would print. Exits EXIT_USAGE, as argparse does.
        _subparser(parser, getattr(args, "command", None)).error(f"unrecognized arguments: {' '.join(unknown)}")
    return int(args.func(args) or EXIT_OK)


if __name__ == "__main__":
    sys.exit(main())
