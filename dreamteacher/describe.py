"""`dreamteacher info PATH`: what a run folder, training checkpoint or export holds, so that nobody has
to guess which file resumes a run, which initializes a fine-tuning and under which key names."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dreamteacher.core.config import SCHEMA_KEY
from dreamteacher.core.errors import UserError
from dreamteacher.core.runs import SEGMENTER, SEGMENTER_INFO, TEACHER, RunFolder, read_json
from dreamteacher.data.features import META_FILE
from dreamteacher.export.checkpoints import read_checkpoint
from dreamteacher.methods.base import METHODS
from dreamteacher.nn.weights import non_finite_tensors
from dreamteacher.teachers.adm import infer_adm_config
from dreamteacher.teachers.base import teacher_kind


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
    """The settings that say what a pretraining was (a run holds the sections its method reads: `encode`
    only where it distills a teacher's features)."""
    summary = {"resolution": config["data"]["resolution"], "student": config["student"]["backbone"]}
    if "encode" in config:
        summary.update(t=config["encode"]["t"], blocks=config["encode"]["blocks"])
    optim = config.get("optim", {})
    summary.update({k: optim[v] for k, v in (("optimizer", "name"), ("batch_size", "batch_size"), ("epochs", "epochs"))
                    if v in optim})
    return summary


def checkpoint_info(path: Path) -> dict[str, Any]:
    ckpt = read_checkpoint(path)
    hp = ckpt["hyper_parameters"]
    method = hp.get("method", "?")
    info: dict[str, Any] = {"kind": "training checkpoint", "path": str(path), "method": method,
                            "step": int(ckpt.get("global_step", 0)), "epoch": int(ckpt.get("epoch", 0)),
                            "parts": _parts(ckpt["state_dict"]),
                            "optimizer_state": bool(ckpt.get("optimizer_states"))}
    _flag_non_finite(info, ckpt["state_dict"])
    if method in METHODS:
        info["what"] = METHODS.get(method).summary
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
    """What a weights file is (an export, a decoder, a segmenter), flagged when it holds NaN or
    infinite values."""
    info, tensors = _export_info(path)
    _flag_non_finite(info, tensors())
    return info


def _export_info(path: Path) -> tuple[dict[str, Any], Any]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                keys = list(f.keys())
                params = sum(_numel(f.get_slice(k).get_shape()) for k in keys)
        except Exception:  # noqa: BLE001
            raise UserError(f"{path}: not a readable safetensors file") from None
        weights = lambda: load_file(str(path))  # noqa: E731
        if path.name == SEGMENTER and (path.parent / SEGMENTER_INFO).is_file():
            return {"kind": "fine-tuned segmentation model", "path": str(path), "tensors": len(keys),
                    "parameters": params, **read_json(path.parent / SEGMENTER_INFO),
                    "use": "dreamteacher evaluate RUN --images DIR --masks DIR"}, weights
        if "format" not in meta:
            return {"kind": "safetensors file without dreamteacher metadata (not an export)", "path": str(path),
                    "tensors": len(keys), "parameters": params, "first_keys": keys[:5]}, weights
        if meta["format"].endswith("-decoder"):
            head = {"unet": "U-Net", "upernet": "UperNet"}.get(meta.get("head", ""), meta.get("head", "?"))
            with_head = " and head" if any(k.startswith("segmentation_head.") for k in keys) else ""
            kind = f"{head} decoder{with_head} export ({meta.get('method', '?')} pretraining)"
            return {"kind": kind, "path": str(path), "tensors": len(keys),
                    "parameters": params, **{k: v for k, v in meta.items() if k not in ("format", "load")},
                    "use": meta.get("load", "")}, weights
        return {"kind": f"backbone export ({meta['format']} keys)", "path": str(path), "tensors": len(keys),
                "parameters": params, **{k: v for k, v in meta.items() if k != "format"}, "format": meta["format"],
                "use": f"initialize: `dreamteacher finetune --backbone {path}` (cannot resume training)"
                if meta["format"] == "timm" else meta.get("load", "")}, weights
    if suffix in (".pth", ".pkl"):
        if suffix == ".pth":
            try:
                payload = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - truncated, foreign or code-carrying files
                raise UserError(f"{path}: not a readable PyTorch weights file ({exc.__class__.__name__})") from None
            state = payload.get("state_dict", {}) if isinstance(payload, dict) else {}
        else:
            payload = safe_unpickle(path)
            state = payload.get("model", {}) if isinstance(payload, dict) else {}
        meta = payload.get("meta", {}) if isinstance(payload, dict) else {}
        if not meta.get("format"):
            return {"kind": f"{suffix} file without dreamteacher metadata", "path": str(path),
                    "tensors": len(state)}, lambda: state
        return {"kind": f"backbone export ({meta['format']} keys)", "path": str(path), "tensors": len(state),
                "parts": _parts(state), **meta}, lambda: state
    raise UserError(f"{path}: not a file dreamteacher knows (.ckpt, .safetensors, .pth, .pkl or a run folder)")


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds numpy arrays and plain containers only: a detectron2 `.pkl` is
    described without running what a crafted file could carry (`pickle.load` would run it)."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict"),
               ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a weights file")


