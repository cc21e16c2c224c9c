"""The workflows as Python functions; the CLI is a thin layer over these.

    import dreamteacher as dt
    teacher = dt.train_teacher(data="images/", out="runs/teacher", preset="cpu-small")
    run = dt.pretrain(data="images/", out="runs/student", teacher=teacher.run_dir, preset="cpu-small")
    dt.export(run.run_dir, out="backbone.safetensors")
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dreamteacher.config import Config, build_config, load_config_file, merge_overrides, save_config
from dreamteacher.data.images import ImageFolder
from dreamteacher.errors import UserError
from dreamteacher.train import engine

CONFIG_FILE = "config.yaml"


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Path
    steps: int
    seconds: float
    final_loss: float | None
    files: dict[str, Path] = field(default_factory=dict)


def _resolve_config(run_dir: Path, preset: str | None, overrides: list[str] | dict | None, resume: bool) -> Config:
    saved = run_dir / CONFIG_FILE
    if resume and saved.is_file():  # a resumed run keeps its settings; overrides may still extend it
        return build_config(None, overrides, base=load_config_file(saved))
    return build_config(preset, overrides)


def _final_loss(trainer) -> float | None:
    value = trainer.callback_metrics.get("train/loss")
    return float(value) if value is not None else None


def train_teacher(data: str | Path, out: str | Path, preset: str | None = None,
                  overrides: list[str] | dict | None = None, resume: bool = False,
                  progress: bool = True, kind: str = "ddpm", **sections: dict) -> RunResult:
    """Train a teacher on an unlabeled image folder; writes `out/teacher/`, checkpoints, logs and the
    resolved config. `kind="ddpm"`: a diffusers DDPMPipeline of the EMA weights; `kind="stylegan2"`:
    the EMA generator (`generator.safetensors` + `stylegan2.json`, settings in the `gan` section).

    Settings: `preset`, then `overrides` (["teacher_train.max_steps=500"] or a nested dict), then
    section keywords, e.g. `teacher_train={"max_steps": 500}`.
    """
    from dreamteacher.teachers.training import TeacherTraining

    if kind not in ("ddpm", "stylegan2"):
        raise UserError(f"unknown teacher kind '{kind}'; choose ddpm or stylegan2")
    overrides = merge_overrides(overrides, sections)
    run_dir = engine.check_run_dir(out)
    config = _resolve_config(run_dir, preset, overrides, resume)
    dataset = ImageFolder(data, config.data.resolution, hflip=config.data.hflip)
    ckpt = engine.prepare_run_dir(run_dir, resume)
    save_config(config, run_dir / CONFIG_FILE)
    engine.seed_everything(config.trainer.seed)
    tt = config.teacher_train
    gan = kind == "stylegan2"
    # a GAN iteration steps two optimizers, and Lightning counts optimizer steps
    optimizer_steps = tt.max_steps * (2 if gan else 1)
    trainer = engine.build_trainer(config.teacher_trainer(), run_dir, optimizer_steps, tt.batch_size, progress)
    loader = engine.make_loader(dataset, tt.batch_size, trainer, config.data.num_workers, "teacher_train.batch_size")
    if gan:
        from dreamteacher.teachers.stylegan2 import GanTraining, level_sizes

        level_sizes(config.data.resolution, len(config.gan.channels))  # a clear error before any work
        module = GanTraining(config)
    else:
        module = TeacherTraining(config)
    with warnings.catch_warnings():  # the GAN checkpoints hold the state after its steps, as intended
        warnings.filterwarnings("ignore", ".*ModelCheckpoint with manual optimization.*")
        trainer.fit(module, loader, ckpt_path=ckpt)
    trainer.save_checkpoint(engine.checkpoint_path(run_dir), weights_only=False)
    steps = trainer.global_step // (2 if gan else 1)
    result = RunResult(run_dir, engine.checkpoint_path(run_dir), steps,
                       engine.training_seconds(trainer), _final_loss(trainer), {"teacher": run_dir / "teacher"})
    if trainer.is_global_zero:
        if gan:
            module.save_generator(run_dir / "teacher")
        else:
            module.save_pipeline(run_dir / "teacher")
        _write_summary(result, f"train-teacher-{kind}" if gan else "train-teacher",
                       epochs=steps * tt.batch_size / len(dataset))
    return result


def untrained_teacher(out: str | Path, preset: str | None = None,
                      overrides: list[str] | dict | None = None, seed: int = 0) -> Path:
    """The teacher U-Net of `preset` at its random initialization, saved like a trained one: the
    control that tells whether generative training is what the student learns from."""
    from dreamteacher.teachers.training import TeacherTraining

    run_dir = Path(out)
    config = build_config(preset, overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / CONFIG_FILE)
    engine.seed_everything(seed)
    TeacherTraining(config).save_pipeline(run_dir / "teacher")
    return run_dir / "teacher"


def load_teacher(teacher: str | Path, config: Config):
    """A pretraining teacher: a GAN (StyleGAN2 generator folder or run) or any diffusion teacher."""
    from dreamteacher.teachers.diffusion import load_diffusion_teacher
    from dreamteacher.teachers.stylegan2 import GanTeacher, gan_folder, load_generator

    e = config.encode
    folder = gan_folder(teacher) if Path(teacher).is_dir() else None
    if folder is not None:
        return GanTeacher(load_generator(folder), e.blocks)
    return load_diffusion_teacher(teacher, blocks=e.blocks, t=e.t, mode=e.mode, ddim_steps=e.ddim_steps,
                                  adm_head_channels=e.adm_head_channels)


METHODS = ("dt-feat", "dt-mix", "dep", "ddep", "mocov3", "pcd")
CONTRASTIVE = ("mocov3", "pcd")  # two augmented views per image


def pretrain(data: str | Path, out: str | Path, teacher: str | Path | None = None, method: str = "dt-feat",
             model: str | None = None, preset: str | None = None, overrides: list[str] | dict | None = None,
             resume: bool = False, progress: bool = True, cache: str | Path | None = None,
             rebuild_cache: bool = False, encoder: str | Path | None = None,
             interpreter: str | Path | None = None, **sections: dict) -> RunResult:
    """Pretrain a timm backbone `model` on unlabeled images; writes checkpoints, logs, the resolved
    config, `out/run.json` and `out/backbone.safetensors` (timm keys).

    - `method="dt-feat"`: distill `teacher` (DreamTeacher). `cache`: a folder for the offline feature
      dataset (built on first use, reused after; the teacher is then not run while training).
    - `method="dt-mix"`: the same plus label distillation from an `interpreter` run (Eq. 6); the
      teacher defaults to the interpreter's. Also writes `out/decoder.safetensors`: the regressor and
      logit head as a UPerNet decoder and head (G.4).
    - `method="dep"`: denoising pretraining of a whole U-Net; `"ddep"`: of its decoder alone, on the
      frozen `encoder` (an exported backbone). Both also write `out/decoder.safetensors`.
    - `method="mocov3"`: MoCo v3 on the images; also writes `out/moco_v3.pth` (the official
      checkpoint layout), a teacher for `method="pcd"`: pixel-wise contrastive distillation from
      `teacher` (a MoCo v3 checkpoint or mocov3 run).

    Settings as in `train_teacher`: `preset`, `overrides`, then section keywords such as
    `optim={"epochs": 100}`, `encode={"t": 150}` or `denoise={"sigma": 0.5}`.
    """
    from dreamteacher.checkpoints import export_backbone, export_decoder

    job = prepare_pretraining(data, out, teacher, method, model, preset, merge_overrides(overrides, sections),
                              resume, progress, cache, rebuild_cache, encoder=encoder, interpreter=interpreter)
    trainer = job.trainer
    with warnings.catch_warnings():  # engine.ResumeMidEpoch continues an interrupted epoch where it stopped
        warnings.filterwarnings("ignore", ".*dataloader is not resumable.*")
        trainer.fit(job.module, job.loader, ckpt_path=job.resume_from)
    trainer.save_checkpoint(engine.checkpoint_path(job.run_dir), weights_only=False)
    result = RunResult(job.run_dir, engine.checkpoint_path(job.run_dir), trainer.global_step,
                       engine.training_seconds(trainer), _final_loss(trainer))
    if trainer.is_global_zero:
        result.files["backbone"] = export_backbone(result.checkpoint, job.run_dir / "backbone.safetensors")
        if method in ("dt-mix", "dep", "ddep"):  # a decoder the downstream model can start from too
            result.files["decoder"] = export_decoder(result.checkpoint, job.run_dir / "decoder.safetensors")
        if method == "mocov3":  # the teacher PCD distills, in the layout of released MoCo v3 checkpoints
            from dreamteacher.teachers.moco import MOCO_FILE, save_moco_v3

            result.files["teacher"] = save_moco_v3(job.run_dir / MOCO_FILE, job.config.student.backbone,
                                                   **job.module.moco_state())
        _write_summary(result, method, epochs=trainer.global_step / job.steps_per_epoch)
    return result


@dataclass
class PretrainingJob:
    """Everything `pretrain` fits, built but not started (also what `bench-speed` times)."""
    run_dir: Path
    config: Config
    module: torch.nn.Module
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
                        interpreter: str | Path | None = None) -> PretrainingJob:
    from dreamteacher.students.backbone import check_backbone_name

    if method not in METHODS:
        raise UserError(f"unknown method '{method}'; available: {', '.join(METHODS)}")
    run_dir = engine.check_run_dir(out)
    if resume:  # a resumed run keeps its teacher, feature cache and encoder unless told otherwise
        saved = _saved_inputs(run_dir)
        teacher = teacher if teacher is not None else saved.get("teacher")
        cache = cache if cache is not None else saved.get("cache")
        encoder = encoder if encoder is not None else saved.get("encoder")
        interpreter = interpreter if interpreter is not None else saved.get("interpreter")
    interpreter_info = None
    if method == "dt-mix":
        interpreter_info = _interpreter_info(interpreter)
        teacher = teacher if teacher is not None else interpreter_info["teacher"]
    elif interpreter is not None:
        raise UserError(f"--interpreter is for --method dt-mix, not {method}")
    encoder_weights = None
    if method == "ddep":
        if encoder is None:
            raise UserError("--method ddep needs --encoder: an exported backbone (the frozen encoder)")
        from dreamteacher.checkpoints import read_backbone_export

        encoder_name, encoder_weights, _ = read_backbone_export(encoder)
        if model and model != encoder_name:
            raise UserError(f"--model {model} differs from the encoder's model {encoder_name} ({encoder})")
        model = encoder_name
    elif encoder is not None:
        raise UserError(f"--encoder is for --method ddep (the frozen encoder), not {method}")
    if method in ("dep", "ddep", "mocov3") and (teacher is not None or cache is not None):
        raise UserError(f"--teacher and --cache are for dt-feat, dt-mix and pcd; {method} learns from the images alone")
    if method == "pcd" and cache is not None:
        raise UserError("--cache is for dt-feat and dt-mix (diffusion features); pcd runs its teacher online")
    extra = {"student": {"backbone": model}} if model else {}
    config = _resolve_config(run_dir, preset, merge_overrides(overrides, extra), resume)
    check_backbone_name(config.student.backbone)
    distills = method in ("dt-feat", "dt-mix")
    contrastive = method in CONTRASTIVE
    dataset = ImageFolder(data, config.data.resolution, hflip=config.data.hflip and not contrastive,
                          crop=config.denoise.crop if method in ("dep", "ddep") else None)
    if contrastive:
        from dreamteacher.data.views import TwoViews

        dataset = TwoViews(dataset, config.contrast.crop_scale, hflip=config.data.hflip)
    if method == "pcd":
        from dreamteacher.teachers.moco import load_moco_teacher

        if teacher is None:
            raise UserError("--method pcd needs --teacher: a MoCo v3 checkpoint or a `pretrain --method mocov3` run")
        teacher_model = load_moco_teacher(teacher)
    if distills:
        if teacher is None:
            raise UserError("--teacher is required: a train-teacher run, a diffusers folder or an ADM .pt file")
        teacher_model = load_teacher(teacher, config)
        teacher_model.check_resolution(*config.data.resolution)
    synthesized = distills and not hasattr(teacher_model, "encode")  # a GAN renders what the student sees
    augmented = bool(config.data.crop_scale) or config.data.color_jitter > 0
    if augmented and not distills:
        raise UserError(f"data.crop_scale and data.color_jitter are for distillation (dt-feat, dt-mix), not {method}")
    if synthesized:
        if augmented:
            raise UserError(f"--teacher {teacher} is a GAN: it renders the images the student sees; "
                            "data.crop_scale and data.color_jitter are for real images")
        if cache is not None or method == "dt-mix":
            raise UserError(f"--teacher {teacher} is a GAN: its dataset is synthesized online (no --cache), "
                            "and dt-mix's interpreter reads diffusion features: use --method dt-feat")
        from dreamteacher.data.images import SynthesizedSeeds

        dataset = SynthesizedSeeds(len(dataset))  # --data's image count sets the epoch length
    if interpreter_info is not None:
        _check_interpreter(interpreter, interpreter_info, teacher, config)
    ckpt = engine.prepare_run_dir(run_dir, resume)  # before a cache build: a refused run costs nothing
    if cache is not None:
        dataset = _cached_dataset(cache, teacher, teacher_model, dataset, data, config, rebuild_cache, progress)
        specs = dataset.specs
        teacher_model = None  # training reads the cache; the teacher is not needed on any device
    elif distills:
        specs = teacher_model.feature_specs
    if augmented:
        from dreamteacher.data.augment import DistillationViews

        dataset = DistillationViews(dataset, config.data.crop_scale, config.data.color_jitter)
    needs_noise = method in ("dep", "ddep") or synthesized or (
        distills and cache is None and config.encode.mode == "stochastic")
    dataset = engine.SeededSamples(dataset, config.trainer.seed, noise=needs_noise)
    save_config(config, run_dir / CONFIG_FILE)
    inputs = {"teacher": teacher, "cache": cache, "encoder": encoder, "interpreter": interpreter}
    (run_dir / INPUTS_FILE).write_text(json.dumps({k: str(Path(v).resolve()) if v else None
                                                   for k, v in inputs.items()}))
    engine.seed_everything(config.trainer.seed)
    opt = config.optim
    per_epoch = engine.steps_per_epoch(len(dataset), opt.batch_size)
    total = opt.max_steps if opt.max_steps > 0 else opt.epochs * per_epoch
    trainer = engine.build_trainer(config.trainer, run_dir, total, opt.batch_size, progress, callbacks)
    loader = engine.make_loader(dataset, opt.batch_size, trainer, config.data.num_workers, "optim.batch_size",
                                seed=config.trainer.seed)
    if distills:
        from dreamteacher.methods.dt_feat import DTFeat

        if method == "dt-mix":
            from dreamteacher.methods.dt_mix import DTMix

            module = DTMix(config, specs, teacher_model, _load_interpreter(interpreter, interpreter_info, specs),
                           interpreter_info["num_classes"], str(teacher), str(Path(interpreter).resolve()))
        else:
            module = DTFeat(config, specs, teacher_model, teacher_path=str(teacher))
    elif method == "mocov3":
        from dreamteacher.methods.mocov3 import MoCoV3

        teacher_model = None
        module = MoCoV3(config)
    elif method == "pcd":
        from dreamteacher.methods.pcd import PCD

        module = PCD(config, teacher_model, str(Path(teacher).resolve()))
    else:
        from dreamteacher.methods.denoising import DenoisingPretraining

        teacher_model = None
        module = DenoisingPretraining(config, method, encoder_weights, str(encoder or ""))
    module.total_steps = total
    module.warmup_steps = round(total * opt.warmup_epochs / max(1, opt.epochs))
    return PretrainingJob(run_dir, config, module, loader, trainer, ckpt, per_epoch, teacher_model)


def _interpreter_info(interpreter: str | Path | None) -> dict:
    if interpreter is None:
        raise UserError("--method dt-mix needs --interpreter: a `dreamteacher interpreter` run folder")
    path = Path(interpreter) / "segmenter.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    if info.get("head") != "teacher-interpreter":
        raise UserError(f"--interpreter {interpreter}: not a finished `dreamteacher interpreter` run")
    return info


def _check_interpreter(interpreter, info: dict, teacher, config: Config) -> None:
    """The interpreter reads the teacher's features: same teacher, blocks and t as it was trained on."""
    from dreamteacher.teachers.cache import teacher_fingerprint

    if Path(teacher).resolve() != Path(info["teacher"]).resolve():
        if not Path(info["teacher"]).exists() or teacher_fingerprint(teacher) != teacher_fingerprint(info["teacher"]):
            raise UserError(f"--interpreter {interpreter} was trained on the teacher {info['teacher']}, not on "
                            f"--teacher {teacher}: its soft labels would read features it never saw")
    trained = info["encode"]
    if list(trained["blocks"]) != list(config.encode.blocks) or trained["t"] != config.encode.t:
        raise UserError(f"--interpreter {interpreter} reads blocks {trained['blocks']} at t={trained['t']}; this run "
                        f"encodes blocks {config.encode.blocks} at t={config.encode.t}: set encode.blocks and "
                        "encode.t to the interpreter's")


