"""Issue-5 investigation: does DeP lose its pretraining to a fine-tuning learning rate that is too high?

The denoising paper fine-tunes with Adam at lr swept in [1e-5, 3e-4]; the camvid-cpu cells use AdamW
at 1e-3 for every row. This runs the recipe's `dep` row at 1/30 (its DeP pretraining, then the
recipe's cells at lr 1e-3), then fine-tunes the DeP U-Net (encoder + decoder) and the from-scratch
U-Net at lr 3e-4, seeds 0-2, and prints the four means. Resumable.

    python benchmarks/experiments/dep_lr.py
    python benchmarks/experiments/dep_lr.py --device gpu --data-root ROOT --out OUT
"""

import argparse
import json
from pathlib import Path

import dreamteacher as dt
from cells import miou_at_1_30, root
from dreamteacher.bench.runner import DEVICE_SETTINGS

parser = argparse.ArgumentParser()
parser.add_argument("--device", default="cpu", choices=sorted(DEVICE_SETTINGS))
parser.add_argument("--data-root", default=str(root))
parser.add_argument("--out", default="benchmarks/experiments/runs")
args = parser.parse_args()

out = Path(args.out) / ("dep-lr" + ("" if args.device == "cpu" else f"-{args.device}"))
cells = {"device": args.device, "data_root": Path(args.data_root)}
bench = dt.bench("camvid-cpu", out / "bench", rows=["dep"], fractions=["1-30"], progress=False,
                 device=args.device, data_root=args.data_root)
recipe_cells = [row["miou"] for row in bench.rows if row["method"] == "dep" and row["fraction"] == "1-30"]
dep = out / "bench" / "runs" / "pretrain-dep"
low_lr = {"model": {"head": "unet"}, "optim": {"lr": 3e-4}}
result = {
    "dep_lr_1e-3": recipe_cells,
    "dep_lr_3e-4": miou_at_1_30(dep / "backbone.safetensors", out / "dep-3e-4", overrides=low_lr,
                                decoder=dep / "decoder.safetensors", **cells),
    "scratch_unet_lr_3e-4": miou_at_1_30(None, out / "scratch-3e-4", overrides=low_lr, **cells),
}
result["means"] = {name: sum(v) / len(v) for name, v in result.items()}
(out / "result.json").write_text(json.dumps(result, indent=2))
print(json.dumps(result, indent=2))
