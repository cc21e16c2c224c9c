"""Which bench stages and cells would a code change recompute? Prints the key of every stage and cell
of a recipe (nothing is trained: each stage's work is replaced by a stub that returns its key). Run it
in two checkouts and compare the lines: equal keys mean finished work is reused.

    python benchmarks/experiments/stage_keys.py camvid-cpu [OUT]
"""
import sys
from pathlib import Path

from dreamteacher.bench import cells, runner, stages

recipe = sys.argv[1]
out = Path(sys.argv[2] if len(sys.argv) > 2 else "/tmp/stage-keys")
keys: list[tuple[str, str]] = []


def stub(self, allow_run=True):
    keys.append((str(self.folder.relative_to(out.resolve() / "runs")), self.key))
    return {"key": self.key, "done": True, "seconds": 0.0, "steps": 0, "epochs": 0, "iterations": 0, "labeled": 0,
            "teacher": str(self.folder / "teacher"), "backbone": str(self.folder / "backbone.safetensors"),
            "cache": str(self.folder / "features"), "interpreter": str(self.folder), "run": str(self.folder),
            "initialized": "none"}


stages.Stage.result = stub
cells.score = lambda *a, **k: {"miou": 0.0, "per_class": [], "pixel_accuracy": 0.0, "scores": {}, "inference_gflops": 0}
runner.write_results = lambda out, meta, rows: {"md": out / "results.md"}
runner.bench(recipe, out, progress=False)
for folder, key in sorted(set(keys)):
    print(folder, key)