def _load_interpreter(interpreter, info: dict, specs):
    from safetensors.torch import load_file

    from dreamteacher.downstream.interpreter import WEIGHTS_FILE
    from dreamteacher.teachers.interpreter import FeatureInterpreter

    head = FeatureInterpreter(specs, info["num_classes"], info["width"])
    head.load_state_dict(load_file(str(Path(interpreter) / WEIGHTS_FILE)), strict=True)
    return head


def _encoding_device(config: Config) -> torch.device:
    """Where the teacher encodes the feature cache: the run's GPU when it has one."""
    return torch.device("cuda" if config.trainer.accelerator != "cpu" and torch.cuda.is_available() else "cpu")


def build_feature_cache(data: str | Path, cache: str | Path, teacher: str | Path, preset: str | None = None,
                        overrides: list[str] | dict | None = None, progress: bool = True) -> float:
    """Encode `data` with `teacher` into the offline feature cache `cache` (what `pretrain(cache=...)`
    builds on first use), ahead of training: returns the seconds it took (0 when it was there)."""
    import time

    from dreamteacher.teachers.cache import open_cache, read_meta

    config = build_config(preset, overrides)
    teacher_model = load_teacher(teacher, config)
    if not hasattr(teacher_model, "encode"):
        raise UserError(f"--teacher {teacher} is a GAN: its dataset is synthesized online and has no feature cache")
    teacher_model.check_resolution(*config.data.resolution)
    images = ImageFolder(data, config.data.resolution, hflip=config.data.hflip)
    existed = read_meta(Path(cache)) is not None
    start = time.perf_counter()
    device = _encoding_device(config)
    open_cache(cache, teacher, teacher_model, images, data, config.encode.cache_encodings, device, progress=progress)
    return 0.0 if existed else time.perf_counter() - start


