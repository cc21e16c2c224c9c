"""Issue-6 investigation: does NormRescale (x0.25 on the LARS-trained conv weights, PCD section 4.1)
help or hurt the pcd row under the camvid-cpu cells' AdamW fine-tuning? The bench's pcd backbone
fine-tuned at 1/30 (seeds 0-2) without it, against the row's cells with it. Resumable.

    python benchmarks/experiments/pcd_normrescale.py [BENCH_OUT]
"""

import json
import sys
from pathlib import Path

from cells import miou_at_1_30

bench = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/camvid-cpu-contrastive")
out = Path("benchmarks/experiments/runs/pcd-without-normrescale")
scores = miou_at_1_30(bench / "runs" / "pretrain-pcd" / "backbone.safetensors", out,
                      overrides={"lab": {"norm_rescale": 1.0}})
with_rescale = [json.loads(next(cell.glob("eval-*.json")).read_text())["miou"]
                for cell in sorted((bench / "runs" / "cells" / "pcd--upernet").glob("1-30-seed*"))]
result = {"pcd_1_30_without_normrescale": scores, "mean_without": sum(scores) / len(scores),
          "pcd_1_30_with_normrescale": with_rescale, "mean_with": sum(with_rescale) / max(1, len(with_rescale))}
(out / "result.json").write_text(json.dumps(result, indent=2))
print(json.dumps(result, indent=2))
