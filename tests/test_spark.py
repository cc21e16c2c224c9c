"""SparK: the sparse encoder never lets a masked position reach a visible one, its BatchNorm statistics
come from the visible positions only, and the method trains and exports like every other."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import load_file

from conftest import TINY_PRESET, write_images
from dreamteacher import api
from dreamteacher.methods.spark import MaskedBatchNorm2d, SparseEncoder, expand_mask, masked_patch_loss, patchify
from dreamteacher.nn.backbone import Backbone


def random_mask(batch: int, h: int, w: int, keep: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    active = torch.zeros(batch, h * w, dtype=torch.bool)
    for row in active:
        row[torch.randperm(h * w, generator=gen)[:keep]] = True
    return active.view(batch, 1, h, w)


@pytest.mark.parametrize("name", ["test_resnet", "test_convnext"])
def test_masked_positions_are_zero_everywhere_and_never_reach_a_visible_one(name):
    torch.manual_seed(0)
    encoder = SparseEncoder(Backbone(name)).train()
    images = torch.rand(2, 3, 96, 128) * 2 - 1
    active = random_mask(2, 3, 4, keep=5)
    changed = images.clone()
    changed[~expand_mask(active, (96, 128)).expand_as(images)] = torch.rand(int((~active).sum()) * 3 * 32 * 32) * 2 - 1
    with torch.no_grad():
        first, second = encoder(images, active), encoder(changed, active)
    for a, b in zip(first, second):
        keep = expand_mask(active, a.shape[-2:]).expand_as(a)
        assert torch.equal(a[keep], b[keep])  # visible outputs ignore what the masked pixels were
        assert not a[~keep].any()  # and masked positions are exactly zero at every level
    # without the mask the backbone is itself again (nothing left switched on)
    plain = Backbone(name)
    plain.load_state_dict(encoder.backbone.state_dict())
    with torch.no_grad():
        assert all(torch.equal(x, y) for x, y in zip(encoder.backbone(images), plain(images)))


def test_sparse_batchnorm_uses_the_statistics_of_the_visible_positions_only():
    torch.manual_seed(0)
    bn = MaskedBatchNorm2d(4, momentum=0.1).train()
    x = torch.randn(2, 4, 6, 8) * 3 + 1
    bn.active = random_mask(2, 3, 4, keep=5)
    out = bn(x)
    keep = expand_mask(bn.active, (6, 8))[:, 0]
    for c in range(4):  # slow reference: the visible values of each channel
        values = [x[b, c, i, j].item() for b in range(2) for i in range(6) for j in range(8) if keep[b, i, j]]
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / len(values)
        unbiased = var * len(values) / (len(values) - 1)
        for b in range(2):
            for i in range(6):
                for j in range(8):
                    expected = (x[b, c, i, j].item() - mean) / (var + bn.eps) ** 0.5 if keep[b, i, j] else 0.0
                    assert out[b, c, i, j].item() == pytest.approx(expected, abs=1e-4)
        assert bn.running_mean[c].item() == pytest.approx(0.1 * mean, rel=1e-4)
        assert bn.running_var[c].item() == pytest.approx(0.9 + 0.1 * unbiased, rel=1e-4)


def test_the_loss_counts_masked_patches_against_the_per_patch_normalized_image():
    torch.manual_seed(0)
    target, reconstruction = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    active = torch.tensor([[True, False], [False, True]]).view(1, 1, 2, 2)
    patches_t, patches_r = patchify(target, 32), patchify(reconstruction, 32)
    errors = []
    for k in (1, 2):  # the masked patches, row-major
        t = (patches_t[0, k] - patches_t[0, k].mean()) / (patches_t[0, k].var() + 1e-6).sqrt()
        errors.append((patches_r[0, k] - t).pow(2).mean())
    assert masked_patch_loss(reconstruction, target, active, 32).item() == pytest.approx(float(sum(errors) / 2), rel=1e-5)


def test_spark_pretrains_and_exports_a_strict_timm_backbone(tmp_path):
    images = write_images(tmp_path / "images", size=(64, 64))
    run = api.pretrain(images, tmp_path / "spark", method="spark", preset=TINY_PRESET,
                       overrides=["data.resolution=[64,64]"], progress=False,
                       spark={"decoder_width": 32})
    assert run.steps == 4 and run.final_loss is not None and run.final_loss > 0
    model = timm.create_model("test_resnet", num_classes=0)
    model.load_state_dict(load_file(str(run.files["backbone"])), strict=True)
    described = api.info(run.run_dir)
    assert described["method"] == "spark" and "SparK" in described["what"]


def test_a_resolution_without_whole_mask_patches_is_refused_for_spark_only(tmp_path, capsys):
    from dreamteacher.cli import main

    images = write_images(tmp_path / "images", size=(48, 48))
    settings = ["--preset", str(TINY_PRESET)]
    code = main(["pretrain", "--method", "spark", "--data", str(images), "--out", str(tmp_path / "run"),
                 "--no-progress", *settings, "--set", "data.resolution=[48,48]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "data.resolution [48, 48] must be divisible by 32" in err[0], err
    assert not (tmp_path / "run" / "checkpoints").exists()
    # the setting is spark's: every other method's configuration takes such a resolution
    from dreamteacher.core.config import build_config

    assert build_config("demo", ["data.resolution=[48,48]"]).data.resolution == [48, 48]
