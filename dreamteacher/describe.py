"""`dreamteacher info PATH`: what a run folder, training checkpoint or export holds, so that nobody has
to guess which file resumes a run, which initializes a fine-tuning and under which key names."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from dreamteacher.errors import UserError


def _parts(state: dict[str, torch.Tensor], depth: int = 1) -> dict[str, int]:
    """Parameter counts per top-level part of a state dict (`backbone`, `regressor`, ...)."""
    counts: Counter = Counter()
    for key, value in state.items():
        if hasattr(value, "numel"):
            counts[".".join(key.split(".")[:depth])] += int(value.numel())
        elif hasattr(value, "size"):  # numpy (detectron2 pickles)
            counts[".".join(key.split(".")[:depth])] += int(value.size)
    return dict(counts)


def _config_summary(config: dict) -> dict[str, Any]:
    return {"resolution": config["data"]["resolution"], "student": config["student"]["backbone"],
            "t": config["encode"]["t"], "blocks": config["encode"]["blocks"], "optimizer": config["optim"]["name"],
            "batch_size": config["optim"]["batch_size"], "epochs": config["optim"]["epochs"]}


def checkpoint_info(path: Path) -> dict[str, Any]:
    from dreamteacher.checkpoints import read_checkpoint

    ckpt = read_checkpoint(path)
    hp = ckpt["hyper_parameters"]
    method = hp.get("method", "?")
    info: dict[str, Any] = {"kind": "training checkpoint", "path": str(path), "method": method,
                            "step": int(ckpt.get("global_step", 0)), "epoch": int(ckpt.get("epoch", 0)),
                            "parts": _parts(ckpt["state_dict"]),
                            "optimizer_state": bool(ckpt.get("optimizer_states"))}
    if method == "finetune":
        info["init"] = hp.get("init")
        info["config"] = {k: hp["config"][k] for k in ("data", "model", "optim")}
        info["use"] = "resume: dreamteacher finetune ... --out RUN --resume"
    else:
        if "teacher" in hp:
            info["teacher"] = hp["teacher"]
        info["config"] = _config_summary(hp["config"]) if "student" in hp["config"] else hp["config"].get("data")
        info["use"] = ("resume: --resume with the same --out; initialize a fine-tuning: "
                       "`dreamteacher export RUN` first, then `finetune --backbone RUN/backbone.safetensors`")
    return info


def export_info(path: Path) -> dict[str, Any]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                keys = list(f.keys())
                params = sum(_numel(f.get_slice(k).get_shape()) for k in keys)
        except Exception:  # noqa: BLE001
            raise UserError(f"{path}: not a readable safetensors file") from None
        if path.name == "segmenter.safetensors" and (path.parent / "segmenter.json").is_file():
            return {"kind": "fine-tuned segmentation model", "path": str(path), "tensors": len(keys),
                    "parameters": params, **json.loads((path.parent / "segmenter.json").read_text()),
                    "use": "dreamteacher evaluate RUN --images DIR --masks DIR"}
        if "format" not in meta:
            return {"kind": "safetensors file without dreamteacher metadata (not an export)", "path": str(path),
                    "tensors": len(keys), "parameters": params, "first_keys": keys[:5]}
        if meta["format"] in ("smp-unet-decoder", "smp-upernet-decoder"):
            kind = "U-Net decoder export (denoising pretraining)" if meta["format"] == "smp-unet-decoder" else \
                "UperNet decoder and head export (dt-mix regressor and logit head)"
            return {"kind": kind, "path": str(path), "tensors": len(keys),
                    "parameters": params, **{k: v for k, v in meta.items() if k not in ("format", "load")},
                    "use": meta.get("load", "")}
        return {"kind": f"backbone export ({meta['format']} keys)", "path": str(path), "tensors": len(keys),
                "parameters": params, **{k: v for k, v in meta.items() if k != "format"}, "format": meta["format"],
                "use": f"initialize: `dreamteacher finetune --backbone {path}` (cannot resume training)"
                if meta["format"] == "timm" else meta.get("load", "")}
    if suffix in (".pth", ".pkl"):
        if suffix == ".pth":
            payload = torch.load(path, map_location="cpu", weights_only=True)
            state = payload.get("state_dict", {}) if isinstance(payload, dict) else {}
        else:
            import pickle

            with open(path, "rb") as f:
                payload = pickle.load(f)  # noqa: S301 - a file the user asked us to describe
            state = payload.get("model", {}) if isinstance(payload, dict) else {}
        meta = payload.get("meta", {}) if isinstance(payload, dict) else {}
        if not meta.get("format"):
            return {"kind": f"{suffix} file without dreamteacher metadata", "path": str(path), "tensors": len(state)}
        return {"kind": f"backbone export ({meta['format']} keys)", "path": str(path), "tensors": len(state),
                "parts": _parts(state), **meta}
    raise UserError(f"{path}: not a file dreamteacher knows (.ckpt, .safetensors, .pth, .pkl or a run folder)")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def run_info(folder: Path) -> dict[str, Any]:
    from dreamteacher.train.engine import checkpoint_path

    info: dict[str, Any] = {"kind": "run folder", "path": str(folder)}
    if (folder / "results.json").is_file():
        results = json.loads((folder / "results.json").read_text())
        return {"kind": "benchmark results", "path": str(folder), "recipe": results.get("recipe"),
                "cells": len(results.get("rows", [])), "use": f"see {folder / 'results.md'}"}
    if (folder / "meta.json").is_file() and any(folder.glob("block*.npy")):
        meta = json.loads((folder / "meta.json").read_text())
        key = meta["key"]
        return {"kind": "teacher feature cache", "path": str(folder), "images": key["num_images"],
                "encodings_per_image": key["encodings"], "t": key["t"], "mode": key["mode"],
                "blocks": key["blocks"], "resolution": key["resolution"], "teacher_sha256": key["teacher"],
                "gib": round(meta["bytes"] / 2**30, 3), "use": "dreamteacher pretrain ... --cache PATH"}
    if (folder / "model_index.json").is_file() or (folder / "config.json").is_file():
        return {"kind": "diffusers model folder", "path": str(folder), "use": "--teacher PATH"}
    ckpt = checkpoint_path(folder)
    if ckpt.is_file():
        info.update({k: v for k, v in checkpoint_info(ckpt).items() if k not in ("kind", "path")})
        info["checkpoint"] = str(ckpt)
    if (folder / "run.json").is_file():
        info["finished"] = json.loads((folder / "run.json").read_text())
    else:
        info["finished"] = False
    files = [p.name for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".pth", ".pkl")]
    if (folder / "teacher").is_dir():
        files.append("teacher/ (diffusers DDPMPipeline)")
    info["files"] = files
    if not ckpt.is_file() and not files:
        raise UserError(f"{folder}: no dreamteacher run here (no checkpoints/last.ckpt, exports or teacher)")
    return info


def describe(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        return run_info(path)
    if not path.is_file():
        raise UserError(f"not found: {path}")
    if path.suffix == ".ckpt":
        return checkpoint_info(path)
    if path.suffix == ".pt":
        from dreamteacher.teachers.adm import infer_adm_config

        state = torch.load(path, map_location="cpu", weights_only=True)
        return {"kind": "guided-diffusion (ADM) checkpoint", "path": str(path), "architecture": infer_adm_config(state),
                "use": "--teacher PATH"}
    return export_info(path)
