"""Run configuration: typed dataclasses, named YAML presets, dotted `--set key=value` overrides.

Defaults below are the paper's (DreamTeacher Tables 16-17, ImageNet column); presets in
`dreamteacher/configs/*.yaml` override a few fields each. The resolved config is saved with every run
and inside every checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dreamteacher.errors import UserError

PRESET_DIR = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    resolution: list[int] = field(default_factory=lambda: [256, 256])  # [height, width]
    hflip: bool = True  # the only augmentation of the paper's pretraining (Table 17)
    # distillation (dt-feat, dt-mix) only, both off by default (the paper's pretraining flips alone):
    # [low, high]: a random crop of each image covering that fraction of its area at its aspect ratio,
    # resized back to `resolution`, the teacher's features cropped and resized with it (scale jitter);
    # [] = off
    crop_scale: list[float] = field(default_factory=list)
    # > 0: brightness, contrast and saturation jitter of that strength (hue a quarter of it) on the
    # image the student sees; the teacher's features stay those of the unjittered image; 0 = off
    color_jitter: float = 0.0
    num_workers: int = 4


@dataclass
class DiffusionConfig:
    """The teacher U-Net trained by `train-teacher` (ADM style, Table 16) and its DDPM."""

    block_out_channels: list[int] = field(default_factory=lambda: [256, 256, 512, 512, 1024, 1024])
    layers_per_block: int = 2
    attention_levels: list[int] = field(default_factory=lambda: [3, 4, 5])  # levels at stride 8,16,32
    attention_head_dim: int = 64
    dropout: float = 0.0
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 2e-2


@dataclass
class TeacherTrainConfig:
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 500
    max_steps: int = 500_000
    ema_decay: float = 0.9999
    grad_clip: float = 1.0
    # [height, width] random crop of each image (at data.resolution) per step; [] trains on whole
    # images. Crops keep the object scale the teacher will encode at, for a fraction of the cost.
    crop: list[int] = field(default_factory=list)
    # Lightning precision of the teacher's training; "" uses trainer.precision. "bf16-mixed" on a CPU
    # with avx512_bf16 or AMX: 1.55x faster steps for the cpu-small U-Net (emulated and slower without).
    precision: str = ""


@dataclass
class EncodeConfig:
    """How real images become teacher features (the paper's *encoded dataset*, section 3.1)."""

    t: int = 150  # 150 for ImageNet-like data, 50 for LSUN/FFHQ/BDD-like (Table 17)
    # Indices of the U-Net decoder blocks whose outputs are distilled, counted over all layers of all
    # up blocks (ADM's output_blocks). For ADM-256, blocks 3,6,9,12 sit at strides 16,8,4,2.
    blocks: list[int] = field(default_factory=lambda: [3, 6, 9, 12])
    mode: str = "stochastic"  # or "ddim": deterministic DDIM inversion to t
    ddim_steps: int = 10  # inversion steps for mode=ddim
    # channels per attention head of a guided-diffusion .pt teacher: not stored in its weights;
    # 64 for the released 256x256 and LSUN models
    adm_head_channels: int = 64
    # K stochastic encodings per image in the offline feature cache (`pretrain --cache DIR`); each
    # epoch draws one of them per image, so K sets how many noise draws the student ever sees
    cache_encodings: int = 4


@dataclass
class StudentConfig:
    backbone: str = "resnet50"  # any timm CNN with forward_intermediates (resnet*, convnext*, ...)
    regressor_channels: int = 256  # FPN width (appendix D.1)
    ppm_scales: list[int] = field(default_factory=lambda: [1, 2, 3, 6])


@dataclass
class LossConfig:
    mse_weight: float = 1.0
    # what the LayerNorm whitening of Eq. 1 normalizes over: "pixel" (the channels at each pixel) or
    # "layer" (each sample's whole C x H x W map); see losses/feature.py `whiten`
    whiten: str = "pixel"
    at_weight: float = 10.0  # lambda_AT of Eq. 3, "to make the two losses in the same scale"
    at_p: int = 2
    ld_weight: float = 1.0  # dt-mix: lambda_ld of Eq. 6
    ld_temperature: float = 4.0  # dt-mix: tau of Eq. 5


@dataclass
class DenoiseConfig:
    """Denoising pretraining (`--method dep|ddep`, Brempong et al.): a U-Net on the student backbone
    learns to predict the noise of x + sigma * eps (Eq. 4)."""

    sigma: float = 0.0  # fixed noise level; 0 = the method's own (0.8 DeP, 0.1 DDeP, section 3.3)
    sigma_range: list[float] = field(default_factory=list)  # [a, b]: sigma ~ U(a, b) per image (Table 6)
    target: str = "eps"  # "eps" (Eq. 4) or "x", the clean image (Table 7)
    ddpm_scaling: bool = False  # Eq. 2: sqrt(g) x + sqrt(1 - g) eps at the same signal-to-noise ratio
    unet_width: int = 64  # finest decoder block; blocks [16, 8, 4, 2, 1] x this (64: the paper's "1x")
    # [height, width] random crop of each image (at data.resolution) per step, divisible by 32 (the
    # encoder's stride); [] trains on whole images. More steps in the same time at the same object scale.
    crop: list[int] = field(default_factory=list)


@dataclass
class GanConfig:
    """The StyleGAN2 teacher (`train-teacher --kind stylegan2`, teachers/stylegan2.py). Levels run from
    the coarsest (the learned constant) to the full resolution, one per doubling."""

    z_dim: int = 256
    w_dim: int = 256
    mapping_layers: int = 4
    channels: list[int] = field(default_factory=lambda: [256, 256, 256, 128, 64, 32])  # per level, coarse first
    lr: float = 0.002
    r1_gamma: float = 1.0  # R1 weight on reals
    r1_every: int = 16  # lazy regularization interval (iterations)


@dataclass
class ContrastConfig:
    """Contrastive methods: MoCo v3 (`--method mocov3`, Chen et al. 2021) and pixel-wise contrastive
    distillation from a MoCo v3 teacher (`--method pcd`, Huang et al.). Paper sizes by default."""

    temperature: float = 0.2  # MoCo v3 ResNet-50 and PCD (section 3.2)
    proj_hidden: int = 4096  # hidden width of the projector / predictor MLPs (and of PCD's student head)
    proj_dim: int = 256  # output width: the space the losses contrast in
    momentum: float = 0.99  # MoCo v3: momentum-encoder EMA, raised to 1 along a half cosine
    queue_size: int = 65536  # PCD: pooled teacher vectors kept as negatives
    mhsa: bool = True  # PCD: multi-head self-attention after the student's projection head
    mhsa_heads: int = 8
    mhsa_head_dim: int = 64
    symmetric: bool = True  # PCD: the loss on both augmented views (False: the first view only)
    pixelwise: bool = True  # PCD: per-pixel InfoNCE (False: the image-level variant of Table 2)
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # random-resized-crop area range


@dataclass
class OptimConfig:
    name: str = "lamb"  # "adamw", "lamb", "lars" (PCD, MoCo v3 ResNet), any timm optimizer name
    base_lr: float = 4e-3  # scaled by batch_size / 256
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # Adam-family optimizers
    momentum: float = 0.9  # SGD-family optimizers (lars, sgd)
    batch_size: int = 2048  # global batch, split over all processes
    epochs: int = 200
    warmup_epochs: int = 30
    max_steps: int = -1  # > 0 caps the run (smoke tests, demos)


# Lightning's precision names (and their short forms)
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "32", "bf16", "16", "64")


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # "ddp" for many GPUs or CPU processes
    precision: str = "32-true"  # "bf16-mixed" on GPUs
    sync_batchnorm: bool = False  # BatchNorm over the global batch in multi-GPU runs (CUDA only)
    channels_last: bool = False  # pretraining: NHWC student and its images (the teacher stays NCHW: GroupNorm)
    compile: bool = False  # pretraining: torch.compile student, regressor and the teacher block by block
    cudnn_benchmark: bool = True  # GPU: input shapes are fixed (resize, crops), so cuDNN times its kernels once
    reuse_host_memory: bool = True  # glibc keeps freed buffers for the next step (engine.reuse_host_memory)
    seed: int = 0
    log_every_n_steps: int = 10
    checkpoint_every_n_steps: int = 500


