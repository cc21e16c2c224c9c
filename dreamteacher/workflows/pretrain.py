"""`pretrain`: any registered method (methods/), from checking its inputs to the exported backbone.

Nothing here knows a method by name: a method declares its inputs, views, teacher families and exports
(`methods/base.py`), and this module runs the same steps for all of them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from lightning.pytorch.utilities import rank_zero_only
from safetensors.torch import load_file

from dreamteacher.core.config import Config, as_dict, build_config, merge_overrides, only_sections
from dreamteacher.core.errors import UserError
from dreamteacher.core.runs import BACKBONE, DECODER, SUMMARY, RunFolder, read_json
from dreamteacher.data.features import CachedFeatures, read_meta
from dreamteacher.data.images import ImageFolder
from dreamteacher.data.sampling import SeededSamples, steps_per_epoch
from dreamteacher.engine import trainer as engine
from dreamteacher.engine.probe import DenseProbe, load_probe_data, probe_summary, read_probe_log
from dreamteacher.engine.trainer import RunResult
from dreamteacher.export.checkpoints import export_backbone, export_decoder
from dreamteacher.methods.base import METHODS, PretrainInputs, PretrainMethod, refuse_unaccepted
from dreamteacher.nn.backbone import check_backbone_name
from dreamteacher.nn.weights import load_timm_weights, non_finite_tensors
from dreamteacher.teachers.base import load_teacher
from dreamteacher.teachers.encoding import open_cache, wait_for_cache
from dreamteacher.workflows.teacher import report_data, resolve_config, summary


@dataclass
class PretrainingJob:
    """Everything `pretrain` fits, built but not started (also what `bench-speed` times)."""
    run_dir: Path
    config: Config
    module: PretrainMethod
    loader: torch.utils.data.DataLoader
    trainer: object
    resume_from: Path | None
    steps_per_epoch: int
    teacher: object


def prepare_pretraining(data: str | Path, out: str | Path, teacher: str | Path | None = None,
                        method: str = "dt-feat", model: str | None = None, preset: str | None = None,
                        overrides: list[str] | dict | None = None, resume: bool = False, progress: bool = True,
                        cache: str | Path | None = None, rebuild_cache: bool = False,
                        callbacks: list = (), encoder: str | Path | None = None,
                        interpreter: str | Path | None = None, init: str | Path | None = None) -> PretrainingJob:
    """Checks everything and builds the job; refused inputs cost nothing (no folder, no cache)."""
    method_cls = METHODS.get(method)
    run = RunFolder(out)
    inputs = PretrainInputs(*(str(v) if v is not None else None for v in (teacher, cache, encoder, interpreter)))
    if resume:  # a resumed run keeps its teacher, feature cache, encoder and interpreter unless told otherwise
        for name, saved in run.inputs().items():
            if getattr(inputs, name, None) is None and saved is not None:
                setattr(inputs, name, saved)
    refuse_unaccepted(method_cls, inputs)
    implied = method_cls.resolve_inputs(inputs, model)  # e.g. dt-mix's teacher, ddep's architecture
    if method_cls.teacher_families and inputs.teacher is None:
        raise UserError(f"--method {method} needs --teacher: a {' or '.join(method_cls.teacher_families)} teacher")
    extra = merge_overrides({"student": {"backbone": model}} if model else {}, implied)
    config = resolve_config(run, preset, merge_overrides(overrides, extra or {}), resume, method_cls.config_sections(),
                            method_cls.owner())
    check_backbone_name(config.student.backbone)
    images = method_cls.image_folder(data, config)
    if inputs.teacher is not None:
        inputs.teacher_model = load_teacher(inputs.teacher, config, method_cls.teacher_families)
        inputs.teacher_model.check_resolution(*config.data.resolution)
        inputs.feature_specs = list(getattr(inputs.teacher_model, "feature_specs", []))  # a feature teacher's
    method_cls.check_config(config, inputs)
    init_weights = read_init(init, config.student.backbone) if init is not None and not resume else None
    probe_data = load_probe_data(config.probe, config.data.resolution) if config.probe.images else None
    reference = None  # the teacher's features of the probe's pictures, drawn once
    if probe_data is not None and len(probe_data.pictures) and hasattr(inputs.teacher_model, "encode"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            reference_feats = [f.cpu() for f in inputs.teacher_model.encode(probe_data.pictures)]
        reference = lambda images: reference_feats  # noqa: E731
    ckpt = run.start(resume)  # before a cache build: a refused run costs nothing
    report_data(images, run)
    dataset = images
    if inputs.cache is not None:
        dataset = cached_dataset(inputs, images, config, rebuild_cache, progress)
        inputs.feature_specs = dataset.specs
        inputs.teacher_model = None  # training reads the cache; the teacher is not needed on any device
    dataset = SeededSamples(method_cls.dataset(dataset, config, inputs), config.trainer.seed,
                            noise=method_cls.needs_noise(config, inputs))
    run.save_config(config)
    if rank_zero_only.rank == 0:
        run.save_inputs(inputs.given())
    engine.seed_everything(config.trainer.seed)
    opt = config.optim
    per_epoch = steps_per_epoch(len(dataset), opt.batch_size)
    total = opt.max_steps if opt.max_steps > 0 else opt.epochs * per_epoch
    if probe_data is not None:
        callbacks = [*callbacks, DenseProbe(config.probe, probe_data, config.student.backbone, run.path, per_epoch,
                                            reference)]
    trainer = engine.build_trainer(config.trainer, run.path, total, opt.batch_size, progress, callbacks)
    loader = engine.make_loader(dataset, opt.batch_size, trainer, config.data.num_workers, "optim.batch_size",
                                seed=config.trainer.seed, micro_batch=opt.micro_batch)
    module = method_cls.build(config, inputs)
    if init_weights is not None:  # the user's weights (ImageNet's, an earlier export) as the starting point
        load_timm_weights(module.backbone_model(), init_weights, str(init))
    module.total_steps = total
    module.warmup_steps = round(total * opt.warmup_epochs / opt.epochs)
    if trainer.is_global_zero:
        print(engine.start_line(method_cls.owner(), dataset, total, opt.batch_size, trainer, loader), flush=True)
    return PretrainingJob(run.path, config, module, loader, trainer, ckpt, per_epoch, inputs.teacher_model)


def pretrain(data: str | Path, out: str | Path, teacher: str | Path | None = None, method: str = "dt-feat",
             model: str | None = None, preset: str | None = None, overrides: list[str] | dict | None = None,
             resume: bool = False, progress: bool = True, cache: str | Path | None = None,
             rebuild_cache: bool = False, encoder: str | Path | None = None,
             interpreter: str | Path | None = None, init: str | Path | None = None, **sections: dict) -> RunResult:
    """Pretrain a timm backbone `model` on unlabeled images with `method` (`dreamteacher pretrain
    --help` lists them); writes checkpoints, logs, the resolved config, `out/run.json` and
    `out/backbone.safetensors` (timm keys), and `out/decoder.safetensors` where the method pretrains
    a decoder (dep, ddep, dt-mix).

    - `method="dt-feat"`: distill `teacher` (DreamTeacher). `cache`: a folder for the offline feature
      dataset (built on first use, reused after; the teacher is then not run while training).
    - `method="dt-mix"`: the same plus label distillation from an `interpreter` run (Eq. 6); the
      teacher defaults to the interpreter's.
    - `method="dep"`: denoising pretraining of a whole U-Net; `"ddep"`: of its decoder alone, on the
      frozen `encoder` (an exported backbone).
    - `method="mocov3"`: MoCo v3 on the images; also writes `out/moco_v3.pth` (the official
      checkpoint layout), a teacher for `method="pcd"`: pixel-wise contrastive distillation from
      `teacher` (a MoCo v3 checkpoint or mocov3 run).

    `init`: weights the student starts from instead of random init (timm-keyed safetensors, a `.pth`
    state dict, or one of our exports), checked strictly against the backbone. With `probe` settings
    (`probe={"images": ..., "masks": ..., "num_classes": ...}`) the backbone is measured every few
    epochs while it trains (engine/probe.py); `run.json` then holds the first, last and best values.

    Settings: `preset`, `overrides` (["optim.epochs=10"] or a nested dict), then section keywords such
    as `optim={"epochs": 100}`, `encode={"t": 150}` or `denoise={"sigma": 0.5}`.
    """
    job = prepare_pretraining(data, out, teacher, method, model, preset, merge_overrides(overrides, sections),
                              resume, progress, cache, rebuild_cache, encoder=encoder, interpreter=interpreter,
                              init=init)
    run = RunFolder(job.run_dir)
    result = engine.fit(run, job.trainer, job.module, job.loader, job.resume_from)
    if job.trainer.is_global_zero:
        result.files["backbone"] = export_backbone(result.checkpoint, run / BACKBONE)
        if job.module.decoder_head:  # a decoder the downstream model can start from too
            result.files["decoder"] = export_decoder(result.checkpoint, run / DECODER)
        result.files.update(job.module.extra_exports(run.path))
        probed = probe_summary(read_probe_log(run.path))
        run.write_summary(summary(result, method, epochs=result.steps / job.steps_per_epoch,
                                  **({"probe": probed} if probed else {})))
        engine.log_artifacts(job.trainer, [*result.files.values(), run / SUMMARY])
    return result


def read_init(path: str | Path, backbone: str) -> dict[str, torch.Tensor]:
    """Starting weights for the student: one of our exports, timm-keyed safetensors, or a `.pth` /
    `.pt` state dict (plain, or under `state_dict` / `model`, DataParallel's `module.` stripped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--init {path}: file not found")
    if path.suffix == ".safetensors":
        try:
            weights = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - truncated or foreign files
            raise UserError(f"--init {path}: not a readable safetensors file ({exc.__class__.__name__})") from None
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"--init {path}: not a readable PyTorch state dict ({exc.__class__.__name__})") from None
        if isinstance(loaded, dict):
            loaded = loaded.get("state_dict", loaded.get("model", loaded))
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise UserError(f"--init {path}: not a state dict of tensors")
        weights = {k.removeprefix("module."): v for k, v in loaded.items()}
    bad = non_finite_tensors(weights)
    if bad:
        raise UserError(f"--init {path}: {len(bad)} tensors hold NaN or infinite values (e.g. {bad[0]})")
    check = timm.create_model(backbone, pretrained=False, num_classes=0)
    load_timm_weights(check, weights, f"--init {path} (for {backbone})")
    return weights


