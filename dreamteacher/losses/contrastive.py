"""InfoNCE losses of MoCo v3 (image level, in-batch negatives) and PCD (pixel level, queued negatives)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_from_all(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(x of every process concatenated in rank order, this process's rank); no gradient flows
    through the other processes' parts (MoCo's `concat_all_gather`)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts), dist.get_rank()


def moco_infonce(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's contrastive loss: query i against the keys of the global batch, its own key the
    positive; scaled by 2 * temperature as in the reference code."""
    queries, keys = F.normalize(queries, dim=1), F.normalize(keys, dim=1)
    keys, rank = gather_from_all(keys)
    logits = queries @ keys.t() / temperature
    labels = torch.arange(len(queries), device=queries.device) + rank * len(queries)
    return F.cross_entropy(logits, labels) * (2 * temperature)


def pixel_infonce(student: torch.Tensor, teacher: torch.Tensor, negatives: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """PCD's Eq. 3-4: for every pixel i, student s*_i against its teacher pixel t_i (positive) and the
    queued vectors (negatives), all l2-normalized; averaged over pixels and images.
    student, teacher: (B, C, H, W) of the same size; negatives: (K, C)."""
    s, t = F.normalize(student.float(), dim=1), F.normalize(teacher.float(), dim=1)
    positive = (s * t).sum(dim=1)  # (B, H, W)
    negative = torch.einsum("bchw,kc->bhwk", s, negatives.float())
    logits = torch.cat([positive.unsqueeze(-1), negative], dim=-1).flatten(0, 2) / temperature
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def image_infonce(student: torch.Tensor, teacher: torch.Tensor, negatives: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """The image-level variant (PCD Table 2, Eq. 1): the same loss on mean-pooled maps."""
    pooled = [x.float().mean(dim=(2, 3), keepdim=True) for x in (student, teacher)]
    return pixel_infonce(*pooled, negatives, temperature)
