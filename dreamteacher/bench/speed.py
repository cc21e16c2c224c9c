"""`dreamteacher bench-speed`: where a DreamTeacher pretraining step spends its time.

On the same batches it times each part alone (data loading, teacher encode, student forward/backward
with the regressor, loss and optimizer step) and then the whole step as `pretrain` runs it (Lightning,
logging and checkpoints included), online and from the offline feature cache. Steady state only:
the first epoch (image decoding, allocator warm-up, compilation) is run but not timed.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

from dreamteacher.core.config import as_dict, build_config, only_sections
from dreamteacher.core.errors import UserError
from dreamteacher.core.hardware import cpu_info, resolve_precision
from dreamteacher.core.runs import write_text_atomic
from dreamteacher.data.sampling import seeded_noise
from dreamteacher.methods.base import METHODS, TEACHER_TRAINERS
from dreamteacher.workflows.pretrain import prepare_pretraining
from dreamteacher.workflows.teacher import untrained_teacher


class EpochTimer(Callback):
    """Wall-clock of each training epoch (batch fetches included)."""

    def __init__(self):
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        _sync(pl_module.device)
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        _sync(pl_module.device)
        self.seconds.append(time.perf_counter() - self._start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def write_scenes(folder: Path, count: int, seed: int = 0) -> Path:
    """Synthetic 480x360 JPEGs (gradients + rectangles) so that decoding and resizing cost what
    camera frames cost."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:360, 0:480] / 480
    for i in range(count):
        img = np.stack([yy * rng.uniform(50, 250), xx * rng.uniform(50, 250), (yy + xx) * 90], -1)
        for _ in range(12):
            y, x = rng.integers(0, 320), rng.integers(0, 440)
            img[y:y + 40, x:x + 40] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 8, img.shape)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"scene_{i:04d}.jpg", quality=90)
    return folder


