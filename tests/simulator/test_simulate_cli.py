"""``eagerloco simulate``: the default table, JSON, wall clock, --from-run, plot and errors."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from eagerloco.cli.main import build_parser, main
from eagerloco.cli.simulate import build_plan
from eagerloco.simulator import BANDWIDTH_GRID_GBPS, METHOD_PRESETS


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["simulate", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def grid_at_least(value: float) -> float | None:
    """The smallest grid rate >= value (Gbit/s); None above the grid, as the JSON writes it."""
    return min((bw for bw in BANDWIDTH_GRID_GBPS if bw >= value * (1 - 1e-12)), default=None)


@pytest.fixture(scope="module")
def default_json() -> tuple[dict, str]:
    """`eagerloco simulate --json` with no other argument (module-scoped, so captured by hand)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["simulate", "--json"]) == 0
    return json.loads(out.getvalue()), err.getvalue()


def test_default_json_shape_and_values(default_json):
    table, err = default_json
    assert list(table) == ["1B", "10B", "100B"]
    for by_method in table.values():
        assert list(by_method) == list(METHOD_PRESETS)
        for values in by_method.values():
            assert len(values) == 5
            assert all(v is None or v in {float(f"{g:.6g}") for g in BANDWIDTH_GRID_GBPS} for v in values)
    # blocking DiLoCo, 1B: CU = 10 / (10 + 16/bw) >= c  <=>  bw >= 1.6·c / (1 − c)
    assert table["1B"]["diloco"] == [
        pytest.approx(grid_at_least(1.6 * c / (1 - c)), rel=1e-5) for c in (0.5, 0.8, 0.9, 0.95, 0.99)
    ]
    # eager FP4, 100B: CU = min(1, bw / 0.816) → 99 % needs 0.99·0.816 = 0.808 Gbit/s
    assert table["100B"]["streaming_eager_fp4"][4] == pytest.approx(grid_at_least(0.99 * 400 / 490), rel=1e-5)
    assert "1827 points" in err and "inner steps simulated per point" in err  # 3 presets × 7 methods × 87 rates


def test_table_output(capsys):
    code, out, _ = run_cli(capsys, "--presets", "1B", "--methods", "dp_bf16", "diloco", "eager_fp4")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("Smallest link rate (G: Gbit/s, M: Mbit/s) on the log grid 0.0954 Mbit/s to 1000 Gbit/s")
    assert "H = 100" in lines[1]
    header = next(line for line in lines if line.startswith("method"))
    assert header.split() == ["method", "50%", "80%", "90%", "95%", "99%", "link", "bound"]
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.split()[:1] in (["diloco"], ["dp_bf16"])}
    assert rows["diloco"] == ["1.68G", "7.54G", "16G", "33.9G", "184G", "1.6G"]
    assert rows["dp_bf16"] == ["105G", "184G", "222G", "268G", "687G", "160G"]
    fp4 = next(line for line in lines if line.startswith("streaming_eager_fp4")).split()  # the old name's row
    assert fp4[1:] == ["212M", "373M", "373M", "450M", "450M", "400M"]
    assert "inner steps simulated per point" in out


