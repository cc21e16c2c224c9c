"""Turning tensors into pictures: grids, heatmaps of feature activation, PCA colorings, k-means maps."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def grid(tiles: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, H, W, 3) uint8 -> one image, white padding."""
    n, h, w, _ = tiles.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = tile
    return canvas


def save_grid(images: torch.Tensor, path: str | Path, columns: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid(to_uint8(images), columns)).save(path)
    return path


def _viridis_like(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8 with a perceptual dark-blue -> green -> yellow ramp (no matplotlib needed)."""
    stops = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], np.float64)
    pos = np.clip(values, 0, 1) * (len(stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    frac = (pos - lo)[..., None]
    return (stops[lo] * (1 - frac) + stops[lo + 1] * frac).round().astype(np.uint8)


def activation_heatmap(feats_bchw: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Feature activation map (sum of squared activations over channels, as attention transfer sees
    it), normalized per image -> (B, H, W, 3) uint8."""
    act = feats_bchw.detach().float().pow(2).sum(1, keepdim=True)
    act = F.interpolate(act, size=size, mode="bilinear", align_corners=False)[:, 0]
    lo = act.flatten(1).min(1).values.view(-1, 1, 1)
    hi = act.flatten(1).max(1).values.view(-1, 1, 1)
    return _viridis_like(((act - lo) / (hi - lo).clamp_min(1e-12)).cpu().numpy())


def pca_basis(feats_bchw: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and top-k principal directions of the per-pixel feature vectors."""
    x = feats_bchw.detach().float().permute(0, 2, 3, 1).reshape(-1, feats_bchw.shape[1])
    mean = x.mean(0)
    _, _, v = torch.pca_lowrank(x - mean, q=min(k, *x.shape), center=False)
    if v.shape[1] < k:  # fewer pixels or channels than directions: the missing ones are zero
        v = torch.cat([v, v.new_zeros(v.shape[0], k - v.shape[1])], dim=1)
    return mean, v[:, :k]


def _project(feats_bchw: torch.Tensor, basis: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    mean, v = basis
    return (feats_bchw.detach().float().permute(0, 2, 3, 1) - mean) @ v  # (B, h, w, k)


def _range_of(proj: torch.Tensor) -> torch.Tensor:
    return proj.flatten(0, 2).abs().quantile(0.99, dim=0).clamp_min(1e-6)


def pca_scale(feats_bchw: torch.Tensor, basis: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per-component color range: the 99th percentile of |projection|."""
    return _range_of(_project(feats_bchw, basis))


def pca_colors(feats_bchw: torch.Tensor, basis: tuple[torch.Tensor, torch.Tensor], size: tuple[int, int],
               scale: torch.Tensor | None = None) -> np.ndarray:
    """Project features on a PCA basis, map the 3 components to RGB -> (B, H, W, 3) uint8.

    The same basis and scale applied to two feature sets give directly comparable colors.
    """
    proj = _project(feats_bchw, basis)
    if scale is None:
        scale = _range_of(proj)
    rgb = (proj / scale).clamp(-1, 1).add(1).mul(127.5).permute(0, 3, 1, 2)
    rgb = F.interpolate(rgb, size=size, mode="nearest")
    return rgb.round().byte().permute(0, 2, 3, 1).cpu().numpy()


# ten well-separated colors (Tableau 10), one per k-means cluster
PALETTE = np.array([[78, 121, 167], [242, 142, 43], [225, 87, 89], [118, 183, 178], [89, 161, 79],
                    [237, 201, 72], [176, 122, 161], [255, 157, 167], [156, 117, 95], [186, 176, 172]], np.uint8)


def kmeans(points: torch.Tensor, k: int, iterations: int = 50, seed: int = 0) -> torch.Tensor:
    """Centers of `k` clusters of the rows of `points` (N, D): k-means++ seeding, then Lloyd steps."""
    gen = torch.Generator().manual_seed(seed)
    points = points.float()
    centers = points[torch.randint(len(points), (1,), generator=gen)]
    while len(centers) < k:  # k-means++: next center drawn in proportion to the squared distance
        dist = torch.cdist(points, centers).min(dim=1).values.pow(2)
        if dist.sum() <= 0:
            break
        centers = torch.cat([centers, points[torch.multinomial(dist / dist.sum(), 1, generator=gen)]])
    for _ in range(iterations):
        labels = torch.cdist(points, centers).argmin(dim=1)
        moved = torch.stack([points[labels == c].mean(dim=0) if (labels == c).any() else centers[c]
                             for c in range(len(centers))])
        if torch.allclose(moved, centers):
            break
        centers = moved
    return centers


def kmeans_maps(feats_bchw: torch.Tensor, size: tuple[int, int], k: int = 10, seed: int = 0,
                max_points: int = 20000) -> tuple[np.ndarray, np.ndarray]:
    """Cluster every pixel's feature vector (channels standardized, l2-normalized) with one k-means
    over all images, so a color means the same cluster in every image (paper Fig. 5).
    Returns ((B, H, W, 3) uint8 colored maps at `size`, (B, h, w) cluster ids)."""
    x = feats_bchw.detach().float()
    x = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    pixels = F.normalize(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), dim=1)
    sample = pixels
    if len(pixels) > max_points:  # fit on a seeded subset, assign every pixel
        sample = pixels[torch.randperm(len(pixels), generator=torch.Generator().manual_seed(seed))[:max_points]]
    centers = kmeans(sample, min(k, len(sample)), seed=seed)
    labels = torch.cdist(pixels, centers).argmin(dim=1).view(x.shape[0], x.shape[2], x.shape[3])
    upsampled = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
    return PALETTE[upsampled.numpy() % len(PALETTE)], labels.numpy()
