"""The training CLI end to end on tiny runs: every mode, resume ≡ uninterrupted, launches agree, summary ≡ metrics,
clear errors. Tiny config: the shipped smoke.toml (2-layer GPT, 20 inner steps, H = 5, seconds per run)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from eagerloco import configs
from eagerloco.cli import train as train_cli
from eagerloco.cli.main import EXIT_USAGE
from eagerloco.cli.main import main as cli
from eagerloco.cli.train import TrainError
from eagerloco.engine.config import ConfigError
from eagerloco.lm.config import (
    EAGER_PAPER_RECIPE,
    OUTER_RECIPES,
    RECIPE_SYNC_EVERY,
    RECIPES_AT_H,
    TrainConfig,
    add_arguments,
    apply_overrides,
    from_args,
    load_toml,
    recipes_for,
)

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(configs.path("smoke"))  # shipped in the package (src/eagerloco/configs; configs/ links there)


def train(tmp_path: Path, name: str, *flags: str) -> dict:
    out = tmp_path / name
    assert cli(["train", "--config", SMOKE, "--out-dir", str(out), "--threads", "1", *flags]) == 0
    return json.loads((out / "summary.json").read_text())


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=False)["model"]


def records(run_dir: Path, kind: str, worker: int = 0) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind and r["worker"] == worker]


@pytest.mark.parametrize(
    "flags",
    [
        ["--mode", "dp"],
        ["--mode", "sync"],
        ["--mode", "overlap", "--overlap-steps", "1"],
        ["--mode", "delayed"],
        ["--mode", "eager"],
        ["--mode", "eager", "--num-fragments", "2", "--sync-every", "4", "--delay", "2"],
    ],
    ids=["dp", "sync", "overlap", "delayed", "eager", "eager-streaming-k2"],
)
def test_every_mode_end_to_end(tmp_path, flags):
    summary = train(tmp_path, "run", *flags)
    run_dir = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "summary.json", "model.pt"):
        assert (run_dir / name).exists(), name
    assert summary["mode"] == flags[1]
    assert summary["workers"] == 2
    assert summary["tokens"] == 20 * 4 * 32 * 2
    assert 0 < summary["utilization"] <= 1
    assert summary["eval_loss"] < 5.545  # below ln(256): it learned something in 20 steps
    # the summary's numbers are the metrics file's
    inner = records(run_dir, "inner")
    assert [r["step"] for r in inner] == list(range(1, 21))
    assert inner[-1]["tokens"] == summary["tokens"]
    outer = [r for r in records(run_dir, "outer") if r["kind"] == "step"]
    worker0 = summary["per_worker"][0]
    if flags[1] != "dp":
        assert len(outer) == summary["outer_steps"]
        all_outer = records(run_dir, "outer")
        assert sum(r["payload_bytes"] for r in all_outer) == worker0["payload_bytes"]
        assert sum(r["blocked_s"] for r in all_outer) == pytest.approx(worker0["blocked_s"], abs=1e-6)
        fragments = int(flags[flags.index("--num-fragments") + 1]) if "--num-fragments" in flags else 1
        assert summary["blocked_per_period_s"] == summary["blocked_per_outer_step_s"] * fragments  # P records per H
    evals = records(run_dir, "eval")
    assert evals[-1]["eval_loss"] == summary["eval_loss"]
    # the checkpoint at the end is complete and verifiable
    from eagerloco.lm import checkpoint

    assert checkpoint.latest_valid(run_dir).name == "step-000000020"


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path):
    # Eager with fragments and compression off: checkpoints every outer step (5 inner steps) hold averages in
    # flight and eager's own contributions. Resume from step 10 and finish: the same final model, bit for bit.
    flags = ["--mode", "eager", "--checkpoint-every", "1", "--keep-checkpoints", "10"]
    train(tmp_path, "full", *flags)
    full = tmp_path / "full"
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for later in ("step-000000015", "step-000000020"):
        shutil.rmtree(resumed / "checkpoints" / later)
    (resumed / "model.pt").unlink()
    train(tmp_path, "resumed", *flags, "--resume")
    a, b = final_model(full), final_model(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # and the metrics file holds each step once
    assert [r["step"] for r in records(resumed, "inner")] == list(range(1, 21))


def test_corrupted_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    train(tmp_path, "run", "--checkpoint-every", "1", "--keep-checkpoints", "10")
    run_dir = tmp_path / "run"
    newest = run_dir / "checkpoints" / "step-000000020" / "worker-1.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    from eagerloco.lm import checkpoint

    with pytest.warns(UserWarning, match=r"worker-1.pt is corrupted or truncated"):
        assert checkpoint.latest_valid(run_dir).name == "step-000000015"


def test_simulated_and_process_launches_agree(tmp_path):
    train(tmp_path, "simulated", "--launch", "simulated")
    summary = train(tmp_path, "processes", "--launch", "processes")
    assert summary["workers"] == 2
    a, b = final_model(tmp_path / "simulated"), final_model(tmp_path / "processes")
    for name in a:  # M = 2: the two-term sums have one order, so gloo and the in-process group agree bitwise
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--sync-every", "0"], r"sync_every=0: H must be an integer >= 1"),
        (["--mode", "overlap", "--overlap-steps", "5"], r"overlap_steps=5 >= sync_every=5"),
        (["--alpha", "2"], r"alpha=2.0: α must be a number in \[0, 1\]"),
        (["--steps", "0"], r"run.steps=0: must be >= 1"),
        (["--mode", "dp", "--ddp-bucket-mb", "0"], r"outer.ddp_bucket_mb=0.0: must be a finite number of MB > 0"),
        (["--corpus", "/nonexistent/corpus"], r"/nonexistent/corpus"),
        (["--n-head", "3"], r"d_model=32 must be divisible by n_head=3"),
        (["--mode", "dp", "--compression", "fp4"], r"mode 'dp' has none"),
    ],
)
def test_bad_values_are_clear_errors_before_training(tmp_path, flags, message, capsys):
    with pytest.raises(SystemExit, match=message):
        cli(["train", "--config", SMOKE, "--out-dir", str(tmp_path / "bad"), *flags])
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_unknown_and_mistyped_config_keys(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[outer]\nsync_evry = 3\n")
    with pytest.raises(ConfigError, match=r"unknown key outer.sync_evry; valid keys: .*sync_every"):
        apply_overrides(TrainConfig(), load_toml(bad), str(bad))
    bad.write_text('[outer]\nsync_every = "30"\n')
    with pytest.raises(ConfigError, match=r"outer.sync_every='30': must be of type int, got str"):
        apply_overrides(TrainConfig(), load_toml(bad), str(bad))
    bad.write_text("[optimiser]\nlr = 1.0\n")
    with pytest.raises(ConfigError, match=r"unknown section \[optimiser\]"):
        apply_overrides(TrainConfig(), load_toml(bad), str(bad))
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_toml(tmp_path / "missing.toml")


@pytest.mark.parametrize("name", configs.names())
def test_shipped_configs_are_valid(name):
    config = TrainConfig()
    path = configs.path(name)
    apply_overrides(config, load_toml(path), str(path))
    config.validate()
    # A config named after its mode leaves the run directory to the default (runs/MODE, runs/MODE-2, ...); the
    # others name it after themselves. Either way the file's comment says where the run goes.
    expected = "" if name == config.outer.mode or name == "smoke" else f"runs/{name}"
    assert config.run.out_dir == expected
    assert f"eagerloco train --config {name} " in path.read_text() or name == "eager"


def test_configs_by_name_from_any_directory(tmp_path, monkeypatch, capsys):
    """--config NAME reads the shipped file (package data: it works outside a checkout); an existing file wins
    over a name; an unknown name is one line listing the shipped names, exit 2, nothing written."""
    assert configs.names() == ["dp", "eager", "eager_fp4", "smoke", "streaming", "sync"]
    assert (ROOT / "configs").resolve() == configs.path("eager").parent  # the checkout's configs/ is the package's
    monkeypatch.chdir(tmp_path)
    assert configs.resolve("sync") == configs.resolve("sync.toml") == configs.path("sync")
    (tmp_path / "sync").write_text("[outer]\nmode = 'dp'\n")
    assert configs.resolve("sync") == Path("sync")
    (tmp_path / "sync").unlink()
    for spec in ("eagr", "runs/eager.toml", "eager/"):
        code, text = refused(capsys, ["train", "--config", spec])
        assert code == EXIT_USAGE
        assert text == (
            f"eagerloco train: error: ConfigError: config file {spec!r} does not exist and is not the name of a "
            "shipped config; shipped configs: dp, eager, eager_fp4, smoke, streaming, sync (eagerloco train "
            "--config NAME)"
        )
    assert list(tmp_path.iterdir()) == []
    assert cli(["train", "--config", "smoke", "--steps", "5", "--eval-every", "0", "--threads", "1"]) == 0
    config = json.loads((tmp_path / "runs" / "eager" / "config.json").read_text())
    assert (config["model"]["n_layer"], config["run"]["steps"], config["outer"]["sync_every"]) == (2, 5, 5)


def test_the_wheel_ships_the_configs(tmp_path):
    """pyproject's package data: the built wheel holds every shipped config (what makes --config NAME work from an
    installed package)."""
    import subprocess
    import sys
    import zipfile

    pytest.importorskip("setuptools")
    source = tmp_path / "source"  # a copy: setuptools writes build/ next to the sources
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source), "-w",
         str(tmp_path)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    [wheel] = tmp_path.glob("eagerloco-*.whl")
    shipped = sorted(n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("eagerloco/configs/"))
    assert shipped == ["eagerloco/configs/__init__.py", *(f"eagerloco/configs/{n}.toml" for n in configs.names())]


def test_default_config_is_the_documented_main_job():
    config = TrainConfig().validate()
    assert (config.outer.mode, config.run.workers, config.outer.delay) == ("eager", 2, 1)
    shipped = TrainConfig()
    apply_overrides(shipped, load_toml(configs.path("eager")), "eager.toml")
    shipped.run.out_dir = config.run.out_dir
    assert shipped.validate().to_dict() == config.to_dict()


@pytest.mark.parametrize("name", ["eager", "eager_fp4", "streaming", "sync"])
@pytest.mark.parametrize("sync_every", ["10", "30", "56", "100"])
def test_shipped_configs_leave_the_outer_optimizer_to_the_recipe_of_their_h(name, sync_every):
    """A shipped config names the mode, not its outer optimizer: with --sync-every it takes that H's recipe
    (RECIPES_AT_H), exactly as --mode with the same H does, where a pinned H = 30 recipe would silently run at
    H = 100."""
    recipe_keys = {"outer_lr", "outer_momentum", "nesterov", "eager_own_weight", "eager_smoothing"}
    assert not recipe_keys & set(load_toml(configs.path(name)).get("outer", {}))
    parser = train_cli.add_arguments(argparse.ArgumentParser())
    shipped = train_cli.config_from_args(parser.parse_args(["--config", name, "--sync-every", sync_every]))
    mode = train_cli.config_from_args(parser.parse_args(["--mode", shipped.outer.mode, "--sync-every", sync_every]))
    resolved = [(c.outer.outer_lr, c.outer.outer_momentum, c.outer.nesterov, c.outer.eager_own_weight,
                 c.outer.eager_smoothing) for c in (shipped, mode)]  # fmt: skip
    recipe = recipes_for(int(sync_every))[shipped.outer.mode]
    assert resolved[0] == resolved[1] == (*recipe[:3], recipe.own_weight, recipe.smoothing)


@pytest.mark.parametrize("mode", ["sync", "overlap", "delayed", "eager"])
def test_each_mode_gets_its_outer_recipe_unless_set(mode):
    """Issue 11: the outer optimizer fields left unset take the mode's recipe; a flag or TOML key sets one field
    and leaves the others to the recipe; the resolved values are what config.json records."""
    recipe = OUTER_RECIPES[mode]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = from_args(parser.parse_args(["--mode", mode]))
    assert (config.outer.outer_lr, config.outer.outer_momentum, config.outer.nesterov) == recipe[:3]
    assert config.outer.eager_own_weight == recipe.own_weight == (0.875 if mode == "eager" else None)
    assert config.outer.eager_smoothing == recipe.smoothing == (0.5 if mode == "eager" else 0.0)
    assert config.outer.diloco().outer_lr == recipe.lr
    assert TrainConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    one = from_args(parser.parse_args(["--mode", mode, "--outer-momentum", "0.25"]))
    assert (one.outer.outer_lr, one.outer.outer_momentum, one.outer.nesterov) == (recipe.lr, 0.25, True)
    own = ", own weight w = 0.875, smoothing β = 0.5" if mode == "eager" else ""
    assert one.outer.recipe_note(2) == f"SGD lr {recipe.lr:g}, Nesterov 0.25{own} (set by the run)"
    toml = TrainConfig()
    apply_overrides(toml, {"outer": {"mode": mode, "outer_lr": 0.4, "nesterov": False}}, "t.toml")
    toml.validate()
    assert (toml.outer.outer_lr, toml.outer.outer_momentum, toml.outer.nesterov) == (0.4, recipe.momentum, False)


def test_the_readme_gives_library_users_eagers_recipe():
    """README's one line for library users who want eager's measured recipe in their own loop is the CLI's recipe
    at H = 30 (the snippet's H), as a DiLoCoConfig that resolves to it."""
    import ast

    from eagerloco import DiLoCoConfig

    text = " ".join((ROOT / "README.md").read_text().split())
    (call,) = re.findall(r'`(DiLoCoConfig\(mode="eager", eager_own_weight=[^`]*\))`', text)
    kwargs = {k.arg: ast.literal_eval(k.value) for k in ast.parse(call, mode="eval").body.keywords}
    config = DiLoCoConfig(**kwargs)
    config.validate()
    recipe = recipes_for(30)["eager"]
    resolved = (config.outer_lr, config.outer_momentum, config.nesterov)
    resolved += (config.eager_own_weight, config.eager_smoothing)
    assert resolved == (*recipe[:3], recipe.own_weight, recipe.smoothing)


def test_outer_recipes_as_measured():
    """The table the CLI ships (BENCHMARKS.md 8): sync at lr 1 with Nesterov 0.5; eager with own weight 0.875 and
    smoothing 0.5 at lr 0.85 with Nesterov 0.5, and at lr 1 without momentum or smoothing where it runs the paper's
    rule; overlap at lr 1 with the DiLoCo paper's Nesterov 0.9; delayed at lr 0.7 without momentum; mode 'dp' has no
    outer optimizer."""
    assert {m: (*r[:3], r.own_weight, r.smoothing) for m, r in OUTER_RECIPES.items()} == {
        "sync": (1.0, 0.5, True, None, 0.0), "eager": (0.85, 0.5, True, 0.875, 0.5),
        "overlap": (1.0, 0.9, True, None, 0.0), "delayed": (0.7, 0.0, True, None, 0.0),
    }  # fmt: skip
    paper = EAGER_PAPER_RECIPE
    assert (*paper[:3], paper.own_weight, paper.smoothing) == (1.0, 0.0, True, None, 0.0)
    default = TrainConfig().validate()
    assert default.outer.recipe_note(2) == (
        "SGD lr 0.85, Nesterov 0.5, own weight w = 0.875, smoothing β = 0.5 (eager's recipe: the best of the recipe "
        "study, BENCHMARKS.md 8)"
    )
    dp = TrainConfig()
    dp.outer.mode = "dp"
    assert dp.validate().outer.outer_lr is None and dp.outer.recipe_note(2) == "none (mode 'dp')"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    helps = {a.dest: re.sub(r"\s+", " ", a.help or "") for a in parser._actions}
    assert all(
        helps[name].endswith("(default: the mode's recipe)")
        for name in ("outer_lr", "outer_momentum", "nesterov", "eager_own_weight", "eager_smoothing")
    )


@pytest.mark.parametrize(
    ("sync_every", "others_at", "eager_at"),
    [(1, 10, 10), (5, 10, 10), (10, 10, 10), (17, 10, 10), (18, 30, 30), (30, 30, 30), (40, 30, 30), (41, 30, 55),
     (54, 30, 55), (55, 100, 55), (74, 100, 55), (75, 100, 100), (100, 100, 100), (300, 100, 100)],
)  # fmt: skip
def test_recipes_follow_the_measured_h_nearest_the_run(sync_every, others_at, eager_at):
    """BENCHMARKS.md 8, "The outer lr tuned at each H", "Every mode at H = 10", "M = 4 at H = 100", "Overlap and
    delayed at H = 100" and "Eager between H = 30 and 100": every mode wants a smaller outer lr at H = 10 (sync and
    eager 0.7, overlap 0.7, delayed 0.5, where the H = 30 recipes have 1, 0.85, 1 and 0.7), the paper's rule excepted
    (lr 1 at both); at H = 100 sync keeps lr 1 and eager is better without smoothing (w = 0.875, lr 0.85), overlap
    keeps lr 1 and delayed takes 0.5; at H = 55, measured for eager only, eager keeps the smoothed recipe of H = 30.
    Each mode takes the recipe of the H nearest the run's on a log scale among the H it was measured at
    (sqrt(10 x 30) = 17.3: H <= 17 the H = 10 ones; sqrt(30 x 100) = 54.8: H >= 55 the H = 100 ones; eager also
    sqrt(30 x 55) = 40.6 and sqrt(55 x 100) = 74.2: H = 41 to 74 the H = 55 one); a flag still sets one field and
    leaves the others to the recipe."""
    assert RECIPE_SYNC_EVERY == TrainConfig().outer.sync_every == 30 and RECIPES_AT_H[30] is OUTER_RECIPES
    assert {m: (*r[:3], r.own_weight, r.smoothing) for m, r in RECIPES_AT_H[10].items()} == {
        "sync": (0.7, 0.5, True, None, 0.0), "eager": (0.7, 0.5, True, 0.875, 0.5),
        "overlap": (0.7, 0.9, True, None, 0.0), "delayed": (0.5, 0.0, True, None, 0.0),
    }  # fmt: skip
    assert {m: (*r[:3], r.own_weight, r.smoothing) for m, r in RECIPES_AT_H[55].items()} == {
        "eager": (0.85, 0.5, True, 0.875, 0.5),
    }  # fmt: skip
    assert {m: (*r[:3], r.own_weight, r.smoothing) for m, r in RECIPES_AT_H[100].items()} == {
        "sync": (1.0, 0.5, True, None, 0.0), "eager": (0.85, 0.5, True, 0.875, 0.0),
        "overlap": (1.0, 0.9, True, None, 0.0), "delayed": (0.5, 0.0, True, None, 0.0),
    }  # fmt: skip
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    h = ["--sync-every", str(sync_every), "--overlap-steps", "0"]  # τ = 0 < H for overlap at H = 1
    for mode in ("sync", "eager", "overlap", "delayed"):
        config = from_args(parser.parse_args(["--mode", mode, *h]))
        at = eager_at if mode == "eager" else others_at
        recipe = RECIPES_AT_H[at][mode]
        assert config.outer.recipe(2) == recipe
        assert (config.outer.outer_lr, config.outer.outer_momentum, config.outer.nesterov) == recipe[:3]
        assert (config.outer.eager_own_weight, config.outer.eager_smoothing) == (recipe.own_weight, recipe.smoothing)
        source = f"the best at H = {at}" if at != 30 else "the best of the recipe study"
        assert config.outer.recipe_note(2).endswith(f"({mode}'s recipe: {source}, BENCHMARKS.md 8)")
    paper = from_args(parser.parse_args(["--eager-own-weight", "1/M", *h]))
    assert (paper.outer.outer_lr, paper.outer.outer_momentum) == EAGER_PAPER_RECIPE[:2] == (1.0, 0.0)
    assert paper.outer.diloco().eager_smoothing == 0.0
    one = from_args(parser.parse_args(["--mode", "sync", "--outer-momentum", "0.9", *h]))
    assert (one.outer.outer_lr, one.outer.outer_momentum) == (0.7 if others_at == 10 else 1.0, 0.9)
    assert one.outer.recipe_note(2).endswith("(set by the run)")
    weight = from_args(parser.parse_args(["--eager-own-weight", "0.875", *h]))  # one field set, the rest the recipe's
    lr_smoothing = {10: (0.7, 0.5), 30: (0.85, 0.5), 55: (0.85, 0.5), 100: (0.85, 0.0)}[eager_at]
    assert (weight.outer.outer_lr, weight.outer.eager_smoothing) == lr_smoothing


PAPER = "1/M (the eager paper's rule)"


@pytest.mark.parametrize(
    ("flags", "weight", "lr_momentum", "own"),
    [
        ([], 0.875, (0.85, 0.5), "w = 0.875, smoothing β = 0.5"),  # eager's recipe at M = 2
        (["--workers", "4"], 0.875, (0.85, 0.5), "w = 0.875, smoothing β = 0.5"),  # and at M = 4 (better at both)
        (["--workers", "1"], None, (0.85, 0.5), PAPER),  # M = 1: eager is sync, w = 1/M = 1; eager's lr, momentum
        (["--eager-own-weight", "0.5"], 0.5, (1.0, 0.0), "w = 0.5"),  # the paper's rule at M = 2, and its recipe
        (["--workers", "4", "--eager-own-weight", "1"], 1.0, (0.85, 0.5), "w = 1, smoothing β = 0.5"),
        (["--fault-tolerance", "127.0.0.1:1"], 0.875, (0.85, 0.5), "w = 0.875, smoothing β = 0.5"),  # max(w, 1/M_Q)
        (["--eager-smoothing", "0"], 0.875, (0.85, 0.5), "w = 0.875"),  # the own weight without smoothing (4.1)
        (["--eager-own-weight", "0.75"], 0.75, (0.85, 0.5), "w = 0.75, smoothing β = 0.5"),  # the recipe's β
        (["--eager-own-weight", "1/M"], "1/M", (1.0, 0.0), PAPER),  # the paper's rule spelled at any M
        (["--workers", "3", "--eager-own-weight", "1/M"], "1/M", (1.0, 0.0), PAPER),
        (["--fault-tolerance", "127.0.0.1:1", "--eager-own-weight", "1/M"], "1/M", (1.0, 0.0), PAPER),
    ],
)
def test_eager_own_weight_recipe(flags, weight, lr_momentum, own):
    """Issue 11: eager's CLI default weighs a worker's own fresh outer gradient w = 0.875 (ALGORITHMS.md 4.1) where
    M >= 2 (fault tolerance too: each quorum takes max(w, 1/M_Q)); with one worker the field stays unset and the
    engine uses 1/M; "1/M" is the paper's rule at any M (the library's None). The outer lr and momentum follow: the
    own weight's recipe above 1/M, the paper's rule's recipe at 1/M; so does smoothing (ALGORITHMS.md 4.4): β = 0.5
    with an own weight above 1/M, none with the paper's rule or one worker."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = from_args(parser.parse_args(flags))
    assert config.outer.eager_own_weight == weight
    assert config.outer.diloco().eager_own_weight == (None if weight == "1/M" else weight)
    assert (config.outer.outer_lr, config.outer.outer_momentum) == lr_momentum
    assert config.outer.diloco().eager_smoothing == (0.5 if "smoothing" in own else 0.0)  # never with 1/M (4.4)
    note = config.outer.recipe_note(config.run.workers)
    assert f", own weight {own} (eager's recipe: " in note, note
    assert TrainConfig.from_dict(config.to_dict()).validate().to_dict() == config.to_dict()


def test_eager_own_weight_bad_values_name_the_rule():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ConfigError, match=r"^outer.eager_own_weight=0.25: below 1/M = 0.5 for run.workers=2; "):
        from_args(parser.parse_args(["--eager-own-weight", "0.25"]))
    with pytest.raises(ConfigError, match=r"^eager_own_weight=0.75: applies to mode 'eager' only"):
        from_args(parser.parse_args(["--mode", "sync", "--eager-own-weight", "0.75"]))
    with pytest.raises(ConfigError, match=r"^outer.eager_own_weight='1/M': applies to mode 'eager' only"):
        from_args(parser.parse_args(["--mode", "sync", "--eager-own-weight", "1/M"]))
    with pytest.raises(SystemExit):  # argparse: "argument --eager-own-weight: 'half': must be a number or '1/M'"
        parser.parse_args(["--eager-own-weight", "half"])
    for bad in ("half", True, [0.5]):
        config = TrainConfig()
        with pytest.raises(ConfigError, match=r"^t.toml: outer.eager_own_weight=.*: must be a number or '1/M'$"):
            apply_overrides(config, {"outer": {"eager_own_weight": bad}}, "t.toml")
    for section, name, bad in (("outer", "eager_own_weight", "half"), ("run", "workers", "2")):
        config = TrainConfig()  # set in code, past apply_overrides: validate checks types before the recipe's fill
        setattr(getattr(config, section), name, bad)
        with pytest.raises(ConfigError, match=rf"^config: {section}.{name}='{bad}': "):
            config.validate()
    config = TrainConfig()
    apply_overrides(config, {"outer": {"eager_own_weight": 1}}, "t.toml")  # a TOML integer is a number
    assert config.validate().outer.eager_own_weight == 1.0 and isinstance(config.outer.eager_own_weight, float)


def test_quickstart_example_runs(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--steps", "60", "--sync-every", "10"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    lines = sorted(line for line in out.splitlines() if line.startswith("worker"))
    assert len(lines) == 2 and all("compute utilization" in line for line in lines)
    # after consolidate both workers evaluate the same model
    assert lines[0].split("eval mse")[1].split(",")[0] == lines[1].split("eval mse")[1].split(",")[0]


def test_one_byte_formatter_for_train_and_simulate():
    from eagerloco.units import format_bytes

    assert format_bytes(3_281_408) == "3.3 MB"  # train's summary
    assert format_bytes(3_281_408, ".3g") == "3.28 MB"  # simulate's tables
    assert (format_bytes(999), format_bytes(1000), format_bytes(2.5e15)) == ("999.0 B", "1.0 KB", "2.5 PB")


# ------------------------------------------------------------------------------------------------ issue 13
def refused(capsys, argv: list[str]) -> tuple[int, str]:
    """Run the CLI expecting a refusal: (exit code, the message), the message one line."""
    with pytest.raises(SystemExit) as info:
        cli(argv)
    code = info.value.code
    err = capsys.readouterr().err.strip().splitlines()[-1]  # argparse: the usage, then one line; ours: one line
    assert err.startswith("eagerloco train: error: "), err
    if isinstance(info.value, TrainError):  # the one-line errors of eagerloco train: the line is also str(exc)
        assert str(info.value) == err and "\n" not in err
    return code, err


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--compression", "int4"], r"argument --compression: invalid choice: 'int4'"),
        (["--compression", "fp3"], r"argument --compression: invalid choice: 'fp3'"),
        (["--tokenizer", "bpee"], r"argument --tokenizer: invalid choice: 'bpee'"),
        (
            ["--steps", "10", "--sync-every", "30"],
            r"run.steps=10: the run would end before its first sync point "
            r"\(inner step 30, H=30 / P=1\) and never take an outer step",
        ),
        (["--steps", "1", "--sync-every", "4", "--num-fragments", "2"], r"sync point \(inner step 2, H=4 / P=2\)"),
        (["--steps", "2", "--sync-every", "4", "--num-fragments", "2"], None),  # the control: fragment 1 syncs at 2
        (["--device", "gpu"], r"run.device='gpu': not a device"),
        (["--device", "cuda"], r"run.device='cuda': this torch \(.*\) sees no CUDA device; use --device cpu"),
        (["--tensorboard"], r"run.tensorboard=True needs the tensorboard package: pip install tensorboard"),
        (["--resume", "--overwrite"], r"continue the run in out_dir or replace it, not both"),
    ],
    ids=[
        "int4",
        "fp3",
        "tokenizer",
        "no-outer-step",
        "streaming-no-outer-step",
        "streaming-ok",
        "device",
        "cuda",
        "tensorboard",
        "resume+overwrite",
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing_behind(tmp_path, monkeypatch, capsys, flags, message):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "tensorboard" else real_find_spec(n))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine, also where a GPU is present
    monkeypatch.chdir(tmp_path)  # a default run directory would land here
    argv = ["train", "--config", SMOKE, "--threads", "1", "--no-progress", *flags]
    if message is None:  # the schedule that trains
        assert cli([*argv, "--out-dir", "ok", "--eval-every", "0"]) == 0
        assert json.loads((tmp_path / "ok" / "summary.json").read_text())["outer_steps"] == 1
        return
    code, text = refused(capsys, [*argv, "--out-dir", "bad"])
    assert code == EXIT_USAGE and re.search(message, text), text
    assert list(tmp_path.iterdir()) == []  # no run directory, no file, no cache
    code, text = refused(capsys, argv)  # the same without --out-dir: no runs/ either
    assert code == EXIT_USAGE and list(tmp_path.iterdir()) == []


def test_a_toml_codec_name_is_checked_too(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[outer]\ncompression = "int4"\n')
    with pytest.raises(SystemExit, match=r"outer.compression='int4': must be one of 'none', 'bf16', 'fp16', 'fp8', "
                                         r"'int8', 'fp4'$"):  # fmt: skip
        cli(["train", "--config", str(bad), "--out-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_the_codec_choices_are_the_codec_registry():
    from typing import get_args

    from eagerloco.compression.codecs import CODECS
    from eagerloco.lm.config import Codec

    assert set(get_args(Codec)) == {"none", *CODECS}


def test_a_rerun_is_refused_without_overwrite_and_the_old_run_stays_intact(tmp_path):
    run_dir = tmp_path / "run"
    train(tmp_path, "run", "--steps", "10", "--eval-every", "0", "--no-progress")

    def snapshot() -> dict[str, bytes]:
        return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}

    before = snapshot()
    argv = ["train", "--config", SMOKE, "--out-dir", str(run_dir), "--threads", "1", "--mode", "sync"]
    with pytest.raises(SystemExit) as info:
        cli(argv)
    assert info.value.code == EXIT_USAGE
    assert str(info.value) == (
        f"eagerloco train: error: RunDirectoryError: run directory {run_dir} already holds a run (config.json, "
        "metrics.jsonl, summary.json, model.pt, checkpoints): pass --overwrite to replace it, --resume to continue "
        "it, or choose another --out-dir"
    )
    assert snapshot() == before
    summary = train(tmp_path, "run", "--mode", "sync", "--steps", "10", "--eval-every", "0", "--overwrite")
    assert summary["mode"] == "sync"
    assert [r["step"] for r in records(run_dir, "inner")] == list(range(1, 11))  # the old run's lines are gone
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000000010"]


def test_the_default_run_directory_is_named_after_the_run(tmp_path):
    from eagerloco.launch import default_run_dir

    root = tmp_path / "runs"
    config = TrainConfig()
    assert default_run_dir(config, root) == root / "eager"
    (root / "eager").mkdir(parents=True)
    assert default_run_dir(config, root) == root / "eager-2"
    for name in ("eager-7", "eager-x", "eagerly-9", "sync-12"):
        (root / name).mkdir()
    assert default_run_dir(config, root) == root / "eager-8"
    config.run.resume = True  # continue the newest
    assert default_run_dir(config, root) == root / "eager-7"
    config.outer.mode = "dp"
    assert default_run_dir(config, root) == root / "dp"


def test_a_plain_run_names_its_directory_and_prints_the_next_commands(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--config", SMOKE, "--out-dir", "", "--threads", "1", "--steps", "5", "--eval-every", "0",
            "--no-progress"]  # fmt: skip
    for expected in ("eager", "eager-2"):
        assert cli(argv) == 0
        out = capsys.readouterr().out
        assert json.loads((tmp_path / "runs" / expected / "summary.json").read_text())["mode"] == "eager"
        assert f"run directory: runs/{expected}; next:\n  eagerloco plot runs/{expected} " in out
        assert f"\n  eagerloco eval runs/{expected} " in out and f"\n  eagerloco sample runs/{expected} " in out
    assert json.loads((tmp_path / "runs" / "eager-2" / "config.json").read_text())["run"]["out_dir"] == "runs/eager-2"


def test_exit_status_bad_input_2_failure_while_running_1(tmp_path, monkeypatch, capsys):
    """eagerloco.cli.main's convention: bad input (a missing config file, a corpus that is not there) exits 2
    before anything is written; a failure while the run runs exits 1; both print one line."""
    monkeypatch.chdir(tmp_path)
    for argv, pattern in [
        (["--config", "missing.toml"], r"ConfigError: config file 'missing.toml' does not exist"),
        (["--corpus", "no-such-corpus"], r"CorpusError: .*no-such-corpus"),
    ]:
        code, text = refused(capsys, ["train", "--config", SMOKE, *argv])
        assert code == EXIT_USAGE and re.search(pattern, text), text
        assert list(tmp_path.iterdir()) == []
    import eagerloco.launch
    from eagerloco.engine.errors import NonFiniteOuterGradient

    def failing(config):
        raise RuntimeError("worker 1 failed") from NonFiniteOuterGradient("outer step 3: non-finite outer gradient")

    monkeypatch.setattr(eagerloco.launch, "run", failing)
    code, text = refused(capsys, ["train", "--config", SMOKE])
    assert code == 1
    assert text == "eagerloco train: error: NonFiniteOuterGradient: outer step 3: non-finite outer gradient"


def test_data_preparation_says_what_it_does_and_what_it_reuses(tmp_path):
    """One line per slow stage (reading, BPE training, tokenising) and per cache reused, then the summary."""
    from eagerloco.lm.corpora import load_corpus, split_corpus
    from eagerloco.lm.data import prepare_data

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text(f"to be or not to be, that is question {i}\n" * 50)
    chars = sum(len(p.read_text()) for p in corpus.iterdir())
    cache = tmp_path / "cache"
    lines: list[str] = []
    data = prepare_data(f"path:{corpus}", tokenizer="bpe", vocab_size=300, cache_dir=cache, log=lines.append)
    [bpe] = cache.glob("bpe-*.json")
    [tokens] = cache.glob("tokens-*.npz")
    train_docs, _ = split_corpus(load_corpus(f"path:{corpus}"), data.val_fraction)
    assert lines[:3] == [
        f"data: reading corpus path:{corpus} ...",
        f"data: corpus path:{corpus}: 3 documents, {chars:,} characters",
        f"tokenizer: training a byte-level BPE (vocab 300) on {sum(len(d.text) for d in train_docs):,} characters "
        "of the training split ...",
    ]
    assert re.fullmatch(rf"tokenizer: BPE trained in \d+\.\d s, cached as {re.escape(str(bpe))}", lines[3])
    assert lines[4] == f"data: tokenising {chars:,} characters with the BPE ..."
    assert re.fullmatch(rf"data: ready in \d+\.\d s: {re.escape(data.summary())}", lines[5]) and len(lines) == 6
    lines.clear()
    again = prepare_data(f"path:{corpus}", tokenizer="bpe", vocab_size=300, cache_dir=cache, log=lines.append)
    assert lines[2:4] == [f"tokenizer: BPE (vocab 300) reused from the cache {bpe}",
                          f"data: token arrays reused from the cache {tokens}"]  # fmt: skip
    assert len(lines) == 5 and again.summary() == data.summary()
    lines.clear()
    prepare_data(f"path:{corpus}", log=lines.append)  # bytes: nothing to train, nothing to tokenise slowly
    assert [line.split(":")[0] for line in lines] == ["data", "data", "data"]


def test_eval_losses_are_printed_as_they_happen(tmp_path, capsys):
    """Worker 0 prints one line per evaluation (not per inner step), the values of metrics.jsonl; --no-progress
    keeps the run quiet but for the final table."""
    train(tmp_path, "run", "--progress", "--steps", "20", "--eval-every", "5")
    err = capsys.readouterr().err
    printed = re.findall(r"step (\d+)/20: eval loss (\d+\.\d{4}) \(outer parameters\), ([\d,]+) tokens", err)
    logged = records(tmp_path / "run", "eval")
    assert printed == [(str(r["step"]), f"{r['eval_loss']:.4f}", f"{r['tokens']:,}") for r in logged]
    assert [r["step"] for r in logged] == [5, 10, 15, 20]
    assert "data: ready in " in err
    train(tmp_path, "quiet", "--no-progress", "--steps", "20", "--eval-every", "5")
    assert capsys.readouterr().err == ""


def test_resume_of_a_finished_run_needs_more_steps(tmp_path, capsys):
    """`eagerloco train --resume` on a run that ended: one line (exit 2, nothing touched) unless --steps asks for
    more, which continues it."""
    run_dir = tmp_path / "run"
    train(tmp_path, "run", "--steps", "10", "--eval-every", "0", "--no-progress")
    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    argv = ["train", "--config", SMOKE, "--out-dir", str(run_dir), "--threads", "1", "--steps", "10", "--resume"]
    code, text = refused(capsys, argv)
    assert code == EXIT_USAGE and text == (
        f"eagerloco train: error: ResumeError: --resume: the run in {run_dir} is complete (checkpoint at inner step "
        "10, run.steps=10); pass --steps N with N > 10 to train it further"
    )
    assert {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()} == before
    summary = train(tmp_path, "run", "--steps", "15", "--eval-every", "0", "--no-progress", "--resume")
    assert summary["tokens"] == 15 * 4 * 32 * 2
    assert [r["step"] for r in records(run_dir, "inner")] == list(range(1, 16))


def test_torchrun_with_another_number_of_ranks_is_bad_input(tmp_path, monkeypatch, capsys):
    """Every rank refuses before the process group starts: one line (rank-prefixed), exit 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    code, text = refused(capsys, ["train", "--config", SMOKE, "--launch", "torchrun", "--out-dir", "run"])
    assert code == EXIT_USAGE
    assert (
        text
        == "eagerloco train: error: [rank 1] ConfigError: torchrun started 3 ranks, run.workers=2: pass --workers 3"
    )
    assert list(tmp_path.iterdir()) == []


def test_the_process_launcher_exits_2_when_every_worker_refused_its_input(tmp_path, monkeypatch):
    """A value only the workers check (the parent checks config, data and resume first): each worker prints its
    one-line error and exits 2; the launcher then exits 2 too (bad input), not 1."""
    from eagerloco import launch

    class Refusing:  # a worker process that refused its input
        def __init__(self, cmd: list[str], env: dict[str, str]) -> None:
            assert cmd[-2] == "--resolved-config"

        def wait(self) -> int:
            return 2

        def poll(self) -> int:
            return 2

    monkeypatch.setattr(launch.subprocess, "Popen", Refusing)
    config = TrainConfig()
    apply_overrides(config, load_toml(SMOKE), SMOKE)
    apply_overrides(config, {"run": {"workers": 2, "launch": "processes", "out_dir": str(tmp_path / "run")}}, "test")
    with pytest.raises(SystemExit) as info:
        launch.run_processes(config.validate())
    assert info.value.code == 2


@pytest.mark.parametrize(
    ("key", "on", "off", "where"),
    [("eager_lookahead", True, False, r"4.2: .* commit c512a86"), ("eager_swap_steps", 14, None, r"4.3: .* dd1063f")],
)
def test_saved_config_of_a_removed_option_loads_when_it_was_off(key, on, off, where):
    """config.json of runs written while eager_lookahead or eager_swap_steps existed (off) still loads (eval,
    sample); on: refused, naming the section and the commit that has it."""
    saved = TrainConfig().validate().to_dict()
    saved["outer"][key] = off
    assert TrainConfig.from_dict(saved).to_dict() == TrainConfig().validate().to_dict()
    saved["outer"][key] = on
    with pytest.raises(ConfigError, match=rf"^outer.{key}={on!r}: this run used an option that was removed .*{where}$"):
        TrainConfig.from_dict(saved)


@pytest.mark.parametrize("name", configs.names())
def test_shipped_configs_agree_with_the_recipes(name):
    """A shipped experiment that spells out its outer optimizer spells out its mode's recipe (one source of truth
    for the numbers BENCHMARKS.md 8 measured)."""
    config = TrainConfig()
    apply_overrides(config, load_toml(configs.path(name)), f"{name}.toml")
    config.validate()
    if config.outer.mode != "dp":
        recipe = config.outer.recipe(config.run.workers)
        assert (config.outer.outer_lr, config.outer.outer_momentum, config.outer.nesterov) == recipe[:3]
        assert config.outer.eager_own_weight == OUTER_RECIPES[config.outer.mode].own_weight