def test_training_modes_with_trains_defaults(capsys):
    """`--methods sync ...`: train's modes, H = 30 and fp32 (all-reduce) unless told otherwise."""
    code, out, _ = run_cli(capsys, "--presets", "1B", "--methods", "sync", "eager", "dp", "--json")
    assert code == 0
    table = json.loads(out)["1B"]
    assert list(table) == ["sync", "eager", "dp"]
    # blocking sync: CU = 3 / (3 + 32/bw) >= c  <=>  bw >= 32/3 · c / (1 − c) Gbit/s
    cus = (0.5, 0.8, 0.9, 0.95, 0.99)
    assert table["sync"][:4] == [pytest.approx(grid_at_least(32 / 3 * c / (1 - c)), rel=1e-5) for c in cus[:4]]
    assert table["sync"][4] is None and grid_at_least(32 / 3 * 99) is None  # 1,056 Gbit/s: above the grid
    # eager: CU = min(1, bw / (32 / 3))
    assert table["eager"] == [pytest.approx(grid_at_least(32 / 3 * c), rel=1e-5) for c in cus]
    code, out, _ = run_cli(
        capsys, "--presets", "1B", "--methods", "eager", "--num-fragments", "2", "--compression", "fp4", "--json"
    )
    assert list(json.loads(out)["1B"]) == ["eager[P=2,fp4]"]
    assert json.loads(out)["1B"]["eager[P=2,fp4]"][4] == pytest.approx(grid_at_least(0.99 * 4.25 / 3), rel=1e-5)


def test_small_models_get_answers_below_0_1_gbit(tmp_path, capsys):
    """A train-sized model (0.82M parameters, T = 0.2 s, H = 30, fp32): thresholds in Mbit/s, not 0.1 everywhere."""
    code, out, _ = run_cli(
        capsys, "--params", "820352", "--layers", "4", "--step-time", "0.2", "--methods", "sync", "eager"
    )
    assert code == 0
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.split()[:1] in (["sync"], ["eager"])}
    bound = 820352 * 32 / 6.0 / 1e9  # 4.375 Mbit/s
    assert rows["sync"][0] == f"{grid_at_least(bound) * 1e3:.3g}M" == "4.94M"
    assert rows["eager"] == ["2.33M", "4.09M", "4.09M", "4.94M", "4.94M", "4.38M"]
    assert f"{grid_at_least(0.95 * bound) * 1e3:.3g}M" == rows["eager"][3]


def test_wall_clock_json(capsys):
    code, out, _ = run_cli(capsys, "--presets", "1B", "--bandwidth", "1", "--tokens", "25e9", "--json")
    assert code == 0
    report = json.loads(out)["1B"]
    compute_h = 23842 * 0.1 / 3600
    assert report["streaming_eager_fp4"]["hours"] == pytest.approx(compute_h, rel=1e-12)
    assert report["streaming_eager"]["hours"] == pytest.approx(compute_h * 1.6, rel=1e-9)  # 16 Gbit per 10 s
    assert report["dp_bf16"]["hours"] == pytest.approx(compute_h / report["dp_bf16"]["cu"], rel=1e-12)
    assert 100 < report["dp_bf16"]["hours"] < 110
    code, out_mbit, _ = run_cli(capsys, "--presets", "1B", "--link-mbit", "1000", "--tokens", "25e9", "--json")
    assert json.loads(out_mbit) == json.loads(out)


def test_wall_clock_table_without_tokens(capsys):
    code, out, _ = run_cli(capsys, "--presets", "10B", "--methods", "diloco", "--bandwidth", "2")
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("diloco")).split()
    assert row[1:] == ["50.0%", "80"]  # R = 160 Gbit / 2 Gbit/s = 80 s blocked per 80 s outer step
    assert out.startswith("At 2 Gbit/s\n")
    code, out, _ = run_cli(capsys, "--presets", "10B", "--methods", "diloco", "--link-mbit", "500")
    assert out.startswith("At 500 Mbit/s\n")
    row = next(line for line in out.splitlines() if line.startswith("diloco")).split()
    assert row[1:] == ["20.0%", "320"]


def test_from_run_answers_for_that_model(tmp_path, capsys):
    summary = {"params": 1_000_000_000, "inner_step_time_s": 0.1, "num_layers": 24, "sync_every": 100, "workers": 2}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    code, out, _ = run_cli(capsys, "--from-run", str(tmp_path), "--methods", "diloco", "eager_fp4", "--json")
    assert code == 0
    got = json.loads(out)[tmp_path.name]
    code, out, _ = run_cli(capsys, "--presets", "1B", "--methods", "diloco", "eager_fp4", "--json")
    assert got == json.loads(out)["1B"]
    assert list(got) == ["diloco", "streaming_eager_fp4"]


