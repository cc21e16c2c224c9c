"""MoCo v3 heads and checkpoints, and the PCD teacher made from them (PCD section 3.1-3.2).

An official MoCo v3 ResNet checkpoint (facebookresearch/moco-v3) holds `state_dict` with
`module.base_encoder.*` and `module.momentum_encoder.*`, each a torchvision ResNet whose `fc` is the
projector: `fc.0` Linear(2048, 4096, no bias), `fc.1` BN, `fc.2` ReLU, `fc.3` Linear(4096, 256, no
bias), `fc.4` BN without affine; and `module.predictor.*`. timm ResNets use torchvision's key names,
so the trunk loads into `timm.create_model(arch)` as it is. `pretrain --method mocov3` writes its
result in the same layout (`moco_v3.pth`), so both load the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

import timm
import torch
from torch import nn

from dreamteacher.core.errors import UserError
from dreamteacher.teachers.base import TeacherKind, register_teacher_kind

MOCO_FILE = "moco_v3.pth"  # what `pretrain --method mocov3` writes beside its backbone export
TEACHER_BRANCH = "module.momentum_encoder."  # PCD distills the momentum branch (section 3.2)


def mlp(num_layers: int, in_dim: int, hidden: int, out_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's `_build_mlp`: Linear (no bias) - BN - ReLU ... Linear [- BN without affine]."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        last = i == num_layers - 1
        layers.append(nn.Linear(in_dim if i == 0 else hidden, out_dim if last else hidden, bias=False))
        if not last:
            layers += [nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def channelwise_relu(x: torch.Tensor) -> torch.Tensor:
    """CW-ReLU (Eq. 6): keep a channel where its spatial mean is positive, zero it elsewhere, so that
    mean-pooling after it equals ReLU after mean-pooling."""
    return x * (x.mean(dim=(2, 3), keepdim=True) > 0).to(x.dtype)


class ChannelwiseReLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channelwise_relu(x)


class SpatialAdaptor(nn.Sequential):
    """A projector for pooled vectors (Linear - BN - ReLU - ... - Linear [- BN without affine]) turned
    into one for feature maps (Eq. 5-7): each Linear becomes a 1x1 conv with the BatchNorm after it
    folded in (its frozen statistics), each ReLU a channel-wise ReLU, and a last non-affine BN is
    dropped (section 3.2: its static statistics slow convergence). Mean-pooling the adaptor's output
    equals the original head, less that BN, on the mean-pooled input (Eq. 7)."""

    def __init__(self, projector: nn.Sequential):
        layers = list(projector)
        if layers and isinstance(layers[-1], nn.BatchNorm1d) and not layers[-1].affine:
            layers = layers[:-1]
        modules: list[nn.Module] = []
        i = 0
        while i < len(layers):
            layer = layers[i]
            if isinstance(layer, nn.Linear):
                bn = layers[i + 1] if i + 1 < len(layers) and isinstance(layers[i + 1], nn.BatchNorm1d) else None
                modules.append(_fold_linear(layer, bn))
                i += 2 if bn is not None else 1
            elif isinstance(layer, nn.ReLU):
                modules.append(ChannelwiseReLU())
                i += 1
            else:
                raise ValueError(f"SpatialAdaptor: unsupported projector layer {layer.__class__.__name__}")
        super().__init__(*modules)


@torch.no_grad()
def _fold_linear(linear: nn.Linear, bn: nn.BatchNorm1d | None) -> nn.Conv2d:
    """linear (+ bn in eval mode) as one 1x1 conv."""
    weight = linear.weight.detach().float()
    bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros(weight.shape[0])
    if bn is not None:
        scale = (bn.weight.detach().float() if bn.affine else torch.ones_like(bn.running_var)) \
            / torch.sqrt(bn.running_var.float() + bn.eps)
        shift = bn.bias.detach().float() if bn.affine else torch.zeros_like(scale)
        weight = weight * scale[:, None]
        bias = (bias - bn.running_mean.float()) * scale + shift
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], kernel_size=1)
    conv.weight.copy_(weight[:, :, None, None])
    conv.bias.copy_(bias)
    return conv


class MocoTeacher(nn.Module):
    """The frozen PCD teacher: a MoCo v3 momentum encoder without its global pool, then its projector
    through the SpatialAdaptor. forward: [-1, 1] images (B, 3, H, W) -> (B, proj_dim, H/32, W/32)."""

    def __init__(self, trunk: nn.Module, projector: nn.Sequential, arch: str):
        super().__init__()
        self.trunk = trunk
        self.adaptor = SpatialAdaptor(projector)
        self.arch = arch
        self.out_channels = projector[3].out_features if len(projector) > 3 else projector[0].out_features
        cfg = trunk.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "MocoTeacher":
        return super().train(False)  # frozen, BatchNorm statistics included

    def check_resolution(self, height: int, width: int) -> None:
        """Any resolution: its map is resized to the student's (PCD Eq. 3)."""

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.adaptor(self.trunk.forward_features(((images + 1) / 2 - self.mean) / self.std))


