"""docs/own-images.md stays true: its CPU commands run as written (on the 48 embedded frames, a few
steps each), from a folder, a text file of paths and tar shards."""

from __future__ import annotations

import io
import shlex
import tarfile

from conftest import REPO
from dreamteacher.cli import main

PAGE = REPO / "docs" / "own-images.md"
SHORT = {"train-teacher": ["--set", "teacher_train.max_steps=2"], "pretrain": ["--set", "optim.max_steps=2"],
         "plan": ["--set", "teacher_train.max_steps=2", "--timed-steps", "1"]}


def cpu_commands() -> list[list[str]]:
    text = PAGE.read_text()
    block = text[text.index("<!-- own-images-cpu -->"):].split("```bash", 1)[1].split("```", 1)[0]
    return [shlex.split(line)[1:] for line in block.strip().splitlines() if line.startswith("dreamteacher ")]


def test_the_own_images_cpu_commands_run(tmp_path, capsys):
    frames = sorted((REPO / "examples" / "camvid48").glob("*.png"))
    (tmp_path / "mine.txt").write_text("".join(f"{f}\n" for f in frames))
    (tmp_path / "shards").mkdir()
    for s in range(3):
        with tarfile.open(tmp_path / "shards" / f"{s:06d}.tar", "w") as tar:
            for frame in frames[s * 16:(s + 1) * 16]:
                data = frame.read_bytes()
                info = tarfile.TarInfo(frame.name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    commands = cpu_commands()
    assert [c[0] for c in commands] == ["plan", "train-teacher", "pretrain", "pretrain", "pretrain"]
    for args in commands:
        args = [a.replace("runs/own", str(tmp_path)).replace("examples/", str(REPO / "examples") + "/") for a in args]
        assert main(args + SHORT.get(args[0], []) + ["--no-progress"]) == 0, args
    for run in ("student", "from-list", "from-shards"):
        assert (tmp_path / run / "backbone.safetensors").is_file()
    assert (tmp_path / "plan.json").is_file() and "plan: 48 images (0 skipped)" in capsys.readouterr().out
