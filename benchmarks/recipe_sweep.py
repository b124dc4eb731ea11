"""Recipe study (issue 11): eval loss of the outer parameters over outer lr x momentum x Nesterov per method.

    .venv/bin/python benchmarks/recipe_sweep.py                       # plan 'main': 5 methods, hours
    .venv/bin/python benchmarks/recipe_sweep.py --plan variant        # eager with own weight w = 1, M = 2 and 4
    .venv/bin/python benchmarks/recipe_sweep.py --report-only         # rebuild the table and plot from the JSON
    .venv/bin/python benchmarks/recipe_sweep.py --plan custom --methods sync eager --lrs 0.7 --momenta 0.9

Every run is the study's job, ``eagerloco train --launch simulated --link-mbit 0 --threads 1`` (900 inner steps,
2 simulated workers, the 820k-parameter GPT, H = 30) with the point's method and outer optimizer, at inner AdamW lr
3e-3 (:data:`STUDY_INNER_LR`, the CLI's default; a point whose ``--extra`` sets ``--lr`` trains at that, e.g.
``--extra=--lr=0.006``), and records
the eval loss of the outer parameters after ``finalize`` (and ``consolidate`` for eager) as one JSON file per run,
``<out>/runs/<key>.json``, written atomically when the run ends. A sweep that is stopped (Ctrl+C, a reboot, a
killed process) resumes where it was: points whose JSON says ``ok`` or ``diverged`` (the run stopped on
non-finite outer gradients; deterministic, so running it again would diverge again) are skipped, points that
``failed`` otherwise are tried again once per invocation. Only one sweep runs at a time: a lock file
(``--lock``) is held for the whole sweep (``--wait-lock`` queues behind the running one instead of exiting 3).

The plans (``--plan``) order their points so that the most informative arrive first:

* ``main``: stage 1, sync and eager k = 1 at outer lr {0.4, 0.7, 1.0, 1.4} x momentum {0, 0.5, 0.9} (Nesterov
  where momentum > 0), seed 0, both methods at each grid point before the next; stage 2, streaming (P = 2,
  τ = 1, α = 0.5), delayed k = 1 and eager k = 2 on the same grid; stage 3, momentum 0.9 without Nesterov at
  every lr for the five methods; stage 4, seeds 1 and 2 at each method's best seed-0 recipe (chosen from the
  results on disk once that method's stages 1-3 are finished).
* ``variant``: eager k = 1 with own-contribution weight w = 1 (``--eager-own-weight 1``) at M = 2 (900 steps)
  on the same grid, then sync, eager w = 1 and the paper's eager at M = 4 (600 steps); needs a checkout that has
  the variant (``--src``).
* ``lookahead``: eager k = 1 with ``--eager-lookahead`` (ALGORITHMS.md 4.2) at every grid point with momentum
  (without momentum it is the paper's rule), at M = 2 with w = 1/M, then with w = 1, then at M = 4 (600 steps);
  the variant was removed from the library after this measurement, so the plan runs only with ``--src`` of a
  checkout at c512a86 (e.g. ``git worktree add --detach /work/pinned-lookahead c512a86``).
* ``trends``: the paper's trends, each method at its recipe measured best on the default job (``TREND_METHODS``:
  DiLoCo at lr 1 / Nesterov 0.5, the paper's eager at lr 1 without momentum, eager w = 0.75 at lr 0.7 / Nesterov
  0.5, w = 0.875 with smoothing β = 0.5 at the same recipe (the CLI's eager before lr 0.85); BENCHMARKS.md section
  8), one axis
  changed at a time (``TREND_POINTS``): tokens (300 / 2,700 steps), H (10 /
  100), M = 4 (600 steps), non-iid shards, model size (115k and 2.7M parameters around the default 820k), M = 8
  on the 115k model, M = 4 on the 2.7M model, and the 115k model overtrained (2,850 steps: 101 tokens per
  parameter); seed 0 of every
  point first, then seeds 1 and 2.
* ``custom``: the grid given by ``--methods --lrs --momenta --seeds --workers --steps --own-weight --smoothing``.

``--src DIR`` trains with the eagerloco of another checkout (``PYTHONPATH=DIR/src``, for a pinned commit while
the shared tree changes); each JSON records that checkout's commit and whether its ``src`` was modified.
``--report-only`` (and every finished run) rewrites ``<out>/recipe_sweep.md`` (tables) and
``<out>/recipe_sweep.png`` (eval loss vs outer lr, one line per momentum, one panel per method),
``<out>/recipe_trends.png`` (the trends' gaps) and ``<out>/recipe_tuned_gaps.png`` (``TUNED_POINTS``: DiLoCo and
the CLI's eager at that H each at the outer lr tuned for it at that model, M and H, the gap by tokens per parameter; the
runs are custom-plan points, e.g. ``--plan custom --methods sync --lrs 0.85 --momenta 0.5 --steps 5400``).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib as bl

OUT = bl.RESULTS / "recipe_sweep"
STUDY_INNER_LR = 3e-3
"""The inner lr of every point that does not set ``--lr`` in its extra flags: the study's results on disk were run at
the CLI's default of the time, 3e-3, and their keys name no inner lr; passing it explicitly keeps them meaning
that whatever the training checkout's default may become (6e-3 was measured better on this model, BENCHMARKS.md 8)."""
LOCK = Path(tempfile.gettempdir()) / "eagerloco-recipe-sweep.lock"
SWEEP_METHODS = ("sync", "streaming", "delayed", "eager", "eager2")
LRS = (0.4, 0.7, 1.0, 1.4)
MOMENTA = (0.0, 0.5, 0.9)
# (lr, momentum) in the order the plans run them: DiLoCo's recipe first, then points spread over the grid
# (the ones issue 11 measured by hand next), the corners likely to diverge last.
GRID_ORDER: tuple[tuple[float, float], ...] = (
    (0.7, 0.9), (1.0, 0.0), (0.4, 0.9), (0.7, 0.5), (1.4, 0.0), (1.0, 0.5),
    (0.4, 0.5), (0.7, 0.0), (0.4, 0.0), (1.4, 0.5), (1.0, 0.9), (1.4, 0.9),
)  # fmt: skip
DILOCO_RECIPE = (0.7, 0.9, True)  # the DiLoCo paper's outer optimizer: lr 0.7, Nesterov momentum 0.9
FINISHED = ("ok", "diverged")
LOOKAHEAD = ("--eager-lookahead",)  # ALGORITHMS.md 4.2: removed from the library; plan 'lookahead' needs --src
LOOKAHEAD_COMMIT = "c512a86"  # the last commit with eager_lookahead
SMALL_MODEL = ("--n-layer", "2", "--d-model", "64", "--n-head", "2")  # 115,008 parameters (byte vocabulary)
LARGE_MODEL = ("--n-layer", "6", "--d-model", "192", "--n-head", "6")  # 2,705,856 (the default: 820,352)
# The study's three model sizes: name -> (parameters, train flags)
STUDY_MODELS: dict[str, tuple[int, tuple[str, ...]]] = {
    "115k": (115_008, SMALL_MODEL),
    "820k": (820_352, ()),
    "2.7M": (2_705_856, LARGE_MODEL),
}
# The trends plan: (axis, what changes, the point's fields; the reference it is read against). Tokens per
# parameter: 16 sequences x 128 tokens x M per inner step, so 2,850 steps at M = 2 give the 115k model 101.
TREND_POINTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("tokens", "300 steps", {"steps": 300}),
    ("H", "H = 10", {"extra": ("--sync-every", "10")}),
    ("size", "115k parameters", {"extra": SMALL_MODEL}),
    ("data", "non-iid shards", {"extra": ("--sharding", "noniid")}),
    ("H", "H = 100", {"extra": ("--sync-every", "100")}),
    ("M", "M = 4, 600 steps", {"workers": 4, "steps": 600}),
    ("M, 115k", "M = 8, 115k parameters", {"workers": 8, "extra": SMALL_MODEL}),
    ("overtrained", "115k parameters, 2,850 steps (101 tokens/parameter)", {"steps": 2850, "extra": SMALL_MODEL}),
    ("tokens", "2,700 steps", {"steps": 2700}),
    ("size", "2.7M parameters", {"extra": LARGE_MODEL}),
    ("M, 2.7M", "M = 4, 600 steps, 2.7M parameters", {"workers": 4, "steps": 600, "extra": LARGE_MODEL}),
)
# The trends' methods, each at its recipe measured best on the default job over 3 seeds (BENCHMARKS.md section 8):
# (method, own weight, smoothing, (outer lr, momentum, Nesterov)): DiLoCo, the paper's eager, the own-weight variant
# w = 0.75 alone, and w = 0.875 with smoothing β = 0.5 (ALGORITHMS.md 4.4) at lr 0.7, the CLI's eager on 2026-12-06
# until a finer lr grid moved it to lr 0.85 (BENCHMARKS.md 8; the trend points ran at lr 0.7).
TREND_METHODS: tuple[tuple[str, float | None, float | None, tuple[float, float, bool]], ...] = (
    ("sync", None, None, (1.0, 0.5, True)),
    ("eager", None, None, (1.0, 0.0, False)),
    ("eager", 0.75, None, (0.7, 0.5, True)),
    ("eager", 0.875, 0.5, (0.7, 0.5, True)),
)

