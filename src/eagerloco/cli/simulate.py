"""``eagerloco simulate``: what bandwidth does each method need, and how long will training take?

    eagerloco simulate                                  # the papers' table: 1B/10B/100B x their 7 methods
    eagerloco simulate --json                           # {preset: {method: [Gbit/s for CU 50/80/90/95/99 % or null]}}
    eagerloco simulate --plot docs/simulator_cu.png     # CU vs bandwidth, one panel per preset (png, pdf, svg, ...)
    eagerloco simulate --presets 1B --bandwidth 1 --tokens 25e9     # hours for 25B tokens at 1 Gbit/s
    eagerloco simulate --params 7B --layers 32 --step-time 2.5      # a custom model
    eagerloco simulate --params 7B --layers 32 --chips 256 --peak-tflops 989 --mfu 0.4
    eagerloco simulate --from-run runs/my_run            # predicted CU at the run's link next to the measured one
    eagerloco simulate --from-run runs/my_run --grid     # the bandwidth each CU target needs for that run
    eagerloco simulate --methods sync eager --num-fragments 3 --compression fp4 --link-mbit 20   # train's words
    eagerloco simulate --from-run runs/my_run --methods overlap --num-fragments 2 --overlap-steps auto   # τ to train
    eagerloco simulate --from-run runs/my_sync --link-mbit measured --methods sync eager   # at the link it measured

Method names, options and units are ``eagerloco train``'s: the modes dp, sync, overlap, delayed and eager with
train's defaults (H = 30, P = 1, fp32, tau = 1, k = 1), --sync-every, --num-fragments, --overlap-steps, --delay,
--compression (the same codec names) and --link-mbit (Mbit/s). The papers' presets (diloco, streaming, ...,
H = 100, bf16) make the default table; the old flag names (--fragments, --slack, --bits, --bandwidth in Gbit/s)
still work. The model and its assumptions are in docs/simulator.md.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from eagerloco.simulator.config import (
    ALLOWED_BITS,
    CODEC_BITS,
    LAYOUTS,
    OUTER_READY,
    TRAIN_SYNC_EVERY,
    LinkSpec,
    MethodSpec,
    ModelSpec,
    SimulatorConfigError,
)
from eagerloco.simulator.events import SimResult, simulate
from eagerloco.simulator.from_run import RunModel, load_run_summary
from eagerloco.simulator.presets import (
    DEFAULT_MODEL_PRESETS,
    METHOD_ALIASES,
    METHOD_PRESETS,
    MODEL_PRESETS,
    PAPER_SYNC_EVERY,
    TOKENS_PER_STEP_PAPER,
    TRAIN_MODES,
    compression_bits,
    customize_method,
    method_preset,
    mode_method,
    model_preset,
    step_time_from_flops,
)
from eagerloco.simulator.search import (
    BANDWIDTH_GRID_GBPS,
    CU_TARGETS,
    cu_curve,
    estimate_wall_clock,
    link_rate_from_blocked,
    min_bandwidth_for_targets,
    smallest_hiding_overlap,
    sustained_bandwidth_bound_gbps,
)
from eagerloco.units import format_bytes

_SUFFIXES = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def count(text: str) -> float:
    """A positive count such as ``1e9``, ``7B``, ``25e9`` or ``1.5T`` (suffixes k, M, B/G, T)."""
    match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([kKmMbBgGtT]?)\s*", text)
    try:
        value = float(match.group(1)) * _SUFFIXES[match.group(2).lower()] if match else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number > 0, e.g. 1e9 or 7B")
    return value


def format_rate(gbps: float | None) -> str:
    """A link rate for tables, in Gbit/s from 1 Gbit/s up and Mbit/s below: '1.68G', '212M', '0.0954M'; None is
    '>1000G' (no grid point reached the target)."""
    if gbps is None:
        return f">{BANDWIDTH_GRID_GBPS[-1]:.0f}G"
    value, unit = (gbps, "G") if gbps >= 1 else (gbps * 1e3, "M")
    return (f"{value:.3g}" if value < 100 else f"{value:.0f}") + unit


def format_rate_words(gbps: float) -> str:
    """'1 Gbit/s', '20 Mbit/s', '0.5 Mbit/s'."""
    value, unit = (gbps, "Gbit/s") if gbps >= 1 else (gbps * 1e3, "Mbit/s")
    return (f"{value:.3g}" if value < 100 else f"{value:.0f}") + f" {unit}"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``simulate`` sub-command."""
    grid = f"{format_rate_words(BANDWIDTH_GRID_GBPS[0])} to {format_rate_words(BANDWIDTH_GRID_GBPS[-1])}"
    p = subparsers.add_parser(
        "simulate",
        help="compute-utilization simulator: bandwidth needed per method, wall-clock estimates",
        description=(
            "Event simulation of the per-layer training DAG on one shared inter-site link (Streaming DiLoCo "
            f"paper, section 3.1). Prints, per model and method, the smallest bandwidth on a log grid ({grid}, "
            f"{len(BANDWIDTH_GRID_GBPS)} points, the papers' 50 from 0.1 Gbit/s and more below) reaching each "
            "compute-utilization target, or with --link-mbit / --bandwidth the CU and wall-clock time at that rate. "
            "Methods, options and units are those of `eagerloco train` (old names still work). Model and "
            "assumptions: docs/simulator.md."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            f"presets: {', '.join(MODEL_PRESETS)}\n"
            f"methods: the training modes {', '.join(TRAIN_MODES)} (train's defaults: H = {TRAIN_SYNC_EVERY}, P = 1, "
            "fp32, tau = 1, k = 1);\n"
            f"         the papers' presets {', '.join(METHOD_PRESETS)} (H = {PAPER_SYNC_EVERY}, bf16; the default)\n"
            f"         old names: {', '.join(f'{a} = {b}' for a, b in METHOD_ALIASES.items())}\n"
            f"codecs:  {', '.join(f'{c} ({b:g} bits/value)' for c, b in CODEC_BITS.items())}"
        ),
    )
    what = p.add_argument_group("what to simulate")
    what.add_argument(
        "--presets",
        nargs="+",
        metavar="NAME",
        help=f"model presets (default {' '.join(DEFAULT_MODEL_PRESETS)}, or none with --params/--from-run)",
    )
    what.add_argument(
        "--methods",
        nargs="+",
        metavar="NAME",
        help="training modes or the papers' presets (default: the papers' presets; with --from-run the run's mode)",
    )
    what.add_argument(
        "--targets",
        nargs="+",
        type=float,
        metavar="PCT",
        help="CU targets in percent (default 50 80 90 95 99)",
    )

    custom = p.add_argument_group("custom model (instead of presets)")
    custom.add_argument("--params", type=count, help="parameters synchronised, e.g. 7B")
    custom.add_argument("--layers", type=int, help="layers (L)")
    custom.add_argument("--step-time", type=float, metavar="S", help="seconds of compute per inner step")
    custom.add_argument("--chips", type=int, help="chips over all workers (derive the step time, 6·N·D rule)")
    custom.add_argument("--peak-tflops", type=float, metavar="F", help="peak TFLOP/s per chip")
    custom.add_argument("--mfu", type=float, help="model FLOPs utilization in (0, 1]")
    custom.add_argument("--active-params", type=count, help="parameters active per token (MoE), default --params")
    custom.add_argument("--name", default="custom", help="label of the custom model (default 'custom')")
    custom.add_argument(
        "--from-run",
        metavar="RUN_DIR",
        help="a training run: its model and step time (summary.json), its method and link (config.json); predicts "
        "the CU at its link next to the CU it measured",
    )

    method = p.add_argument_group("method options, as eagerloco train's (change every chosen method; dp has none)")
    method.add_argument(
        "--sync-every",
        type=int,
        metavar="H",
        help=f"inner steps per outer step (default {TRAIN_SYNC_EVERY} for the modes, {PAPER_SYNC_EVERY} for the "
        "papers' presets, the run's with --from-run)",
    )
    method.add_argument(
        "--num-fragments",
        "--fragments",
        dest="fragments",
        type=int,
        metavar="P",
        help="fragments (default: 1 for the modes, one per 3 layers for the streaming presets)",
    )
    method.add_argument(
        "--overlap-steps",
        type=_overlap_steps,
        metavar="TAU",
        help="mode overlap: tau inner steps (default 1), or 'auto': the smallest tau < H whose CU at the link reaches "
        "the highest --targets value (99 %%); on a paper preset: overlap tau steps, clearing --delay",
    )
    method.add_argument(
        "--delay",
        "--slack",
        dest="delay",
        type=int,
        metavar="K",
        help="modes delayed, eager: K outer steps of slack (default 1); on a paper preset: clears the overlap",
    )
    method.add_argument(
        "--compression",
        "--bits",
        dest="compression",
        metavar="CODEC",
        help=f"outer gradients on the wire: a codec of train ({', '.join(CODEC_BITS)}; default none = fp32 for "
        f"the modes, bf16 for the papers' presets) or bits per value ({', '.join(map(str, ALLOWED_BITS))})",
    )
    method.add_argument("--layout", choices=LAYOUTS, help="fragment layout (default strided)")
    method.add_argument(
        "--outer-ready",
        choices=OUTER_READY,
        help="outer gradients enter the link at the sync step's end (default) or per layer after its backward",
    )

    link = p.add_argument_group("link")
    link.add_argument("--workers", type=int, metavar="M", help="workers (default 2, or the run's)")
    link.add_argument("--latency", type=float, metavar="S", help="latency per ring hop, s (default 0)")
    rate = link.add_mutually_exclusive_group()
    rate.add_argument(
        "--link-mbit",
        type=_link_mbit,
        metavar="MBIT",
        help="CU (and hours, with --tokens) at this link rate in Mbit/s, as train's --link-mbit; or 'measured' with "
        "--from-run of a sync run: the rate its measured blocked time per outer step implies (the real link, "
        "transport overhead included)",
    )
    rate.add_argument("--bandwidth", type=float, metavar="GBPS", help="the same in Gbit/s")
    rate.add_argument(
        "--grid",
        action="store_true",
        help="with --from-run: the bandwidth each CU target needs instead of the CU at the run's link",
    )

    wall = p.add_argument_group("wall-clock estimate")
    wall.add_argument("--tokens", type=count, help="token budget, e.g. 25e9 (needs a link rate)")
    wall.add_argument(
        "--tokens-per-step",
        type=count,
        default=float(TOKENS_PER_STEP_PAPER),
        metavar="D",
        help=f"tokens per inner step, all workers together (default {TOKENS_PER_STEP_PAPER} = 512 × 2048)",
    )

    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print JSON instead of tables")
    out.add_argument("--plot", metavar="FILE", help="save CU-vs-bandwidth curves to this file (png, pdf, svg, ...)")
    p.set_defaults(func=run)


