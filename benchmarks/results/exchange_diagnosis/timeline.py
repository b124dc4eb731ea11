"""Per outer step of one link-lab job, from the two sites' timestamp logs (``timestamps.patch``; README.md here).

python timeline.py FOLDER      # FOLDER holds log.<pid> of the two sites (the lower pid first)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

PHASE_EVENTS = ("launch0", "launch1", "wait0", "bar0", "bar1")


def by_outer_step(events: list[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """{launch step: {event: wall time}}; events without a step (``workdone``) belong to the last step seen."""
    steps: dict[int, dict[str, float]] = {}
    current = None
    for e in events:
        if e["ev"] in PHASE_EVENTS:
            current = e["t"]
        if current is not None:
            steps.setdefault(current, {})[e["ev"]] = e["time"]
    return steps


def main(folder: str) -> None:
    logs = sorted(Path(folder).glob("log.*"), key=lambda p: int(p.suffix[1:]))
    sites = [by_outer_step([json.loads(line) for line in p.read_text().splitlines()]) for p in logs]
    a, b = sites
    for t in sorted(a):
        x, y = a[t], b[t]
        later_launch = max(x["launch1"], y["launch1"])
        phase_end = [s.get("bar0", s["launch0"]) for s in (x, y)]
        done = [s.get("workdone", s["wait1"]) - later_launch for s in (x, y)]
        print(
            f"{t} phase-end skew {phase_end[0] - phase_end[1]:.3f} launch skew {x['launch1'] - y['launch1']:.3f} "
            f"done after later launch {done[0]:.3f} / {done[1]:.3f} "
            f"first phase end -> both done {max(x['wait1'], y['wait1']) - min(phase_end):.3f}"
        )


if __name__ == "__main__":
    main(sys.argv[1])
