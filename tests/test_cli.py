"""Every command end to end on a handful of tiny images; exports load into timm strictly; a killed
run resumes; bad input is one line (many processes: test_distributed.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from conftest import TINY_PRESET, write_images
from dreamteacher.cli import main
from dreamteacher.core.errors import UserError
from dreamteacher.export.checkpoints import read_checkpoint
from dreamteacher.nn.weights import load_backbone

CLI = [sys.executable, "-m", "dreamteacher.cli"]


def sets(*extra: str) -> list[str]:
    """The tests' shared preset, and settings of the command's own sections."""
    args = ["--preset", str(TINY_PRESET)]
    for item in extra:
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny teacher trained by the CLI and a student distilled from it."""
    root = tmp_path_factory.mktemp("cli")
    images = write_images(root / "images")
    assert main(["train-teacher", "--data", str(images), "--out", str(root / "teacher"), "--no-progress", *sets()]) == 0
    assert main(["pretrain", "--teacher", str(root / "teacher"), "--data", str(images), "--out",
                 str(root / "student"), "--no-progress", *sets()]) == 0
    return root


def test_train_teacher_writes_a_diffusers_pipeline(trained):
    from diffusers import DDPMPipeline

    pipeline = DDPMPipeline.from_pretrained(trained / "teacher" / "teacher")
    assert list(pipeline.unet.config.block_out_channels) == [32, 32, 32]
    assert pipeline.scheduler.config.beta_schedule == "linear" and pipeline.scheduler.config.beta_end == 0.02
    assert (trained / "teacher" / "config.yaml").is_file()
    assert (trained / "teacher" / "logs" / "metrics.csv").is_file()
    assert list((trained / "teacher" / "logs").glob("events.out.tfevents.*"))


def test_teacher_trains_in_its_own_precision(tmp_path, monkeypatch):
    """teacher_train.precision=bf16-mixed: the teacher's trainer autocasts while trainer.precision
    (the student's) stays, its clipped steps run, and the saved pipeline holds fp32 weights."""
    import csv

    from diffusers import DDPMPipeline

    from dreamteacher.engine import trainer as engine

    precisions = []
    build_trainer = engine.build_trainer
    monkeypatch.setattr(engine, "build_trainer", lambda t, *a, **k: precisions.append(t.precision) or build_trainer(t, *a, **k))
    images = write_images(tmp_path / "images")
    assert main(["train-teacher", "--data", str(images), "--out", str(tmp_path / "teacher"), "--no-progress",
                 *sets("teacher_train.precision=bf16-mixed")]) == 0
    assert precisions == ["bf16-mixed"]
    assert "precision: 32-true" in (tmp_path / "teacher" / "config.yaml").read_text()  # the student's, untouched
    unet = DDPMPipeline.from_pretrained(tmp_path / "teacher" / "teacher").unet
    assert next(unet.parameters()).dtype == torch.float32
    with open(tmp_path / "teacher" / "logs" / "metrics.csv") as f:
        losses = [float(row["train/loss"]) for row in csv.DictReader(f) if row["train/loss"]]
    assert len(losses) == 3 and np.isfinite(losses).all()


