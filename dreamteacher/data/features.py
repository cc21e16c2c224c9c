"""The teacher's features as data: what one feature level is (`FeatureSpec`) and the offline feature
dataset of section 3.1, K stochastic encodings of every image stored in fp16 as memory-mapped arrays
and reused every epoch (the teacher is not run while training). `teachers/encoding.py` builds it.

A cache folder holds `meta.json` and one `block{b}.npy` per teacher block, shaped (N, K, C, h, w). It
is keyed on the teacher's weights, t, the encoding mode, the blocks, the resolution and the images
(their names and contents): a cache built from other inputs is refused with the setting that differs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from dreamteacher.core.errors import UserError
from dreamteacher.core.hashing import file_digest
from dreamteacher.data.images import ImageFolder, uint8_to_unit

META_FILE = "meta.json"
FORMAT_VERSION = 2  # 2: images keyed on their contents (1: names and sizes)


@dataclass(frozen=True)
class FeatureSpec:
    """One teacher feature level: which decoder block, its channels, its stride w.r.t. the input."""

    block: int
    channels: int
    stride: int


def shard_stamp(shard: Path) -> str:
    """A tar shard's size and modification time: a shard is written once, and hashing terabytes of them
    to key a cache would cost a pass over the data."""
    stat = Path(shard).stat()
    return f"shard:{stat.st_size}:{stat.st_mtime_ns}"


def images_fingerprint(dataset: ImageFolder) -> str:
    """Names and content digests of the images, in dataset order (the cache is indexed like the
    dataset): an image replaced by another of the same name and size changes it (images in shards:
    their shard's size and time, `shard_stamp`)."""
    named = [(ref.name, file_digest(ref.path) if ref.member < 0 else shard_stamp(ref.path)) for ref in dataset.refs]
    return hashlib.sha256(json.dumps(named).encode()).hexdigest()[:16]


def read_meta(folder: Path) -> dict | None:
    path = Path(folder) / META_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"feature cache {folder}: {META_FILE} is not readable; --rebuild-cache replaces it") from None


def check_key(folder: Path, meta: dict, key: dict) -> None:
    """Refuse a cache built from other inputs, naming what changed."""
    changed = [name for name in key if meta["key"].get(name) != key[name]]
    if changed:
        detail = ", ".join(f"{name}: cached {meta['key'].get(name)!r}, now {key[name]!r}" for name in changed)
        raise UserError(f"feature cache {folder} was built from other inputs ({detail}); use another "
                        "--cache folder, or --rebuild-cache to replace it")


class CachedFeatures(Dataset):
    """(image in [-1, 1], [teacher feature per block]) with one of the K cached encodings drawn at
    random per image per epoch. A flip applies to the image and its features together."""

    def __init__(self, images: ImageFolder, folder: str | Path, meta: dict):
        self.images, self.folder, self.meta = images, Path(folder), meta
        self.specs = [FeatureSpec(**f) for f in meta["features"]]
        self._arrays: list[np.ndarray] | None = None  # opened lazily: once per worker process

    def __len__(self) -> int:
        return len(self.images)

    def arrays(self) -> list[np.ndarray]:
        if self._arrays is None:
            self._arrays = [np.load(self.folder / f"block{s.block}.npy", mmap_mode="r") for s in self.specs]
        return self._arrays

    def __getitem__(self, index: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        image = uint8_to_unit(self.images.load(index))
        k = int(torch.randint(self.meta["key"]["encodings"], ()))
        feats = [torch.from_numpy(np.array(array[index, k])) for array in self.arrays()]  # copy out of the map
        if self.images.hflip and torch.rand(()) < 0.5:
            image, feats = image.flip(-1), [f.flip(-1) for f in feats]
        return image, feats
