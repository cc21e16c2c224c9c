"""DreamTeacher mix distillation (section 3.2, Eq. 5-6): feature distillation plus label distillation
from a feature interpreter trained on a few labels. L_mix = L_feat + lambda_ld * H(P_tau^g, P_tau^r).

The student gets a 1x1 logit head on its regressor's finest fused map (stride 4); the interpreter's
logits on the same teacher features are its soft labels, for every pretraining image, labeled or not.
"""

from __future__ import annotations

import torch
from torch import nn

from dreamteacher.config import Config
from dreamteacher.losses import soft_label_loss
from dreamteacher.methods.dt_feat import DTFeat, resize_to
from dreamteacher.teachers.diffusion import DiffusionTeacher, FeatureSpec
from dreamteacher.teachers.interpreter import FeatureInterpreter


class DTMix(DTFeat):
    """batch -> {"loss", "mse", "at", "ld"}. The interpreter, like the teacher, is frozen and held
    outside the module tree (not trained, not wrapped, not in checkpoints: its run path is)."""

    def __init__(self, config: Config, feature_specs: list[FeatureSpec], teacher: DiffusionTeacher | None,
                 interpreter: FeatureInterpreter, num_classes: int, teacher_path: str = "",
                 interpreter_path: str = ""):
        super().__init__(config, feature_specs, teacher, teacher_path, method="dt-mix",
                         extra={"interpreter": interpreter_path, "num_classes": num_classes})
        object.__setattr__(self, "interpreter", interpreter.eval().requires_grad_(False))
        self.label_head = nn.Conv2d(self.regressor.width, num_classes, 1)

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
