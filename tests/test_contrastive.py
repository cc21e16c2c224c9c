"""MoCo v3 and PCD: the SpatialAdaptor, channel-wise ReLU, the pixel InfoNCE, the negative queue,
official MoCo v3 checkpoints, and what the runs write."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from conftest import TINY_PRESET, write_images
from dreamteacher.api import pretrain
from dreamteacher.core.errors import UserError
from dreamteacher.losses import image_infonce, moco_infonce, pixel_infonce
from dreamteacher.methods.pcd import NegativeQueue
from dreamteacher.teachers.moco import MOCO_FILE, SpatialAdaptor, channelwise_relu, load_moco_teacher, mlp

CONTRAST = ["contrast.proj_hidden=32", "contrast.proj_dim=16", "contrast.queue_size=8",
            "contrast.crop_scale=[0.5,1.0]", "optim.name=lars", "optim.base_lr=1.0", "optim.weight_decay=1e-5"]


def random_projector(in_dim: int = 12, hidden: int = 20, out_dim: int = 6, seed: int = 0) -> nn.Sequential:
    """A MoCo v3 projector with non-trivial BatchNorm statistics and affine parameters, in eval mode."""
    torch.manual_seed(seed)
    head = mlp(2, in_dim, hidden, out_dim)
    for bn in (head[1], head[4]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    head[1].weight.data.uniform_(0.5, 1.5)
    head[1].bias.data.normal_()
    return head.eval()


def test_spatial_adaptor_pooled_output_equals_the_original_head_on_pooled_features():
    head = random_projector()
    adaptor = SpatialAdaptor(head)
    assert [type(m).__name__ for m in adaptor] == ["Conv2d", "ChannelwiseReLU", "Conv2d"]  # last BN dropped
    torch.manual_seed(1)
    maps = torch.randn(3, 12, 5, 7) + 0.3
    with torch.no_grad():
        original = head[:4](maps.mean(dim=(2, 3)))  # Linear - BN - ReLU - Linear, without the last BN
        adapted = adaptor(maps)
    assert adapted.shape == (3, 6, 5, 7)
    torch.testing.assert_close(adapted.mean(dim=(2, 3)), original, atol=1e-5, rtol=0)  # Eq. 7


def test_channelwise_relu_keeps_whole_channels_by_their_mean():
    x = torch.tensor([[[[1.0, -3.0]], [[-1.0, 2.0]], [[-2.0, 1.0]]]])  # channel means -1, 0.5, -0.5
    out = channelwise_relu(x)
    assert torch.equal(out[0, 0], torch.zeros(1, 2)) and torch.equal(out[0, 2], torch.zeros(1, 2))
    assert torch.equal(out[0, 1], x[0, 1])  # kept as is, its negative pixel included
    maps = torch.randn(4, 9, 3, 5)
    torch.testing.assert_close(channelwise_relu(maps).mean(dim=(2, 3)), torch.relu(maps.mean(dim=(2, 3))))  # Eq. 6


def test_pixel_infonce_matches_a_slow_reference_with_a_tiny_queue():
    torch.manual_seed(0)
    student, teacher, queue = torch.randn(2, 4, 3, 2), torch.randn(2, 4, 3, 2), torch.randn(3, 4)
    queue = queue / queue.norm(dim=1, keepdim=True)
    tau = 0.2
    terms = []
    for b in range(2):
        for i in range(3):
            for j in range(2):
                s = student[b, :, i, j] / student[b, :, i, j].norm()
                t = teacher[b, :, i, j] / teacher[b, :, i, j].norm()
                positive = math.exp(float(s @ t) / tau)
                negatives = sum(math.exp(float(s @ n) / tau) for n in queue)
                terms.append(-math.log(positive / (positive + negatives)))
    assert pixel_infonce(student, teacher, queue, tau).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    pooled = pixel_infonce(student.mean(dim=(2, 3), keepdim=True), teacher.mean(dim=(2, 3), keepdim=True), queue, tau)
    assert image_infonce(student, teacher, queue, tau).item() == pytest.approx(pooled.item(), rel=1e-6)


def test_moco_infonce_is_cross_entropy_over_the_batch_scaled_by_two_tau():
    torch.manual_seed(0)
    q, k = torch.randn(4, 8), torch.randn(4, 8)
    qn, kn = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    logits = qn @ kn.t() / 0.2
    expected = -torch.log_softmax(logits, dim=1).diagonal().mean() * 0.4
    assert moco_infonce(q, k, 0.2).item() == pytest.approx(expected.item(), rel=1e-5)


def test_negative_queue_writes_in_order_and_overwrites_the_oldest_first():
    queue = NegativeQueue(5, 2)
    first, second = torch.arange(6.0).view(3, 2), 10 + torch.arange(8.0).view(4, 2)
    queue.push(first)
    assert torch.equal(queue.vectors[:3], first) and queue.pointer.item() == 3
    queue.push(second)  # slots 3, 4, 0, 1
    assert torch.equal(queue.vectors[3:], second[:2]) and torch.equal(queue.vectors[:2], second[2:])
    assert torch.equal(queue.vectors[2], first[2]) and queue.pointer.item() == 2  # the newest of `first` stays
    queue.push(100 + torch.arange(14.0).view(7, 2))  # more than the queue holds: the newest 5 win
    assert sorted(queue.vectors[:, 0].tolist()) == [104.0, 106.0, 108.0, 110.0, 112.0]


def test_two_views_differ_and_are_reproducible_per_sample(tmp_path):
    from dreamteacher.data.images import ImageFolder
    from dreamteacher.data.views import TwoViews
    from dreamteacher.data.sampling import SeededSamples

    images = ImageFolder(write_images(tmp_path / "img", count=2, size=(40, 48)), [32, 32], hflip=False)
    samples = SeededSamples(TwoViews(images, [0.3, 1.0]), seed=0, noise=False)
    first, again, next_epoch = samples[(1, 0)], samples[(1, 0)], samples[(1, 1)]
    assert set(first) == {"images", "views2"} and first["images"].shape == (3, 32, 32)
    assert first["images"].min() >= -1 and first["images"].max() <= 1
    assert not torch.equal(first["images"], first["views2"])
    assert all(torch.equal(first[k], again[k]) for k in first)  # same (index, epoch): same views
    assert not torch.equal(first["images"], next_epoch["images"])


def official_checkpoint(path, arch: str = "resnet18", hidden: int = 64, out: int = 16):
    """A MoCo v3 ResNet checkpoint in the released layout: torchvision ResNets for both branches, the
    projector as their `fc`, a predictor, DataParallel's `module.` prefix, optimizer state beside."""
    torch.manual_seed(0)
    state = {}
    branches = {}
    for branch in ("base_encoder", "momentum_encoder"):
        trunk = getattr(torchvision.models, arch)()
        trunk.fc = mlp(2, trunk.fc.in_features, hidden, out)
        for bn in (trunk.fc[1], trunk.fc[4]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
        branches[branch] = trunk.eval()
        state.update({f"module.{branch}.{k}": v for k, v in trunk.state_dict().items()})
    state.update({f"module.predictor.{k}": v for k, v in mlp(2, out, hidden, out, last_bn=False).state_dict().items()})
    torch.save({"epoch": 100, "arch": arch, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}, path)
    return branches


def test_official_moco_v3_checkpoint_loads_its_momentum_branch_as_the_pcd_teacher(tmp_path):
    path = tmp_path / "r-50-100ep.pth.tar"
    branches = official_checkpoint(path)
    teacher = load_moco_teacher(path)
    momentum = branches["momentum_encoder"]
    assert teacher.arch == "resnet18" and teacher.out_channels == 16
    for name, value in teacher.trunk.state_dict().items():
        assert torch.equal(value, momentum.state_dict()[name]), name
    images = torch.rand(2, 3, 64, 96) * 2 - 1
    maps = teacher(images)
    assert maps.shape == (2, 16, 2, 3)
    with torch.no_grad():  # Eq. 7 through the whole teacher: torchvision's pooled forward, less the last BN
        normalized = ((images + 1) / 2 - teacher.mean) / teacher.std
        momentum.fc = momentum.fc[:4]
        torch.testing.assert_close(maps.mean(dim=(2, 3)), momentum(normalized), atol=1e-4, rtol=1e-4)


def test_moco_checkpoint_errors_name_the_file(tmp_path):
    path = tmp_path / "not-moco.pth"
    torch.save({"state_dict": {"module.encoder_q.conv1.weight": torch.zeros(1)}}, path)
    with pytest.raises(UserError, match="not-moco.pth: no 'module.momentum_encoder"):
        load_moco_teacher(path)
    with pytest.raises(UserError, match="MoCo v3 teacher not found"):
        load_moco_teacher(tmp_path / "missing.pth")
    wrong = tmp_path / "wrong-arch.pth"
    official_checkpoint(wrong)
    checkpoint = torch.load(wrong, weights_only=True)
    checkpoint["arch"] = "resnet34"
    torch.save(checkpoint, wrong)
    with pytest.raises(UserError, match="wrong-arch.pth: the momentum encoder does not fit timm 'resnet34'"):
        load_moco_teacher(wrong)


@pytest.fixture(scope="module")
def mocov3_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("contrastive")
    images = write_images(root / "images", count=8, size=(40, 48))
    pretrain(images, root / "mocov3", method="mocov3", preset=TINY_PRESET, overrides=CONTRAST, progress=False)
    return root, images


def test_mocov3_writes_an_official_layout_teacher_and_exports_its_base_encoder(mocov3_run):
    root, _ = mocov3_run
    run = root / "mocov3"
    checkpoint = torch.load(run / MOCO_FILE, weights_only=True)
    assert checkpoint["arch"] == "test_resnet"
    prefixes = {k.split(".")[1] for k in checkpoint["state_dict"]}
    assert prefixes == {"base_encoder", "momentum_encoder", "predictor"}
    exported = load_file(str(run / "backbone.safetensors"))
    base = {k.removeprefix("module.base_encoder."): v for k, v in checkpoint["state_dict"].items()
            if k.startswith("module.base_encoder.") and ".fc." not in f".{k}"}
    assert exported.keys() == base.keys() and all(torch.equal(exported[k], base[k]) for k in base)
    momentum = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("module.momentum_encoder.")}
    assert any(not torch.equal(v, checkpoint["state_dict"][k.replace("momentum", "base")]) for k, v in momentum.items()
               if v.is_floating_point())  # the EMA branch moved differently from the base encoder
    timm.create_model("test_resnet", num_classes=0).load_state_dict(exported, strict=True)
    assert load_moco_teacher(run).arch == "test_resnet"  # the run folder is a PCD teacher


