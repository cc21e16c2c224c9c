"""MoCo v3 (Chen, Xie, He 2021) for ResNets: the contrastive baseline row, and how a PCD teacher is
made on one's own images. Base encoder + projector + predictor learn; the momentum encoder +
projector follow them by EMA with the momentum raised from `contrast.momentum` to 1 along a half
cosine; symmetric InfoNCE at temperature 0.2 between the two BYOL views."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from dreamteacher.core.config import Config, Section, bounded, register_section
from dreamteacher.core.errors import UserError
from dreamteacher.data.images import ImageFolder
from dreamteacher.data.views import TwoViews
from dreamteacher.losses import moco_infonce
from dreamteacher.methods.base import PretrainInputs, PretrainMethod, length, register_method
from dreamteacher.nn.backbone import Backbone
from dreamteacher.teachers.moco import MOCO_FILE, mlp, save_moco_v3


@dataclass
class ContrastConfig(Section):
    """Contrastive methods: MoCo v3 (`--method mocov3`, Chen et al. 2021) and pixel-wise contrastive
    distillation from a MoCo v3 teacher (`--method pcd`, Huang et al.). Paper sizes by default."""

    temperature: float = bounded(0.2, low=0, low_open=True)  # MoCo v3 ResNet-50 and PCD (section 3.2)
    proj_hidden: int = bounded(4096, low=1)  # hidden width of the projector / predictor MLPs (and PCD's head)
    proj_dim: int = bounded(256, low=1)  # output width: the space the losses contrast in
    momentum: float = bounded(0.99, low=0, high=1)  # MoCo v3: momentum-encoder EMA, raised to 1 along a half cosine
    queue_size: int = bounded(65536, low=1)  # PCD: pooled teacher vectors kept as negatives
    mhsa: bool = True  # PCD: multi-head self-attention after the student's projection head
    mhsa_heads: int = bounded(8, low=1)
    mhsa_head_dim: int = bounded(64, low=1)
    symmetric: bool = True  # PCD: the loss on both augmented views (False: the first view only)
    pixelwise: bool = True  # PCD: per-pixel InfoNCE (False: the image-level variant of Table 2)
    # random-resized-crop area range
    crop_scale: list[float] = bounded(low=0, high=1, low_open=True, factory=lambda: [0.08, 1.0])

    def check(self, config: Any) -> None:
        if len(self.crop_scale) != 2 or self.crop_scale[0] > self.crop_scale[1]:
            raise UserError(f"contrast.crop_scale must be [low, high] with 0 < low <= high <= 1, got {self.crop_scale}")


register_section("contrast", ContrastConfig)


class ContrastiveMethod(PretrainMethod):
    """What MoCo v3 and PCD share: two BYOL views of every image, the contrast settings."""

    sections = ("data", "student", "contrast", "optim", "trainer")

    @classmethod
    def image_folder(cls, folder: str | Path, config: Config) -> ImageFolder:
        return ImageFolder(folder, config.data.resolution, hflip=False,  # the views flip
                           on_bad_image=config.data.on_bad_image)

    @classmethod
    def dataset(cls, images: ImageFolder, config: Config, inputs: PretrainInputs) -> Dataset:
        return TwoViews(images, config.contrast.crop_scale, hflip=config.data.hflip)

    @classmethod
    def describe_settings(cls, config: Config) -> str:
        o = config.optim
        return (f"{length(config)}, {o.name} base lr {o.base_lr:g} (x batch {o.batch_size} / 256), "
                f"wd {o.weight_decay:g}")


@register_method
class MoCoV3(ContrastiveMethod):
    """batch {"images": view 1, "views2": view 2} -> {"loss"}. The exported backbone is the base
    encoder's (`backbone`, as MoCo v3's own fine-tuning code loads); the momentum branch is what
    `moco_v3.pth` hands to PCD as teacher."""

    name = "mocov3"
    summary = "MoCo v3 on the images (also writes moco_v3.pth, a pcd teacher)"

    def __init__(self, config: Config):
        super().__init__(config)
        c = config.contrast
        self.backbone = Backbone(config.student.backbone)
        self.projector = mlp(2, self.backbone.channels[-1], c.proj_hidden, c.proj_dim)
        self.predictor = mlp(2, c.proj_dim, c.proj_hidden, c.proj_dim, last_bn=False)
        self.momentum_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.momentum_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def trainable_module(self) -> nn.Module:
        return nn.ModuleList([self.backbone, self.projector, self.predictor])

    @staticmethod
    def embed(backbone: Backbone, projector: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return projector(backbone(images)[-1].mean(dim=(2, 3)))

    def momentum(self) -> float:
        progress = min(1.0, self.global_step / max(1, self.total_steps))
        return 1 - (1 - self.config.contrast.momentum) * (math.cos(math.pi * progress) + 1) / 2

    @torch.no_grad()
    def update_momentum_encoder(self, m: float) -> None:
        for online, ema in ((self.backbone, self.momentum_backbone), (self.projector, self.momentum_projector)):
            for p_online, p_ema in zip(online.parameters(), ema.parameters()):
                p_ema.mul_(m).add_(p_online.detach(), alpha=1 - m)

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        first, second = batch["images"], batch["views2"]
        q1 = self.predictor(self.embed(self.backbone, self.projector, first))
        q2 = self.predictor(self.embed(self.backbone, self.projector, second))
        with torch.no_grad():  # as the reference: the momentum step comes before the keys
            self.update_momentum_encoder(self.momentum())
            k1 = self.embed(self.momentum_backbone, self.momentum_projector, first)
            k2 = self.embed(self.momentum_backbone, self.momentum_projector, second)
        t = self.config.contrast.temperature
        return {"loss": moco_infonce(q1, k2, t) + moco_infonce(q2, k1, t)}

    def moco_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """The three parts under the official checkpoint's names (trunk keys, projector as `fc.*`)."""
        def encoder(backbone: Backbone, projector: nn.Module) -> dict[str, torch.Tensor]:
            return {**backbone.timm_state_dict(), **{f"fc.{k}": v for k, v in projector.state_dict().items()}}

        return {"base": encoder(self.backbone, self.projector),
                "momentum": encoder(self.momentum_backbone, self.momentum_projector),
                "predictor": self.predictor.state_dict()}

    def extra_exports(self, run_dir: Path) -> dict[str, Path]:
        """The teacher PCD distills, in the layout of released MoCo v3 checkpoints."""
        return {"teacher": save_moco_v3(run_dir / MOCO_FILE, self.config.student.backbone, **self.moco_state())}
