"""What a teacher is, and the one place teacher files are recognized.

Every teacher a method distills answers `student_batch(batch) -> (images, features)` and declares
`feature_specs` (block, channels, stride); a diffusion teacher also `encode`s real images. Teachers come
in families, which is what a method asks for: `diffusion` (DreamTeacher's encoder of real images),
`gan` (DreamTeacher's synthesized dataset) and `moco` (PCD's contrastive teacher).

A teacher *kind* is one way such a teacher is stored (a train-teacher run, a diffusers folder, an ADM
`.pt`, a Stable Diffusion folder, a StyleGAN2 generator, a MoCo v3 checkpoint). Each kind registers
itself in its family's module with `register_teacher_kind`; `load_teacher` tries the kinds of the
families a method accepts, in registration order, and an unknown path gets one line listing the
kinds it tried.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from dreamteacher.core.config import Section, TrainerConfig, bounded, check_precision, register_section
from dreamteacher.core.errors import UserError
from dreamteacher.core.registry import Registry
from dreamteacher.core.runs import TEACHER, recover_folder


@dataclass
class TeacherTrainConfig(Section):
    """How `train-teacher` trains a teacher here (a DDPM or a StyleGAN2)."""

    batch_size: int = bounded(256, low=1)  # global, as optim.batch_size; lr is given for it
    micro_batch: int = bounded(0, low=1, allowed=(0,))  # per device, gradients accumulated; 0 = whole share
    lr: float = bounded(1e-4, low=0, low_open=True)
    weight_decay: float = bounded(0.0, low=0)
    warmup_steps: int = bounded(500, low=0)
    # 0: sized to the data (`teacher_size`: 300 passes over the images, at least 2,000 steps); or steps
    max_steps: int = bounded(0, low=1, allowed=(0,))
    # -1: sized to the run (an EMA horizon of 2% of its steps, 100 to 10,000 steps); or a decay in [0, 1]
    ema_decay: float = bounded(-1.0, low=0, high=1, allowed=(-1.0,))
    grad_clip: float = bounded(1.0, low=0, low_open=True)
    # [height, width] random crop of each image (at data.resolution) per step; [] trains on whole
    # images. Crops keep the object scale the teacher will encode at, for a fraction of the cost.
    crop: list[int] = bounded(low=1, factory=list)
    # Lightning precision of the teacher's training; "" uses trainer.precision. "bf16-mixed" on a CPU
    # with avx512_bf16 or AMX: 1.55x faster steps for the cpu-small U-Net (emulated and slower without).
    precision: str = ""

    def check(self, config: Any) -> None:
        check_precision("teacher_train.precision", self.precision or config.trainer.precision)
        res = config.data.resolution
        if self.crop and not (len(self.crop) == 2 and all(c <= r for c, r in zip(self.crop, res))):
            raise UserError(f"teacher_train.crop must be [height, width] within data.resolution {res}, got {self.crop}")


register_section("teacher_train", TeacherTrainConfig)

# The rule that sizes a teacher to its data, anchored on the paper's teachers: BDD100K's ADM trained
# 300 epochs on 70k images at 128x256 (batch 256: 82k steps), ImageNet's 400 epochs at 256x256. Both
# resolutions took about as many passes, so the resolution changes the cost of a step (`dreamteacher
# plan` measures it), not the number of steps. The EMA averages over 2% of the run: ADM's 0.9999 (a
# horizon of 10,000 steps) at ImageNet's scale, less on small data.
TEACHER_EPOCHS = 300
MIN_TEACHER_STEPS = 2000
EMA_HORIZON = (1 / 50, 100, 10_000)  # fraction of the steps, fewest and most steps


def teacher_size(num_images: int, batch_size: int) -> tuple[int, float]:
    """(steps, EMA decay) of a teacher sized to `num_images` at global batch `batch_size`."""
    steps = max(MIN_TEACHER_STEPS, math.ceil(TEACHER_EPOCHS * num_images / batch_size))
    fraction, low, high = EMA_HORIZON
    horizon = min(high, max(low, round(steps * fraction)))
    return steps, round(1 - 1 / horizon, 6)


def sized_to_data(config: Any, num_images: int) -> tuple[Any, str | None]:
    """`config` with an auto teacher_train.max_steps / ema_decay made concrete for `num_images`, and the
    line that says so (None when both were set)."""
    tt = config.teacher_train
    if tt.max_steps > 0 and tt.ema_decay >= 0:
        return config, None
    steps, decay = teacher_size(num_images, tt.batch_size)
    sized = dataclasses.replace(tt, max_steps=tt.max_steps if tt.max_steps > 0 else steps,
                                ema_decay=tt.ema_decay if tt.ema_decay >= 0 else decay)
    config = copy.copy(config)
    config.teacher_train = sized
    line = (f"teacher: {sized.max_steps:,} steps at batch {tt.batch_size}, EMA decay {sized.ema_decay:g}, sized to "
            f"{num_images:,} images ({TEACHER_EPOCHS} passes, at least {MIN_TEACHER_STEPS:,} steps; "
            "teacher_train.max_steps / ema_decay set them)")
    return config, line


def teacher_trainer(config: Any) -> TrainerConfig:
    """The trainer settings of a teacher's own training: `trainer`, in `teacher_train.precision` when set."""
    return dataclasses.replace(config.trainer, precision=config.teacher_train.precision or config.trainer.precision)


@dataclass(frozen=True)
class TeacherKind:
    """One way a teacher is stored: `recognizes(path)` says whether `path` is one (cheap: names and
    small files only), `load(path, config)` builds the teacher (`config.encode` chooses blocks, t...)."""

    name: str
    family: str  # "diffusion", "gan" or "moco"
    description: str  # what the user points at, e.g. "a train-teacher run folder"
    recognizes: Callable[[Path], bool]
    load: Callable[[Path, Any], Any]


TEACHER_KINDS: Registry[TeacherKind] = Registry("teacher kind")


def register_teacher_kind(kind: TeacherKind) -> TeacherKind:
    return TEACHER_KINDS.register(kind.name, kind)


def teacher_kind(path: str | Path, families: tuple[str, ...]) -> TeacherKind:
    """The first registered kind of one of `families` that recognizes `path`."""
    path = Path(path)
    if path.is_dir():
        recover_folder(path / TEACHER)  # a train-teacher run whose teacher replacement was killed midway
    if not path.exists():
        raise UserError(f"teacher not found: {path}")
    kinds = [kind for _, kind in TEACHER_KINDS.items() if kind.family in families]
    for kind in kinds:
        if kind.recognizes(path):
            return kind
    tried = "; ".join(f"{k.description} ({k.name})" for k in kinds)
    raise UserError(f"teacher {path}: not a teacher this method can use; tried {tried}")


def load_teacher(path: str | Path, config: Any, families: tuple[str, ...] = ("diffusion", "gan")):
    """The teacher stored at `path` (one of `families`), built with `config`'s encode settings."""
    return teacher_kind(path, families).load(Path(path), config)


def teacher_family(path: str | Path, families: tuple[str, ...] = ("diffusion", "gan", "moco")) -> str:
    return teacher_kind(path, families).family


def load_diffusion_teacher(path: str | Path, blocks: list[int], t: int, mode: str = "stochastic",
                           ddim_steps: int = 10, adm_head_channels: int = 64):
    """A diffusion teacher of any kind, its encode settings given as arguments (no full config)."""
    encode = SimpleNamespace(blocks=list(blocks), t=t, mode=mode, ddim_steps=ddim_steps,
                             adm_head_channels=adm_head_channels)
    return load_teacher(path, SimpleNamespace(encode=encode), families=("diffusion",))
