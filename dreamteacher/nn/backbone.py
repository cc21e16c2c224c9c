"""Student backbone: any timm CNN through `features_only`, at strides 4, 8, 16, 32 (levels 2-5)."""

from __future__ import annotations

import timm
import torch
from torch import nn

from dreamteacher.core.errors import UserError

LEVEL_STRIDES = (4, 8, 16, 32)  # the paper's levels l = 2..5 (stride 2**l)


def check_backbone_name(name: str) -> None:
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:5]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise UserError(f"student.backbone '{name}' is not a timm model{hint}")


class Backbone(nn.Module):
    """timm model wrapped by timm's `FeatureGetterNet`: the model itself stays intact under `.model`,
    so its weights keep timm's own key names (export strips the `model.` prefix, nothing else).

    forward: (B, 3, H, W) normalized image -> [(B, C_l, H/s, W/s) for s in 4, 8, 16, 32]
    """

    def __init__(self, name: str):
        super().__init__()
        check_backbone_name(name)
        probe = timm.create_model(name, pretrained=False)
        reductions = [info["reduction"] for info in probe.feature_info]
        missing = [s for s in LEVEL_STRIDES if s not in reductions]
        if missing:
            raise UserError(f"student.backbone '{name}' has no feature levels at strides {missing}; "
                            "choose a CNN with strides 4..32 (resnet*, convnext*, regnet*, ...)")
        # the last level at each stride is the deepest feature of that resolution
        out_indices = tuple(max(i for i, r in enumerate(reductions) if r == s) for s in LEVEL_STRIDES)
        try:
            self.features = timm.create_model(name, pretrained=False, features_only=True,
                                              feature_cls="getter", out_indices=out_indices)
        except Exception as exc:  # noqa: BLE001 - timm raises several types for unsupported models
            raise UserError(f"student.backbone '{name}' does not support timm's forward_intermediates "
                            f"({exc.__class__.__name__}); choose resnet*, convnext*, regnet*, ...") from None
        self.name = name
        self.channels = self.features.feature_info.channels()
        self.strides = list(LEVEL_STRIDES)
        cfg = probe.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images (the teacher's convention) -> the timm model's normalization."""
        return ((images + 1) / 2 - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.features(self.normalize(images))

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under timm's own names (no wrapper prefix)."""
        prefix = "model."
        return {k[len(prefix):]: v for k, v in self.features.state_dict().items() if k.startswith(prefix)}
