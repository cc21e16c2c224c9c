"""Fast measures of a frozen backbone's dense features, for watching pretraining while it runs.

- `ridge_readout`: a linear per-pixel classifier over the backbone's levels (upsampled to the finest,
  concatenated, standardized), fitted in closed form (ridge regression onto one-hot labels, the
  classic linear-probe shortcut): no iterations, no learning rate, the same answer for the same
  features. Its mIoU on held-out images ranks backbones the way a short fine-tuning does
  (benchmarks/README, "Live probe").
- `effective_rank`: RankMe (Garrido et al., ICML 2023), exp of the entropy of the normalized singular
  values of the features: a label-free signal that falls when features collapse and rises as they
  spread over more directions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dreamteacher.analysis.metrics import confusion_matrix, iou_per_class, mean_iou


def stack_levels(levels: list[torch.Tensor]) -> torch.Tensor:
    """[(B, C_l, H_l, W_l)] finest first -> (B, sum C_l, H_0, W_0): every level upsampled to the finest."""
    size = levels[0].shape[-2:]
    return torch.cat([F.interpolate(f.float(), size=size, mode="bilinear", align_corners=False) for f in levels], 1)


def pixels(features_bchw: torch.Tensor, labels_bhw: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The labeled pixels: (N, C) features and (N,) labels; labels are nearest-resized to the features."""
    labels = F.interpolate(labels_bhw[:, None].float(), size=features_bchw.shape[-2:], mode="nearest")[:, 0].long()
    flat = features_bchw.permute(0, 2, 3, 1).reshape(-1, features_bchw.shape[1])
    labels = labels.reshape(-1)
    keep = labels != ignore_index
    return flat[keep], labels[keep]


def ridge_readout(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int,
                  ridge: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed-form ridge regression of one-hot labels on standardized features.

    train_x (N, C), train_y (N,) -> (weight (C + 1, K), mean (C,), std (C,)); predict with
    `readout_logits`. `ridge` is relative to the mean diagonal of X^T X (scale-free)."""
    x = train_x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    targets = F.one_hot(train_y, num_classes).double()
    gram = x.T @ x
    gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=x.dtype)
    weight = torch.linalg.solve(gram, x.T @ targets)
    return weight, mean, std


def readout_logits(x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(N, C) features -> (N, K) class scores of a fitted `ridge_readout`."""
    x = (x.double() - mean) / std
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1) @ weight


def readout_miou(train_feats: torch.Tensor, train_labels: torch.Tensor, eval_feats: torch.Tensor,
                 eval_labels: torch.Tensor, num_classes: int, ignore_index: int) -> float:
    """mIoU (0-100) on `eval` of the ridge readout fitted on `train` (features (B, C, h, w), labels
    (B, H, W) with `ignore_index`), scored at the features' resolution."""
    weight, mean, std = ridge_readout(*pixels(train_feats, train_labels, ignore_index), num_classes)
    x, y = pixels(eval_feats, eval_labels, ignore_index)
    predicted = readout_logits(x, weight, mean, std).argmax(1)
    return mean_iou(iou_per_class(confusion_matrix(predicted, y, num_classes, ignore_index)))


def effective_rank(features_bchw: torch.Tensor, max_pixels: int = 4096) -> float:
    """RankMe of dense features: exp(entropy of the singular values, normalized to sum to 1) of the
    (pixels, channels) matrix, over at most `max_pixels` evenly spaced pixels."""
    flat = features_bchw.float().permute(0, 2, 3, 1).reshape(-1, features_bchw.shape[1])
    flat = flat[torch.linspace(0, len(flat) - 1, min(max_pixels, len(flat))).long()]
    singular = torch.linalg.svdvals(flat.double())
    p = singular / singular.sum().clamp_min(1e-12) + 1e-12
    return float(torch.exp(-(p * p.log()).sum()))
