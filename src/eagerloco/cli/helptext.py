"""Plain-text ``--help``: reST markup from docstrings turned into what a terminal should show.

Help strings, descriptions and epilogs are often docstrings (of the training config's fields, of a module), which
are written for Sphinx. :func:`plain_text` removes the markup; :func:`plain_help` applies it to every string of a
parser and its sub-parsers, so that it is done once, where the parser is built (``eagerloco.cli.main``):

    :class:`eagerloco.DiLoCoConfig`    ->  eagerloco.DiLoCoConfig
    :func:`~eagerloco.lm.runs.load`    ->  load
    :data:`title <target>`             ->  title
    ``--sync-every``                   ->  --sync-every
    `ALGORITHMS.md`                    ->  ALGORITHMS.md
    a table per section::              ->  a table per section:
"""

from __future__ import annotations

import argparse
import re

_ROLE = re.compile(r":(?:[a-zA-Z]+:)?[a-zA-Z]+:`([^`]+)`")
_LITERAL = re.compile(r"``(.+?)``", re.DOTALL)
_DEFAULT_ROLE = re.compile(r"(?<![`\w])`([^`\n]+)`(?![`\w])")
_LITERAL_BLOCK = re.compile(r"(\S)::(?=\s|$)")
_LONE_LITERAL_BLOCK = re.compile(r"(^|\s)::(?=\s|$)")


def _role_text(match: re.Match[str]) -> str:
    """The text a role shows: ``title <target>`` shows the title, ``~a.b.c`` the last component."""
    content = match.group(1)
    titled = re.fullmatch(r"(.+?)\s*<[^<>]+>", content, re.DOTALL)
    if titled:
        return titled.group(1)
    if content.startswith("~"):
        return content[1:].rsplit(".", 1)[-1]
    return content.lstrip("!")


def plain_text(text: str) -> str:
    """``text`` without reST roles, inline literals, interpreted text and ``::`` literal-block markers."""
    text = _ROLE.sub(_role_text, text)
    text = _LITERAL.sub(r"\1", text)
    text = _DEFAULT_ROLE.sub(r"\1", text)
    text = _LITERAL_BLOCK.sub(r"\1:", text)
    return _LONE_LITERAL_BLOCK.sub(r"\1", text)


def plain_help(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Apply :func:`plain_text` to the description, epilog, argument-group descriptions and every argument's help
    of ``parser`` and, recursively, of its sub-parsers (and their one-line summaries). Returns ``parser``."""
    seen: set[int] = set()

    def visit(p: argparse.ArgumentParser) -> None:
        if id(p) in seen:
            return
        seen.add(id(p))
        for attr in ("description", "epilog"):
            value = getattr(p, attr)
            if isinstance(value, str):
                setattr(p, attr, plain_text(value))
        for group in p._action_groups:
            if isinstance(group.description, str):
                group.description = plain_text(group.description)
        for action in p._actions:
            if isinstance(action.help, str) and action.help is not argparse.SUPPRESS:
                action.help = plain_text(action.help)
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    if isinstance(choice.help, str):
                        choice.help = plain_text(choice.help)
                for sub in action.choices.values():
                    visit(sub)

    visit(parser)
    return parser
