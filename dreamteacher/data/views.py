"""Two augmented views of each image: the augmentation of BYOL (Grill et al. 2020, Table 6), which
MoCo v3 and PCD use. Both views come from the same image; they differ in blur and solarization."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from dreamteacher.data.images import ImageFolder, uint8_to_unit


def byol_view(resolution: list[int], crop_scale: list[float], blur_p: float, solarize_p: float,
              hflip: bool = True) -> v2.Compose:
    """One of BYOL's two augmentation distributions, on uint8 CHW images, at `resolution`."""
    height, width = resolution
    kernel = max(3, (min(height, width) // 10) | 1)  # BYOL's 23 px at 224, odd
    return v2.Compose([
        v2.RandomResizedCrop((height, width), scale=tuple(crop_scale), antialias=True),
        v2.RandomHorizontalFlip(p=0.5 if hflip else 0.0),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p),
        v2.RandomSolarize(threshold=128, p=solarize_p),
    ])


class TwoViews(Dataset):
    """{"images": view 1, "views2": view 2}, both in [-1, 1] at the dataset resolution. Randomness comes
    from torch's generator, so `data.sampling.SeededSamples` makes every sample's views reproducible."""

    def __init__(self, images: ImageFolder, crop_scale: list[float], hflip: bool = True):
        self.images = images
        resolution = [images.height, images.width]
        self.first = byol_view(resolution, crop_scale, blur_p=1.0, solarize_p=0.0, hflip=hflip)
        self.second = byol_view(resolution, crop_scale, blur_p=0.1, solarize_p=0.2, hflip=hflip)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.images.load(index)
        return {"images": uint8_to_unit(self.first(image)), "views2": uint8_to_unit(self.second(image))}
