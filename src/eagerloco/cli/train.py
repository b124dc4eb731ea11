"""``eagerloco train``: see :mod:`eagerloco.train` for the run and its launch modes."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from eagerloco.lm.config import add_arguments
    from eagerloco.train import __doc__ as doc

    parser = subparsers.add_parser(
        "train",
        help="pretrain a small GPT with DiLoCo / streaming / eager updates (the main job)",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="TOML experiment file (see configs/); flags override it")
    parser.add_argument("--resolved-config", help=argparse.SUPPRESS)
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from eagerloco.train import cli_main

    # Bad input, a failed peer, non-finite outer gradients: a one-line message, not a traceback; Ctrl+C/SIGTERM:
    # a final checkpoint, then exit 128 + signal (see eagerloco.train.cli_main and docs/reliability.md).
    return cli_main(args)
