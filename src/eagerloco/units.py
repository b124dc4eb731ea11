"""Numbers for people: byte counts in decimal units (one formatter for every command that prints them)."""

from __future__ import annotations

__all__ = ["format_bytes"]

_UNITS = ("B", "KB", "MB", "GB", "TB")


def format_bytes(nbytes: float, spec: str = ".1f") -> str:
    """``nbytes`` in the largest decimal unit that keeps the number below 1000 (1 KB = 1000 B, up to PB), the
    number formatted with ``spec``: ``format_bytes(3_281_408) == '3.3 MB'``, ``format_bytes(3_281_408, '.3g') ==
    '3.28 MB'``."""
    for unit in _UNITS:
        if abs(nbytes) < 1000:
            return f"{nbytes:{spec}} {unit}"
        nbytes /= 1000
    return f"{nbytes:{spec}} PB"
