"""The live dense probe: its readout on a toy problem with a known answer, its schedule and resume, the
label-free signal, MLflow as a logger, and a student started from the user's own weights."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import IGNORE, NUM_CLASSES, REPO, TINY_PRESET, write_images, write_scenes
from dreamteacher import api
from dreamteacher.analysis.probe import effective_rank, readout_miou
from dreamteacher.core.errors import UserError
from dreamteacher.engine.probe import read_probe_log


def test_the_readout_recovers_labels_that_are_linear_in_the_features_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (6, 16, 16), generator=gen)
    labels[:, 0, :] = 255  # ignored pixels play no part
    onehot = torch.nn.functional.one_hot(labels.clamp(max=2), 3).permute(0, 3, 1, 2).float()
    mix = torch.randn(3, 8, generator=gen)
    features = torch.einsum("bkhw,kc->bchw", onehot, mix) + 0.01 * torch.randn(6, 8, 16, 16, generator=gen)
    assert readout_miou(features[:3], labels[:3], features[3:], labels[3:], 3, 255) == pytest.approx(100.0)
    noise = torch.randn(6, 8, 16, 16, generator=gen)
    assert readout_miou(noise[:3], labels[:3], noise[3:], labels[3:], 3, 255) < 50
    # effective rank: features spread over 8 directions against features on one
    assert effective_rank(torch.randn(2, 8, 16, 16, generator=gen)) > 6
    assert effective_rank(torch.randn(2, 1, 16, 16, generator=gen).repeat(1, 8, 1, 1)) == pytest.approx(1.0, abs=0.01)


def probe_settings(scenes: tuple[Path, Path], every: int = 1) -> list[str]:
    images, masks = scenes
    (images.parent / "probe_split.txt").write_text("scene_0.png\nscene_1.png\nscene_2.png\n")
    return [f"probe.images={images}", f"probe.masks={masks}", f"probe.split={images.parent / 'probe_split.txt'}",
            f"probe.num_classes={NUM_CLASSES}", f"probe.ignore_index={IGNORE}", f"probe.every_n_epochs={every}",
            "probe.pictures=2"]


def test_the_probe_runs_at_the_start_and_every_n_epochs_and_reports_in_run_json(tmp_path, tiny_teacher_dir):
    images = write_images(tmp_path / "images")
    scenes = write_scenes(tmp_path / "scenes", size=(32, 32))
    run = api.pretrain(images, tmp_path / "run", tiny_teacher_dir, progress=False,
                       preset=TINY_PRESET, overrides=["optim.epochs=5"] + probe_settings(scenes, every=2))
    records = read_probe_log(run.run_dir)
    assert [r["epoch"] for r in records] == [0, 2, 4, 5]  # the start, every 2 epochs, and the last
    assert all(0 <= r["miou"] <= 100 and r["effective_rank"] >= 1 for r in records)
    summary = json.loads((run.run_dir / "run.json").read_text())["probe"]
    assert summary["first"]["epoch"] == 0 and summary["last"]["epoch"] == 5
    assert summary["best_epoch"] in {0, 2, 4, 5}
    csv = (run.run_dir / "logs" / "metrics.csv").read_text()
    assert "probe/miou" in csv and "probe/effective_rank" in csv
    events = list((run.run_dir / "logs").glob("events.out.tfevents*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(events[0]), size_guidance={"images": 0}).Reload().Tags()["images"]
    assert "probe/student/level0/pca" in tags and "probe/teacher/level0/kmeans" in tags and "probe/images" in tags
    from dreamteacher.viz.report import write_report

    page = write_report(tiny_teacher_dir, images, tmp_path / "report.html", student_run=run.run_dir, num_images=1,
                        num_samples=0).read_text()
    assert "the live probe" in page and page.count("<img") >= 2


def test_a_probe_without_labels_logs_the_label_free_signal(tmp_path, tiny_teacher_dir):
    images = write_images(tmp_path / "images")
    run = api.pretrain(images, tmp_path / "run", tiny_teacher_dir, progress=False,
                       preset=TINY_PRESET, overrides=[f"probe.images={images}", "probe.every_n_epochs=1"])
    records = read_probe_log(run.run_dir)
    assert [r["epoch"] for r in records] == [0, 1, 2] and all(r["miou"] is None for r in records)
    assert json.loads((run.run_dir / "run.json").read_text())["probe"]["best_effective_rank"] > 0


def test_the_probe_changes_nothing_the_run_computes(tmp_path, tiny_teacher_dir):
    images = write_images(tmp_path / "images")
    scenes = write_scenes(tmp_path / "scenes", size=(32, 32))
    plain = api.pretrain(images, tmp_path / "plain", tiny_teacher_dir, preset=TINY_PRESET, progress=False)
    probed = api.pretrain(images, tmp_path / "probed", tiny_teacher_dir, progress=False,
                          preset=TINY_PRESET, overrides=probe_settings(scenes))
    assert [r["epoch"] for r in read_probe_log(probed.run_dir)] == [0, 1, 2]  # it ran, at every epoch
    assert not read_probe_log(plain.run_dir)
    a, b = load_file(str(plain.files["backbone"])), load_file(str(probed.files["backbone"]))
    assert all(torch.equal(a[k], b[k]) for k in a)


KILL_AFTER_PROBE = """
import os, signal, sys
import dreamteacher.engine.probe as probe

real_run = probe.DenseProbe.run

def run_then_die(self, trainer, pl_module, epoch):
    real_run(self, trainer, pl_module, epoch)
    if epoch == 2:  # killed right after the epoch-2 probe was logged, before anything else
        os.kill(os.getpid(), signal.SIGKILL)

