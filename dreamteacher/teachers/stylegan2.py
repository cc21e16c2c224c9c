"""A compact StyleGAN2 (Karras et al. 2020): the GAN teacher of DreamTeacher (section 3.1, Fig. 2b).

Generator: mapping MLP (z -> w, lr x 0.01) and a synthesis network from a learned constant, one level
per doubling of resolution, each two modulated 3x3 convs (weight demodulation, per-pixel noise) and a
1x1 toRGB added to the upsampled image of the level below (the "skip" generator). Discriminator:
residual, minibatch standard deviation. Equalized learning rate throughout. Training: non-saturating
logistic loss, lazy R1 on reals, Adam (0, 0.99), an EMA of the generator. Left out: path-length
regularization, style mixing, ADA; upsampling is bilinear instead of transposed conv + FIR blur.

Any resolution whose sides halve `levels - 1` times to integers works (CamVid's 96x128 starts at 3x4).
As a teacher (`GanTeacher`) it samples z from the prior per training sample, renders the image the
student sees and records each synthesis level's output: a synthesized dataset, never stored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dreamteacher.core.config import Section, bounded, register_section
from dreamteacher.core.errors import UserError
from dreamteacher.core.runs import atomic_write, write_json_atomic
from dreamteacher.data.features import FeatureSpec
from dreamteacher.teachers.base import TeacherKind, register_teacher_kind


@dataclass
class GanConfig(Section):
    """The StyleGAN2 teacher (`train-teacher --kind stylegan2`). Levels run from the coarsest (the
    learned constant) to the full resolution, one per doubling."""

    z_dim: int = bounded(256, low=1)
    w_dim: int = bounded(256, low=1)
    mapping_layers: int = bounded(4, low=1)
    channels: list[int] = bounded(low=1, factory=lambda: [256, 256, 256, 128, 64, 32])  # per level, coarse first
    lr: float = bounded(0.002, low=0, low_open=True)
    r1_gamma: float = bounded(1.0, low=0)  # R1 weight on reals
    r1_every: int = bounded(16, low=1)  # lazy regularization interval (iterations)


register_section("gan", GanConfig)

GAN_CONFIG_FILE = "stylegan2.json"
GAN_WEIGHTS_FILE = "generator.safetensors"
SQRT2 = math.sqrt(2)


class EqualLinear(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0, lr_mul: float = 1.0, activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale, self.lr_mul, self.activate = lr_mul / math.sqrt(in_dim), lr_mul, activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)
        return F.leaky_relu(out, 0.2) * SQRT2 if self.activate else out


class EqualConv2d(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel: int, bias: bool = True, activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None
        self.scale, self.padding, self.activate = 1 / math.sqrt(in_ch * kernel * kernel), kernel // 2, activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)
        return F.leaky_relu(out, 0.2) * SQRT2 if self.activate else out


class ModulatedConv2d(nn.Module):
    """Conv whose weights are scaled per sample by the style of w (and demodulated back to unit
    variance), as one grouped conv over the batch."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, w_dim: int, demodulate: bool = True, up: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel, kernel))
        self.affine = EqualLinear(w_dim, in_ch, bias_init=1.0)
        self.scale, self.padding = 1 / math.sqrt(in_ch * kernel * kernel), kernel // 2
        self.demodulate, self.up = demodulate, up

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        b, c, h, wd = x.shape
        weight = self.scale * self.weight[None] * self.affine(w)[:, None, :, None, None]
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            h, wd = 2 * h, 2 * wd
        out = F.conv2d(x.reshape(1, b * c, h, wd), weight.reshape(-1, c, *weight.shape[3:]), padding=self.padding,
                       groups=b)
        return out.view(b, -1, h, wd)


class StyledConv(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, w_dim: int, up: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, 3, w_dim, up=up)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(1, out_ch, 1, 1))

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
        out = self.conv(x, w)
        if noise is None:
            noise = torch.randn(out.shape[0], 1, *out.shape[2:], device=out.device, dtype=out.dtype)
        return F.leaky_relu(out + self.noise_strength * noise + self.bias, 0.2) * SQRT2


class ToRGB(nn.Module):
    def __init__(self, in_ch: int, w_dim: int):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, 3, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, w: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        rgb = self.conv(x, w) + self.bias
        if skip is not None:
            rgb = rgb + F.interpolate(skip, scale_factor=2, mode="bilinear", align_corners=False)
        return rgb


