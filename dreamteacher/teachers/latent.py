"""Stable Diffusion as teacher (DreamTeacher Table 6: off-the-shelf SD 1.4), from a local diffusers
folder: the image is encoded by the VAE, its latent noised to step t, the text-conditional U-Net run
once with the empty prompt's text embedding, and its up-block features taken. Strides are declared
with respect to the image (the VAE's factor times the U-Net's), so the student pairs them like any
other teacher's."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from dreamteacher.core.errors import UserError
from dreamteacher.data.features import FeatureSpec
from dreamteacher.teachers.base import TeacherKind, register_teacher_kind
from dreamteacher.teachers.diffusion import DiffusionTeacher, _from_pretrained


def is_stable_diffusion_folder(path: Path) -> bool:
    """A diffusers pipeline folder with a VAE, a text encoder and a conditional U-Net."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    try:
        parts = json.loads(index.read_text())
    except json.JSONDecodeError:
        return False
    return all(part in parts for part in ("vae", "text_encoder", "tokenizer", "unet"))


class LatentDiffusionTeacher(DiffusionTeacher):
    """A DiffusionTeacher on VAE latents: `encode` takes [-1, 1] images, the U-Net sees their latents
    with the empty-prompt embedding as its cross-attention context. Early exit, per-block compile and
    bf16 placement are the parent's."""

    def __init__(self, vae: AutoencoderKL, unet: UNet2DConditionModel, scheduler: DDPMScheduler,
                 prompt_embedding: torch.Tensor, blocks: list[int], t: int):
        super().__init__(unet, scheduler, blocks=blocks, t=t, mode="stochastic")
        self.vae = vae.eval().requires_grad_(False)
        self.register_buffer("prompt_embedding", prompt_embedding.detach().float(), persistent=False)
        self.vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_scale = float(vae.config.scaling_factor)
        self.feature_specs = [FeatureSpec(s.block, s.channels, s.stride * self.vae_factor) for s in self.feature_specs]
        self.size_multiple *= self.vae_factor

    def conditioning(self, batch: int, dtype: torch.dtype) -> dict:
        return {"encoder_hidden_states": self.prompt_embedding.to(dtype).expand(batch, -1, -1)}

    @torch.no_grad()
    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> scaled VAE latents (the posterior mean: the encoding's only noise is eps)."""
        posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return posterior.mean.float() * self.latent_scale

    @torch.no_grad()
    def encode(self, images: torch.Tensor, t: int | None = None, mode: str | None = None,
               generator: torch.Generator | None = None, eps: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Images -> up-block features at step t. `eps` may be image-shaped (the per-sample seeded noise
        of the data pipeline): its first latent-sized part per sample is the latent noise, still N(0, I)."""
        if (mode or self.mode) != "stochastic":
            raise UserError("encode.mode: the Stable Diffusion teacher encodes stochastically only")
        t = self.t if t is None else t
        z = self.latents(images)
        if eps is not None and eps.shape != z.shape:
            eps = eps.flatten(1)[:, : z[0].numel()].reshape(z.shape).to(z.dtype)
        return self.features(self.noise(z, t, generator, eps), t)

    @torch.no_grad()
    def sample(self, num: int, height: int, width: int, steps: int = 50,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """DDIM samples of the empty prompt (no guidance), decoded by the VAE, in [-1, 1]."""
        device = self.alphas_cumprod.device
        shape = (num, self.unet.config.in_channels, height // self.vae_factor, width // self.vae_factor)
        z = torch.randn(shape, generator=generator, device="cpu").to(device)
        z = self.ddim_move(z, self.sampling_grid(steps), clip_x0=False)  # latents are not bounded like pixels
        return self.vae.decode(z.to(self.vae.dtype) / self.latent_scale).sample.float().clamp(-1, 1)


def empty_prompt_embedding(path: Path) -> torch.Tensor:
    """The text encoder's last hidden state for "" padded to the tokenizer's length (1, L, D)."""
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError:
        raise UserError(f"teacher {path} is a Stable Diffusion folder: its text encoder needs the "
                        "`transformers` package (pip install 'dreamteacher[sd]')") from None
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").eval()
    ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def load_stable_diffusion_teacher(path: str | Path, blocks: list[int], t: int) -> LatentDiffusionTeacher:
    path = Path(path)
    embedding = _from_pretrained(path, lambda: empty_prompt_embedding(path), "text encoder")  # kept: one embedding
    vae = _from_pretrained(path, lambda: AutoencoderKL.from_pretrained(path, subfolder="vae", low_cpu_mem_usage=False),
                           "VAE")
    unet = _from_pretrained(path, lambda: UNet2DConditionModel.from_pretrained(path, subfolder="unet",
                                                                               low_cpu_mem_usage=False), "U-Net")
    # its betas; any scheduler class
    scheduler = _from_pretrained(path, lambda: DDPMScheduler.from_pretrained(path, subfolder="scheduler"), "scheduler")
    return LatentDiffusionTeacher(vae, unet, scheduler, embedding, blocks=blocks, t=t)


def _load(path: Path, config) -> LatentDiffusionTeacher:
    if config.encode.mode != "stochastic":
        raise UserError(f"encode.mode={config.encode.mode}: the Stable Diffusion teacher {path} encodes "
                        "stochastically only")
    return load_stable_diffusion_teacher(path, blocks=config.encode.blocks, t=config.encode.t)


# before the plain diffusers pipeline: an SD folder is a pipeline too
register_teacher_kind(TeacherKind("stable-diffusion", "diffusion",
                                  "a Stable Diffusion folder (diffusers layout: vae, unet, text_encoder, tokenizer)",
                                  is_stable_diffusion_folder, _load))
