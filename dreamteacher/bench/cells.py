"""The bench's cells: one fine-tuning (or one interpreter) per row, label fraction and seed, scored on
every evaluation set of the recipe."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dreamteacher.bench.pipeline import interpreter_stage
from dreamteacher.bench.recipes import Bench
from dreamteacher.bench.stages import Stage, digest, folder_fingerprint, key_settings
from dreamteacher.core.runs import SEGMENTER_INFO, read_json, write_json_atomic
from dreamteacher.methods.base import METHODS
from dreamteacher.workflows.evaluate import evaluate, load_segmenter
from dreamteacher.workflows.finetune import build_finetune_config, finetune

# the backbone of a `scratch` row: none (random initialization)
SCRATCH = {"backbone": None, "key": "scratch", "pretrain_seconds": 0.0, "pretrain_epochs": 0, "stages": {}}
INTERPRETER_HEAD = "interpreter"  # a row whose segmenter is the teacher with a feature interpreter


def cell(bench: Bench, row: dict, fraction: str, seed: int, backbone: dict, allow_run: bool = True) -> dict | None:
    """A fine-tuning of `backbone` (a pretraining stage's result, or SCRATCH) at `fraction`, `seed`."""
    method, head = row["method"], row.get("head", "upernet")
    if head == INTERPRETER_HEAD:
        return interpreter_cell(bench, row, fraction, seed, allow_run)
    iterations = row.get("iterations", bench.spec["iterations"][fraction])
    if isinstance(iterations, dict):
        iterations = iterations[fraction]
    preset = bench.spec.get("finetune_preset")
    overrides = bench.overrides(bench.spec.get("finetune_overrides"), row.get("finetune_overrides"),
                                {"model": {"head": head}, "optim": {"iterations": iterations}, "trainer": {"seed": seed}})
    config = build_finetune_config(preset, overrides)
    split = bench.data_root / bench.spec["data"]["splits"][fraction]
    images, masks = bench.path("images"), bench.path("masks")
    settings = key_settings(config, drop={} if head == "unet" else {"model": ("unet_width",)})
    key = digest(method, head, fraction, seed, backbone["key"], settings,
                 split.read_text() if split.is_file() else str(split), folder_fingerprint(images),
                 folder_fingerprint(masks))
    folder = bench.runs / "cells" / f"{method}--{head}" / f"{fraction}-seed{seed}"
    # a pretrained decoder of this head's kind (DeP/DDeP's U-Net, dt-mix's UperNet, G.4) starts it too
    pretrained_with = METHODS.get(backbone["method"]) if backbone.get("method") else None
    decoder = backbone.get("decoder") if pretrained_with and pretrained_with.decoder_head == head else None

    def run(folder: Path, resume: bool) -> dict:
        bench.log(f"[bench] fine-tuning {method} / {head} on {fraction} of the labels, seed {seed}")
        result = finetune(backbone["backbone"], images, masks, folder, split=split, preset=preset,
                          overrides=overrides, resume=resume, progress=bench.progress, decoder=decoder)
        info = read_json(folder / SEGMENTER_INFO)
        initialized = [part for part in ("backbone", "decoder") if info.get(f"{part}_init") == "pretrained"]
        return {"seconds": result.seconds, "iterations": result.steps, "labeled": info["labeled_images"],
                "initialized": "+".join(initialized) or "none"}

    trained = Stage(folder, key, run).result(allow_run)
    if trained is None:
        return None
    scores = score(bench, folder, trained["key"], f"{method} / {head} {fraction} seed {seed}")
    return {"method": method, "head": head, "fraction": fraction, "labeled": trained["labeled"], "seed": seed,
            **scores, "pretrain_seconds": backbone["pretrain_seconds"], "pretrain_epochs": backbone["pretrain_epochs"],
            "pretrain_stages": backbone["stages"],
            "finetune_iterations": trained["iterations"], "finetune_seconds": round(trained["seconds"], 1),
            "initialized": trained["initialized"]}


def interpreter_cell(bench: Bench, row: dict, fraction: str, seed: int, allow_run: bool) -> dict | None:
    """The teacher + interpreter as the segmenter (Table 5's DDPM-seg family): no fine-tuning."""
    teacher_name = bench.stage_spec(row["method"]).get("interpreter", "teacher")
    trained = interpreter_stage(bench, teacher_name, fraction, seed, allow_run)
    if trained is None:
        return None
    folder = Path(trained["interpreter"])
    scores = score(bench, folder, trained["key"], f"{row['method']} {fraction} seed {seed}")
    return {"method": row["method"], "head": INTERPRETER_HEAD, "fraction": fraction, "labeled": trained["labeled"],
            "seed": seed, **scores, "pretrain_seconds": trained["teacher_seconds"], "pretrain_epochs": 0,
            "pretrain_stages": trained["teacher_stages"],
            "finetune_iterations": trained["iterations"], "finetune_seconds": round(trained["seconds"], 1),
            "initialized": "teacher+interpreter"}


def score(bench: Bench, folder: Path, key: str, what: str) -> dict:
    """A finished run evaluated on every evaluation set (each cached beside the run, keyed on the run
    and the set's contents, so a set added later costs one evaluation per finished run): {"miou",
    "per_class", "pixel_accuracy"} of the primary (first) set, "scores" of every set, and
    "inference_gflops", the model's forward cost per image at its resolution."""
    per_set: dict[str, dict] = {}
    gflops = None
    for name, (images, masks) in bench.eval_sets.items():
        eval_path = folder / f"eval-{digest(key, folder_fingerprint(images), folder_fingerprint(masks))}.json"
        scores = read_json(eval_path)
        if scores is None:
            bench.log(f"[bench] evaluating {what} on {images}")
            scores = evaluate(folder, images, masks).to_dict()
        if "gflops_per_image" not in scores:  # fresh scores (or older files): cost added, written once
            gflops = gflops if gflops is not None else inference_gflops(folder)
            scores["gflops_per_image"] = gflops
            write_json_atomic(eval_path, scores)
        gflops = scores["gflops_per_image"]
        per_set[name] = {"miou": round(scores["miou"], 2),
                         "per_class": [None if v is None or math.isnan(v) else round(v, 2) for v in scores["per_class"]],
                         "pixel_accuracy": round(scores["pixel_accuracy"], 2), "images": scores["images"]}
    primary = per_set[next(iter(per_set))]
    return {"miou": primary["miou"], "per_class": primary["per_class"], "pixel_accuracy": primary["pixel_accuracy"],
            "scores": per_set, "inference_gflops": gflops}


def inference_gflops(folder: Path) -> float:
    """Forward FLOPs of a finished run's segmenter on one image at its resolution (GFLOPs, multiply-
    adds counted twice): the teacher + interpreter against a fine-tuned student, in one unit."""
    model, info = load_segmenter(folder)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.rand(1, 3, *info["resolution"]))
    return round(counter.get_total_flops() / 1e9, 2)
