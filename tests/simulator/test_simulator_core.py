"""Closed forms and invariants of the compute-utilization simulator (issue 4)."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest

from eagerloco.simulator import (
    BANDWIDTH_GRID_GBPS,
    CODEC_BITS,
    CU_TARGETS,
    DEFAULT_MODEL_PRESETS,
    METHOD_PRESETS,
    MODEL_PRESETS,
    TRAIN_DEFAULTS,
    TRAIN_MODES,
    TRAIN_SYNC_EVERY,
    LinkSpec,
    MethodSpec,
    ModelSpec,
    SimulatorConfigError,
    compression_bits,
    cu_curve,
    customize_method,
    method_preset,
    min_bandwidth_for_targets,
    mode_method,
    model_preset,
    simulate,
    step_time_from_flops,
    sustained_bandwidth_bound_gbps,
)

ALL_MODELS = list(MODEL_PRESETS.values())
ALL_METHODS = list(METHOD_PRESETS.values())


def transfer_s(model: ModelSpec, bits: int, link: LinkSpec) -> float:
    """R: seconds the link needs for the whole model: N·bits·2(M−1)/M / bandwidth + L·2(M−1)·latency."""
    ring = 2 * (link.workers - 1) / link.workers
    return (
        model.params * bits * ring / (link.bandwidth_gbps * 1e9)
        + model.layers * 2 * (link.workers - 1) * link.latency_s
    )


@pytest.fixture(scope="module")
def default_curves() -> dict[str, dict[str, list[float]]]:
    """CU on the papers' grid for 1B/10B/100B × every method (the default command's 1,050 simulations)."""
    return {
        p: {name: [r.cu for r in cu_curve(model_preset(p), m)] for name, m in METHOD_PRESETS.items()}
        for p in DEFAULT_MODEL_PRESETS
    }


@pytest.mark.parametrize("model", ALL_MODELS, ids=lambda m: m.name)
@pytest.mark.parametrize("method", ALL_METHODS, ids=lambda m: m.name)
def test_infinite_bandwidth_gives_cu_one(model: ModelSpec, method: MethodSpec):
    result = simulate(model, method, LinkSpec(bandwidth_gbps=math.inf))
    assert result.cu == 1.0
    assert result.steady


def test_one_worker_needs_no_link():
    for method in ALL_METHODS:
        assert simulate(model_preset("1B"), method, LinkSpec(bandwidth_gbps=0.1, workers=1)).cu == 1.0


@pytest.mark.parametrize("bandwidth", [0.1, 1.0, 7.3, 100.0, 1000.0])
@pytest.mark.parametrize("bits", [32, 16, 8, 4])
@pytest.mark.parametrize(("workers", "latency"), [(2, 0.0), (4, 0.0), (3, 0.05)])
def test_blocking_diloco_closed_form(bandwidth: float, bits: int, workers: int, latency: float):
    """Outer gradients exist only after the sync step, and the next step waits for all of them:
    CU = H·T / (H·T + R)."""
    model = model_preset("10B")
    method = replace(method_preset("diloco"), bits=bits)
    link = LinkSpec(bandwidth_gbps=bandwidth, workers=workers, latency_s=latency)
    HT = 100 * model.step_time_s
    expected = HT / (HT + transfer_s(model, bits, link))
    assert simulate(model, method, link).cu == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("bandwidth", [1.0, 50.0, 180.0, 400.0, 900.0])
@pytest.mark.parametrize("preset", ["1B", "100B"])
def test_data_parallel_and_backward_ready_diloco_closed_form(bandwidth: float, preset: str):
    """Per-layer reductions overlapping the backward on a FIFO link: the last one (layer 0) ends at
    max(T + r, (L + 1)·d + L·r) after the step starts, r = R / L, d = T / (3L − 1)."""
    model = model_preset(preset)
    link = LinkSpec(bandwidth_gbps=bandwidth)
    T, L = model.step_time_s, model.layers
    d, r = T / (3 * L - 1), transfer_s(model, 16, link) / L
    tail = max(T + r, (L + 1) * d + L * r)
    assert simulate(model, method_preset("dp_bf16"), link).cu == pytest.approx(T / tail, rel=1e-10)
    diloco = replace(method_preset("diloco"), outer_ready="backward")
    expected = 100 * T / (99 * T + tail)
    assert simulate(model, diloco, link).cu == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("bandwidth", [2.0, 5.0, 20.0])
def test_streaming_overlap_closed_form(bandwidth: float):
    """1B, 8 strided fragments, τ = 1: fragment p's reduction (R/8) may run for τ·T plus the forward of the
    layers below its first layer p before it blocks: waits = Σ_p max(0, R/8 − τT − p·d). Valid while a
    fragment's transfer ends before the next fragment syncs (R/8 < 12 steps)."""
    model, link = model_preset("1B"), LinkSpec(bandwidth_gbps=bandwidth)
    T = model.step_time_s
    d, R = T / (3 * 24 - 1), transfer_s(model, 16, link)
    assert R / 8 < 12 * T
    waits = sum(max(0.0, R / 8 - T - p * d) for p in range(8))
    expected = 100 * T / (100 * T + waits)
    assert simulate(model, method_preset("streaming_tau1"), link).cu == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("preset", DEFAULT_MODEL_PRESETS)
