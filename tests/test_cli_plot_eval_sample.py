"""`eagerloco plot`, `eagerloco eval` and `eagerloco sample` on real tiny runs (an eager run with mid-run
checkpoints and a data-parallel run, a few seconds each): the figure's panels and lines, eval reproducing the
training run's eval losses bit for bit, deterministic sampling, and clear errors."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from eagerloco.cli.evaluate import evaluate_run
from eagerloco.cli.main import main as cli
from eagerloco.cli.plot import PANEL_TITLES, load_runs, make_figure, moving_average, plot_runs
from eagerloco.cli.sample import generate_samples
from eagerloco.launch import run as train_run
from eagerloco.lm.config import TrainConfig
from eagerloco.lm.runs import RunError, load_run, load_saved_model, run_label

STEPS = 20


def tiny_config(out_dir: Path, mode: str) -> TrainConfig:
    config = TrainConfig()
    config.model.n_layer, config.model.d_model, config.model.n_head, config.model.seq_len = 2, 32, 2, 32
    config.data.batch_size, config.data.eval_batch_size, config.data.eval_batches = 4, 4, 2
    config.optim.warmup_steps = 5
    config.outer.mode = mode
    config.outer.sync_every = 5
    config.run.steps = STEPS
    config.run.workers = 2
    config.run.threads = 1
    config.run.link_mbit = 0.0
    config.run.eval_every = 10
    config.run.checkpoint_every = 2  # every 2 outer steps = 10 inner steps: checkpoints at steps 10 and 20
    config.run.keep_checkpoints = 5
    config.run.progress = False
    config.run.out_dir = str(out_dir)
    return config.validate()


@pytest.fixture(autouse=True)
def _one_thread():
    # intra-op threads only slow these tiny models down, badly so on a busy shared machine
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("runs")
    out = {}
    try:
        for mode in ("eager", "dp"):
            train_run(tiny_config(root / mode, mode))
            out[mode] = root / mode
    finally:
        torch.set_num_threads(threads)
    return out


def records(run_dir: Path, kind: str, worker: int = 0) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind and r["worker"] == worker]


# --------------------------------------------------------------------------------------------------------- runs


def test_run_label():
    assert run_label({"outer": {"mode": "eager", "delay": 1, "sync_every": 30, "num_fragments": 1}}) == "eager k=1 H=30"
    assert run_label({"outer": {"mode": "eager", "delay": 1, "sync_every": 30, "eager_own_weight": 0.75}}) == (
        "eager k=1 w=0.75 H=30"
    )
    assert run_label({"outer": {"mode": "eager", "delay": 1, "sync_every": 30, "eager_own_weight": "1/M"}}) == (
        "eager k=1 w=1/M H=30"
    )
    smoothed = {"mode": "eager", "delay": 1, "sync_every": 30, "eager_own_weight": 0.875, "eager_smoothing": 0.5}
    assert run_label({"outer": smoothed}) == "eager k=1 w=0.875 β=0.5 H=30"
    assert run_label({"outer": {**smoothed, "eager_smoothing": 0.0}}) == "eager k=1 w=0.875 H=30"
    assert run_label({"outer": {"mode": "sync", "sync_every": 30}}) == "sync H=30"
    assert run_label({"outer": {"mode": "dp", "sync_every": 30}}) == "dp"
    assert run_label({"outer": {"mode": "overlap", "overlap_steps": 1, "sync_every": 10}}) == "overlap τ=1 H=10"
    label = run_label(
        {"outer": {"mode": "delayed", "delay": 2, "sync_every": 4, "num_fragments": 2, "compression": "int8"}}
    )
    assert label == "delayed k=2 H=4 P=2 int8"


def test_load_run_reads_the_records(runs):
    run = load_run(runs["eager"])
    assert run.label == "eager k=1 w=0.875 β=0.5 H=5" and run.mode == "eager"
    assert run.workers == [0, 1]
    assert [r["step"] for r in run.inner(1)] == list(range(1, STEPS + 1))
    assert [r["inner_step"] for r in run.outer(0)] == [5, 10, 15, 20]
    assert [r["step"] for r in run.evals(0)] == [10, 20]
    assert run.utilization == json.loads((runs["eager"] / "summary.json").read_text())["utilization"]
    # eval times: the loop's wall time at the evaluation (the inner record of that step; + the final drain)
    times = run.eval_times(0)
    inner = {r["step"]: r["time_s"] for r in run.inner(0)}
    assert times[0] == inner[10]
    assert inner[STEPS] <= times[1] < inner[STEPS] + 5.0


def test_moving_average():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([1.0, 3.0], 1) == [1.0, 3.0]
    assert moving_average([2.0, 4.0, 6.0], 10) == [2.0, 3.0, 4.0]
    with pytest.raises(ValueError):
        moving_average([1.0], 0)


# --------------------------------------------------------------------------------------------------------- plot


def test_plot_figure_has_eight_panels_and_one_line_per_run(runs):
    fig = make_figure(load_runs([runs["eager"], runs["dp"]]), smooth=3)
    axes = fig.get_axes()
    assert len(axes) == 8
    for ax, phrase in zip(axes, PANEL_TITLES):
        assert phrase in ax.get_title()
    train, evals, wall, cu, blocked, sent, norm, lr = axes
    assert [line.get_label() for line in train.get_lines()] == ["eager k=1 w=0.875 β=0.5 H=5", "dp"]
    assert len(evals.get_lines()) == 2 and len(wall.get_lines()) == 2
    assert [len(line.get_xdata()) for line in evals.get_lines()] == [2, 2]  # evals at steps 10 and 20
    assert len(train.get_lines()[0].get_xdata()) == STEPS
    assert [line.get_label() for line in cu.get_lines()] == ["eager k=1 w=0.875 β=0.5 H=5"]  # dp has no outer steps
    assert len(cu.get_lines()[0].get_xdata()) == 4
    text = "\n".join(t.get_text() for t in cu.texts)
    assert "eager k=1 w=0.875 β=0.5 H=5: overall CU" in text and "dp: overall CU" in text and "no outer steps" in text
    assert "eval loss" in wall.get_title()

    # the outer-step panels hold exactly what metrics.jsonl logged for worker 0 (the final drain included)
    outer = records(runs["eager"], "outer")
    steps = [r for r in outer if r["kind"] == "step"]
    (blocked_line,) = blocked.get_lines()
    assert list(blocked_line.get_xdata()) == [r["tokens"] for r in outer]
    assert list(blocked_line.get_ydata()) == [r["blocked_s"] for r in outer]
    (sent_line,) = sent.get_lines()
    assert list(sent_line.get_xdata()) == [0] + [r["tokens"] for r in outer]
    assert sent_line.get_ydata()[0] == 0
    assert sent_line.get_ydata()[-1] == sum(r["payload_bytes"] for r in outer) > 0
    summary = json.loads((runs["eager"] / "summary.json").read_text())
    assert sent_line.get_ydata()[-1] == summary["per_worker"][0]["payload_bytes"]
    (norm_line,) = norm.get_lines()
    assert list(norm_line.get_ydata()) == [r["delta_norm"] for r in steps if r["fragments_synced"]]
    assert len(norm_line.get_ydata()) == STEPS // 5 and all(v > 0 for v in norm_line.get_ydata())
    inner = records(runs["dp"], "inner")
    assert [line.get_label() for line in lr.get_lines()] == ["eager k=1 w=0.875 β=0.5 H=5", "dp"]
    assert list(lr.get_lines()[1].get_ydata()) == [r["lr"] for r in inner]


def test_plot_cli_writes_a_png(runs, tmp_path, capsys):
    out = tmp_path / "sub" / "plot.png"
    assert cli(["plot", str(runs["eager"]), str(runs["dp"]), "-o", str(out), "--smooth", "4", "--worker", "1"]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert str(out) in capsys.readouterr().out


@pytest.mark.parametrize(("suffix", "magic"), [(".pdf", b"%PDF-"), (".svg", b"<?xml"), (".jpg", b"\xff\xd8\xff")])
def test_plot_writes_any_format_matplotlib_writes(runs, tmp_path, suffix, magic):
    path, _ = plot_runs([runs["eager"]], tmp_path / f"plot{suffix}")
    assert path == tmp_path / f"plot{suffix}" and path.read_bytes().startswith(magic)


def test_plot_default_output_is_plot_png_in_the_first_run(runs, tmp_path, capsys):
    first = tmp_path / "first"
    shutil.copytree(runs["eager"], first, ignore=shutil.ignore_patterns("checkpoints", "model.pt"))
    assert cli(["plot", str(first), str(runs["dp"])]) == 0
    assert (first / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert capsys.readouterr().out == f"plot written to {first / 'plot.png'}\n"
    assert not (runs["dp"] / "plot.png").exists()


def test_plot_same_label_twice_is_disambiguated(runs, tmp_path):
    copy = tmp_path / "eager-copy"
    shutil.copytree(runs["eager"], copy, ignore=shutil.ignore_patterns("checkpoints", "model.pt"))
    (copy / "summary.json").unlink()  # an unfinished run plots too, without its overall CU
    path, fig = plot_runs([runs["eager"], copy], tmp_path / "two.png")
    labels = [line.get_label() for line in fig.get_axes()[0].get_lines()]
    assert labels == [f"eager k=1 w=0.875 β=0.5 H=5 ({runs['eager'].name})", "eager k=1 w=0.875 β=0.5 H=5 (eager-copy)"]
    assert "no summary.json" in fig.get_axes()[3].texts[0].get_text()
    assert path.is_file()


@pytest.mark.parametrize("missing", ["metrics.jsonl", "config.json"])
def test_plot_names_the_missing_file(runs, tmp_path, capsys, missing):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in {"metrics.jsonl", "config.json"} - {missing}:
        shutil.copy(runs["eager"] / name, broken / name)
    assert cli(["plot", str(broken), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert f"missing {missing}" in err and str(broken) in err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--worker", "5"], "no metrics of worker 5"),
        (["--smooth", "0"], "--smooth 0"),
        (["-o", "plot.docx"], "the suffix picks the format; matplotlib writes "),
        (["-o", "plot"], "-o plot: the suffix picks the format"),
    ],
)
def test_plot_bad_options(runs, tmp_path, capsys, flags, message):
    argv = ["plot", str(runs["eager"]), *flags]
    if "-o" not in flags:
        argv += ["-o", str(tmp_path / "x.png")]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists() and not (runs["eager"] / "plot.png").exists()


def test_plot_unwritable_output_is_a_runtime_failure(runs, tmp_path, capsys):
    """Bad input exits 2; an output that cannot be written, once everything was checked, exits 1 (one line)."""
    (tmp_path / "file").write_text("")
    assert cli(["plot", str(runs["eager"]), "-o", str(tmp_path / "file" / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("eagerloco plot: error: cannot write the plot: ") and err.count("\n") == 1


def test_plot_malformed_metrics_line(runs, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(runs["eager"], broken, ignore=shutil.ignore_patterns("checkpoints", "model.pt"))
    lines = (broken / "metrics.jsonl").read_text().splitlines()
    (broken / "metrics.jsonl").write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    assert cli(["plot", str(broken), "-o", str(tmp_path / "x.png")]) == 2
    assert "metrics.jsonl:2: malformed line" in capsys.readouterr().err
    # a truncated last line (a run killed mid-write) is skipped with a warning
    (broken / "metrics.jsonl").write_text("\n".join(lines) + '\n{"type": "inn')
    with pytest.warns(UserWarning, match="truncated last line"):
        assert len(load_run(broken).records) == len(lines)


# --------------------------------------------------------------------------------------------------------- eval


@pytest.mark.parametrize("mode", ["eager", "dp"])
def test_eval_reproduces_the_stored_eval_loss_exactly(runs, mode):
    stored = torch.load(runs[mode] / "model.pt", weights_only=True)["eval_loss"]
    report = evaluate_run(runs[mode])
    assert report["loss"] == stored  # bit for bit: the same model, the same windows
    assert report["run_eval_loss"] == stored and report["same_windows"]
    assert report["loss"] == json.loads((runs[mode] / "summary.json").read_text())["eval_loss"]
    assert report["perplexity"] == pytest.approx(math.exp(stored))
    assert report["bits_per_byte"] == pytest.approx(stored / math.log(2))
    assert report["windows"] == 2 * 4 and report["tokens"] == 2 * 4 * 32 and report["step"] == STEPS


@pytest.mark.parametrize("worker", [0, 1])
def test_eval_of_a_mid_run_checkpoint_reproduces_that_workers_eval(runs, worker):
    # step 10 of an eager run: each worker has its own outer parameters φ_m; the run evaluated them at step 10
    report = evaluate_run(runs["eager"], checkpoint="10", worker=worker)
    expected = [r["eval_loss"] for r in records(runs["eager"], "eval", worker) if r["step"] == 10]
    assert report["loss"] == expected[0] == report["run_eval_loss"]
    assert report["step"] == 10 and report["worker"] == worker
    latest = evaluate_run(runs["eager"], checkpoint="latest", worker=worker)
    assert latest["step"] == STEPS and latest["loss"] == evaluate_run(runs["eager"])["loss"]


def test_eval_cli_text_and_json(runs, capsys):
    assert cli(["eval", str(runs["eager"])]) == 0
    text = capsys.readouterr().out
    assert "bits/byte" in text and "perplexity" in text and "(identical)" in text
    assert cli(["eval", str(runs["dp"]), "--json", "--batches", "1", "--batch-size", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["batches"] == 1 and report["windows"] == 3 and not report["same_windows"]
    assert math.isfinite(report["loss"]) and report["label"] == "dp"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--worker", "1"], "give --checkpoint too"),
        (["--batches", "-1"], "--batches -1"),
        (["--batch-size", "0"], "--batch-size 0"),
        (["--checkpoint", "15"], "checkpoint '15' not found"),
        (["--checkpoint", "latest", "--worker", "7"], "no file for worker 7"),
    ],
)
def test_eval_bad_options(runs, capsys, flags, message):
    assert cli(["eval", str(runs["eager"]), *flags]) == 2
    assert message in capsys.readouterr().err


def test_eval_without_model_pt(runs, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs["eager"], unfinished, ignore=shutil.ignore_patterns("model.pt"))
    assert cli(["eval", str(unfinished)]) == 2
    err = capsys.readouterr().err
    assert "missing model.pt" in err and "--checkpoint latest" in err
    assert evaluate_run(unfinished, checkpoint="latest")["step"] == STEPS  # what the hint says works
    assert cli(["eval", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_eval_rejects_a_corrupted_checkpoint(runs, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(runs["eager"], copy)
    worker = copy / "checkpoints" / "step-000000010" / "worker-0.pt"
    worker.write_bytes(worker.read_bytes()[:100])
    with pytest.raises(RunError, match="corrupted or truncated"):
        load_saved_model(copy, checkpoint="10")


# ------------------------------------------------------------------------------------------------------- sample


def test_sample_is_deterministic_for_a_seed(runs):
    kwargs = {"prompt": "To be", "tokens": 24, "temperature": 0.9, "top_k": 20, "num_samples": 2}
    first = generate_samples(runs["eager"], seed=3, **kwargs)
    again = generate_samples(runs["eager"], seed=3, **kwargs)
    other = generate_samples(runs["eager"], seed=4, **kwargs)
    assert len(first) == 2
    assert [s.new_ids for s in first] == [s.new_ids for s in again]
    assert [s.text for s in first] == [s.text for s in again]
    assert [s.new_ids for s in first] != [s.new_ids for s in other]
    for sample in first:
        assert len(sample.new_ids) == 24
        assert sample.prompt_ids == list(b"To be")
        assert sample.text == bytes(sample.prompt_ids + sample.new_ids).decode("utf-8", errors="replace")
        assert sample.text.startswith("To be")


def test_sample_longer_than_the_context_and_from_a_checkpoint(runs):
    (sample,) = generate_samples(runs["dp"], tokens=40, seed=0)  # seq_len 32: the context window slides
    assert len(sample.new_ids) == 40
    (mid,) = generate_samples(runs["eager"], tokens=5, checkpoint="10")
    assert len(mid.new_ids) == 5


def test_sample_cli(runs, capsys):
    argv = ["sample", str(runs["eager"]), "--prompt", "KING", "--tokens", "12", "--seed", "5", "--num-samples", "2"]
    assert cli(argv) == 0
    text = capsys.readouterr().out
    assert cli(argv) == 0
    assert capsys.readouterr().out == text
    assert text.count("----- sample") == 2 and text.count("KING") >= 2
    assert cli([*argv, "--json"]) == 0
    samples = json.loads(capsys.readouterr().out)
    assert [len(s["new_ids"]) for s in samples] == [12, 12]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--temperature", "0"], "--temperature 0.0: must be > 0"),
        (["--temperature", "-1"], "must be > 0"),
        (["--top-k", "0"], "--top-k 0"),
        (["--tokens", "0"], "--tokens 0"),
        (["--num-samples", "0"], "--num-samples 0"),
        (["--prompt", ""], "--prompt is empty"),
    ],
)
def test_sample_bad_options(runs, capsys, flags, message):
    assert cli(["sample", str(runs["eager"]), *flags]) == 2
    assert message in capsys.readouterr().err


def test_sample_without_model_pt(tmp_path, runs, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(runs["eager"] / "config.json", unfinished / "config.json")
    assert cli(["sample", str(unfinished)]) == 2
    assert "missing model.pt" in capsys.readouterr().err
