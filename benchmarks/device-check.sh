#!/usr/bin/env bash
# What a lent GPU machine runs for the project (the device tool: one H100/H200, nothing installed
# but torch, lightning and timm; the missing wheels carried in .whl/): plan-check.sh, then
# gpu-check.sh, their outputs copied to $OUT.
#   bash benchmarks/device-check.sh plan|gpu
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, lightning, timm; print('torch', torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"
case "$1" in
  plan) bash benchmarks/plan-check.sh /tmp/plan-check 2>&1 | tee "$OUT/plan-check.log"
        cp /tmp/plan-check/plan-check.json "$OUT/" 2>/dev/null ;;
  gpu) bash benchmarks/gpu-check.sh /tmp/gpu-check 2>&1 | tee "$OUT/gpu-check.log"
       cp /tmp/gpu-check/plan.json "$OUT/gpu-check-plan.json" 2>/dev/null ;;
esac
