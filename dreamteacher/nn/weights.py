"""Weight files as the rest of the package reads them: our backbone and decoder exports (safetensors
with metadata saying what they are), checked strictly against the model they go into."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from dreamteacher.core.errors import UserError


def _read_export(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(weights, metadata) of a .safetensors export; one clear line for a missing or unreadable file."""
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except Exception:  # noqa: BLE001 - any unreadable file: one message
        raise UserError(f"{path}: not a safetensors {what} export") from None


def read_backbone_export(path: str | Path) -> tuple[str, dict[str, torch.Tensor], dict[str, str]]:
    """An exported backbone -> (timm model name, weights under timm keys, metadata)."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".ckpt":
        raise UserError(f"{path} is a training run/checkpoint, not a backbone export: run "
                        f"`dreamteacher export {path}` and pass the .safetensors it writes")
    weights, meta = _read_export(path, "backbone")
    if meta.get("format") != "timm" or "model" not in meta:
        hint = f" (this one has {meta['format']} keys)" if meta.get("format") else ""
        raise UserError(f"{path}: not a dreamteacher backbone export in the timm format{hint}: make one with "
                        "`dreamteacher export RUN --format timm`")
    return meta["model"], weights, meta


def read_decoder_export(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A `decoder.safetensors` of a dep/ddep/dt-mix run -> (weights, metadata: format, head, model, ...)."""
    weights, meta = _read_export(Path(path), "decoder")
    if not str(meta.get("format", "")).endswith("-decoder") or "head" not in meta:
        raise UserError(f"{path}: not a decoder export (dep, ddep and dt-mix runs write decoder.safetensors)")
    return weights, meta


def load_backbone(path: str | Path) -> torch.nn.Module:
    """A timm model (num_classes=0) with the exported weights, loaded strictly."""
    name, weights, _ = read_backbone_export(path)
    model = timm.create_model(name, pretrained=False, num_classes=0)
    model.load_state_dict(weights, strict=True)
    return model


def load_timm_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Strict load, except the classifier-head keys an export carries and a feature model has pruned."""
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # tensors of other shapes: another architecture
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise UserError(f"{source}: backbone weights do not fit the model ({lines[1] if len(lines) > 1 else lines[0]})"
                        ) from None
    unexpected = [k for k in unexpected if not k.startswith(("head.", "fc.", "classifier."))]
    if missing or unexpected:
        raise UserError(f"{source}: backbone weights do not fit the model "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def non_finite_tensors(tensors: dict) -> list[str]:
    """Names of the floating-point tensors (torch or numpy) of `tensors` that hold a NaN or an infinity."""
    bad = []
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad.append(name)
        elif isinstance(value, np.ndarray) and value.dtype.kind == "f" and not bool(np.isfinite(value).all()):
            bad.append(name)
    return bad
