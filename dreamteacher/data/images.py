"""Unlabeled image folders: checked up front, converted to RGB, resized and center-cropped."""

from __future__ import annotations

import contextlib
import glob
import io
import os
import tarfile
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from dreamteacher.core.errors import UserError
from dreamteacher.core.runs import write_text_atomic

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


BAD_IMAGE_RULES = ("skip", "error")
SKIPPED_FILE = "skipped-images.txt"  # in a run folder: what its --data held that is not a readable image
SHARD_SUFFIX = ".tar"
HEADER_BYTES = 1 << 16  # what listing reads of an image in a shard: its header is in the first bytes


@dataclass(frozen=True)
class ImageRef:
    """One image of the data: a file, or sample `member` of a tar shard (webdataset layout)."""

    name: str  # stable and unique: the path relative to its source (prefixed `i/` with several sources)
    path: Path  # the file, or the shard
    member: int = -1  # the sample's index in its shard (wids' numbering); -1 for a plain file
    extension: str = ""  # the image's extension in its shard sample (".jpg"; not ".seg.png")


@dataclass
class Listing:
    """What `--data` holds: the images to train on, and what was skipped, with why."""

    images: list[ImageRef]
    skipped: list[tuple[str, str]]  # (file or shard member, reason)
    shards: list[Path]  # the tar shards read, in order (none for folders and lists)


def as_sources(data: str | Path | list | tuple) -> list[Path | str]:
    """`data` as a list of sources (a folder, a text file of paths, a shard pattern, or several)."""
    return list(data) if isinstance(data, (list, tuple)) else [data]


def is_shard_pattern(source: str | Path) -> bool:
    text = str(source)
    return text.endswith(SHARD_SUFFIX) and ("{" in text or "*" in text or "?" in text or Path(text).is_file())


def expand_shards(pattern: str) -> list[Path]:
    """'shards/{000000..000099}.tar' (brace ranges, webdataset's notation) or 'shards/*.tar' -> the
    shard files, in order; one line when the pattern matches nothing."""
    from braceexpand import braceexpand  # noqa: PLC0415 - a dependency of wids, needed for shard patterns only

    names = [name for part in braceexpand(str(pattern)) for name in (sorted(glob.glob(part)) if glob.has_magic(part)
                                                                      else [part])]
    missing = [name for name in names if not Path(name).is_file()]
    if not names or len(missing) == len(names):
        raise UserError(f"--data {pattern}: the shard pattern matches no file")
    if missing:
        raise UserError(f"--data {pattern}: {len(missing)} of its {len(names)} shards are missing (e.g. {missing[0]})")
    return [Path(name) for name in names]


def _sample_key(member_name: str) -> str | None:
    """webdataset's sample key of a tar member: its path up to the first dot of its file name."""
    head, _, base = member_name.rpartition("/")
    if "." not in base:
        return None
    return (head + "/" if head else "") + base.split(".", 1)[0]


def _shard_samples(shard: Path) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """(key, [(member name, data offset, size)]) of every sample in a tar shard, in order, grouped as
    wids groups them (consecutive members of one key). Headers only: the data is skipped."""
    samples: list[tuple[str, list]] = []
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key = _sample_key(info.name)
                if key is None:
                    continue
                if not samples or samples[-1][0] != key:
                    samples.append((key, []))
                samples[-1][1].append((info.name, info.offset_data, info.size))
    except (tarfile.TarError, OSError) as exc:
        raise UserError(f"--data shard {shard}: not a readable tar file ({exc.__class__.__name__})") from None
    return samples


def _read_header(opener, label: str) -> tuple[int, int] | str:
    """(width, height) from an image's header, or why it cannot be read."""
    try:
        with Image.open(opener()) as img:
            return img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"unreadable image ({exc.__class__.__name__})"


