"""`dreamteacher interpreter`: train the feature interpreter on a frozen teacher with a few labels
(DreamTeacher section 3.2, Eq. 4; appendix G.2: t = 50, AdamW lr 4e-3, wd 0.05, betas 0.9/0.95,
warmup 20 of 100 epochs, horizontal flip only).

The result is a segmentation model by itself, teacher + interpreter (the DatasetGAN / DDPM-seg family
of Table 5): `evaluate` reads it like a fine-tuned run, and `pretrain --method dt-mix` distills its
soft labels into a student.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from dreamteacher.core.config import (
    Section,
    Sections,
    TrainerConfig,
    bounded,
    merge_overrides,
    preset_layers,
    resolve_sections,
)
from dreamteacher.core.errors import UserError
from dreamteacher.core.runs import INTERPRETER, SEGMENTER_INFO, RunFolder, save_safetensors_atomic, write_json_atomic
from dreamteacher.data.labeled import Repeated, SegmentationData
from dreamteacher.engine import trainer as engine
from dreamteacher.engine.trainer import RunResult
from dreamteacher.losses import interpreter_loss
from dreamteacher.methods.dt_mix import INTERPRETER_HEAD
from dreamteacher.nn.interpreter import FeatureInterpreter
from dreamteacher.nn.optim import fused_adam, warmup_cosine
from dreamteacher.teachers.base import load_teacher
from dreamteacher.teachers.diffusion import EncodeConfig
from dreamteacher.workflows.finetune import SegDataConfig
from dreamteacher.workflows.teacher import summary

HEAD = INTERPRETER_HEAD
WEIGHTS_FILE = INTERPRETER


@dataclass
class InterpreterHeadConfig(Section):
    width: int = bounded(256, low=1)  # D.2
    dropout: float = bounded(0.1, low=0, high=1, high_open=True)
    dice_weight: float = bounded(3.0, low=0)  # lambda_d of Eq. 4


@dataclass
class InterpreterOptimConfig(Section):
    lr: float = bounded(4e-3, low=0, low_open=True)
    weight_decay: float = bounded(0.05, low=0)
    betas: list[float] = bounded(low=0, high=1, high_open=True, factory=lambda: [0.9, 0.95])
    epochs: int = bounded(100, low=1)  # passes over the labeled images
    warmup_epochs: int = bounded(20, low=0)
    batch_size: int = bounded(8, low=1)


def _flip_only_data() -> SegDataConfig:
    return SegDataConfig(scale_range=[1.0, 1.0])  # G.2: horizontal flip is the only augmentation


def _encode_at_50() -> EncodeConfig:
    return EncodeConfig(t=50)  # G.2


@dataclass
class InterpreterConfig(Sections):
    data: SegDataConfig = field(default_factory=_flip_only_data)
    encode: EncodeConfig = field(default_factory=_encode_at_50)
    interpreter: InterpreterHeadConfig = field(default_factory=InterpreterHeadConfig)
    optim: InterpreterOptimConfig = field(default_factory=InterpreterOptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def build_interpreter_config(preset: str | None = None, overrides: list[str] | dict | None = None,
                             base: dict | None = None) -> InterpreterConfig:
    config = resolve_sections(InterpreterConfig(), preset_layers("interpreter", preset, overrides, base))
    config.validate()
    return config


class TeacherInterpreter(nn.Module):
    """Frozen teacher + interpreter as one segmenter: images in [0, 1] -> logits at the input size.

    Test-time encodings draw their noise from a fixed seed, so a model's predictions are repeatable.
    """

    def __init__(self, teacher, interpreter: FeatureInterpreter, seed: int = 0):
        super().__init__()
        self.teacher, self.interpreter, self.seed = teacher, interpreter, seed

    def logits(self, images_unit: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> logits at the interpreter's stride (the teacher's finest feature)."""
        return self.interpreter(self.teacher.encode(images_unit, generator=generator))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device=images.device).manual_seed(self.seed)
        logits = self.logits(images * 2 - 1, generator)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


