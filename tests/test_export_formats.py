"""Every export format loads where its users fine-tune: into the real class where the package installs
here (timm, torchvision, segmentation_models_pytorch), against the target's documented ResNet-50 key
layout where it does not (mmsegmentation, detectron2); no tensor dropped or duplicated; `info`
describes every kind of file."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from dreamteacher.cli import main
from dreamteacher.core.config import build_config
from dreamteacher.core.errors import UserError
from dreamteacher.export.checkpoints import export_backbone

BACKBONE_PREFIX = "backbone.features.model."  # where a dt-feat student holds its timm model
from dreamteacher.describe import describe


def fake_training_checkpoint(folder: Path, name: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """A checkpoint laid out as `pretrain` writes it (Lightning's state_dict + hyper_parameters), with
    a randomly initialized timm student, so that every value can be traced through the export."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=0)
    for value in model.state_dict().values():  # distinct values everywhere, BN statistics and counters too
        if value.is_floating_point():
            value.copy_(torch.randn_like(value))
        else:
            value.fill_(int(torch.randint(1, 1 << 30, ())))
    weights = model.state_dict()
    state = {BACKBONE_PREFIX + k: v for k, v in weights.items()}
    state["regressor.some.weight"] = torch.zeros(3)  # heads must not leak into exports
    config = build_config(None, [f"student.backbone={name}"]).to_dict()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "last.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"method": "dt-feat", "config": config, "teacher": "t"},
                "global_step": 7, "epoch": 1}, path)
    return path, weights


@pytest.fixture(scope="module")
def resnet50_ckpt(tmp_path_factory):
    return fake_training_checkpoint(tmp_path_factory.mktemp("r50"), "resnet50")


def _no_drop_no_duplicate(source: dict[str, torch.Tensor], exported: dict, skip=lambda k: False) -> None:
    """Every source tensor appears exactly once in the export, by value."""
    wanted = {k: v for k, v in source.items() if not skip(k)}
    assert len(exported) == len(wanted)
    used = set()
    for key, value in wanted.items():
        matches = [k for k, v in exported.items() if k not in used and v.shape == tuple(value.shape)
                   and torch.equal(torch.as_tensor(v), value)]
        assert len(matches) == 1, key
        used.add(matches[0])