@dataclass
class Plan:
    """The resolved request: models, per-model methods and the link."""

    models: list[ModelSpec]
    methods: dict[str, list[MethodSpec]]
    """Per model name, the methods (with the run's or the user's options applied)."""
    workers: int
    latency_s: float
    targets: list[float]
    notes: list[str] = field(default_factory=list)
    """Lines describing the setup, printed above the tables."""
    bandwidth_gbps: float | None = None
    """The link rate to report the CU at (--link-mbit, --bandwidth, or the run's link); None: the grid table."""
    run: RunModel | None = None
    """What --from-run read."""
    run_method: str | None = None
    """The name of the method that is exactly the run's own (its mode and options, unchanged by flags)."""
    bandwidth_from_run: bool = False
    """The rate is the run's recorded link (not a flag)."""


AUTO = "auto"
"""``--overlap-steps auto``: size mode overlap's τ to the link (:func:`smallest_hiding_overlap`)."""

MEASURED = "measured"
"""``--link-mbit measured``: the rate a sync run's blocked time implies (:func:`link_rate_from_blocked`)."""


def _number_or(word: str, convert: type, what: str) -> Any:
    """An argparse type: ``word`` itself, or ``convert(text)``; otherwise 'TEXT: must be WHAT or 'WORD''."""

    def parse(text: str) -> Any:
        if text == word:
            return word
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: must be {what} or {word!r}") from None

    return parse


