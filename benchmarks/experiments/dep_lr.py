"""Issue-5 investigation: do the U-Net rows lose their pretraining to a fine-tuning learning rate that
is too high?

The denoising paper fine-tunes with Adam at lr swept in [1e-5, 3e-4]; the camvid-cpu cells use AdamW
at 1e-3 for every row. This takes the recipe's `dep` row at 1/30 (its DeP pretraining and its cells at
lr 1e-3), then fine-tunes the DeP U-Net (encoder + decoder) and the from-scratch U-Net at lr 3e-4,
seeds 0-2, and prints every mean on val/ and on the held-out train/ images (`cells.heldout_split`:
where a user would choose the lr). With `--bench DIR`, a finished camvid-cpu bench folder with the
U-Net rows and their work folders gives the DeP pretraining and the 1e-3 cells, and the dt-feat U-Net
is fine-tuned at 3e-4 as well; without it, the `dep` and `scratch` U-Net rows are run at 1/30 into
OUT/dep-lr/bench first (about 45 min on 2 cores). Resumable.

    python benchmarks/experiments/dep_lr.py
    python benchmarks/experiments/dep_lr.py --device gpu --data-root ROOT --out OUT
"""

import argparse
import json
from pathlib import Path

import dreamteacher as dt
from cells import heldout_miou_at_1_30, miou_at_1_30, root
from dreamteacher.bench.recipes import DEVICE_SETTINGS

parser = argparse.ArgumentParser()
parser.add_argument("--device", default="cpu", choices=sorted(DEVICE_SETTINGS))
parser.add_argument("--data-root", default=str(root))
parser.add_argument("--out", default="benchmarks/experiments/runs")
parser.add_argument("--bench", help="a finished camvid-cpu bench folder with the dep and U-Net rows at 1/30")
args = parser.parse_args()

out = Path(args.out) / ("dep-lr" + ("" if args.device == "cpu" else f"-{args.device}"))
cells = {"device": args.device, "data_root": Path(args.data_root)}
bench = Path(args.bench) if args.bench else out / "bench"
if not args.bench:
    dt.bench("camvid-cpu", bench, rows=["dep:unet", "scratch:unet"], fractions=["1-30"], progress=False,
             device=args.device, data_root=args.data_root)
pretrained = bench / "runs"
low_lr = {"model": {"head": "unet"}, "optim": {"lr": 3e-4}}
runs = {"dep_lr_1e-3": pretrained / "cells" / "dep--unet"}
val = {}
runs["dep_lr_3e-4"] = out / "dep-3e-4"
val["dep_lr_3e-4"] = miou_at_1_30(pretrained / "pretrain-dep" / "backbone.safetensors", runs["dep_lr_3e-4"],
                                  overrides=low_lr, decoder=pretrained / "pretrain-dep" / "decoder.safetensors",
                                  **cells)
runs["scratch_unet_lr_3e-4"] = out / "scratch-3e-4"
val["scratch_unet_lr_3e-4"] = miou_at_1_30(None, runs["scratch_unet_lr_3e-4"], overrides=low_lr, **cells)
runs["scratch_unet_lr_1e-3"] = pretrained / "cells" / "scratch--unet"
names_1e_3 = ["dep_lr_1e-3", "scratch_unet_lr_1e-3"]  # the bench's cells, scored here
if args.bench:  # the dt-feat U-Net row, at 1e-3 already there
    names_1e_3.append("dt_feat_unet_lr_1e-3")
    runs["dt_feat_unet_lr_1e-3"] = pretrained / "cells" / "dt-feat--unet"
    runs["dt_feat_unet_lr_3e-4"] = out / "dt-feat-3e-4"
    val["dt_feat_unet_lr_3e-4"] = miou_at_1_30(pretrained / "pretrain-dt-feat" / "backbone.safetensors",
                                               runs["dt_feat_unet_lr_3e-4"], overrides=low_lr, **cells)
for name in names_1e_3:
    val[name] = [dt.evaluate(runs[name] / f"1-30-seed{seed}", cells["data_root"] / "val",
                             cells["data_root"] / "valannot").miou for seed in (0, 1, 2)]
heldout = {name: heldout_miou_at_1_30(run, data_root=cells["data_root"]) for name, run in runs.items()}
result = {"val": val, "heldout": heldout,
          "means": {split: {name: round(sum(v) / len(v), 2) for name, v in scores.items()}
                    for split, scores in (("val", val), ("heldout", heldout))}}
(out / "result.json").write_text(json.dumps(result, indent=2))
print(json.dumps(result, indent=2))
