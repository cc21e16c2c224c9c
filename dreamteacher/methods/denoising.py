"""Denoising pretraining (Brempong et al., "Denoising Pretraining for Semantic Segmentation").

- DeP (`dep`): the whole U-Net (timm encoder + decoder + a 3-channel projection) from random
  initialization learns to predict eps from x + sigma * eps (Eq. 4), sigma 0.8.
- DDeP (`ddep`): the encoder comes from an exported backbone and stays frozen, its BatchNorm
  statistics included (eval mode); only the decoder and the projection learn, sigma 0.1.

The U-Net is the downstream `unet` Segmenter itself (3 output channels), so the pretrained decoder
loads into the fine-tuning model by its own key names; the projection is dropped at export.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dreamteacher.core.config import Config, Section, bounded, register_section
from dreamteacher.core.errors import UserError
from dreamteacher.data.images import ImageFolder
from dreamteacher.data.sampling import seeded_noise
from dreamteacher.losses import corrupt, denoising_loss
from dreamteacher.methods.base import PretrainInputs, PretrainMethod, length, register_method
from dreamteacher.nn.segmenters import Segmenter
from dreamteacher.nn.weights import read_backbone_export

DECODER_FORMAT = "smp-unet-decoder"
TARGETS = ("eps", "x")


@dataclass
class DenoiseConfig(Section):
    """Denoising pretraining (`--method dep|ddep`, Brempong et al.): a U-Net on the student backbone
    learns to predict the noise of x + sigma * eps (Eq. 4)."""

    sigma: float = bounded(0.0, low=0)  # fixed noise level; 0 = the method's own (0.8 DeP, 0.1 DDeP, section 3.3)
    sigma_range: list[float] = bounded(low=0, factory=list)  # [a, b]: sigma ~ U(a, b) per image (Table 6)
    target: str = "eps"  # "eps" (Eq. 4) or "x", the clean image (Table 7)
    ddpm_scaling: bool = False  # Eq. 2: sqrt(g) x + sqrt(1 - g) eps at the same signal-to-noise ratio
    unet_width: int = bounded(64, low=1)  # finest decoder block; blocks [16, 8, 4, 2, 1] x this (64: the paper's "1x")
    # [height, width] random crop of each image (at data.resolution) per step, divisible by 32 (the
    # encoder's stride); [] trains on whole images. More steps in the same time at the same object scale.
    crop: list[int] = bounded(low=1, factory=list)

    def check(self, config: Any) -> None:
        if self.target not in TARGETS:
            raise UserError(f"denoise.target must be 'eps' or 'x', got '{self.target}'")
        if self.sigma_range and not (len(self.sigma_range) == 2 and self.sigma_range[0] < self.sigma_range[1]):
            raise UserError(f"denoise.sigma must be >= 0 and denoise.sigma_range [a, b] with 0 <= a < b, "
                            f"got {self.sigma} and {self.sigma_range}")
        res = config.data.resolution
        if self.crop and not (len(self.crop) == 2 and all(c <= r and c % 32 == 0 for c, r in zip(self.crop, res))):
            raise UserError(f"denoise.crop must be [height, width] within data.resolution {res} and "
                            f"divisible by 32, got {self.crop}")


register_section("denoise", DenoiseConfig)


class DenoisingPretraining(PretrainMethod):
    """batch {"images" in [-1, 1], "noise_seed"} -> {"loss"}: Eq. 4 (or its x / DDPM variants)."""

    sections = ("data", "student", "denoise", "optim", "trainer")
    decoder_head = "unet"
    default_sigma = 0.8
    frozen_encoder = False

    def __init__(self, config: Config, encoder_weights: dict[str, torch.Tensor] | None = None,
                 encoder_source: str = ""):
        super().__init__(config, extra={"encoder": encoder_source})
        self.sigma = self.fixed_sigma(config)
        self.model = Segmenter("unet", config.student.backbone, num_classes=3, unet_width=config.denoise.unet_width)
        if encoder_weights is not None:
            self.model.load_backbone(encoder_weights, encoder_source)
        if self.frozen_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    @classmethod
    def fixed_sigma(cls, config: Config) -> float:
        """The noise level when no `denoise.sigma_range` is drawn from: `denoise.sigma`, or the method's."""
        return config.denoise.sigma or cls.default_sigma

    @classmethod
    def image_folder(cls, folder: str | Path, config: Config) -> ImageFolder:
        return ImageFolder(folder, config.data.resolution, hflip=config.data.hflip, crop=config.denoise.crop or None,
                           on_bad_image=config.data.on_bad_image)

    @classmethod
    def needs_noise(cls, config: Config, inputs: PretrainInputs) -> bool:
        return True

    @classmethod
    def describe_settings(cls, config: Config) -> str:
        d = config.denoise
        crop = f" of {d.crop[0]}x{d.crop[1]} crops" if d.crop else ""
        noise = f"sigma ~ U({d.sigma_range[0]:g}, {d.sigma_range[1]:g})" if d.sigma_range else \
            f"sigma {cls.fixed_sigma(config):g}"
        return f"the U-Net ({d.unet_width} wide) denoises at {noise} for {length(config)}{crop}"

    @classmethod
    def decoder_export(cls, state_dict: dict[str, torch.Tensor], hparams: dict) -> tuple[dict, dict] | None:
        """The U-Net decoder without its 3-channel denoising projection, under the keys of
        segmentation_models_pytorch's `Unet(...).decoder`."""
        prefix = "model.net.decoder."
        weights = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        return weights, {"format": DECODER_FORMAT, "head": "unet",
                         "unet_width": hparams["config"]["denoise"]["unet_width"]}

    @property
    def encoder(self) -> nn.Module:
        return self.model.backbone_model()

    def backbone_model(self) -> nn.Module:
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


@register_method
class DeP(DenoisingPretraining):
    name = "dep"
    summary = "denoising pretraining of a whole U-Net on the backbone (DeP)"


@register_method
class DDeP(DenoisingPretraining):
    name = "ddep"
    summary = "denoising pretraining of a U-Net decoder on a frozen --encoder (DDeP)"
    requires = {"encoder": "an exported backbone (the frozen encoder)"}
    default_sigma = 0.1
    frozen_encoder = True

    @classmethod
    def resolve_inputs(cls, inputs: PretrainInputs, model: str | None) -> dict:
        if inputs.encoder is None:
            return {}
        name, weights, _ = read_backbone_export(inputs.encoder)
        if model and model != name:
            raise UserError(f"--model {model} differs from the encoder's model {name} ({inputs.encoder})")
        inputs.extra["encoder_weights"] = weights
        return {"student": {"backbone": name}}

    @classmethod
    def build(cls, config: Config, inputs: PretrainInputs) -> "DDeP":
        return cls(config, inputs.extra["encoder_weights"], str(inputs.encoder or ""))
