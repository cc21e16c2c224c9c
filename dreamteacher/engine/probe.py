"""Watching a pretraining while it runs: the live dense probe (`probe` settings).

Every `probe.every_n_epochs` epochs, and once before the first step (the starting point's value), the
student's backbone is copied, frozen, and measured on a few fixed images:

- with labels (`probe.images` + `probe.masks`): the mIoU of a closed-form linear readout over its
  levels, fitted on the images `probe.split` names (a dozen is enough) and scored on the others or on
  `probe.eval_images` (analysis/probe.py);
- always: the features' effective rank (RankMe), a label-free signal;
- pictures: the student's PCA colors and k-means maps of `probe.pictures` fixed images go to
  TensorBoard, and the teacher's once, so the features can be watched forming.

Each probe is one line of `RUN/logs/probe.jsonl` (epoch, step, mIoU, effective rank, seconds), also
sent to every logger (`probe/miou`, `probe/effective_rank`). A resumed run skips the epochs that file
already holds, so a kill never duplicates or loses a probe. The probe runs on the first process only,
under its own random state: the training run is the same with or without it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from dreamteacher.analysis.pictures import kmeans_maps, pca_basis, pca_colors, pca_scale
from dreamteacher.analysis.probe import effective_rank, readout_miou, stack_levels
from dreamteacher.core.config import Section, bounded, register_section
from dreamteacher.core.errors import UserError
from dreamteacher.core.runs import LOGS
from dreamteacher.data.images import ImageFolder, uint8_to_unit
from dreamteacher.data.labeled import SegmentationData, read_split
from dreamteacher.nn.backbone import Backbone

PROBE_LOG = "probe.jsonl"


@dataclass
class ProbeConfig(Section):
    """The live dense probe of pretraining (off while `images` is empty). Paths are folders of images
    and of single-channel label maps with the same names, as for `finetune`."""

    images: str = ""  # labeled (or, without `masks`, unlabeled) images the probe looks at
    masks: str = ""  # their label maps; "" = no readout, the label-free signals only
    split: str = ""  # file naming the readout's training images in `images`; "" = the first half
    eval_images: str = ""  # where the readout is scored; "" = the images of `images` not in `split`
    eval_masks: str = ""
    num_classes: int = bounded(0, low=1, allowed=(0,))  # required with `masks`
    ignore_index: int = bounded(255, low=0)
    every_n_epochs: int = bounded(10, low=1)
    pictures: int = bounded(4, low=0)  # images whose feature pictures go to TensorBoard

    def check(self, config: Any) -> None:
        if self.masks and not self.images:
            raise UserError("probe.masks needs probe.images")
        if self.masks and self.num_classes < 1:
            raise UserError("probe.num_classes must be set with probe.masks (the label maps' class count)")
        if bool(self.eval_images) != bool(self.eval_masks):
            raise UserError("probe.eval_images and probe.eval_masks go together")


register_section("probe", ProbeConfig)


@dataclass
class ProbeData:
    """The probe's fixed images, loaded and checked before training starts. Images in [-1, 1]."""

    train_images: torch.Tensor | None
    train_labels: torch.Tensor | None
    eval_images: torch.Tensor
    eval_labels: torch.Tensor | None
    pictures: torch.Tensor


