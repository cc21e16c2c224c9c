"""The bench's stage cache: a unit of work in its own folder, keyed on a digest of its inputs.

A stage whose inputs are unchanged is reused; one whose inputs changed is redone; a half-finished one
resumes from its checkpoint. So a killed bench simply continues, and editing a recipe recomputes
exactly what it touches. Keys cover the settings that differ from their defaults (`key_settings`) and
the contents of the data folders (`core.hashing`), never paths or execution-only settings.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dreamteacher.core.config import Sections
from dreamteacher.core.hashing import folder_fingerprint
from dreamteacher.core.runs import RunFolder, read_json, write_json_atomic

STAGE_FILE = "stage.json"
STARTED_FILE = "stage-inputs.json"

# Settings that change how fast a stage runs or what it reports, not what it computes: left out of
# stage keys (the live probe measures a copy of the backbone under its own random state).
EXECUTION_ONLY = {"trainer": ("channels_last", "compile", "sync_batchnorm", "cudnn_benchmark", "reuse_host_memory",
                              "loggers", "mlflow_uri", "experiment", "log_every_n_steps", "checkpoint_every_n_steps"),
                  "probe": None}

__all__ = ["EXECUTION_ONLY", "Stage", "digest", "folder_fingerprint", "key_settings"]


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def key_settings(config: Sections, keep: dict[str, tuple[str, ...] | None] | None = None,
                 drop: dict[str, tuple[str, ...] | None] | None = None) -> dict:
    """What a stage's key covers of `config` (a `Config`, `FinetuneConfig`, ...): the settings that
    differ from its class's defaults, without the execution-only ones and the `drop` ones (section ->
    fields, or None for the whole section); only the `keep` ones when given. A setting added later
    with a default that keeps the old behaviour thus leaves every finished stage valid (a changed
    default is a change of code, which keys do not cover either)."""
    values, defaults = config.to_dict(), type(config)().to_dict()
    kept: dict = {}
    for name, section in values.items():
        if keep is not None and name not in keep:
            continue
        fields = keep.get(name) if keep is not None else None
        for field_name, value in section.items():
            if fields is not None and field_name not in fields:
                continue
            if value != defaults[name][field_name]:
                kept.setdefault(name, {})[field_name] = value
    for name, fields in {**EXECUTION_ONLY, **(drop or {})}.items():
        if fields is None:
            kept.pop(name, None)
        else:
            for field_name in fields:
                kept.get(name, {}).pop(field_name, None)
    return {name: section for name, section in kept.items() if section}


@dataclass
class Stage:
    """A unit of cached work: `run(folder, resume)` -> summary dict (must hold `seconds`)."""
    folder: Path
    key: str
    run: Callable[[Path, bool], dict]

    def result(self, allow_run: bool = True) -> dict | None:
        """The cached summary when the inputs are unchanged; else (re)computes it, or None when
        `allow_run` is off."""
        saved = read_json(self.folder / STAGE_FILE)
        if saved is not None and saved.get("key") == self.key and saved.get("done"):
            return saved
        if not allow_run:
            return None
        started = read_json(self.folder / STARTED_FILE) or {}
        # a half-finished stage of the same inputs resumes; anything else it left is stale
        resume = started.get("key") == self.key and RunFolder(self.folder).checkpoint.is_file()
        if self.folder.is_symlink() and not resume:  # a stage linked from elsewhere: never delete its target
            self.folder.unlink()
        elif self.folder.exists() and not resume:
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.folder / STARTED_FILE, {"key": self.key})
        summary = {**self.run(self.folder, resume), "key": self.key, "done": True}
        write_json_atomic(self.folder / STAGE_FILE, summary)
        return summary
