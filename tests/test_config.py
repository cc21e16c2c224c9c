import pytest

from dreamteacher.core.config import available_presets, build_config, parse_overrides
from dreamteacher.core.errors import UserError


def test_every_preset_builds():
    assert {"imagenet", "bdd100k", "lsun", "ffhq", "cpu-small", "demo"} <= set(available_presets())
    for name in available_presets():
        build_config(name)


def test_paper_presets_follow_table_17():
    bdd = build_config("bdd100k")
    assert bdd.data.resolution == [128, 256] and bdd.encode.t == 50 and bdd.optim.name == "adamw"
    assert bdd.optim.epochs == 600 and bdd.diffusion.block_out_channels == [128, 128, 256, 256, 384, 512]
    imagenet = build_config("imagenet")
    assert imagenet.optim.name == "lamb" and imagenet.optim.batch_size == 2048 and imagenet.encode.t == 150


def test_dotted_overrides_and_base_presets():
    config = build_config("demo", ["optim.epochs=3", "encode.blocks=[1, 2]", "student.backbone=resnet50"])
    assert config.optim.epochs == 3 and config.encode.blocks == [1, 2]
    assert config.student.backbone == "resnet50"
    assert config.diffusion.block_out_channels == build_config("cpu-small").diffusion.block_out_channels
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}


@pytest.mark.parametrize("override, message", [
    ("optim.epoch=3", "unknown setting 'optim.epoch' .did you mean optim.epochs"),
    ("encode.mode=random", "encode.mode"),
    ("encode.blocks=[1,1]", "encode.blocks"),
    ("data.resolution=[72,96]", "divisible by 16"),
    ("loss.at_weight=-1", "setting 'loss.at_weight' must be >= 0, got -1.0"),
    ("loss.whiten=channel", "loss.whiten must be 'pixel' or 'layer', got 'channel'"),
    ("teacher_train.precision=bf8", "teacher_train.precision must be one of auto, 32-true, bf16-mixed"),
    ("trainer.precision=half", "trainer.precision must be one of"),
    ("denoise.crop=[48,64]", "denoise.crop must be .height, width. within data.resolution .* divisible by 32"),
    ("optim=3", "is a section"),
    ("encode.t", "key=value"),
])
def test_bad_settings_are_named(override, message):
    with pytest.raises(UserError, match=message):
        build_config("cpu-small", [override])


def test_unknown_preset():
    with pytest.raises(UserError, match="unknown preset 'tiny'; choose one of"):
        build_config("tiny")


def test_values_are_coerced_to_the_field_type():
    config = build_config("cpu-small", ["optim.base_lr=1e-3", "optim.epochs=5.0", "loss.at_weight=0"])
    assert config.optim.base_lr == 1e-3 and isinstance(config.optim.base_lr, float)
    assert config.optim.epochs == 5 and isinstance(config.optim.epochs, int)
    with pytest.raises(UserError, match="setting 'optim.epochs' expects int, got 'many'"):
        build_config("cpu-small", ["optim.epochs=many"])
    with pytest.raises(UserError, match="setting 'encode.blocks' expects a list"):
        build_config("cpu-small", ["encode.blocks=3"])
