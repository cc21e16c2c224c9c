"""The run folder, owned here: its file names, the config snapshot, refusing or resuming, atomic writes
and the `run.json` summary. Every command that trains (train-teacher, pretrain, finetune, interpreter)
writes its folder through `RunFolder`, so a file name is spelled once.

    RUN/config.yaml               resolved settings (also inside every checkpoint)
    RUN/checkpoints/last.ckpt     full training state, rewritten atomically
    RUN/logs/                     metrics.csv (+ metrics.partN.csv of earlier parts), TensorBoard events
    RUN/run.json                  what finished: steps, epochs, seconds, final loss, status, files
    RUN/inputs.json               pretraining: the teacher, feature cache, encoder, interpreter it used
    RUN/backbone.safetensors      pretraining: the backbone export (timm keys) [+ .json]
    RUN/decoder.safetensors       pretraining: a pretrained decoder where the method has one [+ .json]
    RUN/segmenter.safetensors     finetune: the whole segmenter; segmenter.json says how to rebuild it
    RUN/init.json                 finetune: which parts started pretrained
    RUN/interpreter.safetensors   interpreter: the head; segmenter.json makes teacher + head a segmenter
    RUN/teacher/                  train-teacher: the diffusers pipeline or the GAN generator
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import save_file

from dreamteacher.core.config import SCHEMA_KEY, SCHEMA_VERSION, load_config_file, split_schema, with_schema
from dreamteacher.core.errors import UserError

CONFIG = "config.yaml"
SUMMARY = "run.json"
INPUTS = "inputs.json"
INIT = "init.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
LOGS = "logs"
BACKBONE = "backbone.safetensors"
DECODER = "decoder.safetensors"
SEGMENTER = "segmenter.safetensors"
SEGMENTER_INFO = "segmenter.json"
INTERPRETER = "interpreter.safetensors"
TEACHER = "teacher"
EXPORT_SUFFIXES = (".safetensors", ".pth", ".pkl")
TEMP_PREFIX = ".partial-"  # temporary files of atomic writes, in the folder of their target


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write(path: Path, write: Any) -> Path:
    """`write(temp_path)` then an fsync and a rename over `path`, the temporary file in `path`'s own
    folder (so the rename is atomic: same file system): readers see the old file or the new one,
    whole. A killed write leaves a `.partial-*` file that `RunFolder.start` removes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX + path.name + ".", dir=path.parent)
    os.close(handle)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide exports from the user's group
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# renameat2's RENAME_EXCHANGE (Linux 3.15+, glibc 2.28+): two paths swapped in one atomic step
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two paths atomically where the system can; False where it cannot (then nothing moved)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):  # a file system without exchange
        return False
    raise OSError(error, os.strerror(error), str(b))


def old_folder(target: Path) -> Path:
    return target.with_name(target.name + ".old")


def recover_folder(target: Path) -> Path:
    """Puts back the old folder that a replacement killed between its two renames left under `.old`
    (the fallback where the file system cannot swap two paths in one step); removes a leftover `.old`
    once the new folder is in place."""
    target, old = Path(target), old_folder(Path(target))
    if old.exists():
        if target.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, target)
    return target


def replace_folder(new: Path, target: Path) -> Path:
    """The complete folder `new` becomes `target`, replacing what was there, so that a kill at any
    moment leaves the old folder or the new one at `target`, never neither and never a mix: the two
    are swapped in one atomic step (renameat2 RENAME_EXCHANGE), then the old one, now at `new`'s path,
    is deleted (a kill before that leaves it there, and the next build in `new`'s place removes it).
    Where the file system cannot swap, the old folder is first renamed to `target.old`, which
    `recover_folder` puts back if a kill comes before the new one is in place."""
    new, target = Path(new), Path(target)
    recover_folder(target)
    if not target.exists():
        os.replace(new, target)
    elif _exchange(new, target):
        shutil.rmtree(new)
    else:
        os.replace(target, old_folder(target))
        os.replace(new, target)
        shutil.rmtree(old_folder(target))
    return target


