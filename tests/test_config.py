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
    ("lab.whiten=channel", "lab.whiten must be 'pixel' or 'layer', got 'channel'"),
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


# -- settings that belong to their method (issue 41) ----------------------------------------------

def test_a_run_holds_the_sections_its_method_reads_and_refuses_others(tmp_path, tiny_teacher_dir, capsys):
    import yaml

    from conftest import TINY_PRESET, write_images
    from dreamteacher.cli import main
    from dreamteacher.methods.base import METHODS

    images = write_images(tmp_path / "images")
    sets = ["--preset", str(TINY_PRESET)]
    args = ["pretrain", "--teacher", str(tiny_teacher_dir), "--data", str(images), "--no-progress", *sets]
    assert main([*args, "--out", str(tmp_path / "student")]) == 0
    saved = yaml.safe_load((tmp_path / "student" / "config.yaml").read_text())
    assert saved.pop("schema") == 2
    assert list(saved) == list(METHODS.get("dt-feat").config_sections())
    assert "gan" not in saved and "denoise" not in saved and "teacher_train" not in saved
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "other"), "--set", "gan.r1_gamma=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("dreamteacher pretrain: error: --method dt-feat does not read the 'gan' section (it reads data, "
                   "encode, student, loss, optim, trainer, lab, probe); a setting of gan.* would be ignored")
    assert not (tmp_path / "other").exists()


def test_presets_serve_every_run_kind_but_user_settings_must_be_read():
    from dreamteacher.methods.base import METHODS, TEACHER_TRAINERS

    mocov3 = METHODS.get("mocov3")
    config = build_config("camvid-cpu", None, sections=mocov3.config_sections(), owner=mocov3.owner())
    assert config.names == mocov3.config_sections()  # the preset's teacher_train, encode and loss left out
    with pytest.raises(AttributeError, match="have no 'encode' section"):
        config.encode
    with pytest.raises(UserError, match="--method mocov3 does not read the 'loss' section"):
        build_config("camvid-cpu", ["loss.at_weight=1"], sections=mocov3.config_sections(), owner=mocov3.owner())
    ddpm = TEACHER_TRAINERS.get("ddpm")
    assert ddpm.config_sections() == ("data", "diffusion", "teacher_train", "trainer")
    with pytest.raises(UserError, match="train-teacher --kind ddpm does not read the 'optim' section"):
        build_config("cpu-small", ["optim.epochs=3"], sections=ddpm.config_sections(), owner=ddpm.owner())


def every_field_changed(value):
    """Another value of the same type (the key must notice it)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, list):
        return [*value, value[-1] if value else 1]
    return f"{value}-changed"


def test_a_stage_key_covers_every_setting_of_every_section_its_run_reads():
    """The bench keys a stage on the settings of its run's config, which holds exactly the sections
    its method or teacher kind reads: a changed setting of any of them (the execution-only ones
    aside) changes the key, and nothing else can be read."""
    import copy

    from dreamteacher.bench.stages import EXECUTION_ONLY, key_settings
    from dreamteacher.core.config import Config
    from dreamteacher.methods.base import METHODS, TEACHER_TRAINERS

    for kind in [*METHODS.items(), *TEACHER_TRAINERS.items()]:
        cls = kind[1]
        config = Config(cls.config_sections(), cls.owner())
        base_key = key_settings(config)
        for section in config.names:
            skipped = EXECUTION_ONLY.get(section, ())
            if skipped is None:
                continue
            for field_name, value in config.to_dict()[section].items():
                if field_name in skipped:
                    continue
                changed = copy.deepcopy(config)
                setattr(getattr(changed, section), field_name, every_field_changed(value))
                assert key_settings(changed) != base_key, f"{cls.owner()}: {section}.{field_name} is not in its key"
