"""Optimizer and schedule helpers shared by every training module."""

from __future__ import annotations

import math

import torch


def fused_adam(module: torch.nn.Module) -> dict:
    """Keyword arguments for torch's Adam/AdamW: `fused=True` where torch has a fused kernel for the
    parameters' devices (CPU, CUDA): one kernel per step instead of several per tensor (a ResNet-18's
    AdamW step: 33 ms -> 5 ms on 2 CPU cores). Called once the module sits on its device."""
    devices = {p.device.type for p in module.parameters() if p.requires_grad}
    return {"fused": True} if devices and devices <= {"cpu", "cuda"} else {}


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR multiplier: linear warmup to 1, then cosine decay to 0 (per optimizer step)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