def _cached_dataset(cache, teacher_path, teacher_model, images: ImageFolder, data, config: Config,
                    rebuild: bool, progress: bool):
    """The images paired with their cached teacher features; rank 0 builds a missing cache while the
    other processes of a torchrun/SLURM job wait for it."""
    from lightning.pytorch.utilities import rank_zero_only

    from dreamteacher.teachers.cache import CachedFeatures, open_cache, wait_for_cache

    device = _encoding_device(config)
    if rank_zero_only.rank == 0:
        meta = open_cache(cache, teacher_path, teacher_model, images, data, config.encode.cache_encodings, device,
                          rebuild=rebuild, progress=progress)
    else:
        meta = wait_for_cache(cache, teacher_path, teacher_model, images, data, config.encode.cache_encodings)
    return CachedFeatures(images, cache, meta)


SUMMARY_FILE = "run.json"


def _write_summary(result: RunResult, method: str, epochs: float) -> None:
    """`RUN/run.json`: what finished, in how many steps, epochs and seconds (all resumed parts)."""
    summary = {"method": method, "steps": result.steps, "epochs": round(epochs, 2),
               "seconds": round(result.seconds, 1), "final_loss": result.final_loss,
               "files": {k: str(v) for k, v in result.files.items()}}
    (result.run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))


