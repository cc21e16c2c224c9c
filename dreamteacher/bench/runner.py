"""`dreamteacher bench RECIPE`: pretrain every row's backbone, fine-tune it at every label fraction and
seed, evaluate on every evaluation set, and tabulate.

Work lives under `OUT/runs/`: one folder per pretraining stage and per fine-tuning cell, each keyed on
its inputs (bench/stages.py), so a killed bench continues where it stopped and a changed recipe
recomputes exactly what it touches.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dreamteacher.bench.cells import INTERPRETER_HEAD, SCRATCH, cell
from dreamteacher.bench.pipeline import per_fraction, stage
from dreamteacher.bench.recipes import (
    DEVICE_SETTINGS,
    FRACTIONS,
    Bench,
    cell_key,
    check_labels,
    eval_sets,
    load_recipe,
    row_key,
    select,
)
from dreamteacher.bench.report import write_results
from dreamteacher.core.config import build_config
from dreamteacher.core.errors import UserError
from dreamteacher.core.hardware import machine_summary
from dreamteacher.methods.base import METHODS, TEACHER_TRAINERS
from dreamteacher.workflows.finetune import build_finetune_config

SCRATCH_ROW = "scratch"  # a row without pretraining: the backbone starts from random init


@dataclass
class BenchResult:
    out: Path
    rows: list[dict]
    files: dict[str, Path]


def bench(recipe: str | Path, out: str | Path, eval_images: str | Path | None = None,
          eval_masks: str | Path | None = None, data_root: str | Path | None = None,
          rows: list[str] | None = None, fractions: list[str] | None = None, seeds: list[int] | None = None,
          progress: bool = True, device: str = "cpu") -> BenchResult:
    """Run (or continue) every selected cell of `recipe`; write OUT/results.{json,md,png}.

    `rows` selects by method (`dt-feat`) or method:head (`dt-feat:readout`). The results files always
    cover every finished cell of the recipe, including cells from earlier invocations (from their work
    folders, or from the previous results.json for rows not selected now). `device` (cpu, gpu) is where
    every stage runs. `eval_images` / `eval_masks`: one more evaluation set beside the recipe's.
    """
    spec = load_recipe(recipe)
    if device not in DEVICE_SETTINGS:
        raise UserError(f"--device must be one of {', '.join(DEVICE_SETTINGS)}, got '{device}'")
    if device == "gpu" and not torch.cuda.is_available():
        raise UserError("--device gpu: no CUDA GPU is visible to torch on this machine")
    out = Path(out)
    root = Path(data_root) if data_root else Path(spec["data"]["root"])
    if not root.is_dir():
        raise UserError(f"recipe data root not found: {root} (set --data-root)")
    if (eval_images is None) != (eval_masks is None):
        raise UserError("--eval-images and --eval-masks go together")
    bench_ = Bench(spec, out, root, eval_sets(spec, root, eval_images, eval_masks), progress, device)
    row_ids = [":".join(row_key(r)) for r in spec["rows"]]
    wanted_rows = [r for r, rid in zip(spec["rows"], row_ids) if not rows or rid in rows or r["method"] in rows]
    if rows and not wanted_rows:
        raise UserError(f"--rows {','.join(rows)} matches no recipe row (it has {', '.join(row_ids)})")
    for row in spec["rows"]:  # every name resolves before any work
        if row["method"] != SCRATCH_ROW:
            bench_.stage_spec(row["method"])
    wanted_fractions = select([f for f in FRACTIONS if f in spec["data"]["splits"]], fractions, "fractions")
    fine = build_finetune_config(spec.get("finetune_preset"), bench_.overrides(spec.get("finetune_overrides")))
    check_labels(bench_, fine.data.num_classes, fine.data.ignore_index)  # before any stage runs
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: list[dict] = []
    for row in spec["rows"]:
        selected = row in wanted_rows
        for fraction in FRACTIONS:
            if fraction not in spec["data"]["splits"] or fraction not in row.get("fractions", FRACTIONS):
                continue
            asked = selected and fraction in wanted_fractions
            backbone = row_backbone(bench_, row, fraction, selected, asked)
            row_seeds = row.get("seeds", spec["seeds"][fraction])
            if isinstance(row_seeds, dict):
                row_seeds = row_seeds[fraction]
            for seed in row_seeds:
                run_now = asked and (not seeds or seed in seeds)
                # cells not asked for are still reported when an earlier invocation finished them
                made = cell(bench_, row, fraction, seed, backbone, allow_run=run_now) if backbone else None
                if made is not None:
                    results.append(made)
    results += carried_over(out, spec["rows"], wanted_rows, results)
    order = {row_key(r): i for i, r in enumerate(spec["rows"])}
    results.sort(key=lambda made: order.get(row_key(made), len(order)))  # the recipe's row order
    meta = bench_meta(spec, bench_, root, time.perf_counter() - started)
    meta["command"] = "dreamteacher bench " + (str(recipe) if Path(recipe).suffix else str(recipe)) + f" --out {out}"
    files = write_results(out, meta, results)
    return BenchResult(out, results, files)


def row_backbone(bench: Bench, row: dict, fraction: str, selected: bool, asked: bool) -> dict | None:
    """What a row's cells at `fraction` start from: SCRATCH, a pretraining stage's result, or (an
    interpreter row) SCRATCH too: its cell is the interpreter itself. A stage shared by every fraction
    is made when the row is selected; one per fraction when that fraction is asked for too."""
    if row["method"] == SCRATCH_ROW or row.get("head") == INTERPRETER_HEAD:
        return SCRATCH
    return stage(bench, row["method"], fraction, allow_run=asked if per_fraction(bench, row["method"]) else selected)


def carried_over(out: Path, recipe_rows: list[dict], wanted_rows: list[dict], results: list[dict]) -> list[dict]:
    """Cells of the previous OUT/results.json whose work folders are gone (deleted to free disk, or a
    fresh clone of a committed table): kept, marked `carried_over`, for recipe rows this invocation did
    not select. A selected row is always reported from its current cells only, so a changed recipe
    never leaves stale numbers beside new ones."""
    previous = out / "results.json"
    if not previous.is_file():
        return []
    try:
        old_cells = json.loads(previous.read_text()).get("rows", [])
    except json.JSONDecodeError as err:
        raise UserError(f"{previous}: not a results file ({err}); move it away to rebuild the table") from err
    unselected = {row_key(r) for r in recipe_rows if r not in wanted_rows}
    present = {cell_key(c) for c in results}
    return [{**made, "carried_over": True} for made in old_cells
            if row_key(made) in unselected and cell_key(made) not in present]


def stage_description(bench: Bench, name: str, seen: set[str] | None = None) -> list[str]:
    """What stage `name` and the stages it builds on are, in words (teachers and methods describe
    their own settings), earliest first; each stage once."""
    seen = set() if seen is None else seen
    if name in seen or name == SCRATCH_ROW:
        return []
    seen.add(name)
    spec = bench.stage_spec(name)
    lines: list[str] = []
    builds_on = [spec[i] for i in ("teacher", "encoder") if i in spec]
    if spec.get("interpreter", "labels") != "labels":  # an interpreter row: its teacher's stage
        builds_on.append(spec["interpreter"])
    for upstream in builds_on:
        lines += stage_description(bench, upstream, seen)
    preset, overrides = bench.pretrain_config(spec.get("overrides", name))
    config = build_config(preset, overrides)
    if "method" in spec:
        method = METHODS.get(spec["method"])
        inputs = ", ".join(f"{i} `{spec[i]}`" for i in ("teacher", "encoder") if i in spec)
        labels = ", an interpreter trained on each fraction's labels" if spec.get("interpreter") == "labels" else ""
        what = f"{method.name} on the {config.student.backbone}" + (f" from {inputs}" if inputs else "") + labels
        lines.append(f"`{name}`: {what}: {method.describe_settings(config)}")
    elif "train_teacher" in spec:
        trainer = TEACHER_TRAINERS.get(spec["train_teacher"])
        text = f"{spec['train_teacher']} at its random initialization" if spec.get("untrained") else \
            trainer.describe_settings(config)
        lines.append(f"`{name}`: a teacher, {text}")
    else:
        lines.append(f"`{name}`: the teacher `{spec['interpreter']}` with a feature interpreter trained on each "
                     "fraction's labels as the segmenter")
    return lines


def bench_meta(spec: dict, bench_: Bench, root: Path, seconds: float) -> dict:
    pre = build_config(*bench_.pretrain_config())
    fine = build_finetune_config(spec.get("finetune_preset"), bench_.overrides(spec.get("finetune_overrides")))
    seen: set[str] = set()
    stages = [line for row in spec["rows"] for line in stage_description(bench_, row["method"], seen)]
    return {
        "recipe": spec["name"], "image_size": fine.data.resolution, "backbone": fine.model.backbone,
        "data": {"root": str(root), "unlabeled": spec["data"]["unlabeled"], "splits": spec["data"]["splits"],
                 "eval_sets": {name: {"images": str(images), "masks": str(masks),
                                      "about": (spec["data"].get("eval_about") or {}).get(name, "")}
                               for name, (images, masks) in bench_.eval_sets.items()}},
        "settings_chosen_on": spec.get("settings_chosen_on"),
        "settings_from": spec.get("settings_from"),
        "pretrain_steps_for_images": spec.get("pretrain_steps_for_images"),
        "class_names": spec["data"].get("class_names"),
        "pretrain": {"preset": spec.get("pretrain_preset"), "resolution": pre.data.resolution,
                     "student": pre.student.backbone,
                     "cache_encodings": pre.encode.cache_encodings if spec.get("feature_cache") else None},
        "stages": stages,
        "finetune": {"preset": spec.get("finetune_preset"), "iterations": spec["iterations"],
                     "batch_size": fine.optim.batch_size, "optimizer": fine.optim.name, "lr": fine.optim.lr,
                     "decoder_channels": fine.model.decoder_channels},
        "seeds": spec["seeds"],
        "device": bench_.device,
        "machine": machine_summary(),
        "bench_seconds_this_invocation": round(seconds, 1),
    }
