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
import warnings
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
    num_workers: int = bounded(4, low=0)
    # an unreadable image in --data (or a listed path that does not exist): "skip" it, counted and listed
    # in RUN/skipped-images.txt, or "error": stop with one line naming it. Files that are not images
    # (a labels.csv, a README) are always skipped and counted.
    on_bad_image: str = "skip"

    def check(self, config: Any) -> None:
        if len(self.resolution) != 2:
            raise UserError(f"data.resolution must be [height, width] of integers >= 16, got {self.resolution}")
        if self.on_bad_image not in ("skip", "error"):
            raise UserError(f"data.on_bad_image must be 'skip' or 'error', got '{self.on_bad_image}'")


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
    # the global batch (the paper's figure): split over all processes, and each process's share into
    # micro-batches of `micro_batch` images whose gradients are accumulated into one step; the learning
    # rate follows the global batch alone (base_lr x batch_size / 256), never the device count
    batch_size: int = bounded(2048, low=1)
    # per device; 0 = each device's whole share at once (`dreamteacher plan` measures the largest that fits)
    micro_batch: int = bounded(0, low=1, allowed=(0,))
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
    # glibc keeps freed host buffers for the next step instead of returning them to the kernel: about
    # 5% of a cpu-small step on 2 cores (engine.reuse_host_memory). Process-wide and not undone when
    # the run ends (glibc has no way back to its adaptive default), so off unless asked for; the CPU
    # presets ask for it.
    reuse_host_memory: bool = False
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

    def section_types(self) -> dict[str, type]:
        """Section name -> its dataclass (the field's type: a section's default may come from a factory
        function that sets other defaults)."""
        hints = typing.get_type_hints(type(self))
        return {f.name: hints[f.name] for f in dataclasses.fields(self)}

    def rebuild(self, **sections: Section) -> "Sections":
        """The same kind of config holding `sections`."""
        return type(self)(**sections)

    def defaults(self) -> "Sections":
        """The same kind of config at its defaults (what stage keys are measured against)."""
        return type(self)()

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in self.section_types()}

    def validate(self) -> None:
        for name in self.section_types():
            check_ranges(name, getattr(self, name))
        for name in self.section_types():
            getattr(self, name).check(self)


# name -> section dataclass of the pretraining / teacher settings, in registration order: the
# catalogue each method and teacher kind picks the sections it reads from
SECTIONS: Registry[type] = Registry("config section")


def register_section(name: str, section_cls: type) -> type:
    """Makes `section_cls` the `name` section (a method's or teacher's settings) that a `Config` may hold."""
    return SECTIONS.register(name, section_cls)


for _name, _cls in (("data", DataConfig), ("student", StudentConfig), ("optim", OptimConfig),
                    ("trainer", TrainerConfig)):
    register_section(_name, _cls)


