"""Fault tolerance: workers that fail and join without stopping the run (optional extra ``eagerloco[ft]``).

Semantics: ALGORITHMS.md section 11; setup and limits: docs/fault-tolerance.md. Membership comes from torchft's
lighthouse and Manager; :func:`resize_outer_states` (resume with another number of workers) needs only torch.
"""

from __future__ import annotations

from typing import Any

from eagerloco.ft.resize import resize_outer_states

__all__ = [
    "FaultTolerance",
    "FaultToleranceError",
    "FaultToleranceStats",
    "FaultTolerantCommunicator",
    "FaultTolerantReducer",
    "LighthouseHost",
    "MembershipRecord",
    "resize_outer_states",
]


def __getattr__(name: str) -> Any:  # torchft is imported only when the fault-tolerant classes are used
    if name == "LighthouseHost":
        from eagerloco.ft.lighthouse import LighthouseHost

        return LighthouseHost
    if name in __all__:
        from eagerloco.ft import manager

        return getattr(manager, name)
    raise AttributeError(f"module 'eagerloco.ft' has no attribute {name!r}")
