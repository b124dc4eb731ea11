"""``eagerloco train``: see :mod:`eagerloco.train` for the run and its launch modes."""

from __future__ import annotations

import argparse

from eagerloco.engine.config import ConfigError


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
    from eagerloco.lm.data import CorpusError
    from eagerloco.train import config_from_args
    from eagerloco.train import run as run_training

    try:
        config = config_from_args(args)
        run_training(config)
    except (ConfigError, CorpusError) as exc:  # bad input: a one-line message, not a traceback
        raise SystemExit(f"eagerloco train: error: {exc}") from None
    return 0
