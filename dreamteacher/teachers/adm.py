"""Official guided-diffusion (ADM) checkpoints -> diffusers `UNet2DModel`.

Stock `UNet2DModel` reproduces the ADM U-Net (resblock up/down sampling, scale-shift norm, attention
at the deep levels); only the weights need renaming. The architecture is read off the checkpoint's
keys and shapes; the number of channels per attention head is not stored in the weights and is a
setting (64 for the released 256x256 and LSUN models).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import UNet2DModel

from dreamteacher.core.errors import UserError
from dreamteacher.teachers.base import TeacherKind, register_teacher_kind
from dreamteacher.teachers.diffusion import DiffusionTeacher, default_scheduler, diffusion_teacher

_RESBLOCK = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
             "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _is_resblock(sd: dict, prefix: str) -> bool:
    return f"{prefix}.in_layers.2.weight" in sd


def _is_attention(sd: dict, prefix: str) -> bool:
    return f"{prefix}.qkv.weight" in sd


def infer_adm_config(sd: dict[str, torch.Tensor], head_channels: int = 64) -> dict:
    """The `UNet2DModel` config of an ADM state dict, read from its keys and shapes."""
    if "input_blocks.0.0.weight" not in sd or "out.2.weight" not in sd:
        raise UserError("not a guided-diffusion U-Net checkpoint (no input_blocks.0.0 / out.2 weights)")
    if "label_emb.weight" in sd:
        raise UserError("class-conditional guided-diffusion checkpoints are not supported; use an unconditional one")
    if any(re.fullmatch(r"input_blocks\.\d+\.0\.op\.weight", k) for k in sd):
        raise UserError("guided-diffusion checkpoints with conv resampling (resblock_updown=False) are not supported")
    model_channels, in_channels = sd["input_blocks.0.0.weight"].shape[:2]
    num_outputs = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("output_blocks."))
    # the first output block that upsamples closes the deepest level: its index + 1 = num_res_blocks + 1
    per_level = next(i + 1 for i in range(num_outputs)
                     if any(_is_resblock(sd, f"output_blocks.{i}.{j}") for j in (1, 2)))
    num_res_blocks, num_levels = per_level - 1, num_outputs // per_level
    block_out, attention = [], []
    for level in range(num_levels):
        first = 1 + level * per_level
        block_out.append(sd[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0])
        attention.append(_is_attention(sd, f"input_blocks.{first}.1"))
    scale_shift = sd["input_blocks.1.0.emb_layers.1.weight"].shape[0] == 2 * block_out[0]
    for ch in block_out:
        if ch % head_channels:
            raise UserError(f"ADM channels {ch} are not divisible by adm head channels {head_channels}")
    return dict(
        sample_size=None, in_channels=int(in_channels), out_channels=int(sd["out.2.weight"].shape[0]),
        block_out_channels=[int(c) for c in block_out], layers_per_block=num_res_blocks,
        down_block_types=["AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attention],
        up_block_types=["AttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attention)],
        downsample_type="resnet", upsample_type="resnet", attention_head_dim=head_channels,
        resnet_time_scale_shift="scale_shift" if scale_shift else "default",
        norm_num_groups=32, attn_norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
        flip_sin_to_cos=True, freq_shift=0, time_embedding_type="positional",
        add_attention=True, dropout=0.0,
    )


class _Reader:
    """Reads source tensors and remembers which, so that unconverted keys can be reported."""

    def __init__(self, sd: dict[str, torch.Tensor]):
        self.sd, self.used = sd, set()

    def __call__(self, key: str) -> torch.Tensor:
        self.used.add(key)
        return self.sd[key]

    def __contains__(self, key: str) -> bool:
        return key in self.sd


def _copy_resblock(sd: _Reader, src: str, dst: str, out: dict) -> None:
    for old, new in _RESBLOCK.items():
        for param in ("weight", "bias"):
            key = f"{src}.{old}.{param}"
            if key in sd:
                out[f"{dst}.{new}.{param}"] = sd(key)


def _copy_attention(sd: _Reader, src: str, dst: str, head_channels: int, out: dict) -> None:
    """Fused 1x1-conv qkv (3C, C, 1) -> to_q/to_k/to_v linears.

    The legacy attention (QKVAttentionLegacy) splits heads *before* q/k/v, so the fused weight is laid
    out [head, (q|k|v), head_channels]: a plain chunk(3) would mix heads.
    """
    qkv_w, qkv_b = sd(f"{src}.qkv.weight").squeeze(-1), sd(f"{src}.qkv.bias")
    channels = qkv_w.shape[1]
    heads = channels // head_channels
    qkv_w = qkv_w.reshape(heads, 3, head_channels, channels)
    qkv_b = qkv_b.reshape(heads, 3, head_channels)
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        out[f"{dst}.{name}.weight"] = qkv_w[:, i].reshape(channels, channels)
        out[f"{dst}.{name}.bias"] = qkv_b[:, i].reshape(channels)
    out[f"{dst}.group_norm.weight"] = sd(f"{src}.norm.weight")
    out[f"{dst}.group_norm.bias"] = sd(f"{src}.norm.bias")
    out[f"{dst}.to_out.0.weight"] = sd(f"{src}.proj_out.weight").squeeze(-1)
    out[f"{dst}.to_out.0.bias"] = sd(f"{src}.proj_out.bias")


def convert_adm_state_dict(state_dict: dict[str, torch.Tensor], head_channels: int = 64) -> tuple[dict, dict]:
    """(UNet2DModel config, diffusers state dict) of a guided-diffusion state dict.

    Every source tensor must be converted: a leftover key means a layout this converter does not know.
    """
    config = infer_adm_config(state_dict, head_channels)
    sd = _Reader(state_dict)
    levels, n = len(config["block_out_channels"]), config["layers_per_block"]
    attention = [t.startswith("Attn") for t in config["down_block_types"]]
    out: dict[str, torch.Tensor] = {
        "time_embedding.linear_1.weight": sd("time_embed.0.weight"), "time_embedding.linear_1.bias": sd("time_embed.0.bias"),
        "time_embedding.linear_2.weight": sd("time_embed.2.weight"), "time_embedding.linear_2.bias": sd("time_embed.2.bias"),
        "conv_in.weight": sd("input_blocks.0.0.weight"), "conv_in.bias": sd("input_blocks.0.0.bias"),
        "conv_norm_out.weight": sd("out.0.weight"), "conv_norm_out.bias": sd("out.0.bias"),
        "conv_out.weight": sd("out.2.weight"), "conv_out.bias": sd("out.2.bias"),
    }
    for level in range(levels):
        for j in range(n):
            src = f"input_blocks.{1 + level * (n + 1) + j}"
            _copy_resblock(sd, f"{src}.0", f"down_blocks.{level}.resnets.{j}", out)
            if attention[level]:
                _copy_attention(sd, f"{src}.1", f"down_blocks.{level}.attentions.{j}", head_channels, out)
        if level < levels - 1:
            _copy_resblock(sd, f"input_blocks.{1 + level * (n + 1) + n}.0", f"down_blocks.{level}.downsamplers.0", out)
    _copy_resblock(sd, "middle_block.0", "mid_block.resnets.0", out)
    _copy_attention(sd, "middle_block.1", "mid_block.attentions.0", head_channels, out)
    _copy_resblock(sd, "middle_block.2", "mid_block.resnets.1", out)
    for i in range(levels):
        has_attention = attention[levels - 1 - i]
        for j in range(n + 1):
            src = f"output_blocks.{i * (n + 1) + j}"
            _copy_resblock(sd, f"{src}.0", f"up_blocks.{i}.resnets.{j}", out)
            if has_attention:
                _copy_attention(sd, f"{src}.1", f"up_blocks.{i}.attentions.{j}", head_channels, out)
            if j == n and i < levels - 1:
                _copy_resblock(sd, f"{src}.{2 if has_attention else 1}", f"up_blocks.{i}.upsamplers.0", out)
    leftover = sorted(set(state_dict) - sd.used)
    if leftover:
        raise UserError(f"{len(leftover)} guided-diffusion keys have no UNet2DModel counterpart, e.g. {leftover[:3]}")
    return config, out




def load_adm_checkpoint(path: str | Path, head_channels: int = 64) -> UNet2DModel:
    """Load an official `*.pt` (e.g. 256x256_diffusion_uncond.pt) as a `UNet2DModel`, strictly."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is the same user error
        raise UserError(f"teacher {path}: cannot read as a PyTorch state dict ({exc.__class__.__name__})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"teacher {path}: not a guided-diffusion state dict (expected a flat dict of tensors)")
    try:
        config, converted = convert_adm_state_dict(sd, head_channels)
    except KeyError as exc:
        raise UserError(f"teacher {path}: unexpected guided-diffusion layout, missing key {exc}") from None
    except UserError as exc:
        raise UserError(f"teacher {path}: {exc}") from None
    unet = UNet2DModel(**config)
    try:
        unet.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[:2]
        raise UserError(f"teacher {path}: converted weights do not fit UNet2DModel: {' '.join(first)}") from None
    return unet


def _load(path: Path, config) -> DiffusionTeacher:
    return diffusion_teacher(load_adm_checkpoint(path, head_channels=config.encode.adm_head_channels),
                             default_scheduler(), config)


register_teacher_kind(TeacherKind("adm", "diffusion", "an official guided-diffusion (ADM) checkpoint (.pt)",
                                  lambda p: p.is_file() and p.suffix in (".pt", ".pth"), _load))