probe.DenseProbe.run = run_then_die
from dreamteacher.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_killed_after_a_probe_resumes_without_duplicating_or_losing_one(tmp_path, tiny_teacher_dir):
    images = write_images(tmp_path / "images")
    scenes = write_scenes(tmp_path / "scenes", size=(32, 32))
    args = ["pretrain", "--teacher", str(tiny_teacher_dir), "--data", str(images), "--out", str(tmp_path / "run"),
            "--no-progress", "--preset", str(TINY_PRESET), *sum((["--set", s] for s in ["optim.epochs=4"] + probe_settings(scenes)), [])]
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_PROBE, *args], cwd=REPO / "tests",
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert [r["epoch"] for r in read_probe_log(tmp_path / "run")] == [0, 1, 2]
    from dreamteacher.cli import main

    assert main([*args, "--resume"]) == 0
    assert [r["epoch"] for r in read_probe_log(tmp_path / "run")] == [0, 1, 2, 3, 4]


def test_bad_probe_input_is_refused_before_training(tmp_path, tiny_teacher_dir):
    images = write_images(tmp_path / "images")
    scenes = write_scenes(tmp_path / "scenes", size=(32, 32))
    mask = np.array(Image.open(scenes[1] / "scene_4.png"))
    mask[5, 5] = 7  # a class id the probe's class count does not have
    Image.fromarray(mask).save(scenes[1] / "scene_4.png")
    with pytest.raises(UserError, match=r"scene_4.png holds class ids \[7\]"):
        api.pretrain(images, tmp_path / "a", tiny_teacher_dir, progress=False, preset=TINY_PRESET, overrides=probe_settings(scenes))
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(scenes[1] / "scene_4.png")
    with pytest.raises(UserError, match="scene_4.png is 10x10 but its image"):
        api.pretrain(images, tmp_path / "b", tiny_teacher_dir, progress=False, preset=TINY_PRESET, overrides=probe_settings(scenes))
    with pytest.raises(UserError, match="probe.num_classes must be set"):
        api.pretrain(images, tmp_path / "c", tiny_teacher_dir, progress=False,
                     preset=TINY_PRESET, overrides=[f"probe.images={scenes[0]}", f"probe.masks={scenes[1]}"])
    with pytest.raises(UserError, match="trainer.mlflow_uri http://127.0.0.1:9: the MLflow server does not answer"):
        api.pretrain(images, tmp_path / "d", tiny_teacher_dir, progress=False,
                     preset=TINY_PRESET, overrides=["trainer.loggers=[csv,mlflow]", "trainer.mlflow_uri=http://127.0.0.1:9"])
    assert not any((tmp_path / name / "checkpoints").exists() for name in "abcd")


def test_mlflow_receives_the_config_the_metrics_and_the_exports(tmp_path, tiny_teacher_dir):
    import mlflow

    images = write_images(tmp_path / "images")
    scenes = write_scenes(tmp_path / "scenes", size=(32, 32))
    store = (tmp_path / "mlruns").as_uri()
    run = api.pretrain(images, tmp_path / "run", tiny_teacher_dir, progress=False,
                       preset=TINY_PRESET, overrides=probe_settings(scenes) + ["trainer.loggers=[csv,mlflow]",
                                                                   f"trainer.mlflow_uri={store}"])
    client = mlflow.MlflowClient(tracking_uri=store)
    (logged,) = client.search_runs([client.get_experiment_by_name("dreamteacher").experiment_id])
    assert logged.data.params["config/optim/epochs"] == "2" and logged.data.params["method"] == "dt-feat"
    assert {"train/loss", "probe/miou", "probe/effective_rank"} <= set(logged.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"backbone.safetensors", "run.json"} <= artifacts
    assert run.files["backbone"].is_file()


def test_a_student_starts_from_the_users_weights_checked_strictly(tmp_path, tiny_teacher_dir):
    import timm

    images = write_images(tmp_path / "images")
    torch.manual_seed(123)
    mine = timm.create_model("test_resnet", num_classes=10).state_dict()  # with its classifier, as downloaded
    save_file(mine, str(tmp_path / "mine.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in mine.items()}}, tmp_path / "mine.pth")
    for source in ("mine.safetensors", "mine.pth"):
        job = api.prepare_pretraining(images, tmp_path / source.replace(".", "-"), tiny_teacher_dir, preset=TINY_PRESET,
                                      progress=False, init=tmp_path / source)
        started = job.module.backbone_model().state_dict()
        assert all(torch.equal(started[k], mine[k]) for k in started if k in mine)
    wrong = timm.create_model("resnet18", num_classes=0).state_dict()
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(UserError, match="wrong.safetensors .for test_resnet.: backbone weights do not fit the model"):
        api.pretrain(images, tmp_path / "x", tiny_teacher_dir, preset=TINY_PRESET, progress=False,
                     init=tmp_path / "wrong.safetensors")
    bad = {k: v.clone() for k, v in mine.items()}
    next(v for v in bad.values() if v.is_floating_point()).fill_(math.nan)
    save_file(bad, str(tmp_path / "nan.safetensors"))
    with pytest.raises(UserError, match="nan.safetensors: .* NaN or infinite"):
        api.pretrain(images, tmp_path / "y", tiny_teacher_dir, preset=TINY_PRESET, progress=False,
                     init=tmp_path / "nan.safetensors")
    assert os.path.exists(tmp_path / "mine.safetensors")
