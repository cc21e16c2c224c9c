"""Issue 27: which DreamTeacher settings carry the gain to scenes pretraining never saw?

Runs the camvid-cpu recipe's `dt-feat` row (or `--row dt-mix`, issue 28; or `--row teacher-interpreter`,
the feature interpreter as the segmenter; with `--untrained` also dt-feat's untrained-teacher control,
with `--scratch` also the from-scratch row) at 1/30 of the labels, seeds 0-2, with `--set` overrides on
the pretraining preset (student and distillation settings; `--teacher-set` for the teacher's own
training, which then trains a new teacher; `--interpreter-set` for the feature interpreters, which are
then trained anew; `--finetune-set` for every row's fine-tuning cells), and scores every cell on
`unseen/` (where settings are chosen) and on `val/` (reported). The recipe's own teacher, feature
caches, feature interpreters and students are reused from `--bench` (the camvid-cpu bench folder)
when the variant's settings leave them unchanged (a stage whose key differs is computed anew here,
the bench's own left alone). Resumable; the table is OUT/unseen-NAME/results.md.

    python benchmarks/experiments/unseen_settings.py baseline --untrained
    python benchmarks/experiments/unseen_settings.py t150 --set encode.t=150
    python benchmarks/experiments/unseen_settings.py crop --set lab.crop_scale=[0.35,1.0]
    python benchmarks/experiments/unseen_settings.py mix-ld16 --row dt-mix --set loss.ld_weight=16
    python benchmarks/experiments/unseen_settings.py interp-w256 --row teacher-interpreter --interpreter-set interpreter.width=256
    python benchmarks/experiments/unseen_settings.py ft-bb03 --scratch --finetune-set lab.backbone_lr_scale=0.3
"""

import argparse
import copy
import json
import sys
from pathlib import Path

import yaml

from cells import recipe, root
from dreamteacher.core.config import deep_merge
from dreamteacher.bench.runner import bench
from dreamteacher.core.config import parse_overrides

parser = argparse.ArgumentParser()
parser.add_argument("name", help="the work folder's name: OUT/unseen-NAME")
parser.add_argument("--set", dest="settings", nargs="*", default=[], metavar="KEY=VALUE",
                    help="pretraining overrides for the students (dt-feat and its control)")
parser.add_argument("--teacher-set", dest="teacher_settings", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides of the teacher's training (a new teacher is trained)")
parser.add_argument("--interpreter-set", dest="interpreter_settings", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides of the feature interpreters (teacher-interpreter and dt-mix; trained anew)")
parser.add_argument("--finetune-set", dest="finetune_settings", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides of every row's fine-tuning cells (the students are reused)")
parser.add_argument("--row", default="dt-feat", choices=["dt-feat", "dt-mix", "teacher-interpreter"],
                    help="the row the settings are for")
parser.add_argument("--untrained", action="store_true", help="also the dt-feat-untrained control row")
parser.add_argument("--scratch", action="store_true", help="also the from-scratch row (for --finetune-set)")
parser.add_argument("--fractions", default="1-30")
parser.add_argument("--bench", default="benchmarks/results/camvid-cpu", help="where the recipe's teacher is")
parser.add_argument("--data-root", default=str(root))
parser.add_argument("--out", default="benchmarks/experiments/runs")
args = parser.parse_args()

out = Path(args.out) / f"unseen-{args.name}"
spec = copy.deepcopy(recipe)
spec["name"] = f"camvid-cpu, experiment {args.name}"
students = parse_overrides(args.settings)
teachers = parse_overrides(args.teacher_settings)
spec["pretrain_overrides"] = deep_merge(spec.get("pretrain_overrides") or {}, teachers)
spec["interpreter_overrides"] = deep_merge(spec.get("interpreter_overrides") or {},
                                            parse_overrides(args.interpreter_settings))
spec["finetune_overrides"] = deep_merge(spec.get("finetune_overrides") or {},
                                         parse_overrides(args.finetune_settings))
overrides = spec.setdefault("method_overrides", {})
for row in (args.row, "dt-feat-untrained"):  # the students' settings, not the teacher's
    overrides[row] = deep_merge(overrides.get(row) or {}, students)
spec["rows"] = [{"method": args.row, "head": "interpreter" if args.row == "teacher-interpreter" else "upernet"}]
if args.untrained:
    spec["rows"].append({"method": "dt-feat-untrained", "head": "upernet"})
if args.scratch:
    spec["rows"].insert(0, {"method": "scratch", "head": "upernet"})
out.mkdir(parents=True, exist_ok=True)
recipe_file = out / "recipe.yaml"
recipe_file.write_text(yaml.safe_dump(spec, sort_keys=False))

runs = out / "runs"
runs.mkdir(exist_ok=True)
shared = Path(args.bench) / "runs"
names = [] if teachers else ["teacher", "teacher-untrained"]  # a teacher setting changes both keys
interpreters = [] if teachers or args.interpreter_settings else sorted(shared.glob("interpreters/*"))
if interpreters:
    (runs / "interpreters").mkdir(exist_ok=True)
students = sorted(shared.glob("pretrain-*"))  # each stage's key says whether the variant changed it
for folder in sorted(shared.glob("cache-*")) + [shared / n for n in names] + interpreters + students:
    link = runs / folder.relative_to(shared)
    finished = (folder / "stage.json").is_file()
    if finished and not link.exists():  # a stage whose key differs is recomputed in place of the link
        link.symlink_to(folder.resolve(), target_is_directory=True)

result = bench(recipe_file, out, data_root=args.data_root, fractions=args.fractions.split(","), progress=False)
summary = json.loads(result.files["json"].read_text())["summary"]
report = {name: {f"{s['method']} {s['fraction']}": [round(s["mean"], 2), s["values"]] for s in rows}
          for name, rows in summary.items()}
report["settings"], report["teacher_settings"] = args.settings, args.teacher_settings
report["interpreter_settings"] = args.interpreter_settings
report["finetune_settings"] = args.finetune_settings
(out / "result.json").write_text(json.dumps(report, indent=2))
json.dump(report, sys.stdout, indent=2)
print()
