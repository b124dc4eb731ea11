"""The engine's errors, in a module of their own so that every engine module can raise them without importing
another (``diloco``, ``core`` and ``sharding`` all do). Re-exported by :mod:`eagerloco.engine.diloco`,
:mod:`eagerloco.engine` and :mod:`eagerloco`, where they were defined before."""

from __future__ import annotations


class NonFiniteOuterGradient(FloatingPointError):
    """An outer gradient held NaN or Inf; the outer parameters were not touched. Raised by every worker at the same
    outer step (``nonfinite='raise'``): the bad values travel inside the average, which every worker receives
    bit-identical."""


class ModelMismatch(RuntimeError):
    """Workers hold models (or configurations) that differ: averaging them would be meaningless."""
