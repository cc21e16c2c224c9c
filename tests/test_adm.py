"""guided-diffusion (ADM) checkpoint conversion on a small random checkpoint with the official key
layout of openai/guided-diffusion `unet.py` (UNetModel with resblock_updown=True,
use_scale_shift_norm=True, legacy attention order)."""

import math

import pytest
import torch
import torch.nn.functional as F

from dreamteacher.core.errors import UserError
from dreamteacher.teachers.adm import convert_adm_state_dict, load_adm_checkpoint


def adm_state_dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_ds=(2, 4),
                   out_channels=6, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    emb = model_channels * 4

    def t(*shape):
        return torch.randn(shape, generator=g) * 0.1

    def resblock(prefix, cin, cout):
        sd.update({f"{prefix}.in_layers.0.weight": 1 + t(cin), f"{prefix}.in_layers.0.bias": t(cin),
                   f"{prefix}.in_layers.2.weight": t(cout, cin, 3, 3), f"{prefix}.in_layers.2.bias": t(cout),
                   f"{prefix}.emb_layers.1.weight": t(2 * cout, emb), f"{prefix}.emb_layers.1.bias": t(2 * cout),
                   f"{prefix}.out_layers.0.weight": 1 + t(cout), f"{prefix}.out_layers.0.bias": t(cout),
                   f"{prefix}.out_layers.3.weight": t(cout, cout, 3, 3), f"{prefix}.out_layers.3.bias": t(cout)})
        if cin != cout:
            sd.update({f"{prefix}.skip_connection.weight": t(cout, cin, 1, 1), f"{prefix}.skip_connection.bias": t(cout)})

    def attention(prefix, ch):
        sd.update({f"{prefix}.norm.weight": 1 + t(ch), f"{prefix}.norm.bias": t(ch),
                   f"{prefix}.qkv.weight": t(3 * ch, ch, 1), f"{prefix}.qkv.bias": t(3 * ch),
                   f"{prefix}.proj_out.weight": t(ch, ch, 1), f"{prefix}.proj_out.bias": t(ch)})

    sd.update({"time_embed.0.weight": t(emb, model_channels), "time_embed.0.bias": t(emb),
               "time_embed.2.weight": t(emb, emb), "time_embed.2.bias": t(emb),
               "input_blocks.0.0.weight": t(model_channels, 3, 3, 3), "input_blocks.0.0.bias": t(model_channels)})
    ch, ds, k, chans = model_channels, 1, 1, [model_channels]
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            resblock(f"input_blocks.{k}.0", ch, mult * model_channels)
            ch = mult * model_channels
            if ds in attention_ds:
                attention(f"input_blocks.{k}.1", ch)
            chans.append(ch)
            k += 1
        if level != len(channel_mult) - 1:
            resblock(f"input_blocks.{k}.0", ch, ch)  # down=True: same keys as a plain ResBlock
            chans.append(ch)
            k += 1
            ds *= 2
    resblock("middle_block.0", ch, ch)
    attention("middle_block.1", ch)
    resblock("middle_block.2", ch, ch)
    k = 0
    for level, mult in list(enumerate(channel_mult))[::-1]:
        for i in range(num_res_blocks + 1):
            resblock(f"output_blocks.{k}.0", ch + chans.pop(), mult * model_channels)
            ch = mult * model_channels
            j = 1
            if ds in attention_ds:
                attention(f"output_blocks.{k}.1", ch)
                j = 2
            if level and i == num_res_blocks:
                resblock(f"output_blocks.{k}.{j}", ch, ch)  # up=True
                ds //= 2
            k += 1
    sd.update({"out.0.weight": 1 + t(ch), "out.0.bias": t(ch),
               "out.2.weight": t(out_channels, model_channels, 3, 3), "out.2.bias": t(out_channels)})
    return sd


