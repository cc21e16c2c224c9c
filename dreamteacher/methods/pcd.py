"""Pixel-wise contrastive distillation (Huang et al., "Pixel-Wise Contrastive Distillation"), from a
frozen MoCo v3 teacher seen through the SpatialAdaptor (`teachers/moco.py`).

student backbone (last level, stride 32) -> projection head (two MLPs as 1x1 convs) -> multi-head
self-attention -> per-pixel InfoNCE against the teacher's map at the same pixels, negatives from a
queue of pooled, l2-normalized teacher vectors (Eq. 3-4); the loss averaged over the two views.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dreamteacher.core.config import Config
from dreamteacher.losses import image_infonce, pixel_infonce
from dreamteacher.losses.contrastive import gather_from_all
from dreamteacher.methods.base import PretrainInputs, register_method
from dreamteacher.methods.mocov3 import ContrastiveMethod
from dreamteacher.nn.backbone import Backbone
from dreamteacher.teachers.moco import MocoTeacher


def conv_mlp(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    """The teacher's adapted head shape with a plain ReLU: 1x1 conv - BN - ReLU - 1x1 conv."""
    return nn.Sequential(nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                         nn.ReLU(inplace=True), nn.Conv2d(hidden, out_channels, 1))


class MultiHeadSelfAttention2d(nn.Module):
    """Self-attention over all pixels of a map: 1x1 conv queries, keys and values per head, heads
    concatenated and projected back by a 1x1 conv (section 3.2: 8 heads of 64 dimensions)."""

    def __init__(self, channels: int, heads: int = 8, head_dim: int = 64):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.query, self.key, self.value = (nn.Conv2d(channels, inner, 1) for _ in range(3))
        self.out = nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, heads * d, H, W) -> (B, heads, HW, d)
            return t.view(b, self.heads, self.head_dim, h * w).transpose(-1, -2)

        attended = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)))
        return self.out(attended.transpose(-1, -2).reshape(b, self.heads * self.head_dim, h, w))


class NegativeQueue(nn.Module):
    """A ring of `size` l2-normalized vectors (buffers: checkpoints keep them, so a resume keeps its
    negatives). `push` writes a batch at the pointer in order, overwriting the oldest first."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("vectors", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        keys = keys[-len(self.vectors):]  # more keys than slots: the newest win
        slots = (self.pointer + torch.arange(len(keys), device=keys.device)) % len(self.vectors)
        self.vectors[slots] = keys.to(self.vectors.dtype)
        self.pointer.copy_((self.pointer + len(keys)) % len(self.vectors))


@register_method
class PCD(ContrastiveMethod):
    """batch {"images": view 1, "views2": view 2} -> {"loss"}. The teacher is held outside the module
    tree (not wrapped by DDP, not in checkpoints or exports); the export is the backbone alone."""

    name = "pcd"
    summary = "pixel-wise contrastive distillation from a MoCo v3 --teacher"
    teacher_families = ("moco",)

    @classmethod
    def build(cls, config: Config, inputs: PretrainInputs) -> "PCD":
        return cls(config, inputs.teacher_model, str(Path(inputs.teacher).resolve()))

    @classmethod
    def describe_settings(cls, config: Config) -> str:
        return super().describe_settings(config) + f", queue {config.contrast.queue_size}"

    def __init__(self, config: Config, teacher: MocoTeacher, teacher_path: str = ""):
        super().__init__(config, extra={"teacher": teacher_path, "teacher_arch": teacher.arch})
        object.__setattr__(self, "teacher", teacher)
        c = config.contrast
        self.backbone = Backbone(config.student.backbone)
        dim = teacher.out_channels
        self.head = nn.Sequential(conv_mlp(self.backbone.channels[-1], c.proj_hidden, dim),
                                  conv_mlp(dim, c.proj_hidden, dim))
        self.attention = MultiHeadSelfAttention2d(dim, c.mhsa_heads, c.mhsa_head_dim) if c.mhsa else nn.Identity()
        self.queue = NegativeQueue(c.queue_size, dim)
        self._keys: torch.Tensor | None = None

    def on_fit_start(self) -> None:
        self.teacher.to(self.device)

    def student_map(self, images: torch.Tensor) -> torch.Tensor:
        return self.attention(self.head(self.backbone(images)[-1]))

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        c = self.config.contrast
        views = [batch["images"], batch["views2"]] if c.symmetric else [batch["images"]]
        contrast = pixel_infonce if c.pixelwise else image_infonce
        negatives = self.queue.vectors.clone()  # this step's negatives: the queue before its own keys
        losses, keys = [], []
        for images in views:
            teacher = self.teacher(images)
            student = self.student_map(images)
            keys.append(F.normalize(teacher.float().mean(dim=(2, 3)), dim=1))
            if teacher.shape[-2:] != student.shape[-2:]:
                teacher = F.interpolate(teacher, size=student.shape[-2:], mode="bilinear", align_corners=False)
            losses.append(contrast(student, teacher, negatives, c.temperature))
        self._keys = torch.cat(keys)
        return {"loss": torch.stack(losses).mean()}

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.enqueue()

    def enqueue(self) -> None:
        """After the step (Eq. 4's "after back-propagation"): this step's pooled teacher vectors of
        every process, in rank order, view 1's before view 2's."""
        if self._keys is not None:
            self.queue.push(gather_from_all(self._keys)[0])
            self._keys = None
