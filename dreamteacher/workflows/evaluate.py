"""`evaluate`: mIoU of any finished segmenter (a fine-tuned run, or a teacher with its feature
interpreter) on an image/mask folder pair, against the labels at their own resolution."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dreamteacher.analysis.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy
from dreamteacher.core.errors import UserError
from dreamteacher.core.runs import SEGMENTER_INFO, read_json, write_json_atomic
from dreamteacher.data.labeled import SegmentationData
from dreamteacher.nn.segmenters import load_segmenter_model
from dreamteacher.workflows.interpreter import INTERPRETER_HEAD, load_teacher_interpreter


def load_segmenter(folder: str | Path) -> tuple[nn.Module, dict]:
    """A finished fine-tuning run (or feature-interpreter run) -> (model: [0, 1] images -> logits, info)."""
    folder = Path(folder)
    info = read_json(folder / SEGMENTER_INFO)
    if info is None:
        raise UserError(f"{folder}: no finished fine-tuning run here ({SEGMENTER_INFO} missing)")
    if info["head"] == INTERPRETER_HEAD:
        return load_teacher_interpreter(folder, info), info
    return load_segmenter_model(folder, info), info


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
        write_json_atomic(Path(out), result.to_dict())
    return result