def write_run(tmp_path, mode="sync", link_mbit=16.0, **outer):
    """A finished run's summary.json and config.json: N = 1e6 fp32 parameters, L = 4, T = 0.1 s, H = 10."""
    summary = {"params": 1_000_000, "inner_step_time_s": 0.1, "num_layers": 4, "mode": mode, "utilization": 0.3,
               "blocked_per_outer_step_s": 2.1, "sync_every": 10, "link_mbit": link_mbit}  # fmt: skip
    config = {
        "outer": {"mode": mode, "sync_every": 10, "num_fragments": 1, "overlap_steps": 1, "delay": 1,
                  "compression": "none", "fragment_layout": "strided", **outer},
        "run": {"workers": 2, "link_mbit": link_mbit, "link_latency_ms": 0.0},
    }  # fmt: skip
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_from_run_predicts_the_cu_at_the_runs_link_next_to_the_measured_one(tmp_path, capsys):
    run = write_run(tmp_path)
    # sync, fp32: R = 1e6·32 bit / 16 Mbit/s = 2 s per outer step of H·T = 1 s → CU = 1/3
    code, out, _ = run_cli(capsys, "--from-run", str(run), "--json")
    assert code == 0
    assert json.loads(out) == {
        run.name: {
            "sync": {
                "cu": pytest.approx(1 / 3, rel=1e-12),
                "blocked_s_per_outer_step": pytest.approx(2.0, rel=1e-12),
                "measured_cu": 0.3,
            }
        }
    }
    code, out, _ = run_cli(capsys, "--from-run", str(run))
    lines = out.splitlines()
    assert lines[0] == "At 16 Mbit/s"
    assert "link: the run's, 16 Mbit/s (config.json run.link_mbit)" in lines
    assert "H = 10" in lines[1]
    assert next(line for line in lines if line.startswith("method")).split()[-2:] == ["measured", "CU"]
    assert next(line for line in lines if line.startswith("sync")).split() == ["sync", "33.3%", "2", "30.0%"]
    assert "add --grid" in out
    # a what-if on the same run: fp4 by all-gather (4.25 bits per value), no measured column
    code, out, _ = run_cli(capsys, "--from-run", str(run), "--compression", "fp4", "--json")
    ((name, got),) = json.loads(out)[run.name].items()
    assert name == "sync[fp4]" and "measured_cu" not in got
    assert got["cu"] == pytest.approx(1 / (1 + 4.25e6 / 16e6), rel=1e-12)
    # another rate given: it wins over the run's link
    code, out, _ = run_cli(capsys, "--from-run", str(run), "--link-mbit", "32", "--json")
    got = json.loads(out)[run.name]["sync"]
    assert got == {"cu": pytest.approx(0.5, rel=1e-12), "blocked_s_per_outer_step": pytest.approx(1.0, rel=1e-12)}