_overlap_steps = _number_or(AUTO, int, "an integer")
"""--overlap-steps: an integer, or 'auto'."""
_link_mbit = _number_or(MEASURED, float, "a number of Mbit/s")
"""--link-mbit: a number of Mbit/s, or 'measured'."""


def _check_count(flag: str, value: int | str | None, minimum: int) -> None:
    if isinstance(value, int) and value < minimum:
        raise SimulatorConfigError(f"{flag} {value}: must be an integer >= {minimum}")


def build_plan(args: argparse.Namespace) -> Plan:
    """Turn the parsed arguments into models, methods and the link; raise SimulatorConfigError on bad input."""
    run_info = None
    models: list[ModelSpec] = []
    if args.grid and not args.from_run:
        raise SimulatorConfigError("--grid goes with --from-run (without it the grid table is the default)")
    if args.from_run:
        run_info = load_run_summary(args.from_run, layers=args.layers)
        models.append(run_info.model)
    if args.params is not None:
        if args.layers is None:
            raise SimulatorConfigError("--params needs --layers (the layer count L)")
        models.append(ModelSpec(name=args.name, params=args.params, layers=args.layers, step_time_s=_step_time(args)))
    elif not args.from_run:
        for flag in ("step_time", "chips", "peak_tflops", "mfu", "active_params"):
            if getattr(args, flag) is not None:
                raise SimulatorConfigError(f"--{flag.replace('_', '-')} describes a custom model: give --params too")
    if args.presets or not models:
        models += [model_preset(name) for name in (args.presets or DEFAULT_MODEL_PRESETS)]
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise SimulatorConfigError(f"models {names}: each model needs its own name (use --name)")

    workers = args.workers if args.workers is not None else (run_info.workers if run_info else None) or 2
    sync_every = args.sync_every if args.sync_every is not None else (run_info.sync_every if run_info else None)
    latency = 0.0 if args.latency is None else args.latency
    if not math.isfinite(latency) or latency < 0:
        raise SimulatorConfigError(f"--latency {args.latency}: must be a finite number of seconds >= 0")
    targets = [0.01 * t for t in args.targets] if args.targets else list(CU_TARGETS)
    for t in targets:
        if not 0 < t <= 1:
            raise SimulatorConfigError(f"--targets {100 * t:g}: a CU target must be in (0, 100] percent")
    _check_count("--sync-every", args.sync_every, 1)
    _check_count("--num-fragments", args.fragments, 1)
    _check_count("--overlap-steps", args.overlap_steps, 0)
    _check_count("--delay", args.delay, 0)
    if args.compression is not None:
        try:
            compression_bits(args.compression)
        except SimulatorConfigError:
            raise SimulatorConfigError(
                f"--compression {args.compression}: must be a codec of eagerloco train ({', '.join(CODEC_BITS)}) "
                f"or bits per value ({', '.join(map(str, ALLOWED_BITS))})"
            ) from None

    if args.methods:
        method_names = list(args.methods)
    elif run_info is not None and run_info.mode is not None:
        method_names = [run_info.mode]
    else:
        method_names = list(METHOD_PRESETS)
    canonical = [METHOD_ALIASES.get(n, n) for n in method_names]
    if len(set(canonical)) != len(canonical):
        raise SimulatorConfigError(f"--methods {' '.join(method_names)}: each method may be named once")
    for name in method_names:
        method_preset(name)  # unknown names: one message listing every known one
    auto = args.overlap_steps == AUTO
    if auto and "overlap" not in method_names:
        named = f"--methods {' '.join(method_names)} has none" if args.methods else "add --methods overlap"
        raise SimulatorConfigError(f"--overlap-steps auto sizes mode overlap's τ: {named}")
    if auto and any(name not in TRAIN_MODES for name in method_names):
        presets = [name for name in method_names if name not in TRAIN_MODES]
        raise SimulatorConfigError(
            f"--overlap-steps auto sizes mode overlap's τ; the papers' presets ({', '.join(presets)}) take a number"
        )
    methods: dict[str, list[MethodSpec]] = {}
    overlap_options: dict[str, dict[str, Any]] = {}  # per model: overlap's options but τ, which auto sizes below
    run_method = None
    for model in models:
        from_run = run_info if run_info is not None and model is run_info.model else None
        chosen = []
        for name in method_names:
            if name in TRAIN_MODES:
                options = {
                    "sync_every": sync_every,
                    "num_fragments": _flag_or_run(args.fragments, from_run, "fragments"),
                    "delay": _flag_or_run(args.delay, from_run, "delay"),
                    "compression": _flag_or_run(args.compression, from_run, "compression"),
                    "layout": _flag_or_run(args.layout, from_run, "layout"),
                    "outer_ready": args.outer_ready,
                }
                tau = None if auto else _flag_or_run(args.overlap_steps, from_run, "overlap_steps")
                spec = mode_method(name, overlap_steps=tau, **options)
                if auto and name == "overlap":
                    overlap_options[model.name] = options
                changed = any(
                    getattr(args, flag) is not None
                    for flag in ("fragments", "overlap_steps", "delay", "compression", "layout", "sync_every")
                )
                if from_run is not None and name == from_run.mode and not changed and args.workers is None:
                    run_method = spec.name
            else:
                base = method_preset(name)
                fragments = args.fragments
                if fragments is None and from_run is not None and base.fragments is None:
                    fragments = from_run.fragments
                spec = customize_method(
                    base,
                    sync_every=sync_every,
                    overlap_steps=args.overlap_steps,
                    slack_outer_steps=args.delay,
                    compression=args.compression,
                    fragments=fragments,
                    layout=args.layout,
                    outer_ready=args.outer_ready,
                )
            spec.num_fragments(model)  # validate P against this model's layers now, with a clear message
            chosen.append(spec)
        methods[model.name] = chosen
    LinkSpec(bandwidth_gbps=math.inf, workers=workers, latency_s=latency)  # validate M and latency

    bandwidth, source = _bandwidth(args, run_info)
    sized: list[str] = []
    if auto:
        if bandwidth is None:
            raise SimulatorConfigError(
                "--overlap-steps auto sizes τ to a link rate: give --link-mbit or --bandwidth (or --from-run of a "
                "run that emulated a link)"
            )
        link = LinkSpec(bandwidth_gbps=bandwidth, workers=workers, latency_s=latency)
        for model in models:
            index = method_names.index("overlap")
            spec, line = _size_overlap(
                args, model, methods[model.name][index], overlap_options[model.name], link, max(targets)
            )
            methods[model.name][index] = spec
            sized.append(line)
    layout = args.layout or "strided"
    ready = {
        "step-end": "at the end of the sync step",
        "backward": "per layer when its backward ends",
    }[args.outer_ready or "step-end"]
    ring = 2 * (workers - 1) / workers
    gather = " (compressed: all-gather, M-1 x)" if any(m.gather for ms in methods.values() for m in ms) else ""
    notes = [
        f"M = {workers} workers (ring all-reduce: each sends 2(M-1)/M = {ring:g} x the data{gather}), "
        f"{_sync_every_note(methods[models[0].name])}, {layout} fragments, outer gradients enter the link {ready}, "
        f"latency {latency:g} s per hop",
    ]
    for model in models:
        notes.append(
            f"{model.name}: N = {model.params:.4g} parameters, L = {model.layers} layers, "
            f"T = {model.step_time_s:.4g} s per inner step{_fragments_note(model, methods[model.name])}"
        )
    if source:
        notes.append(source)
    notes += sized
    if run_info is not None and run_info.link_latency_ms and args.latency is None:
        notes.append(
            f"note: the run added {run_info.link_latency_ms:g} ms of latency per collective; the simulation "
            "leaves it out (--latency S sets a latency per ring hop)"
        )
    return Plan(
        models=models,
        methods=methods,
        workers=workers,
        latency_s=latency,
        targets=targets,
        notes=notes,
        bandwidth_gbps=bandwidth,
        run=run_info,
        run_method=run_method,
        bandwidth_from_run=bool(source.startswith("link: the run's")),
    )


