"""Engine glue: Lightning trainer, loggers, checkpoints, throughput, optimizers and schedules.

Methods are LightningModules whose `training_step` returns `{"loss": total, **parts}`; everything
about stepping, logging, distributed data and checkpointing lives here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from dreamteacher.config import TrainerConfig
from dreamteacher.errors import UserError

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"

# Lightning's advice about worker counts and logging intervals is noise on small CPU runs.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*log_every_n_steps.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")


class StepProgress(Callback):
    """One progress bar over the whole run (not per epoch) with loss and images/s of all processes;
    images/s also goes to the logs. Time between batch ends, so data loading is included.

    Also the run's training wall-clock, kept in its checkpoints so that it adds up over resumes.
    """

    def __init__(self, global_batch: int, show: bool = True):
        self.global_batch, self.show = global_batch, show
        self._last: float | None = None
        self._rate: float | None = None
        self._bar: tqdm | None = None
        self.seconds_before = 0.0  # training time of earlier (resumed) parts
        self._start: float | None = None
        self._shown = 0.0
        self.refresh_seconds = 1.0

    @property
    def seconds(self) -> float:
        return self.seconds_before + (time.perf_counter() - self._start if self._start is not None else 0.0)

    def state_dict(self) -> dict:
        return {"seconds": self.seconds}

    def load_state_dict(self, state: dict) -> None:
        self.seconds_before = float(state.get("seconds", 0.0))

    def on_train_start(self, trainer, pl_module) -> None:
        if self.show and trainer.is_global_zero:
            self._bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, desc="train", unit="step",
                             dynamic_ncols=True, file=sys.stderr)
        self._last = self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        rate = self.global_batch / max(now - self._last, 1e-9)
        self._last = now
        self._rate = rate if self._rate is None else 0.9 * self._rate + 0.1 * rate
        pl_module.log("img_s", self._rate, on_step=True, on_epoch=False, rank_zero_only=True)
        if self._bar is not None:
            # reading the loss waits for the GPU: do it when the bar is redrawn (~1/s), not every step
            if now - self._shown >= self.refresh_seconds:
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                self._bar.set_postfix(loss=f"{float(loss):.4f}", img_s=f"{self._rate:.1f}", refresh=False)
                self._shown = now
            self._bar.update(trainer.global_step - self._bar.n)

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds_before, self._start = self.seconds, None
        if self._bar is not None:
            self._bar.close()


def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT


def check_run_dir(run_dir: str | Path) -> Path:
    """`--out` must be a folder; an export passed there (resume vs initialize mix-up) is named as such."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        if run_dir.suffix in (".safetensors", ".pth", ".pkl"):
            raise UserError(f"{run_dir} is an exported backbone: it initializes a fine-tuning "
                            f"(`dreamteacher finetune --backbone {run_dir}`) but cannot resume a run; "
                            "--out takes the run folder")
        raise UserError(f"--out must be a run folder, not the file {run_dir}")
    return run_dir


