"""Does a code change alter results? The camvid-cpu pipeline shortened (teacher TS steps, feature
cache, dt-feat student SE epochs, one 1/30 cell of 5 iterations, seed 0), run in the code of the
working directory; prints a hash of every weight and feature file it made and the cell's mIoU.
Run it in two checkouts (e.g. `git worktree add`) and compare the lines.

    TS=60 SE=12 python benchmarks/experiments/short_pipeline_hashes.py OUT [probe]

`probe` keeps the recipe's live probe on (it must change nothing).
"""
import glob
import hashlib
import json
import os
import sys
from pathlib import Path

import yaml

from dreamteacher.bench.runner import bench

try:
    from dreamteacher.bench.recipes import load_recipe
except ImportError:  # checkouts before the bench was split into modules (4f335e8 and older)
    from dreamteacher.bench.runner import load_recipe

out = Path(sys.argv[1])
probe = len(sys.argv) > 2 and sys.argv[2] == "probe"
spec = load_recipe("camvid-cpu")
teacher_steps, student_epochs = int(os.environ.get("TS", 20)), int(os.environ.get("SE", 2))
spec["pretrain_overrides"] = {**(spec.get("pretrain_overrides") or {}),
                              "teacher_train": {"max_steps": teacher_steps, "warmup_steps": 5}}
spec.setdefault("method_overrides", {})["dt-feat"] = {"optim": {"epochs": student_epochs, "warmup_epochs": 1}}
spec["iterations"] = {k: 5 for k in spec["iterations"]}
spec["seeds"] = {k: [0] for k in spec["seeds"]}
spec["rows"] = [{"method": "dt-feat", "head": "upernet"}]
if not probe:
    spec.pop("probe", None)
spec["data"]["root"] = str(Path(os.environ.get("DATA_ROOT", "../shared/data/camvid")).resolve())
out.mkdir(parents=True, exist_ok=True)
(out / "recipe.yaml").write_text(yaml.safe_dump(spec))
bench(out / "recipe.yaml", out, fractions=["1-30"], progress=False)


def digest(path: str) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:12]


files = sorted(glob.glob(str(out / "runs/**/*.safetensors"), recursive=True)) + \
    sorted(glob.glob(str(out / "runs/**/*.npy"), recursive=True))
for f in files:  # backbone.safetensors carries its run's path in the metadata: compare the cell's weights
    print(f.replace(str(out), ""), digest(f))
print(json.dumps([row["miou"] for row in json.loads((out / "results.json").read_text())["rows"]]))