@pytest.mark.parametrize("name", ["streaming_eager", "streaming_eager_fp4"])
@pytest.mark.parametrize("ratio", [0.25, 0.6, 0.97, 1.0, 1.5])
def test_eager_is_throughput_bound(preset: str, name: str, ratio: float):
    """One outer step of slack hides everything the link can carry: CU = min(1, bandwidth / bound)."""
    model, method = model_preset(preset), method_preset(name)
    bound = sustained_bandwidth_bound_gbps(model, method)
    result = simulate(model, method, LinkSpec(bandwidth_gbps=ratio * bound))
    assert result.steady
    assert result.cu == pytest.approx(min(1.0, ratio), rel=1e-9)


def test_slow_backlog_is_simulated_until_it_blocks():
    """100B eager at 90 % of the link bound: the backlog grows by 11 % of an outer step per outer step and
    blocks only after about nine outer steps; the simulation must run past that."""
    model, method = model_preset("100B"), method_preset("streaming_eager")
    result = simulate(model, method, LinkSpec(bandwidth_gbps=0.9 * sustained_bandwidth_bound_gbps(model, method)))
    assert result.periods > 9
    assert result.cu == pytest.approx(0.9, rel=1e-9)
    assert result.inner_steps == 100 * result.periods


def test_sustained_bound_caps_cu_everywhere(default_curves):
    for preset, by_method in default_curves.items():
        model = model_preset(preset)
        for name, cus in by_method.items():
            bound = sustained_bandwidth_bound_gbps(model, METHOD_PRESETS[name])
            for bw, cu in zip(BANDWIDTH_GRID_GBPS, cus):
                assert cu <= min(1.0, bw / bound) + 1e-12, (preset, name, bw)


def test_eager_99_percent_bandwidth_never_below_throughput_bound(default_curves):
    """PAPER_FACTS: with a whole outer step of slack the link must still carry each outer step's bits within
    the outer step, so CU 99 % needs bandwidth >= 0.99 · bits per outer step / (H·T)."""
    for preset, by_method in default_curves.items():
        for name in ("streaming_eager", "streaming_eager_fp4"):
            bw99 = min_bandwidth_for_targets(by_method[name], targets=[0.99])[0]
            bound = sustained_bandwidth_bound_gbps(model_preset(preset), METHOD_PRESETS[name])
            assert bw99 is not None
            assert bw99 >= 0.99 * bound
            # and the grid point just below it falls short
            below = BANDWIDTH_GRID_GBPS[BANDWIDTH_GRID_GBPS.index(bw99) - 1]
            assert below < 0.99 * bound


def test_more_bandwidth_never_lowers_cu(default_curves):
    for by_method in default_curves.values():
        for cus in by_method.values():
            assert all(b >= a - 1e-12 for a, b in itertools.pairwise(cus))


@pytest.mark.parametrize("preset", ["1B", "10B"])
@pytest.mark.parametrize("name", list(METHOD_PRESETS))
def test_fewer_bits_never_lower_cu(preset: str, name: str):
    model = model_preset(preset)
    for bw in BANDWIDTH_GRID_GBPS[::7]:
        link = LinkSpec(bandwidth_gbps=bw)
        cus = [simulate(model, replace(METHOD_PRESETS[name], bits=b), link).cu for b in (32, 16, 8, 4)]
        assert all(b >= a - 1e-12 for a, b in itertools.pairwise(cus)), (bw, cus)


def test_default_table_values_match_closed_forms(default_curves):
    """DiLoCo 1B reaches CU = c when R = 16 Gbit / bandwidth <= (1/c − 1)·H·T: 50 % needs 1.6 Gbit/s."""
    table = min_bandwidth_for_targets(default_curves["1B"]["diloco"])
    for target, found in zip(CU_TARGETS, table):
        needed = 16.0 / ((1 / target - 1) * 10.0)
        assert found == min(bw for bw in BANDWIDTH_GRID_GBPS if bw >= needed * (1 - 1e-12))


