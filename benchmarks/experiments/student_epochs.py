"""Issue-3 investigation: does a longer student close the gap to +5 mIoU at 1/30?

The bench's camvid-cpu teacher (BENCH/runs/teacher) distilled into a ResNet-18 for EPOCHS epochs
instead of 45, then fine-tuned at 1/30 with the recipe's cell settings (300 iterations, seeds 0-2)
and evaluated on val/. Resumable: finished runs are skipped.

    python benchmarks/experiments/student_epochs.py 90
    python benchmarks/experiments/student_epochs.py 180 --device gpu --bench OUT --data-root ROOT
"""

import argparse
import json
from pathlib import Path

import dreamteacher as dt
from cells import finished, interrupted, miou_at_1_30, root
from dreamteacher.bench.recipes import DEVICE_SETTINGS
from dreamteacher.core.config import deep_merge

parser = argparse.ArgumentParser()
parser.add_argument("epochs", type=int, nargs="?", default=90)
parser.add_argument("--device", default="cpu", choices=sorted(DEVICE_SETTINGS))
parser.add_argument("--bench", default="benchmarks/results/camvid-cpu", help="the bench whose teacher to use")
parser.add_argument("--data-root", default=str(root))
parser.add_argument("--out", default="benchmarks/experiments/runs")
args = parser.parse_args()

data_root = Path(args.data_root)
out = Path(args.out) / (f"student-{args.epochs}ep" + ("" if args.device == "cpu" else f"-{args.device}"))
student = out / "student"
if not finished(student):
    dt.pretrain(data_root / "train", student, teacher=Path(args.bench) / "runs" / "teacher" / "teacher",
                preset="camvid-cpu", overrides=deep_merge({"optim": {"epochs": args.epochs}}, DEVICE_SETTINGS[args.device]),
                resume=interrupted(student), progress=False)
summary = json.loads((student / "run.json").read_text())
scores = miou_at_1_30(student / "backbone.safetensors", out, device=args.device, data_root=data_root)
result = {"student_epochs": args.epochs, "device": args.device, "student_seconds": summary["seconds"],
          "miou_1_30": scores, "mean": sum(scores) / len(scores)}
(out / "result.json").write_text(json.dumps(result, indent=2))
print(json.dumps(result, indent=2))