CLI_SYNC_EVERY = bl.CLI_SYNC_EVERY  # the CLI's H: a point that passes no --sync-every runs at it


@dataclass(frozen=True)
class TunedPoint:
    """A point of the study where DiLoCo and the CLI's eager rule at that H (w = 0.875, β = 0.5 up to H = 74, without
    smoothing from H = 75, ``RECIPES_AT_H``) each ran at the outer lr and Nesterov momentum best for it on the grid
    run for both at that model, M and H (BENCHMARKS.md 8, "The outer lr tuned at each model size", "... at each H"
    and "A finer step of the momentum grid"; longer runs keep the recipes of the 900-step / 600-step tuning)."""

    model: str
    """A key of ``STUDY_MODELS``."""
    workers: int
    steps: int
    """Inner steps per worker."""
    sync_lr: float
    """DiLoCo's tuned outer lr."""
    eager_lr: float
    """Eager's tuned outer lr."""
    sync_every: int = CLI_SYNC_EVERY
    """H; the CLI's adds no flag (so the key is the default job's)."""
    own_weight: float = 0.875
    """Eager's own weight w (ALGORITHMS.md 4.1): the CLI's at this H."""
    smoothing: float = 0.5
    """Eager's smoothing β (4.4): the CLI's at this H."""
    sync_momentum: float = 0.5
    """DiLoCo's tuned Nesterov momentum (0.5 wherever only the lr was tuned again)."""
    eager_momentum: float = 0.5
    """Eager's tuned Nesterov momentum."""


# Read along tokens per parameter, which decide the gap more than size or steps alone; the H = 10 and H = 100 points
# are at the default job's tokens (BENCHMARKS.md 8, "The outer lr tuned at each H").
TUNED_POINTS: tuple[TunedPoint, ...] = (
    TunedPoint("2.7M", 2, 900, 0.7, 0.7),
    TunedPoint("820k", 2, 900, 0.8, 0.68, sync_momentum=0.6, eager_momentum=0.6),  # the default job
    TunedPoint("820k", 2, 2700, 0.85, 0.85),
    TunedPoint("820k", 2, 5400, 0.85, 0.85),
    TunedPoint("115k", 2, 900, 1.0, 0.85),
    TunedPoint("2.7M", 4, 600, 1.0, 0.7),
    TunedPoint("820k", 4, 600, 1.0, 0.85),
    TunedPoint("820k", 4, 2700, 1.0, 0.85),
    TunedPoint("115k", 4, 600, 1.0, 0.85),
    TunedPoint("115k", 8, 900, 1.0, 0.85),
    TunedPoint("820k", 2, 900, 0.7, 0.7, sync_every=10),
    TunedPoint("820k", 4, 600, 0.7, 0.7, sync_every=10),
    TunedPoint("820k", 2, 900, 0.85, 0.85, sync_every=100, smoothing=0.0),
    TunedPoint("820k", 4, 600, 1.0, 0.85, sync_every=100, smoothing=0.0),
)
TOKENS_PER_WORKER_STEP = 16 * 128  # the CLI's batch: 16 sequences of 128 tokens per worker and inner step
# --smoke: configs/smoke.toml's tiny model, H = 3, no mid-run evaluation (seconds per run)
SMOKE_EXTRA: tuple[str, ...] = (*bl.SMOKE_ARGS, "--sync-every", "3", "--eval-every", "0")


def paper_rule(workers: int) -> str:
    """``--eager-own-weight`` for the eager paper's rule w = 1/M: the number where 1/M is a power of two (bitwise
    the rule, ALGORITHMS.md 4.1, and a value every engine since the own weight accepts, the sweeps' pinned ones
    included), the CLI's "1/M" otherwise."""
    return f"{1 / workers:g}" if workers & (workers - 1) == 0 else "1/M"


