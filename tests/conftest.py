"""Tiny images, teachers and settings shared by the tests (everything is built here, nothing downloaded)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
CAMVID = REPO.parent / "shared" / "data" / "camvid"

# The tests' shared preset (tests/tiny.yaml): teacher and student commands take it alike. TINY: the
# same settings as dotted overrides, for configs of every section (build_config without sections).
TINY_PRESET = Path(__file__).resolve().parent / "tiny.yaml"
TINY = [f"{section}.{name}={json.dumps(value)}"
        for section, fields in yaml.safe_load(TINY_PRESET.read_text()).items() for name, value in fields.items()]


def write_images(folder: Path, count: int = 8, size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:
    """Smooth random scenes (gradients + rectangles), RGB PNG."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    h, w = size
    for i in range(count):
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        img = np.stack([yy * rng.uniform(50, 200), xx * rng.uniform(50, 200), (yy + xx) * 80], -1)
        for _ in range(3):
            y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
            img[y0: y0 + 8, x0: x0 + 8] = rng.uniform(0, 255, 3)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"img_{i:02d}.png")
    return folder


NUM_CLASSES, IGNORE = 3, 255  # the synthetic scenes below


def write_scenes(root: Path, count: int = 6, size: tuple[int, int] = (36, 48), seed: int = 0) -> tuple[Path, Path]:
    """Images of two colored rectangles on a background; masks: 0 background, 1 red, 2 blue, and a
    border of ignore pixels."""
    rng = np.random.default_rng(seed)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    h, w = size
    for i in range(count):
        img = np.full((h, w, 3), 90, np.uint8)
        mask = np.zeros((h, w), np.uint8)
        for cls, color in ((1, (220, 30, 30)), (2, (30, 30, 220))):
            y, x = rng.integers(0, h - 12), rng.integers(0, w - 12)
            img[y:y + 12, x:x + 12] = color
            mask[y:y + 12, x:x + 12] = cls
        mask[0, :] = IGNORE
        Image.fromarray(img).save(images / f"scene_{i}.png")
        Image.fromarray(mask).save(masks / f"scene_{i}.png")
    return images, masks


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    return write_images(tmp_path / "images")


def tiny_unet(seed: int = 0, block_out=(32, 32, 32), layers_per_block: int = 1):
    from dreamteacher.core.config import build_config
    from dreamteacher.teachers.diffusion import build_unet

    torch.manual_seed(seed)
    overrides = [o for o in TINY if not o.startswith("diffusion.block_out") and not o.startswith("diffusion.layers")]
    overrides += [f"diffusion.block_out_channels={list(block_out)}", f"diffusion.layers_per_block={layers_per_block}",
                  f"diffusion.attention_levels=[{len(block_out) - 1}]"]
    config = build_config(None, overrides)
    return build_unet(config.diffusion, config.data.resolution)


@pytest.fixture
def tiny_teacher_dir(tmp_path: Path) -> Path:
    """A random tiny U-Net saved as a diffusers DDPMPipeline folder."""
    from diffusers import DDPMPipeline

    from dreamteacher.teachers.diffusion import default_scheduler

    folder = tmp_path / "tiny_teacher"
    DDPMPipeline(unet=tiny_unet(), scheduler=default_scheduler()).save_pretrained(folder)
    return folder
