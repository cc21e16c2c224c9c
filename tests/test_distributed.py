"""Many processes: sharding without duplicates, the same data whatever the world size, a two-process
(gloo) run that follows the one-process loss curve, a resume at another world size, and a run
stopped mid-epoch that resumes to the very weights of an uninterrupted one."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from conftest import TINY_PRESET, write_images
from dreamteacher import api
from dreamteacher.export.checkpoints import read_checkpoint
from dreamteacher.data.images import ImageFolder
from dreamteacher.data.sampling import EpochKeySampler, SeededSamples, seeded_noise

CLI = [sys.executable, "-m", "dreamteacher.cli"]


def batches(dataset, world: int, rank: int, global_batch: int, epoch: int) -> list[dict]:
    sampler = EpochKeySampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=3, drop_last=True)
    sampler.set_epoch(epoch)
    return list(DataLoader(dataset, batch_size=global_batch // world, sampler=sampler, drop_last=True))


def test_every_world_size_sees_the_same_global_batches(tmp_path):
    dataset = SeededSamples(ImageFolder(write_images(tmp_path / "images", count=12), [32, 32], hflip=True),
                            seed=3, noise=True)
    for epoch in (0, 1):
        one = batches(dataset, 1, 0, 4, epoch)
        ranks = [batches(dataset, 2, rank, 4, epoch) for rank in (0, 1)]
        assert len(one) == len(ranks[0]) == len(ranks[1]) == 3
        for step, whole in enumerate(one):
            shards = [ranks[0][step], ranks[1][step]]
            for key in ("images", "noise_seed"):  # same images, flips and noise: only split differently
                together = torch.cat([s[key] for s in shards])
                assert sorted(map(hash_tensor, together)) == sorted(map(hash_tensor, whole[key]))
        seen = [int(x) for rank in ranks for b in rank for x in b["noise_seed"]]
        assert len(seen) == len(set(seen)) == 12  # each image once per epoch, in one process only
    # a new epoch draws new flips and noise for the same image
    first, second = ({int(x) for b in batches(dataset, 1, 0, 4, e) for x in b["noise_seed"]} for e in (0, 1))
    assert not first & second


def test_seeded_noise_depends_on_the_sample_seed_alone():
    like = torch.zeros(3, 2, 4, 4)
    noise = seeded_noise(torch.tensor([5, 6, 5]), like)
    assert noise.shape == like.shape and torch.equal(noise[0], noise[2]) and not torch.equal(noise[0], noise[1])
    assert torch.equal(seeded_noise(torch.tensor([6]), like[:1])[0], noise[1])  # whatever the batch around it
    assert abs(noise.std().item() - 1) < 0.3


def hash_tensor(t: torch.Tensor) -> int:
    return hash(t.flatten()[:64].numpy().tobytes())


def losses(run: Path) -> list[float]:
    rows = [row for row in csv.DictReader(open(run / "logs" / "metrics.csv")) if row.get("train/loss")]
    return [float(row["train/loss"]) for row in rows]


# BatchNorm normalizes over each process's share of the batch (SyncBatchNorm needs a GPU), so the
# curves differ by the batch-statistics noise of 8 vs 16 images: a few percent, not more (measured:
# 0.2-5.2% per step, 2.2% on average). A wrong gradient average or duplicated data shows far more.
CURVE_TOLERANCE = 0.08  # any one step
MEAN_TOLERANCE = 0.04  # over the curve


def assert_same_curve(one: list[float], other: list[float], what: str) -> None:
    assert len(one) == len(other), f"{what}: {len(other)} steps against {len(one)}"
    gaps = [abs(a - b) / a for a, b in zip(one, other)]
    for step, (a, b) in enumerate(zip(one, other)):
        assert gaps[step] <= CURVE_TOLERANCE, f"step {step}: one process {a:.4f}, {what} {b:.4f}"
    assert sum(gaps) / len(gaps) <= MEAN_TOLERANCE, f"curves: one process {one}, {what} {other}"


def test_a_global_batch_gives_the_same_curve_at_any_device_count_and_micro_batch(tmp_path, tiny_teacher_dir):
    """optim.batch_size is the global batch: 1 process x 16, 2 gloo processes x micro-batches of 4 x 2
    accumulated, and 1 process x 4 x 4 accumulated see the same samples per step at the same learning
    rate; only BatchNorm's statistics differ (over 16, 8 or 4 images): within the DDP parity tolerance.
    Each step's logged loss is its global batch's."""
    images = write_images(tmp_path / "images", count=32)
    common = ["--teacher", str(tiny_teacher_dir), "--data", str(images), "--no-progress", "--preset", str(TINY_PRESET),
              "--set", "optim.batch_size=16", "--set", "optim.epochs=3", "--set", "trainer.checkpoint_every_n_steps=100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    curves = {}
    for name, extra in (("1 x 16", []), ("2 x 4 x 2", ["trainer.devices=2", "trainer.strategy=ddp", "optim.micro_batch=4"]),
                        ("1 x 4 x 4", ["optim.micro_batch=4"])):
        args = [*CLI, "pretrain", *common, "--out", str(tmp_path / name.replace(" ", ""))]
        for item in extra:
            args += ["--set", item]
        result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        curves[name] = losses(tmp_path / name.replace(" ", ""))
    assert len(curves["1 x 16"]) == 6
    assert_same_curve(curves["1 x 16"], curves["2 x 4 x 2"], "2 processes x 4 x 2 accumulated")
    assert_same_curve(curves["1 x 16"], curves["1 x 4 x 4"], "1 process x 4 x 4 accumulated")


def test_a_micro_batch_that_does_not_fit_the_global_batch_is_one_line(tmp_path, tiny_teacher_dir, capsys):
    from dreamteacher.cli import main

    images = write_images(tmp_path / "images", count=16)
    common = ["pretrain", "--teacher", str(tiny_teacher_dir), "--data", str(images), "--no-progress",
              "--preset", str(TINY_PRESET)]
    for extra, message in ((["optim.micro_batch=8"], "optim.micro_batch=8 is larger than the global batch "
                                                     "optim.batch_size=4"),
                           (["optim.batch_size=8", "optim.micro_batch=3"], "optim.micro_batch=3 does not divide the 8 "
                                                                           "images each of the 1 processes takes")):
        args = [*common, "--out", str(tmp_path / "x")]
        for item in extra:
            args += ["--set", item]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert not (tmp_path / "x" / "checkpoints").exists()


def test_two_process_gloo_run_follows_the_one_process_curve_and_resumes_at_another_size(tmp_path,
                                                                                        tiny_teacher_dir):
    images = write_images(tmp_path / "images", count=32)
    settings = ["optim.batch_size=16", "optim.epochs=3", "trainer.checkpoint_every_n_steps=100"]
    common = ["--teacher", str(tiny_teacher_dir), "--data", str(images), "--no-progress", "--preset", str(TINY_PRESET)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def pretrain(out: Path, *extra: str) -> None:
        args = [*CLI, "pretrain", *common, "--out", str(out)]
        for item in [*settings, *extra]:
            args += ["--set", item]
        result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
        assert result.returncode == 0, result.stderr[-2000:]

    pretrain(tmp_path / "one")
    pretrain(tmp_path / "two", "trainer.devices=2", "trainer.strategy=ddp")
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 6  # 2 steps per epoch: the global batch is split, not doubled
    assert_same_curve(one, two, "two processes")

    # the two-process checkpoint continues in one process
    args = [*CLI, "pretrain", "--data", str(images), "--out", str(tmp_path / "two"), "--resume", "--no-progress",
            "--set", "optim.max_steps=8"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert read_checkpoint(tmp_path / "two" / "checkpoints" / "last.ckpt")["global_step"] == 8


class StopAt(Callback):
    """Stands in for a kill: stops the run once `step` optimizer steps are done."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            raise RuntimeError("stopped")


