"""The lab notebook keeps working: every script under benchmarks/ imports what it uses (its module-level
imports run in its own folder, as when it is run; nothing else runs), and every experiment recipe loads."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPTS = sorted((REPO / "benchmarks").rglob("*.py"))
SCRIPTS = [s for s in SCRIPTS if "runs" not in s.relative_to(REPO / "benchmarks").parts]

RUN_IMPORTS = """
import ast, sys
path = sys.argv[1]
tree = ast.parse(open(path).read(), path)
imports = ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])
exec(compile(imports, path, "exec"), {"__name__": "smoke"})
"""


def test_every_benchmark_script_is_found():
    names = {s.name for s in SCRIPTS}
    assert {"unseen_settings.py", "student_epochs.py", "teacher_length.py", "distill_settings.py",
            "short_pipeline_hashes.py", "probe_curves.py"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=[str(s.relative_to(REPO)) for s in SCRIPTS])
def test_a_benchmark_script_compiles_and_its_imports_resolve(script):
    ast.parse(script.read_text(), str(script))  # the whole file compiles
    env_path = [str(script.parent), str(REPO / "tests")]  # its sibling modules; fault_injection uses the tests'
    result = subprocess.run([sys.executable, "-c", f"import sys; sys.path[:0] = {env_path!r}\n{RUN_IMPORTS}",
                             str(script)], capture_output=True, text=True, cwd=script.parent, timeout=300)
    assert result.returncode == 0, result.stderr[-1500:]


@pytest.mark.parametrize("recipe", sorted((REPO / "benchmarks" / "experiments").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_an_experiment_recipe_loads(recipe):
    from dreamteacher.bench.recipes import load_recipe

    spec = load_recipe(recipe)
    assert spec["rows"] and spec["name"]
