"""SparK (Tian et al., ICLR 2023, "Designing BERT for Convolutional Networks: Sparse and Hierarchical
Masked Modeling"): masked image modeling for CNNs, DreamTeacher's strongest baseline (Tables 2, 4, 14).

- Mask: random patches at the backbone's coarsest stride (32: one patch per stride-32 position), a
  ratio `spark.mask_ratio` of them (0.6) masked per image.
- Sparse encoder: the timm backbone itself, run on the masked image as if it were sparse: the output
  of every convolution, pooling, linear and layer norm is zeroed at masked positions (so a masked
  position is exactly zero everywhere and never reaches a visible one through a kernel), and every
  BatchNorm normalizes with the statistics of the visible positions only (section 3.1: "sparse batch
  normalization"). The weights are the plain timm model's, under its own keys: what is exported.
- Densify: at each of the four levels (coarsest first), a sparse BatchNorm, a learned mask token at
  the masked positions, and a projection to the decoder's width (1x1 at the coarsest, 3x3 below).
- Light decoder: UNet-style blocks (transposed-conv x2 upsampling, two 3x3 convs with BatchNorm and
  ReLU6), the densified level added before each block, widths halving from `spark.decoder_width`,
  a 1x1 projection to the image at full resolution.
- Loss: mean squared error on the masked patches only, against the input normalized per patch (mean
  and standard deviation over the patch's pixels and channels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from timm.layers import LayerNorm2d
from torch import nn

from dreamteacher.core.config import Config, Section, bounded, register_section
from dreamteacher.core.errors import UserError
from dreamteacher.methods.base import PretrainInputs, PretrainMethod, length, register_method
from dreamteacher.nn.backbone import Backbone


@dataclass
class SparkConfig(Section):
    """SparK's settings (`--method spark`)."""

    mask_ratio: float = bounded(0.6, low=0, high=1, low_open=True, high_open=True)  # section 4: 60%
    decoder_width: int = bounded(256, low=8)  # the light decoder's widest block (halved per level)


register_section("spark", SparkConfig)


def expand_mask(active_b1hw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The patch mask (B, 1, h, w) repeated to a map of `size` (a multiple of it)."""
    return active_b1hw.repeat_interleave(size[0] // active_b1hw.shape[-2], 2).repeat_interleave(
        size[1] // active_b1hw.shape[-1], 3)


class MaskedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the visible positions only (its running statistics too); masked positions stay 0.
    Without a mask it is the plain BatchNorm2d it replaced (same parameters and keys)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.active: torch.Tensor | None = None  # set by `SparseEncoder` around its forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.active is None:
            return super().forward(x)
        keep = expand_mask(self.active, x.shape[-2:])[:, 0]  # (B, H, W)
        bhwc = x.permute(0, 2, 3, 1)
        visible = super().forward(bhwc[keep][:, :, None, None])[:, :, 0, 0]  # (N, C): statistics of these
        out = torch.zeros_like(bhwc)
        out[keep] = visible.to(out.dtype)
        return out.permute(0, 3, 1, 2)


class SparseEncoder(nn.Module):
    """A timm backbone run sparsely on masked images (see the module docstring). `forward(images,
    active)`: [-1, 1] images (B, 3, H, W) and the patch mask (B, 1, H/32, W/32), True where visible ->
    the four levels (strides 4..32), zero at masked positions."""

    MASKED_OUTPUTS = (nn.Conv2d, nn.Linear, nn.LayerNorm, LayerNorm2d, nn.MaxPool2d, nn.AvgPool2d)

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone
        self._active: torch.Tensor | None = None
        for parent in list(backbone.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.BatchNorm2d:
                    sparse = MaskedBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                               child.track_running_stats)
                    sparse.load_state_dict(child.state_dict())
                    setattr(parent, name, sparse)
        self.norms = [m for m in backbone.modules() if isinstance(m, MaskedBatchNorm2d)]
        for module in backbone.modules():
            if isinstance(module, self.MASKED_OUTPUTS):
                module.register_forward_hook(self._zero_masked)

    def _zero_masked(self, _module, _inputs, output: torch.Tensor) -> torch.Tensor | None:
        if self._active is None or output.dim() != 4:
            return None
        h, w = self._active.shape[-2:]
        if output.shape[-2] % h == 0 and output.shape[-1] % w == 0 and output.shape[-2] // h == output.shape[-1] // w:
            return output * expand_mask(self._active, output.shape[-2:]).to(output.dtype)  # (B, C, H, W)
        # channels-last (B, H, W, C), as ConvNeXt's norms and MLPs see their input
        return output * expand_mask(self._active, output.shape[1:3]).permute(0, 2, 3, 1).to(output.dtype)

    def forward(self, images: torch.Tensor, active: torch.Tensor) -> list[torch.Tensor]:
        self._active = active
        for norm in self.norms:
            norm.active = active
        try:
            masked = self.backbone.normalize(images) * expand_mask(active, images.shape[-2:]).to(images.dtype)
            return self.backbone.features(masked)
        finally:
            self._active = None
            for norm in self.norms:
                norm.active = None


class UNetBlock(nn.Sequential):
    """x2 upsampling (transposed conv), then two 3x3 convs with BatchNorm (ReLU6 between)."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.ConvTranspose2d(cin, cin, kernel_size=4, stride=2, padding=1),
                         nn.Conv2d(cin, cin, 3, padding=1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(inplace=True),
                         nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))


