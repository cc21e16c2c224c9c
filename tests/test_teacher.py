"""Diffusion teacher: block strides, early exit, stochastic vs deterministic (DDIM) encoding."""

import pytest
import torch
from diffusers import UNet2DModel

from conftest import tiny_unet
from dreamteacher.core.errors import UserError
from dreamteacher.teachers.base import load_diffusion_teacher
from dreamteacher.teachers.diffusion import DiffusionTeacher, decoder_blocks, default_scheduler


def make_teacher(blocks=(0, 2, 4), t=50, mode="stochastic", **kw) -> DiffusionTeacher:
    return DiffusionTeacher(tiny_unet(**kw), default_scheduler(), blocks=list(blocks), t=t, mode=mode, ddim_steps=10)


def test_adm_block_numbering_gives_the_papers_strides():
    # ADM-256 topology (6 levels, 2 layers per block, resblock up/down), narrow channels to stay small
    unet = UNet2DModel(block_out_channels=[32] * 6, layers_per_block=2, norm_num_groups=32,
                       down_block_types=["ResnetDownsampleBlock2D"] * 3 + ["AttnDownBlock2D"] * 3,
                       up_block_types=["AttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"] * 3,
                       downsample_type="resnet", upsample_type="resnet", attention_head_dim=16)
    specs = {spec.block: spec.stride for _, spec in decoder_blocks(unet)}
    assert len(specs) == 18
    assert [specs[b] for b in (3, 6, 9, 12)] == [16, 8, 4, 2]
    # and those strides are what a forward pass really produces
    teacher = DiffusionTeacher(unet, default_scheduler(), blocks=[3, 6, 9, 12], t=10)
    feats = teacher.encode(torch.zeros(1, 3, 64, 64))
    assert [64 // f.shape[-1] for f in feats] == [16, 8, 4, 2]


def test_declared_specs_match_returned_features():
    teacher = make_teacher()
    feats = teacher.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    for spec, feat in zip(teacher.feature_specs, feats):
        assert feat.shape == (2, spec.channels, 32 // spec.stride, 32 // spec.stride)


def test_early_exit_gives_the_same_features_as_the_full_forward():
    teacher = make_teacher(blocks=(0, 2))
    x_t = torch.randn(2, 3, 32, 32)
    early = teacher.features(x_t, 50)
    captured = {}
    modules = [m for m, _ in decoder_blocks(teacher.unet)]
    handles = [modules[b].register_forward_hook(lambda m, i, o, b=b: captured.__setitem__(b, o)) for b in (0, 2)]
    full_output = teacher.unet(x_t, torch.tensor([50, 50])).sample  # the stock forward, to the end
    for h in handles:
        h.remove()
    assert full_output.shape == x_t.shape
    for b, feat in zip((0, 2), early):
        assert torch.equal(feat, captured[b])
    # the early exit really stops: a hook after the last needed block never fires
    fired = []
    handle = modules[5].register_forward_hook(lambda *a: fired.append(1))
    teacher.features(x_t, 50)
    handle.remove()
    assert not fired


def test_stochastic_encoding_draws_fresh_noise_and_ddim_is_deterministic():
    teacher = make_teacher()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    a, b = teacher.encode(images), teacher.encode(images)
    assert not torch.allclose(a[0], b[0])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(teacher.encode(images, generator=g1)[0], teacher.encode(images, generator=g2)[0])
    d1, d2 = teacher.encode(images, mode="ddim"), teacher.encode(images, mode="ddim")
    assert torch.equal(d1[0], d2[0])


def test_ddim_inversion_then_reverse_reconstructs_the_image():
    teacher = make_teacher(t=100)
    images = torch.nn.functional.avg_pool2d(torch.rand(2, 3, 64, 64) * 2 - 1, 2)  # smooth-ish images
    grid = teacher.ddim_grid(100, 50)
    x_t = teacher.invert(images, 100, 50)
    recon = teacher.ddim_move(x_t, grid[::-1])
    err = (recon - images).pow(2).mean().sqrt()
    noise_level = (1 - teacher.alpha_bar(100)).sqrt()  # what stochastic encoding adds at t=100
    assert float(err) < 0.05 * float(noise_level), (float(err), float(noise_level))
    assert not torch.allclose(x_t, images, atol=1e-2)  # the inversion did move the image


def test_out_of_range_block_and_missing_teacher_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="block 6 is out of range .*6 decoder blocks"):
        make_teacher(blocks=(0, 6))
    with pytest.raises(UserError, match="teacher not found"):
        load_diffusion_teacher(tmp_path / "nope", blocks=[0], t=10)
    bogus = tmp_path / "bogus.pt"
    torch.save({"weight": torch.zeros(3)}, bogus)
    with pytest.raises(UserError, match="bogus.pt.*not a guided-diffusion"):
        load_diffusion_teacher(bogus, blocks=[0], t=10)
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(UserError, match="expected a diffusers UNet2DModel, its config.json says 'AutoencoderKL'"):
        load_diffusion_teacher(tmp_path / "vae", blocks=[0], t=10)


def test_teacher_loads_from_pipeline_and_unet_folders(tiny_teacher_dir):
    from_pipeline = load_diffusion_teacher(tiny_teacher_dir, blocks=[0, 2], t=50)
    from_unet = load_diffusion_teacher(tiny_teacher_dir / "unet", blocks=[0, 2], t=50)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(from_pipeline.features(x, 50)[1], from_unet.features(x, 50)[1])


def test_resolution_must_fit_the_teachers_downsampling():
    teacher = make_teacher()  # 3 levels: downsamples by 4
    teacher.check_resolution(32, 36)
    with pytest.raises(UserError, match=r"data.resolution \[32, 34\] must be divisible by 4"):
        teacher.check_resolution(32, 34)