def _size_overlap(
    args: argparse.Namespace,
    model: ModelSpec,
    method: MethodSpec,
    options: dict[str, Any],
    link: LinkSpec,
    target: float,
) -> tuple[MethodSpec, str]:
    """Mode overlap (``method``, with ``options`` but τ) at the τ that hides ``link`` for ``model`` (--overlap-steps
    auto: the smallest τ whose CU reaches ``target``), and a line saying what was chosen."""
    choice = smallest_hiding_overlap(model, method, link, target)
    tau = choice.overlap_steps
    spec = mode_method("overlap", overlap_steps=tau, **options)  # named as --overlap-steps TAU names it
    rate = format_rate_words(link.bandwidth_gbps)
    where = f"{model.name}: --overlap-steps auto" if args.presets or args.params is not None else "--overlap-steps auto"
    if choice.reached:
        below = f" (τ = {tau - 1}: {100 * choice.cu_by_tau[tau - 1]:.1f} %)" if tau > 1 else ""
        line = (
            f"{where}: τ = {tau}, the smallest τ < H = {spec.sync_every} whose CU at {rate} reaches "
            f"{100 * target:g} %{below}; train with --overlap-steps {tau}"
        )
    else:
        line = (
            f"{where}: no τ < H = {spec.sync_every} reaches CU {100 * target:g} % at {rate}; τ = {tau} comes "
            f"closest ({100 * choice.result.cu:.1f} %): the link is too slow for overlap (eager hides up to k inner "
            "phases; --compression shrinks the all-reduce)"
        )
    return spec, line