def moco_checkpoint_file(path: str | Path) -> Path:
    """A MoCo v3 checkpoint file, or the one inside a `pretrain --method mocov3` run folder."""
    path = Path(path)
    if path.is_dir():
        path = path / MOCO_FILE
    if not path.is_file():
        raise UserError(f"MoCo v3 teacher not found: {path} (a MoCo v3 .pth or a `pretrain --method mocov3` run)")
    return path


def read_moco_v3(path: str | Path, arch: str | None = None,
                 branch: str = TEACHER_BRANCH) -> tuple[str, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(arch, trunk weights under timm names, projector weights under `mlp` names) of one branch."""
    path = moco_checkpoint_file(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle and zip errors of many kinds
        raise UserError(f"unreadable MoCo v3 checkpoint {path}: {exc.__class__.__name__}: {exc}") from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
    if not any(k.startswith(branch) for k in state):
        branch = branch.removeprefix("module.")  # saved without DistributedDataParallel's prefix
    weights = {k[len(branch):]: v for k, v in state.items() if k.startswith(branch)}
    if not weights:
        raise UserError(f"{path}: no '{TEACHER_BRANCH}*' weights (keys start {sorted(state)[:3]}); "
                        "expected the MoCo v3 checkpoint layout")
    trunk = {k: v for k, v in weights.items() if not k.startswith("fc.")}
    head = {k[len("fc."):]: v for k, v in weights.items() if k.startswith("fc.")}
    if not {"0.weight", "3.weight"} <= set(head):
        raise UserError(f"{path}: the momentum encoder has no projector fc.0 / fc.3 (MoCo v3 ResNet layout)")
    return (ckpt.get("arch") if isinstance(ckpt, dict) and ckpt.get("arch") else arch) or "resnet50", trunk, head


def load_moco_teacher(path: str | Path, arch: str | None = None) -> MocoTeacher:
    """The PCD teacher from a MoCo v3 checkpoint (official, or written by `pretrain --method mocov3`)."""
    arch, trunk_weights, head_weights = read_moco_v3(path, arch)
    if not timm.is_model(arch):
        raise UserError(f"{path}: architecture '{arch}' is not a timm model")
    trunk = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="")
    try:
        trunk.load_state_dict(trunk_weights, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise UserError(f"{path}: the momentum encoder does not fit timm '{arch}': {first}") from None
    hidden, width = head_weights["0.weight"].shape
    projector = mlp(2, width, hidden, head_weights["3.weight"].shape[0], last_bn="4.running_mean" in head_weights)
    projector.load_state_dict(head_weights, strict=True)
    projector.eval()
    return MocoTeacher(trunk, projector, arch)


def save_moco_v3(path: Path, arch: str, base: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor],
                 predictor: dict[str, torch.Tensor]) -> Path:
    """Write a MoCo v3 checkpoint in the official layout (`base` and `momentum`: trunk keys plus the
    projector under `fc.`), atomically."""
    state = {**{f"module.base_encoder.{k}": v for k, v in base.items()},
             **{f"module.momentum_encoder.{k}": v for k, v in momentum.items()},
             **{f"module.predictor.{k}": v for k, v in predictor.items()}}
    partial = path.with_name(path.name + ".partial")
    torch.save({"arch": arch, "state_dict": {k: v.detach().cpu().contiguous() for k, v in state.items()}}, partial)
    os.replace(partial, path)
    return path


register_teacher_kind(TeacherKind(
    "moco-v3", "moco", "a MoCo v3 checkpoint (official layout) or `pretrain --method mocov3` run",
    lambda p: p.is_file() or (p / MOCO_FILE).is_file(), lambda p, config: load_moco_teacher(p)))
