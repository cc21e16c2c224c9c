"""The README's front door stays true: its quick-start commands run (on the demo preset, a few steps),
and its results table is the one generated from the committed results.json."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from conftest import REPO
from dreamteacher.bench.headline import BLOCK, HEADLINE_BEGIN, HEADLINE_END, headline
from dreamteacher.cli import main

README = REPO / "README.md"
SHORT = {"train-teacher": ["--set", "teacher_train.max_steps=2"], "pretrain": ["--set", "optim.max_steps=2"],
         "viz": ["--num-images", "1", "--num-samples", "1"]}


def quickstart_commands() -> list[list[str]]:
    text = README.read_text()
    block = text[text.index("<!-- quickstart -->"):].split("```bash", 1)[1].split("```", 1)[0]
    return [shlex.split(line)[1:] for line in block.strip().splitlines() if line.startswith("dreamteacher ")]


def test_the_quick_start_commands_run(tmp_path: Path, capsys):
    commands = quickstart_commands()
    assert [c[0] for c in commands] == ["train-teacher", "pretrain", "export", "info", "viz"]
    for args in commands:
        args = [a.replace("runs/demo", str(tmp_path)).replace("examples/", str(REPO / "examples") + "/") for a in args]
        quiet = ["--no-progress"] if args[0] in ("train-teacher", "pretrain") else []
        assert main(args + SHORT.get(args[0], []) + quiet) == 0, args
    assert (tmp_path / "student" / "backbone.safetensors").is_file()
    assert (tmp_path / "student" / "backbone.torchvision.safetensors").is_file()
    assert (tmp_path / "viz" / "index.html").is_file()
    assert "method: dt-feat" in capsys.readouterr().out


def test_the_results_tables_are_generated_from_the_committed_results():
    text = README.read_text()
    blocks = BLOCK.findall(text)
    assert "benchmarks/results/camvid-cpu/results.json" in blocks
    assert "benchmarks/results/idd-lite-cpu/results.json" in blocks
    for name in blocks:
        begin = HEADLINE_BEGIN.format(name)
        start = text.index(begin) + len(begin)
        shown = text[start:text.index(HEADLINE_END, start)].strip()
        assert shown == headline(json.loads((REPO / name).read_text())).strip(), \
            f"README's table of {name} is stale: run `python -m dreamteacher.bench.headline`"
