"""``eagerloco simulate``: what bandwidth does each method need, and how long will training take?

    eagerloco simulate                                  # 1B/10B/100B × every method: bandwidth per CU target
    eagerloco simulate --json                           # {preset: {method: [Gbit/s for CU 50/80/90/95/99 % or null]}}
    eagerloco simulate --plot docs/simulator_cu.png     # CU vs bandwidth, one panel per preset
    eagerloco simulate --presets 1B --bandwidth 1 --tokens 25e9     # hours for 25B tokens at 1 Gbit/s
    eagerloco simulate --params 7B --layers 32 --step-time 2.5      # a custom model
    eagerloco simulate --params 7B --layers 32 --chips 256 --peak-tflops 989 --mfu 0.4
    eagerloco simulate --from-run runs/my_run            # the model a training run measured
    eagerloco simulate --methods diloco streaming --overlap-steps 5 --bits 8   # any other method

The model and its assumptions are in docs/simulator.md.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field

from eagerloco.simulator.config import (
    ALLOWED_BITS,
    LAYOUTS,
    OUTER_READY,
    LinkSpec,
    MethodSpec,
    ModelSpec,
    SimulatorConfigError,
)
from eagerloco.simulator.events import SimResult, simulate
from eagerloco.simulator.from_run import load_run_summary
from eagerloco.simulator.presets import (
    DEFAULT_MODEL_PRESETS,
    METHOD_PRESETS,
    MODEL_PRESETS,
    PAPER_SYNC_EVERY,
    TOKENS_PER_STEP_PAPER,
    customize_method,
    method_preset,
    model_preset,
    step_time_from_flops,
)
from eagerloco.simulator.search import (
    BANDWIDTH_GRID_GBPS,
    CU_TARGETS,
    cu_curve,
    estimate_wall_clock,
    min_bandwidth_for_targets,
    sustained_bandwidth_bound_gbps,
)

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


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``simulate`` sub-command."""
    p = subparsers.add_parser(
        "simulate",
        help="compute-utilization simulator: bandwidth needed per method, wall-clock estimates",
        description=(
            "Event simulation of the per-layer training DAG on one shared inter-site link (Streaming DiLoCo "
            "paper, section 3.1). Prints, per model and method, the smallest bandwidth on the papers' log grid "
            "(0.1 to 1,000 Gbit/s, 50 points) reaching each compute-utilization target, or with --bandwidth "
            "the CU and wall-clock time at that bandwidth. Model and assumptions: docs/simulator.md."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"presets: {', '.join(MODEL_PRESETS)}\nmethods: {', '.join(METHOD_PRESETS)}",
    )
    what = p.add_argument_group("what to simulate")
    what.add_argument(
        "--presets",
        nargs="+",
        metavar="NAME",
        help=f"model presets (default {' '.join(DEFAULT_MODEL_PRESETS)}, or none with --params/--from-run)",
    )
    what.add_argument("--methods", nargs="+", metavar="NAME", help="methods (default: all of them)")
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
        help="take params, step time (and layers, H, P, M if recorded) from RUN_DIR/summary.json",
    )

    method = p.add_argument_group("method options (change every chosen method; dp has no outer step)")
    method.add_argument(
        "--sync-every", type=int, metavar="H", help=f"inner steps per outer step (default {PAPER_SYNC_EVERY})"
    )
    method.add_argument("--overlap-steps", type=int, metavar="TAU", help="overlap τ inner steps (clears --slack)")
    method.add_argument(
        "--slack", type=int, metavar="K", help="eager / delayed: K outer steps of slack (clears the overlap)"
    )
    method.add_argument("--bits", type=int, help=f"bits per value: {', '.join(map(str, ALLOWED_BITS))}")
    method.add_argument("--fragments", type=int, metavar="P", help="fragments (default: one per 3 layers)")
    method.add_argument("--layout", choices=LAYOUTS, help="fragment layout (default strided)")
    method.add_argument(
        "--outer-ready",
        choices=OUTER_READY,
        help="outer gradients enter the link at the sync step's end (default) or per layer after its backward",
    )

    link = p.add_argument_group("link")
    link.add_argument("--workers", type=int, metavar="M", help="workers (default 2)")
    link.add_argument("--latency", type=float, default=0.0, metavar="S", help="latency per ring hop, s (default 0)")

    wall = p.add_argument_group("wall-clock estimate")
    wall.add_argument("--bandwidth", type=float, metavar="GBPS", help="CU and hours at this bandwidth (Gbit/s)")
    wall.add_argument("--tokens", type=count, help="token budget, e.g. 25e9 (needs --bandwidth)")
    wall.add_argument(
        "--tokens-per-step",
        type=count,
        default=float(TOKENS_PER_STEP_PAPER),
        metavar="D",
        help=f"tokens per inner step, all workers together (default {TOKENS_PER_STEP_PAPER} = 512 × 2048)",
    )

    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print JSON instead of tables")
    out.add_argument("--plot", metavar="PNG", help="save CU-vs-bandwidth curves to this file")
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


