"""Label-efficient semantic segmentation: fine-tune a head on an exported (or random) backbone, evaluate.

Defaults are the paper's (DreamTeacher F.3, from MMSegmentation's UperNet): SGD lr 0.01, momentum
0.9, weight decay 5e-4, poly schedule (power 0.9), 20k iterations on label subsets, random rescale
0.5-2.0, crop and flip. Presets in `dreamteacher/configs/finetune/` scale it down.
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
from timm.optim import create_optimizer_v2, param_groups_weight_decay

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
from dreamteacher.core.runs import INIT, SEGMENTER, RunFolder
from dreamteacher.data.labeled import Repeated, SegmentationData
from dreamteacher.engine import trainer as engine
from dreamteacher.engine.trainer import RunResult
from dreamteacher.nn.optim import fused_adam
from dreamteacher.nn.segmenters import HEADS, Segmenter, save_segmenter
from dreamteacher.nn.weights import read_backbone_export, read_decoder_export
from dreamteacher.workflows.teacher import summary



@dataclass
class SegDataConfig(Section):
    resolution: list[int] = bounded(low=32, factory=lambda: [512, 512])  # [height, width] of training crops
    num_classes: int = bounded(0, low=1, allowed=(0,))  # must be set (e.g. --num-classes 19)
    ignore_index: int = bounded(255, low=0)  # label id excluded from the loss and from mIoU
    scale_range: list[float] = bounded(low=0, low_open=True, factory=lambda: [0.5, 2.0])
    hflip: bool = True
    num_workers: int = bounded(4, low=0)

    def check(self, config: Any) -> None:
        if self.num_classes < 1:
            raise UserError("data.num_classes must be set (--num-classes N)")
        if len(self.resolution) != 2 or any(v % 32 for v in self.resolution):
            raise UserError(f"data.resolution must be [height, width], multiples of 32, got {self.resolution}")
        if len(self.scale_range) != 2 or self.scale_range[0] > self.scale_range[1]:
            raise UserError(f"data.scale_range must be [low, high] with 0 < low <= high, got {self.scale_range}")


@dataclass
class SegModelConfig(Section):
    head: str = "upernet"  # or "unet", or "readout": frozen backbone + linear 1x1 conv
    backbone: str = "resnet50"  # timm name, used with `--backbone none` (an export names its own model)
    decoder_channels: int = bounded(512, low=1)  # UperNet width (MMSegmentation's default)
    # U-Net finest decoder block (blocks [16, 8, 4, 2, 1] x this); 0: the --decoder's, else 64 (paper's 1x)
    unet_width: int = bounded(0, low=0)

    def check(self, config: Any) -> None:
        if self.head not in HEADS:
            raise UserError(f"model.head must be one of {', '.join(HEADS)}, got '{self.head}'")


@dataclass
class SegOptimConfig(Section):
    name: str = "sgd"  # "sgd" (momentum) or "adamw"
    lr: float = bounded(0.01, low=0, low_open=True)
    momentum: float = bounded(0.9, low=0, high=1)  # SGD momentum; AdamW uses betas (0.9, 0.999)
    weight_decay: float = bounded(5e-4, low=0)
    schedule: str = "poly"  # or "cosine"
    poly_power: float = bounded(0.9, low=0, low_open=True)
    warmup_iters: int = bounded(0, low=0)
    iterations: int = bounded(20000, low=1)
    batch_size: int = bounded(16, low=1)  # global

    def check(self, config: Any) -> None:
        if self.name not in ("sgd", "adamw"):
            raise UserError(f"optim.name must be 'sgd' or 'adamw', got '{self.name}'")
        if self.schedule not in ("poly", "cosine"):
            raise UserError(f"optim.schedule must be 'poly' or 'cosine', got '{self.schedule}'")


@dataclass
class SegLabConfig(Section):
    """Fine-tuning options measured on camvid-cpu and not adopted there (benchmarks/README.md), kept for
    the lab's experiments and the paper-scale PCD recipe; left out of the user documentation."""

    # x lr for the backbone's parameters (the decoder and classifier train at lr); 1 = one lr for all.
    # Measured at 0.3: dt-feat 27.9 against 29.0 on unseen at 1/30.
    backbone_lr_scale: float = bounded(1.0, low=0, low_open=True)
    # x the pretrained backbone's conv weights (PCD's NormRescale, 0.25 after LARS); 1 = off
    norm_rescale: float = bounded(1.0, low=0, low_open=True)


