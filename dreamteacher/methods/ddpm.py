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
from torch.utils.data import Dataset

from dreamteacher.core.config import Config
from dreamteacher.data.images import ImageFolder
from dreamteacher.data.sampling import seeded_noise
from dreamteacher.methods.base import TeacherTrainer, log_step_losses, register_teacher_trainer
from dreamteacher.nn.optim import fused_adam
from dreamteacher.teachers.diffusion import build_unet, default_scheduler


class WithTimestep(Dataset):
    """Each image with the diffusion step it is noised to, drawn uniformly in [0, steps): inside
    `SeededSamples`, keyed on (seed, epoch, image) like its flip, crop and noise."""

    def __init__(self, images: Dataset, steps: int):
        self.images, self.steps = images, steps

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        image = self.images[index]
        return {"images": image, "t": torch.randint(self.steps, ())}


@register_teacher_trainer
class TeacherTraining(TeacherTrainer):
    """batch {"images" in [-1, 1] (randomly cropped to `teacher_train.crop`), "t", "noise_seed"} ->
    {"loss": MSE(eps_pred, eps)}."""

    kind = "ddpm"
    summary = "a diffusion U-Net (the default)"
    family = "diffusion"
    architecture = ("diffusion",)

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

    @classmethod
    def image_folder(cls, data, config: Config) -> ImageFolder:
        crop = config.teacher_train.crop or None  # the object scale of the whole frame, at a fraction of the cost
        return ImageFolder(data, config.data.resolution, hflip=config.data.hflip, crop=crop,
                           on_bad_image=config.data.on_bad_image)

    @classmethod
    def dataset(cls, images: ImageFolder, config: Config) -> Dataset:
        return WithTimestep(images, config.diffusion.num_train_timesteps)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images, t = batch["images"], batch["t"]
        noise = seeded_noise(batch["noise_seed"], images)
        alphas = self.noise_scheduler.alphas_cumprod.to(images.device)[t].view(-1, 1, 1, 1)
        noisy = alphas.sqrt() * images + (1 - alphas).sqrt() * noise
        loss = F.mse_loss(self.unet(noisy, t).sample, noise)
        log_step_losses(self, {"loss": loss})
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        # the EMA follows every step here, not in on_train_batch_end, which Lightning calls after the
        # checkpoint callback: a checkpoint then held the EMA one update behind its weights
        super().optimizer_step(*args, **kwargs)
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


