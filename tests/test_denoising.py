"""Denoising pretraining (DeP / DDeP): the objective against a hand computation, the frozen encoder of
DDeP, and a fine-tuning U-Net that starts from the pretrained decoder."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import IGNORE, NUM_CLASSES, TINY, TINY_PRESET, write_images, write_scenes
from dreamteacher import api
from dreamteacher.nn.weights import read_backbone_export, read_decoder_export
from dreamteacher.core.config import build_config
from dreamteacher.core.errors import UserError
from dreamteacher.losses import corrupt, denoising_loss
from dreamteacher.methods.denoising import DDeP, DenoisingPretraining, DeP

DENOISE_SETTINGS = ["denoise.unet_width=8", "optim.epochs=2"]
DENOISE = TINY + DENOISE_SETTINGS  # every section: for configs built without a method


def test_corruption_and_loss_match_a_hand_computation():
    x = torch.tensor([0.5, -1.0, 0.25, 1.0]).view(1, 1, 2, 2)
    eps = torch.tensor([1.0, 0.5, -2.0, 0.0]).view(1, 1, 2, 2)
    pred = torch.tensor([0.5, 0.5, -1.0, 1.0]).view(1, 1, 2, 2)
    # Eq. 1 at sigma 0.8: x + 0.8 eps
    assert torch.allclose(corrupt(x, eps, 0.8).flatten(), torch.tensor([1.3, -0.6, -1.35, 1.0]))
    # Eq. 2 at the same SNR: gamma = 1 / (1 + 0.64); sqrt(gamma) x + sqrt(1 - gamma) eps
    g = 1 / 1.64
    expected = [math.sqrt(g) * a + math.sqrt(1 - g) * b for a, b in zip([0.5, -1.0, 0.25, 1.0], [1.0, 0.5, -2.0, 0.0])]
    assert torch.allclose(corrupt(x, eps, 0.8, ddpm_scaling=True).flatten(), torch.tensor(expected))
    # Eq. 4: mean squared error to eps: ((0.5-1)^2 + 0 + (-1+2)^2 + 1^2) / 4
    assert denoising_loss(pred, x, eps, "eps").item() == pytest.approx((0.25 + 0 + 1 + 1) / 4)
    # Table 7's x target: ((0.5-0.5)^2 + (0.5+1)^2 + (-1-0.25)^2 + 0) / 4
    assert denoising_loss(pred, x, eps, "x").item() == pytest.approx((0 + 2.25 + 1.5625 + 0) / 4)
    # one sigma per image (Table 6's sampled sigma)
    two, noise = torch.zeros(2, 1, 1, 1), torch.ones(2, 1, 1, 1)
    assert corrupt(two, noise, torch.tensor([0.2, 0.3])).flatten().tolist() == pytest.approx([0.2, 0.3])


def test_sigma_is_fixed_by_method_or_drawn_from_the_range():
    dep = DeP(build_config(None, DENOISE))
    ddep = DDeP(build_config(None, DENOISE))
    assert dep.sample_sigma(3, torch.device("cpu")).tolist() == pytest.approx([0.8] * 3)
    assert ddep.sample_sigma(3, torch.device("cpu")).tolist() == pytest.approx([0.1] * 3)
    ranged = DeP(build_config(None, DENOISE + ["denoise.sigma_range=[0.2,0.3]"]))
    sigmas = ranged.sample_sigma(1000, torch.device("cpu"))
    assert 0.2 <= sigmas.min() < 0.21 and 0.29 < sigmas.max() <= 0.3
    with pytest.raises(UserError, match="denoise.target"):
        build_config(None, DENOISE + ["denoise.target=noise"])
    with pytest.raises(UserError, match="sigma_range"):
        build_config(None, DENOISE + ["denoise.sigma_range=[0.3,0.2]"])


@pytest.fixture(scope="module")
def dep_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dep")
    images = write_images(root / "images")
    result = api.pretrain(images, root / "dep", method="dep", preset=TINY_PRESET, overrides=DENOISE_SETTINGS, progress=False)
    return root, result


def test_dep_trains_the_whole_unet_and_exports_backbone_and_decoder(dep_run):
    import timm

    root, result = dep_run
    assert result.steps == 4 and math.isfinite(result.final_loss)
    name, weights, meta = read_backbone_export(result.files["backbone"])
    assert meta["method"] == "dep"
    timm.create_model(name, num_classes=0).load_state_dict(weights, strict=True)
    decoder, dmeta = read_decoder_export(result.files["decoder"])
    assert dmeta["model"] == "test_resnet" and dmeta["unet_width"] == "8"
    assert all(k.startswith("blocks.") for k in decoder)  # the decoder alone: no 3-channel projection
    info = api.info(result.files["decoder"])
    assert info["kind"].startswith("U-Net decoder export") and info["unet_width"] == "8"
    assert api.info(root / "dep")["method"] == "dep"
    # the encoder learned (DeP trains it from random init)
    untrained = DeP(build_config(None, DENOISE)).encoder.state_dict()
    assert any(not torch.equal(untrained[k], weights[k]) for k in untrained if k in weights)


def test_ddep_freezes_the_encoder_and_its_batchnorm_statistics(dep_run, tmp_path, monkeypatch):
    root, dep = dep_run
    encoder = dep.files["backbone"]
    seen = []  # image sizes the denoiser trains on: random 32x32 crops of the 32x64 frames
    compute_losses = DenoisingPretraining.compute_losses
    monkeypatch.setattr(DenoisingPretraining, "compute_losses",
                        lambda self, batch: seen.append(batch["images"].shape[-2:]) or compute_losses(self, batch))
    result = api.pretrain(root / "images", tmp_path / "ddep", method="ddep", encoder=encoder, progress=False,
                          preset=TINY_PRESET, overrides=DENOISE_SETTINGS + ["data.resolution=[32,64]", "denoise.crop=[32,32]"])
    assert seen and set(seen) == {(32, 32)}
    _, before, _ = read_backbone_export(encoder)
    _, after, _ = read_backbone_export(result.files["backbone"])
    assert any(k.endswith("running_mean") for k in before)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    trained, _ = read_decoder_export(result.files["decoder"])
    pretrained, _ = read_decoder_export(dep.files["decoder"])
    assert any(not torch.equal(trained[k], pretrained[k]) for k in trained)  # the decoder learned
    with pytest.raises(UserError, match="needs --encoder"):
        api.pretrain(root / "images", tmp_path / "x", method="ddep", preset=TINY_PRESET, overrides=DENOISE_SETTINGS, progress=False)
    with pytest.raises(UserError, match="is not an input of --method d?dep"):
        api.pretrain(root / "images", tmp_path / "y", teacher=root, method="dep", preset=TINY_PRESET, overrides=DENOISE_SETTINGS, progress=False)


FINETUNE = {"data": {"resolution": [32, 32], "num_classes": NUM_CLASSES, "ignore_index": IGNORE, "num_workers": 0},
            "model": {"head": "unet"}, "optim": {"iterations": 1, "batch_size": 2}, "trainer": {"accelerator": "cpu", "precision": "32-true"}}


def test_finetune_starts_from_the_pretrained_decoder(dep_run, tmp_path, monkeypatch):
    import dreamteacher.workflows.finetune as ft

    root, dep = dep_run
    images, masks = write_scenes(tmp_path / "scenes")
    start = {}

    def remember(self):  # the decoder weights the first step starts from
        start.update({k: v.clone() for k, v in self.model.net.decoder.state_dict().items()})

    monkeypatch.setattr(ft.SegmentationTraining, "on_train_start", remember, raising=False)
    result = ft.finetune(dep.files["backbone"], images, masks, tmp_path / "seg", progress=False,
                         decoder=dep.files["decoder"], overrides=FINETUNE)
    decoder, _ = read_decoder_export(dep.files["decoder"])
    assert start.keys() == decoder.keys() and all(torch.equal(start[k], decoder[k]) for k in start)
    assert result.init["decoder_init"] == "pretrained" and result.init["unet_width"] == 8
    assert api.info(tmp_path / "seg")["finished"]["decoder_init"] == "pretrained"
    scores = api.evaluate(tmp_path / "seg", images, masks)
    assert 0 <= scores.miou <= 100
    # a resume without --decoder still says how the run started
    resumed = ft.finetune(dep.files["backbone"], images, masks, tmp_path / "seg", progress=False, resume=True,
                          overrides={"optim": {"iterations": 2}})
    assert resumed.steps == 2 and resumed.init["decoder_init"] == "pretrained"
    assert resumed.init["decoder_random_layers"] == result.init["decoder_random_layers"]

    with pytest.raises(UserError, match="needs --head unet"):
        ft.finetune(dep.files["backbone"], images, masks, tmp_path / "a", progress=False, decoder=dep.files["decoder"],
                    overrides={**FINETUNE, "model": {"head": "upernet", "decoder_channels": 16}})
    with pytest.raises(UserError, match="pass that encoder as --backbone"):
        ft.finetune(None, images, masks, tmp_path / "b", progress=False, decoder=dep.files["decoder"],
                    overrides={**FINETUNE, "model": {"head": "unet", "backbone": "test_resnet"}})
    with pytest.raises(UserError, match="unet_width 8, model.unet_width is 16"):
        ft.finetune(dep.files["backbone"], images, masks, tmp_path / "c", progress=False, decoder=dep.files["decoder"],
                    overrides={**FINETUNE, "model": {"head": "unet", "unet_width": 16}})
    with pytest.raises(UserError, match="not a decoder export"):
        ft.finetune(dep.files["backbone"], images, masks, tmp_path / "d", progress=False, decoder=dep.files["backbone"],
                    overrides=FINETUNE)
    assert load_file(str(dep.files["decoder"]))  # plain safetensors, readable without dreamteacher
