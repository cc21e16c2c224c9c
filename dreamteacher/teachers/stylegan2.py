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

import copy
import json
import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dreamteacher.config import Config, GanConfig
from dreamteacher.errors import UserError
from dreamteacher.teachers.diffusion import FeatureSpec
from dreamteacher.train.engine import fused_adam

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


class DiscriminatorBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = EqualConv2d(in_ch, in_ch, 3, activate=True)
        self.conv2 = EqualConv2d(in_ch, out_ch, 3, activate=True)
        self.skip = EqualConv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.avg_pool2d(self.conv2(self.conv1(x)), 2)
        return (out + self.skip(F.avg_pool2d(x, 2))) / SQRT2


class Discriminator(nn.Module):
    def __init__(self, cfg: GanConfig, resolution: list[int]):
        super().__init__()
        ch = list(reversed(cfg.channels))
        sizes = level_sizes(resolution, len(ch))
        self.from_rgb = EqualConv2d(3, ch[0], 1, activate=True)
        self.blocks = nn.Sequential(*[DiscriminatorBlock(ch[i], ch[i + 1]) for i in range(len(ch) - 1)])
        self.final_conv = EqualConv2d(ch[-1] + 1, ch[-1], 3, activate=True)
        h, w = sizes[0]
        self.final = nn.Sequential(EqualLinear(ch[-1] * h * w, ch[-1], activate=True), EqualLinear(ch[-1], 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.from_rgb(images))
        group = min(4, x.shape[0])
        while x.shape[0] % group:
            group -= 1
        stats = x.view(group, -1, *x.shape[1:]).std(dim=0, unbiased=False).mean(dim=(1, 2, 3))  # minibatch std
        x = torch.cat([x, stats.repeat(group)[:, None, None, None].expand(-1, 1, *x.shape[2:])], dim=1)
        return self.final(self.final_conv(x).flatten(1)).squeeze(1)


class GanTraining(L.LightningModule):
    """images in [-1, 1] -> a D step (logistic loss, lazy R1) then a G step (non-saturating), EMA of G.

    Manual optimization: Lightning counts each optimizer's step, so a training iteration advances
    `global_step` by 2 (the trainer is built with twice `teacher_train.max_steps`)."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.automatic_optimization = False
        self.save_hyperparameters({"method": "train-teacher-stylegan2", "config": config.to_dict()})
        self.generator = Generator(config.gan, config.data.resolution)
        self.discriminator = Discriminator(config.gan, config.data.resolution)
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False)

    def latents(self, batch: int) -> torch.Tensor:
        return torch.randn(batch, self.config.gan.z_dim, device=self.device)

    def training_step(self, images: torch.Tensor, batch_idx: int) -> torch.Tensor:
        g = self.config.gan
        opt_g, opt_d = self.optimizers()
        iteration = self.global_step // 2
        fake = self.generator(self.latents(len(images)))[0].detach()
        d_loss = F.softplus(self.discriminator(fake)).mean() + F.softplus(-self.discriminator(images)).mean()
        if g.r1_gamma > 0 and iteration % g.r1_every == 0:
            real = images.detach().requires_grad_(True)
            grad, = torch.autograd.grad(self.discriminator(real).sum(), real, create_graph=True)
            d_loss = d_loss + g.r1_gamma / 2 * grad.pow(2).sum(dim=(1, 2, 3)).mean() * g.r1_every
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = F.softplus(-self.discriminator(self.generator(self.latents(len(images)))[0])).mean()
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        opt_g.step()
        with torch.no_grad():
            decay = self.config.teacher_train.ema_decay
            for p_ema, p in zip(self.generator_ema.parameters(), self.generator.parameters()):
                p_ema.lerp_(p.detach(), 1 - decay)
            for b_ema, b in zip(self.generator_ema.buffers(), self.generator.buffers()):
                b_ema.copy_(b)
        self.log("train/loss", g_loss.detach(), on_step=True, on_epoch=False)
        self.log("train/d_loss", d_loss.detach(), on_step=True, on_epoch=False)
        return g_loss.detach()

    def configure_optimizers(self):
        g = self.config.gan
        make = lambda net: torch.optim.Adam(net.parameters(), lr=g.lr, betas=(0.0, 0.99), **fused_adam(net))  # noqa: E731
        return [make(self.generator), make(self.discriminator)]

    def save_generator(self, folder: Path) -> Path:
        """The EMA generator: `generator.safetensors` + `stylegan2.json` (its architecture)."""
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.generator_ema.state_dict().items()},
                  str(folder / GAN_WEIGHTS_FILE))
        (folder / GAN_CONFIG_FILE).write_text(json.dumps(
            {"gan": vars(self.config.gan), "resolution": self.config.data.resolution}, indent=2))
        return folder


def gan_folder(path: str | Path) -> Path | None:
    """The folder holding a saved generator: `path` itself or a train-teacher run's `teacher/`."""
    path = Path(path)
    for folder in (path, path / "teacher"):
        if (folder / GAN_CONFIG_FILE).is_file():
            return folder
    return None


def load_generator(folder: Path) -> Generator:
    spec = json.loads((folder / GAN_CONFIG_FILE).read_text())
    generator = Generator(GanConfig(**spec["gan"]), spec["resolution"])
    try:
        generator.load_state_dict(load_file(str(folder / GAN_WEIGHTS_FILE)), strict=True)
    except (RuntimeError, OSError) as exc:
        raise UserError(f"GAN teacher {folder}: {GAN_WEIGHTS_FILE} does not fit {GAN_CONFIG_FILE} "
                        f"({str(exc).splitlines()[0]})") from None
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
