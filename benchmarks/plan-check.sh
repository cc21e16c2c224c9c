#!/usr/bin/env bash
# Does `dreamteacher plan` say what a run costs? The ResNet-50 + ADM-256 preset at 256 px on this GPU:
# plan's time per step and peak memory against those of real runs of the same settings (a teacher of
# 30 steps, global batch 64 = 32 per device x 2 accumulated; a student of 20 steps, global batch 256 =
# 64 x 4, from the feature cache). Target: within 25%. Prints both and writes plan-check.json.
#   bash benchmarks/plan-check.sh [WORK_DIR]
# (PRESET=... SETTINGS="--set ..." COUNT=N: another preset, e.g. a dry run of the script on the CPU)
set -euo pipefail
work=${1:-$(mktemp -d)}
dt=(python3 -m dreamteacher.cli)
preset=(--preset "${PRESET:-r50-adm256-256px-64pd}" --set data.num_workers=8 ${SETTINGS:-})
python3 - "$work" "${COUNT:-512}" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
sys.path.insert(0, ".")
from dreamteacher.bench.speed import write_scenes
write_scenes(Path(sys.argv[1]) / "images", int(sys.argv[2]))  # 480x360 JPEGs: decoded and resized as camera frames
PY
teacher=(--set teacher_train.batch_size=${TEACHER_BATCH:-64} --set teacher_train.max_steps=${TEACHER_STEPS:-30}
         --set teacher_train.warmup_steps=5)
student=(--set optim.batch_size=${STUDENT_BATCH:-256} --set optim.max_steps=${STUDENT_STEPS:-20})
"${dt[@]}" plan --data "$work/images" --out "$work/plan.json" --cache "$work/cache" "${preset[@]}" "${teacher[@]}" "${student[@]}" --no-progress
"${dt[@]}" train-teacher --data "$work/images" --out "$work/teacher" "${preset[@]}" "${teacher[@]}" --no-progress
"${dt[@]}" pretrain --teacher "$work/teacher" --data "$work/images" --out "$work/student" --cache "$work/cache" "${preset[@]}" "${student[@]}" --no-progress
python3 - "$work" <<'PY'
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
plan = json.loads((root / "plan.json").read_text())
stages = {s["name"]: s for s in plan["stages"]}
rows = []
for name, run in (("train-teacher --kind ddpm", "teacher"), ("--method dt-feat", "student")):
    s, r = stages[name], json.loads((root / run / "run.json").read_text())
    planned = s["accumulate"] * s["seconds_per_micro_step"]
    measured = r["seconds"] / r["steps"]
    rows.append({"stage": name, "micro_batch": s["micro_batch"], "accumulate": s["accumulate"],
                 "planned_s_per_step": round(planned, 3), "measured_s_per_step": round(measured, 3),
                 "time_error": round(planned / measured - 1, 3), "planned_peak_gib": s["peak_memory_gib"],
                 "measured_peak_gib": r["peak_memory_gib"],
                 "memory_error": round(s["peak_memory_gib"] / r["peak_memory_gib"] - 1, 3),
                 "gflops_per_image": s["gflops_per_image"], "precision": r["precision"]})
    print(json.dumps(rows[-1]))
(root / "plan-check.json").write_text(json.dumps({"plan": plan, "check": rows}, indent=2))
PY
