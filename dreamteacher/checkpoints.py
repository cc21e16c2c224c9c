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

import json
from pathlib import Path

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreamteacher.errors import UserError

BACKBONE_PREFIX = "backbone.features.model."  # DreamTeacher students (methods/dt_feat.py)
# denoising pretraining: the timm model and the decoder inside the U-Net Segmenter (methods/denoising.py)
UNET_BACKBONE_PREFIX = "model.net.encoder.model.model."
UNET_DECODER_PREFIX = "model.net.decoder."
DECODER_FORMAT = "smp-unet-decoder"
UPERNET_DECODER_FORMAT = "smp-upernet-decoder"  # dt-mix: regressor + logit head as UPerNet's decoder + head


def backbone_prefix(method: str) -> str:
    return UNET_BACKBONE_PREFIX if method in ("dep", "ddep") else BACKBONE_PREFIX


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable or foreign file: one message for all
        raise UserError(f"{path}: not a readable training checkpoint ({exc.__class__.__name__})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise UserError(f"{path}: not a dreamteacher training checkpoint (no state_dict / hyper_parameters)")
    return ckpt


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to a sibling temporary file and rename it over `path`: readers see old or new, whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


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
    prefix = backbone_prefix(hparams.get("method", ""))
    weights = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not weights:
        raise UserError(f"{checkpoint}: holds no student backbone (method '{hparams.get('method')}')")
    # timm's feature wrapper drops the classifier head (and e.g. ConvNeXt's head norm); fill those
    # with the model's own init so the file has exactly timm's key set for num_classes=0.
    model = timm.create_model(name, pretrained=False, num_classes=0)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith("head") for k in missing):
        raise UserError(f"{checkpoint}: backbone weights do not match timm '{name}' "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    hparams = {**hparams, "step": int(ckpt.get("global_step", 0))}
    return name, hparams, model.state_dict()


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
    out.with_suffix(".json").write_text(json.dumps({**info, "config": hparams["config"]}, indent=2))
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
    tmp = out.with_name(out.name + ".tmp")
    torch.save({"meta": {**info, **extra}, "state_dict": state}, tmp)
    tmp.replace(out)
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
    import pickle

    _require_torchvision_twin(name, "detectron2")
    model = {detectron2_name(k): v.numpy() for k, v in torchvision_keys(name, weights).items()
             if not k.endswith("num_batches_tracked")}
    extra = {"load": "MODEL.WEIGHTS=path (DetectionCheckpointer; MODEL.PIXEL_MEAN/STD as the timm model's, "
                     "RGB input)"}
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump({"model": model, "__author__": "dreamteacher", "matching_heuristics": True,
                     "meta": {**info, **extra}}, f)
    tmp.replace(out)
    return extra


WRITERS = {"timm": _write_timm, "torchvision": _write_torchvision, "smp": _write_smp, "mmseg": _write_mmseg,
           "detectron2": _write_detectron2}


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


def upernet_decoder_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A dt-mix student's regressor and logit head under the keys of segmentation_models_pytorch's
    `UPerNet` (`decoder.*`, `segmentation_head.*`), the mapping being exact where the two share a layer:
    PPM branches and fuse = `psp.blocks.i.1` / `psp.out_conv` (same concatenation order), FPN laterals
    and output convs of levels 2, 1, 0 = `fpn_lateral_blocks.0..2` / `fpn_conv_blocks.0..2`, logit head
    = `segmentation_head.0`. smp's `feature_norms` and `fusion_block` have no counterpart: random."""
    renames = [("regressor.ppm.fuse.", "decoder.psp.out_conv."), ("label_head.", "segmentation_head.0.")]
    renames += [(f"regressor.ppm.branches.{i}.", f"decoder.psp.blocks.{i}.1.") for i in range(4)]
    renames += [(f"regressor.laterals.{level}.", f"decoder.fpn_lateral_blocks.{2 - level}.conv_norm_relu.")
                for level in range(3)]
    renames += [(f"regressor.outputs.{level}.", f"decoder.fpn_conv_blocks.{2 - level}.") for level in range(3)]
    mapped = {}
    for key, value in state_dict.items():
        for old, new in renames:
            if key.startswith(old):
                mapped[new + key[len(old):]] = value
    return mapped


def export_decoder(checkpoint: str | Path, out: str | Path) -> Path:
    """A pretrained decoder -> `out` (.safetensors) + `out.json`, what `finetune --decoder` loads:
    - dep / ddep: the U-Net decoder without its 3-channel denoising projection (the keys of
      segmentation_models_pytorch's `Unet(...).decoder`);
    - dt-mix: the regressor and logit head as an smp `UPerNet` decoder and head (G.4)."""
    ckpt = read_checkpoint(checkpoint)
    hparams = ckpt["hyper_parameters"]
    method, config = hparams.get("method", ""), hparams["config"]
    if method == "dt-mix":
        weights = upernet_decoder_weights(ckpt["state_dict"])
        info = {"format": UPERNET_DECODER_FORMAT, "head": "upernet",
                "decoder_channels": config["student"]["regressor_channels"], "num_classes": hparams["num_classes"]}
    else:
        weights = {k[len(UNET_DECODER_PREFIX):]: v for k, v in ckpt["state_dict"].items()
                   if k.startswith(UNET_DECODER_PREFIX)}
        info = {"format": DECODER_FORMAT, "head": "unet", "unet_width": config["denoise"]["unet_width"]}
    if not weights:
        raise UserError(f"{checkpoint}: holds no pretrained decoder (method '{method}'); dep, ddep and dt-mix "
                        "runs pretrain one")
    out = Path(out)
    info.update({"model": config["student"]["backbone"], "method": method, "step": int(ckpt.get("global_step", 0)),
                 "load": f"dreamteacher finetune --head {info['head']} --backbone BACKBONE --decoder PATH"})
    save_safetensors_atomic(weights, out, {k: str(v) for k, v in info.items()})
    out.with_suffix(".json").write_text(json.dumps({**info, "config": config}, indent=2))
    return out


def read_decoder_export(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A `decoder.safetensors` of a dep/ddep/dt-mix run -> (weights, metadata: format, head, model, ...)."""
    weights, meta = _read_export(Path(path), "decoder")
    if meta.get("format") not in (DECODER_FORMAT, UPERNET_DECODER_FORMAT):
        raise UserError(f"{path}: not a decoder export (dep, ddep and dt-mix runs write decoder.safetensors)")
    return weights, meta


def load_backbone(path: str | Path) -> torch.nn.Module:
    """A timm model (num_classes=0) with the exported weights, loaded strictly."""
    name, weights, _ = read_backbone_export(path)
    model = timm.create_model(name, pretrained=False, num_classes=0)
    model.load_state_dict(weights, strict=True)
    return model
