"""Backbone-only exports under the key names of the library users fine-tune in.

A pretraining checkpoint holds the student, its heads and the optimizer; an export holds only the
backbone. Formats (`dreamteacher export RUN --format F`):

- `timm` (.safetensors): exactly the keys of `timm.create_model(name, num_classes=0)`, loads with
  `strict=True`;
- `torchvision` (.safetensors, ResNet family): `torchvision.models.resnet50()` keys, loads with
  `strict=False` missing only `fc.weight`/`fc.bias`;
- `smp` (.safetensors): the state dict of a segmentation_models_pytorch encoder `tu-<name>`
  (`model.encoder.load_state_dict(...)`, strict);
- `mmseg` (.pth, ResNet family): `{"meta", "state_dict"}` with `backbone.` + mmcv ResNet names,
  what MMSegmentation / MMDetection read with `load_from` (or `init_cfg` with `prefix="backbone."`);
- `detectron2` (.pkl, ResNet-50/101): `{"model": numpy arrays under detectron2's names (stem.conv1,
  res2..res5, convN.norm, shortcut), "__author__", "matching_heuristics": True}`, the layout of
  detectron2's converted torchvision R-50; its FrozenBatchNorm has no `num_batches_tracked`, so those
  step counters are the only entries not written.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import timm
import torch

from dreamteacher.core.errors import UserError
from dreamteacher.core.runs import atomic_write, save_safetensors_atomic, write_json_atomic
from dreamteacher.methods.base import METHODS
from dreamteacher.nn.weights import non_finite_tensors


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable or foreign file: one message for all
        raise UserError(f"{path}: not a readable training checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise UserError(f"{path}: not a dreamteacher training checkpoint (no state_dict / hyper_parameters)")
    return ckpt


FORMATS = ("timm", "torchvision", "smp", "mmseg", "detectron2")
SUFFIXES = {"timm": ".safetensors", "torchvision": ".safetensors", "smp": ".safetensors", "mmseg": ".pth",
            "detectron2": ".pkl"}
# timm students whose architecture and key names torchvision (and so mmcv / detectron2) share
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                       "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2")


def timm_backbone_weights(checkpoint: str | Path) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """Training checkpoint -> (timm name, hyperparameters, weights under exactly the keys of
    `timm.create_model(name, num_classes=0)`)."""
    ckpt = read_checkpoint(checkpoint)
    hparams = ckpt["hyper_parameters"]
    name = hparams["config"]["student"]["backbone"]
    model = timm.create_model(name, pretrained=False, num_classes=0)
    prefix = ckpt.get("backbone_prefix") or _find_prefix(ckpt["state_dict"], model.state_dict())
    weights = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if prefix and k.startswith(prefix)}
    if not weights:
        raise UserError(f"{checkpoint}: holds no student backbone (method '{hparams.get('method')}')")
    bad = non_finite_tensors(weights)
    if bad:
        raise UserError(f"{checkpoint}: {len(bad)} backbone tensors hold NaN or infinite values (e.g. {bad[0]}): the "
                        "run diverged; nothing exported")
    # timm's feature wrapper drops the classifier head (and e.g. ConvNeXt's head norm); fill those
    # with the model's own init so the file has exactly timm's key set for num_classes=0.
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith("head") for k in missing):
        raise UserError(f"{checkpoint}: backbone weights do not match timm '{name}' "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    hparams = {**hparams, "step": int(ckpt.get("global_step", 0))}
    return name, hparams, model.state_dict()


def _find_prefix(state_dict: dict, timm_keys: dict) -> str | None:
    """Where a timm model sits in a state dict written before checkpoints recorded it: the shortest
    prefix under which every non-head key of the model is found (MoCo v3's momentum copy is longer)."""
    wanted = [k for k in timm_keys if not k.startswith(("head", "fc.", "classifier"))]
    anchor = wanted[0]
    candidates = sorted({k[: -len(anchor)] for k in state_dict if k.endswith(anchor)}, key=len)
    return next((p for p in candidates if all(p + k in state_dict for k in wanted)), None)


def export_backbone(checkpoint: str | Path, out: str | Path, format: str = "timm") -> Path:
    """Training checkpoint -> `out` in `format` + `out.json` (what it is and how to load it)."""
    if format not in FORMATS:
        raise UserError(f"unknown export format '{format}'; choose one of {', '.join(FORMATS)}")
    name, hparams, weights = timm_backbone_weights(checkpoint)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"format": format, "model": name, "method": hparams.get("method", ""),
            "teacher": str(hparams.get("teacher", "")), "step": hparams["step"],
            "input": "RGB normalized with the timm model's mean/std"}
    info.update(WRITERS[format](name, weights, out, info))
    write_json_atomic(out.with_suffix(".json"), {**info, "config": hparams["config"]})
    return out


def _write_timm(name: str, weights: dict, out: Path, info: dict) -> dict:
    extra = {"num_classes": 0,
             "load": f"timm.create_model('{name}', num_classes=0).load_state_dict(load_file(path), strict=True)"}
    save_safetensors_atomic(weights, out, {k: str(v) for k, v in {**info, **extra}.items()})
    return extra


def _require_torchvision_twin(name: str, format: str) -> None:
    if name not in TORCHVISION_RESNETS:
        raise UserError(f"--format {format} needs a torchvision ResNet-family student "
                        f"({', '.join(TORCHVISION_RESNETS)}); '{name}' has none: use --format timm or smp")