def _autocast(device: torch.device, precision: str):
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def time_parts(job, device: torch.device, epochs: int = 2) -> dict:
    """Seconds per step of each part alone, over the batches of the last of `epochs` loader passes."""
    module = job.module
    precision = resolve_precision(job.config.trainer.precision, job.config.trainer.accelerator)[0]
    for _ in range(epochs - 1):  # warm pass: decodes images into the in-memory cache
        for _ in job.loader:
            pass
    start = time.perf_counter()
    batches = [module.transfer_batch_to_device(batch, device, 0) for batch in job.loader]
    _sync(device)
    data = (time.perf_counter() - start) / len(batches)

    module.place(device)
    module.train()
    with _autocast(device, precision):
        module.teacher_features(batches[0])  # warm-up (allocator, kernels)
        _sync(device)
        start = time.perf_counter()
        targets = [module.teacher_features(batch)[1] for batch in batches]  # the online path of the step
        _sync(device)
    teacher = (time.perf_counter() - start) / len(batches)
    teacher_model, t = job.teacher, job.teacher.t
    teacher_full = None
    if teacher_model.mode == "stochastic":  # the same encodings without the early exit
        with _autocast(device, precision), torch.no_grad():
            start = time.perf_counter()
            for batch in batches:
                eps = seeded_noise(batch["noise_seed"], batch["images"]) if "noise_seed" in batch else None
                x_t = teacher_model.noise(batch["images"], t, eps=eps)
                teacher_model.run_unet(x_t, t)
            _sync(device)
        teacher_full = (time.perf_counter() - start) / len(batches)

    flops = teacher_gflops(teacher_model, batches[0]["images"], t, device, precision)
    optimizer = module.configure_optimizers()["optimizer"]

    def student_step(batch, feats):
        with _autocast(device, precision):
            loss = module.compute_losses({"images": batch["images"], "features": feats})["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    student_step(batches[0], targets[0])
    _sync(device)
    start = time.perf_counter()
    for batch, feats in zip(batches, targets):
        student_step(batch, feats)
    _sync(device)
    student = (time.perf_counter() - start) / len(batches)
    return {"data": data, "teacher": teacher, "student": student}, {"teacher_without_early_exit": teacher_full}, flops


def teacher_gflops(teacher_model, images: torch.Tensor, t: int, device: torch.device, precision: str) -> dict:
    """Forward GFLOPs of the teacher per image (FLOPs counted as 2 x multiply-adds), with the early
    exit and, for stochastic encodings, the whole U-Net: what the achieved TFLOP/s is judged against."""
    from torch.utils.flop_counter import FlopCounterMode

    one = images[:1]
    counts = {}
    with _autocast(device, precision), torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            teacher_model.encode(one, t)
        counts["early_exit"] = counter.get_total_flops() / 1e9
        if teacher_model.mode == "stochastic":
            x_t = teacher_model.noise(one, t)
            with FlopCounterMode(display=False) as counter:
                teacher_model.run_unet(x_t, t)
            counts["full"] = counter.get_total_flops() / 1e9
    return counts


def time_training(job, epochs: int = 2) -> float:
    """Seconds per step of the last of `epochs` training epochs, run exactly as `pretrain` runs them."""
    timer = next(cb for cb in job.trainer.callbacks if isinstance(cb, EpochTimer))
    job.trainer.fit(job.module, job.loader)
    if len(timer.seconds) < epochs:
        raise UserError("bench-speed: the run ended before its timed epoch")
    return timer.seconds[-1] / job.steps_per_epoch


def bench_speed(preset: str = "cpu-small", overrides: list[str] | None = None, device: str = "cpu",
                teacher: str | Path | None = None, data: str | Path | None = None, steps: int = 8,
                out: str | Path | None = None, cache: bool = True, progress: bool = True) -> dict:
    """Times the parts and the whole of a pretraining step; returns (and writes to `out`) the figures."""

    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got '{device}'")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch")
    accelerator = ["trainer.accelerator=gpu", "trainer.devices=1"] if device == "cuda" else \
        ["trainer.accelerator=cpu", "trainer.devices=1"]
    overrides = [*accelerator, *(overrides or [])]
    config = build_config(preset, overrides)
    batch = config.optim.batch_size
    epochs = 2
    overrides += [f"optim.max_steps={epochs * steps}", f"optim.epochs={epochs}", "optim.warmup_epochs=1"]
    torch_device = torch.device(device)

    with tempfile.TemporaryDirectory(prefix="dreamteacher-speed-") as work:
        work = Path(work)
        if data is None:
            data = write_scenes(work / "images", batch * steps)
            data_desc = f"{batch * steps} synthetic 480x360 JPEGs"
        else:
            data_desc = str(data)
        if teacher is None:  # timing does not depend on the weights
            ddpm = TEACHER_TRAINERS.get("ddpm")
            teacher = untrained_teacher(work / "teacher", preset, only_sections(as_dict(overrides), ddpm.config_sections()))
            teacher_desc = f"untrained {preset or 'default'} U-Net"
        else:
            teacher_desc = str(teacher)

        def job(name: str, cache_dir: Path | None = None):
            student = only_sections(as_dict(overrides), METHODS.get("dt-feat").config_sections())
            prepared = prepare_pretraining(data, work / name, teacher, preset=preset, overrides=student,
                                               progress=progress, cache=cache_dir, callbacks=[EpochTimer()])
            if prepared.steps_per_epoch != steps:
                raise UserError(f"bench-speed: {data} gives {prepared.steps_per_epoch} steps per epoch at batch "
                                f"{batch}; it needs {batch * steps} images (or pass --steps "
                                f"{prepared.steps_per_epoch})")
            return prepared

        online = job("online")
        _reset_peak(torch_device)
        parts, reference, flops = time_parts(online, torch_device, epochs)
        parts_memory = _peak_memory_mb(torch_device)
        online = job("online-fit")
        _reset_peak(torch_device)
        whole = time_training(online, epochs)
        whole_memory = _peak_memory_mb(torch_device)

        cpu_name = f"cpu ({cpu_info()['model']}, {torch.get_num_threads()} threads)"
        results = {
            "device": torch.cuda.get_device_name(0) if device == "cuda" else cpu_name,
            "torch": torch.__version__, "preset": str(preset) if preset else None, "teacher": teacher_desc,
            "data": data_desc,
            "student": config.student.backbone, "resolution": config.data.resolution, "batch_size": batch,
            "encode": {"t": config.encode.t, "blocks": config.encode.blocks, "mode": config.encode.mode},
            "trainer": {"precision": resolve_precision(config.trainer.precision, config.trainer.accelerator)[0], "channels_last": config.trainer.channels_last,
                        "compile": config.trainer.compile, "num_workers": config.data.num_workers,
                        "reuse_host_memory": config.trainer.reuse_host_memory},
            "timed_steps": steps,
            "seconds_per_step": {**parts, "sum_of_parts": sum(parts.values()), "whole": whole, **reference},
            "step_over_parts": whole / sum(parts.values()),
            "images_per_second": batch / whole,
            "images_per_second_parts": {name: batch / seconds for name, seconds in parts.items()},
            "teacher_gflops_per_image": flops,
            # what the teacher's kernels sustain in the step: the images/s bound is the GPU's rate / GFLOPs
            "teacher_tflops_per_second": flops["early_exit"] * batch / parts["teacher"] / 1e3,
            "peak_memory_mb": {"parts": parts_memory, "whole": whole_memory,
                               "kind": "allocated (GPU)" if device == "cuda" else "process RSS (CPU, peak so far)"},
        }
        if cache:
            built = time.perf_counter()
            cached = job("cached", work / "cache")  # builds the cache (K encodings per image)
            build_seconds = time.perf_counter() - built
            _reset_peak(torch_device)
            whole_cached = time_training(cached, epochs)
            results["seconds_per_step"]["whole_cached"] = whole_cached
            results["cache_speedup"] = whole / whole_cached
            results["images_per_second_cached"] = batch / whole_cached
            results["cache_build_seconds"] = build_seconds
            results["cache_encodings"] = config.encode.cache_encodings
            results["peak_memory_mb"]["whole_cached"] = _peak_memory_mb(torch_device)

    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps(results, indent=2))
    return results


