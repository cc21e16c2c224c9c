"""`dreamteacher plan`: what a pretraining will cost before anything trains.

From the same data, preset, `--set` and device settings as `train-teacher` and `pretrain`: the images
found and skipped (headers only), each stage's steps and batch split (global batch = micro-batch x
accumulated micro-batches x devices), the FLOPs per image of teacher and student, the peak memory per
device and the wall-clock per stage, measured on this machine's device with a few real training steps
(the stage's own training loop on the user's first images, not a table), and the feature cache's size
against the free disk, with whether encoding online is the better choice. A plan that cannot fit, in
memory or on disk, is refused in one line naming both figures.

The timed steps run in one process on one device; a run on N devices is estimated as N devices each
taking its share of every global batch at the measured rate (gradient all-reduce not counted).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.flop_counter import FlopCounterMode

from dreamteacher.core.config import Config, SECTIONS, as_dict, build_config, only_sections
from dreamteacher.core.errors import UserError
from dreamteacher.core.hardware import cpu_info, resolve_precision, uses_gpu
from dreamteacher.core.runs import write_json_atomic
from dreamteacher.data.images import list_sources
from dreamteacher.data.sampling import steps_per_epoch
from dreamteacher.engine.trainer import batch_split, peak_memory_gib
from dreamteacher.methods.base import METHODS, TEACHER_TRAINERS
from dreamteacher.teachers.base import sized_to_data
from dreamteacher.teachers.encoding import CACHE_BATCH
from dreamteacher.workflows.pretrain import build_feature_cache, prepare_pretraining
from dreamteacher.workflows.teacher import train_teacher, untrained_teacher

MEMORY_HEADROOM = 0.9  # a micro-batch fits when its measured peak stays under this share of the device
WARM_STEPS = 2  # untimed: allocator, kernels, image decoding


@dataclass
class StagePlan:
    """One stage of a plan: what it runs and what it costs on the planned devices."""

    name: str
    steps: int
    epochs: float
    global_batch: int
    micro_batch: int
    accumulate: int
    devices: int
    precision: str
    gflops_per_image: float | None = None  # forward
    seconds_per_micro_step: float | None = None  # measured, one device
    peak_memory_gib: float | None = None  # measured, one device, at `micro_batch`
    seconds: float | None = None  # the whole stage on the planned devices
    notes: list[str] = field(default_factory=list)


class StepTimer(Callback):
    """Wall-clock of each training batch after the first `warm` ones, and the peak device memory."""

    def __init__(self, warm: int):
        self.warm, self.times, self._last = warm, [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(pl_module)
        if batch_idx >= self.warm:
            self.times.append(time.perf_counter() - self._last)

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)


def device_memory_gib(device: torch.device, processes: int = 1) -> float:
    """A device's memory: the GPU's, or the machine's RAM shared by the processes on it."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 / max(1, processes)


def world_size(config: Config) -> tuple[int, torch.device, str]:
    """(processes, the device one of them uses, its name) of the run `config` describes."""
    t = config.trainer
    gpu = uses_gpu(t.accelerator)
    if gpu and not torch.cuda.is_available():
        raise UserError(f"trainer.accelerator={t.accelerator}: no CUDA GPU is visible to torch on this machine")
    if t.devices == "auto" or t.devices == -1:
        devices = torch.cuda.device_count() if gpu else 1
    elif isinstance(t.devices, (list, tuple)):
        devices = len(t.devices)
    else:
        devices = int(t.devices)
    device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
    name = torch.cuda.get_device_name(device) if gpu else f"CPU {cpu_info()['model']} ({torch.get_num_threads()} threads)"
    return devices * t.num_nodes, device, name


