"""Installs respect the user's environment: pyproject.toml declares ranges (an environment that already
has a suitable torch keeps it), and constraints.txt pins the exact set `make test` and CI install."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib

from conftest import REPO


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_dependencies_are_ranges_and_the_constraints_pin_each_of_them():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    assert not [r for r in requirements if "==" in r], "pyproject.toml pins exactly; pins belong in constraints.txt"
    pins = {requirement_name(line): line.split("==")[1] for line in (REPO / "constraints.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    missing = {requirement_name(r) for r in requirements} - set(pins)
    assert not missing, f"constraints.txt pins no version of {sorted(missing)}"
    assert "-c constraints.txt" in (REPO / "Makefile").read_text()


def test_installing_into_an_environment_with_a_suitable_torch_keeps_it(tmp_path):
    """pip's own resolution (a dry run, no index: nothing downloaded) of `pip install -e .` in this
    environment, whose torch satisfies the range: only dreamteacher itself would be installed."""
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation",
                             "--quiet", "--report", str(report), "-e", str(REPO)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    installed = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert installed == ["dreamteacher"]  # torch, torchvision and the rest: the environment's own, kept
