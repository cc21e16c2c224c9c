"""Benchmark tables: results.json (every cell), results.md (Table 14 of DreamTeacher: mean and spread
over seeds per method and label fraction) and results.png (mIoU against labeled images, Fig. 2 of the
denoising-pretraining paper)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from dreamteacher.core.runs import write_text_atomic

FRACTION_ORDER = ("1-30", "1-8", "1-4", "full")
FRACTION_LABEL = {"1-30": "1/30", "1-8": "1/8", "1-4": "1/4", "full": "all"}


def eval_set_names(meta: dict, rows: list[dict]) -> list[str]:
    """The evaluation sets of a table, primary first: the bench's, then any only older cells have."""
    names = list((meta.get("data") or {}).get("eval_sets") or {})
    for row in rows:
        names += [name for name in cell_scores(row, names) if name not in names]
    return names


def cell_scores(cell: dict, names: list[str] | None = None) -> dict[str, dict]:
    """A cell's scores per evaluation set. Cells written before benches scored several sets hold
    one set's (`miou`, `per_class`): CamVid's `val`, the only one they were scored on."""
    if "scores" in cell:
        return cell["scores"]
    return {"val": {k: cell[k] for k in ("miou", "per_class", "pixel_accuracy") if k in cell}}


def summarize(rows: list[dict], eval_set: str | None = None) -> list[dict]:
    """One entry per (method, head, fraction) that has scores on `eval_set` (None: each cell's primary
    `miou`): mean, sample std and count of mIoU over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if eval_set is None or eval_set in cell_scores(row):
            groups.setdefault((row["method"], row["head"], row["fraction"]), []).append(row)
    out = []
    for (method, head, fraction), cells in groups.items():
        values = [c["miou"] if eval_set is None else cell_scores(c)[eval_set]["miou"] for c in cells]
        out.append({"method": method, "head": head, "fraction": fraction, "labeled": cells[0]["labeled"],
                    "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "seeds": sorted(c["seed"] for c in cells), "values": values,
                    "pretrain_seconds": cells[0]["pretrain_seconds"],
                    "pretrain_epochs": cells[0]["pretrain_epochs"],
                    "initialized": cells[0].get("initialized", "none" if method == "scratch" else "backbone"),
                    "inference_gflops": cells[0].get("inference_gflops")})
    return out


def _row_keys(summary: list[dict]) -> list[tuple[str, str]]:
    keys: list[tuple[str, str]] = []
    for s in summary:
        if (s["method"], s["head"]) not in keys:
            keys.append((s["method"], s["head"]))
    return keys


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds else "-"


def _unscored_line(summary_all: list[dict], primary: list[dict], fractions: list[str], name: str) -> list[str]:
    """The rows (method / head, fractions) that other sets score and `name` does not: cells carried over
    from before `name` was an evaluation set, whose work folders are gone, so only re-running the
    row scores it here. Said under the primary table so that no reader takes a missing row for a loss."""
    scored = {(s["method"], s["head"], s["fraction"]) for s in primary}
    missing: dict[tuple[str, str], set[str]] = {}
    for s in summary_all:
        if (s["method"], s["head"], s["fraction"]) not in scored:
            missing.setdefault((s["method"], s["head"]), set()).add(s["fraction"])
    if not missing:
        return []
    listed = "; ".join(f"{method} / {head} ({', '.join(FRACTION_LABEL[f] for f in fractions if f in fs)})"
                       for (method, head), fs in missing.items())
    return ["", f"Not scored on `{name}` yet: {listed}. Their cells predate `{name}` and their work folders are "
            "gone; re-running those rows (`--rows METHOD:HEAD --fractions ...`) scores them on every set."]


def _eval_text(meta: dict, names: list[str]) -> str:
    data = meta.get("data") or {}
    sets = data.get("eval_sets") or ({Path(data["eval_images"]).name: {"images": data["eval_images"]}}
                                     if data.get("eval_images") else {})  # a table of one set, written before
    parts = []
    for name in names:
        s = sets.get(name)
        if s is None:  # only carried-over cells have it
            parts.append(f"`{name}` (older cells only)")
            continue
        about = f": {s['about']}" if s.get("about") else ""
        parts.append(f"`{name}` (`{s['images']}`{about})")
    return "; ".join(parts)


def _score_table(summary: list[dict], fractions: list[str], labeled: dict, details: bool) -> list[str]:
    """The mean ± std table of one evaluation set; `details` adds what each row is and costs."""
    by_key = {(s["method"], s["head"], s["fraction"]): s for s in summary}
    head = "| method | head | " + ("initialized | GFLOPs/img | pretrain wall-clock | pretrain epochs | " if details else "")
    lines = [head + " | ".join(f"{FRACTION_LABEL[f]} ({labeled[f]} img)" for f in fractions) + " |",
             "|---|---|" + ("---|---|---|---|" if details else "") + "---|" * len(fractions)]
    for method, head_name in _row_keys(summary):
        cells = []
        for f in fractions:
            s = by_key.get((method, head_name, f))
            cells.append("" if s is None else f"{s['mean']:.1f} ± {s['std']:.1f} ({len(s['seeds'])})")
        first = next(s for s in summary if (s["method"], s["head"]) == (method, head_name))
        extra = ""
        if details:
            gflops = first.get("inference_gflops")
            extra = (f"{first['initialized']} | {gflops if gflops is not None else '-'} | "
                     f"{_minutes(first['pretrain_seconds'])} | {first['pretrain_epochs'] or '-'} | ")
        lines.append(f"| {method} | {head_name} | {extra}" + " | ".join(cells) + " |")
    return lines


def gains_over_scratch(rows: list[dict], names: list[str]) -> dict[tuple[str, str], dict[str, dict[str, float]]]:
    """(method, head) -> fraction -> set -> mean mIoU minus scratch's with the same head (mean over each
    row's seeds), for every row and fraction that has a scratch counterpart on that set."""
    gains: dict = {}
    for name in names:
        by_key = {(s["method"], s["head"], s["fraction"]): s["mean"] for s in summarize(rows, name)}
        for (method, head, fraction), mean in by_key.items():
            base = by_key.get(("scratch", head, fraction))
            if method != "scratch" and base is not None:
                gains.setdefault((method, head), {}).setdefault(fraction, {})[name] = mean - base
    return gains