def timing_images(listing, count: int, folder: Path) -> Path:
    """A text file naming the first `count` images of the data (repeated when there are fewer; images in
    shards are copied out first): the timed steps decode the user's own images."""
    from dreamteacher.data.images import ShardReader  # noqa: PLC0415

    reader = ShardReader(listing.shards) if listing.shards else None
    shard_index = {path: i for i, path in enumerate(listing.shards)}
    paths = []
    for i, ref in enumerate(listing.images[:count]):
        if ref.member < 0:
            paths.append(ref.path)
        else:
            image = reader.read(shard_index[ref.path], ref.member, ref.extension)
            path = folder / f"shard-image-{i:05d}"
            path.write_bytes(image.getvalue())
            from PIL import Image  # noqa: PLC0415

            with Image.open(path) as img:
                suffix = "." + (img.format or "png").lower().replace("jpeg", "jpg")
            paths.append(path.rename(path.with_suffix(suffix)))
    listed = folder / "timing-images.txt"
    listed.write_text("".join(f"{paths[i % len(paths)]}\n" for i in range(count)))
    return listed


def forward_gflops(module, *inputs) -> float:
    """Forward GFLOPs (multiply-adds counted twice) of `module` on `inputs`, in eval mode (a BatchNorm
    cannot normalize one image's 1x1 map in training mode)."""
    training = getattr(module, "training", False)
    if hasattr(module, "eval"):
        module.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    if training:
        module.train()
    return counter.get_total_flops() / 1e9