TEACHER_KILLER = """
import os, signal, sys
import lightning as L
import dreamteacher.engine.trainer as engine

real_build = engine.build_trainer

class KillAt(L.Callback):  # a real SIGKILL, right after the checkpoint of step `at` is on disk
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= int(os.environ["KILL_AT"]):
            trainer.save_checkpoint(trainer.checkpoint_callback.dirpath + "/last.ckpt")
            os.kill(os.getpid(), signal.SIGKILL)

def build_trainer(t, run_dir, max_steps, global_batch, progress=True, callbacks=()):
    return real_build(t, run_dir, max_steps, global_batch, progress, [*callbacks, KillAt()])

engine.build_trainer = build_trainer
from dreamteacher.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("kind,extra,kill_at,files", [
    ("ddpm", ["teacher_train.crop=[16,16]"], 3, ["teacher/unet/diffusion_pytorch_model.safetensors"]),
    ("stylegan2", ["gan.channels=[32,16,16]", "gan.z_dim=16", "gan.w_dim=16", "gan.mapping_layers=1",
                   "teacher_train.precision=32-true"], 6, ["teacher/generator.safetensors"]),
])
def test_a_killed_teacher_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, kind, extra, kill_at, files):
    """The teacher's data order, flips, crops, noise and t (a GAN's z) are keyed on (seed, epoch, image)
    like a pretraining's: a run SIGKILLed mid-epoch and resumed ends bit-identical to one trained in one
    go, and records where it was resumed."""
    images = write_images(tmp_path / "images", count=10)  # batch 4: 2 steps an epoch, the kill lands mid-epoch 1
    args = ["train-teacher", "--kind", kind, "--data", str(images), "--no-progress",
            *sets("teacher_train.max_steps=5", *extra)]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    env = {**os.environ, "KILL_AT": str(kill_at)}
    killed = subprocess.run([sys.executable, "-c", TEACHER_KILLER, *args, "--out", str(tmp_path / "cut")],
                            cwd=Path(__file__).parent, env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "cut" / "teacher").exists()
    assert main(["train-teacher", "--kind", kind, "--data", str(images), "--out", str(tmp_path / "cut"), "--resume",
                 "--no-progress"]) == 0
    record = json.loads((tmp_path / "cut" / "run.json").read_text())
    steps_per_iteration = 2 if kind == "stylegan2" else 1
    assert record["steps"] == 5 and record["resumed_at"] == [kill_at // steps_per_iteration]
    assert "resumed_at" not in json.loads((tmp_path / "whole" / "run.json").read_text())
    for name in files:
        a, b = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "cut" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_sample_writes_a_png_grid(trained):
    out = trained / "samples.png"
    assert main(["sample", str(trained / "teacher"), "--out", str(out), "--num", "4", "--steps", "3"]) == 0
    from PIL import Image

    assert Image.open(out).size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)


def test_pretrain_export_loads_into_timm_strictly(trained):
    ckpt = read_checkpoint(trained / "student" / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 4  # 2 epochs x (8 images // batch 4)
    assert not any(k.startswith("teacher") for k in ckpt["state_dict"])  # teacher is not checkpointed
    out = trained / "exported.safetensors"
    assert main(["export", str(trained / "student"), "--out", str(out)]) == 0
    weights = load_file(out)
    model = timm.create_model("test_resnet", num_classes=0)
    model.load_state_dict(weights, strict=True)
    assert set(weights) == set(model.state_dict())
    assert not any(k.startswith(("regressor", "backbone.", "model.")) for k in weights)
    # the exported weights are the trained ones
    trained_key = "backbone.features.model.layer1.0.conv1.weight"
    assert torch.equal(weights["layer1.0.conv1.weight"], ckpt["state_dict"][trained_key])
    # and timm's own pretrained-file path takes it too
    via_timm = timm.create_model("test_resnet", pretrained=True, num_classes=0,
                                 pretrained_cfg_overlay={"file": str(out)})
    assert torch.equal(via_timm.state_dict()["layer1.0.conv1.weight"], weights["layer1.0.conv1.weight"])
    assert (trained / "student" / "backbone.safetensors").is_file()
    loaded = load_backbone(out)  # the library's own loader reads the export's metadata
    assert torch.equal(loaded.state_dict()["layer1.0.conv1.weight"], weights["layer1.0.conv1.weight"])
    with pytest.raises(UserError, match="not a dreamteacher backbone export"):
        load_backbone(trained / "teacher" / "teacher" / "unet" / "diffusion_pytorch_model.safetensors")


def test_info_says_what_each_run_and_file_holds(trained, capsys):
    from dreamteacher import info

    teacher = info(trained / "teacher")
    assert teacher["method"] == "train-teacher" and "teacher/ (a diffusers DDPMPipeline folder)" in teacher["files"]
    student = info(trained / "student")
    assert student["method"] == "dt-feat" and student["step"] == 4 and student["finished"]["steps"] == 4
    assert set(student["parts"]) == {"backbone", "regressor"} and "backbone.safetensors" in student["files"]
    export = info(trained / "student" / "backbone.safetensors")
    assert export["format"] == "timm" and export["model"] == "test_resnet" and "cannot resume" in export["use"]
    assert info(trained / "teacher" / "teacher")["kind"] == "diffusers model folder"
    assert main(["info", str(trained / "student")]) == 0
    assert "method: dt-feat" in capsys.readouterr().out
    assert main(["info", str(trained / "nothing-here")]) == 2


def test_python_api_runs_the_workflow_and_returns_results(trained, tmp_path):
    """The functions the CLI wraps, with settings given as section keywords."""
    import dreamteacher as dt
    from conftest import IGNORE, NUM_CLASSES, write_scenes
    from safetensors.torch import load_file

    run = dt.pretrain(data=trained / "images", out=tmp_path / "student", teacher=trained / "teacher",
                      preset=TINY_PRESET, optim={"epochs": 1}, progress=False)
    assert run.steps == 2 and run.seconds > 0 and run.final_loss is not None
    assert run.files["backbone"].is_file()
    smp_file = dt.export(run.run_dir, format="smp")
    assert smp_file.name == "backbone.smp.safetensors" and "model.conv1.0.weight" in load_file(smp_file)

    images, masks = write_scenes(tmp_path / "scenes")
    seg = dt.finetune(run.files["backbone"], images, masks, tmp_path / "seg", progress=False,
                      data={"resolution": [32, 32], "num_classes": NUM_CLASSES, "ignore_index": IGNORE,
                            "num_workers": 0},
                      model={"decoder_channels": 32}, optim={"iterations": 2, "batch_size": 2},
                      trainer={"accelerator": "cpu", "precision": "32-true"})
    assert seg.steps == 2 and seg.init["backbone_init"] == "pretrained" and seg.init["backbone"] == "test_resnet"
    scores = dt.evaluate(seg.run_dir, images, masks)
    assert 0 <= scores.miou <= 100 and len(scores.per_class) == NUM_CLASSES
    with pytest.raises(UserError, match="keyword 'optim' takes a dict"):
        dt.pretrain(data=trained / "images", out=tmp_path / "x", teacher=trained / "teacher", optim=3)


def test_finetune_initializes_from_the_export_not_at_random(trained, tmp_path, monkeypatch):
    import dreamteacher.workflows.finetune as ft
    from conftest import IGNORE, NUM_CLASSES, write_scenes
    from dreamteacher.nn.weights import read_backbone_export

    images, masks = write_scenes(tmp_path / "scenes")
    export = trained / "student" / "backbone.safetensors"
    start = {}

    def remember(self):  # the backbone weights the first step starts from
        start.update({k: v.clone() for k, v in self.model.backbone_model().state_dict().items()})

    monkeypatch.setattr(ft.SegmentationTraining, "on_train_start", remember, raising=False)
    ft.finetune(export, images, masks, tmp_path / "seg", progress=False,
                overrides={"data": {"resolution": [32, 32], "num_classes": NUM_CLASSES, "ignore_index": IGNORE,
                                    "num_workers": 0},
                           "model": {"decoder_channels": 32}, "optim": {"iterations": 1, "batch_size": 2},
                           "trainer": {"accelerator": "cpu", "precision": "32-true"}})
    _, weights, _ = read_backbone_export(export)
    assert start and all(torch.equal(start[k], weights[k]) for k in start)


def test_report_shows_teacher_and_student(trained):
    out = trained / "report.html"
    assert main(["report", "--teacher", str(trained / "teacher"), "--student", str(trained / "student"),
                 "--data", str(trained / "images"), "--out", str(out)]) == 0
    page = out.read_text()
    assert page.count("data:image/png;base64") > 20
    assert "Teacher feature activation maps" in page and "Student after distillation" in page


def test_viz_writes_pngs_and_a_page_that_shows_them(trained):
    from PIL import Image

    out = trained / "viz"
    assert main(["viz", "--teacher", str(trained / "teacher"), "--data", str(trained / "images"),
                 "--out", str(out), "--num-images", "2"]) == 0
    page = (out / "index.html").read_text()
    linked = re.findall(r'<img src="([^"]+)"', page)
    assert len(linked) > 10 and all((out / name).is_file() for name in linked)
    assert "k-means (k=10)" in page and any("kmeans-image1-block" in name for name in linked)
    kmeans_map = np.asarray(Image.open(out / next(n for n in linked if "kmeans-image0-block" in n)))
    assert len(np.unique(kmeans_map.reshape(-1, 3), axis=0)) > 1  # more than one cluster on a real image


def test_kmeans_maps_give_one_color_per_cluster_in_every_image():
    from dreamteacher.analysis.pictures import PALETTE, kmeans_maps

    torch.manual_seed(0)
    feats = torch.randn(2, 4, 6, 6) * 0.05
    feats[:, 0, :, :3] += 3.0  # left half of both images: one kind of feature, right half another
    feats[:, 1, :, 3:] += 3.0
    colors, labels = kmeans_maps(feats, size=(12, 12), k=2)
    assert colors.shape == (2, 12, 12, 3)
    left, right = labels[0, 0, 0], labels[0, 0, 5]
    assert left != right and (labels[:, :, :3] == left).all() and (labels[:, :, 3:] == right).all()
    assert (colors[1, 0, 0] == PALETTE[left]).all()  # the same cluster has the same color in image 1


def test_rerun_without_resume_refuses_to_overwrite(trained, capsys):
    code = main(["pretrain", "--teacher", str(trained / "teacher"), "--data", str(trained / "images"),
                 "--out", str(trained / "student"), *sets()])
    assert code == 2
    assert "already holds a training checkpoint; pass --resume" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--teacher", "{root}/missing"], "teacher not found: .*missing"),
    (["--teacher", "{root}/images"], "not a teacher this method can use; tried a .train-teacher. run folder"),
    (["--teacher", "{root}/teacher", "--model", "resnet_nope"], "student.backbone 'resnet_nope' is not a timm model"),
    (["--teacher", "{root}/teacher", "--set", "encode.blocks=[0,9]"], "block 9 is out of range"),
])
def test_bad_input_is_one_line(trained, capsys, args, message):
    args = [a.format(root=trained) for a in args]
    code = main(["pretrain", "--data", str(trained / "images"), "--out", str(trained / "bad"),
                 *sets(), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    import re

    assert re.search(message, err), err
    assert not (trained / "bad" / "checkpoints").exists()


def test_killed_run_resumes_from_last_checkpoint(trained):
    out = trained / "killed"
    cmd = [*CLI, "pretrain", "--teacher", str(trained / "teacher"), "--data", str(trained / "images"),
           "--out", str(out), "--no-progress", *sets("optim.max_steps=500")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and not ckpt.is_file():
        time.sleep(0.5)
    time.sleep(3)  # a few more steps and checkpoint rewrites
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.is_file(), "no checkpoint was written before the kill"
    step = read_checkpoint(ckpt)["global_step"]  # complete and readable: writes are atomic
    assert 1 <= step < 500
    assert main(["pretrain", "--data", str(trained / "images"), "--out", str(out), "--resume", "--no-progress",
                 "--set", f"optim.max_steps={step + 2}"]) == 0  # teacher and settings come from the run
    assert read_checkpoint(ckpt)["global_step"] == step + 2
    assert json.loads((out / "run.json").read_text())["resumed_at"] == [step]  # where this run was resumed
