"""DreamTeacher mix distillation (section 3.2, Eq. 5-6): feature distillation plus label distillation
from a feature interpreter trained on a few labels. L_mix = L_feat + lambda_ld * KL(P_tau^g || P_tau^r)
(Eq. 5's cross-entropy less the soft labels' own entropy: the same gradient, and a value that falls
to 0 as the student matches them instead of stopping at their entropy).

The student is the downstream segmenter itself (G.4: "we initialize the backbone as well as the
UperNet with our pre-trained weights"): segmentation_models_pytorch's UPerNet on the timm backbone,
its PPM, FPN and fusion exactly as fine-tuning builds them. The feature loss regresses the teacher's
levels from the decoder's pyramid (the PPM output at stride 32, the FPN outputs at 16, 8, 4) through
1x1 projections that are not exported; label distillation supervises the segmentation head's logits.
So `decoder.safetensors` is the whole decoder and head under smp's own names, and fine-tuning starts
with no layer at random.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from dreamteacher.core.config import Config
from dreamteacher.core.errors import UserError
from dreamteacher.core.runs import INTERPRETER, SEGMENTER_INFO
from dreamteacher.losses import soft_label_loss
from dreamteacher.methods.base import PretrainInputs, register_method
from dreamteacher.methods.dt_feat import DTFeat, resize_to
from dreamteacher.nn.interpreter import FeatureInterpreter
from dreamteacher.nn.segmenters import Segmenter
from dreamteacher.teachers.diffusion import DiffusionTeacher
from dreamteacher.teachers.encoding import teacher_fingerprint

INTERPRETER_HEAD = "teacher-interpreter"  # segmenter.json's head of an interpreter run
UPERNET_DECODER_FORMAT = "smp-upernet-decoder"


def interpreter_info(interpreter: str | Path) -> dict:
    """The description (`segmenter.json`) of a finished `dreamteacher interpreter` run."""
    path = Path(interpreter) / SEGMENTER_INFO
    try:
        info = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        info = {}
    if info.get("head") != INTERPRETER_HEAD:
        raise UserError(f"--interpreter {interpreter}: not a finished `dreamteacher interpreter` run")
    return info


def upernet_pyramid(decoder: nn.Module, features: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """smp's `UPerNetDecoder.forward` with its pyramid kept: (the fused map at stride 4, [FPN outputs at
    strides 4, 8, 16, the PPM output at stride 32]). The same layers in the same order as smp's (a
    test holds the fused map equal to smp's own forward)."""
    features = [norm(f) for norm, f in zip(decoder.feature_norms, features[2:])]
    pyramid = [decoder.psp(features[-1])]
    for lateral, block in zip(features[:-1][::-1], decoder.fpn_lateral_blocks):
        pyramid.append(block(pyramid[-1], lateral))
    pyramid = [pyramid[0]] + [conv(f) for conv, f in zip(decoder.fpn_conv_blocks, pyramid[1:])]
    size = pyramid[-1].shape[-2:]
    resized = [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in pyramid]
    fused = decoder.fusion_block(torch.cat(resized[::-1], dim=1))
    return fused, pyramid[::-1]


