"""Backbone-only exports with the key names of the library users fine-tune in (timm here).

A pretraining checkpoint holds the student, its heads and the optimizer; an export holds only the
backbone, under exactly the keys of `timm.create_model(name, num_classes=0)`, so that
`model.load_state_dict(safetensors.torch.load_file(path), strict=True)` works.
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file

from dreamteacher.errors import UserError

BACKBONE_PREFIX = "backbone.features.model."


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable or foreign file: one message for all
        raise UserError(f"{path}: not a readable training checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise UserError(f"{path}: not a dreamteacher training checkpoint (no state_dict / hyper_parameters)")
    return ckpt


def _atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def export_backbone(checkpoint: str | Path, out: str | Path) -> Path:
    """Training checkpoint -> `out` (.safetensors, timm keys) + `out.json` (what it is)."""
    ckpt = read_checkpoint(checkpoint)
    hparams = ckpt["hyper_parameters"]
    name = hparams["config"]["student"]["backbone"]
    weights = {k[len(BACKBONE_PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(BACKBONE_PREFIX)}
    if not weights:
        raise UserError(f"{checkpoint}: holds no student backbone (method '{hparams.get('method')}')")
    # timm's feature wrapper drops the classifier head (and e.g. ConvNeXt's head norm); fill those
    # with the model's own init so the file has exactly timm's key set for num_classes=0.
    model = timm.create_model(name, pretrained=False, num_classes=0)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith("head") for k in missing):
        raise UserError(f"{checkpoint}: backbone weights do not match timm '{name}' "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"format": "timm", "model": name, "num_classes": 0, "method": hparams.get("method", ""),
            "teacher": str(hparams.get("teacher", "")), "step": int(ckpt.get("global_step", 0)),
            "input": "RGB normalized with the timm model's mean/std",
            "load": f"timm.create_model('{name}', num_classes=0).load_state_dict(load_file(path), strict=True)"}
    _atomic_save_safetensors(model.state_dict(), out, {k: str(v) for k, v in info.items()})
    out.with_suffix(".json").write_text(json.dumps({**info, "config": hparams["config"]}, indent=2))
    return out


def load_backbone(path: str | Path) -> torch.nn.Module:
    """A timm model (num_classes=0) with the exported weights, loaded strictly."""
    path = Path(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001
        raise UserError(f"{path}: not a safetensors backbone export") from None
    if meta.get("format") != "timm" or "model" not in meta:
        raise UserError(f"{path}: not a dreamteacher backbone export (use `dreamteacher export RUN` first)")
    model = timm.create_model(meta["model"], pretrained=False, num_classes=0)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model