def _flag_or_run(flag: Any, run: RunModel | None, attr: str) -> Any:
    """The flag's value if given, else what the run recorded (None when there is no run or no record)."""
    if flag is not None:
        return flag
    return None if run is None else getattr(run, attr)


def _bandwidth(args: argparse.Namespace, run: RunModel | None) -> tuple[float | None, str]:
    """The rate in Gbit/s to report at (None: the grid table) and a line saying where it came from."""
    if args.link_mbit == MEASURED:
        return _measured_rate(args, run)
    if args.link_mbit is not None:
        if not (math.isfinite(args.link_mbit) and args.link_mbit > 0):
            raise SimulatorConfigError(f"--link-mbit {args.link_mbit}: must be a finite number of Mbit/s > 0")
        return args.link_mbit / 1e3, ""
    if args.bandwidth is not None:
        if not (math.isfinite(args.bandwidth) and args.bandwidth > 0):
            raise SimulatorConfigError(f"--bandwidth {args.bandwidth}: must be a finite number of Gbit/s > 0")
        return args.bandwidth, ""
    if run is not None and not args.grid:
        if run.link_mbit:
            return run.link_mbit / 1e3, f"link: the run's, {run.link_mbit:g} Mbit/s (config.json run.link_mbit)"
        return None, "link: the run emulated none (link_mbit 0): the bandwidth each CU target needs"
    return None, ""


