"""Feature regressor (DreamTeacher appendix D.1): FPN with a PPM on the last level.

BatchNorm + ReLU on every lateral and output conv, 256 channels, pool scales 1,2,3,6, and a 1x1 conv
per level mapping to the teacher's channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class PyramidPooling(nn.Module):
    """PSPNet's PPM: pool to s x s for each scale, 1x1 conv, upsample, concat with input, 3x3 fuse."""

    def __init__(self, in_ch: int, out_ch: int, scales: list[int]):
        super().__init__()
        self.scales = list(scales)
        self.branches = nn.ModuleList(conv_bn_relu(in_ch, out_ch, 1) for _ in scales)
        self.fuse = conv_bn_relu(in_ch + len(scales) * out_ch, out_ch, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [F.interpolate(branch(F.adaptive_avg_pool2d(x, s)), size=size, mode="bilinear", align_corners=False)
                  for s, branch in zip(self.scales, self.branches)]
        return self.fuse(torch.cat([x, *pooled], dim=1))


class FeatureRegressor(nn.Module):
    """Backbone levels (strides 4..32) -> fused multi-scale features -> teacher channels.

    forward: list of 4 maps (B, C_l, H_l, W_l), finest first -> list of 4 entries, (B, out_channels[l],
    H_l, W_l) for each level with an output and None for a level with `out_channels[l] = None`. Layers
    a level without output would need are not built (DDP requires every parameter to be used).
    """

    def __init__(self, in_channels: list[int], out_channels: list[int | None], width: int = 256,
                 ppm_scales: list[int] = (1, 2, 3, 6)):
        super().__init__()
        used = [level for level, c in enumerate(out_channels) if c]
        if not used:
            raise ValueError("FeatureRegressor needs at least one level with output channels")
        self.finest = min(used)
        self.width = width
        top = len(in_channels) - 1
        self.ppm = PyramidPooling(in_channels[-1], width, list(ppm_scales))
        self.laterals = nn.ModuleDict({str(l): conv_bn_relu(in_channels[l], width, 1) for l in range(self.finest, top)})
        self.outputs = nn.ModuleDict({str(l): conv_bn_relu(width, width, 3) for l in used if l < top})
        self.projections = nn.ModuleDict({str(l): nn.Conv2d(width, out_channels[l], 1) for l in used})

    def fuse(self, feats: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Top-down FPN pathway: the `width`-d maps of the levels with an output, finest first."""
        top = self.ppm(feats[-1])
        fused: list[torch.Tensor | None] = [None] * len(feats)
        fused[-1] = top
        for level in range(len(feats) - 2, self.finest - 1, -1):
            lateral = self.laterals[str(level)](feats[level])
            top = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            if str(level) in self.outputs:
                fused[level] = self.outputs[str(level)](top)
        return fused

    def project(self, fused: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Fused maps -> teacher channels (None for levels without an output)."""
        return [self.projections[str(l)](f) if str(l) in self.projections else None for l, f in enumerate(fused)]

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor | None]:
        return self.project(self.fuse(feats))