def load_probe_data(cfg: ProbeConfig, resolution: list[int]) -> ProbeData:
    """Everything the probe reads, checked now (a missing mask, a mask of another size or a class id
    out of range fails here, with its file named, not hours into training)."""
    if not cfg.masks:
        images = ImageFolder(cfg.images, resolution, hflip=False)
        stacked = torch.stack([uint8_to_unit(images.load(i)) for i in range(len(images))])
        return ProbeData(None, None, stacked, None, stacked[: cfg.pictures])
    def unit(images: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([uint8_to_unit(img) for img in images])

    def labeled(images: str, masks: str, split: str | None) -> SegmentationData:
        return SegmentationData(images, masks, split, resolution, cfg.num_classes, cfg.ignore_index)

    if cfg.split and cfg.eval_images:  # the usual case: only the images the probe reads are loaded
        train, scored = labeled(cfg.images, cfg.masks, cfg.split), labeled(cfg.eval_images, cfg.eval_masks, None)
        train_images, train_labels = train.images, train.masks
        eval_images, eval_labels = scored.images, scored.masks
    else:
        everything = labeled(cfg.images, cfg.masks, None)
        names = set(read_split(cfg.split)) if cfg.split else set(everything.names[: max(1, len(everything.names) // 2)])
        missing = sorted(names - set(everything.names))
        if missing:
            raise UserError(f"probe.split {cfg.split} names images that are not in {cfg.images}: {missing[:3]}")
        picked = [n in names for n in everything.names]
        train_images = [img for img, p in zip(everything.images, picked) if p]
        train_labels = [m for m, p in zip(everything.masks, picked) if p]
        if cfg.eval_images:
            scored = labeled(cfg.eval_images, cfg.eval_masks, None)
            eval_images, eval_labels = scored.images, scored.masks
        else:
            eval_images = [img for img, p in zip(everything.images, picked) if not p]
            eval_labels = [m for m, p in zip(everything.masks, picked) if not p]
            if not eval_images:
                raise UserError(f"probe: every image of {cfg.images} trains the readout; name probe.eval_images or "
                                "a probe.split of only some of them")
    scored_images = unit(eval_images)
    return ProbeData(unit(train_images), torch.stack(train_labels), scored_images, torch.stack(eval_labels),
                     scored_images[: cfg.pictures])


def read_probe_log(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / LOGS / PROBE_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def probe_summary(records: list[dict]) -> dict | None:
    """First and last probe, and the best epoch by mIoU (or by effective rank without labels)."""
    if not records:
        return None
    key = "miou" if records[0].get("miou") is not None else "effective_rank"
    best = max(records, key=lambda r: r[key])
    return {"first": records[0], "last": records[-1], "best_epoch": best["epoch"], f"best_{key}": best[key]}


class DenseProbe(Callback):
    """The live probe as a Lightning callback (see the module docstring)."""

    def __init__(self, cfg: ProbeConfig, data: ProbeData, backbone: str, run_dir: Path, steps_per_epoch: int,
                 reference: Callable[[torch.Tensor], list[torch.Tensor]] | None = None):
        self.cfg, self.data, self.backbone_name = cfg, data, backbone
        self.log_path = Path(run_dir) / LOGS / PROBE_LOG
        self.steps_per_epoch = steps_per_epoch
        self.reference = reference  # the teacher's features of the picture images (drawn once)
        self.done = {r["epoch"] for r in read_probe_log(run_dir)}

    # -- when ------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step == 0:
            self.run(trainer, pl_module, epoch=0)
            if self.reference is not None and trainer.is_global_zero:
                self.teacher_pictures(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.global_step // max(1, self.steps_per_epoch)  # epochs completed
        last = trainer.global_step >= trainer.max_steps
        if epoch % self.cfg.every_n_epochs == 0 or last:
            self.run(trainer, pl_module, epoch)

    # -- what ------------------------------------------------------------------------------------
    @torch.no_grad()
    def measure(self, pl_module) -> tuple[dict, list[torch.Tensor]]:
        """mIoU of the readout (None without labels) and effective rank, on a frozen copy of the backbone."""
        device = pl_module.device
        backbone = Backbone(self.backbone_name)
        backbone.features.model.load_state_dict(pl_module.backbone_model().state_dict())
        backbone.to(device).eval()

        def features(images: torch.Tensor) -> torch.Tensor:
            return torch.cat([stack_levels(backbone(chunk.to(device))).cpu() for chunk in images.split(16)])

        d = self.data
        scored = features(d.eval_images)
        miou = None
        if d.train_labels is not None:
            miou = readout_miou(features(d.train_images), d.train_labels, scored, d.eval_labels,
                                self.cfg.num_classes, self.cfg.ignore_index)
        levels = [level.cpu() for level in backbone(d.pictures.to(device))] if len(d.pictures) else []
        return {"miou": None if miou is None else round(miou, 2), "effective_rank": round(effective_rank(scored), 2)}, levels

    def run(self, trainer, pl_module, epoch: int) -> None:
        if epoch in self.done or not trainer.is_global_zero:
            return
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # the probe draws nothing from training's random state
            values, levels = self.measure(pl_module)
        record = {"epoch": epoch, "step": trainer.global_step, **values,
                  "seconds": round(time.perf_counter() - start, 2)}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done.add(epoch)
        metrics = {f"probe/{k}": v for k, v in values.items() if v is not None}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            if levels and isinstance(logger, TensorBoardLogger):
                self.student_pictures(logger, levels, trainer.global_step)

    # -- pictures ---------------------------------------------------------------------------------
    def pictures(self, feats: list[torch.Tensor]) -> dict[str, np.ndarray]:
        size = tuple(self.data.pictures.shape[-2:])
        out = {}
        for i, f in enumerate(feats):
            basis = pca_basis(f)
            pca = pca_colors(f, basis, size, pca_scale(f, basis))
            kmeans = kmeans_maps(f, size, k=10, seed=0)[0]
            out[f"level{i}/pca"] = np.concatenate(list(pca), axis=1)
            out[f"level{i}/kmeans"] = np.concatenate(list(kmeans), axis=1)
        return out

    def student_pictures(self, logger: TensorBoardLogger, levels: list[torch.Tensor], step: int) -> None:
        for tag, picture in self.pictures(levels).items():
            logger.experiment.add_image(f"probe/student/{tag}", picture, step, dataformats="HWC")

    def teacher_pictures(self, trainer) -> None:
        feats = [f.float().cpu() for f in self.reference(self.data.pictures)]
        images = ((self.data.pictures + 1) * 127.5).clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("probe/images", np.concatenate(list(images), axis=1), 0, dataformats="HWC")
                for tag, picture in self.pictures(feats).items():
                    logger.experiment.add_image(f"probe/teacher/{tag}", picture, 0, dataformats="HWC")
