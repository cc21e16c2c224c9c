#!/usr/bin/env bash
# Every command of the pipeline once on a CUDA GPU (CI has none): small teacher and student on
# synthetic scenes, bf16. Exits non-zero at the first command that fails; prints each run's figures.
#   bash benchmarks/gpu-check.sh [WORK_DIR]
set -euo pipefail
work=${1:-$(mktemp -d)}
dt=(python3 -m dreamteacher.cli)
gpu=(--no-progress --set trainer.accelerator=gpu --set trainer.devices=1 --set trainer.precision=bf16-mixed)
small=(--preset cpu-small --set teacher_train.max_steps=40 --set optim.epochs=2 --set optim.warmup_epochs=1)
seg=(--num-classes 3 --ignore-index 255 --set data.resolution=[96,128] --set data.num_workers=2)

python3 - "$work" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import write_images, write_scenes
root = Path(sys.argv[1])
write_images(root / "unlabeled", count=64, size=(96, 128))
write_scenes(root / "labeled", count=16, size=(96, 128))
PY
step() { echo "== $*"; }
step train-teacher; "${dt[@]}" train-teacher --data "$work/unlabeled" --out "$work/teacher" "${small[@]}" "${gpu[@]}"
step pretrain dt-feat online; "${dt[@]}" pretrain --teacher "$work/teacher" --data "$work/unlabeled" --out "$work/dt-feat" "${small[@]}" "${gpu[@]}"
step pretrain dt-feat cached; "${dt[@]}" pretrain --teacher "$work/teacher" --data "$work/unlabeled" --out "$work/dt-feat-cached" --cache "$work/cache" "${small[@]}" "${gpu[@]}"
step export; "${dt[@]}" export "$work/dt-feat"
step finetune upernet; "${dt[@]}" finetune --backbone "$work/dt-feat/backbone.safetensors" --images "$work/labeled/images" --masks "$work/labeled/masks" --out "$work/ft" --set model.backbone=resnet18 --set optim.iterations=30 "${seg[@]}" "${gpu[@]}"
step evaluate; "${dt[@]}" evaluate "$work/ft" --images "$work/labeled/images" --masks "$work/labeled/masks"
step interpreter; "${dt[@]}" interpreter --teacher "$work/teacher" --images "$work/labeled/images" --masks "$work/labeled/masks" --out "$work/interp" --set encode.blocks=[0,2,4,6] --set optim.epochs=5 "${seg[@]}" "${gpu[@]}"
step evaluate interpreter; "${dt[@]}" evaluate "$work/interp" --images "$work/labeled/images" --masks "$work/labeled/masks"
step pretrain dt-mix; "${dt[@]}" pretrain --method dt-mix --interpreter "$work/interp" --data "$work/unlabeled" --out "$work/dt-mix" "${small[@]}" "${gpu[@]}"
step pretrain dep; "${dt[@]}" pretrain --method dep --data "$work/unlabeled" --out "$work/dep" "${small[@]}" "${gpu[@]}"
step export dep; "${dt[@]}" export "$work/dep"
step pretrain ddep; "${dt[@]}" pretrain --method ddep --encoder "$work/dt-feat/backbone.safetensors" --data "$work/unlabeled" --out "$work/ddep" "${small[@]}" "${gpu[@]}"
step finetune unet with the ddep decoder; "${dt[@]}" finetune --backbone "$work/dt-feat/backbone.safetensors" --decoder "$work/ddep/decoder.safetensors" --head unet --images "$work/labeled/images" --masks "$work/labeled/masks" --out "$work/ft-unet" --set model.backbone=resnet18 --set optim.iterations=30 "${seg[@]}" "${gpu[@]}"
step resume; "${dt[@]}" pretrain --data "$work/unlabeled" --out "$work/dt-feat" --resume --no-progress --set optim.max_steps=12
echo "gpu-check: every command ran on $(python3 -c 'import torch; print(torch.cuda.get_device_name(0))')"