def test_timm_export_loads_strictly(resnet50_ckpt, tmp_path):
    ckpt, weights = resnet50_ckpt
    out = export_backbone(ckpt, tmp_path / "b.safetensors", "timm")
    model = timm.create_model("resnet50", num_classes=0)
    model.load_state_dict(load_file(out), strict=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_torchvision_export_loads_into_torchvision_resnet(resnet50_ckpt, tmp_path):
    import torchvision

    ckpt, weights = resnet50_ckpt
    out = export_backbone(ckpt, tmp_path / "tv.safetensors", "torchvision")
    model = torchvision.models.resnet50(weights=None)
    missing, unexpected = model.load_state_dict(load_file(out), strict=False)
    assert missing == ["fc.weight", "fc.bias"] and unexpected == []
    assert torch.equal(model.layer3[2].bn2.running_var, weights["layer3.2.bn2.running_var"])


def test_smp_export_loads_into_the_encoder_of_an_smp_model(resnet50_ckpt, tmp_path):
    import segmentation_models_pytorch as smp

    ckpt, weights = resnet50_ckpt
    out = export_backbone(ckpt, tmp_path / "smp.safetensors", "smp")
    model = smp.Unet("tu-resnet50", encoder_weights=None, classes=3)
    model.encoder.load_state_dict(load_file(out), strict=True)
    _no_drop_no_duplicate(weights, load_file(out))


def test_smp_export_maps_flattened_stages_of_convnext(tmp_path):
    import segmentation_models_pytorch as smp

    ckpt, weights = fake_training_checkpoint(tmp_path / "cnx", "convnext_atto")
    out = export_backbone(ckpt, tmp_path / "cnx.safetensors", "smp")
    exported = load_file(out)
    assert "model.stem_0.weight" in exported and "model.stages_0.blocks.0.conv_dw.weight" in exported
    smp.Unet("tu-convnext_atto", encoder_weights=None, classes=3).encoder.load_state_dict(exported, strict=True)
    # only the classifier head's norm (not part of a segmentation encoder) is left out
    _no_drop_no_duplicate(weights, exported, skip=lambda k: k.startswith("head."))


NORM = ("weight", "bias", "running_mean", "running_var")


def resnet50_layout(stem: str, stem_norm: str, stages: list[str], norm: str, shortcut: str,
                    shortcut_norm: str) -> list[str]:
    """The keys of a ResNet-50 (3, 4, 6, 3 bottlenecks, 3 convs each, a projection shortcut on the
    first block of every stage) under one library's naming; `norm` has `{}` for the conv number."""
    keys = [f"{stem}.weight"] + [f"{stem_norm}.{n}" for n in NORM]
    for stage, blocks in zip(stages, (3, 4, 6, 3)):
        for b in range(blocks):
            for c in (1, 2, 3):
                keys += [f"{stage}.{b}.conv{c}.weight"] + [f"{stage}.{b}.{norm.format(c)}.{n}" for n in NORM]
            if b == 0:
                keys += [f"{stage}.{b}.{shortcut}.weight"] + [f"{stage}.{b}.{shortcut_norm}.{n}" for n in NORM]
    return keys


# detectron2's converted torchvision R-50 (MODEL.WEIGHTS "R-50.pkl"): the norm lives inside its conv
# (`stem.conv1.norm`, `res2.0.conv1.norm`), stages res2..res5, `shortcut` + `shortcut.norm`.
D2_R50 = resnet50_layout("stem.conv1", "stem.conv1.norm", ["res2", "res3", "res4", "res5"], "conv{}.norm",
                         "shortcut", "shortcut.norm")
# mmcv ResNet(depth=50), MMSegmentation's / MMDetection's `backbone.`: conv1/bn1, layer1..layer4,
# convK/bnK, downsample.0 (conv) / downsample.1 (norm); every norm also has a num_batches_tracked.
_MM = resnet50_layout("backbone.conv1", "backbone.bn1", [f"backbone.layer{i}" for i in (1, 2, 3, 4)], "bn{}",
                      "downsample.0", "downsample.1")
MMSEG_R50 = _MM + [k.replace("running_var", "num_batches_tracked") for k in _MM if k.endswith("running_var")]


def test_mmseg_export_has_mmcv_resnet50_names(resnet50_ckpt, tmp_path):
    ckpt, weights = resnet50_ckpt
    out = export_backbone(ckpt, tmp_path / "r50.pth", "mmseg")
    payload = torch.load(out, map_location="cpu", weights_only=True)
    assert set(payload) == {"meta", "state_dict"}
    state = payload["state_dict"]
    assert set(state) == set(MMSEG_R50) and len(MMSEG_R50) == 53 + 53 * 5  # 53 convs, 53 norms
    _no_drop_no_duplicate(weights, state)


def test_detectron2_export_has_d2_r50_names(resnet50_ckpt, tmp_path):
    ckpt, weights = resnet50_ckpt
    out = export_backbone(ckpt, tmp_path / "r50.pkl", "detectron2")
    with open(out, "rb") as f:
        payload = pickle.load(f)
    assert payload["matching_heuristics"] is True
    model = payload["model"]
    assert set(model) == set(D2_R50) and len(D2_R50) == 53 + 53 * 4
    # FrozenBatchNorm2d has no step counter: those are the only entries not carried over
    _no_drop_no_duplicate(weights, {k: torch.from_numpy(v) for k, v in model.items()},
                          skip=lambda k: k.endswith("num_batches_tracked"))


def test_formats_that_need_a_torchvision_twin_refuse_other_students(tmp_path):
    ckpt, _ = fake_training_checkpoint(tmp_path / "cnx", "convnext_atto")
    for fmt in ("torchvision", "mmseg", "detectron2"):
        with pytest.raises(UserError, match=f"--format {fmt} needs a torchvision ResNet-family student"):
            export_backbone(ckpt, tmp_path / f"x.{fmt}", fmt)


def test_info_describes_checkpoints_exports_and_refusals(resnet50_ckpt, tmp_path, capsys):
    ckpt, _ = resnet50_ckpt
    about = describe(ckpt)
    assert about["kind"] == "training checkpoint" and about["method"] == "dt-feat" and about["step"] == 7
    assert set(about["parts"]) == {"backbone", "regressor"}
    tv = export_backbone(ckpt, tmp_path / "tv.safetensors", "torchvision")
    assert describe(tv)["format"] == "torchvision" and describe(tv)["model"] == "resnet50"
    assert describe(export_backbone(ckpt, tmp_path / "r.pth", "mmseg"))["format"] == "mmseg"
    assert describe(export_backbone(ckpt, tmp_path / "r.pkl", "detectron2"))["format"] == "detectron2"
    assert main(["info", str(ckpt)]) == 0
    assert "method: dt-feat" in capsys.readouterr().out

    # resume vs initialize: each file refused where it does not belong, with the command to use
    timm_file = export_backbone(ckpt, tmp_path / "b.safetensors", "timm")
    assert main(["finetune", "--backbone", str(ckpt), "--images", str(tmp_path), "--masks", str(tmp_path),
                 "--out", str(tmp_path / "seg"), "--num-classes", "3"]) == 2
    assert "dreamteacher export" in capsys.readouterr().err
    assert main(["finetune", "--backbone", str(tv), "--images", str(tmp_path), "--masks", str(tmp_path),
                 "--out", str(tmp_path / "seg"), "--num-classes", "3"]) == 2
    assert "--format timm" in capsys.readouterr().err
    assert main(["pretrain", "--teacher", str(tmp_path), "--data", str(tmp_path), "--out", str(timm_file),
                 "--resume"]) == 2
    assert "exported backbone" in capsys.readouterr().err