@register_method
class DTMix(DTFeat):
    """batch -> {"loss", "mse", "at", "ld"}. The interpreter, like the teacher, is frozen and held
    outside the module tree (not trained, not wrapped, not in checkpoints: its run path is)."""

    name = "dt-mix"
    summary = "dt-feat plus label distillation from an --interpreter (its teacher is the default --teacher)"
    teacher_families = ("diffusion",)
    requires = {"interpreter": "a `dreamteacher interpreter` run folder"}
    decoder_head = "upernet"

    def __init__(self, config: Config, feature_specs, teacher: DiffusionTeacher | None,
                 interpreter: FeatureInterpreter, num_classes: int, teacher_path: str = "",
                 interpreter_path: str = ""):
        self.num_classes = num_classes
        super().__init__(config, feature_specs, teacher, teacher_path,
                         extra={"interpreter": interpreter_path, "num_classes": num_classes})
        object.__setattr__(self, "interpreter", interpreter.eval().requires_grad_(False))

    def build_student(self, config: Config, out_channels: list[int | None]) -> None:
        """The fine-tuning UPerNet (`student.regressor_channels` wide) and a 1x1 projection per level to
        the teacher's channels."""
        width = config.student.regressor_channels
        self.model = Segmenter("upernet", config.student.backbone, self.num_classes, decoder_channels=width)
        self.projections = nn.ModuleDict({str(level): nn.Conv2d(width, channels, 1)
                                          for level, channels in enumerate(out_channels) if channels})

    def backbone_model(self) -> nn.Module:
        return self.model.backbone_model()

    def student_outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the segmentation head's logits at stride 4, the projected pyramid levels paired with the
        teacher's features, in its block order)."""
        net = self.model.net
        features = net.encoder(self.model.normalize((images + 1) / 2))  # [-1, 1] -> the timm model's input
        fused, pyramid = upernet_pyramid(net.decoder, features)
        logits = net.segmentation_head[0](fused)  # the head's conv; its x4 upsampling is for full-size output
        return logits, [self.projections[str(level)](pyramid[level]) for level in self.levels]

    @classmethod
    def resolve_inputs(cls, inputs: PretrainInputs, model: str | None) -> dict:
        if inputs.interpreter is not None:
            info = interpreter_info(inputs.interpreter)
            inputs.extra["interpreter_info"] = info
            if inputs.teacher is None:
                inputs.teacher = info["teacher"]
        return {}

    @classmethod
    def check_config(cls, config: Config, inputs: PretrainInputs) -> None:
        """The interpreter reads the teacher's features: same teacher, blocks and t as it was trained on."""
        super().check_config(config, inputs)
        info, interpreter, teacher = inputs.extra["interpreter_info"], inputs.interpreter, inputs.teacher
        if Path(teacher).resolve() != Path(info["teacher"]).resolve():
            if not Path(info["teacher"]).exists() or teacher_fingerprint(teacher) != teacher_fingerprint(info["teacher"]):
                raise UserError(f"--interpreter {interpreter} was trained on the teacher {info['teacher']}, not on "
                                f"--teacher {teacher}: its soft labels would read features it never saw")
        trained = info["encode"]
        if list(trained["blocks"]) != list(config.encode.blocks) or trained["t"] != config.encode.t:
            raise UserError(f"--interpreter {interpreter} reads blocks {trained['blocks']} at t={trained['t']}; this "
                            f"run encodes blocks {config.encode.blocks} at t={config.encode.t}: set encode.blocks "
                            "and encode.t to the interpreter's")

    @classmethod
    def build(cls, config: Config, inputs: PretrainInputs) -> "DTMix":
        info = inputs.extra["interpreter_info"]
        head = FeatureInterpreter(inputs.feature_specs, info["num_classes"], info["width"])
        weights = Path(inputs.interpreter) / INTERPRETER
        try:
            head.load_state_dict(load_file(str(weights)), strict=True)
        except Exception as exc:  # noqa: BLE001 - a missing, truncated or foreign file
            raise UserError(f"--interpreter {inputs.interpreter}: {weights.name} does not load "
                            f"({exc.__class__.__name__})") from None
        return cls(config, inputs.feature_specs, inputs.teacher_model, head, info["num_classes"], str(inputs.teacher),
                   str(Path(inputs.interpreter).resolve()))

    @classmethod
    def describe_settings(cls, config: Config) -> str:
        return (super().describe_settings(config)
                + f", + {config.loss.ld_weight:g} x label distillation at temperature {config.loss.ld_temperature:g}")

    @classmethod
    def decoder_export(cls, state_dict: dict[str, torch.Tensor], hparams: dict) -> tuple[dict, dict] | None:
        """The whole UPerNet decoder and its segmentation head, under smp's own keys."""
        weights = {k[len("model.net."):]: v for k, v in state_dict.items()
                   if k.startswith(("model.net.decoder.", "model.net.segmentation_head."))}
        config = hparams["config"]
        width, classes = config["student"]["regressor_channels"], hparams["num_classes"]
        info = {"format": UPERNET_DECODER_FORMAT, "head": "upernet", "decoder_channels": width, "num_classes": classes,
                "holds": "every layer of the UPerNet decoder (feature norms, PPM, FPN laterals and convs, fusion) "
                         "and its segmentation head",
                "fits": f"segmentation_models_pytorch.UPerNet(encoder_name='tu-{config['student']['backbone']}', "
                        f"decoder_channels={width}, classes={classes}): `finetune --head upernet --decoder`"}
        return weights, info

    def place(self, device: torch.device) -> None:
        super().place(device)
        self.interpreter.to(device)

    def compute_losses(self, batch) -> dict[str, torch.Tensor]:
        images, teacher_feats = self.teacher_features(batch)
        student_logits, student_feats = self.student_outputs(images)
        losses = self.feature_losses(student_feats, teacher_feats)
        with torch.no_grad():
            soft_labels = resize_to(self.interpreter(teacher_feats).float(), student_logits.shape[-2:])
        cfg = self.config.loss
        losses["ld"] = soft_label_loss(student_logits, soft_labels, cfg.ld_temperature, relative=True)
        losses["loss"] = losses["loss"] + cfg.ld_weight * losses["ld"]
        return losses
