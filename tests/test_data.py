"""Image folders: bad files are named before any work starts, other modes are converted."""

import numpy as np
import pytest
import torch
from PIL import Image

from dreamteacher.data.images import ImageFolder, list_images, load_rgb
from dreamteacher.core.errors import UserError


def test_modes_are_converted_to_rgb(tmp_path):
    gray = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (16, 1))
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    rgba = np.zeros((16, 32, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    paths = list_images(tmp_path)
    assert len(paths) == 3
    for path in paths:
        img = load_rgb(path)
        assert img.mode == "RGB" and img.size == (32, 16)
    # 16-bit values are rescaled (x/257), not clipped at 255
    assert np.allclose(np.asarray(load_rgb(tmp_path / "deep.png"))[..., 0], gray, atol=1)
    assert np.asarray(load_rgb(tmp_path / "alpha.png"))[0, 0, 0] == 200
    dataset = ImageFolder(tmp_path, [8, 16], hflip=True)
    sample = dataset[0]
    assert sample.shape == (3, 8, 16) and sample.dtype == torch.float32
    assert -1.0 <= float(sample.min()) and float(sample.max()) <= 1.0


@pytest.mark.parametrize("name, content, message", [
    ("empty.png", b"", r"empty image file \(zero bytes\): .*empty.png"),
    ("broken.png", b"\x89PNG not really", r"unreadable image \(UnidentifiedImageError\): .*broken.png"),
])
def test_bad_labeled_images_are_named(tmp_path, name, content, message):
    """Labeled image folders stay strict (every labeled image counts); files that are not images are
    skipped there too."""
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "notes.txt").write_bytes(b"hello")
    assert list_images(tmp_path) == [tmp_path / "ok.png"]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=message):
        list_images(tmp_path)


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(UserError, match="no readable image in"):
        list_images(tmp_path)
    with pytest.raises(UserError, match="image folder not found"):
        list_images(tmp_path / "missing")


def test_resize_keeps_aspect_by_center_crop(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, 10:30] = 255  # a white center band that must stay in the center crop
    Image.fromarray(img).save(tmp_path / "wide.png")
    out = ImageFolder(tmp_path, [16, 16], hflip=False)[0]
    assert float(out.mean()) > 0.9


def test_random_crops_are_windows_of_the_resized_image(tmp_path):
    ramp = np.broadcast_to(np.arange(0, 256, 4, dtype=np.uint8)[None, :, None], (32, 64, 3)).copy()
    ramp[:, :, 1] = np.arange(0, 256, 8, dtype=np.uint8)[:, None]  # rows in green, columns in red
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    whole = ImageFolder(tmp_path, [32, 64], hflip=False)[0]
    cropped = ImageFolder(tmp_path, [32, 64], hflip=False, crop=[16, 32])
    corners = set()
    for seed in range(20):
        torch.manual_seed(seed)
        crop = cropped[0]
        assert crop.shape == (3, 16, 32)
        top = int(torch.isclose(whole[1, :, 0], crop[1, 0, 0]).nonzero()[0])
        left = int(torch.isclose(whole[0, 0], crop[0, 0, 0]).nonzero()[0])
        assert torch.equal(crop, whole[:, top:top + 16, left:left + 32])
        corners.add((top, left))
    assert len(corners) > 5  # drawn at random, not a fixed window