class InterpreterTraining(L.LightningModule):
    """(images in [0, 1], masks) -> Eq. 4 on the interpreter's logits upsampled to the masks."""

    def __init__(self, config: InterpreterConfig, teacher, teacher_path: str):
        super().__init__()
        self.config = config
        self.save_hyperparameters({"method": "interpreter", "config": config.to_dict(), "teacher": teacher_path})
        object.__setattr__(self, "teacher", teacher)  # frozen, outside the module tree (see DTFeat)
        self.interpreter = FeatureInterpreter(teacher.feature_specs, config.data.num_classes,
                                              config.interpreter.width, config.interpreter.dropout)
        self.total_steps, self.warmup_steps = 1, 0

    def on_fit_start(self) -> None:
        self.teacher.to(self.device)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, masks = batch
        with torch.no_grad():
            feats = self.teacher.encode(images * 2 - 1)
        logits = F.interpolate(self.interpreter(feats), size=masks.shape[-2:], mode="bilinear", align_corners=False)
        loss = interpreter_loss(logits, masks, self.config.data.ignore_index, self.config.interpreter.dice_weight)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False, sync_dist=True)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        o = self.config.optim
        optimizer = torch.optim.AdamW(self.interpreter.parameters(), lr=o.lr, weight_decay=o.weight_decay,
                                      betas=tuple(o.betas), **fused_adam(self.interpreter))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(self.total_steps, self.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@dataclass
class InterpreterResult(RunResult):
    absent_classes: list[int] = field(default_factory=list)

    @property
    def weights(self) -> Path:
        return self.files["interpreter"]


def absent_classes(dataset: SegmentationData, num_classes: int) -> list[int]:
    present = torch.zeros(num_classes, dtype=torch.bool)
    for mask in dataset.masks:
        ids = mask[mask != dataset.ignore_index].unique()
        present[ids] = True
    return [k for k in range(num_classes) if not present[k]]


def train_interpreter(teacher: str | Path, images: str | Path, masks: str | Path, out: str | Path,
                      split: str | Path | None = None, preset: str | None = None,
                      overrides: list[str] | dict | None = None, resume: bool = False, progress: bool = True,
                      **sections: dict) -> InterpreterResult:
    """Train a feature interpreter on `teacher` with the labels of `split`; writes
    `out/interpreter.safetensors`, `out/segmenter.json` (so that `evaluate` reads it), the resolved
    config, checkpoints, logs and `run.json`."""
    overrides = merge_overrides(overrides, sections)
    run = RunFolder(out)
    base = run.saved_config() if resume else None
    config = build_interpreter_config(None if base else preset, overrides, base)
    d = config.data
    train_set = SegmentationData(images, masks, split, d.resolution, d.num_classes, d.ignore_index, augment=True,
                                 scale_range=tuple(d.scale_range), hflip=d.hflip)
    absent = absent_classes(train_set, d.num_classes)
    if absent:  # a user with few labels may well lack a class: train anyway, but say so
        warnings.warn(f"the labels of {split or masks} hold no pixel of class(es) {absent}: the interpreter "
                      "cannot learn them and will not predict them", stacklevel=2)
    teacher_model = load_teacher(teacher, config, families=("diffusion",))
    teacher_model.check_resolution(*d.resolution)
    ckpt = run.start(resume)
    run.save_config(config)
    engine.seed_everything(config.trainer.seed)
    o = config.optim
    iterations = max(1, math.ceil(o.epochs * len(train_set) / o.batch_size))
    trainer = engine.build_trainer(config.trainer, run.path, iterations, o.batch_size, progress)
    loader = engine.make_loader(Repeated(train_set, iterations * o.batch_size), o.batch_size, trainer,
                                d.num_workers, "optim.batch_size")
    module = InterpreterTraining(config, teacher_model, str(Path(teacher).resolve()))
    module.total_steps = iterations
    module.warmup_steps = round(iterations * o.warmup_epochs / o.epochs)
    fitted = engine.fit(run, trainer, module, loader, ckpt)
    result = InterpreterResult(**vars(fitted), absent_classes=absent)
    result.files["interpreter"] = run / WEIGHTS_FILE
    if trainer.is_global_zero:
        save_safetensors_atomic(module.interpreter.state_dict(), result.weights)
        info = {"head": HEAD, "teacher": str(Path(teacher).resolve()), "encode": vars(config.encode),
                "teacher_features": [vars(s) for s in teacher_model.feature_specs],
                "num_classes": d.num_classes, "ignore_index": d.ignore_index, "resolution": d.resolution,
                "width": config.interpreter.width, "labeled_images": len(train_set), "absent_classes": absent,
                "split": str(split) if split else None, "iterations": result.steps,
                "seconds": round(result.seconds, 1)}
        write_json_atomic(run / SEGMENTER_INFO, info)
        run.write_summary(summary(result, "interpreter", epochs=o.epochs, **info))
    return result


def load_teacher_interpreter(folder: str | Path, info: dict[str, Any]) -> TeacherInterpreter:
    """A trained interpreter run -> the teacher + interpreter segmenter, in eval mode."""
    folder = Path(folder)
    teacher = load_teacher(info["teacher"], InterpreterConfig(encode=EncodeConfig(**info["encode"])),
                           families=("diffusion",))
    interpreter = FeatureInterpreter(teacher.feature_specs, info["num_classes"], info["width"])
    path = folder / WEIGHTS_FILE
    try:
        interpreter.load_state_dict(load_file(str(path)), strict=True)
    except Exception as exc:  # noqa: BLE001 - a missing, truncated or foreign file
        raise UserError(f"{path}: not the weights of this interpreter ({exc.__class__.__name__})") from None
    return TeacherInterpreter(teacher, interpreter).eval()