def encoding_device(config: Config) -> torch.device:
    """Where the teacher encodes the feature cache: the run's GPU when it has one."""
    return torch.device("cuda" if config.trainer.accelerator != "cpu" and torch.cuda.is_available() else "cpu")


def launched_together() -> tuple[int, int, str]:
    """(rank, world size, the job's run id) when every process of the job was started at once by
    torchrun or SLURM, so that all can build the feature cache together; (0, 1, "") otherwise (one
    process, or Lightning's own launcher, which starts the others after the first has prepared)."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env and int(env.get("WORLD_SIZE", 1)) > 1:
        return (int(env["RANK"]), int(env["WORLD_SIZE"]),
                f"torchrun:{env['TORCHELASTIC_RUN_ID']}:{env.get('TORCHELASTIC_RESTART_COUNT', 0)}")
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in env:
        return (int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                f"slurm:{env['SLURM_JOB_ID']}:{env.get('SLURM_STEP_ID', '')}:{env.get('SLURM_RESTART_COUNT', 0)}")
    return 0, 1, ""


def cached_dataset(inputs: PretrainInputs, images: ImageFolder, config: Config, rebuild: bool,
                   progress: bool) -> CachedFeatures:
    """The images paired with their cached teacher features. A missing cache is built by every process
    of a torchrun/SLURM job, each its share (`launched_together`); when Lightning starts the processes,
    the first builds it before the others exist, and they find it."""
    if not hasattr(inputs.teacher_model, "encode"):
        raise UserError(f"--teacher {inputs.teacher} is a GAN: its dataset is synthesized online and has no "
                        "feature cache (no --cache)")
    encodings = config.encode.cache_encodings
    rank, world, launch = launched_together()
    meta = None
    if rank_zero_only.rank == 0 or world > 1:  # started together: every process encodes its share
        meta = open_cache(inputs.cache, inputs.teacher, inputs.teacher_model, images, encodings,
                          encoding_device(config), rebuild=rebuild, progress=progress, rank=rank, world=world,
                          launch=launch)
    if meta is None:
        meta = wait_for_cache(inputs.cache, inputs.teacher, inputs.teacher_model, images, encodings)
    return CachedFeatures(images, inputs.cache, meta)


CACHE_SECTIONS = ("data", "encode", "trainer")  # what building the feature cache reads


def build_feature_cache(data: str | Path, cache: str | Path, teacher: str | Path, preset: str | None = None,
                        overrides: list[str] | dict | None = None, progress: bool = True) -> float:
    """Encode `data` with `teacher` into the offline feature cache `cache` (what `pretrain(cache=...)`
    builds on first use), ahead of training: returns the seconds it took (0 when it was there)."""
    config = build_config(preset, only_sections(as_dict(overrides), CACHE_SECTIONS), sections=CACHE_SECTIONS,
                          owner="the feature cache")
    inputs = PretrainInputs(teacher=str(teacher), cache=str(cache))
    inputs.teacher_model = load_teacher(teacher, config, ("diffusion", "gan"))
    inputs.teacher_model.check_resolution(*config.data.resolution)
    images = ImageFolder(data, config.data.resolution, hflip=config.data.hflip, on_bad_image=config.data.on_bad_image)
    existed = read_meta(Path(cache)) is not None
    start = time.perf_counter()
    cached_dataset(inputs, images, config, rebuild=False, progress=progress)
    return 0.0 if existed else time.perf_counter() - start


def read_summary(run_dir: str | Path) -> dict | None:
    return read_json(Path(run_dir) / SUMMARY)
