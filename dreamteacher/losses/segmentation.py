"""Label losses of DreamTeacher's label distillation (section 3.2). Pure functions on tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, smooth: float = 1.0) -> torch.Tensor:
    """The D of Eq. 4 (Milletari et al.): 1 - (2 sum p y + s) / (sum p + sum y + s) per class, with p the
    softmax and y the one-hot labels over the labeled pixels, averaged over classes.

    logits: (B, K, H, W); target: (B, H, W) class ids, `ignore_index` where unlabeled.
    """
    num_classes = logits.shape[1]
    labeled = (target != ignore_index).unsqueeze(1).float()
    probs = logits.float().softmax(dim=1) * labeled
    onehot = F.one_hot(target.clamp(0, num_classes - 1) * (target != ignore_index), num_classes)
    onehot = onehot.permute(0, 3, 1, 2).float() * labeled
    dims = (0, 2, 3)
    intersection, total = (probs * onehot).sum(dims), probs.sum(dims) + onehot.sum(dims)
    return (1 - (2 * intersection + smooth) / (total + smooth)).mean()


def interpreter_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int,
                     dice_weight: float = 3.0) -> torch.Tensor:
    """Eq. 4: H(I(f), y) + lambda_d D(I(f), y) (cross-entropy over the labeled pixels)."""
    cross_entropy = F.cross_entropy(logits.float(), target, ignore_index=ignore_index)
    return cross_entropy + dice_weight * dice_loss(logits, target, ignore_index)


def soft_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    temperature: float = 4.0, relative: bool = False) -> torch.Tensor:
    """Eq. 5: H(P_tau^g, P_tau^r) = -sum_k softmax(z^g / tau)_k log softmax(z^r / tau)_k, averaged over
    pixels and batch. student_logits, teacher_logits: (B, K, H, W), same size.

    `relative`: KL(P_tau^g || P_tau^r), Eq. 5 less the soft labels' own entropy H(P_tau^g): the same
    gradient for the student, and a value that goes to 0 when it matches them (Eq. 5 itself stops at
    their entropy, which at tau = 4 over 11 classes is most of its starting value)."""
    target = (teacher_logits.float() / temperature).softmax(dim=1)
    log_probs = (student_logits.float() / temperature).log_softmax(dim=1)
    cross_entropy = -(target * log_probs).sum(dim=1)
    if relative:
        cross_entropy = cross_entropy + (target * target.clamp_min(1e-12).log()).sum(dim=1)
    return cross_entropy.mean()
