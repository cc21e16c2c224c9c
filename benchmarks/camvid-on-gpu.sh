#!/usr/bin/env bash
# The whole camvid-cpu recipe on one CUDA GPU (`bench --device gpu`): the pretraining stages one after
# another (their wall-clocks are taken alone), then the fine-tuning cells in four bench processes that
# share the GPU (cells are independent; their stages are cached under OUT/runs), then one pass that
# writes the table. Optionally the issue-3 experiment (a longer student) when STUDENT_EPOCHS is set.
#   bash benchmarks/camvid-on-gpu.sh OUT [DATA_ROOT]
set -euo pipefail
out=$(realpath -m "${1:?usage: camvid-on-gpu.sh OUT [DATA_ROOT]}")
root=$(realpath "${2:-../shared/data/camvid}")
bench=(python3 -m dreamteacher.cli bench camvid-cpu --device gpu --out "$out" --data-root "$root" --no-progress)
mkdir -p "$out/logs"

# pretraining only (no cell has seed -1), in recipe order, one stage at a time
"${bench[@]}" --seeds -1 > "$out/logs/pretrain.log" 2>&1

# the cells: four processes, each on its own rows
groups=("scratch:unet,dep:unet" "dt-feat:unet,dt-feat+ddep:unet" \
        "scratch:upernet,dt-feat:upernet,dt-feat-untrained:upernet" \
        "teacher-interpreter:interpreter,dt-mix:upernet,scratch:readout,dt-feat:readout,dt-feat-untrained:readout")
pids=()
for i in "${!groups[@]}"; do
  "${bench[@]}" --rows "${groups[$i]}" > "$out/logs/cells-$i.log" 2>&1 &
  pids+=($!)
done
if [ -n "${STUDENT_EPOCHS:-}" ]; then
  (cd benchmarks/experiments && python3 student_epochs.py "$STUDENT_EPOCHS" --device gpu --bench "$out" \
     --data-root "$root" --out "$out/experiments") > "$out/logs/student-$STUDENT_EPOCHS.log" 2>&1 &
  pids+=($!)
fi
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done

# every cell is finished: this pass only tabulates
"${bench[@]}" > "$out/logs/table.log" 2>&1
exit $status
