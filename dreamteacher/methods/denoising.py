"""Denoising pretraining (Brempong et al., "Denoising Pretraining for Semantic Segmentation").

- DeP: the whole U-Net (timm encoder + decoder + a 3-channel projection) from random initialization
  learns to predict eps from x + sigma * eps (Eq. 4), sigma 0.8.
- DDeP: the encoder comes from an exported backbone and stays frozen, its BatchNorm statistics
  included (eval mode); only the decoder and the projection learn, sigma 0.1.

The U-Net is the downstream `unet` Segmenter itself (3 output channels), so the pretrained decoder
loads into the fine-tuning model by its own key names; the projection is dropped at export.
"""

from __future__ import annotations

import torch
from torch import nn

from dreamteacher.config import Config
from dreamteacher.downstream.models import Segmenter
from dreamteacher.losses import corrupt, denoising_loss
from dreamteacher.methods.base import PretrainMethod
from dreamteacher.train.engine import seeded_noise

DEFAULT_SIGMA = {"dep": 0.8, "ddep": 0.1}  # section 3.3


def fixed_sigma(config: Config, method: str) -> float:
    """The noise level of `method` (dep or ddep) when no `denoise.sigma_range` is drawn from."""
    return config.denoise.sigma or DEFAULT_SIGMA[method]


class DenoisingPretraining(PretrainMethod):
    """batch {"images" in [-1, 1], "noise" ~ N(0, I)} -> {"loss"}: Eq. 4 (or its x / DDPM variants)."""

    def __init__(self, config: Config, method: str, encoder_weights: dict[str, torch.Tensor] | None = None,
                 encoder_source: str = ""):
        if method not in DEFAULT_SIGMA:
            raise ValueError(f"method must be dep or ddep, got {method}")
        super().__init__(config, method=method, extra={"encoder": encoder_source})
        self.sigma = fixed_sigma(config, method)
        self.frozen_encoder = method == "ddep"
        self.model = Segmenter("unet", config.student.backbone, num_classes=3, unet_width=config.denoise.unet_width)
        if encoder_weights is not None:
            self.model.load_backbone(encoder_weights, encoder_source)
        if self.frozen_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    @property
    def encoder(self) -> nn.Module:
        return self.model.backbone_model()

    def train(self, mode: bool = True) -> "DenoisingPretraining":
        super().train(mode)
        if self.frozen_encoder:
            self.encoder.eval()  # DDeP: BatchNorm statistics frozen too
        return self

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Lightning may set submodule modes one by one, bypassing `train` above
        if self.frozen_encoder and self.encoder.training:
            self.encoder.eval()

    def trainable_module(self) -> nn.Module:
        if self.frozen_encoder:  # the optimizer never sees the encoder
            return nn.ModuleList([self.model.net.decoder, self.model.net.segmentation_head])
        return self.model

    def sample_sigma(self, batch: int, device: torch.device) -> torch.Tensor:
        low_high = self.config.denoise.sigma_range
        if low_high:
            low, high = low_high
            return low + (high - low) * torch.rand(batch, device=device)
        return torch.full((batch,), self.sigma, device=device)

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["images"]
        eps = seeded_noise(batch["noise_seed"], images)
        sigma = self.sample_sigma(len(images), images.device)
        noisy = corrupt(images, eps, sigma, self.config.denoise.ddpm_scaling)
        prediction = self.model((noisy + 1) / 2)  # the Segmenter takes [0, 1] images and normalizes them
        return {"loss": denoising_loss(prediction, images, eps, self.config.denoise.target)}
