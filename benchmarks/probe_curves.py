"""The live probe of every pretraining stage of a bench folder, against what the bench measured.

    python benchmarks/probe_curves.py [BENCH_DIR] [--set unseen] [--fraction 1-30]

Reads `runs/pretrain-*/logs/probe.jsonl` (written by every pretraining stage when the recipe has a
`probe:` section) and the folder's `results.json`; prints a markdown table of each stage's probe
(readout mIoU and effective rank at the start, at the end, and the best epoch) beside the mean
fine-tuning mIoU of its row at one label fraction on one evaluation set, says how many pairs of rows
the probe's final value orders as the fine-tuning does, and draws both curves of every stage to
BENCH_DIR/probe-curves.png. `scratch` is the randomly initialized student: dt-feat's epoch-0 probe.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dreamteacher.bench.report import summarize  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("bench", nargs="?", default="benchmarks/results/camvid-cpu")
parser.add_argument("--set", default="unseen", help="the evaluation set the fine-tuning scores come from")
parser.add_argument("--fraction", default="1-30")
parser.add_argument("--head", default="upernet", help="the fine-tuning head whose scores are compared")
args = parser.parse_args()

bench = Path(args.bench)
curves: dict[str, list[dict]] = {}
for log in sorted(bench.glob("runs/pretrain-*/logs/probe.jsonl")):
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    if records:
        # a per-fraction stage (dt-mix-1-30: its interpreter learned that fraction) is its row at that fraction
        curves[log.parents[1].name.removeprefix("pretrain-").removesuffix(f"-{args.fraction}")] = records
if not curves:
    raise SystemExit(f"no probe.jsonl under {bench}/runs/pretrain-*/logs/: run the bench with a recipe that has probe:")

results = json.loads((bench / "results.json").read_text())
finetuned = {s["method"]: s for s in summarize(results["rows"], args.set)
             if s["fraction"] == args.fraction and s["head"] == args.head}

rows = []
# scratch is the plain backbone at the recipe's seed: dt-feat's epoch 0 (a stage that builds it inside
# another network, dep's U-Net or dt-mix's UperNet, draws a different init)
first = (curves.get("dt-feat") or next(iter(curves.values())))[0]
if "scratch" in finetuned:
    rows.append(("scratch", first, first, first, finetuned["scratch"]))
for name, records in curves.items():
    best = max(records, key=lambda r: r.get("miou") or 0.0)
    rows.append((name, records[0], records[-1], best, finetuned.get(name)))


def value(record: dict, key: str) -> str:
    return "-" if record.get(key) is None else f"{record[key]:.2f}".rstrip("0").rstrip(".")


print(f"Probe (readout fitted on the 1/30 split's images, scored on `{args.set}/`) against the mean "
      f"{args.head} fine-tuning mIoU at {args.fraction} on `{args.set}/`:\n")
print("| row | probe mIoU: start -> end (best, epoch) | effective rank: start -> end | "
      f"fine-tuned {args.fraction} ({args.set}) |")
print("|---|---|---|---|")
for name, start, end, best, tuned in rows:
    probe = (f"{value(start, 'miou')} (random init)" if name == "scratch" else
             f"{value(start, 'miou')} -> {value(end, 'miou')} ({value(best, 'miou')}, {best['epoch']})")
    rank = (value(start, "effective_rank") if name == "scratch" else
            f"{value(start, 'effective_rank')} -> {value(end, 'effective_rank')}")
    tuned_text = f"{tuned['mean']:.1f} ({len(tuned['values'])} seeds)" if tuned else "-"
    print(f"| {name} | {probe} | {rank} | {tuned_text} |")

scored = [(name, end, tuned) for name, _, end, _, tuned in rows if tuned and end.get("miou") is not None]
pairs = list(itertools.combinations(scored, 2))
if pairs:
    def agree(key: str) -> int:
        return sum((a[1][key] - b[1][key]) * (a[2]["mean"] - b[2]["mean"]) > 0 for a, b in pairs)

    print(f"\nOf {len(pairs)} pairs of rows, the probe's final mIoU orders {agree('miou')} as the fine-tuning "
          f"does; the label-free effective rank orders {agree('effective_rank')}. Order by probe: "
          + " < ".join(n for n, _, _ in sorted(scored, key=lambda s: s[1]["miou"]))
          + "; by fine-tuning: " + " < ".join(n for n, _, _ in sorted(scored, key=lambda s: s[2]["mean"])) + ".")

fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), dpi=100)
for name, records in curves.items():
    epochs = [r["epoch"] for r in records]
    if records[0].get("miou") is not None:
        left.plot(epochs, [r["miou"] for r in records], "o-", ms=3, label=name)
    right.plot(epochs, [r["effective_rank"] for r in records], "o-", ms=3, label=name)
left.set(xlabel="pretraining epoch", ylabel=f"probe mIoU on {args.set}/", title="linear readout (12 labeled images)")
right.set(xlabel="pretraining epoch", ylabel="effective rank (RankMe)", title="label-free")
for ax in (left, right):
    ax.grid(True, alpha=0.3)
left.legend(fontsize=8)
fig.tight_layout()
fig.savefig(bench / "probe-curves.png")
print(f"\n![probe curves]({(bench / 'probe-curves.png').as_posix()})")
