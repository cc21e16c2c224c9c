"""The offline feature cache: what it stores, when it is reused, refused or rebuilt, and that a killed
build is never read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, TINY_PRESET, write_images
from dreamteacher import api
from dreamteacher.core.config import build_config
from dreamteacher.data.images import ImageFolder, uint8_to_unit
from dreamteacher.core.errors import UserError
from dreamteacher.data.features import CachedFeatures, read_meta
from dreamteacher.teachers.encoding import build_cache, cache_key, open_cache

CPU = torch.device("cpu")


def setup(root: Path, teacher_dir: Path, count: int = 6, t: int = 50):
    images = write_images(root / "images", count=count)
    config = build_config(None, TINY + [f"encode.t={t}"])
    dataset = ImageFolder(images, config.data.resolution, hflip=False)
    return images, dataset, api.load_teacher(teacher_dir, config)


def test_cache_holds_k_teacher_encodings_in_fp16(tmp_path, tiny_teacher_dir):
    images, dataset, teacher = setup(tmp_path, tiny_teacher_dir)
    meta = open_cache(tmp_path / "cache", tiny_teacher_dir, teacher, dataset, encodings=2, device=CPU,
                      progress=False)
    arrays = [np.load(tmp_path / "cache" / f"block{s.block}.npy") for s in teacher.feature_specs]
    assert [a.shape for a in arrays] == [(6, 2, s.channels, 32 // s.stride, 32 // s.stride)
                                         for s in teacher.feature_specs]
    assert all(a.dtype == np.float16 for a in arrays)
    # the same noise draws, replayed: cache = teacher encoding, to fp16 precision
    generator = torch.Generator().manual_seed(0)
    batch = torch.stack([uint8_to_unit(dataset.load(i)) for i in range(6)])
    for k in range(2):
        for array, feats in zip(arrays, teacher.encode(batch, generator=generator)):
            torch.testing.assert_close(torch.from_numpy(array[:, k]).float(), feats, atol=2e-2, rtol=2e-3)
    # two encodings are two noise draws, not one stored twice
    assert not np.array_equal(arrays[-1][:, 0], arrays[-1][:, 1])
    assert meta["key"]["encodings"] == 2 and read_meta(tmp_path / "cache") == meta
    info = api.info(tmp_path / "cache")
    assert info["kind"] == "teacher feature cache" and info["images"] == 6 and info["encodings_per_image"] == 2


def test_cache_is_reused_and_refused_when_its_inputs_changed(tmp_path, tiny_teacher_dir):
    images, dataset, teacher = setup(tmp_path, tiny_teacher_dir)
    folder = tmp_path / "cache"
    open_cache(folder, tiny_teacher_dir, teacher, dataset, 1, CPU, progress=False)
    stamp = (folder / "meta.json").stat().st_mtime_ns
    open_cache(folder, tiny_teacher_dir, teacher, dataset, 1, CPU, progress=False)
    assert (folder / "meta.json").stat().st_mtime_ns == stamp  # reused, not rebuilt

    other_t = api.load_teacher(tiny_teacher_dir, build_config(None, TINY + ["encode.t=20"]))
    with pytest.raises(UserError, match=r"t: cached 50, now 20.*--rebuild-cache"):
        open_cache(folder, tiny_teacher_dir, other_t, dataset, 1, CPU, progress=False)
    other_blocks = api.load_teacher(tiny_teacher_dir, build_config(None, TINY + ["encode.blocks=[0,2]"]))
    with pytest.raises(UserError, match="blocks"):
        open_cache(folder, tiny_teacher_dir, other_blocks, dataset, 1, CPU, progress=False)
    with pytest.raises(UserError, match="encodings: cached 1, now 3"):
        open_cache(folder, tiny_teacher_dir, teacher, dataset, 3, CPU, progress=False)
    write_images(images, count=7)  # one more image
    grown = ImageFolder(images, [32, 32], hflip=False)
    with pytest.raises(UserError, match="images"):
        open_cache(folder, tiny_teacher_dir, teacher, grown, 1, CPU, progress=False)
    retrained = next(tiny_teacher_dir.rglob("*.safetensors"))  # other weights, same everything else
    tensors = __import__("safetensors.torch", fromlist=["load_file"]).load_file(retrained)
    __import__("safetensors.torch", fromlist=["save_file"]).save_file(
        {k: v + 1 if i == 0 else v for i, (k, v) in enumerate(tensors.items())}, retrained)
    with pytest.raises(UserError, match="teacher"):
        open_cache(folder, tiny_teacher_dir, teacher, dataset, 1, CPU, progress=False)
    meta = open_cache(folder, tiny_teacher_dir, teacher, grown, 1, CPU, rebuild=True, progress=False)
    assert meta["key"]["num_images"] == 7


def test_a_killed_build_is_never_read(tmp_path, tiny_teacher_dir, monkeypatch):
    images, dataset, teacher = setup(tmp_path, tiny_teacher_dir, count=8)
    folder = tmp_path / "cache"
    calls = {"n": 0}
    real_encode = teacher.encode

    def dies_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the process is stopped halfway through the build
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(teacher, "encode", dies_on_second_batch)
    key = cache_key(tiny_teacher_dir, teacher, dataset, 1)
    with pytest.raises(KeyboardInterrupt):
        build_cache(folder, teacher, dataset, key, CPU, batch_size=4, progress=False)
    assert not folder.exists() and read_meta(folder) is None  # only the .partial sibling was written
    monkeypatch.setattr(teacher, "encode", real_encode)
    meta = open_cache(folder, tiny_teacher_dir, teacher, dataset, 1, CPU, progress=False)
    assert meta["key"] == key and not folder.with_name("cache.partial").exists()


def test_cached_sample_flips_image_and_features_together(tmp_path, tiny_teacher_dir):
    images, dataset, teacher = setup(tmp_path, tiny_teacher_dir)
    meta = open_cache(tmp_path / "cache", tiny_teacher_dir, teacher, dataset, 1, CPU, progress=False)
    flipping = CachedFeatures(ImageFolder(images, [32, 32], hflip=True), tmp_path / "cache", meta)
    stored = [np.load(tmp_path / "cache" / f"block{s.block}.npy")[3, 0] for s in teacher.feature_specs]
    original = uint8_to_unit(dataset.load(3))
    seen = set()
    for _ in range(20):
        image, feats = flipping[3]
        flipped = not torch.equal(image, original)
        assert torch.equal(image, original.flip(-1) if flipped else original)
        for f, s in zip(feats, stored):
            assert torch.equal(f, torch.from_numpy(s).flip(-1) if flipped else torch.from_numpy(s))
        seen.add(flipped)
    assert seen == {True, False}


def test_pretrain_with_cache_trains_without_the_teacher(tmp_path, tiny_teacher_dir, monkeypatch):
    images = write_images(tmp_path / "images")
    first = api.pretrain(images, tmp_path / "a", tiny_teacher_dir, preset=TINY_PRESET, progress=False,
                         cache=tmp_path / "cache")
    assert (first.run_dir / "backbone.safetensors").is_file() and first.steps == 4
    assert read_meta(tmp_path / "cache")["key"]["encodings"] == 4  # encode.cache_encodings default

    from dreamteacher.teachers.diffusion import DiffusionTeacher

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher ran although the cache holds its features")

    monkeypatch.setattr(DiffusionTeacher, "encode", no_teacher)
    second = api.pretrain(images, tmp_path / "b", tiny_teacher_dir, preset=TINY_PRESET, progress=False,
                          cache=tmp_path / "cache")
    assert second.steps == 4 and np.isfinite(second.final_loss)
    resumed = api.pretrain(images, tmp_path / "b", resume=True, progress=False, optim={"max_steps": 6})
    assert resumed.steps == 6  # teacher and cache come from the run: still no teacher pass


def test_crop_scale_crops_image_and_cached_features_by_one_box_and_jitter_touches_the_student_image_only(
        tmp_path, tiny_teacher_dir):
    from dreamteacher.data.augment import DistillationViews, crop_resize

    # the geometry: the whole box is the identity; the left half of a ramp is the ramp's first half,
    # stretched, at any stride
    ramp = torch.arange(16.0).repeat(2, 8, 1)  # (2, 8, 16), value = column
    assert torch.allclose(crop_resize(ramp, (0.0, 0.0, 1.0, 1.0)), ramp)
    half = crop_resize(ramp, (0.0, 0.0, 0.5, 1.0))
    # output pixel centres of the left half: columns 0.25, 0.75, ... 7.75 less half a pixel, the first
    # clamped at the border
    assert torch.allclose(half[0, 0], (torch.arange(16) * 0.5 - 0.25).clamp(min=0), atol=1e-5)
    # the same ramp at stride 4 (each pixel holds the value at its centre, 1.5, 5.5, ...): its crop is
    # the fine crop averaged over each 4 pixels, away from the clamped border
    coarse = crop_resize(ramp[:, ::4, ::4] + 1.5, (0.0, 0.0, 0.5, 1.0))
    assert torch.allclose(coarse[0, 0, 1:], half[0, 0].view(4, 4).mean(1)[1:], atol=1e-5)

    images, dataset, teacher = setup(tmp_path, tiny_teacher_dir)
    meta = open_cache(tmp_path / "cache", tiny_teacher_dir, teacher, dataset, 1, CPU, progress=False)
    cached = CachedFeatures(ImageFolder(images, [32, 32], hflip=False), tmp_path / "cache", meta)
    views = DistillationViews(cached, [0.25, 0.25], color_jitter=0.4)
    torch.manual_seed(0)
    item = views[3]
    original, feats = cached[3]
    assert item["images"].shape == original.shape and not torch.equal(item["images"], original)
    assert [f.shape for f in item["features"]] == [f.shape for f in feats]
    # the same box: re-crop the originals with the box the sample was drawn with (after the cache's
    # own draw of one of its encodings)
    from dreamteacher.data.augment import random_area_box

    torch.manual_seed(0)
    cached[3]
    box = random_area_box([0.25, 0.25])
    assert box[2] - box[0] == pytest.approx(0.5) and box[3] - box[1] == pytest.approx(0.5)
    assert torch.equal(item["images"], crop_resize(original, box))
    assert all(torch.equal(a, crop_resize(b, box)) for a, b in zip(item["features"], feats))
    # jitter: the student's image differs, the teacher's targets are those of the unjittered crop
    assert item["student_images"].shape == item["images"].shape
    assert not torch.equal(item["student_images"], item["images"])
    assert float(item["student_images"].abs().max()) <= 1.0


def test_pretrain_distills_with_crop_and_jitter_online_and_cached_and_refuses_them_elsewhere(tmp_path,
                                                                                            tiny_teacher_dir):
    images = write_images(tmp_path / "images")
    aug = ["lab.crop_scale=[0.5,1.0]", "lab.color_jitter=0.3"]
    online = api.pretrain(images, tmp_path / "online", tiny_teacher_dir, preset=TINY_PRESET, overrides=aug,
                          progress=False)
    cached = api.pretrain(images, tmp_path / "cached", tiny_teacher_dir, preset=TINY_PRESET, overrides=aug,
                          progress=False, cache=tmp_path / "cache")
    assert online.steps == cached.steps == 4
    assert np.isfinite(online.final_loss) and np.isfinite(cached.final_loss)
    with pytest.raises(UserError, match="--method dep does not read the 'lab' section"):  # distillation's alone
        api.pretrain(images, tmp_path / "dep", method="dep", preset=TINY_PRESET, overrides=aug, progress=False)
    with pytest.raises(UserError, match="crop_scale must be"):
        api.pretrain(images, tmp_path / "bad", tiny_teacher_dir, preset=TINY_PRESET, overrides=["lab.crop_scale=[0.5]"],
                     progress=False)


SHARE = """
import sys
from dreamteacher import api
api.build_feature_cache(sys.argv[1], sys.argv[2], sys.argv[3], preset=sys.argv[4], progress=False)
"""


def test_processes_started_together_each_build_their_share_of_the_cache(tmp_path, tiny_teacher_dir):
    """Under torchrun (or SLURM) every process encodes a contiguous share of the images into the same
    arrays; the first puts the cache in place once all shares are written."""
    import subprocess
    import sys

    images = write_images(tmp_path / "images", count=8)
    cache = tmp_path / "cache"
    procs = []
    for rank in (1, 0):  # the second process first: it waits for the first to lay the arrays out
        env = {**os.environ, "TORCHELASTIC_RUN_ID": "test-job", "RANK": str(rank), "WORLD_SIZE": "2",
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", SHARE, str(images), str(cache), str(tiny_teacher_dir),
                                       str(TINY_PRESET)], env=env, stderr=subprocess.PIPE, text=True))
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["built_by"] == 2 and meta["key"]["num_images"] == 8
    assert not list(cache.glob("share-*")) and not (cache / "layout.json").exists()
    for spec in meta["features"]:
        block = np.load(cache / f"block{spec['block']}.npy")
        assert block.shape[:2] == (8, meta["key"]["encodings"])
        assert np.isfinite(block).all() and (np.abs(block).reshape(8, -1).max(axis=1) > 0).all()  # every row written
