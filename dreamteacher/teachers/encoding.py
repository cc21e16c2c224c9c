"""Building the offline feature dataset (`data/features.py`): every image encoded K times by a
teacher, fresh noise each time. Built in a sibling `.partial` folder that replaces the target in one
rename, so a killed build leaves either nothing or a complete cache, never a half-written one."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from dreamteacher.core.errors import UserError
from dreamteacher.core.hashing import file_digest
from dreamteacher.core.runs import recover_folder, replace_folder, write_json_atomic
from dreamteacher.data.features import FORMAT_VERSION, META_FILE, check_key, images_fingerprint, read_meta
from dreamteacher.data.images import ImageFolder, uint8_to_unit
from dreamteacher.teachers.diffusion import DiffusionTeacher

WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth"}
CACHE_BATCH = 16  # images per teacher forward pass while building a feature cache


def teacher_fingerprint(path: str | Path) -> str:
    """sha256 of the teacher's weight files (content, not dates: a copied teacher keeps its cache)."""
    path = Path(path)
    if (path / "teacher" / "model_index.json").is_file():  # a train-teacher run: its pipeline, not its checkpoints
        path = path / "teacher"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(file_digest(file).encode())
    return digest.hexdigest()[:16]


def cache_key(teacher_path: str | Path, teacher: DiffusionTeacher, dataset: ImageFolder, encodings: int) -> dict:
    return {"version": FORMAT_VERSION, "teacher": teacher_fingerprint(teacher_path), "t": teacher.t,
            "mode": teacher.mode, "blocks": list(teacher.blocks), "resolution": [dataset.height, dataset.width],
            "images": images_fingerprint(dataset), "num_images": len(dataset), "encodings": encodings}


LAYOUT_FILE = "layout.json"  # in a cache being built by several processes: what each opens and fills


@torch.no_grad()
def build_cache(folder: Path, teacher: DiffusionTeacher, dataset: ImageFolder, key: dict, device: torch.device,
                batch_size: int = CACHE_BATCH, seed: int = 0, progress: bool = True, rank: int = 0, world: int = 1,
                launch: str = "", poll_seconds: float = 1.0) -> dict | None:
    """Encode every image K times (fresh noise each time) into `folder`, atomically: its size is
    checked against the free disk before anything is written. With `world` > 1 every process (started
    together: torchrun, SLURM) encodes its own contiguous share of the images into the same arrays, its
    noise drawn from `seed + rank`; process 0 lays the arrays out, waits for every share and puts the
    cache in place (the meta it returns; the others return None and wait for it). `launch` names the
    job (its launcher's run id): a layout a killed earlier job left is never taken for this one's."""
    specs = teacher.feature_specs
    height, width = dataset.height, dataset.width
    num, encodings = len(dataset), key["encodings"]
    shapes = [(num, encodings, s.channels, height // s.stride, width // s.stride) for s in specs]
    need = sum(int(np.prod(shape)) * 2 for shape in shapes)
    partial = folder.with_name(folder.name + ".partial")
    layout = {"key": key, "world": world, "launch": launch}
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # what a killed build left
        partial.mkdir(parents=True)
        free = shutil.disk_usage(partial).free
        if need > free:
            shutil.rmtree(partial)
            raise UserError(f"feature cache {folder}: needs {need / 2**30:.1f} GiB, only {free / 2**30:.1f} GiB free; "
                            "lower encode.cache_encodings or data.resolution, or choose another --cache folder")
        for s, shape in zip(specs, shapes):  # the .npy files, at their full size, for every process to fill
            np.lib.format.open_memmap(partial / f"block{s.block}.npy", mode="w+", dtype=np.float16, shape=shape).flush()
        write_json_atomic(partial / LAYOUT_FILE, layout)
    else:  # process 0 lays the arrays out
        while (read_json_quiet(partial / LAYOUT_FILE) or {}) != layout:
            time.sleep(poll_seconds)
    arrays = [np.load(partial / f"block{s.block}.npy", mmap_mode="r+") for s in specs]
    teacher.to(device)
    generator = torch.Generator(device=device).manual_seed(seed + rank)
    first, last = rank * num // world, (rank + 1) * num // world
    bar = tqdm(total=(last - first) * encodings, desc="cache", unit="img", disable=not progress or rank > 0,
               dynamic_ncols=True)
    for start in range(first, last, batch_size):
        stop = min(last, start + batch_size)
        images = torch.stack([uint8_to_unit(dataset.load(i)) for i in range(start, stop)]).to(device)
        for k in range(encodings):
            for array, feats in zip(arrays, teacher.encode(images, generator=generator)):
                array[start:stop, k] = feats.to(torch.float16).cpu().numpy()
            bar.update(stop - start)
    bar.close()
    for array in arrays:
        array.flush()
    del arrays
    (partial / f"share-{rank}.done").write_text(f"{first} {last}\n")
    if rank > 0:
        return None
    while not all((partial / f"share-{r}.done").is_file() for r in range(world)):
        time.sleep(poll_seconds)
    for r in range(world):
        (partial / f"share-{r}.done").unlink()
    (partial / LAYOUT_FILE).unlink()
    meta = {"key": key, "features": [vars(s) for s in specs], "shapes": [list(s) for s in shapes], "bytes": need}
    if world > 1:
        meta["built_by"] = world
    (partial / META_FILE).write_text(json.dumps(meta, indent=2))
    replace_folder(partial, folder)  # the old cache or the new one at `folder`, whole, at every moment
    return meta


def read_json_quiet(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def open_cache(folder: str | Path, teacher_path: str | Path, teacher: DiffusionTeacher, dataset: ImageFolder,
               encodings: int, device: torch.device, rebuild: bool = False, progress: bool = True,
               rank: int = 0, world: int = 1, launch: str = "") -> dict | None:
    """The cache's meta, after building it when absent (or when `rebuild`); refused when stale. With
    `world` > 1 each process builds its share (`build_cache`); processes other than 0 get None."""
    folder = recover_folder(Path(folder))
    if encodings < 1:
        raise UserError(f"encode.cache_encodings must be at least 1, got {encodings}")
    if folder.is_file():
        raise UserError(f"--cache must be a folder, not the file {folder}")
    key = cache_key(teacher_path, teacher, dataset, encodings)
    meta = read_meta(folder)
    if meta is not None and not rebuild:
        check_key(folder, meta, key)
        return meta
    if folder.is_dir() and meta is None and any(folder.iterdir()):
        raise UserError(f"--cache {folder} holds other files and no feature cache; choose an empty or new folder")
    return build_cache(folder, teacher, dataset, key, device, seed=0, progress=progress, rank=rank, world=world,
                       launch=launch)


def wait_for_cache(folder: str | Path, teacher_path: str | Path, teacher: DiffusionTeacher, dataset: ImageFolder,
                   encodings: int, poll_seconds: float = 2.0) -> dict:
    """The other processes of a multi-process run: wait until rank 0 has built the cache for these
    inputs (torchrun and SLURM stop the whole job if rank 0 fails)."""
    folder = Path(folder)
    key = cache_key(teacher_path, teacher, dataset, encodings)
    while True:
        meta = read_meta(folder)
        if meta is not None and meta["key"] == key:
            return meta
        time.sleep(poll_seconds)


