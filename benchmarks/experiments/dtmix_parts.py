"""Issue-4 investigation: where does dt-mix's gain go? Separates its two changes at 1/30.

The committed dt-mix row initializes backbone *and* decoder from the dt-mix run (G.4). Here the
dt-mix backbone is fine-tuned alone (decoder random, as dt-feat's row is): if this equals dt-feat,
label distillation did not change the backbone; the difference to the dt-mix row is then what the
decoder initialization did. Same cell settings as the recipe (300 iterations, seeds 0-2), val/ mIoU.
Needs the bench's dt-mix 1-30 run. Resumable: finished cells are skipped.

    python benchmarks/experiments/dtmix_parts.py
"""

import json
from pathlib import Path

from cells import miou_at_1_30

student = Path("benchmarks/results/camvid-cpu/runs/pretrain-dt-mix-1-30-seed0")
out = Path("benchmarks/experiments/runs/dtmix-backbone-only")
scores = miou_at_1_30(student / "backbone.safetensors", out)
result = {"dt_mix_backbone_only_miou_1_30": scores, "mean": sum(scores) / len(scores)}
(out / "result.json").write_text(json.dumps(result, indent=2))
print(json.dumps(result, indent=2))
