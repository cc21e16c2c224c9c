"""Run configuration: typed sections, named YAML presets, dotted `--set key=value` overrides.

A pretraining `Config` is made of sections registered by the modules they configure: `data`,
`student`, `optim` and `trainer` here; `encode`, `diffusion`, `teacher_train` and `gan` by the
teachers; `loss`, `denoise`, `contrast`, ... by the methods. A new method brings its section in its own
module (`register_section`). Defaults are the paper's (DreamTeacher Tables 16-17, ImageNet column);
presets in `dreamteacher/configs/*.yaml` override a few fields each. The resolved config is saved with
every run and inside every checkpoint.

Every numeric field states its valid range (`bounded`), checked for every section before anything
runs, so that nothing reaches torch or Lightning unchecked: a bad value is one line naming the setting.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dreamteacher.core.errors import UserError
from dreamteacher.core.registry import Registry

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs"


def bounded(default: Any = dataclasses.MISSING, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False, allowed: tuple = (), factory: Any = None) -> Any:
    """A dataclass field with a valid range: every value (every item of a list) must be finite and in
    [low, high] (`low_open` / `high_open`: excluded), or one of `allowed` (e.g. -1 for 'off')."""
    meta = {"low": low, "high": high, "low_open": low_open, "high_open": high_open, "allowed": allowed}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Section:
    """A config section: a dataclass of settings; `check` adds the rules a range cannot state."""

    def check(self, config: Any) -> None:
        """Rules beyond ranges, with the whole config (e.g. a crop within `data.resolution`)."""


def _describe_range(meta: dict) -> str:
    low, high = meta["low"], meta["high"]
    parts = []
    if low is not None:
        parts.append(f"{'>' if meta['low_open'] else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if meta['high_open'] else '<='} {high:g}")
    text = " and ".join(parts) or "finite"
    return text + (f" (or {', '.join(map(str, meta['allowed']))})" if meta["allowed"] else "")


def check_ranges(name: str, section: Section) -> None:
    """Every numeric value of `section` finite and within its field's declared range."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        values = value if isinstance(value, list) else [value]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if not numbers:
            continue
        meta = f.metadata if "low" in f.metadata else None
        for v in numbers:
            if meta is not None and v in meta["allowed"]:
                continue
            bad = isinstance(v, float) and not math.isfinite(v)
            if meta is not None and not bad:
                low, high = meta["low"], meta["high"]
                bad = (low is not None and (v <= low if meta["low_open"] else v < low)) or \
                      (high is not None and (v >= high if meta["high_open"] else v > high))
            if bad:
                rule = _describe_range(meta) if meta is not None else "finite"
                raise UserError(f"setting '{name}.{f.name}' must be {rule}, got {value!r}")


@dataclass
class DataConfig(Section):
    resolution: list[int] = bounded(low=16, factory=lambda: [256, 256])  # [height, width]
    hflip: bool = True  # the only augmentation of the paper's pretraining (Table 17)
    # distillation (dt-feat, dt-mix) only, both off by default (the paper's pretraining flips alone):
    # [low, high]: a random crop of each image covering that fraction of its area at its aspect ratio,
    # resized back to `resolution`, the teacher's features cropped and resized with it (scale jitter);
    # [] = off
    crop_scale: list[float] = bounded(low=0, high=1, low_open=True, factory=list)
    # > 0: brightness, contrast and saturation jitter of that strength (hue a quarter of it) on the
    # image the student sees; the teacher's features stay those of the unjittered image; 0 = off
    color_jitter: float = bounded(0.0, low=0, high=1)
    num_workers: int = bounded(4, low=0)

    def check(self, config: Any) -> None:
        if len(self.resolution) != 2:
            raise UserError(f"data.resolution must be [height, width] of integers >= 16, got {self.resolution}")
        if self.crop_scale and not (len(self.crop_scale) == 2 and self.crop_scale[0] <= self.crop_scale[1]):
            raise UserError(f"data.crop_scale must be [low, high] with 0 < low <= high <= 1 (or [] for off), "
                            f"got {self.crop_scale}")


@dataclass
class StudentConfig(Section):
    backbone: str = "resnet50"  # any timm CNN with forward_intermediates (resnet*, convnext*, ...)
    regressor_channels: int = bounded(256, low=1)  # FPN width (appendix D.1)
    ppm_scales: list[int] = bounded(low=1, factory=lambda: [1, 2, 3, 6])


OPTIMIZERS = ("adamw", "lamb", "lars", "sgd")