class Config(Sections):
    """The settings of one pretraining or teacher run: the sections its method or teacher kind reads
    (`names`, registered by the modules they configure), as attributes (`config.data.resolution`,
    `config.denoise.sigma`, ...). Without `names`, every registered section (the catalogue: tools that
    describe settings rather than run them). `owner` names the run kind in messages."""

    data: DataConfig
    student: StudentConfig
    optim: OptimConfig
    trainer: TrainerConfig

    def __init__(self, names: typing.Iterable[str] | None = None, owner: str = "", **sections: Section):
        names = tuple(names) if names is not None else tuple(SECTIONS)
        unknown = [n for n in [*names, *sections] if n not in SECTIONS]
        if unknown:
            raise TypeError(f"unknown config sections {sorted(set(unknown))}")
        extra = set(sections) - set(names)
        if extra:
            raise TypeError(f"sections {sorted(extra)} are not among {list(names)}")
        self.__dict__["_names"], self.__dict__["_owner"] = names, owner
        for name in names:
            setattr(self, name, sections.get(name) or SECTIONS.get(name)())

    def __getattr__(self, name: str):
        if name.startswith("_") or name not in SECTIONS:
            raise AttributeError(name)
        raise AttributeError(f"the settings of {self._owner or 'this run'} have no '{name}' section "
                             f"(they hold {', '.join(self._names)})")

    @property
    def names(self) -> tuple[str, ...]:
        return self._names

    @property
    def owner(self) -> str:
        return self._owner

    def section_types(self) -> dict[str, type]:
        return {name: SECTIONS.get(name) for name in self._names}

    def rebuild(self, **sections: Section) -> "Config":
        return Config(self._names, self._owner, **sections)

    def defaults(self) -> "Config":
        return Config(self._names, self._owner)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Config({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"


# -- settings files: schema versions and renamed settings ------------------------------------------

# The version of the settings a run folder's config.yaml and run.json are written in. 1: before
# versions were written (every registered section in every run, the lab options among the user
# settings); 2: the sections the run's method reads, lab options under `lab`.
SCHEMA_VERSION = 2
SCHEMA_KEY = "schema"

# Settings renamed or moved, old dotted name -> new (timm's register_model_deprecations, for
# settings): saved run folders and old overrides keep loading; a user's old name warns once.
RENAMED_SETTINGS: dict[str, str] = {
    # schema 2: options measured on camvid-cpu and not adopted, out of the user settings (`lab`)
    "data.crop_scale": "lab.crop_scale",
    "data.color_jitter": "lab.color_jitter",
    "loss.whiten": "lab.whiten",
    "optim.backbone_lr_scale": "lab.backbone_lr_scale",
    "model.norm_rescale": "lab.norm_rescale",
}


def rename_settings(layer: dict, warn: bool = False, where: str = "") -> dict:
    """`layer` (nested sections) with every renamed setting under its new name."""
    if not layer:
        return layer
    layer = copy.deepcopy(layer)
    for old, new in RENAMED_SETTINGS.items():
        old_section, old_field = old.split(".")
        section = layer.get(old_section)
        if not isinstance(section, dict) or old_field not in section:
            continue
        value = section.pop(old_field)
        if not section:
            layer.pop(old_section)
        new_section, new_field = new.split(".")
        layer.setdefault(new_section, {})[new_field] = value
        if warn:
            warnings.warn(f"setting '{old}' is now '{new}'{where}", DeprecationWarning, stacklevel=4)
    return layer


def split_schema(loaded: dict, path: Path | str) -> tuple[int, dict]:
    """(schema version, sections) of a saved config; one line when it is from a newer version."""
    loaded = dict(loaded or {})
    version = loaded.pop(SCHEMA_KEY, 1)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise UserError(f"{path} was written by a newer dreamteacher (settings schema {version}; this one reads up to "
                        f"{SCHEMA_VERSION}): upgrade dreamteacher to use this run folder")
    return version, rename_settings(loaded)


def with_schema(config: Sections) -> dict:
    """What config.yaml holds: the schema version, then the sections."""
    return {SCHEMA_KEY: SCHEMA_VERSION, **config.to_dict()}


# -- presets: named YAML files, each on top of the preset it names as `base:` ----------------------

PRESET_DIRS: dict[str, Path] = {"pretrain": PRESET_DIR, "finetune": PRESET_DIR / "finetune",
                                "interpreter": PRESET_DIR / "interpreter"}


def register_preset_kind(kind: str, folder: Path) -> None:
    """A kind of layered settings file (bench recipes register theirs)."""
    PRESET_DIRS[kind] = Path(folder)


def available_presets(kind: str = "pretrain") -> list[str]:
    """The named presets of `kind` (pretrain, finetune, interpreter, recipe): one listing for all."""
    return sorted(p.stem for p in PRESET_DIRS[kind].glob("*.yaml"))


def preset_path(kind: str, preset: str | Path) -> Path:
    """A preset's file: a name of `kind`, or a path to a .yaml file."""
    path = Path(preset)
    if path.suffix:
        if not path.is_file():
            raise UserError(f"{kind} file not found: {path}")
        return path
    path = PRESET_DIRS[kind] / f"{preset}.yaml"
    if not path.is_file():
        what = "preset" if kind == "pretrain" else f"{kind} preset" if kind != "recipe" else "recipe"
        raise UserError(f"unknown {what} '{preset}'; choose one of: {', '.join(available_presets(kind))}"
                        + (" or give a .yaml path" if kind == "recipe" else ""))
    return path


def load_preset(kind: str, preset: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A preset's settings on top of those of the preset it names as `base:` (a name of the same kind,
    or a .yaml path relative to it), merged section by section: lists are replaced whole, and a key
    set to null removes what the base set."""
    path = preset_path(kind, preset).resolve()
    if path in _seen:
        raise UserError(f"{path.name}: a base: cycle ({' -> '.join(p.name for p in (*_seen, path))})")
    layer = dict(load_config_file(path))
    base = layer.pop("base", None)
    if base is not None:
        if Path(str(base)).suffix and not Path(base).is_absolute():
            base = path.parent / base
        layer = deep_merge(load_preset(kind, base, (*_seen, path)), layer)
    return layer if _seen else without_nulls(layer)


def deep_merge(*layers: dict | None) -> dict:
    """The layers merged in order, dicts key by key, anything else (lists, values, None) replaced; no
    input is changed. The one merge of settings layers (presets, recipes, overrides)."""
    merged: dict = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = deep_merge(merged[key], value)
            else:
                merged[key] = copy.deepcopy(value)
    return merged


def without_nulls(layer: dict) -> dict:
    return {k: without_nulls(v) if isinstance(v, dict) else v for k, v in layer.items() if v is not None}


def only_sections(layer: dict | None, names: typing.Iterable[str]) -> dict:
    """The sections of `layer` among `names` (a shared preset or recipe layer, for one run kind)."""
    names = set(names)
    return {k: v for k, v in (layer or {}).items() if k in names}


# -- building a config ----------------------------------------------------------------------------

def check_known(layer: dict, template: dict, where: str = "") -> None:
    """Refuses names in `layer` that are not settings of `template` (with a did-you-mean hint)."""
    for key, value in layer.items():
        name = f"{where}{key}"
        if key not in template:
            close = difflib.get_close_matches(key, list(template), n=1)
            hint = f" (did you mean {where}{close[0]}?)" if close else ""
            raise UserError(f"unknown setting '{name}'{hint}")
        if isinstance(template[key], dict):
            if not isinstance(value, dict):
                raise UserError(f"setting '{name}' is a section; set its fields, e.g. {name}.<field>=...")
            check_known(value, template[key], f"{name}.")


def resolve_sections(template: Sections, layers: list[dict], strict: list[bool] | None = None) -> Sections:
    """`template`'s kind of config, its defaults updated by each layer in turn: unknown names are
    refused and values coerced to the fields' types. A layer not marked `strict` (a preset or a saved
    run shared by several run kinds) may hold sections this config does not have: they are left out.
    A strict layer (the user's overrides) naming such a section is refused in one line."""
    resolved = template.to_dict()
    types = template.section_types()
    owner = getattr(template, "owner", "") or "this run"
    for i, layer in enumerate(layers):
        layer = layer or {}
        foreign = [name for name in layer if name not in resolved]
        if foreign and (strict or [False] * len(layers))[i]:
            known = [name for name in foreign if name in SECTIONS]
            if known:
                raise UserError(f"{owner} does not read the '{known[0]}' section (it reads {', '.join(resolved)}); "
                                f"a setting of {known[0]}.* would be ignored")
        else:
            layer = {k: v for k, v in layer.items() if k in resolved or k not in SECTIONS}
        check_known(layer, resolved)
        resolved = deep_merge(resolved, layer)
    return template.rebuild(**{name: section_cls(**{key: _coerce(f"{name}.{key}", value, hints[key])
                                                    for key, value in resolved[name].items()})
                               for name, section_cls in types.items()
                               for hints in [typing.get_type_hints(section_cls)]})


def build_config(preset: str | None = None, overrides: list[str] | dict | None = None,
                 base: dict | None = None, sections: typing.Iterable[str] | None = None,
                 owner: str = "") -> Config:
    """Defaults <- `base` (a saved run config) <- preset file <- overrides, then validated. With
    `sections` (what a method or teacher kind reads), the config holds those alone: the preset and
    the saved config may hold others (they are left out), the overrides may not."""
    template = Config(sections, owner)
    base_layer = split_schema(base, "the saved config")[1] if base else {}
    user = rename_settings(as_dict(overrides), warn=True)
    layers = [base_layer, rename_settings(load_preset("pretrain", preset)) if preset else {}, user]
    config = resolve_sections(template, layers, strict=[False, False, sections is not None])
    config.validate()
    return config


def merge_overrides(overrides: list[str] | dict | None, extra: dict) -> list[str] | dict | None:
    """`overrides` (dotted list or nested dict) with whole sections of `extra` merged in; no input mutated."""
    if not extra:
        return overrides
    for section, values in extra.items():
        if not isinstance(values, dict):
            raise UserError(f"keyword '{section}' takes a dict of that section's settings, got {values!r}")
    return deep_merge(as_dict(overrides), extra)


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
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: '{part}' is set to a value and to a section")
        node[parts[-1]] = value
    return nested


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
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"setting '{name}' expects {hint.__name__}, got {value!r}") from None
    return value


def preset_layers(kind: str, preset: str | None, overrides: list[str] | dict | None,
                  base: dict | None) -> list[dict]:
    """Config layers in order: `base` (a saved run's config), the named preset of `kind`, the overrides."""
    base_layer = split_schema(base, "the saved config")[1] if base else {}
    preset_layer = rename_settings(load_preset(kind, preset)) if preset else {}
    return [base_layer, preset_layer, rename_settings(as_dict(overrides), warn=True)]


def save_config(config: Sections, path: Path) -> None:
    path.write_text(yaml.safe_dump(with_schema(config), sort_keys=False))


def load_config_file(path: Path) -> dict:
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: not a readable config file ({exc.__class__.__name__})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise UserError(f"{path}: not a config file (a mapping of sections)")
    return loaded or {}