class Sections:
    """A config made of section dataclasses (`Config`, `FinetuneConfig`): built by `resolve_sections`."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Config(Sections):
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    teacher_train: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    denoise: DenoiseConfig = field(default_factory=DenoiseConfig)
    contrast: ContrastConfig = field(default_factory=ContrastConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def teacher_trainer(self) -> TrainerConfig:
        """The trainer settings of the teacher's own training: `trainer`, in `teacher_train.precision` when set."""
        return dataclasses.replace(self.trainer, precision=self.teacher_train.precision or self.trainer.precision)


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
    config = resolve_sections(Config, [base or {}, *_preset_chain(preset), _as_dict(overrides)])
    validate(config)
    return config


def resolve_sections(root_cls: type, layers: list[dict]):
    """A config dataclass of sections (`root_cls`), its defaults updated by each layer in turn;
    unknown names are refused and values coerced to the fields' types."""
    resolved = root_cls().to_dict()
    for layer in layers:
        _merge(resolved, layer)
    return root_cls(**{name: section_cls(**{key: _coerce(f"{name}.{key}", value, hints[key])
                                            for key, value in resolved[name].items()})
                       for name, section_cls in _sections(root_cls).items()
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


def _as_dict(overrides: list[str] | dict | None) -> dict:
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
    except (TypeError, ValueError):
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


def _sections(root_cls: type) -> dict[str, type]:
    """Section name -> its dataclass (the field's type: a section's default may come from a factory
    function that sets other defaults)."""
    hints = typing.get_type_hints(root_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(root_cls)}


def validate(config: Config) -> None:
    res = config.data.resolution
    if not (isinstance(res, list) and len(res) == 2 and all(isinstance(v, int) and v >= 16 for v in res)):
        raise UserError(f"data.resolution must be [height, width] of integers >= 16, got {res}")
    scale = config.data.crop_scale
    if scale and not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise UserError(f"data.crop_scale must be [low, high] with 0 < low <= high <= 1 (or [] for off), got {scale}")
    if not 0 <= config.data.color_jitter <= 1:
        raise UserError(f"data.color_jitter must be in [0, 1] (0 = off), got {config.data.color_jitter}")
    if config.encode.mode not in ("stochastic", "ddim"):
        raise UserError(f"encode.mode must be 'stochastic' or 'ddim', got '{config.encode.mode}'")
    if not 0 <= config.encode.t < config.diffusion.num_train_timesteps:
        raise UserError(f"encode.t must be in [0, {config.diffusion.num_train_timesteps}), got {config.encode.t}")
    blocks = config.encode.blocks
    if not blocks or len(blocks) > 4 or len(set(blocks)) != len(blocks) or not all(isinstance(b, int) for b in blocks):
        raise UserError(f"encode.blocks must be 1 to 4 distinct integers, got {blocks}")
    if config.optim.name not in ("adamw", "lamb", "lars", "sgd"):
        raise UserError(f"optim.name must be 'adamw', 'lamb', 'lars' or 'sgd', got '{config.optim.name}'")
    c = config.contrast
    if len(c.crop_scale) != 2 or not 0 < c.crop_scale[0] <= c.crop_scale[1] <= 1:
        raise UserError(f"contrast.crop_scale must be [low, high] with 0 < low <= high <= 1, got {c.crop_scale}")
    if c.queue_size < 1 or c.temperature <= 0 or not 0 <= c.momentum <= 1:
        raise UserError("contrast: queue_size must be >= 1, temperature > 0 and momentum in [0, 1]")
    for name, value in (("trainer.precision", config.trainer.precision),
                        ("teacher_train.precision", config.teacher_trainer().precision)):
        if value not in PRECISIONS:
            raise UserError(f"{name} must be one of {', '.join(PRECISIONS)}, got '{value}'")
    if config.loss.mse_weight < 0 or config.loss.at_weight < 0:
        raise UserError("loss.mse_weight and loss.at_weight must be >= 0")
    if config.loss.mse_weight == 0 and config.loss.at_weight == 0:
        raise UserError("loss.mse_weight and loss.at_weight are both 0: nothing to train")
    if config.loss.whiten not in ("pixel", "layer"):
        raise UserError(f"loss.whiten must be 'pixel' or 'layer', got '{config.loss.whiten}'")
    for name, value in (("optim.batch_size", config.optim.batch_size),
                        ("teacher_train.batch_size", config.teacher_train.batch_size)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a positive integer, got {value}")
    levels = len(config.diffusion.block_out_channels)
    factor = 2 ** (levels - 1)
    if any(v % factor for v in res):
        raise UserError(f"data.resolution {res} must be divisible by {factor} "
                        f"(the U-Net halves it {levels - 1} times)")
    for name, crop, multiple in (("teacher_train.crop", config.teacher_train.crop, factor),
                                 ("denoise.crop", config.denoise.crop, 32)):  # 32: the U-Net encoder's stride
        if crop and not (len(crop) == 2 and all(0 < c <= r and c % multiple == 0 for c, r in zip(crop, res))):
            raise UserError(f"{name} must be [height, width] within data.resolution {res} and "
                            f"divisible by {multiple}, got {crop}")
    dn = config.denoise
    if dn.target not in ("eps", "x"):
        raise UserError(f"denoise.target must be 'eps' or 'x', got '{dn.target}'")
    bad_range = dn.sigma_range and not (len(dn.sigma_range) == 2 and 0 <= dn.sigma_range[0] < dn.sigma_range[1])
    if dn.sigma < 0 or bad_range:
        raise UserError(f"denoise.sigma must be >= 0 and denoise.sigma_range [a, b] with 0 <= a < b, "
                        f"got {dn.sigma} and {dn.sigma_range}")
    if not isinstance(dn.unet_width, int) or dn.unet_width < 1:
        raise UserError(f"denoise.unet_width must be a positive integer, got {dn.unet_width}")
    if any(not 0 <= lvl < levels for lvl in config.diffusion.attention_levels):
        raise UserError(f"diffusion.attention_levels must be in [0, {levels}), got {config.diffusion.attention_levels}")


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def load_config_file(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}
