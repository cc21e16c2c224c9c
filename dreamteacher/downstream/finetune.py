"""Label-efficient semantic segmentation: fine-tune a head on an exported (or random) backbone, evaluate.

Defaults are the paper's (DreamTeacher F.3, from MMSegmentation's UperNet): SGD lr 0.01, momentum
0.9, weight decay 5e-4, poly schedule (power 0.9), 20k iterations on label subsets, random rescale
0.5-2.0, crop and flip. Presets in `dreamteacher/configs/finetune/` scale it down.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from torch.utils.data import Dataset

from dreamteacher.config import Sections, TrainerConfig, load_config_file, merge_overrides, resolve_sections, save_config
from dreamteacher.downstream.data import SegmentationData
from dreamteacher.downstream.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy
from dreamteacher.checkpoints import read_backbone_export, write_text_atomic
from dreamteacher.downstream.models import HEADS, Segmenter, load_segmenter, save_segmenter
from dreamteacher.errors import UserError
from dreamteacher.train import engine

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "finetune"
INIT_FILE = "init.json"  # which parts started pretrained: written at the start, kept by resumes


@dataclass
class SegDataConfig:
    resolution: list[int] = field(default_factory=lambda: [512, 512])  # [height, width] of training crops
    num_classes: int = 0  # must be set (e.g. --num-classes 19)
    ignore_index: int = 255  # label id excluded from the loss and from mIoU
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    hflip: bool = True
    num_workers: int = 4


@dataclass
class SegModelConfig:
    head: str = "upernet"  # or "readout": frozen backbone + linear 1x1 conv
    backbone: str = "resnet50"  # timm name, used with `--backbone none` (an export names its own model)
    decoder_channels: int = 512  # UperNet width (MMSegmentation's default)
    # U-Net finest decoder block (blocks [16, 8, 4, 2, 1] x this); 0: the --decoder's, else 64 (paper's 1x)
    unet_width: int = 0
    norm_rescale: float = 1.0  # x the pretrained backbone's conv weights (PCD's NormRescale: 0.25); 1 = off


@dataclass
class SegOptimConfig:
    name: str = "sgd"  # "sgd" (momentum) or "adamw"
    lr: float = 0.01
    # x lr for the backbone's parameters: below 1 keeps more of a pretrained backbone through a long
    # fine-tuning on few labels (the decoder and classifier still train at lr); 1 = one lr for all
    backbone_lr_scale: float = 1.0
    momentum: float = 0.9  # SGD momentum; AdamW uses betas (0.9, 0.999)
    weight_decay: float = 5e-4
    schedule: str = "poly"  # or "cosine"
    poly_power: float = 0.9
    warmup_iters: int = 0
    iterations: int = 20000
    batch_size: int = 16  # global


@dataclass
class FinetuneConfig(Sections):
    data: SegDataConfig = field(default_factory=SegDataConfig)
    model: SegModelConfig = field(default_factory=SegModelConfig)
    optim: SegOptimConfig = field(default_factory=SegOptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def available_finetune_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_layers(kind: str, preset_dir: Path, preset: str | None, overrides: list[str] | dict | None,
                  base: dict | None) -> list[dict]:
    """Config layers in order: `base` (a saved run's config), the named preset file, the overrides."""
    from dreamteacher.config import _as_dict

    layers = [base or {}]
    if preset:
        path = preset_dir / f"{preset}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in preset_dir.glob("*.yaml"))
            raise UserError(f"unknown {kind} preset '{preset}'; choose one of: {', '.join(names)}")
        layers.append(load_config_file(path))
    return layers + [_as_dict(overrides)]


def build_finetune_config(preset: str | None = None, overrides: list[str] | dict | None = None,
                          base: dict | None = None) -> FinetuneConfig:
    config = resolve_sections(FinetuneConfig, preset_layers("finetune", PRESET_DIR, preset, overrides, base))
    validate_finetune(config)
    return config


def validate_finetune(config: FinetuneConfig) -> None:
    d, m, o = config.data, config.model, config.optim
    if d.num_classes < 1:
        raise UserError("data.num_classes must be set (--num-classes N)")
    if len(d.resolution) != 2 or any(v < 32 or v % 32 for v in d.resolution):
        raise UserError(f"data.resolution must be [height, width], multiples of 32, got {d.resolution}")
    if len(d.scale_range) != 2 or not 0 < d.scale_range[0] <= d.scale_range[1]:
        raise UserError(f"data.scale_range must be [low, high] with 0 < low <= high, got {d.scale_range}")
    if m.head not in HEADS:
        raise UserError(f"model.head must be one of {', '.join(HEADS)}, got '{m.head}'")
    if m.norm_rescale <= 0:
        raise UserError(f"model.norm_rescale must be positive (1 = off, PCD's 0.25), got {m.norm_rescale}")
    if o.name not in ("sgd", "adamw"):
        raise UserError(f"optim.name must be 'sgd' or 'adamw', got '{o.name}'")
    if o.schedule not in ("poly", "cosine"):
        raise UserError(f"optim.schedule must be 'poly' or 'cosine', got '{o.schedule}'")
    if o.iterations < 1 or o.batch_size < 1:
        raise UserError("optim.iterations and optim.batch_size must be positive")
    if o.backbone_lr_scale <= 0:
        raise UserError(f"optim.backbone_lr_scale must be positive (1 = the lr of the rest), got {o.backbone_lr_scale}")


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


class Repeated(Dataset):
    """A small labeled set repeated to `length` draws, so a fixed-iteration run is one epoch."""

    def __init__(self, dataset: Dataset, length: int):
        self.dataset, self.length = dataset, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.dataset[index % len(self.dataset)]


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
        each split into the rest (first: the logged lr) and the backbone, at lr x `optim.backbone_lr_scale`."""
        o = self.config.optim
        in_backbone = {id(p) for p in self.model.backbone_model().parameters()}
        groups = []
        for group in param_groups_weight_decay(self.model, o.weight_decay):
            for backbone, scale in ((False, 1.0), (True, o.backbone_lr_scale)):
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
            optimizer = create_optimizer_v2(groups, opt="adamw", lr=o.lr, **engine.fused_adam(self.model))
        factor = lr_factor(o.schedule, o.iterations, o.warmup_iters, o.poly_power)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@dataclass
class FinetuneResult:
    run_dir: Path
    segmenter: Path
    steps: int
    seconds: float
    final_loss: float | None
    init: dict[str, Any]


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
    run_dir = engine.check_run_dir(out)
    saved = run_dir / "config.yaml"
    base = load_config_file(saved) if resume and saved.is_file() else None
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
    ckpt = engine.prepare_run_dir(run_dir, resume)
    save_config(config, saved)
    engine.seed_everything(config.trainer.seed)
    o = config.optim
    trainer = engine.build_trainer(config.trainer, run_dir, o.iterations, o.batch_size, progress)
    loader = engine.make_loader(Repeated(train_set, o.iterations * o.batch_size), o.batch_size, trainer,
                                d.num_workers, "optim.batch_size")
    init_file = run_dir / INIT_FILE
    if ckpt is not None and init_file.is_file():  # how the run started, whatever this call passed
        init = json.loads(init_file.read_text())
    module = SegmentationTraining(config, init)
    if ckpt is None:
        if weights is not None:
            module.model.load_backbone(weights, str(backbone), config.model.norm_rescale)
            init["norm_rescale"] = config.model.norm_rescale
        if decoder_weights is not None:
            init["decoder_random_layers"] = module.model.load_decoder(decoder_weights, str(decoder))
        if trainer.is_global_zero:
            write_text_atomic(init_file, json.dumps(init, indent=2))
    trainer.fit(module, loader, ckpt_path=ckpt)
    trainer.save_checkpoint(engine.checkpoint_path(run_dir), weights_only=False)
    loss = trainer.callback_metrics.get("train/loss")
    result = FinetuneResult(run_dir, run_dir / "segmenter.safetensors", trainer.global_step,
                            engine.training_seconds(trainer), float(loss) if loss is not None else None, init)
    if trainer.is_global_zero:
        info = {**init, "head": config.model.head, "num_classes": d.num_classes, "ignore_index": d.ignore_index,
                "resolution": d.resolution, "decoder_channels": config.model.decoder_channels,
                "unet_width": init["unet_width"],
                "labeled_images": len(train_set), "split": str(split) if split else None,
                "iterations": trainer.global_step, "seconds": round(result.seconds, 1)}
        save_segmenter(module.model, run_dir, info)
        (run_dir / "run.json").write_text(json.dumps({"method": "finetune", **info}, indent=2))
    return result


def _decoder_init(decoder: str | Path | None, config: FinetuneConfig, init: dict[str, Any]) -> dict | None:
    """Checks a pretrained decoder against the model it will initialize; records it in `init`."""
    from dreamteacher.checkpoints import read_decoder_export

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


@dataclass
class EvalResult:
    miou: float
    per_class: list[float]
    pixel_accuracy: float
    images: int
    confusion: list[list[int]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def crop_box(full_h: int, full_w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The region of a full-size label map that `resize_center_crop` to height x width shows:
    (top, left, rows, cols) in full-size pixels."""
    scale = max(height / full_h, width / full_w)
    rows, cols = min(full_h, round(height / scale)), min(full_w, round(width / scale))
    return (full_h - rows) // 2, (full_w - cols) // 2, rows, cols


@torch.no_grad()
def evaluate(run: str | Path, images: str | Path, masks: str | Path, split: str | Path | None = None,
             batch_size: int = 8, out: str | Path | None = None) -> EvalResult:
    """mIoU of a fine-tuned run on an image/mask folder pair, against the labels at their own
    resolution (predictions are made at the run's resolution and upsampled bilinearly as logits)."""
    model, info = load_segmenter(run)
    data = SegmentationData(images, masks, split, info["resolution"], info["num_classes"], info["ignore_index"],
                            full_masks=True)
    num_classes, ignore = info["num_classes"], info["ignore_index"]
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for start in range(0, len(data), batch_size):
        indices = range(start, min(start + batch_size, len(data)))
        batch = torch.stack([data[i][0] for i in indices])
        logits = model(batch)
        for row, i in enumerate(indices):
            full = data.full_masks[i]
            top, left, rows, cols = crop_box(*full.shape, *info["resolution"])
            target = full[top:top + rows, left:left + cols]
            up = F.interpolate(logits[row:row + 1], size=(rows, cols), mode="bilinear", align_corners=False)
            confusion += confusion_matrix(up.argmax(1)[0], target, num_classes, ignore)
    per_class = iou_per_class(confusion)
    result = EvalResult(mean_iou(per_class), per_class, pixel_accuracy(confusion), len(data), confusion.tolist())
    if out is not None:
        Path(out).write_text(json.dumps(result.to_dict(), indent=2))
    return result
