"""The workflows as Python functions; the CLI is a thin layer over these.

    import dreamteacher as dt
    teacher = dt.train_teacher(data="images/", out="runs/teacher", preset="cpu-small")
    run = dt.pretrain(data="images/", out="runs/student", teacher=teacher.run_dir, preset="cpu-small")
    dt.export(run.run_dir, out="backbone.safetensors")
    seg = dt.finetune("runs/student/backbone.safetensors", "train/", "trainannot/", "runs/seg",
                      split="labeled.txt", preset="camvid-cpu")
    print(dt.evaluate(seg.run_dir, "val/", "valannot/").miou)
"""

from __future__ import annotations

from pathlib import Path

from dreamteacher.core.errors import UserError
from dreamteacher.core.runs import RunFolder
from dreamteacher.describe import describe
from dreamteacher.engine.trainer import RunResult
from dreamteacher.export.checkpoints import FORMATS, SUFFIXES, export_backbone
from dreamteacher.teachers.base import load_teacher
from dreamteacher.workflows.evaluate import EvalResult, evaluate
from dreamteacher.workflows.finetune import FinetuneResult, finetune
from dreamteacher.workflows.interpreter import InterpreterResult, train_interpreter
from dreamteacher.workflows.plan import plan
from dreamteacher.workflows.pretrain import (
    PretrainingJob,
    build_feature_cache,
    prepare_pretraining,
    pretrain,
    read_summary,
)
from dreamteacher.workflows.teacher import sample, train_teacher, untrained_teacher

__all__ = ["EvalResult", "FinetuneResult", "InterpreterResult", "PretrainingJob", "RunResult", "build_feature_cache",
           "evaluate", "export", "finetune", "info", "load_teacher", "plan", "prepare_pretraining", "pretrain", "read_summary",
           "sample", "train_interpreter", "train_teacher", "untrained_teacher"]


def export(run: str | Path, out: str | Path | None = None, format: str = "timm") -> Path:
    """The backbone alone, in `format` (timm, torchvision, smp, mmseg, detectron2; see
    `dreamteacher.export.checkpoints`), with a JSON beside it saying what it is and how to load it."""
    if format not in FORMATS:
        raise UserError(f"unknown export format '{format}'; choose one of {', '.join(FORMATS)}")
    run = Path(run)
    ckpt = RunFolder(run).checkpoint if run.is_dir() else run
    if not ckpt.is_file():
        raise UserError(f"no training checkpoint at {ckpt}")
    if out is None:
        name = "backbone" + ("" if format == "timm" else f".{format}") + SUFFIXES[format]
        out = (run if run.is_dir() else run.parent) / name
    return export_backbone(ckpt, out, format)


def info(path: str | Path) -> dict:
    """What a run folder, training checkpoint or export holds (kind, method, backbone, teacher, step,
    parts, and how to use it)."""
    return describe(path)
