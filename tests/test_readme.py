"""The README's commands, in order, as a new user runs them: each exactly as written in README.md (this test checks
that it is there), plus flags that shrink the model and the run, through the installed ``eagerloco`` entry point in
an empty directory. Each is checked for its exit status, the files it promises and its key lines; then the commands
that the end of a run prints are run as printed."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

# Smaller sizes, same commands: flags appended to a README command override its own (argparse: the last one wins).
TINY = ["--n-layer", "2", "--n-head", "2", "--d-model", "32", "--seq-len", "32", "--batch-size", "4",
        "--eval-batch-size", "4", "--eval-batches", "2", "--warmup-steps", "5", "--sync-every", "5", "--steps", "20",
        "--eval-every", "10", "--threads", "1"]  # fmt: skip
TOKENS = 4 * 32 * 2  # per inner step, both workers


def entry_point() -> list[str]:
    """The installed ``eagerloco`` script next to this Python (``python -m eagerloco`` where there is none)."""
    script = Path(sys.executable).parent / "eagerloco"
    return [str(script)] if script.exists() else [sys.executable, "-m", "eagerloco"]


def run(cwd: Path, command: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run README ``command`` (asserted to be in README.md verbatim) with ``extra`` flags; expect exit 0."""
    assert command in README, f"not in README.md: {command}"
    argv = shlex.split(command)
    assert argv[0] in ("eagerloco", ".venv/bin/eagerloco"), argv
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg", EAGERLOCO_CACHE_DIR=str(cwd / ".cache"))
    proc = subprocess.run([*entry_point(), *argv[1:], *extra], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, f"{command}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_the_readme_commands_work_as_written_in_order(tmp_path):
    # The first command of the README (after the setup): the main job, named after its mode.
    proc = run(tmp_path, ".venv/bin/eagerloco train", *TINY)
    eager = tmp_path / "runs" / "eager"
    assert sorted(p.name for p in eager.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl", "model.pt",
                                                        "summary.json"]  # fmt: skip
    result = summary(eager)
    assert (result["mode"], result["workers"], result["tokens"], result["link_mbit"]) == ("eager", 2, 20 * TOKENS, 20)
    lines = proc.stdout.splitlines()
    assert "eagerloco train: eager (H=5, k=1, P=1), 2 workers (simulated), emulated 20 Mbit/s, " in proc.stdout
    assert f"  eval loss of the outer parameters  {result['eval_loss']:.4f}" in lines
    assert "run directory: runs/eager; next:" in lines
    next_commands = [line.split("  #")[0].strip() for line in lines[lines.index("run directory: runs/eager; next:") :]]
    assert next_commands[1:] == [
        "eagerloco plot runs/eager",
        "eagerloco eval runs/eager",
        "eagerloco sample runs/eager",
    ]
    # Progress on stderr while the user waits: the data, then one line per evaluation.
    assert re.search(r"^data: corpus shakespeare: 42 documents, [\d,]+ characters$", proc.stderr, re.M)
    evals = [r for r in map(json.loads, (eager / "metrics.jsonl").read_text().splitlines()) if r["type"] == "eval"]
    printed = re.findall(r"^step (\d+)/20: eval loss (\d+\.\d+) ", proc.stderr, re.M)
    assert printed == [(str(r["step"]), f"{r['eval_loss']:.4f}") for r in evals if r["worker"] == 0]

    # The next sentence of the README: blocking DiLoCo on the same link.
    run(tmp_path, "eagerloco train --mode sync --out-dir runs/sync", *TINY)
    sync = summary(tmp_path / "runs" / "sync")
    assert (sync["mode"], sync["tokens"], sync["link_mbit"]) == ("sync", 20 * TOKENS, 20)

    # The training CLI block, in order.
    proc = run(tmp_path, "eagerloco plot runs/eager runs/sync -o compare.png")
    assert proc.stdout == "plot written to compare.png\n"
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    proc = run(tmp_path, "eagerloco eval runs/eager")
    assert proc.stdout.startswith("eagerloco eval: runs/eager/model.pt (eager k=1 w=0.875 β=0.5 H=5, step 20)")
    assert f"the run measured {result['eval_loss']:.4f} on the same windows (identical)" in proc.stdout

    proc = run(tmp_path, 'eagerloco sample runs/eager --prompt "ROMEO:"')
    assert proc.stdout.startswith("ROMEO:") and len(proc.stdout) > len("ROMEO:\n")

    proc = run(tmp_path, "eagerloco simulate --from-run runs/eager")
    assert "link: the run's, 20 Mbit/s (config.json run.link_mbit)" in proc.stdout
    [row] = [line.split() for line in proc.stdout.splitlines() if line.startswith("eager ")]
    assert row[-2] == f"{result['utilization']:.1%}"  # the measured CU next to the predicted one

    # streaming with τ measured at the start (H = 6 here: P = 2 must divide it); a 33k-parameter model at 20 Mbit/s
    proc = run(tmp_path, "eagerloco train --mode overlap --num-fragments 2 --overlap-steps auto", *TINY,
               "--sync-every", "6")  # fmt: skip
    auto = summary(tmp_path / "runs" / "overlap")["overlap_auto"]
    assert 1 <= auto["overlap_steps"] <= 5 and auto["probe_bytes"] == 4 * result["params"]
    assert f"overlap (H=6, τ={auto['overlap_steps']} (auto), α=0.5, P=2)" in proc.stdout
    assert "overlap sized to the link" in proc.stdout

    run(tmp_path, "eagerloco train --resume --out-dir runs/eager --steps 1200", *TINY, "--steps", "30")
    resumed = summary(eager)
    assert (resumed["mode"], resumed["tokens"]) == ("eager", 30 * TOKENS)
    inner = [r for r in map(json.loads, (eager / "metrics.jsonl").read_text().splitlines()) if r["type"] == "inner"]
    assert [r["step"] for r in inner if r["worker"] == 0] == list(range(1, 31))

    # The commands the first run printed, as printed.
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    outputs = [subprocess.run([*entry_point(), *shlex.split(c)[1:]], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600) for c in next_commands[1:]]  # fmt: skip
    assert [o.returncode for o in outputs] == [0, 0, 0], [o.stderr for o in outputs]
    assert outputs[0].stdout == "plot written to runs/eager/plot.png\n"
    assert (eager / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert outputs[1].stdout.startswith("eagerloco eval: runs/eager/model.pt (eager k=1 w=0.875 β=0.5 H=5, step 30)")
    assert outputs[2].stdout.strip()
