"""What a user installs: the extras in pyproject.toml and what scripts/setup.sh and CI install from them."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_the_core_needs_torch_only_and_dev_is_every_extra_plus_lint():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == ["torch>=2.4"]
    groups = extras()
    assert sorted(groups) == ["dev", "ft", "hf", "lm", "test"]
    [recursive] = [r for r in groups["dev"] if r.startswith("eagerloco[")]
    included = set(re.fullmatch(r"eagerloco\[(.*)\]", recursive).group(1).split(","))
    assert included == set(groups) - {"dev"}  # CI (the dev extra) runs the tests of every optional integration
    assert any(r.startswith("ruff") for r in groups["dev"])
    assert any(r.startswith("pytest") for r in groups["test"])
    for name, requirements in groups.items():  # no extra pulls torch again (it could replace the CPU build)
        assert not any(re.match(r"torch\b(?!ft)", r) for r in requirements), name


def test_setup_installs_lm_and_test_and_ci_asks_for_dev():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert 'EXTRAS="lm,test"' in setup and '--dev) EXTRAS="dev"' in setup
    assert 'install -e ".[$EXTRAS]"' in setup
    assert "bash scripts/setup.sh --dev" in (ROOT / ".ci" / "run").read_text()
