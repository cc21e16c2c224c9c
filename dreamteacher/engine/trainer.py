"""The training engine: Lightning trainer, loggers, atomic checkpoints in the run folder, progress and
throughput, mid-epoch resume, and the one lifecycle every training command shares (`fit`).

Methods are LightningModules whose `training_step` returns `{"loss": total, **parts}`; everything
about stepping, logging, distributed data and checkpointing lives here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dreamteacher.core.config import TrainerConfig
from dreamteacher.core.errors import Diverged, UserError
from dreamteacher.core.hardware import resolve_precision, say
from dreamteacher.core.runs import CHECKPOINT_DIR, LAST_CHECKPOINT, RunFolder, atomic_write
from dreamteacher.data.sampling import EpochKeySampler, SeededSamples
from dreamteacher.nn.weights import non_finite_tensors

# Lightning's advice about worker counts and logging intervals is noise on small CPU runs; its CSV
# logger's "previous log files will be deleted" is wrong here (keep_previous_logs keeps them).
warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*log_every_n_steps.*")
warnings.filterwarnings("ignore", ".*LeafSpec.*")
warnings.filterwarnings("ignore", ".*Previous log files in this directory will be deleted.*")


class StepProgress(Callback):
    """One progress bar over the whole run (not per epoch) with loss and images/s of all processes;
    images/s also goes to the logs. Time between batch ends, so data loading is included.

    Also the run's training wall-clock, kept in its checkpoints so that it adds up over resumes, and
    the steps it was resumed at (`resumed_at`, in run.json: a resume that is not bit-exact leaves a trace).
    """

    def __init__(self, global_batch: int, show: bool = True):
        self.global_batch, self.show = global_batch, show
        self._last: float | None = None
        self._rate: float | None = None
        self._bar: tqdm | None = None
        self.seconds_before = 0.0  # training time of earlier (resumed) parts
        self.resumed_at: list[int] = []
        self._start: float | None = None
        self._shown = 0.0
        self.refresh_seconds = 1.0

    @property
    def seconds(self) -> float:
        return self.seconds_before + (time.perf_counter() - self._start if self._start is not None else 0.0)

    def state_dict(self) -> dict:
        return {"seconds": self.seconds, "resumed_at": list(self.resumed_at)}

    def load_state_dict(self, state: dict) -> None:
        self.seconds_before = float(state.get("seconds", 0.0))
        self.resumed_at = [int(step) for step in state.get("resumed_at", [])]

    def on_train_start(self, trainer, pl_module) -> None:
        if 0 < trainer.global_step < trainer.max_steps and trainer.global_step not in self.resumed_at:
            self.resumed_at.append(trainer.global_step)
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


@rank_zero_only  # one process renames; the others would race it
def keep_previous_logs(run_dir: Path) -> None:
    """Lightning's CSV logger would overwrite metrics.csv on resume: keep it as metrics.partN.csv."""
    metrics = Path(run_dir) / "logs" / "metrics.csv"
    if metrics.is_file():
        part = len(list(metrics.parent.glob("metrics.part*.csv")))
        metrics.rename(metrics.with_name(f"metrics.part{part}.csv"))


def step_progress(trainer: L.Trainer) -> StepProgress:
    """The trainer's `StepProgress`: wall-clock and resume steps over all the run's parts."""
    return next(cb for cb in trainer.callbacks if isinstance(cb, StepProgress))


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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written through a temporary file in the checkpoint's own folder, fsynced and renamed
    over it (`core.runs.atomic_write`): never a half-written `last.ckpt`, and a temporary file killed
    mid-write stays in the run folder, where the next start of the run removes it (Lightning's own
    writer goes through the system temporary folder, which on another file system is a copy).
    Weights with a NaN or an infinity are never written: the last good checkpoint stays."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        bad = non_finite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            raise Diverged(f"step {checkpoint.get('global_step', '?')}: {len(bad)} weight tensors are non-finite "
                           f"(e.g. {bad[0]}); {Path(path).name} keeps its last good state")
        atomic_write(Path(path), lambda tmp: torch.save(checkpoint, tmp))