def read_summary(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


INPUTS_FILE = "inputs.json"  # teacher, feature cache, frozen encoder


def _saved_inputs(run_dir: Path) -> dict:
    """The teacher, feature cache or frozen encoder a pretraining run was started with."""
    path = run_dir / INPUTS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def export(run: str | Path, out: str | Path | None = None, format: str = "timm") -> Path:
    """The backbone alone, in `format` (timm, torchvision, smp, mmseg, detectron2; see
    `dreamteacher.checkpoints`), with a JSON beside it saying what it is and how to load it."""
    from dreamteacher.checkpoints import FORMATS, SUFFIXES, export_backbone

    if format not in FORMATS:
        raise UserError(f"unknown export format '{format}'; choose one of {', '.join(FORMATS)}")
    run = Path(run)
    ckpt = engine.checkpoint_path(run) if run.is_dir() else run
    if not ckpt.is_file():
        raise UserError(f"no training checkpoint at {ckpt}")
    if out is None:
        name = "backbone" + ("" if format == "timm" else f".{format}") + SUFFIXES[format]
        out = (run if run.is_dir() else run.parent) / name
    return export_backbone(ckpt, out, format)


def info(path: str | Path) -> dict:
    """What a run folder, training checkpoint or export holds (kind, method, backbone, teacher, step,
    parts, and how to use it)."""
    from dreamteacher.describe import describe

    return describe(path)


def sample(run: str | Path, out: str | Path | None = None, num: int = 16, steps: int = 50, seed: int = 0,
           resolution: list[int] | None = None) -> Path:
    """A PNG grid of DDIM samples from a teacher."""
    from dreamteacher.teachers.diffusion import DiffusionTeacher, load_unet_and_scheduler
    from dreamteacher.viz.images import save_grid

    run = Path(run)
    unet, scheduler = load_unet_and_scheduler(run)
    if resolution is None:
        size = unet.config.sample_size
        resolution = list(size) if isinstance(size, (list, tuple)) else [size or 64, size or 64]
    teacher = DiffusionTeacher(unet, scheduler, blocks=[0], t=0)
    images = teacher.sample(num, *resolution, steps=steps, generator=torch.Generator().manual_seed(seed))
    out = Path(out) if out else (run if run.is_dir() else run.parent) / "samples.png"
    save_grid(images, out)
    return out
