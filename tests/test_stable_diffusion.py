"""Stable Diffusion as teacher, on tiny randomly initialized components built and saved here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_PRESET, write_images
from dreamteacher.api import pretrain
from dreamteacher.teachers.base import load_diffusion_teacher
from dreamteacher.teachers.latent import LatentDiffusionTeacher

transformers = pytest.importorskip("transformers")


def write_tiny_stable_diffusion(folder: Path) -> Path:
    """A diffusers Stable Diffusion folder: VAE (2x), conditional U-Net (2 levels), CLIP text encoder
    and tokenizer (a handful of tokens), and SD's scaled-linear schedule as a PNDM config."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    folder.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "a": 4, "b": 5}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8)
    tokenizer.save_pretrained(folder / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=8)).save_pretrained(folder / "text_encoder")
    AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                  layers_per_block=1).save_pretrained(folder / "vae")
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                         attention_head_dim=8, norm_num_groups=8).save_pretrained(folder / "unet")
    PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  skip_prk_steps=True).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "PNDMScheduler"]}))
    return folder


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    return write_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "tiny-sd")


def test_sd_teacher_declares_image_strides_and_returns_them(sd_folder):
    teacher = load_diffusion_teacher(sd_folder, blocks=[0, 1, 2], t=50)
    assert isinstance(teacher, LatentDiffusionTeacher) and teacher.vae_factor == 2
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    feats = teacher.encode(images, eps=torch.randn(2, 3, 32, 32))
    for spec, feat in zip(teacher.feature_specs, feats):  # the contract: declared channels and strides
        assert feat.shape == (2, spec.channels, 32 // spec.stride, 32 // spec.stride)
    assert [s.stride for s in teacher.feature_specs] == [4, 2, 2]  # U-Net strides 2, 1, 1 x the VAE's 2
    assert teacher.size_multiple == 4


def test_sd_teacher_uses_the_empty_prompt_and_the_given_noise(sd_folder):
    from transformers import CLIPTextModel, CLIPTokenizer

    teacher = load_diffusion_teacher(sd_folder, blocks=[1], t=100)
    tokenizer = CLIPTokenizer.from_pretrained(sd_folder, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(sd_folder, subfolder="text_encoder")
    ids = tokenizer([""], padding="max_length", max_length=8, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(teacher.prompt_embedding, text_encoder(ids)[0])
    images, eps = torch.rand(1, 3, 16, 16) * 2 - 1, torch.randn(1, 3, 16, 16)
    first, again = teacher.encode(images, eps=eps)[0], teacher.encode(images, eps=eps)[0]
    assert torch.equal(first, again)  # the image-shaped seeded noise decides the latent noise
    z = teacher.latents(images)
    noise = eps.flatten(1)[:, : z[0].numel()].reshape(z.shape)
    a = teacher.alphas_cumprod[100]
    torch.testing.assert_close(first, teacher.features(a.sqrt() * z + (1 - a).sqrt() * noise, 100)[0])
    assert teacher.sample(2, 16, 16, steps=3, generator=torch.Generator().manual_seed(0)).shape == (2, 3, 16, 16)


def test_pretrain_distills_a_stable_diffusion_teacher(sd_folder, tmp_path):
    images = write_images(tmp_path / "images", count=4, size=(40, 48))
    result = pretrain(images, tmp_path / "student", teacher=sd_folder, preset=TINY_PRESET,
                      overrides=["encode.blocks=[0,1,2]", "optim.epochs=1"], progress=False)
    assert result.steps == 1 and result.final_loss is not None
    assert (tmp_path / "student" / "backbone.safetensors").is_file()
