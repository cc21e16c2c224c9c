"""The paper's optimizers and schedule: lr = base x batch/256, warmup then cosine, AdamW or LAMB."""

import math

import pytest
import torch
from timm.optim import Lamb

from dreamteacher.core.config import build_config
from dreamteacher.methods.base import PretrainMethod
from dreamteacher.nn.optim import warmup_cosine


class Tiny(PretrainMethod):
    name = "tiny"

    def __init__(self, config):
        super().__init__(config)
        self.layer = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)


@pytest.mark.parametrize("name, cls", [("adamw", torch.optim.AdamW), ("lamb", Lamb)])
def test_optimizer_lr_scaling_and_no_decay_on_biases(name, cls):
    config = build_config("cpu-small", [f"optim.name={name}", "optim.batch_size=512", "optim.base_lr=1e-3"])
    model = Tiny(config)
    opt = model.configure_optimizers()["optimizer"]
    assert isinstance(opt, cls)
    # 1e-3 x 512/256; LambdaLR has applied the first warmup factor already
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-3 * warmup_cosine(1, 0)(0))
    assert tuple(opt.param_groups[0]["betas"]) == (0.9, 0.95)
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays[id(model.layer.weight)] == 0.05
    assert decays[id(model.layer.bias)] == 0.0 and decays[id(model.norm.weight)] == 0.0
    # torch's AdamW takes its fused kernel on CPU (timm's LAMB has none)
    assert opt.defaults.get("fused") is (True if cls is torch.optim.AdamW else None)


def test_warmup_then_cosine():
    f = warmup_cosine(total_steps=110, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_finetune_backbone_lr_scale_and_no_decay_on_biases(name):
    from dreamteacher.workflows.finetune import SegmentationTraining, build_finetune_config

    config = build_finetune_config(overrides=[f"optim.name={name}", "optim.lr=0.01", "optim.weight_decay=0.05",
                                              "lab.backbone_lr_scale=0.1", "optim.warmup_iters=0",
                                              "data.num_classes=3", "model.backbone=resnet18",
                                              "model.decoder_channels=32"])
    module = SegmentationTraining(config, {"backbone": "resnet18"})
    opt = module.configure_optimizers()["optimizer"]
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    backbone = module.model.backbone_model()
    head = module.model.net.segmentation_head[0]
    assert lr[id(backbone.conv1.weight)] == pytest.approx(0.001) and lr[id(head.weight)] == pytest.approx(0.01)
    assert decay[id(backbone.conv1.weight)] == 0.05 and decay[id(backbone.bn1.weight)] == 0.0
    assert decay[id(head.weight)] == 0.05 and decay[id(head.bias)] == 0.0
    assert len(lr) == sum(1 for p in module.model.parameters() if p.requires_grad)  # every parameter, once