@dataclass(frozen=True)
class Point:
    """One training run of the study. ``extra`` are further train flags (part of the key, as a short hash)."""

    method: str
    outer_lr: float
    outer_momentum: float
    nesterov: bool
    seed: int = 0
    workers: int = 2
    steps: int = 900
    own_weight: float | None = None
    smoothing: float | None = None
    """Eager's smoothing β (``--eager-smoothing``, ALGORITHMS.md 4.4); None: not passed (the CLI's default)."""
    extra: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """File-name-safe identity, e.g. ``eager_M2_T900_lr0.7_m0.9n_s0``."""
        mom = f"m{self.outer_momentum:g}" + ("n" if self.nesterov and self.outer_momentum > 0 else "")
        parts = [self.method]
        if self.own_weight is not None:
            parts.append(f"w{self.own_weight:g}")
        if self.smoothing is not None:
            parts.append(f"b{self.smoothing:g}")
        parts += [f"M{self.workers}", f"T{self.steps}", f"lr{self.outer_lr:g}", mom, f"s{self.seed}"]
        if self.extra:
            parts.append("x" + hashlib.sha1(" ".join(self.extra).encode()).hexdigest()[:8])
        return "_".join(parts)

    @property
    def group(self) -> tuple[str, float | None, float | None, int, int, tuple[str, ...]]:
        """The panel a point belongs to: everything but the outer optimizer, the seed and ``--eval-every`` (mid-run
        evaluations do not change training: a run gives the same final eval loss, bitwise, with or without them)."""
        return (self.method, self.own_weight, self.smoothing, self.workers, self.steps, _without_eval_every(self.extra))

    @property
    def recipe(self) -> tuple[float, float, bool]:
        return (self.outer_lr, self.outer_momentum, self.nesterov and self.outer_momentum > 0)

    def train_args(self, engine_smoothing: bool = False) -> list[str]:
        """The ``eagerloco train`` flags of this run (without ``--out-dir``). ``engine_smoothing``: the engine has
        eager smoothing (ALGORITHMS.md 4.4; :func:`engine_has_smoothing`), so an eager point without one says β = 0:
        the CLI's eager default smooths since 2026-12-06 (engines before it have no such flag, and no smoothing)."""
        args = [
            *bl.METHODS[self.method],
            "--launch", "simulated", "--link-mbit", "0", "--threads", "1",
            "--workers", str(self.workers), "--steps", str(self.steps), "--seed", str(self.seed),
            "--outer-lr", f"{self.outer_lr:g}", "--outer-momentum", f"{self.outer_momentum:g}",
            "--nesterov" if self.nesterov and self.outer_momentum > 0 else "--no-nesterov",
        ]  # fmt: skip
        if self.own_weight is not None:
            args += ["--eager-own-weight", f"{self.own_weight:g}"]
        elif bl.is_eager(self.method):  # the paper's rule, said: the CLI's eager default is w = 0.75
            args += ["--eager-own-weight", paper_rule(self.workers)]
        if self.smoothing is not None:
            args += ["--eager-smoothing", f"{self.smoothing:g}"]
        elif engine_smoothing and bl.is_eager(self.method):
            args += ["--eager-smoothing", "0"]
        if not any(a == "--lr" or a.startswith("--lr=") for a in self.extra):
            args += ["--lr", f"{STUDY_INNER_LR:g}"]
        return [*args, *self.extra]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["extra"] = list(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Point:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        values["extra"] = tuple(values.get("extra", ()))
        return cls(**values)


def _without_eval_every(extra: tuple[str, ...]) -> tuple[str, ...]:
    """``extra`` without ``--eval-every N`` (which only adds evaluations along the run)."""
    out: list[str] = []
    skip = False
    for arg in extra:
        if skip:
            skip = False
        elif arg == "--eval-every":
            skip = True
        elif not arg.startswith("--eval-every="):
            out.append(arg)
    return tuple(out)


def label(group: tuple[str, float | None, float | None, int, int, tuple[str, ...]]) -> str:
    method, w, beta, workers, steps, extra = group
    text = bl.LABELS.get(method, method)
    if method == "streaming" and "--overlap-steps" in extra[:-1]:  # the run's τ in the name, not beside τ = 1
        i = max(k for k, a in enumerate(extra[:-1]) if a == "--overlap-steps")  # the last wins, as in argparse
        text = text.replace("τ=1", f"τ={extra[i + 1]}")
        extra = extra[:i] + extra[i + 2 :]
    if w is not None:
        text += f", own weight w={w:g}"
    if beta is not None:
        text += f", smoothing β={beta:g}"
    text += f" (M={workers}, {steps} steps"
    if extra:
        text += ", " + " ".join(extra)
    return text + ")"


def recipe_label(recipe: tuple[float, float, bool]) -> str:
    lr, mom, nest = recipe
    return f"lr {lr:g}, " + ("momentum 0" if mom == 0 else f"momentum {mom:g} ({'Nesterov' if nest else 'heavy ball'})")


# ------------------------------------------------------------------------------------------------------ plans
def grid(methods: Sequence[str], pairs: Iterable[tuple[float, float]], **common: Any) -> list[Point]:
    """Every method at each (lr, momentum) in turn (methods innermost), Nesterov where momentum > 0."""
    return [Point(m, lr, mom, mom > 0, **common) for lr, mom in pairs for m in methods]


def best_point(results: dict[str, dict[str, Any]], group: tuple[Any, ...], seed: int = 0) -> Point | None:
    """The finished ``seed`` run of ``group`` with the lowest eval loss (diverged runs never win)."""
    best: tuple[float, Point] | None = None
    for rec in results.values():
        p = Point.from_dict(rec["point"])
        if p.group != group or p.seed != seed or rec.get("status") != "ok" or not _finite(rec.get("eval_loss")):
            continue
        if best is None or rec["eval_loss"] < best[0]:
            best = (rec["eval_loss"], p)
    return best[1] if best else None


def plan_points(
    plan: str, results: dict[str, dict[str, Any]], args: argparse.Namespace | None = None
) -> list[tuple[str, Point]]:
    """The plan's points in run order, as (stage, point). Stages computed from results (the seeds at each
    method's best) appear once every earlier point of that method has finished."""
    extra = tuple(args.extra_args) if args is not None else ()
    if plan == "custom":
        assert args is not None
        pairs = [(lr, mom) for lr in args.lrs for mom in args.momenta]
        out = []
        for seed in args.seeds:
            pts = grid(
                args.methods,
                pairs,
                seed=seed,
                workers=args.workers,
                steps=args.steps,
                own_weight=args.own_weight,
                smoothing=args.smoothing,
                extra=extra,
            )
            if args.heavy_ball:
                pts += [dataclasses.replace(p, nesterov=False) for p in pts if p.outer_momentum > 0]
            out += [("custom", p) for p in pts]
        return out
    if plan == "main":
        stages = [
            ("1: sync, eager k=1", grid(["sync", "eager"], GRID_ORDER, extra=extra)),
            ("2: streaming, delayed, eager k=2", grid(["streaming", "delayed", "eager2"], GRID_ORDER, extra=extra)),
            (
                "3: heavy-ball momentum 0.9",
                [Point(m, lr, 0.9, False, extra=extra) for m in SWEEP_METHODS for lr in (0.7, 0.4, 1.0, 1.4)],
            ),
        ]
        out = [(name, p) for name, pts in stages for p in pts]
        for method in SWEEP_METHODS:
            mine = [p for _, p in out if p.method == method]
            if not all(_finished(results.get(p.key)) for p in mine):
                continue
            best = best_point(results, mine[0].group)
            if best is not None:
                out += [("4: seeds at the best", dataclasses.replace(best, seed=s)) for s in (1, 2)]
        return out
    if plan == "trends":
        return trend_points(extra)
    if plan == "lookahead":
        look = (*LOOKAHEAD, *extra)
        with_momentum = [(lr, mom) for lr, mom in GRID_ORDER if mom > 0]  # without momentum: the paper's rule
        stages = [
            ("L1: eager lookahead, M=2", grid(["eager"], with_momentum, extra=look)),
            ("L2: eager lookahead w=1, M=2", grid(["eager"], with_momentum, own_weight=1.0, extra=look)),
            ("L3: eager lookahead, M=4", grid(["eager"], with_momentum, workers=4, steps=600, extra=look)),
        ]
        return [(name, p) for name, pts in stages for p in pts]
    if plan == "variant":
        m4 = {"workers": 4, "steps": 600, "extra": extra}
        sync4 = grid(["sync"], GRID_ORDER, **m4)
        eagerw4 = grid(["eager"], GRID_ORDER, own_weight=1.0, **m4)
        stages = [
            ("V1: eager w=1, M=2", grid(["eager"], GRID_ORDER, own_weight=1.0, extra=extra)),
            ("V2: sync and eager w=1, M=4", [p for pair in zip(sync4, eagerw4) for p in pair]),
            ("V3: eager (paper), M=4", grid(["eager"], GRID_ORDER, **m4)),
        ]
        return [(name, p) for name, pts in stages for p in pts]
    raise ValueError(f"plan={plan!r}: must be 'main', 'variant', 'lookahead', 'trends' or 'custom'")


def trend_recipes(extra: tuple[str, ...] = ()) -> list[Point]:
    """The default job's point of each ``TREND_METHODS`` entry at its recipe (seed 0)."""
    return [
        Point(m, lr, mom, nest, own_weight=w, smoothing=b, extra=extra) for m, w, b, (lr, mom, nest) in TREND_METHODS
    ]


def trend_names() -> list[str]:
    """Each ``TREND_METHODS`` entry's name in the trend table and plot."""
    return [
        bl.LABELS.get(m, m) + (f", w={w:g}" if w is not None else "") + (f", β={b:g}" if b is not None else "")
        for m, w, b, _ in TREND_METHODS
    ]


def trend_points(extra: tuple[str, ...] = ()) -> list[tuple[str, Point]]:
    """The trends plan: every TREND_POINTS entry for every method (methods innermost), seed 0 first, then seeds 1
    and 2 of every point (the default job's own seeds are in the study's runs)."""
    out: list[tuple[str, Point]] = []
    for seeds, stage in (((0,), "T1: trends, seed 0"), ((1, 2), "T2: trends, seeds 1 and 2")):
        for seed in seeds:
            for axis, what, fields in TREND_POINTS:
                for best in trend_recipes():
                    change = {**fields, "extra": (*fields.get("extra", ()), *extra), "seed": seed}
                    out.append((f"{stage}: {axis}: {what}", dataclasses.replace(best, **change)))
    return out


def trend_keys() -> set[str]:
    """Keys of the trend points that change more than the length or M (their own model, H or data): the grid
    tables leave them to the trends section."""
    return {p.key for _, p in trend_points() if p.extra}


def _finished(rec: dict[str, Any] | None) -> bool:
    return rec is not None and rec.get("status") in FINISHED


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# ------------------------------------------------------------------------------------------------ results i/o
def atomic_write_json(path: Path, payload: Any) -> None:
    """Write ``payload`` to ``path`` so that readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(payload, indent=2, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with bl._suppress():
            os.unlink(tmp)
        raise


def load_results(out: Path) -> dict[str, dict[str, Any]]:
    """key -> record of every ``<out>/runs/*.json`` (files that do not parse are ignored: never written by us)."""
    results = {}
    for path in sorted((Path(out) / "runs").glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        results[Point.from_dict(rec["point"]).key] = rec
    return results


def source_info(src: Path | None) -> dict[str, Any]:
    """Which checkout trained: its path, commit, and whether its ``src`` has uncommitted changes."""
    root = Path(src) if src is not None else bl.ROOT

    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(root), *argv], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "checkout": str(root),
        "commit": git("rev-parse", "HEAD").strip(),
        "src_modified": bool(git("status", "--porcelain", "--", "src").strip()),
    }


# ------------------------------------------------------------------------------------------------ running
Runner = Callable[[Point, Path], dict[str, Any]]


def engine_has_smoothing(src: Path | None) -> bool:
    """Whether the eagerloco at ``src`` (this checkout if None) has eager smoothing (``--eager-smoothing``)."""
    config = (Path(src) if src is not None else bl.ROOT) / "src" / "eagerloco" / "engine" / "config.py"
    return config.is_file() and "eager_smoothing" in config.read_text()


def train_runner(src: Path | None, runs_dir: Path, timeout: float) -> Runner:
    """Run one point with ``eagerloco train`` (from ``src``'s checkout if given); return its record fields (with
    the flags it ran)."""
    smoothing = engine_has_smoothing(src)
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(Path(src) / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")

    def run(point: Point, _out: Path) -> dict[str, Any]:
        out_dir = runs_dir / point.key
        args = point.train_args(engine_smoothing=smoothing)
        try:
            summary = bl.run_train(args, out_dir, timeout=timeout, env=env)
        except RuntimeError as exc:
            text = str(exc)
            status = "diverged" if "NonFiniteOuterGradient" in text else "failed"
            return {"status": status, "eval_loss": None, "error": text[-3000:], "train_args": args}
        except subprocess.TimeoutExpired:
            return {
                "status": "failed",
                "eval_loss": None,
                "error": f"timed out after {timeout:.0f} s",
                "train_args": args,
            }
        loss = summary["eval_loss"]
        return {
            "train_args": args,
            "status": "ok" if _finite(loss) else "diverged",
            "eval_loss": loss if _finite(loss) else None,
            "evals": summary["evals"],
            "final_train_loss": [w["final_train_loss"] for w in summary["per_worker"]],
            "tokens": summary["tokens"],
            "outer_steps": summary["outer_steps"],
            "wall_s": summary["wall_s"],
            "driver_wall_s": summary["driver_wall_s"],
            "run_dir": str(out_dir),
        }

    return run


def sweep(
    plan: str,
    out: Path,
    runner: Runner,
    *,
    args: argparse.Namespace | None = None,
    source: dict[str, Any] | None = None,
    command: str = "",
    max_runs: int | None = None,
    log: Callable[[str], None] = print,
) -> list[str]:
    """Run every unfinished point of ``plan`` in order, one JSON per run; return the keys run now."""
    ran: list[str] = []
    tried: set[str] = set()  # failed points are tried once per invocation
    while max_runs is None or len(ran) < max_runs:
        results = load_results(out)
        points = plan_points(plan, results, args)
        todo = [(s, p) for s, p in points if not _finished(results.get(p.key)) and p.key not in tried]
        if not todo:
            break
        stage, point = todo[0]
        tried.add(point.key)
        done = sum(_finished(results.get(p.key)) for _, p in points)
        log(f"[{time.strftime('%H:%M:%S')}] {done}/{len(points)} done; stage {stage}: {point.key}")
        start = time.time()
        fields = runner(point, out)
        record = {
            "point": point.to_dict(),
            "key": point.key,
            "plan": plan,
            "stage": stage,
            "train_args": point.train_args(),
            **fields,
            "source": source or {},
            "command": command,
            "started_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(start)),
            "loadavg_at_end": list(os.getloadavg()),
        }
        atomic_write_json(out / "runs" / f"{point.key}.json", record)
        ran.append(point.key)
        loss = record.get("eval_loss")
        log(f"    {record['status']}: eval loss {loss:.4f}" if _finite(loss) else f"    {record['status']}")
        write_report(out)
    return ran


class SweepLock:
    """An exclusive ``flock`` on ``path`` for the whole sweep; the holder's pid is written into the file."""

    def __init__(self, path: Path, wait: bool) -> None:
        self.path, self.wait, self.fh = Path(path), wait, None

    def __enter__(self) -> SweepLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX if self.wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            fh.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                print(
                    f"recipe_sweep: another sweep holds {self.path} (pid {holder}); pass --wait-lock to queue "
                    "behind it",
                    file=sys.stderr,
                )
                raise SystemExit(3) from None
            raise
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self.fh = fh
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fh is not None:
            self.fh.close()  # releases the lock


# ------------------------------------------------------------------------------------------------ report
MOMENTUM_COLUMNS: tuple[tuple[float, bool], ...] = ((0.0, False), (0.5, True), (0.9, True), (0.9, False))


def _cell(recs: list[dict[str, Any]]) -> str:
    """Eval loss of one grid cell: seed 0's, with the mean over seeds when there are several."""
    if not recs:
        return "·"
    by_seed = {Point.from_dict(r["point"]).seed: r for r in recs}
    first = by_seed.get(0) or by_seed[min(by_seed)]
    if first["status"] != "ok":
        return "diverged" if first["status"] == "diverged" else "failed"
    text = f"{first['eval_loss']:.3f}"
    ok = [r["eval_loss"] for r in by_seed.values() if r["status"] == "ok"]
    if len(by_seed) > 1:
        text += f" (mean {sum(ok) / len(ok):.3f}, {len(by_seed)} seeds)" if len(ok) == len(by_seed) else " (+ seeds)"
    return text


def report(out: Path) -> str:
    """The markdown tables of every finished run under ``out``."""
    results = load_results(out)
    finished = {k: r for k, r in results.items() if _finished(r)}
    own_trends = trend_keys()
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for rec in finished.values():
        if rec.get("plan") != "trends":
            groups.setdefault(Point.from_dict(rec["point"]).group, []).append(rec)
    # a point of the trends with its own flags (H, size, data) has its own section, unless more was run there
    groups = {g: recs for g, recs in groups.items() if not all(r["key"] in own_trends for r in recs)}
    order = {m: i for i, m in enumerate(SWEEP_METHODS)}
    keys = sorted(groups, key=lambda g: (g[3], g[4], order.get(g[0], 99), g[0], g[1] or 0.0, g[2] or 0.0, g[5]))
    commits = sorted({r.get("source", {}).get("commit", "")[:10] for r in finished.values()} - {""})
    lines = [
        "# Recipe study (issue 11): eval loss of the outer parameters",
        "",
        f"PARTIAL unless stated otherwise: {len(finished)} runs finished "
        f"({sum(r['status'] == 'diverged' for r in finished.values())} diverged), "
        f"{sum(r['status'] == 'failed' for r in results.values())} failed (to be retried). "
        f"Seed 0 unless a cell says otherwise. `eagerloco train --launch simulated --link-mbit 0 --threads 1` "
        f"with the flags in each run's JSON (`runs/<key>.json`); trained from commit(s) {', '.join(commits) or '-'}.",
        "",
        "Plans: "
        + "; ".join(
            f"{plan} {sum(_finished(results.get(p.key)) for _, p in pts)} of {len(pts)} points finished"
            for plan, pts in ((plan, plan_points(plan, results)) for plan in ("main", "variant", "lookahead", "trends"))
        )
        + " (main's count grows by 2 per method when its seeds at the best are scheduled).",
        "",
    ]
    if not keys:
        return "\n".join([*lines, "No finished runs yet."]) + "\n"
    lines += [
        "## Every method at its best so far (seed 0 decides; mean over seeds where there are several)",
        "",
        "`vs DiLoCo`: seed-0 eval loss over sync's best seed-0 eval loss at the same M and steps.",
        "",
    ]
    rows = []
    for g in keys:
        best = best_point(results, g)
        if best is None:
            rows.append([label(g), "-", "all diverged", "-", "-", "-", len(groups[g])])
            continue
        same = [r for r in groups[g] if Point.from_dict(r["point"]).recipe == best.recipe]
        seeds = sorted(Point.from_dict(r["point"]).seed for r in same)
        ok = [r["eval_loss"] for r in same if r["status"] == "ok"]
        mean = f"{sum(ok) / len(ok):.3f}" if len(ok) == len(same) else "-"
        s0 = results[best.key]["eval_loss"]
        sync_extra = tuple(x for x in g[5] if x not in LOOKAHEAD)  # the variant's flag: compared with plain sync
        ref = best_point(results, ("sync", None, None, g[3], g[4], sync_extra))
        vs = f"{(s0 / results[ref.key]['eval_loss'] - 1) * 100:+.1f} %" if ref is not None else "-"
        seed_list = ", ".join(map(str, seeds))
        rows.append([label(g), recipe_label(best.recipe), f"{s0:.3f}", vs, mean, seed_list, len(groups[g])])
    lines += [
        bl.md_table(
            ["method", "best recipe so far", "eval loss seed 0", "vs DiLoCo", "mean over seeds", "seeds", "runs"],
            rows,
        ),
        "",
    ]
    lines += ["## Every method at DiLoCo's recipe (lr 0.7, Nesterov momentum 0.9)", ""]
    rows = []
    for g in keys:
        same = [r for r in groups[g] if Point.from_dict(r["point"]).recipe == DILOCO_RECIPE]
        rows.append([label(g), _cell(same)])
    lines += [bl.md_table(["method", "eval loss"], rows), ""]
    lines += ["## The grids (rows: outer lr; columns: outer momentum; `·`: not run yet)", ""]
    header = [
        "outer lr",
        *(f"momentum {m:g}" + ("" if m == 0 else (" Nesterov" if n else " heavy ball")) for m, n in MOMENTUM_COLUMNS),
    ]
    for g in keys:
        lrs = sorted({Point.from_dict(r["point"]).outer_lr for r in groups[g]} | set(LRS))
        rows = []
        for lr in lrs:
            row = [f"{lr:g}"]
            for mom, nest in MOMENTUM_COLUMNS:
                row.append(_cell([r for r in groups[g] if Point.from_dict(r["point"]).recipe == (lr, mom, nest)]))
            rows.append(row)
        lines += [f"### {label(g)}", "", bl.md_table(header, rows), ""]
    lines += trends_report(results)
    lines += tuned_gaps_report(results)
    return "\n".join(lines).rstrip() + "\n"


def _mean_loss(results: dict[str, dict[str, Any]], point: Point, seeds: Sequence[int] = (0, 1, 2)) -> tuple[
        float | None, int, str]:  # fmt: skip
    """(mean eval loss over the finished seeds, how many, a cell text) of ``point`` at ``seeds``."""
    recs = [results.get(dataclasses.replace(point, seed=seed).key) for seed in seeds]
    recs = [r for r in recs if _finished(r)]
    if not recs:
        return None, 0, "·"
    if any(r["status"] != "ok" for r in recs):
        return None, len(recs), "diverged"
    mean = sum(r["eval_loss"] for r in recs) / len(recs)
    spread = max(r["eval_loss"] for r in recs) - min(r["eval_loss"] for r in recs)
    return mean, len(recs), f"{mean:.3f}" + (f" ±{spread / 2:.3f} ({len(recs)} seeds)" if len(recs) > 1 else "")


def trend_rows(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, list[tuple[float | None, str]]]]:
    """(axis, what, per TREND_METHODS (mean loss, cell)) for the default job and every TREND_POINTS entry; cells
    of a method whose recipe is not known yet are '-'."""
    recipes = trend_recipes()
    rows = []
    for axis, what, fields in (("default", "900 steps, H = 30, M = 2, 820k parameters, iid", {}), *TREND_POINTS):
        cells: list[tuple[float | None, str]] = []
        for best in recipes:
            mean, _, text = _mean_loss(results, dataclasses.replace(best, **fields))
            cells.append((mean, text))
        rows.append((axis, what, cells))
    return rows


def trends_report(results: dict[str, dict[str, Any]]) -> list[str]:
    """The trends section: each method at its best recipe, one axis changed at a time; gaps vs DiLoCo."""
    keys = {dataclasses.replace(p, seed=s).key for _, p in trend_points() for s in (0, 1, 2)}
    if not any(_finished(results.get(k)) for k in keys):
        return []
    names = trend_names()
    header = ["axis", "point", *(f"{n} ({recipe_label(r)})" for n, (*_, r) in zip(names, TREND_METHODS))]
    header += [f"{n} vs DiLoCo" for n in names[1:]]
    rows = []
    for axis, what, cells in trend_rows(results):
        ref = cells[0][0]
        gaps = [f"{(c[0] / ref - 1) * 100:+.1f} %" if ref and c[0] else "-" for c in cells[1:]]
        rows.append([axis, what, *(c[1] for c in cells), *gaps])
    return [
        "## Trends: each method at its best recipe of the default job, one axis changed at a time",
        "",
        "Mean eval loss over the seeds finished (± half the range); `vs DiLoCo`: over sync's mean at the same point.",
        "",
        bl.md_table(header, rows),
        "",
    ]


def tuned_pair(point: TunedPoint) -> tuple[Point, Point]:
    """DiLoCo's and the CLI's eager's seed-0 runs of a ``TUNED_POINTS`` entry."""
    extra = STUDY_MODELS[point.model][1]
    if point.sync_every != CLI_SYNC_EVERY:
        extra = (*extra, "--sync-every", str(point.sync_every))
    shape = {"workers": point.workers, "steps": point.steps, "extra": extra}
    sync = Point("sync", point.sync_lr, point.sync_momentum, True, **shape)
    smoothing = point.smoothing or None  # a Point without smoothing has the key of the runs made before it existed
    eager = Point(
        "eager", point.eager_lr, point.eager_momentum, True, own_weight=point.own_weight, smoothing=smoothing, **shape
    )
    return sync, eager


def tuned_gap_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per ``TUNED_POINTS`` entry with both methods finished (ok) on at least one common seed of 0, 1, 2:
    the means over those common seeds (paired, so a seed run for one method only does not move the gap)."""
    rows = []
    for point in TUNED_POINTS:
        sync, eager = tuned_pair(point)
        pairs = []
        for seed in (0, 1, 2):
            a, b = (results.get(dataclasses.replace(p, seed=seed).key) for p in (sync, eager))
            if _finished(a) and _finished(b) and a["status"] == b["status"] == "ok":
                pairs.append((seed, a["eval_loss"], b["eval_loss"]))
        if not pairs:
            continue
        sync_loss = sum(x for _, x, _ in pairs) / len(pairs)
        eager_loss = sum(y for _, _, y in pairs) / len(pairs)
        rows.append({
            **dataclasses.asdict(point),
            "tokens_per_param": point.steps * point.workers * TOKENS_PER_WORKER_STEP / STUDY_MODELS[point.model][0],
            "seeds": [seed for seed, _, _ in pairs], "sync": sync_loss, "eager": eager_loss,
            "gap_pct": (eager_loss / sync_loss - 1) * 100,
            "gap_pct_per_seed": [(y / x - 1) * 100 for _, x, y in pairs],
        })  # fmt: skip
    return rows


def tuned_gaps_report(results: dict[str, dict[str, Any]]) -> list[str]:
    """The section of ``TUNED_POINTS``: the gap with both methods at their tuned outer lr, by tokens per parameter."""
    rows = tuned_gap_rows(results)
    if not rows:
        return []
    header = ["model", "M", "H", "inner steps", "tokens / parameter", "DiLoCo", "eager", "seeds", "gap",
              "gap per seed (%)"]  # fmt: skip
    table = []
    for r in rows:
        rule = f"w = {r['own_weight']:g}" + (f", β = {r['smoothing']:g}" if r["smoothing"] else "")
        mu = {m: f", N {r[f'{m}_momentum']:g}" if r[f"{m}_momentum"] != 0.5 else "" for m in ("sync", "eager")}
        sync = f"{r['sync']:.4f} (lr {r['sync_lr']:g}{mu['sync']})"
        eager = f"{r['eager']:.4f} (lr {r['eager_lr']:g}{mu['eager']}, {rule})"
        per_seed = " / ".join(f"{g:+.2f}" for g in r["gap_pct_per_seed"])
        seeds = ", ".join(map(str, r["seeds"]))
        table.append([r["model"], r["workers"], r["sync_every"], f"{r['steps']:,}", f"{r['tokens_per_param']:.1f}",
                      sync, eager, seeds, f"{r['gap_pct']:+.2f} %", per_seed])  # fmt: skip
    return [
        "## The gap with both methods tuned: DiLoCo against the CLI's eager, by tokens per parameter",
        "",
        "Each at the outer lr best for it at that model, M and H (Nesterov 0.5 where no N is given; eager the CLI's "
        "rule at that H: w = 0.875, β = 0.5 up to H = 74, without smoothing from H = 75); means over the seeds both "
        "finished.",
        "",
        bl.md_table(header, table),
        "",
    ]


def plot_tuned_gaps(results: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """The gap of ``tuned_gaps_report`` against tokens per parameter, one line per M, the model at each point; None
    when matplotlib is missing or no point has both methods finished."""
    rows = tuned_gap_rows(results)
    if not rows:
        return None
    plt = _pyplot()
    if plt is None:
        return None
    from matplotlib.ticker import NullFormatter

    markers = {"115k": "^", "820k": "o", "2.7M": "s"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, workers in enumerate(sorted({r["workers"] for r in rows})):
        pts = sorted(((r["tokens_per_param"], r["gap_pct"], r) for r in rows if r["workers"] == workers),
                     key=lambda p: p[0])  # fmt: skip
        color = f"C{i + 1}"
        default_h = [r["sync_every"] == CLI_SYNC_EVERY for _, _, r in pts]  # the line; other H hollow, apart
        line = [(x, y) for (x, y, _), on in zip(pts, default_h, strict=True) if on]
        ax.plot([x for x, _ in line], [y for _, y in line], ls=":", color=color, label=f"M = {workers}")
        for (x, y, r), on in zip(pts, default_h, strict=True):
            ax.plot([x], [y], marker=markers[r["model"]], color=color, fillstyle="full" if on else "none")
            n = len(r["seeds"])
            note = f"{r['model']}, {r['steps']:,} steps" + ("" if on else f", H = {r['sync_every']}")
            note += "" if n == 3 else f" ({n} seed{'s' if n > 1 else ''})"
            ax.annotate(note, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(0, color="C0", lw=1, label="DiLoCo")
    ax.axhline(1, color="grey", lw=1, ls="--", label="issue 11's bound (1.01x)")
    ax.set_xscale("log")
    top = max(r["tokens_per_param"] for r in rows)
    ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if t <= 2 * top]  # labelled up to the last point
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"tokens per parameter (markers: ▲ 115k, ● 820k, ■ 2.7M parameters; hollow: H ≠ {CLI_SYNC_EVERY})")
    ax.set_ylabel("eval loss of eager vs DiLoCo (%)")
    ax.set_title(
        "The CLI's eager (w = 0.875, β = 0.5; at H = 100 w = 0.75) against DiLoCo, both at their tuned outer lr",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")  # the points sit low and left of 200 tokens per parameter
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, or None where matplotlib is missing (the plots are optional)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


PLOT_MIN_POINTS = 3
"""A method group gets a panel of the lr plot when it has at least this many (lr, momentum) points at seed 0 (a
grid); single points (the trends, the variants' screens) are in recipe_sweep.md's tables."""
PLOT_SPAN = 0.35
"""Each panel's y range: its best loss to best + PLOT_SPAN; points above it sit on the top edge as ▲ with their value
(a diverged recipe would otherwise flatten the rest)."""


def lr_grids(results: dict[str, dict[str, Any]]) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    """The finished seed-0 runs of every method group with at least ``PLOT_MIN_POINTS`` (lr, momentum) points: the
    lr plot's panels."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for rec in results.values():
        p = Point.from_dict(rec["point"])
        if rec.get("status") == "ok" and p.seed == 0:
            groups.setdefault(p.group, []).append(rec)
    return {
        g: recs
        for g, recs in groups.items()
        if len({Point.from_dict(r["point"]).recipe for r in recs}) >= PLOT_MIN_POINTS
    }


def plot(out: Path, path: Path) -> Path | None:
    """Eval loss vs outer lr, one line per momentum setting, one panel per method group with a grid of at least
    ``PLOT_MIN_POINTS`` points (seed 0), each panel on its own y range. None when matplotlib is missing or no grid
    finished."""
    plt = _pyplot()
    if plt is None:
        return None
    groups = lr_grids(load_results(out))
    if not groups:
        return None
    order = {m: i for i, m in enumerate(SWEEP_METHODS)}
    keys = sorted(groups, key=lambda g: (g[3], g[4], order.get(g[0], 99), g[0], g[1] or 0.0, g[2] or 0.0, g[5]))
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
    colors = {col: f"C{i}" for i, col in enumerate(MOMENTUM_COLUMNS)}  # one colour per momentum in every panel
    for ax, g in zip(axes.flat, keys):
        best = min(r["eval_loss"] for r in groups[g])
        top = best + PLOT_SPAN
        for mom, nest in MOMENTUM_COLUMNS:
            pts = sorted(
                (Point.from_dict(r["point"]).outer_lr, r["eval_loss"])
                for r in groups[g]
                if Point.from_dict(r["point"]).recipe[1:] == (mom, nest)
            )
            if not pts:
                continue
            name = "momentum 0" if mom == 0 else f"{mom:g} {'Nesterov' if nest else 'heavy ball'}"
            color = colors[(mom, nest)]
            ax.plot([x for x, _ in pts], [min(y, top) for _, y in pts], marker="o", label=name, color=color)
            for x, y in pts:
                if y > top:  # off the panel's range: a ▲ on the edge, with the value
                    ax.plot([x], [top], marker="^", markersize=9, color=color)
                    ax.annotate(f"{y:.2f}", (x, top), textcoords="offset points", xytext=(4, -10), fontsize=7)
        lrs = sorted({Point.from_dict(r["point"]).outer_lr for r in groups[g]} | set(LRS))
        ax.set_xticks(lrs)
        ax.set_xlim(min(lrs) - 0.1, max(lrs) + 0.1)
        ax.set_ylim(best - 0.02, top + 0.02)
        ax.axhline(best, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(f"{label(g)}\nbest {best:.3f}", fontsize=9)
        ax.set_xlabel("outer lr")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("eval loss (seed 0)")
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(
        f"Recipe study (issue 11): eval loss of the outer parameters vs outer lr, seed 0, every grid of "
        f"{PLOT_MIN_POINTS} or more points (single points: recipe_sweep.md)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / (3.6 * nrows)))  # room for the suptitle
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# The trends plot's line panels: axis -> (x label, {point: x}); "default" is the default job's row.
TREND_LINES: dict[str, tuple[str, dict[str, float]]] = {
    "tokens": ("inner steps (M = 2)", {"300 steps": 300, "default": 900, "2,700 steps": 2700}),
    "H": ("H (inner steps per outer step)", {"H = 10": 10, "default": CLI_SYNC_EVERY, "H = 100": 100}),
    "M": ("M (820k model; M = 4 at 600 steps)", {"default": 2, "M = 4, 600 steps": 4}),
    "size": (
        "parameters",
        {f"{name} parameters" if extra else "default": n for name, (n, extra) in STUDY_MODELS.items()},
    ),
}
TICK_LABELS = {n: name for name, (n, _) in STUDY_MODELS.items()}


def plot_trends(results: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """The gap of each eager method to DiLoCo (%, mean over finished seeds) along each trend axis; None when
    matplotlib is missing or no trend has both methods finished."""
    plt = _pyplot()
    if plt is None:
        return None
    rows = trend_rows(results)
    gaps = {}  # (axis, what) -> [gap % of each eager method or None]
    for axis, what, cells in rows:
        ref = cells[0][0]
        gaps[(axis, what)] = [(c[0] / ref - 1) * 100 if ref and c[0] else None for c in cells[1:]]
    if not any(g is not None for v in gaps.values() for g in v):
        return None
    default = next(v for (axis, _), v in gaps.items() if axis == "default")
    names = trend_names()[1:]
    from matplotlib.ticker import NullFormatter

    fig, grid_axes = plt.subplots(2, 3, figsize=(13, 7.5))
    axes = list(grid_axes.flat)
    axes[-1].axis("off")
    for ax, (axis, (xlabel, xs)) in zip(axes, TREND_LINES.items()):
        for i, name in enumerate(names):
            pts = sorted((x, (default if what == "default" else gaps.get((axis, what), [None] * len(names)))[i])
                         for what, x in xs.items())  # fmt: skip
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name, color=f"C{i + 1}")
        ax.set_xscale("log")
        ax.set_xticks(list(xs.values()), [TICK_LABELS.get(int(x), f"{x:g}") for x in xs.values()])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.axhline(0, color="C0", lw=1, label="DiLoCo")
        ax.set_title(axis, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    others = [(what, v) for (axis, what), v in gaps.items() if axis not in (*TREND_LINES, "default")]
    ax = axes[len(TREND_LINES)]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ys = [v[i] if v[i] is not None else float("nan") for _, v in others]
        ax.barh([k + i * width for k in range(len(others))], ys, height=width, label=name, color=f"C{i + 1}")
    ticks = [textwrap.fill(what, 24) for what, _ in others]
    ax.set_yticks([k + width * (len(names) - 1) / 2 for k in range(len(others))], ticks, fontsize=7)
    ax.axvline(0, color="C0", lw=1)
    ax.set_title("other points", fontsize=9)
    ax.set_xlabel("eval loss vs DiLoCo (%)")
    for ax in (axes[0], axes[3]):
        ax.set_ylabel("eval loss vs DiLoCo (%)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Recipe study (issue 11): the eager gap along each trend, each method at its best recipe",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out: Path, with_plot: bool = True) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "recipe_sweep.md"
    tmp = out / f".recipe_sweep.md.{os.getpid()}.tmp"  # a --report-only may run next to the sweep
    tmp.write_text(report(out))
    os.replace(tmp, md)
    if with_plot:
        plot(out, out / "recipe_sweep.png")
        results = load_results(out)
        plot_trends(results, out / "recipe_trends.png")
        plot_tuned_gaps(results, out / "recipe_tuned_gaps.png")
    return md


# ------------------------------------------------------------------------------------------------ main
def custom_args_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the custom plan's values, in one line (None: nothing). Checked before anything runs, so a
    bad value does not become a sweep of failed points."""
    eager_only = [("--own-weight", args.own_weight), ("--smoothing", args.smoothing)]
    for flag, value in eager_only:
        if value is None:
            continue
        if args.plan != "custom":
            return f"{flag} {value:g}: only the custom plan takes it (--plan custom), not --plan {args.plan}"
        not_eager = [m for m in args.methods if not bl.is_eager(m)]
        if not_eager:
            return f"{flag} {value:g} is eager's; --methods {' '.join(not_eager)} are not eager methods"
    if args.workers < 1:
        return f"--workers {args.workers}: must be >= 1"
    if args.steps < 1:
        return f"--steps {args.steps}: must be >= 1"
    if args.own_weight is not None and not 1 / args.workers <= args.own_weight <= 1:
        return (
            f"--own-weight {args.own_weight:g}: must be in [1/M, 1] = [{1 / args.workers:g}, 1] for --workers "
            f"{args.workers} (ALGORITHMS.md 4.1)"
        )
    if args.smoothing is not None and not 0 <= args.smoothing <= 1:
        return f"--smoothing {args.smoothing:g}: must be in [0, 1] (ALGORITHMS.md 4.4)"
    bad_lr = [lr for lr in args.lrs if not (math.isfinite(lr) and lr > 0)]
    if bad_lr:
        return f"--lrs {bad_lr[0]:g}: every outer learning rate must be finite and > 0"
    bad_momentum = [mom for mom in args.momenta if not 0 <= mom < 1]
    if bad_momentum:
        return f"--momenta {bad_momentum[0]:g}: every outer momentum must be in [0, 1)"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", default="main", choices=["main", "variant", "lookahead", "trends", "custom"])
    ap.add_argument("--out", type=Path, default=OUT, help="results folder (runs/<key>.json, recipe_sweep.md/.png)")
    ap.add_argument("--runs-dir", type=Path, default=None, help="training run folders (default ROOT/runs/recipe_sweep)")
    ap.add_argument("--src", type=Path, default=None, help="checkout to train with (PYTHONPATH=SRC/src)")
    ap.add_argument("--lock", type=Path, default=LOCK)
    ap.add_argument("--wait-lock", action="store_true", help="queue behind a running sweep instead of exiting 3")
    ap.add_argument("--report-only", action="store_true", help="rebuild the table and plot from the JSON; no runs")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    ap.add_argument("--timeout", type=float, default=7200.0, help="seconds one run may take")
    ap.add_argument("--list", action="store_true", help="print the plan's points and their status; no runs")
    ap.add_argument(
        "--extra",
        action="append",
        default=[],
        help="extra train flag for every point, e.g. --extra=--sync-every=10 (part of each key)",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny model (seconds per run); implies --extra for it")
    custom = ap.add_argument_group("custom plan")
    custom.add_argument("--methods", nargs="+", default=["sync", "eager"], choices=sorted(bl.METHODS))
    custom.add_argument("--lrs", nargs="+", type=float, default=list(LRS))
    custom.add_argument("--momenta", nargs="+", type=float, default=list(MOMENTA))
    custom.add_argument("--heavy-ball", action="store_true", help="also every momentum > 0 without Nesterov")
    custom.add_argument("--seeds", nargs="+", type=int, default=[0])
    custom.add_argument("--workers", type=int, default=2)
    custom.add_argument("--steps", type=int, default=900)
    custom.add_argument("--own-weight", type=float, default=None, help="eager own-contribution weight w")
    custom.add_argument("--smoothing", type=float, default=None, help="eager smoothing β (ALGORITHMS.md 4.4)")
    args = ap.parse_args(argv)
    problem = custom_args_problem(args)
    if problem:
        ap.error(problem)  # one line, exit 2, before the lock, a folder or a run
    args.extra_args = [x for e in args.extra for x in e.split("=", 1)]
    if args.smoke:
        args.extra_args = [*SMOKE_EXTRA, *args.extra_args]
    out = args.out.resolve()
    if args.report_only:
        md = write_report(out, with_plot=not args.no_plot)
        print(md.read_text())
        print(f"wrote {md}" + ("" if args.no_plot else f" and {out / 'recipe_sweep.png'}"))
        return 0
    if args.list:
        results = load_results(out)
        for stage, p in plan_points(args.plan, results, args):
            rec = results.get(p.key)
            status = rec["status"] if rec else "pending"
            loss = f" {rec['eval_loss']:.4f}" if rec and _finite(rec.get("eval_loss")) else ""
            print(f"{stage:<36} {p.key:<48} {status}{loss}")
        return 0
    if args.plan == "lookahead" and args.src is None:
        print(
            f"recipe_sweep: plan 'lookahead' needs --src of a checkout at {LOOKAHEAD_COMMIT}: eager_lookahead was "
            "removed from the library after this measurement (ALGORITHMS.md 4.2)",
            file=sys.stderr,
        )
        return 2
    src = args.src.resolve() if args.src else None
    runs_dir = (args.runs_dir or (src or bl.ROOT) / "runs" / "recipe_sweep").resolve()
    with SweepLock(args.lock, args.wait_lock):
        source = source_info(src)
        print(
            f"recipe_sweep: plan {args.plan}, training with {source['checkout']} at {source['commit'][:10]}"
            f"{' (src modified)' if source['src_modified'] else ''}; results in {out}",
            flush=True,
        )
        runner = train_runner(src, runs_dir, args.timeout)
        ran = sweep(
            args.plan,
            out,
            runner,
            args=args,
            source=source,
            command=bl.command_line(),
            max_runs=args.max_runs,
            log=lambda s: print(s, flush=True),
        )
        md = write_report(out, with_plot=not args.no_plot)
    print(f"recipe_sweep: {len(ran)} runs this time; tables in {md}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
