#!/usr/bin/env bash
# Every command of the pipeline once on a CUDA GPU (CI has none), through the paths a user takes:
# plan first, a teacher and a student in micro-batches with gradient accumulation, precision auto,
# data from a folder (with a stray file in it), from a text file of paths and from tar shards, the
# feature cache, export, fine-tuning, the interpreter, dt-mix, DeP/DDeP and a resume. Small teacher
# and student on synthetic scenes. Exits non-zero at the first command that fails.
#   bash benchmarks/gpu-check.sh [WORK_DIR]        (ACCEL=cpu runs the same commands on the CPU: a dry run)
set -euo pipefail
work=${1:-$(mktemp -d)}
accel=${ACCEL:-gpu}
dt=(python3 -m dreamteacher.cli)
seg=(--num-classes 3 --ignore-index 255 --set data.resolution=[96,128] --set data.num_workers=2
     --set trainer.accelerator=$accel --set trainer.devices=1 --set trainer.precision=auto --no-progress)

ACCEL=$accel python3 - "$work" <<'PY'
import io, os, sys, tarfile
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import write_images, write_scenes
root = Path(sys.argv[1])
images = write_images(root / "unlabeled", count=64, size=(96, 128))
(images / "labels.csv").write_text("not an image: skipped and counted\n")
write_scenes(root / "labeled", count=16, size=(96, 128))
files = sorted(images.glob("*.png"))
(root / "list.txt").write_text("".join(f"{f}\n" for f in files))
(root / "shards").mkdir()
for s in range(4):  # the same images as 4 webdataset-style shards, in the same order
    with tarfile.open(root / "shards" / f"{s:06d}.tar", "w") as tar:
        for f in files[s * 16:(s + 1) * 16]:
            info = tarfile.TarInfo(f.name)
            info.size = f.stat().st_size
            tar.addfile(info, io.BytesIO(f.read_bytes()))
# the run's shared preset: teacher and student commands read their own sections of it
(root / "small.yaml").write_text(
    "base: cpu-small\n"
    "teacher_train: {max_steps: 40, micro_batch: 8, precision: auto}\n"
    "optim: {epochs: 2, warmup_epochs: 1, micro_batch: 8}\n"
    "data: {num_workers: 2}\n"
    f"trainer: {{accelerator: {os.environ['ACCEL']}, devices: 1, precision: auto, channels_last: false}}\n")
PY
small=(--preset "$work/small.yaml" --no-progress)
step() { echo "== $*"; }
step plan; "${dt[@]}" plan --data "$work/unlabeled" --cache "$work/cache" --out "$work/plan.json" --preset "$work/small.yaml"
step train-teacher in micro-batches of 8; "${dt[@]}" train-teacher --data "$work/unlabeled" --out "$work/teacher" "${small[@]}"
step pretrain dt-feat online; "${dt[@]}" pretrain --teacher "$work/teacher" --data "$work/unlabeled" --out "$work/dt-feat" "${small[@]}"
step pretrain dt-feat cached; "${dt[@]}" pretrain --teacher "$work/teacher" --data "$work/unlabeled" --out "$work/dt-feat-cached" --cache "$work/cache" "${small[@]}"
step pretrain from a list; "${dt[@]}" pretrain --teacher "$work/teacher" --data "$work/list.txt" --out "$work/dt-feat-list" "${small[@]}"
step pretrain from shards; "${dt[@]}" pretrain --teacher "$work/teacher" --data "$work/shards/{000000..000003}.tar" --out "$work/dt-feat-shards" "${small[@]}"
step export; "${dt[@]}" export "$work/dt-feat"
step finetune upernet; "${dt[@]}" finetune --backbone "$work/dt-feat/backbone.safetensors" --images "$work/labeled/images" --masks "$work/labeled/masks" --out "$work/ft" --set model.backbone=resnet18 --set optim.iterations=30 "${seg[@]}"
step evaluate; "${dt[@]}" evaluate "$work/ft" --images "$work/labeled/images" --masks "$work/labeled/masks"
step interpreter; "${dt[@]}" interpreter --teacher "$work/teacher" --images "$work/labeled/images" --masks "$work/labeled/masks" --out "$work/interp" --set encode.blocks=[0,2,4,6] --set optim.epochs=5 "${seg[@]}"
step evaluate interpreter; "${dt[@]}" evaluate "$work/interp" --images "$work/labeled/images" --masks "$work/labeled/masks"
step pretrain dt-mix; "${dt[@]}" pretrain --method dt-mix --interpreter "$work/interp" --data "$work/unlabeled" --out "$work/dt-mix" "${small[@]}"
step pretrain dep; "${dt[@]}" pretrain --method dep --data "$work/unlabeled" --out "$work/dep" "${small[@]}"
step export dep; "${dt[@]}" export "$work/dep"
step pretrain ddep; "${dt[@]}" pretrain --method ddep --encoder "$work/dt-feat/backbone.safetensors" --data "$work/unlabeled" --out "$work/ddep" "${small[@]}"
step finetune unet with the ddep decoder; "${dt[@]}" finetune --backbone "$work/dt-feat/backbone.safetensors" --decoder "$work/ddep/decoder.safetensors" --head unet --images "$work/labeled/images" --masks "$work/labeled/masks" --out "$work/ft-unet" --set model.backbone=resnet18 --set optim.iterations=30 "${seg[@]}"
step resume; "${dt[@]}" pretrain --data "$work/unlabeled" --out "$work/dt-feat" --resume --no-progress --set optim.max_steps=12
python3 - "$work" <<'PY'
import csv, json, sys
from pathlib import Path
root = Path(sys.argv[1])
def losses(run):  # the first part of a run (a resume keeps it as metrics.part0.csv)
    logs = root / run / "logs"
    path = logs / "metrics.part0.csv" if (logs / "metrics.part0.csv").is_file() else logs / "metrics.csv"
    return [round(float(r["train/loss"]), 4) for r in csv.DictReader(open(path)) if r.get("train/loss")]
folder, shards, listed = losses("dt-feat"), losses("dt-feat-shards"), losses("dt-feat-list")
print("gpu-check: folder, list and shard losses equal:", folder == shards == listed, folder[:4])
for run in ("teacher", "dt-feat", "dt-feat-cached", "dt-feat-shards"):
    r = json.loads((root / run / "run.json").read_text())
    print(f"gpu-check: {run}: {r['steps']} steps, {r['seconds']} s, {r['precision']}, peak {r['peak_memory_gib']} GiB")
PY
echo "gpu-check: every command ran on $(python3 -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "the CPU")')"
