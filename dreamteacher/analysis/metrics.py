"""Confusion matrix and IoU: the mIoU of every table in the papers (classes absent from both the
labels and the predictions of the whole split do not count)."""

from __future__ import annotations

import math

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts, rows = true class, columns = predicted class."""
    valid = target != ignore_index
    index = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes).cpu()


def iou_per_class(confusion: torch.Tensor) -> list[float]:
    """IoU in percent per class; NaN where the class appears in neither labels nor predictions."""
    confusion = confusion.double()
    true_pos = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - true_pos
    return [float(tp / u * 100) if u > 0 else math.nan for tp, u in zip(true_pos, union)]


def mean_iou(per_class: list[float]) -> float:
    present = [v for v in per_class if not math.isnan(v)]
    return sum(present) / len(present) if present else math.nan


def pixel_accuracy(confusion: torch.Tensor) -> float:
    total = confusion.sum()
    return float(confusion.diag().sum() / total * 100) if total > 0 else math.nan


def format_iou_table(per_class: list[float], class_names: list[str] | None = None) -> str:
    names = class_names or [str(i) for i in range(len(per_class))]
    width = max(len("class"), *(len(n) for n in names))
    lines = [f"{'class':<{width}}  IoU", f"{'-' * width}  -----"]
    lines += [f"{n:<{width}}  {'n/a' if math.isnan(v) else f'{v:5.1f}'}" for n, v in zip(names, per_class)]
    lines.append(f"{'mean':<{width}}  {mean_iou(per_class):5.1f}")
    return "\n".join(lines)
