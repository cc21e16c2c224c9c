"""Issue-3 investigation: does a better-trained teacher close the gap to +5 mIoU at 1/30?

Trains the camvid-cpu teacher with STEPS steps (the recipe: 1800) on CROP crops (the recipe: 48x64 of
the 96x128 frame; `--crop 96 128` trains on whole frames), distills it into the recipe's ResNet-18
student (the preset's epochs; 45 when it was run), fine-tunes at 1/30 with the recipe's cell
settings (seeds 0-2) and scores on val/. Resumable: finished stages and cells are skipped.

    python benchmarks/experiments/teacher_length.py 5400
    python benchmarks/experiments/teacher_length.py 1800 --crop 96 128 --device gpu --data-root ROOT
"""

import argparse
import json
from pathlib import Path

import dreamteacher as dt
from cells import finished, interrupted, miou_at_1_30, root
from dreamteacher.bench.recipes import DEVICE_SETTINGS
from dreamteacher.core.config import deep_merge

parser = argparse.ArgumentParser()
parser.add_argument("steps", type=int)
parser.add_argument("--crop", type=int, nargs=2, default=[48, 64], metavar=("H", "W"))
parser.add_argument("--device", default="cpu", choices=sorted(DEVICE_SETTINGS))
parser.add_argument("--data-root", default=str(root))
parser.add_argument("--out", default="benchmarks/experiments/runs")
args = parser.parse_args()

data_root = Path(args.data_root)
crop = "x".join(map(str, args.crop))
out = Path(args.out) / f"teacher-{args.steps}steps-{crop}-{args.device}"
device = DEVICE_SETTINGS[args.device]

teacher = out / "teacher"
if not finished(teacher):
    teacher_settings = {"teacher_train": {"max_steps": args.steps, "crop": args.crop}}
    dt.train_teacher(data_root / "train", teacher, preset="camvid-cpu", overrides=deep_merge(teacher_settings, device),
                     resume=interrupted(teacher), progress=False)
student = out / "student"
if not finished(student):
    dt.pretrain(data_root / "train", student, teacher=teacher / "teacher", preset="camvid-cpu", overrides=device,
                resume=interrupted(student), progress=False)
seconds = {name: json.loads((out / name / "run.json").read_text())["seconds"] for name in ("teacher", "student")}
scores = miou_at_1_30(student / "backbone.safetensors", out, device=args.device, data_root=data_root)
result = {"teacher_steps": args.steps, "teacher_crop": args.crop, "device": args.device, "seconds": seconds,
          "miou_1_30": scores, "mean": sum(scores) / len(scores)}
(out / "result.json").write_text(json.dumps(result, indent=2))
print(json.dumps(result, indent=2))
