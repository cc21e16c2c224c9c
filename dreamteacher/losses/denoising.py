"""Denoising pretraining objective (Brempong et al., DeP/DDeP, Eq. 1-4). Pure functions on tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def corrupt(images: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor | float,
            ddpm_scaling: bool = False) -> torch.Tensor:
    """Eq. 1: x~ = x + sigma * eps (images in [-1, 1], eps ~ N(0, I), sigma a scalar or (B,)).

    With `ddpm_scaling`, Eq. 2 at the same signal-to-noise ratio: x~ = sqrt(g) x + sqrt(1 - g) eps with
    g = 1 / (1 + sigma^2), i.e. Eq. 1 divided by sqrt(1 + sigma^2) (unit variance for unit-variance x).
    """
    sigma = torch.as_tensor(sigma, dtype=images.dtype, device=images.device).reshape(-1, 1, 1, 1)
    noisy = images + sigma * eps
    return noisy / torch.sqrt(1 + sigma**2) if ddpm_scaling else noisy


def denoising_loss(prediction: torch.Tensor, images: torch.Tensor, eps: torch.Tensor,
                   target: str = "eps") -> torch.Tensor:
    """Eq. 4: ||f(x~) - eps||^2 (or - x with `target="x"`, Table 7), averaged over batch, channels and
    pixels. prediction, images, eps: (B, 3, H, W)."""
    if target not in ("eps", "x"):
        raise ValueError(f"target must be 'eps' or 'x', got '{target}'")
    return F.mse_loss(prediction.float(), (eps if target == "eps" else images).float())
