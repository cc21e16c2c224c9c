"""MoCo v3 (Chen, Xie, He 2021) for ResNets: the contrastive baseline row, and how a PCD teacher is
made on one's own images. Base encoder + projector + predictor learn; the momentum encoder +
projector follow them by EMA with the momentum raised from `contrast.momentum` to 1 along a half
cosine; symmetric InfoNCE at temperature 0.2 between the two BYOL views."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from dreamteacher.config import Config
from dreamteacher.losses import moco_infonce
from dreamteacher.methods.base import PretrainMethod
from dreamteacher.students.backbone import Backbone
from dreamteacher.teachers.moco import mlp


class MoCoV3(PretrainMethod):
    """batch {"images": view 1, "views2": view 2} -> {"loss"}. The exported backbone is the base
    encoder's (`backbone`, as MoCo v3's own fine-tuning code loads); the momentum branch is what
    `moco_v3.pth` hands to PCD as teacher."""

    def __init__(self, config: Config):
        super().__init__(config, method="mocov3")
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