def test_step_time_from_flops_is_kaplan():
    # 6 · 1e9 params · 2^20 tokens / (100 chips · 1e15 FLOP/s · 0.6)
    assert step_time_from_flops(1e9, 2**20, 100, 1e15, 0.6) == pytest.approx(6e9 * 2**20 / 6e16, rel=1e-15)
    with pytest.raises(SimulatorConfigError, match=r"mfu=1.5.*\(0, 1\]"):
        step_time_from_flops(1e9, 2**20, 100, 1e15, 1.5)
    with pytest.raises(SimulatorConfigError, match="chips=0"):
        step_time_from_flops(1e9, 2**20, 0, 1e15, 0.5)


def test_presets_as_documented():
    expected = {
        "1B": (1e9, 24, 0.1, 8),
        "10B": (10e9, 48, 0.8, 16),
        "100B": (100e9, 108, 4.9, 36),
        "llama-405B": (405e9, 126, 26.9, 42),
        "deepseek-v3": (671e9, 61, 20.1, 21),
    }
    for name, (params, layers, step, fragments) in expected.items():
        model = model_preset(name.upper())
        assert (model.params, model.layers, model.step_time_s) == (params, layers, step)
        assert method_preset("streaming").num_fragments(model) == fragments
    bits = {name: m.bits for name, m in METHOD_PRESETS.items()}
    assert bits == {n: 4 if n.endswith("fp4") else 16 for n in METHOD_PRESETS}
    assert method_preset("streaming_eager").delay_steps == 100
    assert method_preset("streaming_tau1").delay_steps == 1


def test_customize_method_names_what_changed():
    spec = customize_method(method_preset("streaming_eager"), overlap_steps=2, bits=8, sync_every=30)
    assert (spec.name, spec.overlap_steps, spec.slack_outer_steps, spec.bits, spec.sync_every) == (
        "streaming_eager[tau=2,k=0,bits=8]",
        2,
        0,
        8,
        30,
    )
    dp = customize_method(method_preset("dp_bf16"), fragments=4, overlap_steps=3, bits=4)
    assert (dp.name, dp.data_parallel, dp.bits) == ("dp_bf16[bits=4]", True, 4)
    fp4 = customize_method(method_preset("diloco"), compression="fp4")
    assert (fp4.name, fp4.bits, fp4.gather) == ("diloco[fp4]", 4.25, True)
    assert customize_method(method_preset("streaming_tau1_fp4"), compression="4").name == "streaming_tau1_fp4"
    assert customize_method(method_preset("diloco"), compression="bf16").name == "diloco[bf16]"  # all-gather now


def test_training_modes_take_trains_defaults_and_names():
    """The modes of `eagerloco train` with train's defaults: H = 30, P = 1, fp32 by all-reduce, τ = 1, k = 1."""
    from eagerloco.engine.config import DiLoCoConfig

    train = DiLoCoConfig()
    assert {
        "sync_every": train.sync_every,
        "num_fragments": train.num_fragments,
        "overlap_steps": train.overlap_steps,
        "delay": train.delay,
        "compression": train.compression,
    } == TRAIN_DEFAULTS
    assert MethodSpec(name="x").sync_every == TRAIN_SYNC_EVERY == train.sync_every == 30
    specs = {mode: method_preset(mode) for mode in TRAIN_MODES}
    assert {m: (s.sync_every, s.fragments, s.bits, s.gather) for m, s in specs.items()} == {
        m: (30, 1, 32.0, False) for m in TRAIN_MODES
    }
    assert specs["dp"].data_parallel and specs["sync"].delay_steps == 0
    assert specs["overlap"].delay_steps == 1 and specs["delayed"].delay_steps == specs["eager"].delay_steps == 30
    spec = mode_method("eager", num_fragments=2, delay=2, compression="fp4", overlap_steps=5, sync_every=60)
    assert (spec.name, spec.fragments, spec.slack_outer_steps, spec.overlap_steps, spec.bits, spec.gather) == (
        "eager[P=2,k=2,fp4]",
        2,
        2,
        0,  # as in train, τ belongs to mode 'overlap' only
        4.25,
        True,
    )
    assert spec.delay_steps == 120
    assert mode_method("overlap", overlap_steps=3, delay=4).name == "overlap[tau=3]"
    assert mode_method("dp", compression="fp4", num_fragments=4) == specs["dp"]  # dp averages fp32
    assert mode_method("sync", compression=8).name == "sync[bits=8]"
    assert method_preset("eager_fp4") is METHOD_PRESETS["streaming_eager_fp4"]  # the old name


