"""Training a DDPM teacher (epsilon prediction, linear betas) on an unlabeled image folder.

The U-Net is a diffusers `UNet2DModel` in the ADM style of DreamTeacher Table 16 (resblock up/down
sampling, scale-shift norm, attention at the deep levels), scaled by preset; an EMA copy is kept and is
what gets saved, as a diffusers `DDPMPipeline` that any diffusers user can load and sample.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dreamteacher.core.config import Config
from dreamteacher.methods.base import TeacherTrainer, register_teacher_trainer
from dreamteacher.nn.optim import fused_adam
from dreamteacher.teachers.diffusion import build_unet, default_scheduler


def random_crops(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """One independent random height x width crop per image of the batch."""
    h, w = images.shape[-2:]
    tops = torch.randint(0, h - height + 1, (len(images),)).tolist()
    lefts = torch.randint(0, w - width + 1, (len(images),)).tolist()
    return torch.stack([img[:, y:y + height, x:x + width] for img, y, x in zip(images, tops, lefts)])


@register_teacher_trainer
class TeacherTraining(TeacherTrainer):
    """batch of images in [-1, 1] -> {"loss": MSE(eps_pred, eps)} at uniformly drawn steps."""

    kind = "ddpm"
    summary = "a diffusion U-Net (the default)"
    family = "diffusion"
    sections = ("diffusion",)

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.save_hyperparameters({"method": "train-teacher", "config": config.to_dict()})
        d = config.diffusion
        self.unet = build_unet(d, config.data.resolution)
        self.noise_scheduler = default_scheduler(d.num_train_timesteps, d.beta_start, d.beta_end)
        self.ema = AveragedModel(self.unet, multi_avg_fn=get_ema_multi_avg_fn(config.teacher_train.ema_decay))
        self.ema.requires_grad_(False)  # updated by averaging, never by gradients (and ignored by DDP)
        self.total_steps = config.teacher_train.max_steps

    def training_step(self, images: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.config.teacher_train.crop:
            images = random_crops(images, *self.config.teacher_train.crop)
        noise = torch.randn_like(images)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (images.shape[0],), device=images.device)
        alphas = self.noise_scheduler.alphas_cumprod.to(images.device)[t].view(-1, 1, 1, 1)
        noisy = alphas.sqrt() * images + (1 - alphas).sqrt() * noise
        loss = F.mse_loss(self.unet(noisy, t).sample, noise)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.ema.update_parameters(self.unet)

    def configure_optimizers(self):
        tt = self.config.teacher_train
        # Lightning refuses to clip the gradients of a fused optimizer under mixed precision
        fused = {} if "mixed" in str(self.trainer.precision) else fused_adam(self.unet)
        optimizer = torch.optim.AdamW(self.unet.parameters(), lr=tt.lr, weight_decay=tt.weight_decay, **fused)
        warmup = min(tt.warmup_steps, self.total_steps // 10)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup)))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, gradient_clip_val=self.config.teacher_train.grad_clip, gradient_clip_algorithm="norm")

    def save_teacher(self, folder: Path) -> None:
        """The EMA U-Net + scheduler as a diffusers DDPMPipeline (`DDPMPipeline.from_pretrained(folder)`)."""
        ema_unet = self.ema.module
        DDPMPipeline(unet=ema_unet, scheduler=self.noise_scheduler).save_pretrained(folder, safe_serialization=True)