@dataclass
class OptimConfig(Section):
    name: str = "lamb"  # "adamw", "lamb", "lars" (PCD, MoCo v3 ResNet) or "sgd"
    base_lr: float = bounded(4e-3, low=0, low_open=True)  # scaled by batch_size / 256
    weight_decay: float = bounded(0.05, low=0)
    betas: list[float] = bounded(low=0, high=1, high_open=True, factory=lambda: [0.9, 0.95])  # Adam family
    momentum: float = bounded(0.9, low=0, high=1)  # SGD-family optimizers (lars, sgd)
    batch_size: int = bounded(2048, low=1)  # global batch, split over all processes
    epochs: int = bounded(200, low=1)
    warmup_epochs: int = bounded(30, low=0)
    max_steps: int = bounded(-1, low=1, allowed=(-1,))  # > 0 caps the run (smoke tests, demos); -1 = off

    def check(self, config: Any) -> None:
        if self.name not in OPTIMIZERS:
            raise UserError(f"optim.name must be one of {', '.join(OPTIMIZERS)}, got '{self.name}'")
        if len(self.betas) != 2:
            raise UserError(f"optim.betas must be [beta1, beta2], got {self.betas}")


# Lightning's precision names (and their short forms), and "auto": bf16-mixed where the hardware runs
# bf16 natively, 32-true elsewhere (core/hardware.py)
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "32", "bf16", "16", "64")


LOGGERS = ("csv", "tensorboard", "mlflow", "wandb")


def check_precision(name: str, value: str) -> None:
    if value not in PRECISIONS:
        raise UserError(f"{name} must be one of {', '.join(PRECISIONS)}, got '{value}'")


@dataclass
class TrainerConfig(Section):
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = bounded(1, low=1)
    strategy: str = "auto"  # "ddp" for many GPUs or CPU processes
    # "auto": bf16-mixed on GPUs of compute capability >= 8.0 and CPUs with avx512_bf16 or AMX,
    # 32-true elsewhere (one line says which was chosen); or any Lightning precision
    precision: str = "auto"
    sync_batchnorm: bool = False  # BatchNorm over the global batch in multi-GPU runs (CUDA only)
    channels_last: bool = False  # pretraining: NHWC student and its images (the teacher stays NCHW: GroupNorm)
    compile: bool = False  # pretraining: torch.compile student, regressor and the teacher block by block
    cudnn_benchmark: bool = True  # GPU: input shapes are fixed (resize, crops), so cuDNN times its kernels once
    reuse_host_memory: bool = True  # glibc keeps freed buffers for the next step (engine.reuse_host_memory)
    seed: int = bounded(0, low=0)
    log_every_n_steps: int = bounded(10, low=1)
    checkpoint_every_n_steps: int = bounded(500, low=1)
    # where metrics go, through Lightning's loggers: csv (RUN/logs/metrics.csv), tensorboard (RUN/logs),
    # mlflow (a local file store in RUN/mlruns, or `mlflow_uri`; pip install 'dreamteacher[mlflow]'),
    # wandb (offline without WANDB_API_KEY; pip install wandb)
    loggers: list[str] = field(default_factory=lambda: ["csv", "tensorboard"])
    mlflow_uri: str = ""  # an MLflow tracking URI (http://..., file:..., databricks); "" = RUN/mlruns
    experiment: str = "dreamteacher"  # the MLflow experiment / W&B project name

    def check(self, config: Any) -> None:
        check_precision("trainer.precision", self.precision)
        unknown = [name for name in self.loggers if name not in LOGGERS]
        if unknown:
            raise UserError(f"trainer.loggers: unknown {unknown}; choose from {', '.join(LOGGERS)}")


class Sections:
    """A config made of section dataclasses, built by `resolve_sections` from `section_types()`."""

    @classmethod
    def section_types(cls) -> dict[str, type]:
        """Section name -> its dataclass (the field's type: a section's default may come from a factory
        function that sets other defaults)."""
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in self.section_types()}

    def validate(self) -> None:
        for name in self.section_types():
            check_ranges(name, getattr(self, name))
        for name in self.section_types():
            getattr(self, name).check(self)


# name -> section dataclass of the pretraining / teacher `Config`, in registration order
SECTIONS: Registry[type] = Registry("config section")


def register_section(name: str, section_cls: type) -> type:
    """Makes `section_cls` the `name` section of every `Config` (a method's or teacher's settings)."""
    return SECTIONS.register(name, section_cls)


for _name, _cls in (("data", DataConfig), ("student", StudentConfig), ("optim", OptimConfig),
                    ("trainer", TrainerConfig)):
    register_section(_name, _cls)


