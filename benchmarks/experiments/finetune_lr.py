"""Issue-3 investigation: does the fine-tuning schedule wash out what pretraining gave at 1/30?

The camvid-cpu cells train every parameter at AdamW lr 1e-3 for 300 iterations on 12 labeled images.
This fine-tunes a pretrained backbone and the from-scratch one with the backbone at lr x SCALE (the
decoder and classifier at 1e-3), seeds 0-2, and scores each cell twice: on labeled train/ images
outside the 1/4 split (275 images, never used by any 1/30 or 1/8 cell: where a user with more labels
than the 12 would choose the scale) and on val/ (the benchmark's split, reported, not chosen on).
Resumable per cell.

    python benchmarks/experiments/finetune_lr.py --backbone RUN/backbone.safetensors --scales 1 0.1
"""

import argparse
import json
from pathlib import Path

from cells import heldout_miou_at_1_30, miou_at_1_30

parser = argparse.ArgumentParser()
parser.add_argument("--backbone", required=True, help="exported backbone (backbone.safetensors)")
parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.1])
parser.add_argument("--out", default="benchmarks/experiments/runs/finetune-lr")
args = parser.parse_args()

out = Path(args.out)
seeds = (0, 1, 2)


def scores(backbone: Path | None, folder: Path, scale: float) -> dict:
    val = miou_at_1_30(backbone, folder, seeds, overrides={"lab": {"backbone_lr_scale": scale}})
    held = heldout_miou_at_1_30(folder, seeds)
    return {"val": val, "heldout": held, "val_mean": sum(val) / len(val), "heldout_mean": sum(held) / len(held)}


result = {"backbone": args.backbone, "cells": {}}
for scale in args.scales:
    for name, backbone in (("pretrained", Path(args.backbone)), ("scratch", None)):
        key = f"{name} x{scale:g}"
        result["cells"][key] = scores(backbone, out / f"{name}-x{scale:g}", scale)
        print(key, json.dumps({k: round(v, 2) for k, v in result["cells"][key].items() if k.endswith("mean")}),
              flush=True)
(out / "result.json").write_text(json.dumps(result, indent=2))
