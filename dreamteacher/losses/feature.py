"""Feature distillation losses of DreamTeacher (section 3.1, Eq. 1-3). Pure functions on tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def whiten(feats_bchw: torch.Tensor, over: str = "pixel", eps: float = 1e-5) -> torch.Tensor:
    """The non-learnable whitening W of Eq. 1, a LayerNorm the paper leaves unspecified beyond
    "normalizes differing feature magnitudes across layers":

    - "pixel": over the channels at each pixel (every pixel's target has the same energy, so the
      spatial energy map that attention transfer matches is flattened out of the MSE target);
    - "layer": over each sample's whole (C, H, W) map (one scale per map; the spatial energy
      pattern, which attention transfer also matches, is kept).
    """
    if over == "pixel":
        return F.layer_norm(feats_bchw.permute(0, 2, 3, 1), feats_bchw.shape[1:2], eps=eps).permute(0, 3, 1, 2)
    if over == "layer":
        return F.layer_norm(feats_bchw, feats_bchw.shape[1:], eps=eps)
    raise ValueError(f"whiten: over must be 'pixel' or 'layer', got '{over}'")


def whitened_mse_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], over: str = "pixel") -> torch.Tensor:
    """Eq. 1: (1/L) sum_l mean ||f_l^r - W(f_l^g)||^2, averaged over batch, channels and pixels.

    student[l], teacher[l]: (B, C_l, H_l, W_l), same shapes; `over`: see `whiten`.
    """
    losses = [F.mse_loss(s.float(), whiten(t.float(), over)) for s, t in zip(student, teacher)]
    return torch.stack(losses).mean()


def attention_map(feats_bchw: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Q = vec(sum_c |A_c|^p), l2-normalized per sample: (B, C, H, W) -> (B, H*W)."""
    return F.normalize(feats_bchw.float().abs().pow(p).sum(dim=1).flatten(1), dim=1)


def attention_transfer_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], p: int = 2) -> torch.Tensor:
    """Eq. 2 (Zagoruyko & Komodakis): (1/L) sum_l mean_j || Q_j^r/|Q_j^r| - Q_j^g/|Q_j^g| ||_p,
    with j the samples of the batch (one attention map per sample and level)."""
    losses = [torch.linalg.vector_norm(attention_map(s, p) - attention_map(t, p), ord=p, dim=1).mean()
              for s, t in zip(student, teacher)]
    return torch.stack(losses).mean()