def legacy_attention(sd: dict, prefix: str, x: torch.Tensor, head_channels: int) -> torch.Tensor:
    """guided-diffusion's AttentionBlock with QKVAttentionLegacy, computed from the original weights."""
    b, c, h, w = x.shape
    flat = x.reshape(b, c, -1)
    normed = F.group_norm(flat.float(), 32, sd[f"{prefix}.norm.weight"], sd[f"{prefix}.norm.bias"], eps=1e-5)
    qkv = F.conv1d(normed, sd[f"{prefix}.qkv.weight"], sd[f"{prefix}.qkv.bias"])
    heads = c // head_channels
    q, k, v = qkv.reshape(b * heads, 3 * head_channels, -1).split(head_channels, dim=1)
    scale = 1 / math.sqrt(math.sqrt(head_channels))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    out = torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, h * w)
    out = F.conv1d(out, sd[f"{prefix}.proj_out.weight"], sd[f"{prefix}.proj_out.bias"])
    return (flat + out).reshape(b, c, h, w)


def test_every_key_is_converted_with_matching_shapes(tmp_path):
    sd = adm_state_dict()
    config, converted = convert_adm_state_dict(sd, head_channels=16)
    assert config["block_out_channels"] == [32, 64, 64]
    assert config["down_block_types"] == ["ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"]
    assert config["up_block_types"] == ["AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"]
    assert config["layers_per_block"] == 2 and config["out_channels"] == 6
    path = tmp_path / "adm.pt"
    torch.save(sd, path)
    unet = load_adm_checkpoint(path, head_channels=16)  # load_state_dict(strict=True) inside
    target = unet.state_dict()
    assert set(converted) == set(target)
    assert all(converted[k].shape == target[k].shape for k in target)
    assert sum(v.numel() for v in sd.values()) == sum(v.numel() for v in target.values())


@pytest.mark.parametrize("where", ["mid_block.attentions.0", "down_blocks.1.attentions.1", "up_blocks.0.attentions.2"])
def test_attention_equals_legacy_fused_qkv(tmp_path, where):
    sd = adm_state_dict()
    path = tmp_path / "adm.pt"
    torch.save(sd, path)
    unet = load_adm_checkpoint(path, head_channels=16).eval()
    source = {"mid_block.attentions.0": "middle_block.1", "down_blocks.1.attentions.1": "input_blocks.5.1",
              "up_blocks.0.attentions.2": "output_blocks.2.1"}[where]
    x = torch.randn(2, 64, 4, 4)
    ours = unet.get_submodule(where)(x)
    assert torch.allclose(ours, legacy_attention(sd, source, x, 16), atol=1e-5)
    # a plain chunk(3) of the fused weight (the common mistake) gives something else
    wrong = dict(sd)
    w = sd[f"{source}.qkv.weight"]
    heads = 64 // 16
    wrong[f"{source}.qkv.weight"] = w.reshape(3, heads, 16, 64, 1).transpose(0, 1).reshape(192, 64, 1)
    assert not torch.allclose(ours, legacy_attention(wrong, source, x, 16), atol=1e-3)


def test_converted_model_runs_as_teacher(tmp_path):
    from dreamteacher.teachers.base import load_diffusion_teacher

    path = tmp_path / "adm.pt"
    torch.save(adm_state_dict(), path)
    with pytest.raises(UserError, match="not divisible by adm head channels 64"):
        convert_adm_state_dict(adm_state_dict(model_channels=32, channel_mult=(1, 1, 1)), 64)
    teacher_sd = adm_state_dict(model_channels=64, channel_mult=(1, 1, 2), attention_ds=(4,))
    torch.save(teacher_sd, path)
    teacher = load_diffusion_teacher(path, blocks=[0, 3, 6], t=20, adm_head_channels=32)
    assert teacher.unet.mid_block.attentions[0].heads == 128 // 32
    feats = teacher.encode(torch.zeros(1, 3, 16, 16))
    assert [f.shape[-1] for f in feats] == [16 // s.stride for s in teacher.feature_specs]
    assert teacher.predict_eps(torch.zeros(1, 3, 16, 16), 5).shape[1] == 3  # learned sigma dropped


def test_foreign_and_conditional_checkpoints_are_refused(tmp_path):
    sd = adm_state_dict()
    sd["label_emb.weight"] = torch.zeros(10, 128)
    with pytest.raises(UserError, match="class-conditional"):
        convert_adm_state_dict(sd, 16)
    sd = adm_state_dict()
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match="no UNet2DModel counterpart"):
        convert_adm_state_dict(sd, 16)