def save_safetensors_atomic(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> Path:
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    return atomic_write(Path(path), lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


def write_text_atomic(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by None: JSON that every parser reads (Python's
    json writes a bare NaN otherwise)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_json_atomic(path: Path, data: Any) -> Path:
    return write_text_atomic(path, json.dumps(strict_json(data), indent=2, allow_nan=False))


def read_json(path: Path) -> dict | None:
    """A JSON file's contents, None when absent; one line naming the file when it is not JSON."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable JSON file ({exc.__class__.__name__})") from None


class RunFolder:
    """One run's folder. `start(resume)` refuses to overwrite a trained run, or returns the checkpoint
    to resume from; the rest names and writes its files."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_file():
            if path.suffix in EXPORT_SUFFIXES:
                raise UserError(f"{path} is an exported backbone: it initializes a fine-tuning "
                                f"(`dreamteacher finetune --backbone {path}`) but cannot resume a run; "
                                "--out takes the run folder")
            raise UserError(f"--out must be a run folder, not the file {path}")
        self.path = path

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_DIR / LAST_CHECKPOINT

    @property
    def logs(self) -> Path:
        return self.path / LOGS

    def start(self, resume: bool) -> Path | None:
        """The checkpoint to resume from, or None for a new run; never silently overwrites a trained
        run. Temporary files a killed write left are removed."""
        if resume:
            if not self.checkpoint.is_file():
                raise UserError(f"--resume: no checkpoint at {self.checkpoint}")
        elif self.checkpoint.is_file():
            raise UserError(f"{self.path} already holds a training checkpoint; pass --resume to continue it, "
                            "or choose another --out")
        self.path.mkdir(parents=True, exist_ok=True)
        self.remove_partial_files()
        recover_folder(self.path / TEACHER)  # a teacher whose replacement was killed midway
        return self.checkpoint if resume else None

    def remove_partial_files(self) -> list[Path]:
        """Orphans of atomic writes killed mid-way (never read: only a finished write is renamed)."""
        orphans = [p for folder in (self.path, self.path / CHECKPOINT_DIR) if folder.is_dir()
                   for p in folder.glob(TEMP_PREFIX + "*")]
        for orphan in orphans:
            orphan.unlink(missing_ok=True)
        return orphans

    # -- settings --------------------------------------------------------------------------------
    def saved_config(self) -> dict | None:
        """The run's settings as saved (with their schema version); one line when a newer dreamteacher
        wrote them."""
        path = self.path / CONFIG
        if not path.is_file():
            return None
        loaded = load_config_file(path)
        split_schema(loaded, path)  # refuses a newer schema here, naming the file
        return loaded

    def save_config(self, config) -> None:
        write_text_atomic(self.path / CONFIG, yaml.safe_dump(with_schema(config), sort_keys=False))

    # -- records ---------------------------------------------------------------------------------
    def read(self, name: str) -> dict | None:
        return read_json(self.path / name)

    def write(self, name: str, data: dict) -> Path:
        return write_json_atomic(self.path / name, data)

    def summary(self) -> dict | None:
        """run.json; one line when a newer dreamteacher wrote it."""
        summary = self.read(SUMMARY)
        if summary is not None and summary.get(SCHEMA_KEY, 1) > SCHEMA_VERSION:
            raise UserError(f"{self.path / SUMMARY} was written by a newer dreamteacher (schema {summary[SCHEMA_KEY]}; "
                            f"this one reads up to {SCHEMA_VERSION}): upgrade dreamteacher to use this run folder")
        return summary

    def write_summary(self, summary: dict) -> Path:
        return self.write(SUMMARY, {SCHEMA_KEY: SCHEMA_VERSION, **summary})

    def inputs(self) -> dict:
        """The teacher, feature cache or frozen encoder a pretraining run was started with."""
        return self.read(INPUTS) or {}

    def save_inputs(self, inputs: dict[str, str | Path | None]) -> None:
        self.write(INPUTS, {k: str(Path(v).resolve()) if v else None for k, v in inputs.items()})
