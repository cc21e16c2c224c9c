"""The evaluation harness on tiny synthetic scenes: metrics against hand-computed numbers, label and
split checks, fine-tuning + evaluation of both heads, and a bench that resumes without recomputing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import IGNORE, NUM_CLASSES, TINY, write_scenes
from dreamteacher.cli import main
from dreamteacher.data.labeled import SegmentationData, read_split
from dreamteacher.workflows.evaluate import crop_box, evaluate
from dreamteacher.workflows.finetune import finetune, lr_factor
from dreamteacher.analysis.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy
from dreamteacher.core.errors import UserError

# 32x32 training crops of a test_resnet student, a 32-wide UperNet, a few iterations
FINETUNE = {"data": {"resolution": [32, 32], "num_classes": NUM_CLASSES, "ignore_index": IGNORE, "num_workers": 0},
            "model": {"backbone": "test_resnet", "decoder_channels": 32},
            "optim": {"name": "adamw", "lr": 1e-3, "iterations": 3, "batch_size": 2},
            "trainer": {"accelerator": "cpu", "precision": "32-true", "checkpoint_every_n_steps": 1, "log_every_n_steps": 1}}


@pytest.fixture
def scenes(tmp_path: Path) -> tuple[Path, Path]:
    return write_scenes(tmp_path)


def test_confusion_and_iou_match_a_hand_computed_example():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    confusion = confusion_matrix(pred, target, 3, 255)
    # rows true, columns predicted; the ignored pixel is not counted
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 1]]
    # IoU_c = TP / (TP + FP + FN): class 0: 1/(1+1+1), class 1: 2/(2+1+1), class 2: 1/(1+1+1)
    per_class = iou_per_class(confusion)
    assert per_class == pytest.approx([100 / 3, 50.0, 100 / 3])
    assert mean_iou(per_class) == pytest.approx((100 / 3 + 50 + 100 / 3) / 3)
    assert pixel_accuracy(confusion) == pytest.approx(4 / 7 * 100)


def test_a_class_absent_everywhere_does_not_count_in_the_mean():
    confusion = confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1]), 3, 255)
    per_class = iou_per_class(confusion)
    assert per_class[:2] == [100.0, 100.0] and math.isnan(per_class[2])
    assert mean_iou(per_class) == 100.0


def test_schedules_warm_up_then_decay_to_zero():
    poly = lr_factor("poly", total=100, warmup=10, power=0.9)
    cosine = lr_factor("cosine", total=100, warmup=0)
    assert poly(0) == pytest.approx(0.1) and poly(9) == pytest.approx(1.0) and poly(100) == 0.0
    assert poly(55) == pytest.approx(0.5 ** 0.9)
    assert cosine(0) == 1.0 and cosine(50) == pytest.approx(0.5) and cosine(100) == pytest.approx(0.0)


def test_crop_box_inverts_resize_center_crop():
    assert crop_box(360, 480, 96, 128) == (0, 0, 360, 480)  # same aspect: the whole label map
    assert crop_box(100, 200, 32, 32) == (0, 50, 100, 100)  # wider: the central square


def test_split_selects_images_and_masks_are_resized_with_nearest(scenes, tmp_path):
    images, masks = scenes
    split = tmp_path / "split.txt"
    split.write_text("# two labeled images\nscene_3.png\n\nscene_1.png\n")
    data = SegmentationData(images, masks, split, [32, 32], NUM_CLASSES, IGNORE)
    assert data.names == ["scene_3.png", "scene_1.png"]
    image, mask = data[0]
    assert image.shape == (3, 32, 32) and 0 <= image.min() and image.max() <= 1
    assert set(mask.unique().tolist()) <= {0, 1, 2, IGNORE}  # nearest: no blended ids


def test_augmentation_keeps_image_and_mask_aligned(scenes):
    images, masks = scenes
    data = SegmentationData(images, masks, None, [32, 32], NUM_CLASSES, IGNORE, augment=True, scale_range=(0.5, 2.0))
    torch.manual_seed(0)
    for _ in range(10):
        image, mask = data[0]
        assert image.shape == (3, 32, 32) and mask.shape == (32, 32)
        red = ((image[0] > 0.7) & (image[2] < 0.3)).float()
        labeled_red = (mask == 1).float()
        if red.sum() > 4 and labeled_red.sum() > 4:  # the red square is in the crop
            # the red pixels and the pixels labeled "red" have the same centre (to resampling error)
            grid = torch.stack(torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij"))
            centre = lambda m: (grid * m).sum((1, 2)) / m.sum()  # noqa: E731
            assert torch.dist(centre(red), centre(labeled_red)) < 1.5


def test_bad_labels_and_splits_fail_before_training_with_the_file_named(scenes, tmp_path):
    images, masks = scenes
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(UserError, match="empty.txt"):
        read_split(empty)
    missing = tmp_path / "missing.txt"
    missing.write_text("scene_0.png\nnot_there.png\n")
    with pytest.raises(UserError, match="not_there.png"):
        SegmentationData(images, masks, missing, [32, 32], NUM_CLASSES, IGNORE)
    Image.fromarray(np.full((36, 48), 7, np.uint8)).save(masks / "scene_2.png")  # id 7 of 3 classes
    with pytest.raises(UserError, match=r"scene_2.png holds class ids \[7\]"):
        SegmentationData(images, masks, None, [32, 32], NUM_CLASSES, IGNORE)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / "scene_2.png")
    with pytest.raises(UserError, match="scene_2.png is 10x10 but its image"):
        SegmentationData(images, masks, None, [32, 32], NUM_CLASSES, IGNORE)
    (masks / "scene_2.png").unlink()
    with pytest.raises(UserError, match="no mask for image 'scene_2.png'"):
        SegmentationData(images, masks, None, [32, 32], NUM_CLASSES, IGNORE)


@pytest.mark.parametrize("head", ["upernet", "readout"])
def test_finetune_then_evaluate_from_random_init(scenes, tmp_path, head):
    images, masks = scenes
    out = tmp_path / f"run-{head}"
    result = finetune(None, images, masks, out, overrides={**FINETUNE, "model": {**FINETUNE["model"], "head": head}},
                      progress=False)
    assert result.steps == 3 and result.init["backbone_init"] == "random"
    info = json.loads((out / "segmenter.json").read_text())
    assert info["head"] == head and info["labeled_images"] == 6 and info["num_classes"] == NUM_CLASSES
    from dreamteacher.describe import describe

    about = describe(out)
    assert about["method"] == "finetune" and about["init"]["backbone_init"] == "random"
    assert describe(out / "segmenter.safetensors")["kind"] == "fine-tuned segmentation model"
    scores = evaluate(out, images, masks, out=out / "eval.json")
    assert scores.images == 6 and len(scores.per_class) == NUM_CLASSES and 0 <= scores.miou <= 100
    # scored at label resolution on the region the 32x32 centre crop shows: 36x36 of each 36x48 mask,
    # less its ignored top row
    assert sum(map(sum, scores.confusion)) == 6 * 35 * 36
    assert json.loads((out / "eval.json").read_text())["miou"] == pytest.approx(scores.miou)


def test_readout_trains_only_the_linear_layer(scenes, tmp_path):
    from safetensors.torch import load_file

    images, masks = scenes
    out = tmp_path / "readout"
    torch.manual_seed(0)
    finetune(None, images, masks, out, overrides={**FINETUNE, "model": {**FINETUNE["model"], "head": "readout"}},
             progress=False)
    weights = load_file(out / "segmenter.safetensors")
    from dreamteacher.nn.segmenters import Segmenter

    torch.manual_seed(0)
    fresh = Segmenter("readout", "test_resnet", NUM_CLASSES)
    backbone = {k: v for k, v in fresh.state_dict().items() if ".backbone." in k}
    assert backbone and all(torch.equal(weights[k], v) for k, v in backbone.items())  # BN stats too
    assert not torch.equal(weights["net.classifier.weight"], fresh.state_dict()["net.classifier.weight"])


def test_finetune_cli_rejects_missing_num_classes(scenes, tmp_path, capsys):
    images, masks = scenes
    assert main(["finetune", "--backbone", "none", "--images", str(images), "--masks", str(masks),
                 "--out", str(tmp_path / "r")]) == 2
    assert "data.num_classes must be set" in capsys.readouterr().err


def write_recipe(tmp_path: Path, images: Path, masks: Path) -> Path:
    root = images.parent
    (root / "splits").mkdir()
    (root / "splits" / "small.txt").write_text("scene_0.png\nscene_1.png\n")
    (root / "splits" / "all.txt").write_text("\n".join(f"scene_{i}.png" for i in range(6)))
    pretrain = {}
    for item in TINY:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        pretrain.setdefault(section, {})[name] = yaml.safe_load(value)
    recipe = {
        "name": "tiny",
        "data": {"root": str(root), "unlabeled": "images", "images": "images", "masks": "masks",
                 "eval_images": "images", "eval_masks": "masks",
                 "splits": {"1-30": "splits/small.txt", "full": "splits/all.txt"}},
        "pretrain_overrides": pretrain,
        "stages": {"teacher": {"train_teacher": "ddpm"}, "teacher-untrained": {"train_teacher": "ddpm", "untrained": True},
                   "teacher-stylegan2": {"train_teacher": "stylegan2", "overrides": "gan-teacher"},
                   "dt-feat": {"method": "dt-feat", "teacher": "teacher"},
                   "dt-feat-untrained": {"method": "dt-feat", "teacher": "teacher-untrained"},
                   "dt-feat-gan": {"method": "dt-feat", "teacher": "teacher-stylegan2"},
                   "dt-feat+ddep": {"method": "ddep", "encoder": "dt-feat", "overrides": "ddep"},
                   "dt-mix": {"method": "dt-mix", "teacher": "teacher", "interpreter": "labels"},
                   "teacher-interpreter": {"interpreter": "teacher"},
                   "moco-teacher": {"method": "mocov3"}, "pcd": {"method": "pcd", "teacher": "moco-teacher"}},
        "finetune_overrides": FINETUNE,
        "iterations": {"1-30": 2, "full": 3},
        "seeds": {"1-30": [0, 1], "full": [0]},
        "rows": [{"method": "scratch", "head": "upernet"},
                 {"method": "dt-feat-untrained", "head": "readout", "iterations": 2, "seeds": [0]}],
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_bench_runs_every_cell_writes_tables_and_resumes_without_recomputing(scenes, tmp_path, monkeypatch):
    from dreamteacher.bench import cells as ft
    from dreamteacher.bench.runner import bench

    images, masks = scenes
    recipe = write_recipe(tmp_path, images, masks)
    out = tmp_path / "bench"
    result = bench(recipe, out, progress=False, rows=["scratch"], fractions=["1-30"], seeds=[0])
    assert [(r["method"], r["fraction"], r["seed"]) for r in result.rows] == [("scratch", "1-30", 0)]

    calls = []
    real_finetune = ft.finetune
    monkeypatch.setattr(ft, "finetune", lambda *a, **k: calls.append(k["split"]) or real_finetune(*a, **k))
    result = bench(recipe, out, progress=False)
    cells = {(r["method"], r["head"], r["fraction"], r["seed"]) for r in result.rows}
    assert cells == {("scratch", "upernet", "1-30", 0), ("scratch", "upernet", "1-30", 1),
                     ("scratch", "upernet", "full", 0), ("dt-feat-untrained", "readout", "1-30", 0),
                     ("dt-feat-untrained", "readout", "full", 0)}
    assert len(calls) == 4  # the first cell was reused
    saved = json.loads((out / "results.json").read_text())
    assert saved["recipe"] == "tiny" and saved["image_size"] == [32, 32] and saved["backbone"] == "test_resnet"
    for row in saved["rows"]:
        assert {"method", "head", "fraction", "labeled", "seed", "miou", "per_class", "pretrain_seconds"} <= set(row)
    distilled = [r for r in saved["rows"] if r["method"] == "dt-feat-untrained"]
    assert all(r["pretrain_seconds"] > 0 and r["pretrain_epochs"] == 2 for r in distilled)
    assert {r["labeled"] for r in saved["rows"] if r["fraction"] == "1-30"} == {2}
    table = (out / "results.md").read_text()
    assert "| scratch | upernet |" in table and "| dt-feat-untrained | readout |" in table
    assert "loss whitened MSE (per-pixel LayerNorm) + 10 x attention transfer." in table  # what it distilled with
    assert (out / "results.png").stat().st_size > 0
    from dreamteacher.describe import describe

    assert describe(out) == {"kind": "benchmark results", "path": str(out), "recipe": "tiny", "cells": 5,
                             "use": f"see {out / 'results.md'}"}

    # a third run recomputes nothing; one removed cell is redone alone
    calls.clear()
    import shutil

    shutil.rmtree(out / "runs" / "cells" / "scratch--upernet" / "1-30-seed1")
    bench(recipe, out, progress=False)
    assert len(calls) == 1
    # changing a setting the cells depend on invalidates them (and only them)
    calls.clear()
    spec = yaml.safe_load(recipe.read_text())
    spec["iterations"]["full"] = 4
    recipe.write_text(yaml.safe_dump(spec))
    bench(recipe, out, progress=False, rows=["scratch"])
    assert len(calls) == 1
    # work folders gone (a fresh clone of committed results): rows not selected keep their reported
    # cells, a selected row reports only what it has now
    calls.clear()
    shutil.rmtree(out / "runs")
    result = bench(recipe, out, progress=False, rows=["scratch"], fractions=["1-30"], seeds=[0])
    assert len(calls) == 1
    kept = {(r["method"], r["fraction"], r.get("carried_over", False)) for r in result.rows}
    assert kept == {("scratch", "1-30", False), ("dt-feat-untrained", "1-30", True), ("dt-feat-untrained", "full", True)}
    assert "2 cells carried over from the previous results.json" in (out / "results.md").read_text()


def test_bench_scores_every_cell_on_every_evaluation_set_with_one_table_each(scenes, tmp_path):
    """A recipe with two tiny evaluation sets: each cell is scored on both (the first is the primary
    one), results.json keeps a score per set, results.md shows a table per set and each row's gain
    over scratch on both, and a set added later costs evaluations only, no fine-tuning."""
    import shutil

    from dreamteacher.bench import cells as ft
    from dreamteacher.bench.runner import bench

    images, masks = scenes
    other_images, other_masks = write_scenes(tmp_path / "other", count=3, seed=7)
    recipe = write_recipe(tmp_path, images, masks)
    spec = yaml.safe_load(recipe.read_text())
    spec["data"].pop("eval_images"), spec["data"].pop("eval_masks")
    spec["data"]["eval_sets"] = {"later": {"images": str(other_images), "masks": str(other_masks)},
                                 "same": {"images": "images", "masks": "masks"}}
    spec["data"]["eval_about"] = {"later": "frames after the training ones"}
    spec["settings_chosen_on"] = "later"
    spec["data"]["class_names"] = ["background", "red", "blue"]
    spec["rows"] = [{"method": "scratch", "head": "upernet"},
                    {"method": "dt-feat-untrained", "head": "upernet", "seeds": [0, 1]}]
    recipe.write_text(yaml.safe_dump(spec))
    out = tmp_path / "bench"
    result = bench(recipe, out, progress=False, fractions=["1-30"])
    assert len(result.rows) == 4
    for cell in result.rows:
        assert set(cell["scores"]) == {"later", "same"}
        assert cell["miou"] == cell["scores"]["later"]["miou"]  # the primary set's
        assert cell["scores"]["later"]["images"] == 3 and cell["scores"]["same"]["images"] == 6
        for scores in cell["scores"].values():
            assert 0 <= scores["miou"] <= 100 and len(scores["per_class"]) == NUM_CLASSES
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["summary"]) == ["later", "same"]
    assert list(saved["data"]["eval_sets"]) == ["later", "same"]
    untrained = next(s for s in saved["summary"]["same"] if s["method"] == "dt-feat-untrained")
    cells = [c["scores"]["same"]["miou"] for c in saved["rows"] if c["method"] == "dt-feat-untrained"]
    assert untrained["mean"] == pytest.approx(sum(cells) / 2) and untrained["values"] == cells
    table = (out / "results.md").read_text()
    assert "## mIoU on `later` (the primary set)" in table and "## mIoU on `same`" in table
    assert "Settings are chosen on `later` scores only; `same` is reported, never chosen on." in table
    assert "frames after the training ones" in table
    gain = {s: next(x["mean"] for x in saved["summary"][s] if x["method"] == "dt-feat-untrained")
            - next(x["mean"] for x in saved["summary"][s] if x["method"] == "scratch") for s in ("later", "same")}
    line = next(ln for ln in table.splitlines() if ln.startswith("| dt-feat-untrained | upernet | ")
                and "/" in ln.split("|")[3])
    assert f"{gain['later']:+.1f} / {gain['same']:+.1f}" in line
    assert "Per-class IoU on `later`" in table and "Per-class IoU on `same`" in table
    assert (out / "results.png").stat().st_size > 0
    assert "Not scored on" not in table
    # a row carried over from before `later` existed (one set's `miou`, which older cells called
    # `same` here): said under the primary table, by row and fraction, never silently left out
    from dreamteacher.bench.report import markdown_table

    meta = {k: v for k, v in saved.items() if k not in ("rows", "summary")}
    old = [{**{k: v for k, v in saved["rows"][0].items() if k != "scores"}, "method": "pcd", "fraction": f, "seed": 0}
           for f in ("1-8", "1-30")]
    for cell in old:
        cell["scores"] = {"same": {"miou": 10.0, "per_class": [10.0] * NUM_CLASSES}}
    table = markdown_table(meta, saved["rows"] + old)
    note = next(ln for ln in table.splitlines() if ln.startswith("Not scored on `later` yet:"))
    assert "pcd / upernet (1/30, 1/8)" in note and "scratch" not in note
    primary = table.split("## mIoU on `later`")[1].split("## mIoU on `same`")[0]
    assert note in primary and "| pcd |" not in primary

    # one more set on the command line: evaluated on every finished cell, nothing fine-tuned again
    calls = []
    real_finetune = ft.finetune
    ft.finetune = lambda *a, **k: calls.append(1) or real_finetune(*a, **k)
    try:
        extra = tmp_path / "extra"
        shutil.copytree(other_images, extra / "more")
        shutil.copytree(other_masks, extra / "moremasks")
        result = bench(recipe, out, progress=False, fractions=["1-30"], eval_images=extra / "more",
                       eval_masks=extra / "moremasks")
    finally:
        ft.finetune = real_finetune
    assert calls == []
    assert all(set(c["scores"]) == {"later", "same", "more"} for c in result.rows)
    assert all(c["scores"]["more"]["miou"] == c["scores"]["later"]["miou"] for c in result.rows)  # same pictures
    with pytest.raises(UserError, match="evaluation folder not found"):
        bench(recipe, out, progress=False, eval_images=tmp_path / "nowhere", eval_masks=other_masks)


def test_bench_refuses_unknown_rows_and_missing_data(scenes, tmp_path):
    from dreamteacher.bench.runner import bench

    images, masks = scenes
    recipe = write_recipe(tmp_path, images, masks)
    with pytest.raises(UserError, match="matches no recipe row"):
        bench(recipe, tmp_path / "b", rows=["pcd"])
    with pytest.raises(UserError, match="data root not found"):
        bench(recipe, tmp_path / "b", data_root=tmp_path / "nowhere")
    with pytest.raises(UserError, match="unknown recipe"):
        bench("no-such-recipe", tmp_path / "b")
    with pytest.raises(UserError, match="--device must be one of cpu, gpu"):
        bench(recipe, tmp_path / "b", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--device gpu: no CUDA GPU"):
            bench(recipe, tmp_path / "b", device="gpu")


def test_bench_device_moves_every_stage_without_touching_cpu_keys(scenes, tmp_path):
    from dreamteacher.bench.recipes import DEVICE_SETTINGS, Bench

    images, masks = scenes
    spec = yaml.safe_load(write_recipe(tmp_path, images, masks).read_text())
    cpu = Bench(spec, tmp_path, images.parent, images, masks)
    gpu = Bench(spec, tmp_path, images.parent, images, masks, device="gpu")
    assert cpu.pretrain_config() == (None, spec["pretrain_overrides"])  # the recipe's own settings
    preset, overrides = gpu.pretrain_config()
    assert overrides["trainer"]["accelerator"] == "gpu" and overrides["data"]["num_workers"] == 4
    assert overrides["data"]["resolution"] == spec["pretrain_overrides"]["data"]["resolution"]
    assert gpu.overrides({"trainer": {"seed": 3}})["trainer"] == {"seed": 3, **DEVICE_SETTINGS["gpu"]["trainer"]}


def test_bench_feature_cache_is_built_once_per_teacher_and_read_by_its_students(scenes, tmp_path):
    from dreamteacher.bench.runner import bench

    images, masks = scenes
    recipe = write_recipe(tmp_path, images, masks)
    spec = yaml.safe_load(recipe.read_text())
    spec["feature_cache"] = True
    spec["rows"].append({"method": "dt-feat-untrained", "head": "upernet", "iterations": 2, "seeds": [0]})
    recipe.write_text(yaml.safe_dump(spec))
    out = tmp_path / "bench"
    result = bench(recipe, out, progress=False, rows=["dt-feat-untrained"], fractions=["1-30"])
    caches = sorted((out / "runs").glob("cache-*"))
    assert [c.name.startswith("cache-teacher-untrained-") for c in caches] == [True]  # one for both heads
    meta = json.loads((caches[0] / "features" / "meta.json").read_text())
    assert meta["key"]["num_images"] == 6 and meta["key"]["encodings"] == 4
    inputs = json.loads((out / "runs" / "pretrain-dt-feat-untrained" / "inputs.json").read_text())
    assert inputs["cache"] == str((caches[0] / "features").resolve())  # the student never ran the teacher
    row = result.rows[0]
    assert set(row["pretrain_stages"]) == {"teacher-untrained", "cache", "dt-feat-untrained"}
    assert row["pretrain_stages"]["cache"]["seconds"] > 0
    assert row["pretrain_seconds"] >= sum(s["seconds"] for s in row["pretrain_stages"].values()) - 0.2
    table = (out / "results.md").read_text()
    assert "students of a diffusion teacher read the offline feature cache, 4 encodings per image" in table
    assert "`teacher-untrained`: a teacher, ddpm at its random initialization; `dt-feat-untrained`: dt-feat on the " \
        "test_resnet from teacher `teacher-untrained`: 2 epochs, t=50, blocks [0, 2, 4]" in table

    # the online student of the same recipe without the cache is another stage (another result)
    spec["feature_cache"] = False
    recipe.write_text(yaml.safe_dump(spec))
    online = bench(recipe, tmp_path / "online", progress=False, rows=["dt-feat-untrained"], fractions=["1-30"])
    assert set(online.rows[0]["pretrain_stages"]) == {"teacher-untrained", "dt-feat-untrained"}
    assert json.loads((tmp_path / "online" / "runs" / "pretrain-dt-feat-untrained" / "inputs.json").read_text()
                      )["cache"] is None


def test_bench_denoising_rows_start_from_the_pretrained_decoder(scenes, tmp_path):
    from dreamteacher.bench.runner import bench

    images, masks = scenes
    recipe = write_recipe(tmp_path, images, masks)
    spec = yaml.safe_load(recipe.read_text())
    spec["rows"] += [{"method": "dep", "head": "unet", "iterations": 2, "seeds": [0]},
                     {"method": "dt-feat+ddep", "head": "unet", "iterations": 2, "seeds": [0]},
                     {"method": "dep", "head": "upernet", "iterations": 2, "seeds": [0]}]
    spec["method_overrides"] = {"dep": {"denoise": {"unet_width": 8}}, "ddep": {"denoise": {"unet_width": 8}}}
    spec["finetune_overrides"]["model"]["unet_width"] = 8
    recipe.write_text(yaml.safe_dump(spec))
    result = bench(recipe, tmp_path / "bench", progress=False, rows=["dep", "dt-feat+ddep"], fractions=["1-30"])
    made = {(r["method"], r["head"]): r for r in result.rows}
    assert made[("dep", "unet")]["initialized"] == "backbone+decoder"
    assert made[("dep", "upernet")]["initialized"] == "backbone"  # UperNet has no pretrained decoder to take
    ddep = made[("dt-feat+ddep", "unet")]
    assert ddep["initialized"] == "backbone+decoder"
    assert set(ddep["pretrain_stages"]) == {"teacher", "dt-feat", "dt-feat+ddep"}  # its wall-clock counts all three
    assert ddep["pretrain_seconds"] >= sum(s["seconds"] for s in ddep["pretrain_stages"].values()) - 0.2
    table = (tmp_path / "bench" / "results.md").read_text()
    assert "| dt-feat+ddep | unet | backbone+decoder |" in table


def test_bench_contrastive_rows_train_a_moco_teacher_then_pcd(scenes, tmp_path):
    from dreamteacher.bench.runner import bench

    images, masks = scenes
    recipe = write_recipe(tmp_path, images, masks)
    spec = yaml.safe_load(recipe.read_text())
    rescaled = {"iterations": 2, "seeds": [0], "finetune_overrides": {"lab": {"norm_rescale": 0.25}}}
    spec["rows"] += [{"method": "pcd", "head": "upernet", **rescaled}, {"method": "mocov3", "head": "upernet", **rescaled}]
    small = {"optim": {"name": "lars", "base_lr": 1.0, "epochs": 1, "warmup_epochs": 0},
             "contrast": {"proj_hidden": 16, "proj_dim": 8, "queue_size": 8}}
    spec["method_overrides"] = {"moco-teacher": small, "pcd": small, "mocov3": small}
    recipe.write_text(yaml.safe_dump(spec))
    result = bench(recipe, tmp_path / "bench", progress=False, rows=["pcd", "mocov3"], fractions=["1-30"])
    made = {r["method"]: r for r in result.rows}
    assert set(made["pcd"]["pretrain_stages"]) == {"moco-teacher", "pcd"}  # the teacher's time counts
    assert set(made["mocov3"]["pretrain_stages"]) == {"mocov3"}
    runs = tmp_path / "bench" / "runs"
    teacher = yaml.safe_load((runs / "pretrain-pcd" / "inputs.json").read_text())["teacher"]
    assert teacher == str((runs / "pretrain-moco-teacher" / "moco_v3.pth").resolve())
    init = json.loads((runs / "cells" / "pcd--upernet" / "1-30-seed0" / "init.json").read_text())
    assert init["backbone_init"] == "pretrained" and init["norm_rescale"] == 0.25
    table = (tmp_path / "bench" / "results.md").read_text()  # the table says what they trained with
    assert "`mocov3`: mocov3 on the test_resnet: 1 epochs, lars base lr 1 (x batch 4 / 256)" in table
    assert "`moco-teacher`: mocov3 on the test_resnet: 1 epochs" in table
    assert "`pcd`: pcd on the test_resnet from teacher `moco-teacher`: 1 epochs, lars base lr 1 (x batch" in table
    assert "queue 8" in table


def test_bench_gan_row_trains_a_stylegan2_then_distills_its_samples(scenes, tmp_path):
    from dreamteacher.bench.runner import bench

    images, masks = scenes
    recipe = write_recipe(tmp_path, images, masks)
    spec = yaml.safe_load(recipe.read_text())
    spec["rows"] += [{"method": "dt-feat-gan", "head": "upernet", "iterations": 2, "seeds": [0]}]
    spec["method_overrides"] = {
        "gan-teacher": {"teacher_train": {"max_steps": 2}, "gan": {"channels": [16, 16, 8], "z_dim": 8, "w_dim": 8,
                                                                    "mapping_layers": 1}},
        "dt-feat-gan": {"encode": {"blocks": [0, 1, 2]}}}
    recipe.write_text(yaml.safe_dump(spec))
    result = bench(recipe, tmp_path / "bench", progress=False, rows=["dt-feat-gan"], fractions=["1-30"])
    row = result.rows[0]
    assert row["method"] == "dt-feat-gan" and row["initialized"] == "backbone"
    assert row["pretrain_stages"]["teacher-stylegan2"]["steps"] == 2  # GAN iterations, the teacher's time counted
    assert (tmp_path / "bench" / "runs" / "teacher-stylegan2" / "teacher" / "stylegan2.json").is_file()
    # the table's header says which teacher the GAN row had, not only the preset's diffusion one
    table = (tmp_path / "bench" / "results.md").read_text()
    assert "`teacher-stylegan2`: a teacher, StyleGAN2 with levels [16, 16, 8] wide, 2 iterations" in table
    assert "`dt-feat-gan`: dt-feat on the test_resnet from teacher `teacher-stylegan2`: 2 epochs, t=50, " \
        "blocks [0, 1, 2]" in table


def test_bench_label_guided_rows_train_an_interpreter_per_fraction(scenes, tmp_path):
    from dreamteacher.bench.runner import bench

    images, masks = scenes
    recipe = write_recipe(tmp_path, images, masks)
    spec = yaml.safe_load(recipe.read_text())
    spec["rows"] = [{"method": "teacher-interpreter", "head": "interpreter", "seeds": [0]},
                    {"method": "dt-mix", "head": "upernet", "iterations": 2, "seeds": [0], "fractions": ["1-30"]}]
    spec["interpreter_overrides"] = {"data": {"resolution": [32, 32], "num_classes": NUM_CLASSES,
                                              "ignore_index": IGNORE, "num_workers": 0},
                                     "encode": {"t": 50, "blocks": spec["pretrain_overrides"]["encode"]["blocks"]},
                                     "interpreter": {"width": 32}, "optim": {"epochs": 2, "batch_size": 2},
                                     "trainer": {"accelerator": "cpu", "precision": "32-true"}}
    recipe.write_text(yaml.safe_dump(spec))
    with pytest.warns(UserWarning):  # the 2-image split lacks a class
        result = bench(recipe, tmp_path / "bench", progress=False)
    made = {(r["method"], r["fraction"]): r for r in result.rows}
    assert set(made) == {("teacher-interpreter", "1-30"), ("teacher-interpreter", "full"), ("dt-mix", "1-30")}
    interp = made[("teacher-interpreter", "1-30")]
    assert interp["labeled"] == 2 and interp["initialized"] == "teacher+interpreter"
    mix = made[("dt-mix", "1-30")]
    assert mix["initialized"] == "backbone+decoder" and set(mix["pretrain_stages"]) == {"teacher", "interpreter", "dt-mix"}
    # the dt-mix row used the interpreter of its own fraction (the 1-30 one)
    runs = tmp_path / "bench" / "runs"
    assert (runs / "pretrain-dt-mix-1-30").is_dir() and not (runs / "pretrain-dt-mix-full").exists()
    assert all(r["inference_gflops"] > 0 for r in result.rows)
    assert interp["inference_gflops"] != mix["inference_gflops"]
