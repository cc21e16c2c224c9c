"""Issue-6 investigation: why does `pcd` not beat `scratch` on camvid-cpu? Two suspects.

1. The teacher. PCD can hardly give a student more than its teacher knows, and the MoCo v3 ResNet-50
   trained on 367 CamVid frames for 330 steps on 2 CPU cores barely lowered its loss (at the linear
   scaling rule's LARS lr, the recipe's until this experiment answered). A linear readout
   (frozen backbone, one 1x1 conv on its four levels, 100 iterations as the recipe's readout rows) at
   1/30 of the labels, seeds 0-2, of: the teacher's base encoder against a randomly initialized
   ResNet-50; the PCD student against a randomly initialized ResNet-18.
2. The queue. 1024 pooled teacher vectors are 16 steps of 2 x 32 views, more than an epoch (11
   steps): every image's own vectors from its previous epoch are always among its negatives. The
   paper's 65536 on ImageNet's 1.28M images never holds them. `pcd-queue256` (4 steps) is the
   recipe's pcd with a queue of 256, fine-tuned as the table's cells (UperNet, 300 iterations) next
   to the recipe's pcd.

Scores on val/ and on the held-out train/ images. The recipe's contrastive rows as they were then
(LARS at the linear scaling rule's lr, NormRescale x0.25 at fine-tuning; the recipe has used AdamW
since pcd_adamw.py). Work in `--out`/pcd-teacher. Resumable.

    python benchmarks/experiments/pcd_teacher.py
"""

import argparse
import copy
import json
from pathlib import Path

from cells import recipe, recipe_bench, root, score_into
from dreamteacher.bench.pipeline import stage

from dreamteacher.core.config import deep_merge

parser = argparse.ArgumentParser()
parser.add_argument("--data-root", default=str(root))
parser.add_argument("--out", default="benchmarks/experiments/runs")
args = parser.parse_args()

data = Path(args.data_root)
out = Path(args.out) / "pcd-teacher"
out.mkdir(parents=True, exist_ok=True)
lars = {"moco-teacher": {"name": "lars", "base_lr": 0.6, "weight_decay": 1e-6},
        "pcd": {"name": "lars", "base_lr": 1.0, "weight_decay": 1e-5}}
lars_spec = copy.deepcopy(recipe)
for method, optim in lars.items():
    lars_spec["method_overrides"][method]["optim"].update(optim)
norm_rescale = {"lab": {"norm_rescale": 0.25}}

table = recipe_bench(lars_spec, out, data)
teacher = stage(table, "moco-teacher")
pcd = stage(table, "pcd")
variant_spec = copy.deepcopy(lars_spec)
variant_spec["method_overrides"]["pcd-queue256"] = deep_merge(lars_spec["method_overrides"]["pcd"],
                                                               {"contrast": {"queue_size": 256}})
variant_spec["stages"]["pcd-queue256"] = {"method": "pcd", "teacher": "moco-teacher"}
pcd_queue256 = stage(recipe_bench(variant_spec, out, data), "pcd-queue256")

result = {"stages_seconds": {"moco-teacher": teacher["stages"]["moco-teacher"]["seconds"],
                             "pcd": pcd["stages"]["pcd"]["seconds"],
                             "pcd-queue256": pcd_queue256["stages"]["pcd-queue256"]["seconds"]},
          "val": {}, "heldout": {}}


def score(name: str, backbone: str | None, overrides: dict) -> float:
    return score_into(result, out, name, backbone, overrides, data)


# the table's cells (UperNet) with NormRescale, as the LARS pcd row had
for name, made in (("finetune_pcd_queue1024", pcd), ("finetune_pcd_queue256", pcd_queue256)):
    score(name, made["backbone"], norm_rescale)

readouts = {  # name -> (backbone file or None for random init, architecture)
    "readout_moco_teacher_resnet50": (teacher["backbone"], "resnet50"),
    "readout_random_resnet50": (None, "resnet50"),
    "readout_pcd_student_resnet18": (pcd["backbone"], "resnet18"),
    "readout_random_resnet18": (None, "resnet18"),
}
for name, (backbone, arch) in readouts.items():
    score(name, backbone, {"model": {"head": "readout", "backbone": arch}, "optim": {"iterations": 100}})
print(json.dumps(result["means"], indent=2))
