"""`dreamteacher plan`: images, steps, batch split, FLOPs, memory and time per stage from a few real
steps on this machine, the cache against the free disk; a plan that cannot fit is one line."""

from __future__ import annotations

import json
import re

import pytest

from conftest import TINY_PRESET, write_images
from dreamteacher.cli import main


@pytest.fixture
def images(tmp_path):
    folder = write_images(tmp_path / "images", count=12)
    (folder / "README.txt").write_text("where these came from")
    return folder


def test_plan_measures_every_stage_and_writes_json(images, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--data", str(images), "--preset", str(TINY_PRESET), "--out", str(out), "--cache",
                 str(tmp_path / "cache"), "--set", "teacher_train.max_steps=40", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    plan = json.loads(out.read_text())
    assert plan["data"] == {"sources": [str(images)], "images": 12, "skipped": 1, "shards": 0}
    names = [s["name"] for s in plan["stages"]]
    assert names == ["train-teacher --kind ddpm", "feature cache", "--method dt-feat"]
    teacher, cache, student = plan["stages"]
    assert teacher["steps"] == 40 and teacher["global_batch"] == 4 and teacher["micro_batch"] == 4
    assert student["steps"] == 2 * (12 // 4) and student["epochs"] == 2.0  # the preset's 2 epochs of batch 4
    for stage in (teacher, student):
        assert stage["seconds_per_micro_step"] > 0 and stage["peak_memory_gib"] > 0 and stage["gflops_per_image"] > 0
        assert stage["precision"] == "32-true" and stage["devices"] == 1
        assert stage["seconds"] == pytest.approx(stage["steps"] * stage["accumulate"] * stage["seconds_per_micro_step"],
                                                 abs=0.1)
    assert plan["cache"]["fits"] and plan["cache"]["bytes"] > 0 and plan["cache"]["encodings"] == 4
    assert "encode online" in plan["cache"]["advice"]  # 2 epochs: fewer passes than cached encodings
    assert re.search(r"plan: 12 images \(1 skipped\); train-teacher --kind ddpm 40 steps", plan["summary"])
    assert plan["summary"] in printed and "feature cache" in printed


def test_a_plan_that_does_not_fit_is_one_line(images, tmp_path, capsys, monkeypatch):
    from dreamteacher.workflows import plan as planning

    args = ["plan", "--data", str(images), "--preset", str(TINY_PRESET), "--method", "spark", "--no-progress"]
    monkeypatch.setattr(planning, "device_memory_gib", lambda device, processes=1: 0.01)
    assert main([*args, "--set", "optim.micro_batch=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(r"a micro-batch of 4 per device needs [\d.]+ GiB, the device has "
                                                    r"0.0 GiB", err), err


def test_a_cache_the_disk_cannot_hold_is_refused_naming_both_figures(images, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    assert main(["plan", "--data", str(images), "--preset", str(TINY_PRESET), "--cache", str(tmp_path / "c"),
                 "--set", "teacher_train.max_steps=40", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(r"the feature cache needs [\d.]+ GiB \(12 images x 4 encodings\) "
                                                    r"and .* has 0.0 GiB free", err), err


@pytest.mark.parametrize("extra,message", [
    (["--set", "gan.r1_gamma=3"], "do not read the 'gan' section"),
    (["--set", "optim.micro_batch=8"], "optim.micro_batch=8 is larger than the global batch optim.batch_size=4"),
])
def test_bad_plan_settings_are_one_line(images, capsys, extra, message):
    assert main(["plan", "--data", str(images), "--preset", str(TINY_PRESET), *extra, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_training_says_its_plan_line_when_it_starts(images, tmp_path, capsys):
    assert main(["train-teacher", "--data", str(images), "--out", str(tmp_path / "t"), "--preset", str(TINY_PRESET),
                 "--no-progress", "--set", "teacher_train.micro_batch=2"]) == 0
    out = capsys.readouterr().out
    assert ("plan: train-teacher --kind ddpm: 12 images (1 skipped); 3 steps (1.0 epochs) of global batch 4 = 2 per "
            "device x 2 accumulated x 1 devices; 32-true") in out
