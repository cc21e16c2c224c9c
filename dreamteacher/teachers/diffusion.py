"""A diffusion U-Net as DreamTeacher's teacher: real images -> noisy x_t -> one denoising pass ->
decoder features (the paper's *encoded dataset*, section 3.1, Fig. 2c).

Decoder blocks are numbered as guided-diffusion numbers its `output_blocks`: every layer of every
up block, in order, the last layer of an up block including its upsampler. For ADM-256 (6 levels x 3
layers = 18 blocks) block b has stride 32 / 2**((b + 1) // 3), so the paper's blocks 3, 6, 9, 12 sit at
strides 16, 8, 4, 2 (`FeatureSpec.stride` says so for any U-Net).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from dreamteacher.core.config import Section, bounded, register_section
from dreamteacher.core.errors import UserError
from dreamteacher.data.features import FeatureSpec
from dreamteacher.data.sampling import seeded_noise
from dreamteacher.teachers.base import TeacherKind, register_teacher_kind

ENCODE_MODES = ("stochastic", "ddim")


@dataclass
class EncodeConfig(Section):
    """How real images become teacher features (the paper's *encoded dataset*, section 3.1)."""

    t: int = bounded(150, low=0)  # 150 for ImageNet-like data, 50 for LSUN/FFHQ/BDD-like (Table 17)
    # Indices of the U-Net decoder blocks whose outputs are distilled, counted over all layers of all
    # up blocks (ADM's output_blocks). For ADM-256, blocks 3,6,9,12 sit at strides 16,8,4,2.
    blocks: list[int] = bounded(low=0, factory=lambda: [3, 6, 9, 12])
    mode: str = "stochastic"  # or "ddim": deterministic DDIM inversion to t
    ddim_steps: int = bounded(10, low=1)  # inversion steps for mode=ddim
    # channels per attention head of a guided-diffusion .pt teacher: not stored in its weights;
    # 64 for the released 256x256 and LSUN models
    adm_head_channels: int = bounded(64, low=1)
    # K stochastic encodings per image in the offline feature cache (`pretrain --cache DIR`); each
    # epoch draws one of them per image, so K sets how many noise draws the student ever sees
    cache_encodings: int = bounded(4, low=1)

    def check(self, config: Any) -> None:
        if self.mode not in ENCODE_MODES:
            raise UserError(f"encode.mode must be 'stochastic' or 'ddim', got '{self.mode}'")
        # the diffusion section says how many steps a teacher trained here has (any teacher also
        # checks t against its own schedule when it is loaded)
        steps = config.diffusion.num_train_timesteps if hasattr(config, "diffusion") else None
        if steps is not None and self.t >= steps:
            raise UserError(f"encode.t must be in [0, {steps}), got {self.t}")
        if not self.blocks or len(self.blocks) > 4 or len(set(self.blocks)) != len(self.blocks):
            raise UserError(f"encode.blocks must be 1 to 4 distinct integers, got {self.blocks}")


@dataclass
class DiffusionConfig(Section):
    """The teacher U-Net trained by `train-teacher` (ADM style, Table 16) and its DDPM."""

    block_out_channels: list[int] = bounded(low=1, factory=lambda: [256, 256, 512, 512, 1024, 1024])
    layers_per_block: int = bounded(2, low=1)
    attention_levels: list[int] = bounded(low=0, factory=lambda: [3, 4, 5])  # levels at stride 8,16,32
    attention_head_dim: int = bounded(64, low=1)
    dropout: float = bounded(0.0, low=0, high=1, high_open=True)
    num_train_timesteps: int = bounded(1000, low=1)
    beta_start: float = bounded(1e-4, low=0, high=1, low_open=True, high_open=True)
    beta_end: float = bounded(2e-2, low=0, high=1, low_open=True, high_open=True)

    def check(self, config: Any) -> None:
        levels = len(self.block_out_channels)
        factor = 2 ** (levels - 1)
        res = config.data.resolution
        if any(v % factor for v in res):
            raise UserError(f"data.resolution {res} must be divisible by {factor} "
                            f"(the U-Net halves it {levels - 1} times)")
        crop = config.teacher_train.crop
        if crop and not (len(crop) == 2 and all(c <= r and c % factor == 0 for c, r in zip(crop, res))):
            raise UserError(f"teacher_train.crop must be [height, width] within data.resolution {res} and "
                            f"divisible by {factor}, got {crop}")
        if any(level >= levels for level in self.attention_levels):
            raise UserError(f"diffusion.attention_levels must be in [0, {levels}), got {self.attention_levels}")
        if self.beta_start >= self.beta_end:
            raise UserError(f"diffusion.beta_start must be below beta_end, got {self.beta_start} and {self.beta_end}")


register_section("encode", EncodeConfig)
register_section("diffusion", DiffusionConfig)


def build_unet(cfg: DiffusionConfig, resolution: list[int]) -> UNet2DModel:
    """The ADM-style U-Net of `cfg` (resblock up/down sampling, scale-shift norm, attention at the
    deep levels): what `train-teacher` trains."""
    attention = set(cfg.attention_levels)
    levels = range(len(cfg.block_out_channels))
    return UNet2DModel(
        sample_size=tuple(resolution), in_channels=3, out_channels=3,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if lvl in attention else "ResnetDownsampleBlock2D" for lvl in levels),
        up_block_types=tuple("AttnUpBlock2D" if lvl in attention else "ResnetUpsampleBlock2D" for lvl in reversed(levels)),
        downsample_type="resnet", upsample_type="resnet", attention_head_dim=cfg.attention_head_dim,
        resnet_time_scale_shift="scale_shift", norm_num_groups=32, attn_norm_num_groups=32,
        flip_sin_to_cos=True, freq_shift=0, dropout=cfg.dropout,
    )


