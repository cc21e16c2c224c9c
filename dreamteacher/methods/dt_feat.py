"""DreamTeacher feature distillation (section 3.1): student + feature regressor regress the frozen
teacher's multi-level features; L = w_mse * MSE(whitened) + w_at * AT (Eq. 1-3).

The teacher is a diffusion model encoding the real images (online, or read back from the offline
feature cache), or a GAN rendering the images the student sees (its synthesized dataset)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dreamteacher.core.config import Config, Section, bounded, register_section
from dreamteacher.core.hardware import resolve_precision
from dreamteacher.core.errors import UserError
from dreamteacher.data.augment import DistillationViews
from dreamteacher.data.features import FeatureSpec
from dreamteacher.data.images import SynthesizedSeeds
from dreamteacher.losses import attention_transfer_loss, whitened_mse_loss
from dreamteacher.methods.base import PretrainInputs, PretrainMethod, length, register_method
from dreamteacher.nn.backbone import Backbone
from dreamteacher.nn.regressor import FeatureRegressor
from dreamteacher.teachers.diffusion import DiffusionTeacher

WHITENINGS = ("pixel", "layer")


@dataclass
class LossConfig(Section):
    """The distillation loss (Eq. 3), and dt-mix's label distillation (Eq. 5-6)."""

    mse_weight: float = bounded(1.0, low=0)
    at_weight: float = bounded(10.0, low=0)  # lambda_AT of Eq. 3, "to make the two losses in the same scale"
    at_p: int = bounded(2, low=1)
    ld_weight: float = bounded(1.0, low=0)  # dt-mix: lambda_ld of Eq. 6
    ld_temperature: float = bounded(4.0, low=0, low_open=True)  # dt-mix: tau of Eq. 5

    def check(self, config: Any) -> None:
        if self.mse_weight == 0 and self.at_weight == 0:
            raise UserError("loss.mse_weight and loss.at_weight are both 0: nothing to train")


@dataclass
class DistillLabConfig(Section):
    """Options measured on camvid-cpu and not adopted (benchmarks/README.md, Experiments), kept for the
    lab's experiments and left out of the user documentation. All off by default: the paper's
    distillation."""

    # [low, high]: a random crop of each image covering that fraction of its area at its aspect ratio,
    # resized back to `data.resolution`, the teacher's features cropped and resized with it (scale
    # jitter); [] = off. Measured at [0.35, 1.0]: 27.9 against 29.0 on unseen at 1/30.
    crop_scale: list[float] = bounded(low=0, high=1, low_open=True, factory=list)
    # > 0: brightness, contrast and saturation jitter of that strength (hue a quarter of it) on the
    # image the student sees; the teacher's features stay those of the unjittered image; 0 = off
    color_jitter: float = bounded(0.0, low=0, high=1)
    # what the LayerNorm whitening of Eq. 1 normalizes over: "pixel" (the channels at each pixel, the
    # default) or "layer" (each sample's whole C x H x W map); see losses/feature.py `whiten`
    whiten: str = "pixel"

    def check(self, config: Any) -> None:
        if self.crop_scale and not (len(self.crop_scale) == 2 and self.crop_scale[0] <= self.crop_scale[1]):
            raise UserError(f"lab.crop_scale must be [low, high] with 0 < low <= high <= 1 (or [] for off), "
                            f"got {self.crop_scale}")
        if self.whiten not in WHITENINGS:
            raise UserError(f"lab.whiten must be 'pixel' or 'layer', got '{self.whiten}'")


register_section("loss", LossConfig)
register_section("lab", DistillLabConfig)


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


def synthesizes(inputs: PretrainInputs) -> bool:
    """A teacher that renders the images the student sees (a GAN) rather than encoding real ones."""
    return inputs.teacher_model is not None and not hasattr(inputs.teacher_model, "encode")


