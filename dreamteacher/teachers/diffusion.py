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

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from dreamteacher.errors import UserError


@dataclass(frozen=True)
class FeatureSpec:
    """One teacher feature level: which decoder block, its channels, its stride w.r.t. the input."""

    block: int
    channels: int
    stride: int


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
        noise (`engine.SeededSamples`) or fresh noise."""
        from dreamteacher.train.engine import seeded_noise

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


def _read_class_name(config_path: Path) -> str | None:
    try:
        return json.loads(config_path.read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError):
        return None


def load_unet_and_scheduler(path: str | Path, adm_head_channels: int = 64) -> tuple[UNet2DModel, DDPMScheduler]:
    """A teacher from: a `train-teacher` run, a diffusers DDPM pipeline folder, a `UNet2DModel`
    folder, or an official guided-diffusion ADM checkpoint (`*.pt`)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"teacher not found: {path}")
    if path.is_dir() and (path / "teacher" / "model_index.json").is_file():
        path = path / "teacher"  # a train-teacher run folder
    if path.is_dir() and (path / "model_index.json").is_file():
        if _read_class_name(path / "unet" / "config.json") != "UNet2DModel":
            raise UserError(f"teacher {path}: the pipeline's unet is not a diffusers UNet2DModel")
        unet = UNet2DModel.from_pretrained(path, subfolder="unet", low_cpu_mem_usage=False)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        return unet, scheduler
    if path.is_dir() and (path / "config.json").is_file():
        kind = _read_class_name(path / "config.json")
        if kind != "UNet2DModel":
            raise UserError(f"teacher {path}: expected a diffusers UNet2DModel folder, found '{kind}'")
        unet = UNet2DModel.from_pretrained(path, low_cpu_mem_usage=False)
        scheduler_dir = path.parent / "scheduler"
        scheduler = (DDPMScheduler.from_pretrained(scheduler_dir) if (scheduler_dir / "scheduler_config.json").is_file()
                     else default_scheduler())
        return unet, scheduler
    if path.is_file() and path.suffix in (".pt", ".pth"):
        from dreamteacher.teachers.adm import load_adm_checkpoint

        return load_adm_checkpoint(path, head_channels=adm_head_channels), default_scheduler()
    raise UserError(f"teacher {path}: not a train-teacher run, a diffusers DDPM pipeline or UNet2DModel "
                    "folder, nor a guided-diffusion .pt checkpoint")


def load_diffusion_teacher(path: str | Path, blocks: list[int], t: int, mode: str = "stochastic",
                           ddim_steps: int = 10, adm_head_channels: int = 64) -> DiffusionTeacher:
    """Any teacher `load_unet_and_scheduler` reads, or a Stable Diffusion pipeline folder (latent)."""
    from dreamteacher.teachers.latent import is_stable_diffusion_folder, load_stable_diffusion_teacher

    if Path(path).is_dir() and is_stable_diffusion_folder(Path(path)):
        if mode != "stochastic":
            raise UserError(f"encode.mode={mode}: the Stable Diffusion teacher {path} encodes stochastically only")
        return load_stable_diffusion_teacher(path, blocks=blocks, t=t)
    unet, scheduler = load_unet_and_scheduler(path, adm_head_channels)
    return DiffusionTeacher(unet, scheduler, blocks=blocks, t=t, mode=mode, ddim_steps=ddim_steps)