def build_plan(args: argparse.Namespace) -> Plan:
    """Turn the parsed arguments into models and methods; raise SimulatorConfigError on bad input."""
    run_info = None
    models: list[ModelSpec] = []
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
    if args.latency is None or not math.isfinite(args.latency) or args.latency < 0:
        raise SimulatorConfigError(f"--latency {args.latency}: must be a finite number of seconds >= 0")
    targets = [0.01 * t for t in args.targets] if args.targets else list(CU_TARGETS)
    for t in targets:
        if not 0 < t <= 1:
            raise SimulatorConfigError(f"--targets {100 * t:g}: a CU target must be in (0, 100] percent")

    method_names = args.methods or list(METHOD_PRESETS)
    if len(set(method_names)) != len(method_names):
        raise SimulatorConfigError(f"--methods {' '.join(method_names)}: each method may be named once")
    bases = [method_preset(name) for name in method_names]
    methods: dict[str, list[MethodSpec]] = {}
    for model in models:
        chosen = []
        for base in bases:
            fragments = args.fragments
            if fragments is None and run_info is not None and model is run_info.model and base.fragments is None:
                fragments = run_info.fragments
            spec = customize_method(
                base,
                sync_every=sync_every,
                overlap_steps=args.overlap_steps,
                slack_outer_steps=args.slack,
                bits=args.bits,
                fragments=fragments,
                layout=args.layout,
                outer_ready=args.outer_ready,
            )
            spec.num_fragments(model)  # validate P against this model's layers now, with a clear message
            chosen.append(spec)
        methods[model.name] = chosen
    LinkSpec(bandwidth_gbps=math.inf, workers=workers, latency_s=args.latency)  # validate M and latency

    H = sync_every or PAPER_SYNC_EVERY
    layout = args.layout or "strided"
    ready = {
        "step-end": "at the end of the sync step",
        "backward": "per layer when its backward ends",
    }[args.outer_ready or "step-end"]
    notes = [
        f"M = {workers} workers (ring all-reduce: each sends 2(M-1)/M = {2 * (workers - 1) / workers:g} x the "
        f"data), H = {H}, {layout} fragments, outer gradients enter the link {ready}, "
        f"latency {args.latency:g} s per hop",
    ]
    for model in models:
        notes.append(
            f"{model.name}: N = {model.params:.4g} parameters, L = {model.layers} layers, "
            f"T = {model.step_time_s:.4g} s per inner step{_fragments_note(model, methods[model.name])}"
        )
    return Plan(models=models, methods=methods, workers=workers, latency_s=args.latency, targets=targets, notes=notes)


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
    """Run the sub-command; print an error naming the bad value and return 2 on bad input."""
    try:
        return _run(args)
    except SimulatorConfigError as exc:
        print(f"eagerloco simulate: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.tokens is not None and args.bandwidth is None:
        raise SimulatorConfigError("--tokens needs --bandwidth (the link speed to estimate the wall clock at)")
    if args.bandwidth is not None and not (math.isfinite(args.bandwidth) and args.bandwidth > 0):
        raise SimulatorConfigError(f"--bandwidth {args.bandwidth}: must be a finite number of Gbit/s > 0")
    plan = build_plan(args)
    curves: dict[str, dict[str, list[SimResult]]] = {}
    if args.bandwidth is None or args.plot:
        for model in plan.models:
            curves[model.name] = {
                m.name: cu_curve(model, m, workers=plan.workers, latency_s=plan.latency_s)
                for m in plan.methods[model.name]
            }
    if args.bandwidth is not None:
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


def _format_gbps(value: float | None) -> str:
    if value is None:
        return ">1000"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


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
    print("Smallest bandwidth (Gbit/s) on the log grid 0.1-1000 (50 points) reaching each compute utilization")
    print("\n".join(plan.notes[:1]))
    width = max(len(m.name) for ms in plan.methods.values() for m in ms) + 2
    for model, note in zip(plan.models, plan.notes[1:]):
        print()
        print(note)
        header = "".join(f"{100 * t:>8g}%" for t in plan.targets)
        print(f"{'method':<{width}}{header}   link bound")
        for m in plan.methods[model.name]:
            cells = "".join(f"{_format_gbps(v):>9}" for v in table[model.name][m.name])
            bound = sustained_bandwidth_bound_gbps(model, m, plan.workers)
            print(f"{m.name:<{width}}{cells}   {bound:>10.3g}")
    print()
    print("link bound: bits per outer step / (H·T) (per step / T for dp), below which no overlap can keep up.")
    print(_steps_note(everything))


def _print_wall_clock(args: argparse.Namespace, plan: Plan) -> None:
    link = LinkSpec(bandwidth_gbps=args.bandwidth, workers=plan.workers, latency_s=plan.latency_s)
    report: dict[str, dict[str, dict[str, float]]] = {}
    lines: list[str] = []
    simulated: list[int] = []
    for model, note in zip(plan.models, plan.notes[1:]):
        report[model.name] = {}
        lines += ["", note]
        if args.tokens is not None:
            lines.append(f"{'method':<22}{'CU':>8}{'hours':>10}{'compute h':>11}{'sent per worker':>17}")
        else:
            lines.append(f"{'method':<22}{'CU':>8}{'blocked s per outer step (dp: per step)':>41}")
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
                    f"{m.name:<22}{100 * est.cu:>7.1f}%{est.hours:>10.3g}{est.compute_hours:>11.3g}"
                    f"{_format_bytes(est.bytes_per_worker):>17}"
                )
            else:
                result = simulate(model, m, link)
                simulated.append(result.inner_steps)
                report[model.name][m.name] = {"cu": result.cu, "blocked_s_per_outer_step": result.blocked_s_per_period}
                lines.append(f"{m.name:<22}{100 * result.cu:>7.1f}%{result.blocked_s_per_period:>41.4g}")
    if args.json:
        print(json.dumps(report, indent=2))
        return
    title = f"At {args.bandwidth:g} Gbit/s"
    if args.tokens is not None:
        steps = math.ceil(args.tokens / args.tokens_per_step)
        title += f", {args.tokens:.4g} tokens at {args.tokens_per_step:,.0f} tokens per step = {steps:,} inner steps"
    print(title)
    print(plan.notes[0])
    print("\n".join(lines))
    print()
    print(
        f"Steady-state CU from the event simulation ({min(simulated):,} to {max(simulated):,} inner steps "
        "simulated per method); start-up and the final drain are ignored."
    )


def _format_bytes(value: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} B"
