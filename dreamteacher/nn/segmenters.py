"""Downstream segmentation models on a (pretrained or random) timm backbone.

- `upernet`: segmentation_models_pytorch's UPerNet on the `tu-<name>` timm encoder, the paper's
  downstream model (DreamTeacher F.3). The encoder is created with timm's `feature_cls="getter"`, so the
  timm model sits intact at `net.encoder.model.model` and an export loads into it by its own key names.
- `unet`: segmentation_models_pytorch's U-Net on the same encoder, the model of denoising pretraining
  (Brempong et al. section 3): five decoder blocks of two 3x3 convs with skip connections from the
  encoder, widths [16, 8, 4, 2, 1] x `unet_width` (64: the paper's [1024, 512, 256, 128, 64], "1x").
  Its decoder can be initialized from a DeP/DDeP `decoder.safetensors`.
- `readout`: a frozen backbone and one 1x1 conv on its four levels (strides 4-32) upsampled to stride 4
  and concatenated (the segmentation readout of DreamTeacher Table 12, linear here).

Both take images in [0, 1] and return logits at the input size; the timm model's own mean/std is
applied inside, as in pretraining.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from dreamteacher.core.errors import UserError
from dreamteacher.core.runs import SEGMENTER, SEGMENTER_INFO, save_safetensors_atomic, write_json_atomic
from dreamteacher.nn.backbone import Backbone, check_backbone_name
from dreamteacher.nn.weights import load_timm_weights

HEADS = ("upernet", "unet", "readout")


def unet_widths(unet_width: int) -> list[int]:
    """Decoder block widths, coarse to fine: [16, 8, 4, 2, 1] x the finest block's width."""
    return [unet_width * 2**k for k in (4, 3, 2, 1, 0)]


class Segmenter(nn.Module):
    """Wraps a head (`upernet`, `unet` or `readout`) with the input normalization of its timm backbone."""

    def __init__(self, head: str, backbone: str, num_classes: int, decoder_channels: int = 512,
                 unet_width: int = 64):
        super().__init__()
        if head not in HEADS:
            raise UserError(f"model.head must be one of {', '.join(HEADS)}, got '{head}'")
        check_backbone_name(backbone)
        self.head, self.backbone_name = head, backbone
        if head in ("upernet", "unet"):
            import segmentation_models_pytorch as smp

            if head == "upernet":
                self.net = smp.UPerNet(encoder_name=f"tu-{backbone}", encoder_weights=None, classes=num_classes,
                                       decoder_channels=decoder_channels, feature_cls="getter")
            else:
                self.net = smp.Unet(encoder_name=f"tu-{backbone}", encoder_weights=None, classes=num_classes,
                                    decoder_channels=unet_widths(unet_width), feature_cls="getter")
        else:
            self.net = LinearReadout(backbone, num_classes)
        cfg = timm.get_pretrained_cfg(backbone)
        mean = cfg.mean if cfg and cfg.mean else (0.485, 0.456, 0.406)
        std = cfg.std if cfg and cfg.std else (0.229, 0.224, 0.225)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def backbone_model(self) -> nn.Module:
        """The timm model (its own key names) inside the head."""
        if self.head in ("upernet", "unet"):
            return self.net.encoder.model.model
        return self.net.backbone.features.model

    def load_backbone(self, weights: dict[str, torch.Tensor], source: str, norm_rescale: float = 1.0) -> None:
        """Pretrained backbone weights; `norm_rescale` != 1 then multiplies its conv weights (PCD
        section 4.1, NormRescale: LARS-trained weights are large for SGD/AdamW fine-tuning schedules;
        BatchNorm after each conv keeps the function the same)."""
        load_timm_weights(self.backbone_model(), weights, source)
        if norm_rescale != 1.0:
            with torch.no_grad():
                for module in self.backbone_model().modules():
                    if isinstance(module, nn.Conv2d):
                        module.weight.mul_(norm_rescale)

    def load_decoder(self, weights: dict[str, torch.Tensor], source: str) -> list[str]:
        """A pretrained decoder (`decoder.safetensors`): a DeP/DDeP U-Net decoder, strictly; or a dt-mix
        regressor as UPerNet's decoder and head, where it has the layer (the rest stays random).
        Returns the names of the layers left at random initialization."""
        if self.head == "unet":
            missing, unexpected = self.net.decoder.load_state_dict(weights, strict=False)
            if missing or unexpected:
                raise UserError(f"{source}: decoder weights do not fit this U-Net (missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]}); is model.unet_width the one it was pretrained with?")
            return []
        if self.head != "upernet":
            raise UserError(f"{source}: a pretrained decoder initializes the unet or upernet head, not {self.head}")
        own = self.net.state_dict()
        wrong = [k for k, v in weights.items() if k not in own or own[k].shape != v.shape]
        if wrong:
            raise UserError(f"{source}: decoder weights do not fit this UPerNet ({wrong[:3]}); is "
                            "model.decoder_channels the regressor width it was pretrained with?")
        self.net.load_state_dict(weights, strict=False)
        layers = {k.rsplit(".", 1)[0] for k in own if k.startswith(("decoder.", "segmentation_head."))}
        return sorted(layer for layer in layers if not any(k.startswith(layer + ".") for k in weights))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> the timm model's normalization."""
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(images))


class LinearReadout(nn.Module):
    """Frozen backbone (eval mode, also its BatchNorm statistics) -> BN without affine -> 1x1 conv."""

    def __init__(self, backbone: str, num_classes: int):
        super().__init__()
        self.backbone = Backbone(backbone)
        self.backbone.requires_grad_(False)
        channels = sum(self.backbone.channels)
        self.norm = nn.BatchNorm2d(channels, affine=False)  # per-channel scaling: still a linear readout
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def train(self, mode: bool = True) -> "LinearReadout":
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, normalized: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            levels = self.backbone.features(normalized)
        size = levels[0].shape[-2:]
        stacked = torch.cat([F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in levels], 1)
        logits = self.classifier(self.norm(stacked))
        return F.interpolate(logits, size=normalized.shape[-2:], mode="bilinear", align_corners=False)


def save_segmenter(model: Segmenter, folder: Path, info: dict) -> Path:
    """`folder/segmenter.safetensors` (all weights) + `segmenter.json` (how to rebuild it)."""
    path = save_safetensors_atomic(model.state_dict(), Path(folder) / SEGMENTER)
    write_json_atomic(Path(folder) / SEGMENTER_INFO, info)
    return path


def load_segmenter_model(folder: Path, info: dict) -> Segmenter:
    """A fine-tuned segmenter from its run folder and `segmenter.json`, in eval mode."""
    model = Segmenter(info["head"], info["backbone"], info["num_classes"], info.get("decoder_channels", 512),
                      info.get("unet_width", 64))
    path = Path(folder) / SEGMENTER
    try:
        weights = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - missing or truncated file
        raise UserError(f"{path}: not a readable segmenter ({exc.__class__.__name__})") from None
    model.load_state_dict(weights, strict=True)
    return model.eval()
