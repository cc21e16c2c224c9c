"""DreamTeacher feature distillation (section 3.1): student + feature regressor regress the frozen
teacher's multi-level features; L = w_mse * MSE(whitened) + w_at * AT (Eq. 1-3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dreamteacher.config import Config
from dreamteacher.losses import attention_transfer_loss, whitened_mse_loss
from dreamteacher.methods.base import PretrainMethod
from dreamteacher.students.backbone import Backbone
from dreamteacher.students.regressor import FeatureRegressor
from dreamteacher.teachers.diffusion import DiffusionTeacher, FeatureSpec


def pair_levels(specs: list[FeatureSpec], num_levels: int = 4) -> list[int]:
    """Student level (0 = stride 4 .. 3 = stride 32) for each teacher feature.

    Coarsest teacher feature -> deepest student level, next -> next; a 4-block ADM teacher at
    strides 16, 8, 4, 2 thus feeds student strides 32, 16, 8, 4 (teacher maps are resized to fit).
    """
    order = sorted(range(len(specs)), key=lambda i: -specs[i].stride)
    levels = [0] * len(specs)
    for rank, i in enumerate(order):
        levels[i] = num_levels - 1 - rank
    return levels


def resize_to(feats_bchw: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area-average when shrinking (no aliasing), bilinear when enlarging."""
    if tuple(feats_bchw.shape[-2:]) == tuple(size):
        return feats_bchw
    if feats_bchw.shape[-2] >= size[0] and feats_bchw.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(feats_bchw, size)
    return F.interpolate(feats_bchw, size=size, mode="bilinear", align_corners=False)


def place_teacher(teacher: DiffusionTeacher, device: torch.device, precision: str) -> None:
    """The frozen teacher on `device`, always NCHW (its GroupNorms are slower channels-last), and in
    bf16 weights on a GPU when the run's precision is bf16: inference only, so nothing needs fp32
    master weights."""
    teacher.to(device=device)
    if device.type == "cuda" and precision.startswith("bf16") and hasattr(teacher, "unet"):
        # nn.Module.to: diffusers' own `to` warns about casting a model it did not load in that dtype
        torch.nn.Module.to(teacher.unet, torch.bfloat16)


class DTFeat(PretrainMethod):
    """batch -> {"loss", "mse", "at"}. A batch is images in [-1, 1], encoded online by the teacher,
    or (images, teacher features) from the offline feature cache (`teachers/cache.py`).

    The teacher is held outside the module tree: it is not wrapped by DDP, not in the optimizer, not
    in checkpoints (its path is). With the cache there is no teacher at all while training.
    """

    def __init__(self, config: Config, feature_specs: list[FeatureSpec], teacher: DiffusionTeacher | None = None,
                 teacher_path: str = "", method: str = "dt-feat", extra: dict | None = None):
        super().__init__(config, method=method, extra={"teacher": teacher_path,
                                                       "teacher_features": [vars(s) for s in feature_specs],
                                                       **(extra or {})})
        object.__setattr__(self, "teacher", teacher)  # deliberately unregistered, see class docstring
        self.backbone = Backbone(config.student.backbone)
        self.levels = pair_levels(feature_specs)
        out_channels: list[int | None] = [None] * 4
        for spec, level in zip(feature_specs, self.levels):
            out_channels[level] = spec.channels
        self.regressor = FeatureRegressor(self.backbone.channels, out_channels, config.student.regressor_channels,
                                          config.student.ppm_scales)

        if config.trainer.compile:  # in place: parameter names (checkpoints, exports) stay the same
            self.backbone.compile()
            self.regressor.compile()
            if teacher is not None:
                teacher.compile_blocks()
        self.memory_format = torch.channels_last if config.trainer.channels_last else torch.contiguous_format

    def on_fit_start(self) -> None:
        self.place(self.device)

    def place(self, device: torch.device) -> None:
        """Student on `device` in the configured memory format; the teacher beside it, see `place_teacher`."""
        self.to(device=device, memory_format=self.memory_format)
        if self.teacher is not None:
            place_teacher(self.teacher, device, self.config.trainer.precision)

    def student_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Regressor outputs paired with the teacher's features, in the teacher's block order."""
        return self.student_outputs(images)[1]

    def student_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the regressor's finest fused map, (B, width, H/4, W/4) at stride 4 for 4 teacher levels;
        the regressor outputs paired with the teacher's features, in the teacher's block order)."""
        fused = self.regressor.fuse(self.backbone(images))
        outputs = self.regressor.project(fused)
        return fused[self.regressor.finest], [outputs[level] for level in self.levels]

    def teacher_features(self, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(images the student sees, teacher features) of a batch: from the feature cache (`features`:
        fp16, used in the step's precision), else from the teacher's `student_batch` (a diffusion
        teacher encodes the batch's images; a GAN teacher renders images from the batch's seeds).
        With color jitter (`data.color_jitter`) the student sees `student_images` instead, jittered
        copies of the images the features were taken from."""
        if not isinstance(batch, dict):
            batch = {"images": batch}
        if "features" in batch:
            images = batch["images"]
            features = [f.to(images.dtype) for f in batch["features"]]
        else:
            images, features = self.teacher.student_batch(batch)
        images = batch.get("student_images", images)
        return images.contiguous(memory_format=self.memory_format), features

    def compute_losses(self, batch) -> dict[str, torch.Tensor]:
        images, teacher_feats = self.teacher_features(batch)
        return self.feature_losses(self.student_features(images), teacher_feats)

    def feature_losses(self, student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor]) -> dict:
        """L_feat = w_mse * Eq. 1 + w_at * Eq. 2 -> {"loss", "mse", "at"}."""
        targets = [resize_to(t, s.shape[-2:]) for t, s in zip(teacher_feats, student_feats)]
        cfg = self.config.loss
        parts: dict[str, torch.Tensor] = {}
        total = student_feats[0].new_zeros((), dtype=torch.float32)
        if cfg.mse_weight > 0:  # a term runs only when its weight is above zero
            parts["mse"] = whitened_mse_loss(student_feats, targets, cfg.whiten)
            total = total + cfg.mse_weight * parts["mse"]
        if cfg.at_weight > 0:
            parts["at"] = attention_transfer_loss(student_feats, targets, p=cfg.at_p)
            total = total + cfg.at_weight * parts["at"]
        return {"loss": total, **parts}
