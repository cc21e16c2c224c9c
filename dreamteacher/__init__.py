"""dreamteacher: pretrain image backbones for dense prediction by distilling generative models."""

from dreamteacher.api import RunResult, export, info, pretrain, sample, train_teacher
from dreamteacher.bench.runner import bench
from dreamteacher.downstream.finetune import evaluate, finetune

__all__ = ["RunResult", "bench", "evaluate", "export", "finetune", "info", "pretrain", "sample", "train_teacher"]
__version__ = "0.1.0"
