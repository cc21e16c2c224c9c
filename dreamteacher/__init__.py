"""dreamteacher: pretrain image backbones for dense prediction by distilling generative models."""

from dreamteacher.api import RunResult, export, pretrain, sample, train_teacher

__all__ = ["RunResult", "export", "pretrain", "sample", "train_teacher"]
__version__ = "0.1.0"