def _measured_rate(args: argparse.Namespace, run: RunModel | None) -> tuple[float, str]:
    """--link-mbit measured: the rate (Gbit/s) at which the run's own sync all-reduce takes the time the run blocked
    per outer step, and a line saying so. A sync run waits for its whole all-reduce at every outer step, so its
    blocked time measures the link as the run's transport drove it (gloo's overhead and any latency included)."""
    if run is None:
        raise SimulatorConfigError("--link-mbit measured reads the link from a run: give --from-run RUN_DIR")
    if run.mode != "sync":
        raise SimulatorConfigError(
            f"--link-mbit measured: the run's mode is {run.mode or 'not recorded'}, not sync: only a blocking run's "
            "wait measures the whole all-reduce (an overlapped run's hides part of it); measure the link with "
            "`eagerloco train --mode sync` (a few outer steps suffice)"
        )
    blocked = run.measured_blocked_per_period_s
    if not blocked:
        raise SimulatorConfigError(
            f"--link-mbit measured: the run recorded {run.measured_blocked_s!r} s blocked per outer step "
            "(summary.json 'blocked_per_period_s', or in runs written before it 'blocked_per_outer_step_s' with "
            "'outer_steps' and the workers' 'inner_steps' when P > 1): nothing to infer a rate from"
        )
    own = mode_method(
        "sync",
        sync_every=run.sync_every,
        num_fragments=run.fragments,
        compression=run.compression,
        layout=run.layout,
    )
    workers = run.workers or 2
    latency = 0.0 if args.latency is None else args.latency
    gbps = link_rate_from_blocked(run.model, own, blocked, workers=workers, latency_s=latency)
    told = f"it emulated {run.link_mbit:g} Mbit/s" if run.link_mbit else "it emulated none: a real link, or loopback"
    line = (
        f"link: {format_rate_words(gbps)}, measured: the rate at which the run's own all-reduce ({own.name}, M = "
        f"{workers}) takes the {blocked:.4g} s it blocked per {run.sync_every or TRAIN_SYNC_EVERY} inner steps ({told})"
    )
    return gbps, line


def _sync_every_note(methods: list[MethodSpec]) -> str:
    """'H = 30', or 'H = 100 (sync, eager: 30)' when the methods differ."""
    values = {m.name: m.sync_every for m in methods if not m.data_parallel}
    if not values:
        return "H: none (data-parallel)"
    counts = list(values.values())
    usual = max(counts, key=counts.count)
    others = ", ".join(f"{name}: {h}" for name, h in values.items() if h != usual)
    return f"H = {usual}" + (f" ({others})" if others else "")


def _fragments_note(model: ModelSpec, methods: list[MethodSpec]) -> str:
    """', P = 8 fragments (diloco: 1)': the most common fragment count and the methods that differ."""
    counts = {m.name: m.num_fragments(model) for m in methods if not m.data_parallel}
    if not counts:
        return ""
    values = list(counts.values())
    usual = max(values, key=values.count)
    others = ", ".join(f"{name}: {p}" for name, p in counts.items() if p != usual)
    return f", P = {usual} fragments" + (f" ({others})" if others else "")


