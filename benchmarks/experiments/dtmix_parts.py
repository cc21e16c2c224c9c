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

import dreamteacher as dt
from dreamteacher.bench.runner import load_recipe

recipe = load_recipe("camvid-cpu")
root = Path(recipe["data"]["root"])
student = Path("benchmarks/results/camvid-cpu/runs/pretrain-dt-mix-1-30-seed0")
out = Path("benchmarks/experiments/runs/dtmix-backbone-only")

scores = []
for seed in (0, 1, 2):
    cell = out / f"1-30-seed{seed}"
    if not (cell / "segmenter.json").is_file():
        dt.finetune(student / "backbone.safetensors", root / "train", root / "trainannot", cell,
                    split=root / recipe["data"]["splits"]["1-30"], preset="camvid-cpu",
                    overrides={"optim": {"iterations": recipe["iterations"]["1-30"]}, "trainer": {"seed": seed}},
                    resume=(cell / "checkpoints" / "last.ckpt").is_file(), progress=False)
    scores.append(dt.evaluate(cell, root / "val", root / "valannot").miou)
result = {"dt_mix_backbone_only_miou_1_30": scores, "mean": sum(scores) / len(scores)}
(out / "result.json").write_text(json.dumps(result, indent=2))
print(json.dumps(result, indent=2))