@pytest.mark.parametrize("micro_batch", [0, 2], ids=["whole batches", "micro-batches of 2, 2 accumulated"])
def test_a_run_stopped_mid_epoch_resumes_to_the_same_weights(tmp_path, tiny_teacher_dir, micro_batch):
    images = write_images(tmp_path / "images", count=8)  # batch 4: 2 steps per epoch, 6 in all
    settings = ["optim.epochs=3", f"optim.micro_batch={micro_batch}"]
    whole = api.pretrain(images, tmp_path / "whole", tiny_teacher_dir, preset=TINY_PRESET, overrides=settings,
                         progress=False)
    job = api.prepare_pretraining(images, tmp_path / "cut", tiny_teacher_dir, preset=TINY_PRESET, overrides=settings,
                                  progress=False, callbacks=[StopAt(4)])
    with pytest.raises(RuntimeError, match="stopped"):
        job.trainer.fit(job.module, job.loader)
    assert read_checkpoint(tmp_path / "cut" / "checkpoints" / "last.ckpt")["global_step"] == 3  # mid epoch 1
    resumed = api.pretrain(images, tmp_path / "cut", resume=True, progress=False)
    assert resumed.steps == whole.steps == 6
    a = load_file(whole.files["backbone"])
    b = load_file(resumed.files["backbone"])
    assert all(torch.equal(a[key], b[key]) for key in a)  # the same batches, flips and noise, in order