class _StopForward(Exception):
    """Raised by the hook on the last needed block: nothing after it is computed."""


def _unwrap(output):
    if isinstance(output, tuple):
        output = output[0]
    return getattr(output, "sample", output)


def decoder_blocks(unet: nn.Module) -> list[tuple[nn.Module, FeatureSpec]]:
    """(module whose output is block b's feature, spec) for every decoder block of a diffusers U-Net."""
    up_blocks = list(unet.up_blocks)
    upsampling = [bool(getattr(up, "upsamplers", None)) for up in up_blocks]
    blocks: list[tuple[nn.Module, FeatureSpec]] = []
    for i, up in enumerate(up_blocks):
        stride_in = 2 ** sum(upsampling[i:])
        attentions = getattr(up, "attentions", None) or [None] * len(up.resnets)
        for j, (resnet, attention) in enumerate(zip(up.resnets, attentions)):
            module, stride = (attention if attention is not None else resnet), stride_in
            if j == len(up.resnets) - 1 and upsampling[i]:
                module, stride = up.upsamplers[0], stride_in // 2
            blocks.append((module, FeatureSpec(len(blocks), resnet.out_channels, stride)))
    return blocks


def default_blocks(unet: nn.Module, strides: tuple[int, ...] = (16, 8, 4, 2)) -> list[int]:
    """The first block of each decoder level at `strides`: the paper's blocks 3, 6, 9, 12 for ADM-256,
    [0, 2, 4, 6] for the cpu-small U-Net. What a teacher is shown at when nothing names its blocks."""
    first: dict[int, int] = {}
    index = 0
    up_blocks = list(unet.up_blocks)
    upsampling = [bool(getattr(up, "upsamplers", None)) for up in up_blocks]
    for i, up in enumerate(up_blocks):
        first.setdefault(2 ** sum(upsampling[i:]), index)
        index += len(up.resnets)
    return [first[s] for s in strides if s in first] or [0]