def test_codec_bits_include_block_scales_and_compressed_all_gather():
    assert CODEC_BITS == {"none": 32, "bf16": 16, "fp16": 16, "fp8": 8.25, "int8": 8.25, "fp4": 4.25}
    assert compression_bits("none") == (32.0, False) and compression_bits("int8") == (8.25, True)
    assert compression_bits("16") == (16.0, False) and compression_bits(4) == (4.0, False)
    model = ModelSpec(name="m", params=1.2e6, layers=4, step_time_s=0.1)
    link = LinkSpec(bandwidth_gbps=0.01, workers=4)
    # blocking sync, fp4 by all-gather: each worker sends (M − 1) = 3 × 1.2e6 · 4.25 bits = 15.3 Mbit per outer step
    sync = mode_method("sync", compression="fp4")
    R = 3 * 1.2e6 * 4.25 / 1e7
    assert simulate(model, sync, link).cu == pytest.approx(3.0 / (3.0 + R), rel=1e-12)
    ring = mode_method("sync")  # fp32 by ring all-reduce: 2(M − 1)/M = 1.5 × 1.2e6 · 32 bits
    assert simulate(model, ring, link).cu == pytest.approx(3.0 / (3.0 + 1.5 * 1.2e6 * 32 / 1e7), rel=1e-12)
    assert sustained_bandwidth_bound_gbps(model, sync, workers=4) == pytest.approx(3 * 1.2e6 * 4.25 / 3.0 / 1e9)
    dp = replace(mode_method("dp"), gather=True)  # data-parallel always all-reduces
    assert dp.wire_factor(4) == 1.5


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LinkSpec(bandwidth_gbps=-1.0), r"bandwidth_gbps=-1.0: must be > 0"),
        (lambda: LinkSpec(bandwidth_gbps=0.0), r"bandwidth_gbps=0.0: must be > 0"),
        (lambda: LinkSpec(bandwidth_gbps=1.0, workers=0), r"workers=0: M must be an integer >= 1"),
        (lambda: LinkSpec(bandwidth_gbps=1.0, latency_s=-0.1), r"latency_s=-0.1"),
        (lambda: MethodSpec(name="x", bits=33), r"bits=33: must be a number of bits per value in \(0, 32\]"),
        (lambda: MethodSpec(name="x", bits=0), r"bits=0: must be a number of bits per value"),
        (lambda: compression_bits("int4"), r"compression 'int4': must be a codec \(none, bf16, fp16, fp8, int8, fp4\)"),
        (lambda: compression_bits(5), r"compression 5: must be a codec .* or bits per value \(32, 16, 8, 4\)"),
        (lambda: mode_method("async"), r"unknown mode 'async': the training modes are dp, sync, overlap"),
        (lambda: mode_method("eager", delay=0), r"mode 'eager': delay=0: k must be an integer >= 1"),
        (lambda: MethodSpec(name="x", sync_every=0), r"sync_every=0: H must be an integer >= 1"),
        (lambda: MethodSpec(name="x", fragments=0), r"fragments=0: P must be an integer >= 1"),
        (lambda: MethodSpec(name="x", sync_every=4, fragments=5), r"fragments=5 > sync_every=4"),
        (lambda: MethodSpec(name="x", overlap_steps=30), r"overlap_steps=30 >= sync_every=30: τ must be < H"),
        (lambda: MethodSpec(name="x", overlap_steps=1, slack_outer_steps=1), "not both"),
        (lambda: MethodSpec(name="x", layout="random"), r"layout='random'"),
        (lambda: MethodSpec(name="x", outer_ready="never"), r"outer_ready='never'"),
        (lambda: ModelSpec(name="m", params=-5, layers=2, step_time_s=1.0), r"m: params=-5: must be > 0"),
        (lambda: ModelSpec(name="m", params=5, layers=0, step_time_s=1.0), r"layers=0: L must be an integer"),
        (lambda: ModelSpec(name="m", params=5, layers=2, step_time_s=0.0), r"step_time_s=0.0: must be > 0"),
        (lambda: model_preset("2B"), r"unknown preset '2B': known presets are 1B, 10B"),
        (
            lambda: simulate(model_preset("1B"), method_preset("dp_bf16"), LinkSpec(bandwidth_gbps=1.0), periods=0),
            r"periods=0: must be an integer >= 1",
        ),
        (
            lambda: method_preset("async"),
            r"unknown method 'async': known methods are dp, sync, overlap, delayed, eager, dp_bf16",
        ),
        (
            lambda: MethodSpec(name="x", fragments=30).num_fragments(model_preset("1B")),
            r"fragments=30 > layers=24",
        ),
    ],
)
def test_bad_input_names_value_and_rule(make, message):
    with pytest.raises(SimulatorConfigError, match=message):
        make()
