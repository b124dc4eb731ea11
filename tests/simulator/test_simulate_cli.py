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


def grid_at_least(value: float) -> float:
    return min(bw for bw in BANDWIDTH_GRID_GBPS if bw >= value * (1 - 1e-12))


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
    assert table["100B"]["eager_fp4"][4] == pytest.approx(grid_at_least(0.99 * 400 / 490), rel=1e-5)
    assert "1050 points" in err and "inner steps simulated per point" in err


def test_table_output(capsys):
    code, out, _ = run_cli(capsys, "--presets", "1B", "--methods", "dp", "diloco", "eager_fp4")
    assert code == 0
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("method"))
    assert header.split() == ["method", "50%", "80%", "90%", "95%", "99%", "link", "bound"]
    diloco = next(line for line in lines if line.startswith("diloco")).split()
    assert diloco[1:6] == [f"{grid_at_least(1.6 * c / (1 - c)):.3g}" for c in (0.5, 0.8, 0.9, 0.95, 0.99)]
    assert diloco[6] == "1.6"
    assert "inner steps simulated per point" in out


def test_wall_clock_json(capsys):
    code, out, _ = run_cli(capsys, "--presets", "1B", "--bandwidth", "1", "--tokens", "25e9", "--json")
    assert code == 0
    report = json.loads(out)["1B"]
    compute_h = 23842 * 0.1 / 3600
    assert report["eager_fp4"]["hours"] == pytest.approx(compute_h, rel=1e-12)
    assert report["eager"]["hours"] == pytest.approx(compute_h * 1.6, rel=1e-9)  # 16 Gbit per 10 s outer step
    assert report["dp"]["hours"] == pytest.approx(compute_h / report["dp"]["cu"], rel=1e-12)
    assert 100 < report["dp"]["hours"] < 110


def test_wall_clock_table_without_tokens(capsys):
    code, out, _ = run_cli(capsys, "--presets", "10B", "--methods", "diloco", "--bandwidth", "2")
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("diloco")).split()
    assert row[1:] == ["50.0%", "80"]  # R = 160 Gbit / 2 Gbit/s = 80 s blocked per 80 s outer step


def test_from_run_answers_for_that_model(tmp_path, capsys):
    summary = {"params": 1_000_000_000, "inner_step_time_s": 0.1, "num_layers": 24, "sync_every": 100, "workers": 2}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    code, out, _ = run_cli(capsys, "--from-run", str(tmp_path), "--methods", "diloco", "eager_fp4", "--json")
    assert code == 0
    got = json.loads(out)[tmp_path.name]
    code, out, _ = run_cli(capsys, "--presets", "1B", "--methods", "diloco", "eager_fp4", "--json")
    assert got == json.loads(out)["1B"]


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


def test_plot_writes_png(tmp_path, capsys):
    path = tmp_path / "cu.png"
    code, out, _ = run_cli(capsys, "--presets", "1B", "10B", "--methods", "dp", "eager", "--plot", str(path))
    assert code == 0 and f"plot written to {path}" in out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bits", "5"], "bits=5: must be one of 32, 16, 8, 4"),
        (["--methods", "async"], "unknown method 'async'"),
        (["--methods", "dp", "dp"], "each method may be named once"),
        (["--presets", "1B", "1b"], "each model needs its own name"),
        (["--presets", "2B"], "unknown preset '2B'"),
        (["--bandwidth", "-1"], "--bandwidth -1.0: must be a finite number of Gbit/s > 0"),
        (["--tokens", "25e9"], "--tokens needs --bandwidth"),
        (["--sync-every", "0"], "sync_every=0: H must be an integer >= 1"),
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
    ],
)
def test_bad_input_exits_2_with_a_message(capsys, argv, message):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err


def test_from_run_missing_key(tmp_path, capsys):
    (tmp_path / "summary.json").write_text(json.dumps({"inner_step_time_s": 0.1, "num_layers": 4}))
    code, _, err = run_cli(capsys, "--from-run", str(tmp_path))
    assert code == 2 and "missing key 'params'" in err and "summary.json" in err