@register_method
class DTFeat(PretrainMethod):
    """batch -> {"loss", "mse", "at"}. A batch is images in [-1, 1], encoded online by the teacher,
    or (images, teacher features) from the offline feature cache (`data/features.py`).

    The teacher is held outside the module tree: it is not wrapped by DDP, not in the optimizer, not
    in checkpoints (its path is). With the cache there is no teacher at all while training.
    """

    name = "dt-feat"
    summary = "DreamTeacher feature distillation from a diffusion or GAN --teacher"
    teacher_families = ("diffusion", "gan")
    reads_cache = True
    sections = ("data", "encode", "student", "loss", "optim", "trainer", "lab")

    @classmethod
    def check_config(cls, config: Config, inputs: PretrainInputs) -> None:
        if synthesizes(inputs):
            if inputs.cache is not None:
                raise UserError(f"--teacher {inputs.teacher} is a GAN: its dataset is synthesized online (no --cache)")
            if config.lab.crop_scale or config.lab.color_jitter > 0:
                raise UserError(f"--teacher {inputs.teacher} is a GAN: it renders the images the student sees; "
                                "lab.crop_scale and lab.color_jitter are for real images")

    @classmethod
    def dataset(cls, images: Dataset, config: Config, inputs: PretrainInputs) -> Dataset:
        if synthesizes(inputs):
            return SynthesizedSeeds(len(images))  # --data's image count sets the epoch length
        if config.lab.crop_scale or config.lab.color_jitter > 0:
            return DistillationViews(images, config.lab.crop_scale, config.lab.color_jitter)
        return images

    @classmethod
    def needs_noise(cls, config: Config, inputs: PretrainInputs) -> bool:
        return synthesizes(inputs) or (inputs.cache is None and config.encode.mode == "stochastic")

    @classmethod
    def build(cls, config: Config, inputs: PretrainInputs) -> "DTFeat":
        return cls(config, inputs.feature_specs, inputs.teacher_model, teacher_path=str(inputs.teacher))

    @classmethod
    def describe_settings(cls, config: Config) -> str:
        loss, lab = config.loss, config.lab
        terms = [f"{'' if loss.mse_weight == 1 else f'{loss.mse_weight:g} x '}whitened MSE (per-{lab.whiten} "
                 "LayerNorm)"] if loss.mse_weight > 0 else []
        if loss.at_weight > 0:
            terms.append(f"{loss.at_weight:g} x attention transfer")
        aug = []
        if lab.crop_scale:
            aug.append(f"crops of {lab.crop_scale[0]:g}-{lab.crop_scale[1]:g} of the area")
        if lab.color_jitter > 0:
            aug.append(f"color jitter {lab.color_jitter:g} on the student's image")
        return (f"{length(config)}, t={config.encode.t}, blocks {config.encode.blocks}, loss "
                + " + ".join(terms) + (f", {' and '.join(aug)}" if aug else ""))

    def __init__(self, config: Config, feature_specs: list[FeatureSpec], teacher: DiffusionTeacher | None = None,
                 teacher_path: str = "", extra: dict | None = None):
        super().__init__(config, extra={"teacher": teacher_path, "teacher_features": [vars(s) for s in feature_specs],
                                        **(extra or {})})
        object.__setattr__(self, "teacher", teacher)  # deliberately unregistered, see class docstring
        self.levels = pair_levels(feature_specs)
        out_channels: list[int | None] = [None] * 4  # the teacher's channels at each student level
        for spec, level in zip(feature_specs, self.levels):
            out_channels[level] = spec.channels
        self.build_student(config, out_channels)
        if config.trainer.compile and teacher is not None:
            teacher.compile_blocks()
        self.memory_format = torch.channels_last if config.trainer.channels_last else torch.contiguous_format

    def build_student(self, config: Config, out_channels: list[int | None]) -> None:
        """The student: a timm backbone and the FPN+PPM feature regressor of appendix D.1."""
        self.backbone = Backbone(config.student.backbone)
        self.regressor = FeatureRegressor(self.backbone.channels, out_channels, config.student.regressor_channels,
                                          config.student.ppm_scales)
        if config.trainer.compile:  # in place: parameter names (checkpoints, exports) stay the same
            self.backbone.compile()
            self.regressor.compile()

    def on_fit_start(self) -> None:
        self.place(self.device)

    def run_precision(self) -> str:
        """The precision this run trains in (`auto` resolved), from its trainer when it has one."""
        trainer = self._trainer
        return str(trainer.precision) if trainer is not None else \
            resolve_precision(self.config.trainer.precision, self.config.trainer.accelerator)[0]

    def place(self, device: torch.device) -> None:
        """Student on `device` in the configured memory format; the teacher beside it, see `place_teacher`."""
        self.to(device=device, memory_format=self.memory_format)
        if self.teacher is not None:
            place_teacher(self.teacher, device, self.run_precision())

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
        With color jitter (`lab.color_jitter`) the student sees `student_images` instead, jittered
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
            parts["mse"] = whitened_mse_loss(student_feats, targets, self.config.lab.whiten)
            total = total + cfg.mse_weight * parts["mse"]
        if cfg.at_weight > 0:
            parts["at"] = attention_transfer_loss(student_feats, targets, p=cfg.at_p)
            total = total + cfg.at_weight * parts["at"]
        return {"loss": total, **parts}
