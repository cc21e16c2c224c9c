"""The StyleGAN2 teacher: generator shapes, the teacher interface contract, image/feature flip
consistency, training and distillation from the synthesized dataset."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import TINY, TINY_PRESET, write_images
from dreamteacher.api import pretrain, train_teacher
from dreamteacher.teachers.stylegan2 import GanConfig
from dreamteacher.core.errors import UserError
from dreamteacher.teachers.diffusion import DiffusionTeacher, default_scheduler
from dreamteacher.methods.stylegan2 import Discriminator
from dreamteacher.teachers.stylegan2 import GanTeacher, Generator
from dreamteacher.teachers.diffusion import build_unet
from dreamteacher.core.config import build_config

SMALL = GanConfig(z_dim=16, w_dim=16, mapping_layers=2, channels=[32, 16, 8])
GAN = ["gan.channels=[32,32,16]", "gan.z_dim=16", "gan.w_dim=16", "gan.mapping_layers=2", "gan.r1_every=2",
       "teacher_train.max_steps=3"]


def test_generator_and_discriminator_work_at_a_non_square_resolution():
    torch.manual_seed(0)
    generator, discriminator = Generator(SMALL, [24, 32]), Discriminator(SMALL, [24, 32])
    images, feats = generator(torch.randn(3, 16))
    assert images.shape == (3, 3, 24, 32) and generator.sizes == [(6, 8), (12, 16), (24, 32)]
    assert [f.shape for f in feats] == [(3, 32, 6, 8), (3, 16, 12, 16), (3, 8, 24, 32)]
    assert discriminator(images).shape == (3,)
    with pytest.raises(UserError, match="must be divisible by 2\\^\\(levels-1\\) = 4"):
        Generator(SMALL, [30, 32])


def test_the_discriminators_r1_gradient_stays_finite_on_a_batch_of_identical_images():
    # the minibatch standard deviation of equal images is 0: without StyleGAN2's epsilon its gradient is NaN
    torch.manual_seed(0)
    discriminator = Discriminator(SMALL, [16, 16])
    real = torch.rand(1, 3, 16, 16).repeat(4, 1, 1, 1).requires_grad_(True)
    grad, = torch.autograd.grad(discriminator(real).sum(), real, create_graph=True)
    grad.pow(2).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in discriminator.parameters() if p.grad is not None)


def diffusion_teacher() -> DiffusionTeacher:
    config = build_config(None, TINY)
    return DiffusionTeacher(build_unet(config.diffusion, [32, 32]), default_scheduler(), blocks=[0, 2, 4], t=50)


@pytest.mark.parametrize("kind", ["diffusion", "gan"])
def test_every_teacher_returns_what_it_declares(kind):
    """The interface pretraining uses: student_batch(batch) -> (images, features at feature_specs)."""
    torch.manual_seed(0)
    seeds = torch.tensor([3, 4])
    if kind == "gan":
        teacher = GanTeacher(Generator(SMALL, [32, 32]), blocks=[0, 1, 2])
        batch = {"noise_seed": seeds}
    else:
        teacher = diffusion_teacher()
        batch = {"images": torch.rand(2, 3, 32, 32) * 2 - 1, "noise_seed": seeds}
    images, feats = teacher.student_batch(batch)
    assert images.shape == (2, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert len(feats) == len(teacher.feature_specs)
    for spec, feat in zip(teacher.feature_specs, feats):
        assert feat.shape == (2, spec.channels, 32 // spec.stride, 32 // spec.stride)
    again = teacher.student_batch(batch)
    assert all(torch.equal(a, b) for a, b in zip(feats, again[1]))  # the seeds decide everything


def test_gan_teacher_flips_image_and_features_together():
    torch.manual_seed(0)
    generator = Generator(SMALL, [16, 16]).eval()
    teacher = GanTeacher(generator, blocks=[1, 2])
    seeds = torch.arange(12)
    images, feats = teacher.render(seeds)
    flipped = 0
    for i, seed in enumerate(seeds.tolist()):  # the same z, unflipped, rendered directly
        z = torch.empty(1, SMALL.z_dim).normal_(generator=torch.Generator().manual_seed(seed))
        plain_image, plain_feats = generator(z, noise="const")
        flip = not torch.allclose(images[i:i + 1], plain_image.clamp(-1, 1), atol=1e-5)
        expect = (lambda x: x.flip(-1)) if flip else (lambda x: x)
        flipped += flip
        torch.testing.assert_close(images[i:i + 1], expect(plain_image).clamp(-1, 1), atol=1e-5, rtol=0)
        for feat, level in zip(feats, teacher.blocks):
            torch.testing.assert_close(feat[i:i + 1], expect(plain_feats[level]), atol=1e-5, rtol=0)
    assert 0 < flipped < len(seeds)  # both cases were checked


def test_train_stylegan2_then_distill_its_synthesized_dataset(tmp_path):
    images = write_images(tmp_path / "images", count=8, size=(40, 48))
    teacher = train_teacher(images, tmp_path / "gan", preset=TINY_PRESET, overrides=GAN, progress=False, kind="stylegan2")
    assert teacher.steps == 3  # iterations, though Lightning counted two optimizer steps each
    folder = teacher.files["teacher"]
    assert (folder / "generator.safetensors").is_file() and (folder / "stylegan2.json").is_file()
    student = pretrain(images, tmp_path / "student", teacher=tmp_path / "gan",
                       preset=TINY_PRESET, overrides=["encode.blocks=[0,1,2]"], progress=False)
    assert student.final_loss is not None and (tmp_path / "student" / "backbone.safetensors").is_file()
    # viz: the GAN's own renders (no --data), every synthesis level; with the student, its levels
    from dreamteacher.viz.report import write_report

    page = write_report(tmp_path / "gan", None, tmp_path / "viz" / "index.html", num_images=2, png_folder=True)
    linked = re.findall(r'<img src="([^"]+)"', page.read_text())
    assert all((page.parent / name).is_file() for name in linked)
    assert sum("kmeans-image1-block" in name for name in linked) == 3  # the tiny GAN's 3 levels
    page = write_report(tmp_path / "gan", None, tmp_path / "report.html", student_run=tmp_path / "student",
                        num_images=2)
    assert "Student after distillation" in page.read_text()
    with pytest.raises(UserError, match="level 4 is out of range for this GAN teacher"):
        pretrain(images, tmp_path / "bad", teacher=folder, preset=TINY_PRESET, overrides=["encode.blocks=[0,4]"],
                 progress=False)
    with pytest.raises(UserError, match="is a GAN: its dataset is synthesized online"):
        pretrain(images, tmp_path / "cached", teacher=folder, cache=tmp_path / "cache",
                 preset=TINY_PRESET, overrides=["encode.blocks=[0,1,2]"], progress=False)
