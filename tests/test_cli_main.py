"""The ``eagerloco`` entry point: plain-text help, ``--version``, a sub-command's own usage on a misspelt flag."""

from __future__ import annotations

import argparse
import re

import pytest

from eagerloco import __version__
from eagerloco.cli.helptext import plain_help, plain_text
from eagerloco.cli.main import SUBCOMMANDS, build_parser, main


@pytest.mark.parametrize(
    ("text", "plain"),
    [
        (":class:`eagerloco.DiLoCoConfig`", "eagerloco.DiLoCoConfig"),
        ("see :func:`~eagerloco.lm.runs.load_run`.", "see load_run."),
        (":py:meth:`DiLoCo.step`", "DiLoCo.step"),
        (":doc:`the guide <docs/engine>`", "the guide"),
        ("``--sync-every`` and ``a b``", "--sync-every and a b"),
        ("(package ``tensorboard``)", "(package tensorboard)"),
        ("`ALGORITHMS.md` (section 4)", "ALGORITHMS.md (section 4)"),
        ("one table per section::\n\n    [outer]", "one table per section:\n\n    [outer]"),
        ("a literal block follows ::\n", "a literal block follows \n"),
        ("'dp', 'sync' or 'eager' (default: 'eager')", "'dp', 'sync' or 'eager' (default: 'eager')"),
        ("H = 30, 50 % of ::1 and a:b", "H = 30, 50 % of ::1 and a:b"),
    ],
)
def test_plain_text(text, plain):
    assert plain_text(text) == plain


def test_plain_help_reaches_groups_subparsers_and_summaries():
    parser = argparse.ArgumentParser(description="uses ``x``")
    sub = parser.add_subparsers()
    child = sub.add_parser("c", help="the :class:`C` command", description="see :mod:`m`", epilog="``e``")
    group = child.add_argument_group("g", "group of ``y``")
    group.add_argument("--flag", help="a ``flag``")
    child.add_argument("--hidden", help=argparse.SUPPRESS)
    assert plain_help(parser) is parser
    assert parser.description == "uses x"
    assert (child.description, child.epilog, group.description) == ("see m", "e", "group of y")
    assert [a.help for a in child._actions if a.dest == "flag"] == ["a flag"]
    assert [a.help for a in child._actions if a.dest == "hidden"] == [argparse.SUPPRESS]
    assert sub._choices_actions[0].help == "the C command"


MARKUP = re.compile(r"``|:[a-z]+:`|`[^`\s]+`|\w::(\s|$)")


@pytest.mark.parametrize("command", [*SUBCOMMANDS, None])
def test_every_help_is_plain_text(command, capsys):
    argv = [command, "--help"] if command else ["--help"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: eagerloco {command or ''}".rstrip())
    assert not MARKUP.search(out), MARKUP.search(out)


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"eagerloco {__version__}\n"


@pytest.mark.parametrize("command", ["train", "simulate", "plot", "eval", "sample"])
def test_misspelt_flag_prints_the_subcommands_usage(command, capsys):
    positional = ["runs/x"] if command in ("plot", "eval", "sample") else []
    with pytest.raises(SystemExit) as exc:
        main([command, *positional, "--stepz", "5"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: eagerloco {command} ")
    assert err.rstrip().endswith(f"eagerloco {command}: error: unrecognized arguments: --stepz 5")


def test_unknown_command_keeps_the_top_level_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["trian"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("usage: eagerloco [-h] [--version] COMMAND")


def test_build_parser_imports_only_the_asked_subcommand():
    parser = build_parser(["simulate"])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert sub.choices["simulate"].get_default("func") is not None
    assert sub.choices["train"].get_default("func") is None