class Config(Sections):
    """The settings of a pretraining or teacher run: one attribute per registered section
    (`config.data.resolution`, `config.denoise.sigma`, ...)."""

    # the sections every module can rely on; the registered ones are attributes too
    data: DataConfig
    student: StudentConfig
    optim: OptimConfig
    trainer: TrainerConfig

    def __init__(self, **sections: Section):
        unknown = set(sections) - set(SECTIONS)
        if unknown:
            raise TypeError(f"unknown config sections {sorted(unknown)}")
        for name, cls in SECTIONS.items():
            setattr(self, name, sections.get(name) or cls())

    @classmethod
    def section_types(cls) -> dict[str, type]:
        return dict(SECTIONS.items())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Config({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _merge(base: dict, update: dict, where: str = "") -> dict:
    """Deep-merge `update` into `base`, refusing keys that are not settings."""
    for key, value in update.items():
        name = f"{where}{key}"
        if key not in base:
            close = difflib.get_close_matches(key, list(base), n=1)
            hint = f" (did you mean {where}{close[0]}?)" if close else ""
            raise UserError(f"unknown setting '{name}'{hint}")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise UserError(f"setting '{name}' is a section; set its fields, e.g. {name}.<field>=...")
            _merge(base[key], value, f"{name}.")
        else:
            base[key] = value
    return base


def parse_overrides(pairs: list[str]) -> dict:
    """['optim.epochs=5', 'data.resolution=[96,128]'] -> nested dict (values parsed as YAML)."""
    nested: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set expects key=value, got '{pair}'")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise UserError(f"--set {key}: cannot parse value '{raw}'") from None
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def build_config(preset: str | None = None, overrides: list[str] | dict | None = None,
                 base: dict | None = None) -> Config:
    """Defaults <- `base` (e.g. a saved run config) <- preset file <- overrides, then validated."""
    config = resolve_sections(Config, [base or {}, *_preset_chain(preset), as_dict(overrides)])
    config.validate()
    return config


def resolve_sections(root_cls: type, layers: list[dict]):
    """A config of sections (`root_cls`), its defaults updated by each layer in turn; unknown names
    are refused and values coerced to the fields' types."""
    resolved = root_cls().to_dict()
    for layer in layers:
        _merge(resolved, layer)
    return root_cls(**{name: section_cls(**{key: _coerce(f"{name}.{key}", value, hints[key])
                                            for key, value in resolved[name].items()})
                       for name, section_cls in root_cls.section_types().items()
                       for hints in [typing.get_type_hints(section_cls)]})


def merge_overrides(overrides: list[str] | dict | None, extra: dict) -> list[str] | dict | None:
    """`overrides` (dotted list or nested dict) with whole sections of `extra` merged in; no input mutated."""
    if not extra:
        return overrides
    merged = parse_overrides(overrides) if isinstance(overrides, list) else copy.deepcopy(dict(overrides or {}))
    for section, values in extra.items():
        if not isinstance(values, dict):
            raise UserError(f"keyword '{section}' takes a dict of that section's settings, got {values!r}")
        merged.setdefault(section, {}).update(values)
    return merged


def as_dict(overrides: list[str] | dict | None) -> dict:
    if not overrides:
        return {}
    return overrides if isinstance(overrides, dict) else parse_overrides(overrides)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """YAML values -> the field's type (YAML reads `1e-3` as a string, for one); clear error otherwise."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"setting '{name}' expects a list, e.g. [1, 2], got {value!r}")
        (item_hint,) = typing.get_args(hint)
        return [_coerce(name, item, item_hint) for item in value]
    try:
        if hint is bool:
            if not isinstance(value, bool):
                raise ValueError
            return value
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            return str(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"setting '{name}' expects {hint.__name__}, got {value!r}") from None
    return value


def _preset_chain(preset: str | None) -> list[dict]:
    """The preset's settings, preceded by those of the preset it names as `base` (recursively)."""
    chain: list[dict] = []
    while preset:
        path = PRESET_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise UserError(f"unknown preset '{preset}'; choose one of: {', '.join(available_presets())}")
        layer = yaml.safe_load(path.read_text()) or {}
        preset = layer.pop("base", None)
        chain.insert(0, layer)
        if len(chain) > 8:
            raise UserError(f"preset chain too deep at '{path.name}' (a base cycle?)")
    return chain


def preset_layers(kind: str, preset_dir: Path, preset: str | None, overrides: list[str] | dict | None,
                  base: dict | None) -> list[dict]:
    """Config layers in order: `base` (a saved run's config), the named preset file, the overrides."""
    layers = [base or {}]
    if preset:
        path = preset_dir / f"{preset}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in preset_dir.glob("*.yaml"))
            raise UserError(f"unknown {kind} preset '{preset}'; choose one of: {', '.join(names)}")
        layers.append(load_config_file(path))
    return layers + [as_dict(overrides)]


def save_config(config: Sections, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def load_config_file(path: Path) -> dict:
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: not a readable config file ({exc.__class__.__name__})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise UserError(f"{path}: not a config file (a mapping of sections)")
    return loaded or {}