def _walk(folder: Path) -> list[tuple[str, str, int]]:
    """(path relative to `folder`, path, size in bytes) of every file under `folder`, recursively,
    hidden files and folders left out, in name order (folder by folder). Strings, one stat per file
    (scandir's): pathlib's own per-path work would cost more than reading the headers at 10^5 files."""
    found: list[tuple[str, str, int]] = []
    stack = [(str(folder), "")]
    while stack:
        path, prefix = stack.pop()
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=True):
                    stack.append((entry.path, prefix + entry.name + "/"))
                elif entry.is_file(follow_symlinks=True):
                    found.append((prefix + entry.name, entry.path, entry.stat(follow_symlinks=True).st_size))
    found.sort(key=lambda item: item[0].split("/"))
    return found


def list_sources(data, resolution: list[int] | None = None, on_bad_image: str = "skip") -> Listing:
    """The images of `data`: a folder (recursive), a text file naming image files (one per line,
    relative to its own folder; `#` comments), a pattern of tar shards in webdataset's layout
    ('shards/{000000..000099}.tar', one image per sample key), or a list of these (used together).

    Only headers are read, so listing is fast at scale. A file that is not an image (a labels.csv, a
    README) is skipped and counted; so is an unreadable image, or one named that does not exist,
    unless `on_bad_image` is "error" (one line naming it). With `resolution`, one warning says how
    many images are smaller (they are upscaled). No readable image at all is one line."""
    if on_bad_image not in BAD_IMAGE_RULES:
        raise UserError(f"data.on_bad_image must be 'skip' or 'error', got '{on_bad_image}'")
    sources = as_sources(data)
    images: list[ImageRef] = []
    skipped: list[tuple[str, str]] = []
    shards: list[Path] = []
    small: list[tuple[int, str, str]] = []

    def bad(where: str, why: str) -> None:
        if on_bad_image == "error":
            raise UserError(f"{why}: {where} (data.on_bad_image=skip skips and counts such files)")
        skipped.append((where, why))

    def add(name: str, path: Path, member: int, size: tuple[int, int] | str) -> None:
        if isinstance(size, str):
            bad(f"{path}" + (f" [{name}]" if member >= 0 else ""), size)
            return
        if resolution is not None and (size[1] < resolution[0] or size[0] < resolution[1]):
            small.append((size[0] * size[1], f"{size[0]}x{size[1]}", name))
        images.append(ImageRef(name, path, member))

    for i, source in enumerate(sources):
        prefix = f"{i}/" if len(sources) > 1 else ""
        if is_shard_pattern(source):
            for shard in expand_shards(str(source)):
                shard_index = len(shards)
                shards.append(shard)
                with open(shard, "rb") as handle:  # one open per shard; each image's first bytes read
                    for member, (key, files) in enumerate(_shard_samples(shard)):
                        # the sample's image: a member named KEY + an image extension (KEY.jpg, not
                        # KEY.seg.png, a mask beside it)
                        pictures = [f for f in files if f[0][len(key):].lower() in IMAGE_SUFFIXES]
                        if not pictures:
                            skipped.append((f"{shard} [{key}]", "no image in the sample"))
                            continue
                        name, offset, size = pictures[0]

                        def opener(offset=offset, size=size):
                            handle.seek(offset)
                            return io.BytesIO(handle.read(min(size, HEADER_BYTES)))
                        header = _read_header(opener, key) if size else "empty image file (zero bytes)"
                        if not isinstance(header, str):
                            images.append(ImageRef(f"{prefix}{shard_index}:{key}", shard, member, name[len(key):]))
                            if resolution is not None and (header[1] < resolution[0] or header[0] < resolution[1]):
                                small.append((header[0] * header[1], f"{header[0]}x{header[1]}", key))
                        else:
                            bad(f"{shard} [{key}]", header)
            continue
        path = Path(source)
        if path.is_dir():
            files = _walk(path)
        elif path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            files = [(path.name, str(path), path.stat().st_size)]
        elif path.is_file():  # a text file of image paths
            try:
                lines = path.read_text().splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise UserError(f"--data {path}: not a folder, an image, a text file of paths or a .tar shard "
                                f"pattern ({exc.__class__.__name__})") from None
            files = []
            for line in lines:
                if line.strip() and not line.strip().startswith("#"):
                    file = path.parent / line.strip()
                    files.append((line.strip(), str(file), file.stat().st_size if file.is_file() else -1))
        else:
            raise UserError(f"--data {path}: not found (a folder, a text file of image paths, or a .tar shard pattern)")
        for name, file, size in files:
            if os.path.splitext(file)[1].lower() not in IMAGE_SUFFIXES:
                skipped.append((file, "not an image file"))
            elif size < 0:
                bad(file, "image file not found")
            elif size == 0:
                bad(file, "empty image file (zero bytes)")
            else:
                add(prefix + name, Path(file), -1, _read_header(lambda file=file: file, name))
    if not images:
        what = ", ".join(str(s) for s in sources)
        detail = f" ({len(skipped)} files skipped, e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise UserError(f"no readable image in {what}{detail}")
    if small:
        _, size, name = min(small)
        warnings.warn(f"{len(small)} of {len(images)} images in {', '.join(map(str, sources))} are smaller than the "
                      f"training resolution {resolution[1]}x{resolution[0]} (the smallest: {name}, {size}); they are "
                      "upscaled", stacklevel=3)
    return Listing(images, skipped, shards)