def _gain_table(rows: list[dict], names: list[str], fractions: list[str]) -> list[str]:
    gains = gains_over_scratch(rows, names)
    if not gains:
        return []
    sets = " / ".join(f"`{n}`" for n in names)
    lines = ["", f"## Gain over scratch with the same head (mIoU, mean over seeds: {sets})", ""]
    ratio = len(names) > 1
    header = "| method | head | " + " | ".join(FRACTION_LABEL[f] for f in fractions)
    if ratio:
        header += f" | `{names[0]}` gain / `{names[1]}` gain at {FRACTION_LABEL[fractions[0]]}"
    lines += [header + " |", "|---|---|" + "---|" * (len(fractions) + ratio)]
    for (method, head), per_fraction in gains.items():
        cells = []
        for f in fractions:
            values = per_fraction.get(f, {})
            cells.append(" / ".join(f"{values[n]:+.1f}" if n in values else "-" for n in names))
        if ratio:
            first = per_fraction.get(fractions[0], {})
            a, b = first.get(names[0]), first.get(names[1])
            cells.append(f"{a / b:.0%}" if a is not None and b is not None and b > 0 else "-")
        lines.append(f"| {method} | {head} | " + " | ".join(cells) + " |")
    return lines


def markdown_table(meta: dict, rows: list[dict]) -> str:
    names = eval_set_names(meta, rows)
    summary_all = summarize(rows)
    fractions = [f for f in FRACTION_ORDER if any(s["fraction"] == f for s in summary_all)]
    labeled = {s["fraction"]: s["labeled"] for s in summary_all}
    pre, fine = meta["pretrain"], meta["finetune"]
    chosen = meta.get("settings_chosen_on")
    unlabeled = meta["data"]["unlabeled"]
    unlabeled = unlabeled if isinstance(unlabeled, list) else [unlabeled]
    lines = [
        f"# Benchmark `{meta['recipe']}`",
        "",
        f"- Data: unlabeled pretraining images {' + '.join(f'`{u}/`' for u in unlabeled)} of `{meta['data']['root']}`; "
        f"fine-tuning labels from the splits {', '.join(f'`{v}`' for v in meta['data']['splits'].values())}; "
        f"evaluation (mIoU over classes, at label resolution) on {_eval_text(meta, names)}.",
    ]
    if chosen:
        others = ", ".join(f"`{n}`" for n in names if n != chosen)
        lines.append(f"- Settings are chosen on `{chosen}` scores only" + (f"; {others} is reported, never chosen on."
                                                                         if others else "."))
    if meta.get("settings_from"):
        lines.append(f"- Settings: {meta['settings_from']}")
    if meta.get("pretrain_steps_for_images"):
        lines.append(f"- Every pretraining stage runs the optimizer steps of its epochs over "
                     f"{meta['pretrain_steps_for_images']} images, whatever the number of images here.")
    lines += [
        f"- Resolution: {meta['image_size'][0]}x{meta['image_size'][1]} (pretraining "
        f"{pre['resolution'][0]}x{pre['resolution'][1]}); backbone {meta['backbone']}.",
        f"- Pretraining (`{pre['preset']}` preset"
        + (f"; students of a diffusion teacher read the offline feature cache, {pre['cache_encodings']} encodings "
           "per image" if pre.get("cache_encodings") else "") + "): "
        + "; ".join(meta.get("stages", [])) + ".",
        f"- Fine-tuning (`{fine['preset']}` preset): iterations per fraction {fine['iterations']}, batch "
        f"{fine['batch_size']}, {fine['optimizer']} lr {fine['lr']}, UperNet width {fine['decoder_channels']}; "
        f"seeds per fraction {meta['seeds']}.",
        f"- Machine: {meta['machine']['cpus']} CPU threads"
        + (f" ({meta['machine']['cpu']}, bf16 {meta['machine'].get('cpu_bf16')})" if meta['machine'].get('cpu') else "")
        + (f", {meta['machine']['cuda']}" if meta['machine'].get('cuda') else ", no GPU")
        + f", torch {meta['machine']['torch']}; every stage ran on the {meta.get('device', 'cpu').upper()}. Cells are "
        "bit-identical on the same CPU kind only: another CPU gives other digits (and, without native bf16, an fp32 "
        "teacher).",
        "",
        "mIoU (0-100), mean ± sample std over seeds (number of seeds in brackets), one table per evaluation "
        "set. `upernet` and `unet` "
        "fine-tune the whole network; `readout` trains a linear 1x1 conv on the frozen backbone. "
        "`initialized`: the parts that start from pretrained weights (the rest from random init); "
        "`teacher+interpreter` is the teacher with a feature interpreter as the segmenter, no student. "
        "`GFLOPs/img`: the segmenter's forward cost on one image at the fine-tuning resolution.",
    ]
    for i, name in enumerate(names):
        summary = summarize(rows, name)
        if not summary:
            continue
        lines += ["", f"## mIoU on `{name}`" + (" (the primary set)" if i == 0 and len(names) > 1 else ""), ""]
        lines += _score_table(summary, fractions, labeled, details=i == 0)
        if i == 0 and len(names) > 1:
            lines += _unscored_line(summary_all, summary, fractions, name)
    lines += _gain_table(rows, names, fractions)
    class_names = meta.get("class_names")
    if class_names and rows:
        for name in names:
            cells_of = [r for r in rows if name in cell_scores(r)]
            keys = _row_keys(summarize(cells_of))
            lines += ["", f"Per-class IoU on `{name}` at {FRACTION_LABEL[fractions[0]]} of the labels (mean over seeds):",
                      "", "| method | head | " + " | ".join(class_names) + " |", "|---|---|" + "---|" * len(class_names)]
            for method, head in keys:
                cells = [cell_scores(r)[name] for r in cells_of
                         if (r["method"], r["head"], r["fraction"]) == (method, head, fractions[0])]
                if not cells:
                    continue
                means = [_mean_present([c["per_class"][i] for c in cells]) for i in range(len(class_names))]
                lines.append(f"| {method} | {head} | "
                             + " | ".join("n/a" if math.isnan(v) else f"{v:.1f}" for v in means) + " |")
    carried = sum(1 for row in rows if row.get("carried_over"))
    if carried:
        lines += ["", f"{carried} cells carried over from the previous results.json: their work folders were not "
                  "on disk when this table was written (`carried_over` in results.json)."]
    command = meta.get("command") or f"dreamteacher bench {meta['recipe']} --out DIR"
    lines += ["", f"Regenerate: `{command}` (finished cells are reused)."]
    return "\n".join(lines) + "\n"


