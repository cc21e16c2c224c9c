#!/usr/bin/env bash
# Regenerates the GPU speed figures of issue 8 on one CUDA GPU: ResNet-50 student + ADM-256-sized
# teacher (the imagenet preset's U-Net, untrained: same cost) at 256x256, early exit at block 12.
#   bash benchmarks/speed-gpu.sh [OUT_DIR] [VARIANT...]
# Variants (each one JSON in OUT_DIR): bf16-cl (the fast path: bf16 autocast + channels-last,
# written as speed-gpu.json), fp32, bf16, bf16-cl-compile. Default: all.
set -euo pipefail
out=${1:-benchmarks/results}; shift || true
variants=${*:-bf16-cl fp32 bf16 bf16-cl-compile}
batch=${BATCH:-64}   # per GPU (timing the parts keeps all its batches' teacher features on the GPU)
steps=${STEPS:-8}
work=${WORK:-$(mktemp -d)}
mkdir -p "$out"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

# one teacher and one image folder for every variant (building ADM-256 takes a while)
if [ ! -d "$work/teacher/teacher" ]; then
  python3 -c "from dreamteacher.api import untrained_teacher; untrained_teacher('$work/teacher', 'imagenet')"
fi
if [ ! -d "$work/images" ]; then
  python3 -c "from pathlib import Path; from dreamteacher.bench.speed import write_scenes; write_scenes(Path('$work/images'), $batch * $steps)"
fi

common=(--preset imagenet --device cuda --teacher "$work/teacher" --data "$work/images" --steps "$steps" --no-cache
        --no-progress --set optim.batch_size=$batch --set data.num_workers=8)
for variant in $variants; do
  case $variant in
    bf16-cl) name=speed-gpu.json; sets=(--set trainer.precision=bf16-mixed --set trainer.channels_last=true) ;;
    fp32) name=speed-gpu-fp32.json; sets=(--set trainer.precision=32-true) ;;
    bf16) name=speed-gpu-bf16.json; sets=(--set trainer.precision=bf16-mixed) ;;
    bf16-cl-compile) name=speed-gpu-bf16-cl-compile.json
      sets=(--set trainer.precision=bf16-mixed --set trainer.channels_last=true --set trainer.compile=true) ;;
    *) echo "unknown variant: $variant" >&2; exit 2 ;;
  esac
  echo "== $variant"
  python3 -m dreamteacher.cli bench-speed "${common[@]}" "${sets[@]}" --out "$out/$name"
done
