"""The feature interpreter (DreamTeacher section 3.2, appendix D.2): a small task head on the frozen
teacher's multi-level features, trained on a few labels (Eq. 4), whose soft labels the student then
distills (Eq. 5). The DatasetGAN / DDPM-seg family of segmenters is the teacher plus this head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dreamteacher.data.features import FeatureSpec


class FeatureFuse(nn.Module):
    """D.2's feature fuse layer: 1x1 conv of the next (finer) teacher feature, bilinear upsampling of
    the running map to its size, concatenation, depthwise-separable 3x3 conv back to `width`."""

    def __init__(self, in_channels: int, width: int):
        super().__init__()
        self.lateral = nn.Conv2d(in_channels, width, 1)
        self.depthwise = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width)
        self.pointwise = nn.Conv2d(2 * width, width, 1)

    def forward(self, running_bchw: torch.Tensor, feature_bchw: torch.Tensor) -> torch.Tensor:
        lateral = self.lateral(feature_bchw)
        running = F.interpolate(running_bchw, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        return self.pointwise(self.depthwise(torch.cat([running, lateral], dim=1)))


class FeatureInterpreter(nn.Module):
    """Teacher features (one per block, in the teacher's block order) -> class logits at the finest
    feature's stride. Coarsest feature first: 1x1 conv, then one fuse layer per finer feature;
    GroupNorm (32 groups) + Swish after each; dropout 0.1 before the 1x1 logit conv."""

    def __init__(self, specs: list[FeatureSpec], num_classes: int, width: int = 256, dropout: float = 0.1,
                 groups: int = 32):
        super().__init__()
        self.order = sorted(range(len(specs)), key=lambda i: -specs[i].stride)  # coarse to fine
        self.stem = nn.Conv2d(specs[self.order[0]].channels, width, 1)
        self.fuses = nn.ModuleList([FeatureFuse(specs[i].channels, width) for i in self.order[1:]])
        self.norms = nn.ModuleList([nn.GroupNorm(min(groups, width), width) for _ in self.order])
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(width, num_classes, 1)
        self.output_stride = specs[self.order[-1]].stride

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = F.silu(self.norms[0](self.stem(feats[self.order[0]])))
        for fuse, norm, i in zip(self.fuses, self.norms[1:], self.order[1:]):
            x = F.silu(norm(fuse(x, feats[i])))
        return self.classifier(self.dropout(x))
