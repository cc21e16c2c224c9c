"""Issue-3 investigation: does a longer student close the gap to +5 mIoU at 1/30?

The camvid-cpu teacher (benchmarks/results/camvid-cpu/runs/teacher) distilled into a ResNet-18 for
EPOCHS epochs instead of 45, then fine-tuned at 1/30 with the recipe's cell settings (300 iterations,
seeds 0-2) and evaluated on val/. Resumable: finished runs are skipped.

    python benchmarks/experiments/student_epochs.py 90
"""

import json
import sys
from pathlib import Path

import dreamteacher as dt
from cells import miou_at_1_30, root

EPOCHS = int(sys.argv[1]) if len(sys.argv) > 1 else 90
bench = Path("benchmarks/results/camvid-cpu/runs")
out = Path(f"benchmarks/experiments/runs/student-{EPOCHS}ep")

student = out / "student"
if not (student / "run.json").is_file():
    dt.pretrain(root / "train", student, teacher=bench / "teacher" / "teacher", preset="camvid-cpu",
                optim={"epochs": EPOCHS}, resume=(student / "checkpoints" / "last.ckpt").is_file(), progress=False)
summary = json.loads((student / "run.json").read_text())
scores = miou_at_1_30(student / "backbone.safetensors", out)
result = {"student_epochs": EPOCHS, "student_seconds": summary["seconds"], "miou_1_30": scores,
          "mean": sum(scores) / len(scores)}
(out / "result.json").write_text(json.dumps(result, indent=2))
print(json.dumps(result, indent=2))
