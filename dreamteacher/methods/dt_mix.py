"""DreamTeacher mix distillation (section 3.2, Eq. 5-6): feature distillation plus label distillation
from a feature interpreter trained on a few labels. L_mix = L_feat + lambda_ld * H(P_tau^g, P_tau^r).

The student gets a 1x1 logit head on its regressor's finest fused map (stride 4); the interpreter's
logits on the same teacher features are its soft labels, for every pretraining image, labeled or not.
Its decoder export is the regressor and logit head under the names of smp's UPerNet decoder and head
(G.4: "we initialize the backbone as well as the UperNet with our pre-trained weights").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from dreamteacher.core.config import Config
from dreamteacher.core.errors import UserError
from dreamteacher.core.runs import INTERPRETER, SEGMENTER_INFO
from dreamteacher.losses import soft_label_loss
from dreamteacher.methods.base import PretrainInputs, register_method
from dreamteacher.methods.dt_feat import DTFeat, resize_to
from dreamteacher.nn.interpreter import FeatureInterpreter
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


def upernet_decoder_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A dt-mix student's regressor and logit head under the keys of segmentation_models_pytorch's
    `UPerNet` (`decoder.*`, `segmentation_head.*`), the mapping being exact where the two share a layer:
    PPM branches and fuse = `psp.blocks.i.1` / `psp.out_conv` (same concatenation order), FPN laterals
    and output convs of levels 2, 1, 0 = `fpn_lateral_blocks.0..2` / `fpn_conv_blocks.0..2`, logit head
    = `segmentation_head.0`. smp's `feature_norms` and `fusion_block` have no counterpart: random."""
    renames = [("regressor.ppm.fuse.", "decoder.psp.out_conv."), ("label_head.", "segmentation_head.0.")]
    renames += [(f"regressor.ppm.branches.{i}.", f"decoder.psp.blocks.{i}.1.") for i in range(4)]
    renames += [(f"regressor.laterals.{level}.", f"decoder.fpn_lateral_blocks.{2 - level}.conv_norm_relu.")
                for level in range(3)]
    renames += [(f"regressor.outputs.{level}.", f"decoder.fpn_conv_blocks.{2 - level}.") for level in range(3)]
    mapped = {}
    for key, value in state_dict.items():
        for old, new in renames:
            if key.startswith(old):
                mapped[new + key[len(old):]] = value
    return mapped


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
        super().__init__(config, feature_specs, teacher, teacher_path,
                         extra={"interpreter": interpreter_path, "num_classes": num_classes})
        object.__setattr__(self, "interpreter", interpreter.eval().requires_grad_(False))
        self.label_head = nn.Conv2d(self.regressor.width, num_classes, 1)

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
        info = {"format": UPERNET_DECODER_FORMAT, "head": "upernet",
                "decoder_channels": hparams["config"]["student"]["regressor_channels"],
                "num_classes": hparams["num_classes"]}
        return upernet_decoder_weights(state_dict), info

    def place(self, device: torch.device) -> None:
        super().place(device)
        self.interpreter.to(device)

    def compute_losses(self, batch) -> dict[str, torch.Tensor]:
        images, teacher_feats = self.teacher_features(batch)
        fused, student_feats = self.student_outputs(images)
        losses = self.feature_losses(student_feats, teacher_feats)
        student_logits = self.label_head(fused)
        with torch.no_grad():
            soft_labels = resize_to(self.interpreter(teacher_feats).float(), student_logits.shape[-2:])
        cfg = self.config.loss
        losses["ld"] = soft_label_loss(student_logits, soft_labels, cfg.ld_temperature)
        losses["loss"] = losses["loss"] + cfg.ld_weight * losses["ld"]
        return losses
