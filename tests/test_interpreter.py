"""The feature interpreter and the label-distillation losses (DreamTeacher section 3.2, D.2)."""

from __future__ import annotations

import math

import pytest
import torch

from dreamteacher.losses import dice_loss, interpreter_loss, soft_label_loss
from dreamteacher.data.features import FeatureSpec
from dreamteacher.nn.interpreter import FeatureInterpreter


def test_interpreter_fuses_coarse_to_fine_and_predicts_at_the_finest_stride():
    # teacher block order need not be coarse to fine: the interpreter sorts by stride
    specs = [FeatureSpec(6, 48, 4), FeatureSpec(3, 64, 8), FeatureSpec(9, 32, 2)]
    head = FeatureInterpreter(specs, num_classes=5, width=64)
    feats = [torch.randn(2, s.channels, 64 // s.stride, 96 // s.stride) for s in specs]
    logits = head(feats)
    assert logits.shape == (2, 5, 32, 48) and head.output_stride == 2
    assert [f.lateral.in_channels for f in head.fuses] == [48, 32]  # stride 8 -> 4 -> 2
    assert all(n.num_groups == 32 for n in head.norms)
    depthwise = head.fuses[0].depthwise
    assert depthwise.groups == depthwise.in_channels == 128  # depthwise-separable: one filter per channel
    logits.sum().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_dice_matches_a_hand_computation_and_skips_ignored_pixels():
    # 2 classes, 3 pixels labeled [0, 1, ignore]; logits chosen so that softmax = [0.5,0.5], [0.2,0.8], any
    logits = torch.tensor([[0.0, 0.0], [0.0, math.log(4.0)], [5.0, -5.0]]).T.reshape(1, 2, 1, 3)
    target = torch.tensor([[[0, 1, 255]]])
    # class 0: p = [0.5, 0.2], y = [1, 0]: (2 * 0.5 + 1) / (0.7 + 1 + 1) ; class 1: p = [0.5, 0.8], y = [0, 1]
    expected = 1 - ((2 * 0.5 + 1) / (0.7 + 1 + 1) + (2 * 0.8 + 1) / (1.3 + 1 + 1)) / 2
    assert dice_loss(logits, target, ignore_index=255).item() == pytest.approx(expected, rel=1e-6)
    ce = -(math.log(0.5) + math.log(0.8)) / 2
    assert interpreter_loss(logits, target, 255, dice_weight=3.0).item() == pytest.approx(ce + 3 * expected, rel=1e-6)


def test_soft_label_loss_matches_a_per_pixel_reference():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)
    tau, total = 4.0, 0.0
    for b in range(2):
        for y in range(3):
            for x in range(5):
                p = [math.exp(v / tau) for v in teacher[b, :, y, x].tolist()]
                q = [math.exp(v / tau) for v in student[b, :, y, x].tolist()]
                total -= sum(pk / sum(p) * math.log(qk / sum(q)) for pk, qk in zip(p, q))
    assert soft_label_loss(student, teacher, tau).item() == pytest.approx(total / 30, rel=1e-5)
    # the minimum over students is the teacher's own distribution (its entropy)
    assert soft_label_loss(teacher, teacher, tau) < soft_label_loss(student, teacher, tau)
    # the relative form (KL): the same less the soft labels' entropy, 0 at the teacher's distribution
    entropy = 0.0
    for b in range(2):
        for y in range(3):
            for x in range(5):
                p = [math.exp(v / tau) for v in teacher[b, :, y, x].tolist()]
                entropy -= sum(pk / sum(p) * math.log(pk / sum(p)) for pk in p)
    assert soft_label_loss(student, teacher, tau, relative=True).item() == \
        pytest.approx((total - entropy) / 30, rel=1e-4)
    assert soft_label_loss(teacher, teacher, tau, relative=True).item() == pytest.approx(0.0, abs=1e-6)


def test_interpreter_trains_on_a_teacher_and_evaluates_as_a_segmenter(tmp_path, tiny_teacher_dir):
    from conftest import IGNORE, NUM_CLASSES, write_scenes
    from dreamteacher.cli import main
    from dreamteacher.workflows.evaluate import evaluate
    from dreamteacher.workflows.interpreter import train_interpreter

    images, masks = write_scenes(tmp_path / "scenes")
    settings = {"data": {"resolution": [32, 32], "num_classes": NUM_CLASSES, "ignore_index": IGNORE,
                         "num_workers": 0},
                "encode": {"t": 50, "blocks": [0, 2, 4]}, "interpreter": {"width": 32},
                "optim": {"epochs": 4, "warmup_epochs": 1, "batch_size": 2}, "trainer": {"accelerator": "cpu", "precision": "32-true"}}
    result = train_interpreter(tiny_teacher_dir, images, masks, tmp_path / "interp", progress=False,
                               overrides=settings)
    assert result.steps == 12 and result.absent_classes == []  # 6 images x 4 epochs / batch 2
    first = evaluate(tmp_path / "interp", images, masks)
    again = evaluate(tmp_path / "interp", images, masks)
    assert 0 <= first.miou <= 100 and first.miou == again.miou  # fixed test-time noise: repeatable

    (tmp_path / "one.txt").write_text("scene_0.png\n")
    import numpy as np
    from PIL import Image

    only_background = np.array(Image.open(masks / "scene_0.png"))
    only_background[(only_background == 2)] = 0  # no pixel of class 2 in this split
    Image.fromarray(only_background).save(masks / "scene_0.png")
    with pytest.warns(UserWarning, match=r"no pixel of class\(es\) \[2\]"):
        train_interpreter(tiny_teacher_dir, images, masks, tmp_path / "partial", split=tmp_path / "one.txt",
                          progress=False, overrides={**settings, "optim": {**settings["optim"], "batch_size": 1}})
    args = ["interpreter", "--teacher", str(tiny_teacher_dir), "--images", str(images), "--masks", str(masks),
            "--out", str(tmp_path / "cli"), "--no-progress", "--set", "optim.epochs=1", "--set", "data.num_workers=0",
            "--set", "data.resolution=[32,32]", "--set", "encode.blocks=[0,2,4]", "--set", "interpreter.width=32",
            "--set", "trainer.accelerator=cpu", "--set", "trainer.precision=32-true", "--set", "optim.batch_size=2", "--num-classes", str(NUM_CLASSES),
            "--ignore-index", str(IGNORE)]
    assert main(args) == 0
    assert main(["evaluate", str(tmp_path / "cli"), "--images", str(images), "--masks", str(masks)]) == 0


def test_dt_mix_distills_features_and_the_interpreters_soft_labels(tmp_path, tiny_teacher_dir):
    from conftest import IGNORE, NUM_CLASSES, TINY_PRESET, write_images, write_scenes
    from dreamteacher import api
    from dreamteacher.export.checkpoints import read_checkpoint
    from dreamteacher.workflows.interpreter import train_interpreter
    from dreamteacher.core.errors import UserError

    images, masks = write_scenes(tmp_path / "scenes")
    train_interpreter(tiny_teacher_dir, images, masks, tmp_path / "interp", progress=False,
                      overrides={"data": {"resolution": [32, 32], "num_classes": NUM_CLASSES, "ignore_index": IGNORE,
                                          "num_workers": 0},
                                 "encode": {"t": 50, "blocks": [0, 2, 4]}, "interpreter": {"width": 32},
                                 "optim": {"epochs": 1, "batch_size": 2}, "trainer": {"accelerator": "cpu", "precision": "32-true"}})
    unlabeled = write_images(tmp_path / "unlabeled")
    run = api.pretrain(unlabeled, tmp_path / "mix", method="dt-mix", interpreter=tmp_path / "interp", preset=TINY_PRESET,
                       progress=False)  # the teacher comes from the interpreter
    assert run.steps == 4 and math.isfinite(run.final_loss)
    ckpt = read_checkpoint(run.checkpoint)
    assert ckpt["hyper_parameters"]["method"] == "dt-mix" and ckpt["hyper_parameters"]["num_classes"] == NUM_CLASSES
    assert ckpt["state_dict"]["model.net.segmentation_head.0.weight"].shape[0] == NUM_CLASSES
    assert not any(k.startswith(("interpreter.", "teacher.")) for k in ckpt["state_dict"])  # frozen, left out
    import csv

    logged = [row for row in csv.DictReader(open(run.run_dir / "logs" / "metrics.csv")) if row.get("train/ld")]
    assert logged and all(float(row["train/ld"]) > 0 for row in logged)
    assert (run.run_dir / "backbone.safetensors").is_file()

    # G.4: the downstream UperNet starts from the student's decoder and head, every layer of them
    import segmentation_models_pytorch as smp

    import dreamteacher.workflows.finetune as ft
    from dreamteacher.nn.weights import read_decoder_export

    decoder, meta = read_decoder_export(run.files["decoder"])
    state = ckpt["state_dict"]
    assert meta["head"] == "upernet" and meta["num_classes"] == str(NUM_CLASSES)
    assert all(torch.equal(v, state[f"model.net.{k}"]) for k, v in decoder.items())
    downstream = smp.UPerNet("tu-test_resnet", encoder_weights=None, classes=NUM_CLASSES, decoder_channels=32)
    downstream.decoder.load_state_dict({k[len("decoder."):]: v for k, v in decoder.items() if k.startswith("decoder.")},
                                       strict=True)
    downstream.segmentation_head.load_state_dict(
        {k[len("segmentation_head."):]: v for k, v in decoder.items() if k.startswith("segmentation_head.")}, strict=True)
    seg = dict(data={"resolution": [32, 32], "num_classes": NUM_CLASSES, "ignore_index": IGNORE, "num_workers": 0},
               model={"head": "upernet", "decoder_channels": 32}, optim={"iterations": 1, "batch_size": 2},
               trainer={"accelerator": "cpu", "precision": "32-true"})
    tuned = ft.finetune(run.files["backbone"], images, masks, tmp_path / "seg", decoder=run.files["decoder"],
                        progress=False, **seg)
    assert tuned.init["decoder_init"] == "pretrained" and tuned.init["decoder_random_layers"] == []
    described = api.info(run.files["decoder"])
    assert described["kind"].startswith("UperNet decoder and head export")
    assert "every layer of the UPerNet decoder" in described["holds"] and "UPerNet(encoder_name='tu-test_resnet'" \
        in described["fits"]
    assert api.info(tmp_path / "interp")["method"] == "interpreter"
    with pytest.warns(UserWarning, match="distilled for 3 classes, this task has 5"):  # the decoder kept, the head not
        ft.finetune(run.files["backbone"], images, masks, tmp_path / "seg5", decoder=run.files["decoder"],
                    progress=False, **{**seg, "data": {**seg["data"], "num_classes": 5}})
    # a decoder that cannot fit the model it would initialize is refused before training, naming the file
    with pytest.raises(UserError, match="is a pretrained upernet decoder .*needs --head upernet"):
        ft.finetune(run.files["backbone"], images, masks, tmp_path / "seg-unet", decoder=run.files["decoder"],
                    progress=False, **{**seg, "model": {"head": "unet"}})
    with pytest.raises(UserError, match="is 32 channels wide, model.decoder_channels is 16"):
        ft.finetune(run.files["backbone"], images, masks, tmp_path / "seg16", decoder=run.files["decoder"],
                    progress=False, **{**seg, "model": {"head": "upernet", "decoder_channels": 16}})
    with pytest.raises(UserError, match="its inputs come from a pretrained encoder"):
        ft.finetune(None, images, masks, tmp_path / "seg-random", decoder=run.files["decoder"], progress=False, **seg)

    # from the offline feature cache (the bench's dt-mix rows): the interpreter reads the cached features
    cached = api.pretrain(unlabeled, tmp_path / "mix-cached", method="dt-mix", interpreter=tmp_path / "interp",
                          preset=TINY_PRESET, progress=False, cache=tmp_path / "cache")
    assert (tmp_path / "cache" / "meta.json").is_file() and math.isfinite(cached.final_loss)
    logged = [row for row in csv.DictReader(open(cached.run_dir / "logs" / "metrics.csv")) if row.get("train/ld")]
    assert logged and all(float(row["train/ld"]) > 0 for row in logged)

    with pytest.raises(UserError, match="reads blocks \\[0, 2, 4\\] at t=50"):
        api.pretrain(unlabeled, tmp_path / "x", method="dt-mix", interpreter=tmp_path / "interp",
                     preset=TINY_PRESET, overrides=["encode.t=20"], progress=False)
    with pytest.raises(UserError, match="needs --interpreter"):
        api.pretrain(unlabeled, tmp_path / "y", tiny_teacher_dir, method="dt-mix", preset=TINY_PRESET, progress=False)
    from conftest import tiny_unet
    from diffusers import DDPMPipeline
    from dreamteacher.teachers.diffusion import default_scheduler

    DDPMPipeline(unet=tiny_unet(seed=1), scheduler=default_scheduler()).save_pretrained(tmp_path / "other")
    with pytest.raises(UserError, match="was trained on the teacher"):
        api.pretrain(unlabeled, tmp_path / "z", tmp_path / "other", method="dt-mix", interpreter=tmp_path / "interp",
                     preset=TINY_PRESET, progress=False)


def test_the_dt_mix_students_pyramid_is_smps_own_upernet_forward():
    import segmentation_models_pytorch as smp

    from dreamteacher.methods.dt_mix import upernet_pyramid

    torch.manual_seed(0)
    model = smp.UPerNet("tu-test_resnet", encoder_weights=None, classes=3, decoder_channels=16).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.encoder(images)
        fused, pyramid = upernet_pyramid(model.decoder, list(features))
        assert torch.allclose(fused, model.decoder(list(features)), atol=1e-6)
        assert torch.allclose(model.segmentation_head(fused), model(images), atol=1e-6)
    assert [f.shape[-1] for f in pyramid] == [16, 8, 4, 2]  # strides 4, 8, 16, 32
