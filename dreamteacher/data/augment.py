"""Augmentation for distillation beyond the paper's flips (off by default): a random crop of the
image resized back to the training resolution, with the teacher's features cropped and resized by
the same box (scale jitter that keeps image and targets aligned), and color jitter of the image the
student sees only (the targets stay the teacher's features of the unjittered image, so the student
learns features that do not change with color).

With 367 frames of three drives (CamVid) a student can learn the footage itself; these ask it to
give the teacher's features at other scales and colors too (`data.crop_scale`, `data.color_jitter`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchvision.transforms import v2


def random_area_box(scale: list[float]) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in [0, 1]: a box covering a fraction of the area drawn uniformly from
    `scale`, at the image's aspect ratio, placed uniformly (torch's global generator)."""
    area = float(torch.empty(()).uniform_(scale[0], scale[1]))
    side = math.sqrt(area)
    x0 = float(torch.rand(())) * (1 - side)
    y0 = float(torch.rand(())) * (1 - side)
    return x0, y0, x0 + side, y0 + side


def crop_resize(tensor_chw: torch.Tensor, box: tuple[float, float, float, float]) -> torch.Tensor:
    """The region `box` (fractions of the width and height) of a (C, h, w) map, resampled bilinearly
    to (h, w) at the centres of the output pixels: the same geometry for an image and for every
    stride of its feature maps (the box never exceeds the map, so this only enlarges)."""
    h, w = tensor_chw.shape[-2:]
    x0, y0, x1, y1 = box
    xs = x0 + (torch.arange(w) + 0.5) / w * (x1 - x0)
    ys = y0 + (torch.arange(h) + 0.5) / h * (y1 - y0)
    grid = torch.stack(torch.meshgrid(xs * 2 - 1, ys * 2 - 1, indexing="xy"), dim=-1)[None]
    out = F.grid_sample(tensor_chw[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0].to(tensor_chw.dtype)


class DistillationViews(Dataset):
    """Wraps an image dataset ([-1, 1] images, flipped inside) or the offline feature cache ((image,
    features) pairs): returns {"images", ["features"], ["student_images"]} with the crop applied to the
    image and its features, and the jittered image the student sees as `student_images`."""

    def __init__(self, dataset: Dataset, crop_scale: list[float], color_jitter: float):
        self.dataset, self.crop_scale = dataset, list(crop_scale)
        s = color_jitter
        self.jitter = v2.ColorJitter(brightness=s, contrast=s, saturation=s, hue=min(0.5, s / 4)) if s > 0 else None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        sample = self.dataset[index]
        image, features = sample if isinstance(sample, tuple) else (sample, None)
        if self.crop_scale:
            box = random_area_box(self.crop_scale)
            image = crop_resize(image, box)
            if features is not None:
                features = [crop_resize(f, box) for f in features]
        item = {"images": image}
        if features is not None:
            item["features"] = features
        if self.jitter is not None:
            item["student_images"] = self.jitter((image + 1) / 2).clamp(0, 1) * 2 - 1
        return item
