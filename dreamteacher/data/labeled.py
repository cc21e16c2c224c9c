"""Labeled segmentation data: image/mask folder pairs, a split file naming the labeled subset.

Every pair is checked before anything trains (image and mask exist, same size, class ids in range),
so a bad file fails with its name, not minutes later inside a loss.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from dreamteacher.core.errors import UserError
from dreamteacher.data.images import IMAGE_SUFFIXES, list_images, load_rgb, pil_to_uint8, resize_center_crop


def read_split(path: str | Path) -> list[str]:
    """File names, one per line (blank lines and `#` comments skipped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"split file not found: {path}")
    names = [line.strip() for line in path.read_text().splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise UserError(f"split file is empty: {path}")
    if len(set(names)) != len(names):
        raise UserError(f"split file names an image twice: {path}")
    return names


def find_mask(masks_dir: Path, image_name: str) -> Path:
    """The mask of `image_name`: the same relative name, or the same stem with any image suffix."""
    exact = masks_dir / image_name
    if exact.is_file():
        return exact
    stem = Path(image_name).with_suffix("")
    for suffix in (".png", *sorted(IMAGE_SUFFIXES)):
        candidate = masks_dir / stem.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    raise UserError(f"no mask for image '{image_name}' in {masks_dir}")


def load_mask(path: Path) -> np.ndarray:
    """A single-channel label map of class ids (8- or 16-bit, or palette indices)."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16", "I;16L", "I;16B"):
                raise UserError(f"mask must be a single-channel map of class ids, got mode {img.mode}: {path}")
            return np.asarray(img).astype(np.int64)
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"unreadable mask file: {path} ({exc})") from None


class SegmentationData(Dataset):
    """(image in [0, 1], CHW float; mask, HW int64 with `ignore_index` for unlabeled pixels).

    Images and masks are resized to `resolution` (bicubic / nearest) once and kept in memory as uint8.
    With `augment`, each draw is randomly rescaled by a factor in `scale_range`, cropped (padded with
    ignore where the rescaled image is smaller) back to `resolution` and flipped horizontally.
    `full_masks` keeps the masks at their own size as well, for evaluation at label resolution.
    """

    def __init__(self, images_dir: str | Path, masks_dir: str | Path, split: str | Path | None,
                 resolution: list[int], num_classes: int, ignore_index: int, augment: bool = False,
                 scale_range: tuple[float, float] = (0.5, 2.0), hflip: bool = True, full_masks: bool = False):
        images_dir, masks_dir = Path(images_dir), Path(masks_dir)
        if not masks_dir.is_dir():
            raise UserError(f"mask folder not found: {masks_dir}")
        if split is not None:
            if not images_dir.is_dir():
                raise UserError(f"image folder not found: {images_dir}")
            names = read_split(split)
            for name in names:
                if not (images_dir / name).is_file():
                    raise UserError(f"split file {split} names a missing image: {images_dir / name}")
            self.image_paths = [images_dir / n for n in names]
        else:
            self.image_paths = list_images(images_dir, resolution)
        self.names = [str(p.relative_to(images_dir)) for p in self.image_paths]
        self.mask_paths = [find_mask(masks_dir, n) for n in self.names]
        self.height, self.width = resolution
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.augment, self.scale_range, self.hflip = augment, scale_range, hflip
        self.images: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []
        self.full_masks: list[torch.Tensor] = []
        for image_path, mask_path in zip(self.image_paths, self.mask_paths):
            image = load_rgb(image_path)
            mask = self.check_mask(load_mask(mask_path), image.size, mask_path, image_path)
            self.images.append(pil_to_uint8(resize_center_crop(image, self.height, self.width)))
            small = resize_center_crop(Image.fromarray(mask.astype(np.int32)), self.height, self.width,
                                       Image.Resampling.NEAREST)
            self.masks.append(torch.from_numpy(np.asarray(small).astype(np.int64)))
            if full_masks:
                self.full_masks.append(torch.from_numpy(mask))

    def check_mask(self, mask: np.ndarray, image_size: tuple[int, int], mask_path: Path,
                   image_path: Path) -> np.ndarray:
        if (mask.shape[1], mask.shape[0]) != image_size:
            raise UserError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} "
                            f"is {image_size[0]}x{image_size[1]}")
        values = np.unique(mask)
        bad = values[((values < 0) | (values >= self.num_classes)) & (values != self.ignore_index)]
        if bad.size:
            raise UserError(f"mask {mask_path} holds class ids {bad[:5].tolist()} outside 0..{self.num_classes - 1} "
                            f"(ignore id {self.ignore_index}); check num_classes / ignore_index")
        return mask

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index].float().div(255.0)
        mask = self.masks[index]
        if self.augment:
            image, mask = self.random_scale_crop(image, mask)
            if self.hflip and torch.rand(()) < 0.5:
                image, mask = image.flip(-1), mask.flip(-1)
        return image, mask

    def random_scale_crop(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.scale_range
        scale = float(torch.empty(()).uniform_(lo, hi))
        h, w = max(1, round(self.height * scale)), max(1, round(self.width * scale))
        image = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        mask = F.interpolate(mask[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
        pad_h, pad_w = max(0, self.height - h), max(0, self.width - w)
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            mask = F.pad(mask, (0, pad_w, 0, pad_h), value=self.ignore_index)
        top = int(torch.randint(0, image.shape[1] - self.height + 1, ()))
        left = int(torch.randint(0, image.shape[2] - self.width + 1, ()))
        return (image[:, top:top + self.height, left:left + self.width],
                mask[top:top + self.height, left:left + self.width])


class Repeated(Dataset):
    """A small labeled set repeated to `length` draws, so a fixed-iteration run is one epoch."""

    def __init__(self, dataset: Dataset, length: int):
        self.dataset, self.length = dataset, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.dataset[index % len(self.dataset)]
