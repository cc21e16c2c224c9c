"""Training the StyleGAN2 teacher (`train-teacher --kind stylegan2`): the discriminator and the
training step. The generator and the teacher made of it are in `teachers/stylegan2.py`.

Non-saturating logistic loss, lazy R1 on reals, Adam (0, 0.99), an EMA of the generator.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dreamteacher.core.config import Config
from dreamteacher.core.errors import UserError
from dreamteacher.data.sampling import seeded_noise
from dreamteacher.methods.base import TeacherTrainer, register_teacher_trainer
from dreamteacher.nn.optim import fused_adam
from dreamteacher.teachers.stylegan2 import (
    SQRT2,
    EqualConv2d,
    EqualLinear,
    GanConfig,
    Generator,
    level_sizes,
    save_generator,
)


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
        # minibatch std; the 1e-8 (StyleGAN2's own) keeps its gradient finite where the group agrees exactly
        stats = (x.view(group, -1, *x.shape[1:]).var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))
        x = torch.cat([x, stats.repeat(group)[:, None, None, None].expand(-1, 1, *x.shape[2:])], dim=1)
        return self.final(self.final_conv(x).flatten(1)).squeeze(1)


@register_teacher_trainer
class GanTraining(TeacherTrainer):
    """images in [-1, 1] -> a D step (logistic loss, lazy R1) then a G step (non-saturating), EMA of G.

    Manual optimization: Lightning counts each optimizer's step, so a training iteration advances
    `global_step` by 2 (the trainer is built with twice `teacher_train.max_steps`)."""

    kind = "stylegan2"
    summary = "a GAN whose samples form a synthesized dataset"
    family = "gan"
    architecture = ("gan",)
    optimizer_steps_per_iteration = 2

    @classmethod
    def check_config(cls, config: Config) -> None:
        level_sizes(config.data.resolution, len(config.gan.channels))  # a clear error before any work
        if config.teacher_train.micro_batch:
            raise UserError("teacher_train.micro_batch: the stylegan2 teacher steps its two optimizers by hand and "
                            "trains each device's whole share of teacher_train.batch_size at once (0)")

    @classmethod
    def describe_settings(cls, config: Config) -> str:
        tt, g = config.teacher_train, config.gan
        iterations = f"{tt.max_steps} iterations" if tt.max_steps else "iterations sized to the data"
        return f"StyleGAN2 with levels {g.channels} wide, {iterations} at batch {tt.batch_size}"

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.automatic_optimization = False
        self.save_hyperparameters({"method": "train-teacher-stylegan2", "config": config.to_dict()})
        self.generator = Generator(config.gan, config.data.resolution)
        self.discriminator = Discriminator(config.gan, config.data.resolution)
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False)

    def latents(self, seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The z of the discriminator's and of the generator's step, from each sample's seed."""
        both = seeded_noise(seeds, torch.empty(len(seeds), 2, self.config.gan.z_dim, device=self.device))
        return both[:, 0], both[:, 1]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # the generator's per-layer noise comes from the global generator: seeded from this batch's
        # own sample seeds, so that a resumed run draws it as an uninterrupted one did
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(batch["noise_seed"][0]) % 2**63)
            return self.train_iteration(batch)

    def train_iteration(self, batch: dict) -> torch.Tensor:
        g = self.config.gan
        images = batch["images"]
        opt_g, opt_d = self.optimizers()
        iteration = self.global_step // 2
        z_d, z_g = self.latents(batch["noise_seed"])
        fake = self.generator(z_d)[0].detach()
        d_loss = F.softplus(self.discriminator(fake)).mean() + F.softplus(-self.discriminator(images)).mean()
        if g.r1_gamma > 0 and iteration % g.r1_every == 0:
            real = images.detach().requires_grad_(True)
            grad, = torch.autograd.grad(self.discriminator(real).sum(), real, create_graph=True)
            d_loss = d_loss + g.r1_gamma / 2 * grad.pow(2).sum(dim=(1, 2, 3)).mean() * g.r1_every
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = F.softplus(-self.discriminator(self.generator(z_g)[0])).mean()
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

    def save_teacher(self, folder: Path) -> None:
        """The EMA generator: `generator.safetensors` + `stylegan2.json` (its architecture)."""
        save_generator(self.generator_ema, self.config.gan, self.config.data.resolution, folder)