def format_speed(results: dict) -> str:
    s, ips = results["seconds_per_step"], results["images_per_second_parts"]
    lines = [f"device: {results['device']}  preset: {results['preset']}  student: {results['student']}  "
             f"batch {results['batch_size']} at {results['resolution'][0]}x{results['resolution'][1]}",
             f"{'part':<14}{'s/step':>9}{'images/s':>11}"]
    for name in ("data", "teacher", "student"):
        lines.append(f"{name:<14}{s[name]:>9.3f}{ips[name]:>11.1f}")
    lines.append(f"{'sum of parts':<14}{s['sum_of_parts']:>9.3f}")
    if s.get("teacher_without_early_exit") is not None:
        lines.append(f"(teacher without its early exit: {s['teacher_without_early_exit']:.3f} s/step)")
    flops = results.get("teacher_gflops_per_image")
    if flops:
        full = f", {flops['full']:.0f} without it" if "full" in flops else ""
        lines.append(f"teacher forward: {flops['early_exit']:.0f} GFLOPs/image with its early exit{full}; "
                     f"{results['teacher_tflops_per_second']:.1f} TFLOP/s achieved")
    lines.append(f"{'whole step':<14}{s['whole']:>9.3f}{results['images_per_second']:>11.1f}")
    lines.append(f"whole / sum of parts: {results['step_over_parts']:.3f}")
    if "cache_speedup" in results:
        lines.append(f"{'whole, cached':<14}{s['whole_cached']:>9.3f}{results['images_per_second_cached']:>11.1f}")
        lines.append(f"cache speedup (epoch time online / cached): {results['cache_speedup']:.2f}x "
                     f"(cache of {results['cache_encodings']} encodings built in {results['cache_build_seconds']:.0f} s)")
    mem = results["peak_memory_mb"]
    lines.append(f"peak memory, {mem['kind']}: parts {mem['parts']:.0f} MB, whole {mem['whole']:.0f} MB")
    return "\n".join(lines)