def test_from_run_measured_cu_without_the_final_drain(tmp_path, capsys):
    run = write_run(tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    summary["per_worker"] = [
        {"inner_s": 3.0, "wall_s": 10.0, "finalize_blocked_s": 2.0},  # 3 / 8
        {"inner_s": 3.0, "wall_s": 9.0, "finalize_blocked_s": 1.0},  # 3 / 8
    ]
    (run / "summary.json").write_text(json.dumps(summary))
    code, out, _ = run_cli(capsys, "--from-run", str(run), "--json")
    assert code == 0 and json.loads(out)[run.name]["sync"]["measured_cu_steady"] == 0.375
    code, out, _ = run_cli(capsys, "--from-run", str(run))
    assert code == 0
    assert next(line for line in out.splitlines() if line.startswith("method")).endswith("without drain")
    assert next(line for line in out.splitlines() if line.startswith("sync")).split()[-2:] == ["30.0%", "37.5%"]


def test_from_run_takes_mode_options_from_config_json(tmp_path):
    run = write_run(tmp_path, mode="overlap", overlap_steps=2, num_fragments=2, compression="int8")
    args = build_parser(["simulate"]).parse_args(["simulate", "--from-run", str(run)])
    plan = build_plan(args)
    (spec,) = plan.methods[run.name]
    assert (spec.name, spec.overlap_steps, spec.fragments, spec.bits, spec.gather) == (
        "overlap[P=2,tau=2,int8]",
        2,
        2,
        8.25,
        True,
    )
    assert plan.run_method == spec.name and plan.bandwidth_gbps == 0.016


def test_from_run_grid_and_a_run_without_a_link(tmp_path, capsys):
    run = write_run(tmp_path, mode="eager", link_mbit=0.0)
    code, out, _ = run_cli(capsys, "--from-run", str(run), "--json")
    assert code == 0
    bound = 32e6 / 1.0 / 1e9  # 32 Mbit per outer step of H·T = 1 s
    assert json.loads(out)[run.name]["eager"][0] == pytest.approx(grid_at_least(0.5 * bound), rel=1e-5)
    code, out, _ = run_cli(capsys, "--from-run", str(run))
    assert "link: the run emulated none (link_mbit 0)" in out
    run = write_run(tmp_path, mode="eager")
    code, out, _ = run_cli(capsys, "--from-run", str(run), "--grid", "--json")
    assert json.loads(out)[run.name]["eager"][0] == pytest.approx(grid_at_least(0.5 * bound), rel=1e-5)


def test_from_run_takes_fragments_h_and_workers(tmp_path):
    summary = {"params": 5e6, "inner_step_time_s": 0.02, "num_layers": 8, "sync_every": 20, "num_fragments": 4}
    (tmp_path / "summary.json").write_text(json.dumps(summary | {"workers": 3}))
    args = build_parser(["simulate"]).parse_args(["simulate", "--from-run", str(tmp_path)])
    plan = build_plan(args)
    assert plan.workers == 3 and [m.name for m in plan.models] == [tmp_path.name]
    methods = {m.name: m for m in plan.methods[tmp_path.name]}
    assert methods["streaming[P=4]"].sync_every == 20 and methods["streaming[P=4]"].fragments == 4
    assert methods["diloco"].fragments == 1
    args = build_parser(["simulate"]).parse_args(["simulate", "--from-run", str(tmp_path), "--workers", "2"])
    assert build_plan(args).workers == 2


def test_custom_model_from_flops(capsys):
    args = build_parser(["simulate"]).parse_args(
        ["simulate", "--params", "1B", "--layers", "24", "--chips", "100", "--peak-tflops", "1000", "--mfu", "0.6"]
    )
    (model,) = build_plan(args).models
    assert model.params == 1e9 and model.layers == 24
    assert model.step_time_s == pytest.approx(6e9 * 2**20 / (100 * 1e15 * 0.6), rel=1e-15)


def test_custom_method_from_flags(capsys):
    code, out, _ = run_cli(
        capsys, "--presets", "1B", "--methods", "streaming", "--overlap-steps", "5", "--bits", "8", "--json"
    )
    assert code == 0
    assert list(json.loads(out)["1B"]) == ["streaming[tau=5,bits=8]"]


@pytest.mark.parametrize(("suffix", "magic"), [(".png", b"\x89PNG\r\n\x1a\n"), (".pdf", b"%PDF-"), (".svg", b"<?xml")])
def test_plot_writes_any_format(tmp_path, capsys, suffix, magic):
    path = tmp_path / f"cu{suffix}"
    code, out, _ = run_cli(capsys, "--presets", "1B", "10B", "--methods", "dp", "eager", "--plot", str(path))
    assert code == 0 and f"plot written to {path}" in out
    assert path.read_bytes().startswith(magic)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bits", "5"], "--compression 5: must be a codec of eagerloco train (none, bf16, fp16, fp8, int8, fp4)"),
        (["--compression", "int4"], "--compression int4: must be a codec of eagerloco train"),
        (["--methods", "async"], "unknown method 'async'"),
        (["--methods", "dp", "dp"], "each method may be named once"),
        (["--methods", "eager_fp4", "streaming_eager_fp4"], "each method may be named once"),
        (["--presets", "1B", "1b"], "each model needs its own name"),
        (["--presets", "2B"], "unknown preset '2B'"),
        (["--bandwidth", "-1"], "--bandwidth -1.0: must be a finite number of Gbit/s > 0"),
        (["--link-mbit", "0"], "--link-mbit 0.0: must be a finite number of Mbit/s > 0"),
        (["--tokens", "25e9"], "--tokens needs a link rate (--link-mbit or --bandwidth)"),
        (["--grid"], "--grid goes with --from-run"),
        (["--plot", "cu.docx"], "--plot cu.docx: the suffix picks the format; matplotlib writes"),
        (["--sync-every", "0"], "--sync-every 0: must be an integer >= 1"),
        (["--num-fragments", "0"], "--num-fragments 0: must be an integer >= 1"),
        (["--methods", "eager", "--delay", "0"], "mode 'eager': delay=0: k must be an integer >= 1"),
        (["--methods", "overlap", "--overlap-steps", "30"], "overlap_steps=30 >= sync_every=30"),
        (["--presets", "1B", "--fragments", "30"], "fragments=30 > layers=24"),
        (["--overlap-steps", "100"], "overlap_steps=100 >= sync_every=100"),
        (["--overlap-steps", "2", "--slack", "1"], "choose one"),
        (["--workers", "0"], "workers=0: M must be an integer >= 1"),
        (["--latency", "-1"], "--latency -1.0"),
        (["--targets", "120"], "--targets 120"),
        (["--params", "1e9"], "--params needs --layers"),
        (["--params", "1e9", "--layers", "4"], "needs --step-time, or --chips, --peak-tflops and --mfu"),
        (["--step-time", "1"], "--step-time describes a custom model"),
        (["--from-run", "/nonexistent/run"], "not a directory"),
        (["--overlap-steps", "auto"], "--overlap-steps auto sizes mode overlap's τ: add --methods overlap"),
        (["--methods", "sync", "--overlap-steps", "auto"], "sizes mode overlap's τ: --methods sync has none"),
        (["--methods", "overlap", "streaming", "--overlap-steps", "auto"], "the papers' presets (streaming) take"),
        (["--methods", "overlap", "--overlap-steps", "auto"], "--overlap-steps auto sizes τ to a link rate: give"),
    ],
)
def test_bad_input_exits_2_with_a_message(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err and err.count("\n") == 1 and out == ""


def test_from_run_missing_key(tmp_path, capsys):
    (tmp_path / "summary.json").write_text(json.dumps({"inner_step_time_s": 0.1, "num_layers": 4}))
    code, _, err = run_cli(capsys, "--from-run", str(tmp_path))
    assert code == 2 and "missing key 'params'" in err and "summary.json" in err


def test_plot_axis_starts_where_a_curve_leaves_zero():
    from eagerloco.simulator.plot import x_start

    grid = [0.001, 0.01, 0.1, 1.0, 10.0]
    assert x_start({"m": {"a": [0.0, 0.005, 0.02, 0.5, 1.0], "b": [0.0, 0.0, 0.0, 0.1, 1.0]}}, grid) == 0.01
    assert x_start({"m": {"a": [0.5, 0.6, 0.7, 0.8, 1.0]}}, grid) == 0.001
    assert x_start({"m": {"a": [0.0] * 5}}, grid) == 0.001


def test_overlap_steps_auto_sizes_tau_to_the_link(tmp_path, capsys):
    """--overlap-steps auto: the smallest τ < H whose CU reaches the highest target (99 %); the method is then
    exactly --overlap-steps τ. The run of write_run at 32 Mbit/s with P = 2: a fragment's all-reduce (0.5e6 fp32
    values, 16 Mbit) takes 0.5 s = 5 inner steps, so τ = 5 hides it and τ = 4 does not (test_simulator_search)."""
    run = write_run(tmp_path, mode="overlap", link_mbit=32.0, num_fragments=2)
    code, out, _ = run_cli(capsys, "--from-run", str(run), "--overlap-steps", "auto")
    assert code == 0
    lines = out.splitlines()
    assert (
        "--overlap-steps auto: τ = 5, the smallest τ < H = 10 whose CU at 32 Mbit/s reaches 99 % (τ = 4: 84.0 %); "
        "train with --overlap-steps 5"
    ) in lines
    assert next(line for line in lines if line.startswith("overlap")).split() == ["overlap[P=2,tau=5]", "100.0%", "0"]
    assert "measured" not in out  # the run trained at τ = 1: its measurement is not this method's
    code, auto, _ = run_cli(capsys, "--from-run", str(run), "--overlap-steps", "auto", "--json")
    code, five, _ = run_cli(capsys, "--from-run", str(run), "--overlap-steps", "5", "--json")
    assert json.loads(auto) == json.loads(five) and list(json.loads(auto)[run.name]) == ["overlap[P=2,tau=5]"]
    # a lower top target takes a smaller τ; the other modes beside it keep their own options
    code, out, _ = run_cli(
        capsys, "--from-run", str(run), "--methods", "sync", "overlap", "--overlap-steps", "auto", "--targets", "80"
    )
    assert "τ = 4, the smallest τ < H = 10 whose CU at 32 Mbit/s reaches 80 % (τ = 3: 71.9 %)" in out
    assert [line.split()[0] for line in out.splitlines() if line.startswith(("sync", "overlap"))] == [
        "sync[P=2]", "overlap[P=2,tau=4]"
    ]  # fmt: skip


def test_overlap_steps_auto_on_a_link_no_tau_hides(capsys):
    code, out, _ = run_cli(
        capsys, "--params", "1e6", "--layers", "4", "--step-time", "0.1", "--sync-every", "10",
        "--num-fragments", "2", "--methods", "overlap", "--overlap-steps", "auto", "--link-mbit", "16",
    )  # fmt: skip
    assert code == 0
    assert (
        "custom: --overlap-steps auto: no τ < H = 10 reaches CU 99 % at 16 Mbit/s; τ = 5 comes closest (50.0 %): the "
        "link is too slow for overlap (eager hides up to k inner phases; --compression shrinks the all-reduce)"
    ) in out.splitlines()


def test_link_mbit_measured_is_the_rate_a_sync_runs_blocked_time_implies(tmp_path, capsys):
    """A sync run waits for its whole all-reduce at every outer step: write_run's 2.1 s per outer step for
    N = 1e6 fp32 values (32 Mbit, M = 2) is 32 / 2.1 = 15.24 Mbit/s, whatever the link it emulated (16 Mbit/s: the
    difference is the transport's). The simulator at that rate predicts exactly the measured wait."""
    run = write_run(tmp_path)
    argv = ["--from-run", str(run), "--link-mbit", "measured"]
    code, out, _ = run_cli(capsys, *argv, "--methods", "sync", "eager", "--json")
    assert code == 0
    got = json.loads(out)[run.name]
    assert got["sync"] == {
        "cu": pytest.approx(1 / (1 + 2.1), rel=1e-9),  # H·T = 1 s of compute per 2.1 s blocked
        "blocked_s_per_outer_step": pytest.approx(2.1, rel=1e-9),
    }  # no measured column: the rate was fitted to this run's own measurement
    assert got["eager"]["cu"] == pytest.approx(1 / 2.1, rel=1e-9)  # eager hides 1 s of the 2.1 s all-reduce
    code, out, _ = run_cli(capsys, "--from-run", str(run), "--link-mbit", "measured")
    assert code == 0 and out.splitlines()[0] == "At 15.2 Mbit/s"
    assert (
        "link: 15.2 Mbit/s, measured: the rate at which the run's own all-reduce (sync, M = 2) takes the 2.1 s it "
        "blocked per 10 inner steps (it emulated 16 Mbit/s)"
    ) in out.splitlines()
    # τ sized to the measured link: P = 2 fragments of 16 Mbit take 1.05 s each at 15.24 Mbit/s, so τ = 11 > H
    # is out of reach and no τ < 10 reaches 99 %
    code, out, _ = run_cli(
        capsys, "--from-run", str(run), "--link-mbit", "measured", "--methods", "overlap", "--num-fragments", "2",
        "--overlap-steps", "auto",
    )  # fmt: skip
    assert code == 0 and "no τ < H = 10 reaches CU 99 % at 15.2 Mbit/s" in out


def test_link_mbit_measured_with_fragments_reads_blocked_time_per_h_steps(tmp_path, capsys):
    """With P fragments each fragment's sync is an outer step of its own: 8 outer steps of 1.05 s in 40 inner
    steps at H = 10 are 2.1 s per H steps, the same link as the P = 1 run above."""
    run = write_run(tmp_path, num_fragments=2)
    summary = json.loads((run / "summary.json").read_text())
    summary |= {"blocked_per_outer_step_s": 1.05, "outer_steps": 8, "per_worker": [{"inner_steps": 40}] * 2}
    (run / "summary.json").write_text(json.dumps(summary))
    code, out, _ = run_cli(capsys, "--from-run", str(run), "--link-mbit", "measured", "--json")
    assert code == 0
    assert json.loads(out)[run.name]["sync[P=2]"]["blocked_s_per_outer_step"] == pytest.approx(2.1, rel=1e-9)


def test_link_mbit_measured_reads_the_summarys_blocked_per_period_first(tmp_path, capsys):
    """A summary written since `blocked_per_period_s` existed gives the blocked time per H steps itself; it is the
    figure read (2.1 s per H here, where the outer steps counted would give 1.05 s), the older derivation only
    where the field is missing."""
    run = write_run(tmp_path, num_fragments=2)
    summary = json.loads((run / "summary.json").read_text())
    summary |= {"blocked_per_outer_step_s": 1.05, "blocked_per_period_s": 2.1, "outer_steps": 4,
                "per_worker": [{"inner_steps": 40}] * 2}  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    code, out, _ = run_cli(capsys, "--from-run", str(run), "--link-mbit", "measured", "--json")
    assert code == 0
    assert json.loads(out)[run.name]["sync[P=2]"]["blocked_s_per_outer_step"] == pytest.approx(2.1, rel=1e-9)


@pytest.mark.parametrize(
    ("mode", "blocked", "message"),
    [
        ("eager", 2.1, "--link-mbit measured: the run's mode is eager, not sync: only a blocking run's wait"),
        ("sync", 0.0, "--link-mbit measured: the run recorded 0.0 s blocked per outer step"),
    ],
)
def test_link_mbit_measured_refuses_what_does_not_measure_the_link(tmp_path, capsys, mode, blocked, message):
    run = write_run(tmp_path, mode=mode)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps(summary | {"blocked_per_outer_step_s": blocked}))
    code, out, err = run_cli(capsys, "--from-run", str(run), "--link-mbit", "measured")
    assert code == 2 and message in err and err.count("\n") == 1 and out == ""
    code, out, err = run_cli(capsys, "--link-mbit", "measured")
    assert code == 2 and "--link-mbit measured reads the link from a run: give --from-run RUN_DIR" in err