def safe_unpickle(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return _ArraysOnly(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, ImportError) as exc:
        raise UserError(f"{path}: not a weights pickle (numpy arrays and plain containers): {exc}") from None


def _flag_non_finite(info: dict, tensors: dict) -> None:
    """A warning in `info` when weights hold NaN or infinite values (a diverged run)."""
    bad = non_finite_tensors(tensors)
    if bad:
        info["non_finite_tensors"] = len(bad)
        info["warning"] = f"{len(bad)} tensors hold NaN or infinite values (e.g. {bad[0]}): do not use these weights"


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def run_info(folder: Path) -> dict[str, Any]:

    info: dict[str, Any] = {"kind": "run folder", "path": str(folder)}
    if (folder / "results.json").is_file():
        results = read_json(folder / "results.json")
        return {"kind": "benchmark results", "path": str(folder), "recipe": results.get("recipe"),
                "cells": len(results.get("rows", [])), "use": f"see {folder / 'results.md'}"}
    if (folder / META_FILE).is_file() and any(folder.glob("block*.npy")):
        meta = read_json(folder / META_FILE)
        key = meta["key"]
        return {"kind": "teacher feature cache", "path": str(folder), "images": key["num_images"],
                "encodings_per_image": key["encodings"], "t": key["t"], "mode": key["mode"],
                "blocks": key["blocks"], "resolution": key["resolution"], "teacher_sha256": key["teacher"],
                "gib": round(meta["bytes"] / 2**30, 3), "use": "dreamteacher pretrain ... --cache PATH"}
    if (folder / "model_index.json").is_file() or (folder / "config.json").is_file():
        return {"kind": "diffusers model folder", "path": str(folder), "use": "--teacher PATH"}
    run = RunFolder(folder)
    saved = run.saved_config()  # refuses settings of a newer schema, naming the file
    if saved is not None:
        info["settings_schema"] = saved.get(SCHEMA_KEY, 1)
    ckpt = run.checkpoint
    if ckpt.is_file():
        info.update({k: v for k, v in checkpoint_info(ckpt).items() if k not in ("kind", "path")})
        info["checkpoint"] = str(ckpt)
    info["finished"] = run.summary() or False
    files = [p.name for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".pth", ".pkl")]
    if (folder / TEACHER).is_dir():
        try:
            files.append(f"{TEACHER}/ ({teacher_kind(folder / TEACHER, ('diffusion', 'gan')).description})")
        except UserError:
            files.append(f"{TEACHER}/ (not a teacher dreamteacher can load)")
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
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"{path}: not a readable PyTorch checkpoint ({exc.__class__.__name__})") from None
        return {"kind": "guided-diffusion (ADM) checkpoint", "path": str(path), "architecture": infer_adm_config(state),
                "use": "--teacher PATH"}
    return export_info(path)