def level_sizes(resolution: list[int], levels: int) -> list[tuple[int, int]]:
    height, width = resolution
    factor = 2 ** (levels - 1)
    if height % factor or width % factor:
        raise UserError(f"gan: resolution {height}x{width} must be divisible by 2^(levels-1) = {factor} "
                        f"(gan.channels has {levels} levels)")
    return [(height // factor * 2 ** i, width // factor * 2 ** i) for i in range(levels)]


class Generator(nn.Module):
    """z (B, z_dim) -> (images, about [-1, 1] (B, 3, H, W); [output of each synthesis level])."""

    def __init__(self, cfg: GanConfig, resolution: list[int]):
        super().__init__()
        self.cfg, self.resolution = cfg, list(resolution)
        self.sizes = level_sizes(resolution, len(cfg.channels))
        layers = [EqualLinear(cfg.z_dim if i == 0 else cfg.w_dim, cfg.w_dim, lr_mul=0.01, activate=True)
                  for i in range(cfg.mapping_layers)]
        self.mapping = nn.Sequential(*layers)
        ch = cfg.channels
        self.const = nn.Parameter(torch.randn(1, ch[0], *self.sizes[0]))
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        for i, out_ch in enumerate(ch):
            first = StyledConv(ch[0], out_ch, cfg.w_dim) if i == 0 else StyledConv(ch[i - 1], out_ch, cfg.w_dim, up=True)
            self.convs.append(nn.ModuleList([first, StyledConv(out_ch, out_ch, cfg.w_dim)]))
            self.to_rgbs.append(ToRGB(out_ch, cfg.w_dim))
        # fixed noise for deterministic rendering (`noise="const"`): a teacher's features depend on z alone
        for i, size in enumerate(self.sizes):
            self.register_buffer(f"noise_{i}", torch.randn(1, 1, *size), persistent=True)
        self.feature_specs = [FeatureSpec(i, c, resolution[0] // s[0]) for i, (c, s) in enumerate(zip(ch, self.sizes))]

    def style(self, z: torch.Tensor) -> torch.Tensor:
        return self.mapping(z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8))  # pixel norm, then MLP

    def forward(self, z: torch.Tensor, noise: str = "random") -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`noise="const"`: the fixed noise buffers instead of fresh noise (a deterministic render)."""
        w = self.style(z)
        x = self.const.expand(z.shape[0], -1, -1, -1)
        rgb, features = None, []
        for i, (convs, to_rgb) in enumerate(zip(self.convs, self.to_rgbs)):
            fixed = getattr(self, f"noise_{i}").expand(z.shape[0], -1, -1, -1) if noise == "const" else None
            for conv in convs:
                x = conv(x, w, fixed)
            features.append(x)
            rgb = to_rgb(x, w, rgb)
        return rgb, features


def gan_folder(path: str | Path) -> Path | None:
    """The folder holding a saved generator: `path` itself or a train-teacher run's `teacher/`."""
    path = Path(path)
    for folder in (path, path / "teacher"):
        if (folder / GAN_CONFIG_FILE).is_file():
            return folder
    return None


def save_generator(generator: Generator, gan: GanConfig, resolution: list[int], folder: Path) -> Path:
    """`generator.safetensors` + `stylegan2.json` (its architecture), each written atomically."""
    weights = {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    atomic_write(folder / GAN_WEIGHTS_FILE, lambda tmp: save_file(weights, str(tmp)))
    write_json_atomic(folder / GAN_CONFIG_FILE, {"gan": vars(gan), "resolution": list(resolution)})
    return folder


def load_generator(folder: Path) -> Generator:
    try:
        spec = json.loads((folder / GAN_CONFIG_FILE).read_text())
        generator = Generator(GanConfig(**spec["gan"]), spec["resolution"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"GAN teacher {folder}: {GAN_CONFIG_FILE} is not a readable generator description "
                        f"({exc.__class__.__name__})") from None
    try:
        generator.load_state_dict(load_file(str(folder / GAN_WEIGHTS_FILE)), strict=True)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: safetensors, OS and shape errors
        raise UserError(f"GAN teacher {folder}: {GAN_WEIGHTS_FILE} is unreadable or does not fit {GAN_CONFIG_FILE} "
                        f"({exc.__class__.__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''})"
                        ) from None
    return generator.eval().requires_grad_(False)


class GanTeacher(nn.Module):
    """The synthesized-dataset teacher: a batch of per-sample seeds -> (rendered images, features of
    the chosen synthesis levels). z and a horizontal flip come from each sample's seed; the flip is
    applied to the image and its features together."""

    def __init__(self, generator: Generator, blocks: list[int]):
        super().__init__()
        self.generator = generator
        levels = len(generator.feature_specs)
        for b in blocks:
            if not 0 <= b < levels:
                raise UserError(f"encode.blocks: level {b} is out of range for this GAN teacher "
                                f"({levels} synthesis levels, 0..{levels - 1} from the coarsest)")
        self.blocks = list(blocks)
        self.feature_specs = [generator.feature_specs[b] for b in blocks]

    def train(self, mode: bool = True) -> "GanTeacher":
        return super().train(False)

    def check_resolution(self, height: int, width: int) -> None:
        if [height, width] != self.generator.resolution:
            raise UserError(f"data.resolution [{height}, {width}] differs from the GAN teacher's "
                            f"{self.generator.resolution}: set data.resolution to it")

    def compile_blocks(self) -> None:
        self.generator.compile()

    @torch.no_grad()
    def render(self, seeds: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        device = self.generator.const.device
        z = torch.empty(len(seeds), self.generator.cfg.z_dim, device=device)
        flips = []
        generator = torch.Generator(device=device)
        for row, seed in zip(z, seeds.tolist()):
            row.normal_(generator=generator.manual_seed(seed))
            flips.append(bool(torch.rand((), generator=generator.manual_seed(seed + 1), device=device) < 0.5))
        images, feats = self.generator(z, noise="const")
        picked = [feats[b] for b in self.blocks]
        flip = torch.tensor(flips, device=device).view(-1, 1, 1, 1)
        images = torch.where(flip, images.flip(-1), images).clamp(-1, 1)
        return images, [torch.where(flip, f.flip(-1), f) for f in picked]

    def student_batch(self, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.render(batch["noise_seed"])


def _load(path: Path, config: Any) -> GanTeacher:
    return GanTeacher(load_generator(gan_folder(path)), config.encode.blocks)


register_teacher_kind(TeacherKind("stylegan2", "gan", "a StyleGAN2 generator folder or `train-teacher --kind "
                                  "stylegan2` run", lambda p: p.is_dir() and gan_folder(p) is not None, _load))
