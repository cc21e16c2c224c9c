"""What every training method shares, and the registries that find them by name.

A pretraining method is a LightningModule subclass of `PretrainMethod` that declares, in its own
module, everything the rest of the package needs to know about it (class attributes and class
methods below): its name and one-line summary, which inputs it takes (a teacher of which families, the
offline feature cache, a frozen encoder, an interpreter), the config sections it reads, the dataset
views it trains on, how it is built, its backbone (the timm model it exports) and the decoder it
exports where it pretrains one. `@register_method` makes it a `--method` choice; nothing else in the
package branches on its name. A teacher trainer (`train-teacher --kind`) registers the same way with
`@register_teacher_trainer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from timm.optim import create_optimizer_v2
from torch import nn
from torch.utils.data import Dataset

from dreamteacher.core.config import Config
from dreamteacher.core.errors import UserError
from dreamteacher.core.registry import Registry
from dreamteacher.data.images import ImageFolder
from dreamteacher.nn.optim import fused_adam, warmup_cosine

# what each input of `pretrain` is, for messages
INPUTS = {"teacher": "--teacher", "cache": "--cache", "encoder": "--encoder", "interpreter": "--interpreter"}


@dataclass
class PretrainInputs:
    """What `pretrain` hands a method beside its config: the paths the user gave (resolved from the run
    when resuming), and the teacher loaded from `teacher` (None when training reads the feature cache:
    `feature_specs` then come from the cache)."""

    teacher: str | None = None
    cache: str | None = None
    encoder: str | None = None
    interpreter: str | None = None
    teacher_model: Any = None
    feature_specs: list = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # what `resolve_inputs` read (e.g. encoder weights)

    def given(self) -> dict[str, str | None]:
        return {name: getattr(self, name) for name in INPUTS}


def log_step_losses(module: L.LightningModule, losses: dict[str, torch.Tensor]) -> None:
    """Logs the loss of each optimizer step's global batch: averaged over processes, and over the
    micro-batches of the step when gradients are accumulated (logged once, at its last micro-batch)."""
    trainer = module.trainer
    accumulate = trainer.accumulate_grad_batches
    if accumulate > 1:
        sums = module.__dict__.setdefault("_accumulated_losses", {})
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + value.detach()
        if not trainer.fit_loop.epoch_loop._accumulated_batches_reached():
            return
        losses = {name: total / accumulate for name, total in sums.items()}
        sums.clear()
    for name, value in losses.items():
        module.log(f"train/{name}", value.detach(), on_step=True, on_epoch=False, sync_dist=True)
    module.log("train/lr", trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)


def length(config: Config) -> str:
    """How long a pretraining runs, in words: its epochs, or its steps when `optim.max_steps` caps it."""
    return f"{config.optim.max_steps} steps" if config.optim.max_steps > 0 else f"{config.optim.epochs} epochs"


class SeedsOnHost(L.LightningModule):
    """A module whose batches may carry per-sample `noise_seed`s (`data.sampling.SeededSamples`): they
    stay on the host, where `seeded_noise` reads them without a device sync."""

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if isinstance(batch, dict) and "noise_seed" in batch:  # read on the host, see data.sampling.seeded_noise
            return {**super().transfer_batch_to_device({k: v for k, v in batch.items() if k != "noise_seed"},
                                                       device, dataloader_idx), "noise_seed": batch["noise_seed"]}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)


class PretrainMethod(SeedsOnHost):
    """Subclasses define `compute_losses(batch) -> {"loss": total, **parts}` and the declarations below.

    `total_steps` / `warmup_steps` are set by the caller before `fit` (they depend on data size).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line: what it does (CLI help, `info`)
    # the teacher families it distills (teachers/base.py): () = it learns from the images alone
    teacher_families: ClassVar[tuple[str, ...]] = ()
    reads_cache: ClassVar[bool] = False  # may train from the offline feature cache (--cache)
    # inputs it cannot run without, beyond a teacher where `teacher_families` is set: name -> what it is
    requires: ClassVar[dict[str, str]] = {}
    # the config sections it reads: its run's config.yaml holds these (and the live probe's `probe`),
    # a setting of any other section is refused, and the bench keys its stages on all of them
    sections: ClassVar[tuple[str, ...]] = ("data", "student", "optim", "trainer")
    decoder_head: ClassVar[str | None] = None  # the fine-tuning head its decoder.safetensors initializes

    def __init__(self, config: Config, extra: dict[str, Any] | None = None):
        super().__init__()
        self.config = config
        self.total_steps = 1
        self.warmup_steps = 0
        # saved inside every checkpoint, so that export/info/resume never have to guess
        self.save_hyperparameters({"method": self.name, "config": config.to_dict(), **(extra or {})})

    # -- declarations a method overrides ---------------------------------------------------------
    @classmethod
    def config_sections(cls) -> tuple[str, ...]:
        """The sections of its run's settings: what it reads, and the live probe the engine runs."""
        return (*cls.sections, "probe")

    @classmethod
    def owner(cls) -> str:
        return f"--method {cls.name}"

    @classmethod
    def accepts(cls) -> tuple[str, ...]:
        """The inputs it takes: a teacher (and the cache, where it reads one) and its required ones."""
        taken = ("teacher",) if cls.teacher_families else ()
        return taken + (("cache",) if cls.reads_cache else ()) + tuple(cls.requires)

    @classmethod
    def resolve_inputs(cls, inputs: PretrainInputs, model: str | None) -> dict:
        """Reads and checks the method's own inputs before anything runs; returns settings they imply
        (e.g. the frozen encoder's architecture as `student.backbone`). Default: none."""
        return {}

    @classmethod
    def check_config(cls, config: Config, inputs: PretrainInputs) -> None:
        """Checks between the resolved settings and the inputs (e.g. an interpreter's blocks). Default: none."""

    @classmethod
    def dataset(cls, images: ImageFolder, config: Config, inputs: PretrainInputs) -> Dataset:
        """The views it trains on (default: the images, flipped as `data.hflip` says)."""
        return images

    @classmethod
    def image_folder(cls, folder: str | Path, config: Config) -> ImageFolder:
        return ImageFolder(folder, config.data.resolution, hflip=config.data.hflip, on_bad_image=config.data.on_bad_image)

    @classmethod
    def needs_noise(cls, config: Config, inputs: PretrainInputs) -> bool:
        """Whether each sample carries a noise seed (`data.sampling.SeededSamples`)."""
        return False

    @classmethod
    def build(cls, config: Config, inputs: PretrainInputs) -> "PretrainMethod":
        return cls(config)

    @classmethod
    def describe_settings(cls, config: Config) -> str:
        """Its settings in words, for benchmark tables (e.g. 'denoises at sigma 0.8 for 300 epochs')."""
        return f"{length(config)}, {config.optim.name} base lr {config.optim.base_lr:g}"

    def backbone_model(self) -> nn.Module:
        """The timm model it pretrains (what `export` writes, under timm's own keys)."""
        return self.backbone.features.model

    @classmethod
    def decoder_export(cls, state_dict: dict[str, torch.Tensor], hparams: dict) -> tuple[dict, dict] | None:
        """(weights, metadata) of the pretrained decoder in a checkpoint, under the keys of the head it
        initializes (`decoder_head`); None for a method without one."""
        return None

    def extra_exports(self, run_dir: Path) -> dict[str, Path]:
        """Files beside the backbone export a method also writes at the end (e.g. a teacher checkpoint)."""
        return {}

    # -- shared behaviour ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Records where the exported backbone sits in the state dict, found from the model itself."""
        target = self.backbone_model()
        prefix = next(name for name, module in self.named_modules() if module is target)
        checkpoint["backbone_prefix"] = prefix + "."

    def compute_losses(self, batch: Any) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        losses = self.compute_losses(batch)
        log_step_losses(self, losses)
        # the parts ride along (detached) so that a non-finite loss is reported with the terms that were
        return {**{name: value.detach() for name, value in losses.items()}, "loss": losses["loss"]}

    def trainable_module(self) -> torch.nn.Module:
        return self

    def configure_optimizers(self):
        opt = self.config.optim
        lr = opt.base_lr * opt.batch_size / 256  # linear scaling rule
        # timm's factory: no weight decay on biases and norm weights (nor LARS adaptation, MoCo v3's rule)
        adam_family = any(name in opt.name.lower() for name in ("adam", "lamb"))
        kwargs = {"betas": tuple(opt.betas)} if adam_family else {"momentum": opt.momentum}
        if opt.name.lower() in ("adam", "adamw"):  # torch's own classes, which have a fused kernel
            kwargs.update(fused_adam(self.trainable_module()))
        optimizer = create_optimizer_v2(self.trainable_module(), opt=opt.name, lr=lr,
                                        weight_decay=opt.weight_decay, **kwargs)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(self.total_steps, self.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


METHODS: Registry[type[PretrainMethod]] = Registry("method")


def register_method(cls: type[PretrainMethod]) -> type[PretrainMethod]:
    """Class decorator: `cls` becomes `pretrain --method cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__}: a registered method needs a name")
    return METHODS.register(cls.name, cls)


class TeacherTrainer(SeedsOnHost):
    """A teacher trained on the user's images (`train-teacher --kind NAME`).

    Its batches are keyed like a pretraining's (`SeededSamples`): the data order, flips, crops, noise
    and timesteps of every sample come from (seed, epoch, image) alone, so a killed run resumes to the
    weights of an uninterrupted one, at any world size."""

    kind: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    family: ClassVar[str] = "diffusion"  # the teacher family it makes (teachers/base.py)
    # the config sections of its architecture; it reads these, data, teacher_train and trainer
    architecture: ClassVar[tuple[str, ...]] = ()
    sections: ClassVar[tuple[str, ...]] = ("data", "teacher_train", "trainer")
    # optimizer steps per training iteration (Lightning counts each optimizer's step)
    optimizer_steps_per_iteration: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.sections = ("data", *cls.architecture, "teacher_train", "trainer")

    @classmethod
    def config_sections(cls) -> tuple[str, ...]:
        return cls.sections

    @classmethod
    def owner(cls) -> str:
        return f"train-teacher --kind {cls.kind}"

    @classmethod
    def check_config(cls, config: Config) -> None:
        """Refuses settings it cannot train with, before any work."""

    @classmethod
    def image_folder(cls, data: Any, config: Config) -> ImageFolder:
        """The training images (default: at `data.resolution`, flipped as `data.hflip` says)."""
        return ImageFolder(data, config.data.resolution, hflip=config.data.hflip, on_bad_image=config.data.on_bad_image)

    @classmethod
    def dataset(cls, images: ImageFolder, config: Config) -> Dataset:
        """What each sample carries beside its `noise_seed` (default: the image alone)."""
        return images

    @classmethod
    def describe_settings(cls, config: Config) -> str:
        """Its training in words, for benchmark tables."""
        tt = config.teacher_train
        crop = f" on {tt.crop[0]}x{tt.crop[1]} crops" if tt.crop else ""
        steps = f"{tt.max_steps} steps" if tt.max_steps else "steps sized to the data"
        return f"{cls.kind}, {steps}{crop}, batch {tt.batch_size}"

    def save_teacher(self, folder: Path) -> None:
        """The trained teacher, in the layout its teacher kind loads."""
        raise NotImplementedError


TEACHER_TRAINERS: Registry[type[TeacherTrainer]] = Registry("teacher kind to train")


def register_teacher_trainer(cls: type[TeacherTrainer]) -> type[TeacherTrainer]:
    return TEACHER_TRAINERS.register(cls.kind, cls)


def refuse_unaccepted(method: type[PretrainMethod], inputs: PretrainInputs) -> None:
    """One line for an input the method does not take, or a required one (other than the teacher,
    which `resolve_inputs` may find) that is missing."""
    accepted = method.accepts()
    for name, value in inputs.given().items():
        if value is not None and name not in accepted:
            takes = ", ".join(INPUTS[a] for a in accepted) or "the images alone"
            raise UserError(f"{INPUTS[name]} is not an input of --method {method.name} (it takes {takes})")
    for name, what in method.requires.items():
        if getattr(inputs, name) is None:
            raise UserError(f"--method {method.name} needs {INPUTS[name]}: {what}")
