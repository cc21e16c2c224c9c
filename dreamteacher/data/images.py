"""Unlabeled image folders: checked up front, converted to RGB, resized and center-cropped."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from dreamteacher.core.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def list_images(folder: str | Path, resolution: list[int] | None = None) -> list[Path]:
    """All image files under `folder` (recursive, sorted), each checked to open; clear error otherwise.
    With `resolution` ([height, width] the images will be resized to), one warning says how many are
    smaller (they are upscaled, which a user may not expect) and the smallest of them.

    Only headers are read here, so this is fast even for large folders; files whose pixels turn out
    to be corrupt fail later with their name (see `load_rgb`).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    images = []
    small: list[tuple[int, int, Path]] = []
    for path in paths:
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise UserError(f"not an image file (expected one of {sorted(IMAGE_SUFFIXES)}): {path}")
        if path.stat().st_size == 0:
            raise UserError(f"empty (zero-byte) image file: {path}")
        try:
            with Image.open(path) as img:
                width, height = img.size
                img.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise UserError(f"unreadable image file: {path} ({exc.__class__.__name__})") from None
        if resolution is not None and (height < resolution[0] or width < resolution[1]):
            small.append((width * height, f"{width}x{height}", path))
        images.append(path)
    if not images:
        raise UserError(f"no images found in {folder}")
    if small:
        _, size, path = min(small)
        warnings.warn(f"{len(small)} of {len(images)} images in {folder} are smaller than the training resolution "
                      f"{resolution[1]}x{resolution[0]} (the smallest: {path.name}, {size}); they are upscaled",
                      stacklevel=3)
    return images


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16-bit and float images are rescaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 65535.0
        else:  # 32-bit int or float: min-max to the image's own range
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray((arr * 255.0).round().astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"unreadable image file: {path} ({exc})") from None


def resize_center_crop(img: Image.Image, height: int, width: int,
                       resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    """Scale so the image covers height x width, then crop the center (keeps aspect ratio)."""
    scale = max(height / img.height, width / img.width)
    new_size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    img = img.resize(new_size, resample)
    left, top = (img.width - width) // 2, (img.height - height) // 2
    return img.crop((left, top, left + width, top + height))


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 CHW tensor."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def uint8_to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [-1, 1], the diffusion convention."""
    return images.float().div(127.5).sub(1.0)


def as_sources(data: str | Path | list | tuple) -> list[Path]:
    """`data` as a list of sources (a folder, or several together)."""
    return [Path(d) for d in data] if isinstance(data, (list, tuple)) else [Path(data)]


class ImageFolder(Dataset):
    """Images in [-1, 1], CHW, at a fixed resolution; random horizontal flip when `hflip`, then a
    random [height, width] `crop` of the resized image when given (the object scale is kept).

    `folder` is one folder or a list of them (their images together, in the order given). `names`
    says which image each index is: its path relative to its folder (prefixed `i/` with several).
    Small folders are decoded once and kept in memory (they are re-read every epoch otherwise).
    """

    def __init__(self, folder: str | Path | list, resolution: list[int], hflip: bool = True,
                 cache_in_memory: bool | None = None, crop: list[int] | None = None):
        sources = as_sources(folder)
        self.paths, self.names = [], []
        for i, source in enumerate(sources):
            listed = list_images(source, resolution)
            self.paths += listed
            prefix = f"{i}/" if len(sources) > 1 else ""
            self.names += [prefix + str(path.relative_to(source)) for path in listed]
        self.height, self.width = resolution
        self.hflip = hflip
        self.crop = crop
        if cache_in_memory is None:  # ~190 KB per image at 256x256: as uint8: keep up to ~1 GB
            cache_in_memory = len(self.paths) * 3 * self.height * self.width <= 1 << 30
        self._cache: dict[int, torch.Tensor] | None = {} if cache_in_memory else None

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> torch.Tensor:
        """uint8 CHW at the dataset resolution."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        img = resize_center_crop(load_rgb(self.paths[index]), self.height, self.width)
        tensor = pil_to_uint8(img)
        if self._cache is not None:
            self._cache[index] = tensor
        return tensor

    def __getitem__(self, index: int) -> torch.Tensor:
        image = uint8_to_unit(self.load(index))
        if self.hflip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        if self.crop:
            height, width = self.crop
            top = int(torch.randint(self.height - height + 1, ()))
            left = int(torch.randint(self.width - width + 1, ()))
            image = image[:, top:top + height, left:left + width]
        return image


class SynthesizedSeeds(Dataset):
    """An epoch of `length` samples for a teacher that renders its own images (a GAN): each item is
    empty; `engine.SeededSamples` gives it the seed the teacher draws z and the flip from."""

    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return {}
