"""Issue 28: how much does label distillation steer a dt-mix student, at its start and at its end?

Rebuilds a finished dt-mix pretraining (its saved config and inputs: teacher, feature cache,
interpreter) and, on a few of its batches, measures each term's gradient on the weights both terms
train (backbone, UperNet decoder) and on the head (label term only):
- the norm of lambda_ld * grad(L_ld) against grad(L_feat) and their cosine: AdamW normalizes each
  weight's step, so on shared weights what matters is the ratio and the angle, not the scale;
- L_ld (KL at tau) and how often the student's argmax equals the interpreter's.
At the start (the run's first weights, re-drawn with its seed) and at the end (its last checkpoint).
No training; a minute or two on 2 cores. Writes OUT/result.json.

    python benchmarks/experiments/dtmix_gradients.py \
        benchmarks/results/camvid-cpu/runs/pretrain-dt-mix-1-30 --data ../shared/data/camvid/train
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
import yaml

from dreamteacher.core.runs import CONFIG, RunFolder
from dreamteacher.export.checkpoints import read_checkpoint
from dreamteacher.methods.dt_feat import resize_to
from dreamteacher.workflows.pretrain import prepare_pretraining

parser = argparse.ArgumentParser()
parser.add_argument("run", help="a finished dt-mix pretraining folder")
parser.add_argument("--data", default="../shared/data/camvid/train", help="the images it was pretrained on")
parser.add_argument("--batches", type=int, default=6)
parser.add_argument("--out", default="benchmarks/experiments/runs/dtmix-gradients")
args = parser.parse_args()

run = RunFolder(args.run)
config = yaml.safe_load((run.path / CONFIG).read_text())
inputs = run.inputs()
out = Path(args.out)
shutil.rmtree(out / "job", ignore_errors=True)  # a scratch run folder: nothing is trained in it
job = prepare_pretraining(args.data, out / "job", inputs["teacher"], "dt-mix", overrides=config, progress=False,
                          cache=inputs["cache"], interpreter=inputs["interpreter"])
module = job.module
module.place(torch.device("cpu"))
first = {k: v.clone() for k, v in module.state_dict().items()}
last = read_checkpoint(run.checkpoint)["state_dict"]
weight = module.config.loss.ld_weight
net = module.model.net
groups = {"backbone": list(net.encoder.parameters()), "decoder": list(net.decoder.parameters()),
          "head": list(net.segmentation_head.parameters())}
batches = []
for batch in job.loader:
    batches.append(batch)
    if len(batches) == args.batches:
        break


def flat(grads):
    return torch.cat([g.flatten() for g in grads if g is not None] or [torch.zeros(1)])


def measure(state: dict) -> dict:
    module.load_state_dict(state, strict=True)
    module.train()
    rows = []
    for batch in batches:
        losses = module.compute_losses(batch)
        label = weight * losses["ld"]
        feature = losses["loss"] - label
        row = {"ld": losses["ld"].item(), "feature_loss": feature.item()}
        for name, params in groups.items():
            g_feat = flat(torch.autograd.grad(feature, params, retain_graph=True, allow_unused=True))
            g_ld = flat(torch.autograd.grad(label, params, retain_graph=True, allow_unused=True))
            f_norm, l_norm = g_feat.norm().item(), g_ld.norm().item()
            shared = f_norm > 0  # the head has no feature gradient: no ratio, no angle
            row[name] = {"feature_norm": f_norm, "label_norm": l_norm,
                         "label_over_feature": l_norm / f_norm if shared else None,
                         "cosine": torch.nn.functional.cosine_similarity(g_feat, g_ld, dim=0).item() if shared else None}
        with torch.no_grad():  # the student's argmax against the interpreter's
            images, teacher_feats = module.teacher_features(batch)
            logits, _ = module.student_outputs(images)
            soft = resize_to(module.interpreter(teacher_feats).float(), logits.shape[-2:])
            row["argmax_agreement"] = (logits.argmax(1) == soft.argmax(1)).float().mean().item()
        rows.append(row)

    def mean(get):
        return round(sum(get(r) for r in rows) / len(rows), 4)

    summary = {"ld": mean(lambda r: r["ld"]), "feature_loss": mean(lambda r: r["feature_loss"]),
               "argmax_agreement": mean(lambda r: r["argmax_agreement"])}
    for name in groups:
        summary[name] = {k: mean(lambda r, k=k: r[name][k]) if rows[0][name][k] is not None else None
                         for k in rows[0][name]}  # the head: the label term alone trains it
    return summary


result = {"run": str(run.path), "ld_weight": weight, "ld_temperature": module.config.loss.ld_temperature,
          "batches": len(batches), "start": measure(first), "end": measure(last)}
out.mkdir(parents=True, exist_ok=True)
(out / "result.json").write_text(json.dumps(result, indent=2))
print(json.dumps(result, indent=2))
