"""Issue-5 investigation: which DeP settings let denoising pretraining beat random init at 1/30?

Runs DeP (`pretrain --method dep`) on CamVid train/ images with the recipe's `dep` settings (the
camvid-cpu preset with `method_overrides.dep`) and the given `--set` overrides on top, fine-tunes the
U-Net (encoder and the DeP decoder) at 1/30 with the recipe's cell settings (seeds 0-2) and
`--finetune-set` on top, and scores each cell on the 275 labeled train/ images outside the 1/4 split
(where a user would choose) and on val/ (reported, not chosen on). The from-scratch U-Net's cells
with the same fine-tuning settings are run once per `--finetune-set` and shared between names.
Resumable: finished stages and cells are skipped.

    python benchmarks/experiments/dep_settings.py recipe
    python benchmarks/experiments/dep_settings.py crop64 --set denoise.crop=[64,64] optim.epochs=800
    python benchmarks/experiments/dep_settings.py recipe --finetune-set optim.lr=3e-4
"""

import argparse
import hashlib
import json
from pathlib import Path

import dreamteacher as dt
from cells import finished, heldout_miou_at_1_30, interrupted, miou_at_1_30, root
from dreamteacher.bench.recipes import DEVICE_SETTINGS, load_recipe
from dreamteacher.core.config import deep_merge
from dreamteacher.core.config import parse_overrides

parser = argparse.ArgumentParser()
parser.add_argument("name", help="the work folder's name: OUT/dep-NAME")
parser.add_argument("--set", dest="settings", nargs="*", default=[], metavar="KEY=VALUE",
                    help="DeP pretraining settings on top of the recipe's")
parser.add_argument("--finetune-set", dest="finetune_settings", nargs="*", default=[], metavar="KEY=VALUE",
                    help="fine-tuning settings on top of the recipe's cells (both DeP and scratch)")
parser.add_argument("--device", default="cpu", choices=sorted(DEVICE_SETTINGS))
parser.add_argument("--data-root", default=str(root))
parser.add_argument("--out", default="benchmarks/experiments/runs")
args = parser.parse_args()

data_root = Path(args.data_root)
recipe = load_recipe("camvid-cpu")
pretrain_overrides = deep_merge(recipe["method_overrides"]["dep"], parse_overrides(args.settings),
                                 DEVICE_SETTINGS[args.device])
unet = deep_merge({"model": {"head": "unet"}}, parse_overrides(args.finetune_settings))
tag = hashlib.sha256(json.dumps(args.finetune_settings).encode()).hexdigest()[:8] if args.finetune_settings else "recipe"
out = Path(args.out) / f"dep-{args.name}" / f"finetune-{tag}"
pretrained = Path(args.out) / f"dep-{args.name}" / "pretrain"

if not finished(pretrained):
    dt.pretrain(data_root / "train", pretrained, method="dep", preset=recipe["pretrain_preset"],
                overrides=pretrain_overrides, resume=interrupted(pretrained), progress=False)
summary = json.loads((pretrained / "run.json").read_text())


def scored(backbone, folder: Path, decoder=None) -> dict:
    val = miou_at_1_30(backbone, folder, device=args.device, data_root=data_root, overrides=unet, decoder=decoder)
    heldout = heldout_miou_at_1_30(folder, data_root=data_root)
    return {"miou_1_30": val, "mean": sum(val) / len(val), "heldout_miou_1_30": heldout,
            "heldout_mean": sum(heldout) / len(heldout)}


result = {"settings": args.settings, "finetune_settings": args.finetune_settings, "device": args.device,
          "dep_seconds": summary["seconds"], "dep_steps": summary["steps"], "final_loss": summary["final_loss"],
          "dep": scored(pretrained / "backbone.safetensors", out, decoder=pretrained / "decoder.safetensors"),
          "scratch_unet": scored(None, Path(args.out) / f"dep-scratch-unet-{tag}")}
(out / "result.json").write_text(json.dumps(result, indent=2))
print(json.dumps(result, indent=2))