class LightDecoder(nn.Module):
    """Coarsest level first: x = x + level_i, then a UNet block, for each of the `levels` inputs; more
    blocks up to full resolution; a 1x1 projection to 3 channels."""

    def __init__(self, width: int, blocks: int):
        super().__init__()
        widths = [max(1, width // 2 ** i) for i in range(blocks + 1)]
        self.blocks = nn.ModuleList(UNetBlock(cin, cout) for cin, cout in zip(widths[:-1], widths[1:]))
        self.proj = nn.Conv2d(widths[-1], 3, 1)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        x = 0
        for i, block in enumerate(self.blocks):
            if i < len(levels):
                x = x + levels[i]
            x = block(x)
        return self.proj(x)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C * p * p), patches in row-major order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def masked_patch_loss(reconstruction: torch.Tensor, target: torch.Tensor, active: torch.Tensor,
                      patch: int) -> torch.Tensor:
    """SparK's loss: per-patch normalized target, squared error averaged within each patch, averaged
    over the masked patches. reconstruction, target (B, C, H, W); active (B, 1, H/p, W/p), True = visible."""
    rec, inp = patchify(reconstruction.float(), patch), patchify(target.float(), patch)
    inp = (inp - inp.mean(-1, keepdim=True)) / (inp.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = (rec - inp).pow(2).mean(-1)  # (B, L)
    masked = (~active).flatten(1).float()
    return (per_patch * masked).sum() / masked.sum().clamp_min(1.0)


@register_method
class SparK(PretrainMethod):
    """batch {"images" in [-1, 1], "noise_seed"} -> {"loss"}: SparK's masked reconstruction; each
    sample's mask is drawn from its own seed (the same mask at every world size and on resume)."""

    name = "spark"
    summary = "SparK: sparse masked image modeling of the CNN itself (the strongest baseline of the paper)"
    sections = ("data", "student", "spark", "optim", "trainer")
    patch = 32  # the backbone's coarsest stride

    def __init__(self, config: Config):
        super().__init__(config)
        s = config.spark
        self.encoder = SparseEncoder(Backbone(config.student.backbone))
        channels = list(reversed(self.encoder.backbone.channels))  # coarsest first
        widths = [max(1, s.decoder_width // 2 ** i) for i in range(len(channels))]
        self.mask_tokens = nn.ParameterList(nn.Parameter(torch.zeros(1, c, 1, 1)) for c in channels)
        for token in self.mask_tokens:
            nn.init.trunc_normal_(token, std=0.02, a=-0.02, b=0.02)
        self.densify_norms = nn.ModuleList(MaskedBatchNorm2d(c) for c in channels)
        self.densify_projs = nn.ModuleList(nn.Conv2d(c, w, 1 if i == 0 else 3, padding=0 if i == 0 else 1)
                                           for i, (c, w) in enumerate(zip(channels, widths)))
        self.decoder = LightDecoder(s.decoder_width, int(math.log2(self.patch)))

    @classmethod
    def check_config(cls, config: Config, inputs: PretrainInputs) -> None:
        super().check_config(config, inputs)
        if any(v % 32 for v in config.data.resolution):
            raise UserError(f"spark: data.resolution {config.data.resolution} must be divisible by 32 (one mask "
                            "patch per stride-32 position)")

    @classmethod
    def needs_noise(cls, config: Config, inputs: PretrainInputs) -> bool:
        return True  # the seeds of the masks

    @classmethod
    def describe_settings(cls, config: Config) -> str:
        s, o = config.spark, config.optim
        return (f"mask ratio {s.mask_ratio:g} of {cls.patch}x{cls.patch} patches, decoder {s.decoder_width} wide, "
                f"{length(config)}, {o.name} base lr {o.base_lr:g}")

    def backbone_model(self) -> nn.Module:
        return self.encoder.backbone.features.model

    def masks(self, seeds: torch.Tensor, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        """(B, 1, h, w) patch masks, True where visible, `1 - mask_ratio` of the patches per image."""
        h, w = shape
        keep = max(1, round(h * w * (1 - self.config.spark.mask_ratio)))
        active = torch.zeros(len(seeds), h * w, dtype=torch.bool)
        generator = torch.Generator()
        for row, seed in zip(active, seeds.tolist()):
            row[torch.randperm(h * w, generator=generator.manual_seed(seed))[:keep]] = True
        return active.view(len(seeds), 1, h, w).to(device)

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["images"]
        active = self.masks(batch["noise_seed"], (images.shape[-2] // self.patch, images.shape[-1] // self.patch),
                            images.device)
        levels = list(reversed(self.encoder(images, active)))  # coarsest first
        dense, mask = [], active
        for level, norm, token, proj in zip(levels, self.densify_norms, self.mask_tokens, self.densify_projs):
            norm.active = mask
            try:
                level = norm(level)
            finally:
                norm.active = None
            keep = expand_mask(mask, level.shape[-2:])
            dense.append(proj(torch.where(keep, level, token.to(level.dtype).expand_as(level))))
            mask = expand_mask(mask, (mask.shape[-2] * 2, mask.shape[-1] * 2))
        reconstruction = self.decoder(dense)
        target = self.encoder.backbone.normalize(images)
        return {"loss": masked_patch_loss(reconstruction, target, active, self.patch)}
