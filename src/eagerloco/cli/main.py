"""The ``eagerloco`` command: one entry point, one sub-command per module.

Each sub-command lives in its own module of this package and exposes ``register(subparsers)``, which adds an
``argparse`` parser and sets ``func`` to the function that runs it (``func(args) -> int``). Modules are imported
lazily so that ``eagerloco simulate`` does not pay for importing the training stack.

    eagerloco train ...      # the language-model pretraining run (eagerloco.cli.train)
    eagerloco simulate ...   # compute-utilization simulator (eagerloco.cli.simulate)
    eagerloco plot RUN...    # loss / utilization plots of finished runs (eagerloco.cli.plot)
    eagerloco eval RUN       # evaluate a saved model (eagerloco.cli.evaluate)
    eagerloco sample RUN     # generate text from a saved model (eagerloco.cli.sample)
"""

from __future__ import annotations

import argparse
import importlib
import sys

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
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