def _step_time(args: argparse.Namespace) -> float:
    """--step-time, or 6·N·D / (chips · peak · MFU) from --chips, --peak-tflops, --mfu, --tokens-per-step."""
    derive = [args.chips, args.peak_tflops, args.mfu]
    if args.step_time is not None:
        if any(v is not None for v in derive):
            raise SimulatorConfigError("give either --step-time or --chips/--peak-tflops/--mfu, not both")
        return args.step_time
    if any(v is None for v in derive):
        raise SimulatorConfigError(
            "a custom model needs --step-time, or --chips, --peak-tflops and --mfu to derive it (6·N·D rule)"
        )
    active = args.active_params if args.active_params is not None else args.params
    return step_time_from_flops(active, args.tokens_per_step, args.chips, args.peak_tflops * 1e12, args.mfu)


def run(args: argparse.Namespace) -> int:
    """Run the sub-command; one line naming the bad value and exit status 2 on bad input (see eagerloco.cli.main)."""
    try:
        return _run(args)
    except SimulatorConfigError as exc:
        print(f"eagerloco simulate: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"eagerloco simulate: error: cannot write the plot: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.plot:
        from eagerloco.simulator.plot import check_plot_path

        check_plot_path(args.plot)
    plan = build_plan(args)
    if args.tokens is not None and plan.bandwidth_gbps is None:
        raise SimulatorConfigError(
            "--tokens needs a link rate (--link-mbit or --bandwidth) to estimate the wall clock at"
        )
    curves: dict[str, dict[str, list[SimResult]]] = {}
    if plan.bandwidth_gbps is None or args.plot:
        for model in plan.models:
            curves[model.name] = {
                m.name: cu_curve(model, m, workers=plan.workers, latency_s=plan.latency_s)
                for m in plan.methods[model.name]
            }
    if plan.bandwidth_gbps is not None:
        _print_wall_clock(args, plan)
    else:
        _print_thresholds(args, plan, curves)
    if args.plot:
        from eagerloco.simulator.plot import plot_cu_curves

        cu_values = {
            model: {m: [r.cu for r in rs] for m, rs in by_method.items()} for model, by_method in curves.items()
        }
        path = plot_cu_curves(
            cu_values,
            BANDWIDTH_GRID_GBPS,
            args.plot,
            targets=plan.targets,
            title=plan.notes[0],
        )
        print(f"plot written to {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _steps_note(results: list[SimResult]) -> str:
    inner = [r.inner_steps for r in results]
    unsteady = sum(not r.steady for r in results)
    text = (
        f"Event simulation: {len(results)} points, each run until its state at an outer-step boundary repeated "
        f"(steady state; CU is exact from there on): {min(inner):,} to {max(inner):,} inner steps simulated "
        "per point."
    )
    if unsteady:
        text += f" WARNING: {unsteady} points reached no steady state; their CU averages the last outer steps."
    return text


def _print_thresholds(args: argparse.Namespace, plan: Plan, curves: dict[str, dict[str, list[SimResult]]]) -> None:
    table = {
        model: {
            m: min_bandwidth_for_targets([r.cu for r in rs], BANDWIDTH_GRID_GBPS, plan.targets) for m, rs in by.items()
        }
        for model, by in curves.items()
    }
    everything = [r for by in curves.values() for rs in by.values() for r in rs]
    if args.json:
        print(
            json.dumps(
                {
                    model: {m: [None if v is None else float(f"{v:.6g}") for v in vs] for m, vs in by.items()}
                    for model, by in table.items()
                },
                indent=2,
            )
        )
        print(_steps_note(everything), file=sys.stderr)
        return
    low, high = format_rate_words(BANDWIDTH_GRID_GBPS[0]), format_rate_words(BANDWIDTH_GRID_GBPS[-1])
    print(
        f"Smallest link rate (G: Gbit/s, M: Mbit/s) on the log grid {low} to {high} ({len(BANDWIDTH_GRID_GBPS)} "
        "points) reaching each compute utilization"
    )
    print(plan.notes[0])
    for note in plan.notes[1 + len(plan.models) :]:
        print(note)
    width = max(len(m.name) for ms in plan.methods.values() for m in ms) + 2
    for model, note in zip(plan.models, plan.notes[1:]):
        print()
        print(note)
        header = "".join(f"{100 * t:>8g}%" for t in plan.targets)
        print(f"{'method':<{width}}{header}   link bound")
        for m in plan.methods[model.name]:
            cells = "".join(f"{format_rate(v):>9}" for v in table[model.name][m.name])
            bound = format_rate(sustained_bandwidth_bound_gbps(model, m, plan.workers))
            print(f"{m.name:<{width}}{cells}   {bound:>10}")
    print()
    print("link bound: bits per outer step / (H·T) (per step / T for dp), below which no overlap can keep up.")
    print(_steps_note(everything))


def _print_wall_clock(args: argparse.Namespace, plan: Plan) -> None:
    assert plan.bandwidth_gbps is not None
    link = LinkSpec(bandwidth_gbps=plan.bandwidth_gbps, workers=plan.workers, latency_s=plan.latency_s)
    report: dict[str, dict[str, dict[str, float]]] = {}
    lines: list[str] = []
    simulated: list[int] = []
    # The measurement belongs next to the prediction only for the run's own method at the run's own link.
    own = plan.run is not None and plan.run_method is not None and plan.bandwidth_from_run
    measured = plan.run.measured_cu if own and plan.run is not None else None
    steady = plan.run.measured_cu_steady if plan.run is not None and measured is not None else None
    width = max(22, max(len(m.name) for ms in plan.methods.values() for m in ms) + 2)
    for model, note in zip(plan.models, plan.notes[1:]):
        report[model.name] = {}
        lines += ["", note]
        compare = measured is not None and plan.run is not None and model is plan.run.model
        extra = (f"{'measured CU':>13}" + (f"{'without drain':>15}" if steady is not None else "")) if compare else ""
        if args.tokens is not None:
            lines.append(f"{'method':<{width}}{'CU':>8}{'hours':>10}{'compute h':>11}{'sent per worker':>17}")
        else:
            lines.append(f"{'method':<{width}}{'CU':>8}{'blocked s per outer step (dp: per step)':>41}{extra}")
        for m in plan.methods[model.name]:
            if args.tokens is not None:
                est = estimate_wall_clock(model, m, link, args.tokens, args.tokens_per_step)
                simulated.append(est.simulated_steps)
                report[model.name][m.name] = {
                    "cu": est.cu,
                    "hours": est.hours,
                    "compute_hours": est.compute_hours,
                    "inner_steps": est.inner_steps,
                    "bytes_per_worker": est.bytes_per_worker,
                }
                lines.append(
                    f"{m.name:<{width}}{100 * est.cu:>7.1f}%{est.hours:>10.3g}{est.compute_hours:>11.3g}"
                    f"{format_bytes(est.bytes_per_worker, '.3g'):>17}"
                )
            else:
                result = simulate(model, m, link)
                simulated.append(result.inner_steps)
                report[model.name][m.name] = {"cu": result.cu, "blocked_s_per_outer_step": result.blocked_s_per_period}
                blocked = result.blocked_s_per_period if result.blocked_s_per_period > 1e-9 else 0.0  # float noise
                row = f"{m.name:<{width}}{100 * result.cu:>7.1f}%{blocked:>41.4g}"
                if compare and m.name == plan.run_method:
                    report[model.name][m.name]["measured_cu"] = measured  # type: ignore[assignment]
                    row += f"{100 * measured:>12.1f}%"  # type: ignore[operator]
                    if steady is not None:
                        report[model.name][m.name]["measured_cu_steady"] = steady
                        row += f"{100 * steady:>14.1f}%"
                lines.append(row)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    title = f"At {format_rate_words(plan.bandwidth_gbps)}"
    if args.tokens is not None:
        steps = math.ceil(args.tokens / args.tokens_per_step)
        title += f", {args.tokens:.4g} tokens at {args.tokens_per_step:,.0f} tokens per step = {steps:,} inner steps"
    print(title)
    print(plan.notes[0])
    for note in plan.notes[1 + len(plan.models) :]:
        print(note)
    print("\n".join(lines))
    print()
    print(
        f"Steady-state CU from the event simulation ({min(simulated):,} to {max(simulated):,} inner steps "
        "simulated per method); start-up and the final drain are ignored."
    )
    if measured is not None:
        print(
            "measured CU: the run's summary.json 'utilization', over the whole run (start-up and the final drain "
            "included, which weigh more in a short run)"
            + ("; without drain: inner time / (wall time - the final drain), per worker, averaged." if steady else ".")
        )
    if plan.bandwidth_from_run:
        print("The bandwidth each CU target needs for this run: add --grid.")