class DiffusionTeacher(nn.Module):
    """Frozen diffusion U-Net + its noise schedule; encodes images into decoder features.

    Images are in [-1, 1]. `encode` returns one tensor per requested block, (B, C_b, H/s_b, W/s_b).
    """

    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler, blocks: list[int], t: int,
                 mode: str = "stochastic", ddim_steps: int = 10):
        super().__init__()
        self.unet = unet.eval().requires_grad_(False)
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.clone().float(), persistent=False)
        all_blocks = decoder_blocks(unet)
        for b in blocks:
            if not 0 <= b < len(all_blocks):
                raise UserError(f"encode.blocks: block {b} is out of range for this teacher "
                                f"({len(all_blocks)} decoder blocks, 0..{len(all_blocks) - 1})")
        num_steps = len(self.alphas_cumprod)
        if not 0 <= t < num_steps:
            raise UserError(f"encode.t={t} is out of range for this teacher ({num_steps} diffusion steps)")
        self.blocks = list(blocks)
        self._block_modules = [module for module, _ in all_blocks]
        self.feature_specs = [all_blocks[b][1] for b in blocks]
        self.t, self.mode, self.ddim_steps = t, mode, ddim_steps
        # image sides must be divisible by this, or skip connections stop lining up
        self.size_multiple = 2 ** sum(bool(getattr(up, "upsamplers", None)) for up in unet.up_blocks)

    def compile_blocks(self) -> None:
        """torch.compile the forward of each ResNet and attention block. Compiling block by block
        keeps the early exit (a forward hook that raises) outside the compiled graphs; the cache
        limit is raised because every block shape is one more compiled graph of the same code."""
        import torch._dynamo

        blocks = [m for m in self.unet.modules() if isinstance(m, (ResnetBlock2D, Attention))]
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, len(blocks))
        for module in blocks:
            module.forward = torch.compile(module.forward)

    def check_resolution(self, height: int, width: int) -> None:
        if height % self.size_multiple or width % self.size_multiple:
            raise UserError(f"data.resolution [{height}, {width}] must be divisible by {self.size_multiple} "
                            f"for this teacher (its U-Net downsamples by {self.size_multiple})")

    def train(self, mode: bool = True) -> "DiffusionTeacher":
        return super().train(False)  # frozen: dropout stays off whatever the caller's mode

    # -- the U-Net -----------------------------------------------------------------------------
    def _timesteps(self, t: int | torch.Tensor, batch: int) -> torch.Tensor:
        if isinstance(t, torch.Tensor):
            return t.to(self.alphas_cumprod.device).long().expand(batch)
        # filled on the device: copying a host scalar over would wait for the GPU every step
        return torch.full((batch,), int(t), device=self.alphas_cumprod.device, dtype=torch.long)

    def run_unet(self, x_t: torch.Tensor, t: int):
        """The U-Net at step t in its own dtype. A teacher cast to bf16 (`place_teacher`) runs in bf16
        throughout: under autocast its GroupNorms would run in fp32, with a cast before and after each."""
        dtype = self.unet.dtype
        context = torch.autocast(x_t.device.type, enabled=False) if dtype != torch.float32 else nullcontext()
        with context:
            return self.unet(x_t.to(dtype), self._timesteps(t, x_t.shape[0]), **self.conditioning(len(x_t), dtype))

    def conditioning(self, batch: int, dtype: torch.dtype) -> dict:
        """Extra U-Net inputs (a text-conditional teacher's context); none for an unconditional one."""
        return {}

    def predict_eps(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        # learned-variance models (guided-diffusion) output [eps, v]: keep eps
        return self.run_unet(x_t, t).sample[:, : x_t.shape[1]].to(x_t.dtype)

    @torch.no_grad()
    def features(self, x_t: torch.Tensor, t: int, blocks: list[int] | None = None) -> list[torch.Tensor]:
        """One denoising pass at step t, stopped right after the deepest requested decoder block."""
        blocks = self.blocks if blocks is None else blocks
        captured: dict[int, torch.Tensor] = {}
        last = max(blocks)

        def make_hook(block: int):
            def hook(_module, _inputs, output):
                captured[block] = _unwrap(output)
                if block == last:
                    raise _StopForward
            return hook

        handles = [self._block_modules[b].register_forward_hook(make_hook(b)) for b in blocks]
        try:
            self.run_unet(x_t, t)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return [captured[b] for b in blocks]

    # -- encoding real images ------------------------------------------------------------------
    def alpha_bar(self, t: int) -> torch.Tensor:
        """Cumulative alpha at step t; t = -1 means the clean image (alpha_bar = 1)."""
        return self.alphas_cumprod[t] if t >= 0 else self.alphas_cumprod.new_tensor(1.0)

    def noise(self, images: torch.Tensor, t: int, generator: torch.Generator | None = None,
              eps: torch.Tensor | None = None) -> torch.Tensor:
        """Forward diffusion q(x_t | x_0), with `eps` ~ N(0, I) given or drawn fresh."""
        if eps is None:
            eps = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        a = self.alpha_bar(t)
        return a.sqrt() * images + (1 - a).sqrt() * eps

    @torch.no_grad()
    def ddim_move(self, x: torch.Tensor, timesteps: list[int], clip_x0: bool = False) -> torch.Tensor:
        """Deterministic DDIM (eta=0) steps from timesteps[0] to timesteps[-1], either direction.

        Ascending = DDIM inversion (image -> x_t); descending = sampling / reconstruction.
        `clip_x0` clamps the predicted clean image to [-1, 1] (sampling only; it would bias inversion).
        """
        for t_from, t_to in zip(timesteps[:-1], timesteps[1:]):
            eps = self.predict_eps(x, max(t_from, 0))
            a_from, a_to = self.alpha_bar(t_from), self.alpha_bar(t_to)
            x0 = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
            if clip_x0:
                x0 = x0.clamp(-1, 1)
                eps = (x - a_from.sqrt() * x0) / (1 - a_from).sqrt()
            x = a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps
        return x

    def ddim_grid(self, t: int, steps: int) -> list[int]:
        """Ascending integer steps 0 .. t (steps + 1 points, duplicates removed)."""
        grid = torch.linspace(0, t, steps + 1).round().long().tolist()
        return sorted(set(grid))

    @torch.no_grad()
    def invert(self, images: torch.Tensor, t: int, steps: int) -> torch.Tensor:
        """Deterministic encoding: DDIM inversion of clean images to x_t."""
        return self.ddim_move(images, self.ddim_grid(t, steps))

    @torch.no_grad()
    def encode(self, images: torch.Tensor, t: int | None = None, mode: str | None = None,
               generator: torch.Generator | None = None, eps: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Images in [-1, 1] -> teacher features at the configured blocks (section 3.1); `eps`: the
        noise of the stochastic encoding when the caller draws it (per-sample seeded data)."""
        t = self.t if t is None else t
        mode = self.mode if mode is None else mode
        if mode == "stochastic":
            x_t = self.noise(images, t, generator, eps)
        elif mode == "ddim":
            x_t = self.invert(images, t, self.ddim_steps)
        else:
            raise UserError(f"encode.mode must be 'stochastic' or 'ddim', got '{mode}'")
        return self.features(x_t, t)

    def student_batch(self, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The teacher interface of pretraining: a batch -> (the images the student sees, the teacher's
        features at `feature_specs`). Here the batch's real images, encoded with each sample's seeded
        noise (`data.sampling.SeededSamples`) or fresh noise."""
        images = batch["images"]
        eps = seeded_noise(batch["noise_seed"], images) if "noise_seed" in batch else None
        return images, self.encode(images, eps=eps)

    @torch.no_grad()
    def sample(self, num: int, height: int, width: int, steps: int = 50,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """DDIM samples in [-1, 1]."""
        device = self.alphas_cumprod.device
        x = torch.randn((num, self.unet.config.in_channels, height, width), generator=generator,
                        device="cpu").to(device)
        return self.ddim_move(x, self.sampling_grid(steps), clip_x0=True).clamp(-1, 1)

    def sampling_grid(self, steps: int) -> list[int]:
        """`steps` DDIM steps from pure noise (the last training step) down to the clean image (-1)."""
        last = len(self.alphas_cumprod) - 1
        return torch.linspace(last, 0, steps).round().long().tolist() + [-1]


# -- loading ---------------------------------------------------------------------------------------
def default_scheduler(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> DDPMScheduler:
    """The DDPM of the paper (F.1): 1000 steps, linear betas 1e-4 .. 2e-2, epsilon prediction."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                         beta_schedule="linear", prediction_type="epsilon", clip_sample=True)


def _read_json(path: Path) -> dict:
    try:
        loaded = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"teacher {path}: not a readable JSON file ({exc.__class__.__name__})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"teacher {path}: not a diffusers config (a JSON object)")
    return loaded


def _from_pretrained(path: Path, load, what: str):
    """A diffusers `from_pretrained` whose failure (missing or truncated weights, a config that does
    not fit them) is one line naming the folder, not a chain of tracebacks."""
    try:
        return load()
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors, OSError, ValueError, RuntimeError...
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise UserError(f"teacher {path}: cannot load its {what} ({exc.__class__.__name__}: {detail})") from None


def load_unet_folder(path: Path) -> UNet2DModel:
    """A diffusers `UNet2DModel` folder (config.json + weights)."""
    kind = _read_json(path / "config.json").get("_class_name")
    if kind != "UNet2DModel":
        raise UserError(f"teacher {path}: expected a diffusers UNet2DModel, its config.json says '{kind}'")
    return _from_pretrained(path, lambda: UNet2DModel.from_pretrained(path, low_cpu_mem_usage=False), "U-Net")


def load_pipeline(path: Path) -> tuple[UNet2DModel, DDPMScheduler]:
    """A diffusers DDPM pipeline folder: its `unet/` (a UNet2DModel) and `scheduler/`."""
    unet = load_unet_folder(path / "unet")
    scheduler = _from_pretrained(path, lambda: DDPMScheduler.from_pretrained(path, subfolder="scheduler"), "scheduler")
    return unet, scheduler


def diffusion_teacher(unet: UNet2DModel, scheduler: DDPMScheduler, config: Any) -> DiffusionTeacher:
    e = config.encode
    return DiffusionTeacher(unet, scheduler, blocks=e.blocks, t=e.t, mode=e.mode, ddim_steps=e.ddim_steps)


def _is_pipeline(path: Path) -> bool:
    return path.is_dir() and (path / "model_index.json").is_file() and (path / "unet").is_dir()


def _load_unet_folder_teacher(path: Path, config: Any) -> DiffusionTeacher:
    scheduler_dir = path.parent / "scheduler"
    scheduler = (DDPMScheduler.from_pretrained(scheduler_dir) if (scheduler_dir / "scheduler_config.json").is_file()
                 else default_scheduler())
    return diffusion_teacher(load_unet_folder(path), scheduler, config)


register_teacher_kind(TeacherKind(
    "ddpm-run", "diffusion", "a `train-teacher` run folder",
    lambda p: _is_pipeline(p / "teacher"), lambda p, config: diffusion_teacher(*load_pipeline(p / "teacher"), config)))
register_teacher_kind(TeacherKind(
    "diffusers-pipeline", "diffusion", "a diffusers DDPMPipeline folder",
    lambda p: _is_pipeline(p) and not (p / "text_encoder").exists(),
    lambda p, config: diffusion_teacher(*load_pipeline(p), config)))
register_teacher_kind(TeacherKind(
    "diffusers-unet", "diffusion", "a diffusers UNet2DModel folder",
    lambda p: p.is_dir() and (p / "config.json").is_file() and not (p / "model_index.json").exists(),
    _load_unet_folder_teacher))
