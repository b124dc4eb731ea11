"""The experiment configurations shipped with eagerloco: ``eagerloco train --config NAME``.

Each ``NAME.toml`` in this package is one experiment (the TOML format is :mod:`eagerloco.lm.config`'s). They are
package data, so a name works from an installed package as from a checkout (where ``configs/`` at the repository
root points here). ``--config`` also takes a path to any TOML file; an existing file wins over a name.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from eagerloco.engine.config import ConfigError

__all__ = ["names", "path", "resolve"]


def names() -> list[str]:
    """The shipped configurations' names, sorted (``eager``, ``sync``, ...)."""
    return sorted(p.name[: -len(".toml")] for p in resources.files(__name__).iterdir() if p.name.endswith(".toml"))


def path(name: str) -> Path:
    """The file of the shipped configuration ``name`` (``eager`` or ``eager.toml``)."""
    stem = name[: -len(".toml")] if name.endswith(".toml") else name
    if stem not in names():
        raise ConfigError(f"no shipped config named {name!r}; shipped configs: {', '.join(names())}")
    return Path(str(resources.files(__name__) / f"{stem}.toml"))


def resolve(spec: str) -> Path:
    """What ``--config SPEC`` reads: the file ``SPEC`` if it exists, else the shipped configuration of that name;
    else a :class:`ConfigError` in one line that lists the shipped names."""
    given = Path(spec)
    if given.is_file():
        return given
    stem = spec[: -len(".toml")] if spec.endswith(".toml") else spec
    if given.name == spec and stem in names():  # a bare name, not a path into some directory
        return path(stem)
    raise ConfigError(
        f"config file {spec!r} does not exist and is not the name of a shipped config; shipped configs: "
        f"{', '.join(names())} (eagerloco train --config NAME)"
    )