def time_stage(run, micro: int, device: torch.device, memory_gib: float, micro_fixed: bool,
               divides: int) -> tuple[int, float, float]:
    """(micro-batch, seconds per micro-step, peak GiB) from real steps `run(micro, timer)` at the
    largest micro-batch that fits: the one asked for, or (auto) halved from the whole per-device share
    until its peak stays under the headroom. A micro-batch asked for that does not fit is refused."""
    while True:
        timer = StepTimer(WARM_STEPS)
        try:
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                run(micro, timer)  # the timing run's own start lines stay out of the plan's output
            peak = peak_memory_gib(device)
            fits = peak <= MEMORY_HEADROOM * memory_gib
        except torch.cuda.OutOfMemoryError:
            peak, fits = math.inf, False
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        if fits:
            return micro, sum(timer.times) / max(1, len(timer.times)), peak
        smaller = next((m for m in range(micro // 2, 0, -1) if divides % m == 0), None)
        if micro_fixed or smaller is None:
            need = "more than" if math.isinf(peak) else f"{peak:.1f} GiB,"
            raise UserError(f"plan: a micro-batch of {micro} per device needs {need} the device has "
                            f"{memory_gib:.1f} GiB ({MEMORY_HEADROOM:.0%} usable): lower the micro_batch setting "
                            "(gradients are accumulated to the same global batch)")
        micro = smaller


def plan(data, preset: str | None = None, overrides: list[str] | dict | None = None, method: str | None = "dt-feat",
         teacher: str | Path | None = None, kind: str = "ddpm", cache: str | Path | None = None,
         out: str | Path | None = None, timed_steps: int = 3, progress: bool = False) -> dict:
    """The plan of `train-teacher --kind KIND` (unless `teacher` is given) and `pretrain --method METHOD`
    (unless None) on `data`: returned, and written as JSON to `out` when given."""
    method_cls = METHODS.get(method) if method else None
    if method_cls is not None and method_cls.requires:
        raise UserError(f"plan: --method {method} needs {', '.join(method_cls.requires)}; plan dt-feat for its cost "
                        "(the same steps and teacher), or plan the inputs' own runs")
    trainable = {cls.family for _, cls in TEACHER_TRAINERS.items()}
    needs_teacher = method_cls is None or bool(set(method_cls.teacher_families) & trainable)
    trainer_cls = TEACHER_TRAINERS.get(kind) if teacher is None and needs_teacher else None
    if method_cls is None and trainer_cls is None:
        raise UserError("plan: nothing to plan (give --method, or no --teacher to plan its training)")
    user = as_dict(overrides)
    kinds = [k for k in (trainer_cls, method_cls) if k is not None]
    read = {s for k in kinds for s in k.config_sections()}
    foreign = [s for s in user if s not in read]
    if foreign:
        known = ", ".join(k.owner() for k in kinds)
        raise UserError(f"plan: {known} do not read the '{foreign[0]}' section" if foreign[0] in SECTIONS else
                        f"unknown setting '{foreign[0]}'")
    configs = {k: build_config(preset, only_sections(user, k.config_sections()), sections=k.config_sections(),
                               owner=k.owner()) for k in kinds}
    first = configs[kinds[0]]
    listing = list_sources(data, first.data.resolution, first.data.on_bad_image)
    images = len(listing.images)
    world, device, device_name = world_size(first)
    memory = device_memory_gib(device, 1 if device.type == "cuda" else world // first.trainer.num_nodes)
    result = {"data": {"sources": [str(d) for d in (data if isinstance(data, (list, tuple)) else [data])],
                       "images": images, "skipped": len(listing.skipped), "shards": len(listing.shards)},
              "device": {"name": device_name, "processes": world, "memory_gib_per_device": round(memory, 1)},
              "stages": []}
    say = (lambda line: print(line, flush=True)) if progress else (lambda line: None)
    with tempfile.TemporaryDirectory(prefix="dreamteacher-plan-") as work:
        work = Path(work)
        stages: list[StagePlan] = []
        teacher_path = teacher
        if trainer_cls is not None:
            config, _ = sized_to_data(configs[trainer_cls], images)
            stage, teacher_path = plan_teacher(trainer_cls, config, preset, user, listing, world, device, memory,
                                               work, timed_steps, say)
            stages.append(stage)
        if method_cls is not None:
            config = configs[method_cls]
            if teacher_path is None and method_cls.teacher_families:
                raise UserError(f"plan: --method {method} needs --teacher (or no --teacher, to plan training one)")
            cache_plan, student = plan_student(method_cls, config, preset, user, listing, world, device, memory, work,
                                               teacher_path, cache, timed_steps, say)
            if cache_plan is not None:
                result["cache"] = cache_plan
                if cache_plan.get("stage"):
                    stages.append(cache_plan.pop("stage"))
            stages.append(student)
        result["stages"] = [asdict(s) for s in stages]
    result["seconds"] = round(sum(s["seconds"] or 0 for s in result["stages"]), 1)
    result["summary"] = summary_line(result)
    if out is not None:
        write_json_atomic(Path(out), result)
    return result


def plan_teacher(trainer_cls, config: Config, preset, user: dict, listing, world: int, device: torch.device,
                 memory: float, work: Path, timed_steps: int, say) -> tuple[StagePlan, Path]:
    tt = config.teacher_train
    micro, accumulate = batch_split(tt.batch_size, world, tt.micro_batch, "teacher_train.batch_size")
    per_device = micro * accumulate
    precision = resolve_precision(tt.precision or config.trainer.precision, config.trainer.accelerator)[0]
    module = trainer_cls(config)
    unet = getattr(module, "unet", None)
    gflops = None
    if unet is not None:
        size = tt.crop or config.data.resolution
        gflops = forward_gflops(lambda x: unet(x, torch.zeros(1, dtype=torch.long)), torch.zeros(1, 3, *size))
    steps = WARM_STEPS + timed_steps
    listed = timing_images(listing, per_device * steps, work)
    say(f"plan: timing {trainer_cls.owner()} on {device}")

    def run(m: int, timer: StepTimer) -> None:
        layer = only_sections(user, trainer_cls.config_sections())
        layer = {**layer, "teacher_train": {**layer.get("teacher_train", {}), "batch_size": m, "micro_batch": 0,
                                            "max_steps": steps, "warmup_steps": 1, "ema_decay": tt.ema_decay},
                 "trainer": {**layer.get("trainer", {}), "devices": 1, "num_nodes": 1, "strategy": "auto",
                             "checkpoint_every_n_steps": 10**6, "loggers": ["csv"]}}
        shutil.rmtree(work / "teacher-timing", ignore_errors=True)
        train_teacher(listed, work / "teacher-timing", preset, layer, progress=False, kind=trainer_cls.kind,
                      callbacks=[timer])

    asked = micro
    micro, seconds, peak = time_stage(run, micro, device, memory, bool(tt.micro_batch), per_device)
    accumulate = per_device // micro
    stage = StagePlan(trainer_cls.owner(), tt.max_steps, round(tt.max_steps * tt.batch_size / len(listing.images), 2),
                      tt.batch_size, micro, accumulate, world, precision,
                      round(gflops, 2) if gflops is not None else None, round(seconds, 4), round(peak, 2),
                      round(tt.max_steps * accumulate * seconds, 1))
    if micro != asked:
        stage.notes.append(f"the whole share of {asked} per device does not fit: set teacher_train.micro_batch={micro}")
    teacher = untrained_teacher(work / "teacher", preset, only_sections(user, trainer_cls.config_sections()),
                                kind=trainer_cls.kind)  # the same architecture: the same cost downstream
    return stage, teacher


def cache_bytes(specs, images: int, encodings: int, resolution: list[int]) -> int:
    height, width = resolution
    return images * encodings * sum(s.channels * (height // s.stride) * (width // s.stride) for s in specs) * 2


def plan_student(method_cls, config: Config, preset, user: dict, listing, world: int, device: torch.device,
                 memory: float, work: Path, teacher, cache, timed_steps: int, say) -> tuple[dict | None, StagePlan]:
    opt = config.optim
    micro, accumulate = batch_split(opt.batch_size, world, opt.micro_batch, "optim.batch_size")
    per_device = micro * accumulate
    images = len(listing.images)
    per_epoch = steps_per_epoch(images, opt.batch_size)
    total = opt.max_steps if opt.max_steps > 0 else opt.epochs * per_epoch
    precision = resolve_precision(config.trainer.precision, config.trainer.accelerator)[0]
    steps = WARM_STEPS + timed_steps
    listed = timing_images(listing, per_device * steps, work)
    cache_plan = None
    use_cache = False
    if method_cls.reads_cache and teacher is not None:
        from dreamteacher.teachers.base import load_teacher  # noqa: PLC0415

        model = load_teacher(teacher, config, method_cls.teacher_families)
        if hasattr(model, "encode"):
            encodings = config.encode.cache_encodings
            need = cache_bytes(model.feature_specs, images, encodings, config.data.resolution)
            where = Path(cache) if cache else Path.cwd()
            probe = where if where.exists() else next((p for p in where.parents if p.exists()), Path.cwd())
            free = shutil.disk_usage(probe).free
            epochs = total / per_epoch
            cache_plan = {"path": str(where), "bytes": need, "free_bytes": free, "images": images,
                          "encodings": encodings, "fits": need <= free,
                          "online_is_better": need > free or epochs <= encodings}
            why = (f"it needs {need / 2**30:,.1f} GiB and {free / 2**30:,.1f} GiB are free at {probe}" if need > free
                   else f"the student sees each image {epochs:.1f} times, no more than the {encodings} cached encodings"
                   if epochs <= encodings else
                   f"{encodings} encodings per image once, against one per image per epoch online ({epochs:.0f} epochs)")
            cache_plan["advice"] = ("encode online: " if cache_plan["online_is_better"] else "use the cache: ") + why
            if cache is not None and need > free:
                raise UserError(f"plan: the feature cache needs {need / 2**30:,.1f} GiB ({images:,} images x {encodings} "
                                f"encodings) and {probe} has {free / 2**30:,.1f} GiB free: lower encode.cache_encodings "
                                "or choose another --cache, or encode online (no --cache)")
            use_cache = cache is not None or not cache_plan["online_is_better"]
    say(f"plan: timing {method_cls.owner()} on {device}" + (" from a feature cache" if use_cache else ""))
    gflops = None

    def run(m: int, timer: StepTimer) -> None:
        nonlocal gflops
        layer = only_sections(user, method_cls.config_sections())
        layer = {**layer, "optim": {**layer.get("optim", {}), "batch_size": m, "micro_batch": 0, "max_steps": steps},
                 "trainer": {**layer.get("trainer", {}), "devices": 1, "num_nodes": 1, "strategy": "auto",
                             "checkpoint_every_n_steps": 10**6, "loggers": ["csv"]},
                 "probe": {"images": ""}}
        shutil.rmtree(work / "student-timing", ignore_errors=True)
        job = prepare_pretraining(listed, work / "student-timing", teacher, method=method_cls.name, preset=preset,
                                  overrides=layer, progress=False, callbacks=[timer],
                                  cache=work / "cache" if use_cache else None)
        if gflops is None:
            backbone = job.module.backbone_model()
            gflops = forward_gflops(backbone, torch.zeros(1, 3, *config.data.resolution))
        job.trainer.fit(job.module, job.loader)

    cache_seconds = None
    if use_cache:  # the timing run builds a cache of its own images: its encoding rate prices the real one
        start = time.perf_counter()
        build_feature_cache(listed, work / "cache", teacher, preset, only_sections(user, method_cls.config_sections()),
                            progress=False)
        per_image = (time.perf_counter() - start) / (per_device * steps * config.encode.cache_encodings)
        cache_seconds = round(per_image * images * config.encode.cache_encodings / max(1, world), 1)
    asked = micro
    micro, seconds, peak = time_stage(run, micro, device, memory, bool(opt.micro_batch), per_device)
    accumulate = per_device // micro
    stage = StagePlan(method_cls.owner(), total, round(total / per_epoch, 2), opt.batch_size, micro, accumulate, world,
                      precision, round(gflops, 2) if gflops is not None else None, round(seconds, 4), round(peak, 2),
                      round(total * accumulate * seconds, 1))
    if micro != asked:
        stage.notes.append(f"the whole share of {asked} per device does not fit: set optim.micro_batch={micro}")
    if cache_plan is not None:
        stage.notes.append("reads the feature cache" if use_cache else "encodes online (the teacher runs every step)")
        if cache_seconds is not None:
            passes = math.ceil(images / (CACHE_BATCH * world)) * config.encode.cache_encodings
            cache_plan["stage"] = StagePlan("feature cache", passes, float(config.encode.cache_encodings), CACHE_BATCH,
                                            CACHE_BATCH, 1, world, precision, seconds=cache_seconds,
                                            notes=[f"{images:,} images x {config.encode.cache_encodings} encodings: "
                                                   f"teacher forward passes of {CACHE_BATCH} images on each device"])
    return cache_plan, stage


def hours(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def summary_line(result: dict) -> str:
    data, device = result["data"], result["device"]
    parts = [f"{s['name']} {s['steps']:,} steps, {hours(s['seconds'])}" for s in result["stages"]]
    return (f"plan: {data['images']:,} images ({data['skipped']} skipped); " + "; ".join(parts)
            + f"; {hours(result['seconds'])} on {device['processes']} x {device['name']}")


def format_plan(result: dict) -> str:
    """The plan as a table for the terminal."""
    lines = [f"data: {result['data']['images']:,} images, {result['data']['skipped']} skipped"
             + (f", {result['data']['shards']} shards" if result["data"]["shards"] else ""),
             f"device: {result['device']['processes']} x {result['device']['name']}, "
             f"{result['device']['memory_gib_per_device']} GiB each", "",
             f"{'stage':<28}{'steps':>10}{'epochs':>8}{'batch':>16}{'GFLOPs/img':>12}{'s/micro-step':>14}"
             f"{'peak GiB':>10}{'time':>9}"]
    for s in result["stages"]:
        split = f"{s['global_batch']}={s['micro_batch']}x{s['accumulate']}x{s['devices']}"
        gflops = f"{s['gflops_per_image']:.1f}" if s["gflops_per_image"] is not None else "-"
        micro = f"{s['seconds_per_micro_step']:.3f}" if s["seconds_per_micro_step"] is not None else "-"
        peak = f"{s['peak_memory_gib']:.1f}" if s["peak_memory_gib"] is not None else "-"
        lines.append(f"{s['name']:<28}{s['steps']:>10,}{s['epochs']:>8}{split:>16}{gflops:>12}{micro:>14}{peak:>10}"
                     f"{hours(s['seconds']):>9}")
        for note in s["notes"]:
            lines.append(f"  {note}")
    cache = result.get("cache")
    if cache:
        lines += ["", f"feature cache: {cache['bytes'] / 2**30:,.1f} GiB ({cache['images']:,} images x "
                  f"{cache['encodings']} encodings), {cache['free_bytes'] / 2**30:,.1f} GiB free at {cache['path']}; "
                  f"{cache['advice']}"]
    lines += ["", result["summary"]]
    return "\n".join(lines)
