"""A second recipe on other data goes through the same harness: JPEG frames, 3 classes, void 255,
pretraining on two folders, one evaluation set named `val`, settings inherited from a base recipe
(`base:`), and bad data refused in one line before any stage runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import TINY
from dreamteacher.bench.recipes import load_recipe
from dreamteacher.bench.runner import bench
from dreamteacher.cli import main
from dreamteacher.core.errors import UserError

FINETUNE = {"data": {"resolution": [32, 32], "num_workers": 0},
            "model": {"backbone": "test_resnet", "decoder_channels": 32},
            "optim": {"name": "adamw", "lr": 1e-3, "batch_size": 2},
            "trainer": {"accelerator": "cpu", "precision": "32-true"}}


def write_frames(root: Path, folder: str, count: int, seed: int, masks: str | None = None) -> list[str]:
    """JPEG frames of two colored squares on a gray road; masks (PNG): 0 road, 1 red, 2 blue, void 255."""
    rng = np.random.default_rng(seed)
    (root / folder).mkdir(parents=True)
    if masks:
        (root / masks).mkdir(parents=True)
    names = []
    for i in range(count):
        img = np.full((36, 48, 3), 100, np.uint8)
        mask = np.zeros((36, 48), np.uint8)
        for cls, color in ((1, (220, 40, 40)), (2, (40, 40, 220))):
            y, x = rng.integers(0, 24), rng.integers(0, 36)
            img[y:y + 12, x:x + 12], mask[y:y + 12, x:x + 12] = color, cls
        mask[:2] = 255
        name = f"{folder}_{i:02d}.jpg"
        Image.fromarray(img).save(root / folder / name, quality=92)
        if masks:
            Image.fromarray(mask).save(root / masks / name.replace(".jpg", ".png"))
        names.append(name)
    return names


@pytest.fixture
def second(tmp_path: Path) -> Path:
    """A second dataset laid out like IDD-Lite, and its recipe deriving from a first one."""
    root = tmp_path / "data"
    train = write_frames(root, "train", 8, 0, masks="trainannot")
    write_frames(root, "unlabeled", 4, 1)
    write_frames(root, "val", 3, 2, masks="valannot")
    (root / "splits").mkdir()
    (root / "splits" / "few.txt").write_text("\n".join(train[:2]))
    (root / "splits" / "all.txt").write_text("\n".join(train))
    pretrain: dict = {}
    for item in TINY:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        pretrain.setdefault(section, {})[name] = yaml.safe_load(value)
    first = {"name": "first", "data": {"root": "elsewhere", "unlabeled": "x", "images": "x", "masks": "y",
                                       "eval_sets": {"unseen": {"images": "u", "masks": "ua"}},
                                       "splits": {"1-30": "s.txt"}, "class_names": ["a", "b", "c", "d"]},
             "settings_chosen_on": "unseen", "pretrain_overrides": pretrain,
             "probe": {"images": "x", "masks": "y", "num_classes": 4},
             "finetune_overrides": {**FINETUNE, "data": {**FINETUNE["data"], "num_classes": 4, "ignore_index": 4}},
             "stages": {"teacher-untrained": {"train_teacher": "ddpm", "untrained": True},
                        "dt-feat-untrained": {"method": "dt-feat", "teacher": "teacher-untrained"}},
             "iterations": {"1-30": 2, "full": 2}, "seeds": {"1-30": [0, 1], "full": [0]},
             "rows": [{"method": "scratch", "head": "upernet"}]}
    (tmp_path / "first.yaml").write_text(yaml.safe_dump(first))
    derived = {"base": "first.yaml", "name": "second", "settings_chosen_on": None,
               "settings_from": "first's, unchanged",
               "data": {"root": str(root), "unlabeled": ["train", "unlabeled"], "images": "train", "masks": "trainannot",
                        "eval_sets": {"unseen": None, "val": {"images": "val", "masks": "valannot"}},
                        "splits": {"1-30": "splits/few.txt", "full": "splits/all.txt"},
                        "class_names": ["road", "red", "blue"]},
               "probe": None, "pretrain_steps_for_images": 8,
               "finetune_overrides": {"data": {"num_classes": 3, "ignore_index": 255}},
               "rows": [{"method": "scratch", "head": "upernet"},
                        {"method": "dt-feat-untrained", "head": "readout", "seeds": [0]}]}
    (tmp_path / "second.yaml").write_text(yaml.safe_dump(derived))
    return tmp_path / "second.yaml"


def test_a_derived_recipe_takes_its_base_settings_and_drops_what_it_nulls(second):
    spec = load_recipe(second)
    assert spec["name"] == "second" and "probe" not in spec and "settings_chosen_on" not in spec
    assert list(spec["data"]["eval_sets"]) == ["val"]
    assert spec["finetune_overrides"]["data"] == {"resolution": [32, 32], "num_workers": 0, "num_classes": 3,
                                                  "ignore_index": 255}
    assert spec["stages"]["dt-feat-untrained"] == {"method": "dt-feat", "teacher": "teacher-untrained"}  # inherited


def test_a_second_dataset_runs_through_the_same_harness(second):
    out = second.parent / "bench"
    result = bench(second, out, progress=False)
    cells = {(r["method"], r["head"], r["fraction"], r["seed"]) for r in result.rows}
    assert cells == {("scratch", "upernet", "1-30", 0), ("scratch", "upernet", "1-30", 1), ("scratch", "upernet", "full", 0),
                     ("dt-feat-untrained", "readout", "1-30", 0), ("dt-feat-untrained", "readout", "full", 0)}
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["data"]["eval_sets"]) == ["val"] and saved["class_names"] == ["road", "red", "blue"]
    for row in saved["rows"]:
        assert len(row["per_class"]) == 3 and list(row["scores"]) == ["val"] and row["scores"]["val"]["images"] == 3
    # pretraining read both folders (12 images) for the steps of its 2 epochs over 8 images at batch 4
    student = next(r for r in saved["rows"] if r["method"] == "dt-feat-untrained")
    assert student["pretrain_stages"]["dt-feat-untrained"]["steps"] == 4
    assert student["pretrain_epochs"] == pytest.approx(4 / 3, abs=0.01)
    table = (out / "results.md").read_text()
    assert "`train/` + `unlabeled/`" in table and "first's, unchanged" in table and "Settings are chosen" not in table
    assert saved["machine"]["cpu"] and "bf16" in table


@pytest.mark.parametrize("breakage,message", [
    (lambda root: (root / "valannot" / "val_01.png").unlink(), r"evaluation set val: image .*val_01.jpg has no label map"),
    (lambda root: (root / "splits" / "all.txt").unlink(), r"recipe split full: file not found: .*all.txt"),
    (lambda root: (root / "splits" / "few.txt").write_text("train_00.jpg\nnot_there.jpg\n"),
     r"split file .*few.txt names not_there.jpg, which is not in"),
    (lambda root: Image.fromarray(np.full((36, 48), 7, np.uint8)).save(root / "valannot" / "val_00.png"),
     r"label map .*val_00.png \(evaluation set val\) holds class ids \[7\] outside 0..2"),
])
def test_bad_recipe_data_is_one_line_before_any_stage(second, capsys, breakage, message):
    root = second.parent / "data"
    breakage(root)
    out = second.parent / "bench"
    assert main(["bench", str(second), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and __import__("re").search(message, err), err
    assert not (out / "runs").exists()  # nothing ran


def test_a_class_count_above_the_labels_and_a_base_cycle_are_refused(second, tmp_path):
    spec = yaml.safe_load(second.read_text())
    spec["finetune_overrides"]["data"]["num_classes"] = 5
    spec["data"]["class_names"] = list("abcde")
    second.write_text(yaml.safe_dump(spec))
    with pytest.raises(UserError, match=r"class ids up to 2 only, but the recipe's num_classes is 5"):
        bench(second, tmp_path / "b", progress=False)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(UserError, match="base: cycle"):
        load_recipe(tmp_path / "a.yaml")


def stage_keys(recipe: Path, out: Path, monkeypatch) -> dict[str, str]:
    """Every stage's and cell's key, nothing trained (benchmarks/experiments/stage_keys.py's stub)."""
    from dreamteacher.bench import cells, runner, stages

    keys: dict[str, str] = {}

    def stub(self, allow_run=True):
        keys[self.folder.name] = self.key
        return {"key": self.key, "done": True, "seconds": 0.0, "steps": 0, "epochs": 0, "iterations": 0,
                "labeled": 0, "teacher": str(self.folder / "teacher"), "backbone": "b", "cache": "c",
                "interpreter": "i", "run": "r", "initialized": "none"}

    monkeypatch.setattr(stages.Stage, "result", stub)
    monkeypatch.setattr(cells, "score", lambda *a, **k: {"miou": 0.0, "per_class": [], "pixel_accuracy": 0.0,
                                                          "scores": {}, "inference_gflops": 0})
    monkeypatch.setattr(runner, "write_results", lambda out, meta, rows: {})
    bench(recipe, out, progress=False)
    return keys


def test_a_stage_is_redone_when_a_setting_it_reads_changes_and_only_then(second, monkeypatch):
    spec = yaml.safe_load(second.read_text())
    before = stage_keys(second, second.parent / "k", monkeypatch)
    assert {"teacher-untrained", "pretrain-dt-feat-untrained"} <= set(before)
    for layer, changed in (({"loss": {"at_weight": 3}}, {"pretrain-dt-feat-untrained"}),
                           ({"gan": {"r1_gamma": 3}}, set()),  # a section dt-feat does not read
                           ({"trainer": {"log_every_n_steps": 7}}, set()),  # execution only
                           ({"data": {"hflip": False}}, {"pretrain-dt-feat-untrained"})):
        second.write_text(yaml.safe_dump({**spec, "method_overrides": {"dt-feat-untrained": layer}}))
        after = stage_keys(second, second.parent / "k", monkeypatch)
        moved = {name for name in before if name in after and after[name] != before[name] and
                 not name.endswith(tuple(f"seed{s}" for s in range(3)))}
        assert moved == changed, layer