def list_images(folder: str | Path, resolution: list[int] | None = None, on_bad_image: str = "error") -> list[Path]:
    """The image files of a folder (labeled data: every image must be readable unless told otherwise);
    files that are not images are skipped."""
    if not Path(folder).is_dir():
        raise UserError(f"image folder not found: {folder}")
    return [ref.path for ref in list_sources(folder, resolution, on_bad_image).images]


def write_skipped(listing: Listing, run_dir: Path) -> str | None:
    """RUN/skipped-images.txt (reason, tab, file) when `--data` held anything skipped; the one line
    that says so (None when nothing was)."""
    if not listing.skipped:
        return None
    path = write_text_atomic(Path(run_dir) / SKIPPED_FILE, "".join(f"{why}\t{where}\n" for where, why in listing.skipped))
    reasons: dict[str, int] = {}
    for _, why in listing.skipped:
        reasons[why.split(" (")[0]] = reasons.get(why.split(" (")[0], 0) + 1
    counted = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"data: {len(listing.images)} images; skipped {len(listing.skipped)} ({counted}), listed in {path}"


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16-bit and float images are rescaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            arr = arr / 65535.0
        else:  # 32-bit int or float: min-max to the image's own range
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        img = Image.fromarray((arr * 255.0).round().astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return to_rgb(img)
    except (OSError, SyntaxError, ValueError) as exc:
        raise UserError(f"unreadable image file: {path} ({exc})") from None


def resize_center_crop(img: Image.Image, height: int, width: int,
                       resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    """Scale so the image covers height x width, then crop the center (keeps aspect ratio)."""
    scale = max(height / img.height, width / img.width)
    new_size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    img = img.resize(new_size, resample)
    left, top = (img.width - width) // 2, (img.height - height) // 2
    return img.crop((left, top, left + width, top + height))


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 CHW tensor."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def uint8_to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [-1, 1], the diffusion convention."""
    return images.float().div(127.5).sub(1.0)


class ShardReader:
    """Reads samples of tar shards by (shard, index) through webdataset's indexed reader (`wids`: each
    shard memory-mapped and indexed from its headers once), a few shards open at a time per process.
    Opened lazily, so a dataset holding one pickles into loader workers."""

    def __init__(self, shards: list[Path], open_at_most: int = 16):
        self.shards, self.open_at_most = list(shards), open_at_most
        self._open: OrderedDict[int, object] = OrderedDict()

    def __getstate__(self) -> dict:
        return {"shards": self.shards, "open_at_most": self.open_at_most, "_open": OrderedDict()}

    def read(self, shard: int, member: int, extension: str) -> io.BytesIO:
        """The bytes of the `extension` file (".jpg") of sample `member` of shard `shard`."""
        samples = self._open.get(shard)
        if samples is None:
            from wids.wids import IndexedTarSamples  # noqa: PLC0415 - needed for shard data only

            with contextlib.redirect_stdout(io.StringIO()):  # it prints a line for each odd member name
                samples = IndexedTarSamples(path=str(self.shards[shard]))
            self._open[shard] = samples
            while len(self._open) > self.open_at_most:
                self._open.popitem(last=False)[1].close()
        self._open.move_to_end(shard)
        sample = samples[member]
        return sample[extension] if extension in sample else \
            next(value for ext, value in sample.items() if ext.lower() == extension.lower())


class ImageFolder(Dataset):
    """Images in [-1, 1], CHW, at a fixed resolution; random horizontal flip when `hflip`, then a
    random [height, width] `crop` of the resized image when given (the object scale is kept).

    `folder` is whatever `list_sources` reads: a folder, a text file of paths, tar shards, or a list of
    them; `names` says which image each index is (stable names, the feature cache's key). An image
    whose pixels turn out unreadable when it is decoded (its header was fine) is replaced by the next
    image and reported (`data.on_bad_image=error`: one line naming it instead).
    Small datasets are decoded once and kept in memory (they are re-read every epoch otherwise).
    """

    def __init__(self, folder, resolution: list[int], hflip: bool = True, cache_in_memory: bool | None = None,
                 crop: list[int] | None = None, on_bad_image: str = "skip"):
        self.listing = list_sources(folder, resolution, on_bad_image)
        self.refs = self.listing.images
        self.paths = [ref.path for ref in self.refs]
        self.names = [ref.name for ref in self.refs]
        self.on_bad_image = on_bad_image
        self.reader = ShardReader(self.listing.shards) if self.listing.shards else None
        self._shard_index = {path: i for i, path in enumerate(self.listing.shards)}
        self.height, self.width = resolution
        self.hflip = hflip
        self.crop = crop
        if cache_in_memory is None:  # ~190 KB per image at 256x256: as uint8: keep up to ~1 GB
            cache_in_memory = len(self.refs) * 3 * self.height * self.width <= 1 << 30
        self._cache: dict[int, torch.Tensor] | None = {} if cache_in_memory else None

    def __len__(self) -> int:
        return len(self.refs)

    def open_image(self, index: int) -> Image.Image:
        ref = self.refs[index]
        if ref.member < 0:
            return load_rgb(ref.path)
        try:
            with Image.open(self.reader.read(self._shard_index[ref.path], ref.member, ref.extension)) as img:
                return to_rgb(img)
        except (OSError, SyntaxError, ValueError) as exc:
            raise UserError(f"unreadable image file: {ref.path} [{ref.name}] ({exc})") from None

    def load(self, index: int) -> torch.Tensor:
        """uint8 CHW at the dataset resolution."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        for attempt in range(len(self.refs)):
            try:
                img = self.open_image((index + attempt) % len(self.refs))
                break
            except UserError as exc:
                if self.on_bad_image == "error":
                    raise
                warnings.warn(f"{exc}; the next image is used in its place (data.on_bad_image=skip)", stacklevel=2)
        tensor = pil_to_uint8(resize_center_crop(img, self.height, self.width))
        if self._cache is not None:
            self._cache[index] = tensor
        return tensor

    def __getitem__(self, index: int) -> torch.Tensor:
        image = uint8_to_unit(self.load(index))
        if self.hflip and torch.rand(()) < 0.5:
            image = image.flip(-1)
        if self.crop:
            height, width = self.crop
            top = int(torch.randint(self.height - height + 1, ()))
            left = int(torch.randint(self.width - width + 1, ()))
            image = image[:, top:top + height, left:left + width]
        return image


class SynthesizedSeeds(Dataset):
    """An epoch of `length` samples for a teacher that renders its own images (a GAN): each item is
    empty; `engine.SeededSamples` gives it the seed the teacher draws z and the flip from."""

    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return {}
