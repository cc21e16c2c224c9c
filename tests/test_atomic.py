"""Replacing a teacher or a feature cache is atomic: the old folder stays until the new one is in
place, so a process killed (SIGKILL) at any step of the replacement leaves one of the two, whole, and
the next use or save carries on."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest

from dreamteacher.core import runs


def replace_in_a_child(new: Path, target: Path, kill_at: int, exchange: bool) -> tuple[int, list[str]]:
    """`runs.replace_folder` in a forked process that SIGKILLs itself just before its `kill_at`-th
    file system step (0: never); (how it ended, the steps it took)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: count the steps, die at one
        os.close(read)
        steps: list[str] = []

        def step(name, real):
            def wrapped(*args, **kwargs):
                steps.append(name)
                if len(steps) == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real(*args, **kwargs)
            return wrapped

        runs._exchange = step("exchange", runs._exchange if exchange else (lambda a, b: False))
        runs.os.replace = step("rename", os.replace)
        runs.shutil.rmtree = step("delete", shutil.rmtree)
        runs.replace_folder(new, target)
        os.write(write, " ".join(steps).encode())
        os._exit(0)
    os.close(write)
    taken = os.read(read, 1000).decode().split()
    os.close(read)
    _, status = os.waitpid(pid, 0)
    return status, taken


def folder(path: Path, content: str) -> Path:
    path.mkdir(parents=True)
    for i in range(3):
        (path / f"part{i}.bin").write_text(f"{content} {i}")
    return path


def content(path: Path) -> str:
    texts = {p.read_text().split()[0] for p in path.glob("part*.bin")}
    assert len(texts) == 1 and len(list(path.glob("part*.bin"))) == 3, f"a mix in {path}: {texts}"
    return texts.pop()


@pytest.mark.parametrize("exchange", [True, False], ids=["one atomic exchange", "two renames"])
def test_a_kill_at_any_step_of_a_replacement_leaves_the_old_folder_or_the_new_one(tmp_path, exchange):
    target, new = folder(tmp_path / "x", "old"), folder(tmp_path / "x.partial", "new")
    status, steps = replace_in_a_child(new, target, 0, exchange)  # runs through: lists its steps
    assert status == 0 and content(target) == "new" and not new.exists()
    # exchange + delete; or the exchange the file system refuses, rename old away, rename new in, delete
    assert steps == (["exchange", "delete"] if exchange else ["exchange", "rename", "rename", "delete"])
    for kill_at in range(1, len(steps) + 1):
        root = tmp_path / f"kill{kill_at}"
        target = folder(root / "teacher", "old")
        new = folder(root / "teacher.partial", "new")
        status, _ = replace_in_a_child(new, target, kill_at, exchange)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        on_disk = [content(p) for p in (target, runs.old_folder(target)) if p.exists()]
        assert on_disk, f"killed at step {kill_at}: neither folder is left"
        runs.recover_folder(target)  # what the next start, load or save does first
        assert content(target) in ("old", "new"), f"killed at step {kill_at}"
        runs.replace_folder(folder(root / "again", "third"), target)  # the next replacement goes through
        assert content(target) == "third" and not runs.old_folder(target).exists()


def test_a_replacement_into_an_empty_place_is_one_rename(tmp_path):
    new = folder(tmp_path / "a.partial", "new")
    assert content(runs.replace_folder(new, tmp_path / "a")) == "new" and not new.exists()
