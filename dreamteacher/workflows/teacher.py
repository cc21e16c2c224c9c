"""Teachers of one's own: `train-teacher` (a DDPM or a StyleGAN2 on an unlabeled image folder), the
untrained control, and `sample`."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_only

from dreamteacher.analysis.pictures import save_grid
from dreamteacher.core.config import build_config, merge_overrides
from dreamteacher.core.hardware import say
from dreamteacher.core.runs import TEACHER, RunFolder, replace_folder
from dreamteacher.data.images import write_skipped
from dreamteacher.data.sampling import SeededSamples
from dreamteacher.engine import trainer as engine
from dreamteacher.engine.trainer import RunResult
from dreamteacher.methods.base import TEACHER_TRAINERS
from dreamteacher.teachers.base import load_teacher, sized_to_data, teacher_trainer


def resolve_config(run: RunFolder, preset: str | None, overrides: list[str] | dict | None, resume: bool,
                   sections: tuple[str, ...] | None = None, owner: str = ""):
    """A resumed run keeps its settings (overrides may still extend it); a new one is preset + overrides.
    `sections`: those its method or teacher kind reads (a setting of another is refused)."""
    saved = run.saved_config() if resume else None
    if saved is not None:
        return build_config(None, overrides, base=saved, sections=sections, owner=owner)
    return build_config(preset, overrides, sections=sections, owner=owner)


def save_atomically(folder: Path, save) -> Path:
    """`save(temp_folder)` then an atomic replacement of `folder` (core.runs.replace_folder): a kill at
    any moment leaves the previous teacher or the new one, whole."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # what a killed save left
    save(partial)
    return replace_folder(partial, folder)


def train_teacher(data: str | Path, out: str | Path, preset: str | None = None,
                  overrides: list[str] | dict | None = None, resume: bool = False,
                  progress: bool = True, kind: str = "ddpm", callbacks: list = (), **sections: dict) -> RunResult:
    """Train a teacher on an unlabeled image folder; writes `out/teacher/`, checkpoints, logs and the
    resolved config. `kind="ddpm"`: a diffusers DDPMPipeline of the EMA weights; `kind="stylegan2"`:
    the EMA generator (`generator.safetensors` + `stylegan2.json`, settings in the `gan` section).

    Settings: `preset`, then `overrides` (["teacher_train.max_steps=500"] or a nested dict), then
    section keywords, e.g. `teacher_train={"max_steps": 500}`.
    """
    trainer_cls = TEACHER_TRAINERS.get(kind)
    run = RunFolder(out)
    config = resolve_config(run, preset, merge_overrides(overrides, sections), resume, trainer_cls.config_sections(),
                            trainer_cls.owner())
    images = trainer_cls.image_folder(data, config)
    config, sized = sized_to_data(config, len(images))  # saved concrete: a resume keeps the same schedule
    trainer_cls.check_config(config)
    ckpt = run.start(resume)
    run.save_config(config)
    report_data(images, run)
    if sized and rank_zero_only.rank == 0:
        say(sized)
    engine.seed_everything(config.trainer.seed)
    tt = config.teacher_train
    steps_per_iteration = trainer_cls.optimizer_steps_per_iteration
    # every sample's order, flip, crop, noise and t keyed on (seed, epoch, image): exact resumes
    dataset = SeededSamples(trainer_cls.dataset(images, config), config.trainer.seed, noise=True)
    trainer = engine.build_trainer(teacher_trainer(config), run.path, tt.max_steps * steps_per_iteration,
                                   tt.batch_size, progress, callbacks)
    loader = engine.make_loader(dataset, tt.batch_size, trainer, config.data.num_workers, "teacher_train.batch_size",
                                seed=config.trainer.seed, micro_batch=tt.micro_batch)
    module = trainer_cls(config)
    if trainer.is_global_zero:
        print(engine.start_line(trainer_cls.owner(), dataset, tt.max_steps, tt.batch_size, trainer, loader), flush=True)
    result = engine.fit(run, trainer, module, loader, ckpt)
    result.steps //= steps_per_iteration
    result.resumed_at = [step // steps_per_iteration for step in result.resumed_at]
    result.files["teacher"] = run / TEACHER
    if trainer.is_global_zero:
        save_atomically(run / TEACHER, module.save_teacher)
        run.write_summary(summary(result, module.hparams["method"], epochs=result.steps * tt.batch_size / len(dataset)))
    return result


def report_data(images, run: RunFolder) -> None:
    """What `--data` held beyond readable images: listed in RUN/skipped-images.txt, said in one line."""
    listing = getattr(images, "listing", None)
    if listing is not None and rank_zero_only.rank == 0:
        note = write_skipped(listing, run.path)
        if note:
            say(note)


def summary(result: RunResult, method: str, epochs: float, **extra) -> dict:
    """`RUN/run.json`: what finished, in how many steps, epochs and seconds (all resumed parts)."""
    resumed = {"resumed_at": result.resumed_at} if result.resumed_at else {}
    return {"method": method, "status": "finished", "steps": result.steps, "epochs": round(epochs, 2),
            "seconds": round(result.seconds, 1), "final_loss": result.final_loss, "precision": result.precision,
            "peak_memory_gib": result.peak_memory_gib,
            "files": {k: str(v) for k, v in result.files.items()}, **resumed, **extra}


def untrained_teacher(out: str | Path, preset: str | None = None,
                      overrides: list[str] | dict | None = None, seed: int = 0, kind: str = "ddpm") -> Path:
    """The teacher of `preset` at its random initialization, saved like a trained one: the control
    that tells whether generative training is what the student learns from."""
    trainer_cls = TEACHER_TRAINERS.get(kind)
    run = RunFolder(out)
    config = build_config(preset, overrides, sections=trainer_cls.config_sections(), owner=trainer_cls.owner())
    config = sized_to_data(config, 0)[0]  # an untrained teacher's schedule is never run
    run.path.mkdir(parents=True, exist_ok=True)
    run.save_config(config)
    engine.seed_everything(seed)
    return save_atomically(run / TEACHER, trainer_cls(config).save_teacher)


def sample(run: str | Path, out: str | Path | None = None, num: int = 16, steps: int = 50, seed: int = 0,
           resolution: list[int] | None = None) -> Path:
    """A PNG grid of DDIM samples from a diffusion teacher."""
    run = Path(run)
    teacher = load_teacher(run, build_config(None, {"encode": {"blocks": [0], "t": 0}}, sections=("encode",)),
                           families=("diffusion",))
    if resolution is None:
        size = teacher.unet.config.sample_size
        resolution = list(size) if isinstance(size, (list, tuple)) else [size or 64, size or 64]
    images = teacher.sample(num, *resolution, steps=steps, generator=torch.Generator().manual_seed(seed))
    out = Path(out) if out else (run if run.is_dir() else run.parent) / "samples.png"
    save_grid(images, out)
    return out