def _mean_present(values: list[float | None]) -> float:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(present) if present else math.nan


def plot(rows: list[dict], path: Path, title: str, names: list[str]) -> None:
    """mIoU against labeled images, one panel per evaluation set (same y axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in names if summarize(rows, n)]
    fig, axes = plt.subplots(1, len(names), figsize=(6.4 * len(names), 4.4), dpi=120, sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        summary = summarize(rows, name)
        for method, head in _row_keys(summary):
            points = sorted((s for s in summary if (s["method"], s["head"]) == (method, head)),
                            key=lambda s: s["labeled"])
            ax.errorbar([p["labeled"] for p in points], [p["mean"] for p in points], yerr=[p["std"] for p in points],
                        marker="o", capsize=3, linestyle="-" if head != "readout" else "--", label=f"{method} ({head})")
        ax.set_xscale("log")
        counts = sorted({s["labeled"] for s in summary})
        ax.set_xticks(counts, [str(c) for c in counts])  # the label counts themselves, not powers of ten
        ax.minorticks_off()
        ax.set_xlabel("labeled training images")
        ax.set_title(f"{title}, on {name}")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("mIoU")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def write_results(out: Path, meta: dict, rows: list[dict]) -> dict[str, Path]:
    files = {"json": out / "results.json", "md": out / "results.md", "png": out / "results.png"}
    names = eval_set_names(meta, rows)
    payload = {**meta, "rows": rows, "summary": {name: summarize(rows, name) for name in names}}
    for key, text in (("json", json.dumps(payload, indent=2)), ("md", markdown_table(meta, rows))):
        write_text_atomic(files[key], text)
    if rows:
        plot(rows, files["png"], f"{meta['recipe']}: {meta['backbone']}, {meta['image_size'][0]}x{meta['image_size'][1]}",
             names)
    return files