class FiniteGuard(Callback):
    """Stops a run at its first non-finite loss, naming the step and the loss terms that were
    non-finite, before a checkpoint or an export can take the damage. On the CPU every step is
    checked; on a GPU the first bad step is recorded on the device (no host sync per step) and read
    every `interval` steps and at the end."""

    def __init__(self, interval: int):
        self.interval = interval
        self._first_bad: torch.Tensor | None = None
        self._terms: dict[str, torch.Tensor] = {}

    @staticmethod
    def losses(outputs) -> dict[str, torch.Tensor]:
        if isinstance(outputs, dict):
            return {k: v for k, v in outputs.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
        return {"loss": outputs} if isinstance(outputs, torch.Tensor) else {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        terms = self.losses(outputs)
        if "loss" not in terms:
            return
        bad = ~torch.isfinite(terms["loss"].detach().float())
        if terms["loss"].device.type == "cpu":
            if bool(bad):
                self.stop(trainer.global_step, terms)
            return
        step = torch.full((), trainer.global_step, device=bad.device)
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, device=bad.device, dtype=torch.long)
        self._first_bad = torch.where(bad & (self._first_bad < 0), step, self._first_bad)
        if trainer.global_step % self.interval == 0:
            self.check(trainer, terms)

    def on_train_end(self, trainer, pl_module) -> None:
        self.check(trainer, {})

    def check(self, trainer, terms: dict) -> None:
        if self._first_bad is not None and int(self._first_bad) >= 0:
            self.stop(int(self._first_bad), terms)

    @staticmethod
    def stop(step: int, terms: dict[str, torch.Tensor]) -> None:
        bad = [name for name, value in terms.items() if not bool(torch.isfinite(value.detach().float()))]
        raise Diverged(f"step {step}: the loss is non-finite ({', '.join(bad) or 'loss'}); training stopped, "
                       "the last good checkpoint and exports are kept (lower the learning rate, or look for a "
                       "bad image or setting)")


def check_mlflow(uri: str) -> None:
    """An MLflow tracking server that answers, before any training (a local file store always does)."""
    if not uri or uri.startswith("file:") or "://" not in uri:
        return
    import mlflow  # noqa: PLC0415 - an optional dependency, imported only when asked for

    # one quick try: MLflow's own default retries with backoff for minutes before it gives up
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
    saved = {name: os.environ.get(name) for name in quick}
    os.environ.update(quick)
    try:
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - connection refused, DNS, HTTP and auth errors alike
        raise UserError(f"trainer.mlflow_uri {uri}: the MLflow server does not answer "
                        f"({exc.__class__.__name__}); start it or leave mlflow_uri empty for a local store") from None
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def build_loggers(t: TrainerConfig, run_dir: Path) -> list:
    """Lightning's own loggers, as `trainer.loggers` names them; an optional one that is not
    installed, or an MLflow server that does not answer, is refused before training."""
    loggers = []
    for name in t.loggers:
        if name == "csv":
            loggers.append(CSVLogger(run_dir, name="", version="logs"))
        elif name == "tensorboard":
            loggers.append(TensorBoardLogger(run_dir, name="", version="logs", default_hp_metric=False))
        else:
            try:
                __import__(name)
            except ImportError:
                raise UserError(f"trainer.loggers: {name} is not installed (pip install 'dreamteacher[{name}]')") from None
            if name == "mlflow":
                from lightning.pytorch.loggers import MLFlowLogger  # noqa: PLC0415 - needs mlflow

                check_mlflow(t.mlflow_uri)
                uri = t.mlflow_uri or (Path(run_dir).resolve() / "mlruns").as_uri()
                if uri.startswith("file:"):  # a local store needs no server (MLflow 3 asks for this opt-in)
                    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
                loggers.append(MLFlowLogger(experiment_name=t.experiment, tracking_uri=uri,
                                            run_name=Path(run_dir).name))
            else:
                from lightning.pytorch.loggers import WandbLogger  # noqa: PLC0415 - needs wandb

                loggers.append(WandbLogger(project=t.experiment, name=Path(run_dir).name, save_dir=str(run_dir),
                                           offline=not os.environ.get("WANDB_API_KEY")))
    return loggers


def log_artifacts(trainer: L.Trainer, paths: list[Path]) -> None:
    """Files of a finished run (its exports, run.json) sent to the loggers that keep artifacts."""
    for logger in trainer.loggers:
        if logger.__class__.__name__ == "MLFlowLogger":
            for path in paths:
                logger.experiment.log_artifact(logger.run_id, str(path))


def build_trainer(t: TrainerConfig, run_dir: Path, max_steps: int, global_batch: int,
                  progress: bool = True, callbacks: list[Callback] = ()) -> L.Trainer:
    if t.reuse_host_memory:
        reuse_host_memory()
    precision, why = resolve_precision(t.precision, t.accelerator)
    if t.precision == "auto" and rank_zero_only.rank == 0:
        say(f"precision: auto -> {precision} ({why})")
    keep_previous_logs(run_dir)
    ckpt_cb = ModelCheckpoint(dirpath=Path(run_dir) / CHECKPOINT_DIR, save_last=True, save_top_k=0,
                              every_n_train_steps=t.checkpoint_every_n_steps, save_on_train_epoch_end=False)
    ckpt_cb.CHECKPOINT_NAME_LAST = Path(LAST_CHECKPOINT).stem
    loggers = build_loggers(t, Path(run_dir))
    callbacks = [FiniteGuard(t.log_every_n_steps), ckpt_cb, StepProgress(global_batch, show=progress), ResumeMidEpoch(),
                 *callbacks]
    return L.Trainer(
        max_steps=max_steps, max_epochs=-1, accelerator=t.accelerator, devices=t.devices,
        num_nodes=t.num_nodes, strategy=t.strategy, precision=precision, sync_batchnorm=t.sync_batchnorm,
        logger=loggers, plugins=[AtomicCheckpointIO()],
        callbacks=callbacks, default_root_dir=run_dir, log_every_n_steps=t.log_every_n_steps,
        enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
        limit_val_batches=0, use_distributed_sampler=True, benchmark=t.cudnn_benchmark,
    )


class ResumeMidEpoch(Callback):
    """Lightning restarts an interrupted epoch from its first batch; with an `EpochKeySampler` the
    epoch instead continues after the global batches already trained (a module stepping several
    optimizers per batch, a GAN, says so in `optimizer_steps_per_iteration`; with gradient
    accumulation a step is several loader batches)."""

    def on_train_start(self, trainer, pl_module) -> None:
        loader = trainer.train_dataloader
        sampler = getattr(loader, "sampler", None)
        if not isinstance(sampler, EpochKeySampler):
            return
        steps = trainer.global_step // getattr(pl_module, "optimizer_steps_per_iteration", 1)
        batches = steps * trainer.accumulate_grad_batches  # loader batches: micro-batches, when accumulating
        trained = batches - trainer.current_epoch * trainer.num_training_batches
        if 0 < trained < trainer.num_training_batches:
            sampler.resume_at = (trainer.current_epoch, trained * loader.batch_size)


def batch_split(global_batch: int, world: int, micro_batch: int, setting: str) -> tuple[int, int]:
    """(per-device micro-batch, micro-batches accumulated per optimizer step) that make `global_batch`
    on `world` processes: the global batch is split evenly over the processes, and each process's
    share into micro-batches of `micro_batch` (0: the whole share at once). One line when they do not
    divide."""
    micro_setting = setting.rsplit(".", 1)[0] + ".micro_batch"
    if micro_batch > global_batch:
        raise UserError(f"{micro_setting}={micro_batch} is larger than the global batch {setting}={global_batch}")
    if global_batch % world:
        raise UserError(f"{setting}={global_batch} is not divisible by the {world} processes")
    per_process = global_batch // world
    micro = micro_batch or per_process
    if per_process % micro:
        raise UserError(f"{micro_setting}={micro} does not divide the {per_process} images each of the {world} "
                        f"processes takes of {setting}={global_batch}")
    return micro, per_process // micro


def make_loader(dataset: Dataset, global_batch: int, trainer: L.Trainer, num_workers: int,
                setting: str, seed: int = 0, micro_batch: int = 0) -> DataLoader:
    """Per-process loader: the global batch is split evenly over all processes, and each share into
    micro-batches of `micro_batch` (0: none) whose gradients are accumulated into one optimizer step
    (the trainer is told so): the global batch, its samples and the learning rate are the same at any
    device count and micro-batch. A `SeededSamples` dataset is sharded here (no sample twice in an
    epoch); others by Lightning's sampler."""
    world = trainer.world_size
    micro, accumulate = batch_split(global_batch, world, micro_batch, setting)
    per_process = micro * accumulate
    if per_process > len(dataset) // world:
        raise UserError(f"{setting}={global_batch} is larger than the {len(dataset)} images; lower it")
    trainer.accumulate_grad_batches = accumulate
    progress = next((cb for cb in trainer.callbacks if isinstance(cb, StepProgress)), None)
    if progress is not None:
        progress.global_batch = micro * world  # images per loader batch, all processes together
    workers = min(num_workers, os.cpu_count() or 1)
    options = dict(batch_size=micro, drop_last=True, num_workers=workers,
                   pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)
    if isinstance(dataset, SeededSamples):
        sampler = EpochKeySampler(dataset, num_replicas=world, rank=trainer.global_rank, shuffle=True, seed=seed,
                                  drop_last=True)
        return DataLoader(dataset, sampler=sampler, **options)
    return DataLoader(dataset, shuffle=True, **options)


def start_line(what: str, dataset: Dataset, steps: int, global_batch: int, trainer: L.Trainer,
               loader: DataLoader) -> str:
    """The one line a training run says when it starts: its images, steps, epochs, batch split and
    precision (`dreamteacher plan` says the cost before any of it runs)."""
    images = getattr(dataset, "dataset", dataset)
    listing = getattr(images, "listing", None) or getattr(getattr(images, "images", None), "listing", None)
    skipped = f" ({len(listing.skipped)} skipped)" if listing is not None and listing.skipped else ""
    epochs = steps * global_batch / max(1, len(dataset))
    return (f"plan: {what}: {len(dataset):,} images{skipped}; {steps:,} steps ({epochs:.1f} epochs) of global batch "
            f"{global_batch} = {loader.batch_size} per device x {trainer.accumulate_grad_batches} accumulated x "
            f"{trainer.world_size} devices; {trainer.precision}")


def seed_everything(seed: int) -> None:
    L.seed_everything(seed, workers=True, verbose=False)


@dataclass
class RunResult:
    """What a finished training run gives back (every training command's result)."""

    run_dir: Path
    checkpoint: Path
    steps: int
    seconds: float
    final_loss: float | None
    files: dict[str, Path] = field(default_factory=dict)
    resumed_at: list[int] = field(default_factory=list)
    precision: str = ""  # what it trained in (`auto` resolved)
    peak_memory_gib: float | None = None  # this process: CUDA's peak allocation, or the peak resident memory


def peak_memory_gib(device: torch.device) -> float:
    """The peak memory of training on `device`: CUDA's peak allocation, or on the CPU the process's peak
    resident memory (an upper bound: everything the process held)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource  # noqa: PLC0415 - POSIX only

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def fit(run: RunFolder, trainer: L.Trainer, module: L.LightningModule, loader: DataLoader,
        resume_from: Path | None) -> RunResult:
    """The lifecycle every training command shares once its run is set up: fit (from `resume_from`
    when given), write the final checkpoint, and return steps, wall-clock over all parts and the last
    logged loss. Exports and the summary are the caller's (they differ by command). A diverged run
    (`Diverged`) leaves `run.json` saying so, its last good checkpoint untouched, and no export."""
    try:
        with warnings.catch_warnings():
            # ResumeMidEpoch continues an interrupted epoch where it stopped; a GAN's checkpoints hold the
            # state after both of its optimizers' steps, as intended
            warnings.filterwarnings("ignore", ".*dataloader is not resumable.*")
            warnings.filterwarnings("ignore", ".*ModelCheckpoint with manual optimization.*")
            trainer.fit(module, loader, ckpt_path=resume_from)
        trainer.save_checkpoint(run.checkpoint, weights_only=False)
    except Diverged as exc:
        if trainer.is_global_zero:
            run.write_summary({"status": "diverged", "message": str(exc), "steps": trainer.global_step,
                               "checkpoint": str(run.checkpoint) if run.checkpoint.is_file() else None})
        raise
    loss = trainer.callback_metrics.get("train/loss")
    # a resumed run that had nothing left to train logged nothing: its final loss is the one it finished with
    final_loss = float(loss) if loss is not None else (run.summary() or {}).get("final_loss")
    progress = step_progress(trainer)
    return RunResult(run.path, run.checkpoint, trainer.global_step, progress.seconds, final_loss,
                     resumed_at=list(progress.resumed_at), precision=str(trainer.precision),
                     peak_memory_gib=round(peak_memory_gib(module.device), 2))
