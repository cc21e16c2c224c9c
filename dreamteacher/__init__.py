"""dreamteacher: pretrain image backbones for dense prediction by distilling generative models."""

# every method, teacher kind and config section registers itself when its module is imported
from dreamteacher import methods, teachers  # noqa: F401  (isort: skip)
from dreamteacher.api import RunResult, evaluate, export, finetune, info, pretrain, sample, train_teacher
from dreamteacher.bench.runner import bench

__all__ = ["RunResult", "bench", "evaluate", "export", "finetune", "info", "pretrain", "sample", "train_teacher"]
__version__ = "0.1.0"