def prepare_run_dir(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None; never silently overwrites a trained run."""
    run_dir = check_run_dir(run_dir)
    ckpt = checkpoint_path(run_dir)
    if resume:
        if not ckpt.is_file():
            raise UserError(f"--resume: no checkpoint at {ckpt}")
        return ckpt
    if ckpt.is_file():
        raise UserError(f"{run_dir} already holds a training checkpoint; pass --resume to continue it, "
                        "or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    return None


@rank_zero_only  # one process renames; the others would race it
def keep_previous_logs(run_dir: Path) -> None:
    """Lightning's CSV logger would delete metrics.csv on resume: keep it as metrics.partN.csv."""
    metrics = Path(run_dir) / "logs" / "metrics.csv"
    if metrics.is_file():
        part = len(list(metrics.parent.glob("metrics.part*.csv")))
        metrics.rename(metrics.with_name(f"metrics.part{part}.csv"))


def training_seconds(trainer: L.Trainer) -> float:
    """Wall-clock of the run's training over all its parts (resumes included)."""
    return next(cb.seconds for cb in trainer.callbacks if isinstance(cb, StepProgress))


def fused_adam(module: torch.nn.Module) -> dict:
    """Keyword arguments for torch's Adam/AdamW: `fused=True` where torch has a fused kernel for the
    parameters' devices (CPU, CUDA): one kernel per step instead of several per tensor (a ResNet-18's
    AdamW step: 33 ms -> 5 ms on 2 CPU cores). Called once the module sits on its device."""
    devices = {p.device.type for p in module.parameters() if p.requires_grad}
    return {"fused": True} if devices and devices <= {"cpu", "cuda"} else {}


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


@functools.cache  # process-wide: once is enough (find_library runs ldconfig)
def reuse_host_memory() -> bool:
    """Make glibc malloc keep freed host memory for reuse: blocks up to 256 MiB from the heap (not
    mmap) and a heap that is never trimmed. By default every CPU step's large buffers (a ResNet-18's
    stem activations and their gradients, 12 MB each at batch 16 x 96x128) are unmapped when freed
    and page-faulted back, zero-filled by the kernel, on the next step: about 5% of a cpu-small step
    on 2 cores (benchmarks/README, Speed). Process-wide, the effect of the MALLOC_MMAP_THRESHOLD_
    and MALLOC_TRIM_THRESHOLD_ environment variables; False where the C library has no mallopt
    (musl, macOS), which then keeps its own behaviour."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, 256 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def build_trainer(t: TrainerConfig, run_dir: Path, max_steps: int, global_batch: int,
                  progress: bool = True, callbacks: list[Callback] = ()) -> L.Trainer:
    if t.reuse_host_memory:
        reuse_host_memory()
    keep_previous_logs(run_dir)
    ckpt_cb = ModelCheckpoint(dirpath=Path(run_dir) / CHECKPOINT_DIR, save_last=True, save_top_k=0,
                              every_n_train_steps=max(1, t.checkpoint_every_n_steps), save_on_train_epoch_end=False)
    ckpt_cb.CHECKPOINT_NAME_LAST = "last"
    loggers = [CSVLogger(run_dir, name="", version="logs"),
               TensorBoardLogger(run_dir, name="", version="logs", default_hp_metric=False)]
    callbacks = [ckpt_cb, StepProgress(global_batch, show=progress), ResumeMidEpoch(), *callbacks]
    return L.Trainer(
        max_steps=max_steps, max_epochs=-1, accelerator=t.accelerator, devices=t.devices,
        num_nodes=t.num_nodes, strategy=t.strategy, precision=t.precision, sync_batchnorm=t.sync_batchnorm,
        logger=loggers,
        callbacks=callbacks, default_root_dir=run_dir, log_every_n_steps=max(1, t.log_every_n_steps),
        enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
        limit_val_batches=0, use_distributed_sampler=True, benchmark=t.cudnn_benchmark,
    )


class SeededSamples(Dataset):
    """Per-sample randomness drawn from (seed, epoch, index) alone: a sample's flip, its cached
    encoding and its diffusion noise are then the same whatever the number of processes, machines or
    loader workers, so runs at different world sizes (and resumes across them) see the same data.

    Indexed by `(index, epoch)` keys from `EpochKeySampler`; returns a dict batch element:
    `images`, and `features` (from the feature cache) or `noise_seed` (when `noise` is on: the seed
    of the sample's N(0, I) noise, see `seeded_noise`).
    """

    def __init__(self, dataset: Dataset, seed: int, noise: bool):
        self.dataset, self.seed, self.noise = dataset, seed, noise

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        with torch.random.fork_rng(devices=[]):
            # the CPU generator alone, the one fork_rng restores: torch.manual_seed would also reseed
            # CUDA (left changed) and, where CUDA is not initialized, queue the call with a formatted
            # stack trace, about 1 ms a sample (6% of a cached cpu-small step)
            torch.default_generator.manual_seed((self.seed * 1_000_003 + epoch) * 1_000_000_007 + index)
            sample = self.dataset[index]
            if isinstance(sample, dict):  # several named tensors (e.g. two augmented views)
                item = dict(sample)
            else:
                item = {"images": sample[0], "features": sample[1]} if isinstance(sample, tuple) else {"images": sample}
            if self.noise:  # a seed, not the tensor: the noise is drawn where it is used (`seeded_noise`)
                item["noise_seed"] = torch.randint(2**62, ())
        return item


def seeded_noise(seeds: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """N(0, I) shaped like `like`, sample i drawn from its own `seeds[i]` on `like`'s device: on a GPU
    the noise never crosses the host-device link (64 images at 256x256 are 50 MB a step). `seeds`
    stays on the host (`PretrainMethod.transfer_batch_to_device`), so this launches without a sync."""
    noise = torch.empty(like.shape, device=like.device, dtype=torch.float32)
    generator = torch.Generator(device=like.device)
    for row, seed in zip(noise, seeds.tolist()):
        row.normal_(generator=generator.manual_seed(seed))
    return noise.to(like.dtype)


class EpochKeySampler(DistributedSampler):
    """DistributedSampler yielding `(index, epoch)`; one permutation per epoch for all world sizes, so
    with drop_last the processes' batches together are exactly the one-process batch.

    `resume_at = (epoch, samples)` starts that epoch `samples` further in: a run resumed mid-epoch goes
    on with the batches it had not trained yet, at any world size (see `ResumeMidEpoch`).
    """

    resume_at: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self.resume_at is not None and self.resume_at[0] != epoch:
            self.resume_at = None  # the resumed epoch is over

    def __iter__(self):
        indices = list(super().__iter__())
        if self.resume_at is not None and self.resume_at[0] == self.epoch:
            indices = indices[self.resume_at[1]:]
        return ((index, self.epoch) for index in indices)


class ResumeMidEpoch(Callback):
    """Lightning restarts an interrupted epoch from its first batch; with an `EpochKeySampler` the
    epoch instead continues after the global batches already trained."""

    def on_train_start(self, trainer, pl_module) -> None:
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if not isinstance(sampler, EpochKeySampler):
            return
        trained = trainer.global_step - trainer.current_epoch * trainer.num_training_batches
        if 0 < trained < trainer.num_training_batches:
            sampler.resume_at = (trainer.current_epoch, trained * loader.batch_size)


def make_loader(dataset: Dataset, global_batch: int, trainer: L.Trainer, num_workers: int,
                setting: str, seed: int = 0) -> DataLoader:
    """Per-process loader: the global batch is split evenly over all processes. A `SeededSamples`
    dataset is sharded here (no sample twice in an epoch); others by Lightning's sampler."""
    world = trainer.world_size
    if global_batch % world:
        raise UserError(f"{setting}={global_batch} is not divisible by the {world} processes")
    per_process = global_batch // world
    if per_process > len(dataset) // world:
        raise UserError(f"{setting}={global_batch} is larger than the {len(dataset)} images; lower it")
    workers = min(num_workers, os.cpu_count() or 1)
    options = dict(batch_size=per_process, drop_last=True, num_workers=workers,
                   pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
    if isinstance(dataset, SeededSamples):
        sampler = EpochKeySampler(dataset, num_replicas=world, rank=trainer.global_rank, shuffle=True, seed=seed,
                                  drop_last=True)
        return DataLoader(dataset, sampler=sampler, **options)
    return DataLoader(dataset, shuffle=True, **options)


def steps_per_epoch(num_images: int, global_batch: int) -> int:
    return max(1, num_images // global_batch)


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR multiplier: linear warmup to 1, then cosine decay to 0 (per optimizer step)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def seed_everything(seed: int) -> None:
    L.seed_everything(seed, workers=True, verbose=False)