def test_pcd_distills_a_mocov3_run_and_exports_the_backbone_alone(mocov3_run):
    root, images = mocov3_run
    result = pretrain(images, root / "pcd", method="pcd", teacher=root / "mocov3", preset=TINY_PRESET, overrides=CONTRAST,
                      progress=False)
    assert result.final_loss is not None and math.isfinite(result.final_loss)
    exported = load_file(str(result.files["backbone"]))
    model = timm.create_model("test_resnet", num_classes=0)
    assert exported.keys() == model.state_dict().keys()  # no projector, MHSA, queue or teacher
    model.load_state_dict(exported, strict=True)
    state = torch.load(result.checkpoint, weights_only=False)["state_dict"]
    assert not any(k.startswith("teacher") for k in state)  # the frozen teacher is not in checkpoints
    queue = state["queue.vectors"]
    assert queue.shape == (8, 16) and state["queue.pointer"].item() == (2 * 4 * result.steps) % 8
    assert {k.split(".")[0] for k in state} == {"backbone", "head", "attention", "queue"}


def test_pcd_refuses_a_feature_cache_and_a_missing_teacher(mocov3_run, tmp_path):
    root, images = mocov3_run
    with pytest.raises(UserError, match="pcd needs --teacher"):
        pretrain(images, tmp_path / "a", method="pcd", preset=TINY_PRESET, overrides=CONTRAST, progress=False)
    with pytest.raises(UserError, match=r"--cache is not an input of --method pcd \(it takes --teacher\)"):
        pretrain(images, tmp_path / "b", method="pcd", teacher=root / "mocov3", cache=tmp_path / "c",
                 preset=TINY_PRESET, overrides=CONTRAST, progress=False)
    with pytest.raises(UserError, match=r"--teacher is not an input of --method mocov3 \(it takes the images alone\)"):
        pretrain(images, tmp_path / "c", method="mocov3", teacher=root / "mocov3", preset=TINY_PRESET, overrides=CONTRAST,
                 progress=False)


def test_norm_rescale_multiplies_the_pretrained_conv_weights(mocov3_run):
    from dreamteacher.nn.segmenters import Segmenter

    root, _ = mocov3_run
    weights = load_file(str(root / "mocov3" / "backbone.safetensors"))
    model = Segmenter("upernet", "test_resnet", num_classes=3, decoder_channels=16)
    model.load_backbone(weights, "test", norm_rescale=0.25)
    loaded = model.backbone_model().state_dict()
    convs = [k for k, v in weights.items() if v.ndim == 4]
    assert convs and all(torch.equal(loaded[k], weights[k] * 0.25) for k in convs)
    assert torch.equal(loaded["bn1.weight"], weights["bn1.weight"])  # norms untouched