@dataclass
class FinetuneConfig(Sections):
    data: SegDataConfig = field(default_factory=SegDataConfig)
    model: SegModelConfig = field(default_factory=SegModelConfig)
    optim: SegOptimConfig = field(default_factory=SegOptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    lab: SegLabConfig = field(default_factory=SegLabConfig)


def build_finetune_config(preset: str | None = None, overrides: list[str] | dict | None = None,
                          base: dict | None = None) -> FinetuneConfig:
    config = resolve_sections(FinetuneConfig(), preset_layers("finetune", preset, overrides, base))
    config.validate()
    return config


def lr_factor(schedule: str, total: int, warmup: int, power: float = 0.9):
    """Linear warmup, then poly (1 - p)^power or cosine decay, per iteration."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "poly":
            return (1.0 - progress) ** power
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class SegmentationTraining(L.LightningModule):
    """(images, masks) -> cross-entropy with the ignore index."""

    def __init__(self, config: FinetuneConfig, init: dict[str, Any]):
        super().__init__()
        self.config = config
        self.save_hyperparameters({"method": "finetune", "config": config.to_dict(), "init": init})
        m = config.model
        self.model = Segmenter(m.head, init["backbone"], config.data.num_classes, m.decoder_channels,
                               init.get("unet_width", 64))

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Lightning sets submodule modes by attribute, bypassing LinearReadout.train, which keeps a
        # frozen backbone (and its BatchNorm statistics) in eval mode: apply it again
        self.model.train()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, masks = batch
        loss = F.cross_entropy(self.model(images), masks, ignore_index=self.config.data.ignore_index)
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=False)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def parameter_groups(self) -> list[dict]:
        """timm's weight-decay groups (none on biases and norm weights, frozen parameters left out),
        each split into the rest (first: the logged lr) and the backbone, at lr x `lab.backbone_lr_scale`."""
        o = self.config.optim
        in_backbone = {id(p) for p in self.model.backbone_model().parameters()}
        groups = []
        for group in param_groups_weight_decay(self.model, o.weight_decay):
            for backbone, scale in ((False, 1.0), (True, self.config.lab.backbone_lr_scale)):
                params = [p for p in group["params"] if (id(p) in in_backbone) == backbone]
                if params:
                    groups.append({**group, "params": params, "lr": o.lr * scale})
        return groups

    def configure_optimizers(self):
        o = self.config.optim
        groups = self.parameter_groups()
        if o.name == "sgd":
            optimizer = create_optimizer_v2(groups, opt="momentum", lr=o.lr, momentum=o.momentum)
        else:
            optimizer = create_optimizer_v2(groups, opt="adamw", lr=o.lr, **fused_adam(self.model))
        factor = lr_factor(o.schedule, o.iterations, o.warmup_iters, o.poly_power)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@dataclass
class FinetuneResult(RunResult):
    init: dict[str, Any] = field(default_factory=dict)

    @property
    def segmenter(self) -> Path:
        return self.files["segmenter"]


def finetune(backbone: str | Path | None, images: str | Path, masks: str | Path, out: str | Path,
             split: str | Path | None = None, preset: str | None = None,
             overrides: list[str] | dict | None = None, resume: bool = False,
             progress: bool = True, decoder: str | Path | None = None, **sections: dict) -> FinetuneResult:
    """Train a segmentation head on the labeled images of `split` (all images if None), its backbone
    initialized from an exported backbone file, or randomly when `backbone` is None / "none". `decoder`
    (a run's `decoder.safetensors`) initializes the decoder too: dep/ddep's with the `unet` head, dt-mix's
    (regressor and logit head, G.4) with `upernet`.

    Writes `out/segmenter.safetensors` + `segmenter.json` (what `evaluate` reads), checkpoints, logs,
    the resolved config and `run.json`. Settings: `preset`, `overrides`, then section keywords such as
    `data={"num_classes": 19}` or `optim={"iterations": 2000}`.
    """
    overrides = merge_overrides(overrides, sections)
    run = RunFolder(out)
    base = run.saved_config() if resume else None
    config = build_finetune_config(None if base else preset, overrides, base)
    weights = None
    if backbone is None or str(backbone).lower() == "none":
        init = {"backbone": config.model.backbone, "backbone_init": "random", "source": None}
    else:
        name, weights, meta = read_backbone_export(backbone)
        init = {"backbone": name, "backbone_init": "pretrained", "source": str(Path(backbone).resolve()),
                "pretrain_method": meta.get("method", "")}
    decoder_weights = _decoder_init(decoder, config, init)
    config.model.unet_width = init["unet_width"]  # saved resolved: a resume rebuilds the same U-Net
    d = config.data
    train_set = SegmentationData(images, masks, split, d.resolution, d.num_classes, d.ignore_index,
                                 augment=True, scale_range=tuple(d.scale_range), hflip=d.hflip)
    ckpt = run.start(resume)
    run.save_config(config)
    engine.seed_everything(config.trainer.seed)
    o = config.optim
    trainer = engine.build_trainer(config.trainer, run.path, o.iterations, o.batch_size, progress)
    loader = engine.make_loader(Repeated(train_set, o.iterations * o.batch_size), o.batch_size, trainer,
                                d.num_workers, "optim.batch_size")
    if ckpt is not None and (run / INIT).is_file():  # how the run started, whatever this call passed
        init = run.read(INIT)
    module = SegmentationTraining(config, init)
    if ckpt is None:
        if weights is not None:
            module.model.load_backbone(weights, str(backbone), config.lab.norm_rescale)
            init["norm_rescale"] = config.lab.norm_rescale
        if decoder_weights is not None:
            init["decoder_random_layers"] = module.model.load_decoder(decoder_weights, str(decoder))
        if trainer.is_global_zero:
            run.write(INIT, init)
    fitted = engine.fit(run, trainer, module, loader, ckpt)
    result = FinetuneResult(**vars(fitted), init=init)
    result.files["segmenter"] = run / SEGMENTER
    if trainer.is_global_zero:
        info = {**init, "head": config.model.head, "num_classes": d.num_classes, "ignore_index": d.ignore_index,
                "resolution": d.resolution, "decoder_channels": config.model.decoder_channels,
                "unet_width": init["unet_width"],
                "labeled_images": len(train_set), "split": str(split) if split else None,
                "iterations": result.steps, "seconds": round(result.seconds, 1)}
        save_segmenter(module.model, run.path, info)
        run.write_summary(summary(result, "finetune", epochs=result.steps * o.batch_size / len(train_set), **info))
    return result


def _decoder_init(decoder: str | Path | None, config: FinetuneConfig, init: dict[str, Any]) -> dict | None:
    """Checks a pretrained decoder against the model it will initialize; records it in `init`."""
    m = config.model
    init["unet_width"] = m.unet_width or 64
    init["decoder_init"] = "random"
    if decoder is None:
        return None
    weights, meta = read_decoder_export(decoder)
    if m.head != meta["head"]:
        raise UserError(f"--decoder {decoder} is a pretrained {meta['head']} decoder ({meta['method']}): it needs "
                        f"--head {meta['head']} (model.head={m.head})")
    if init["backbone_init"] != "pretrained":
        raise UserError(f"--decoder {decoder}: its inputs come from a pretrained encoder; pass that encoder as "
                        "--backbone (the run that wrote the decoder wrote backbone.safetensors beside it)")
    if meta["model"] != init["backbone"]:
        raise UserError(f"--decoder {decoder} was pretrained on a {meta['model']} encoder, --backbone is "
                        f"{init['backbone']}")
    if meta["head"] == "unet":
        width = int(meta["unet_width"])
        if m.unet_width and m.unet_width != width:
            raise UserError(f"--decoder {decoder} has unet_width {width}, model.unet_width is {m.unet_width}")
        init["unet_width"] = width
    else:
        if int(meta["decoder_channels"]) != m.decoder_channels:
            raise UserError(f"--decoder {decoder} is {meta['decoder_channels']} channels wide, "
                            f"model.decoder_channels is {m.decoder_channels}")
        classes = int(meta["num_classes"])
        if classes != config.data.num_classes:  # another task's labels: keep the decoder, not the classifier
            warnings.warn(f"--decoder {decoder}: its logit head was distilled for {classes} classes, this task has "
                          f"{config.data.num_classes}: the segmentation head starts from random init", stacklevel=3)
            weights = {k: v for k, v in weights.items() if not k.startswith("segmentation_head.")}
    init.update({"decoder_init": "pretrained", "decoder_source": str(Path(decoder).resolve()),
                 "decoder_method": meta.get("method", "")})
    return weights