def torchvision_keys(name: str, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ResNet keys are torchvision's (conv1, bn1, layerN.i.convK/bnK, downsample.0/1); checked
    against the real torchvision model rather than assumed."""
    import torchvision

    with torch.device("meta"):
        expected = set(getattr(torchvision.models, name)(weights=None).state_dict()) - {"fc.weight", "fc.bias"}
    if set(weights) != expected:
        raise UserError(f"timm '{name}' keys differ from torchvision's "
                        f"({sorted(set(weights) ^ expected)[:3]}); use --format timm")
    return weights


def _write_torchvision(name: str, weights: dict, out: Path, info: dict) -> dict:
    _require_torchvision_twin(name, "torchvision")
    extra = {"load": f"torchvision.models.{name}().load_state_dict(load_file(path), strict=False) "
                     "# missing: fc.weight, fc.bias"}
    save_safetensors_atomic(torchvision_keys(name, weights), out, {k: str(v) for k, v in {**info, **extra}.items()})
    return extra


def smp_encoder_keys(name: str, weights: dict[str, torch.Tensor], depth: int = 5) -> dict[str, torch.Tensor]:
    """timm keys -> the keys of segmentation_models_pytorch's `tu-<name>` encoder, whose timm feature
    wrapper keeps the modules up to the last feature level and flattens top-level Sequentials
    (`stem.0.weight` -> `model.stem_0.weight`)."""
    from segmentation_models_pytorch.encoders import get_encoder

    encoder = get_encoder(f"tu-{name}", weights=None, depth=depth)
    target = set(encoder.state_dict())
    mapped: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        first, _, rest = key.partition(".")
        second, _, tail = rest.partition(".")
        for candidate in (f"model.{key}", f"model.{first}_{second}.{tail}"):
            if candidate in target:
                mapped[candidate] = value
                break
        else:
            if not key.startswith(("head", "fc.", "global_pool", "norm_pre", "classifier")):
                raise UserError(f"timm key '{key}' of '{name}' has no place in the smp encoder tu-{name}")
    if set(mapped) != target:
        raise UserError(f"smp encoder tu-{name} expects keys the export lacks: {sorted(target - set(mapped))[:3]}")
    return mapped


def _write_smp(name: str, weights: dict, out: Path, info: dict) -> dict:
    extra = {"encoder": f"tu-{name}", "encoder_depth": 5,
             "load": f"smp.Unet('tu-{name}', encoder_weights=None).encoder.load_state_dict(load_file(path))"}
    save_safetensors_atomic(smp_encoder_keys(name, weights), out, {k: str(v) for k, v in {**info, **extra}.items()})
    return extra


def _write_mmseg(name: str, weights: dict, out: Path, info: dict) -> dict:
    _require_torchvision_twin(name, "mmseg")
    # mmcv's ResNet (depth=18..152, not the V1c deep stem) names its layers like torchvision
    state = {f"backbone.{k}": v.contiguous() for k, v in torchvision_keys(name, weights).items()}
    extra = {"load": "load_from=path (or backbone init_cfg=dict(type='Pretrained', checkpoint=path, "
                     "prefix='backbone.')); backbone=dict(type='ResNet', depth=N)"}
    atomic_write(out, lambda tmp: torch.save({"meta": {**info, **extra}, "state_dict": state}, tmp))
    return extra


def detectron2_name(key: str) -> str:
    """torchvision ResNet key -> detectron2's (the rule of detectron2's convert-torchvision-to-d2.py)."""
    if "layer" not in key:
        key = "stem." + key
    for t in (1, 2, 3, 4):
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def _write_detectron2(name: str, weights: dict, out: Path, info: dict) -> dict:
    _require_torchvision_twin(name, "detectron2")
    model = {detectron2_name(k): v.numpy() for k, v in torchvision_keys(name, weights).items()
             if not k.endswith("num_batches_tracked")}
    extra = {"load": "MODEL.WEIGHTS=path (DetectionCheckpointer; MODEL.PIXEL_MEAN/STD as the timm model's, "
                     "RGB input)"}
    payload = {"model": model, "__author__": "dreamteacher", "matching_heuristics": True, "meta": {**info, **extra}}
    atomic_write(out, lambda tmp: tmp.write_bytes(pickle.dumps(payload)))
    return extra


WRITERS = {"timm": _write_timm, "torchvision": _write_torchvision, "smp": _write_smp, "mmseg": _write_mmseg,
           "detectron2": _write_detectron2}


def export_decoder(checkpoint: str | Path, out: str | Path) -> Path:
    """A pretrained decoder -> `out` (.safetensors) + `out.json`, what `finetune --decoder` loads, in
    the layout of the head its method pretrains (`PretrainMethod.decoder_export`)."""
    ckpt = read_checkpoint(checkpoint)
    hparams = ckpt["hyper_parameters"]
    method, config = hparams.get("method", ""), hparams["config"]
    exported = METHODS.get(method).decoder_export(ckpt["state_dict"], hparams) if method in METHODS else None
    if not exported or not exported[0]:
        with_decoders = ", ".join(n for n, m in METHODS.items() if m.decoder_head)
        raise UserError(f"{checkpoint}: holds no pretrained decoder (method '{method}'); {with_decoders} runs "
                        "pretrain one")
    weights, info = exported
    out = Path(out)
    info.update({"model": config["student"]["backbone"], "method": method, "step": int(ckpt.get("global_step", 0)),
                 "load": f"dreamteacher finetune --head {info['head']} --backbone BACKBONE --decoder PATH"})
    save_safetensors_atomic(weights, out, {k: str(v) for k, v in info.items()})
    write_json_atomic(out.with_suffix(".json"), {**info, "config": config})
    return out
