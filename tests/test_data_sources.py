"""Data as users have it: folders with other files in them, unreadable images, text files of paths
and tar shards in webdataset's layout, all listed from headers only; bad input is one line."""

from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import TINY_PRESET, write_images
from dreamteacher import api
from dreamteacher.cli import main
from dreamteacher.core.errors import UserError
from dreamteacher.data.images import SKIPPED_FILE, ImageFolder, list_sources


def write_shards(images: Path, out: Path, per_shard: int) -> str:
    """The folder's images as tar shards of `per_shard` samples each, webdataset style (KEY.png, with a
    KEY.seg.png mask and a KEY.json beside it), in the folder's order; returns the brace pattern."""
    out.mkdir(parents=True)
    files = sorted(images.glob("*.png"))
    count = (len(files) + per_shard - 1) // per_shard
    for s in range(count):
        with tarfile.open(out / f"{s:06d}.tar", "w") as tar:
            for file in files[s * per_shard:(s + 1) * per_shard]:
                # a mask beside the image (KEY.seg.png) must not be taken for it
                mask = io.BytesIO()
                Image.new("L", (8, 8)).save(mask, format="PNG")
                for name, data in ((f"{file.stem}.seg.png", mask.getvalue()), (f"{file.stem}.png", file.read_bytes()),
                                   (f"{file.stem}.json", b"{}")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(out / f"{{000000..{count - 1:06d}}}.tar")


def test_a_folder_with_other_files_and_broken_images_skips_and_counts_them(tmp_path, capsys):
    images = write_images(tmp_path / "images", count=8)
    (images / "labels.csv").write_text("a,b\n")
    (images / "README.txt").write_text("my images")
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (images / "empty.png").write_bytes(b"")
    (images / "sub").mkdir()
    Image.new("RGB", (48, 40)).save(images / "sub" / "deep.png")
    listing = list_sources(images)
    assert len(listing.images) == 9 and [r.name for r in listing.images][-1] == "sub/deep.png"
    assert sorted(why for _, why in listing.skipped) == ["empty image file (zero bytes)", "not an image file",
                                                          "not an image file", "unreadable image (UnidentifiedImageError)"]
    with pytest.raises(UserError, match=r"unreadable image \(UnidentifiedImageError\): .*broken.jpg \(data.on_bad_image"):
        list_sources(images, on_bad_image="error")
    # a run writes the list and says so in one line
    assert main(["train-teacher", "--data", str(images), "--out", str(tmp_path / "t"), "--no-progress",
                 "--preset", str(TINY_PRESET), "--set", "teacher_train.max_steps=1"]) == 0
    assert "data: 9 images; skipped 4 (2 not an image file, 1 empty image file, 1 unreadable image), listed in" \
        in capsys.readouterr().err
    assert len((tmp_path / "t" / SKIPPED_FILE).read_text().splitlines()) == 4
    assert main(["train-teacher", "--data", str(images), "--out", str(tmp_path / "strict"), "--no-progress",
                 "--preset", str(TINY_PRESET), "--set", "data.on_bad_image=error"]) == 2


def test_an_image_whose_pixels_are_broken_is_replaced_and_reported_or_refused(tmp_path):
    images = write_images(tmp_path / "images", count=4)
    good = (images / "img_02.png").read_bytes()
    (images / "img_02.png").write_bytes(good[: len(good) // 2])  # header fine, pixels cut off
    dataset = ImageFolder(images, [32, 32])
    with pytest.warns(UserWarning, match="img_02.png.*the next image is used in its place"):
        assert torch.equal(dataset.load(2), dataset.load(3))
    with pytest.raises(UserError, match="unreadable image file: .*img_02.png"):
        ImageFolder(images, [32, 32], on_bad_image="error").load(2)


def test_a_text_file_of_paths_is_data(tmp_path):
    images = write_images(tmp_path / "images", count=6)
    listed = tmp_path / "mine.txt"
    listed.write_text("# two of them\nimages/img_01.png\n\n" + f"{images / 'img_04.png'}\nimages/gone.png\n")
    listing = list_sources(listed)
    assert [r.path.name for r in listing.images] == ["img_01.png", "img_04.png"]
    assert listing.skipped == [(str(tmp_path / "images" / "gone.png"), "image file not found")]


def test_shards_hold_the_same_images_and_give_the_same_losses_as_the_folder(tmp_path):
    images = write_images(tmp_path / "images", count=10)
    pattern = write_shards(images, tmp_path / "shards", per_shard=4)  # 3 shards: 4, 4 and 2 samples
    folder, shards = ImageFolder(images, [32, 32], hflip=False), ImageFolder(pattern, [32, 32], hflip=False)
    assert len(shards) == len(folder) == 10 and len(shards.listing.shards) == 3
    assert all(torch.equal(folder.load(i), shards.load(i)) for i in range(10))
    losses = {}
    for name, data in (("folder", images), ("shards", pattern)):
        run = api.train_teacher(data, tmp_path / name, preset=TINY_PRESET, overrides=["teacher_train.max_steps=6"],
                                progress=False)
        with open(run.run_dir / "logs" / "metrics.csv") as f:
            losses[name] = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
        losses[name + " weights"] = load_file(str(run.run_dir / "teacher" / "unet" /
                                                  "diffusion_pytorch_model.safetensors"))
    assert len(losses["folder"]) == 6 and losses["folder"] == losses["shards"]  # the same samples, bit for bit
    assert all(torch.equal(losses["folder weights"][k], losses["shards weights"][k]) for k in losses["folder weights"])


def notes_only(folder: Path) -> Path:
    folder.mkdir()
    (folder / "a.txt").write_text("x")
    return folder


@pytest.mark.parametrize("data,message", [
    (lambda tmp: str(tmp / "nowhere" / "{000000..000003}.tar"), "the shard pattern matches no file"),
    (lambda tmp: notes_only(tmp / "notes"), r"no readable image in .*notes \(1 files skipped, e.g. .*a.txt: not an image file\)"),
    (lambda tmp: tmp / "missing-folder", "missing-folder: not found"),
])
def test_data_with_nothing_to_train_on_is_one_line(tmp_path, capsys, data, message):
    import re

    assert main(["train-teacher", "--data", str(data(tmp_path)), "--out", str(tmp_path / "t"), "--no-progress",
                 "--preset", str(TINY_PRESET)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "t" / "checkpoints").exists()
