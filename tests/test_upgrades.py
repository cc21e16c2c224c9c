"""Run folders survive upgrades: settings files carry a schema version, renamed settings go through a
rename map (timm's register_model_deprecations habit), and a tiny run folder written before either
existed (tests/fixtures/run-schema1: a dt-feat student of 2 steps, written by the code of 71fd976) is
described, exported and resumed by today's code."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import timm
import yaml
from safetensors.torch import load_file

from conftest import write_images
from dreamteacher.cli import main
from dreamteacher.core.config import RENAMED_SETTINGS, SCHEMA_VERSION, build_config
from dreamteacher.core.errors import UserError
from dreamteacher.methods.base import METHODS

FIXTURE = Path(__file__).parent / "fixtures" / "run-schema1"


@pytest.fixture
def old_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    return run


def test_an_old_run_folder_is_described(old_run, capsys):
    assert "schema" not in yaml.safe_load((old_run / "config.yaml").read_text())  # written before versions
    assert main(["info", str(old_run)]) == 0
    info = yaml.safe_load(capsys.readouterr().out)
    assert info["method"] == "dt-feat" and info["step"] == 2 and info["settings_schema"] == 1
    assert info["config"]["student"] == "test_resnet" and info["finished"]["status"] == "finished"


def test_an_old_run_folder_is_exported_and_loads_into_timm_strictly(old_run, tmp_path):
    assert main(["export", str(old_run), "--out", str(tmp_path / "b.safetensors")]) == 0
    model = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    model.load_state_dict(load_file(str(tmp_path / "b.safetensors")), strict=True)


def test_an_old_run_folder_resumes_and_is_rewritten_in_todays_schema(old_run, tmp_path, tiny_teacher_dir):
    images = write_images(tmp_path / "images", count=8)  # the images it was trained on (same seed)
    # its teacher's path (inputs.json) is gone: a teacher of the same architecture is given instead
    assert main(["pretrain", "--data", str(images), "--out", str(old_run), "--teacher", str(tiny_teacher_dir),
                 "--resume", "--no-progress", "--set", "optim.max_steps=4"]) == 0
    saved = yaml.safe_load((old_run / "config.yaml").read_text())
    assert saved.pop("schema") == SCHEMA_VERSION
    assert list(saved) == list(METHODS.get("dt-feat").config_sections())  # gan, denoise, ... dropped
    assert "crop_scale" not in saved["data"] and saved["lab"]["crop_scale"] == []  # moved by the rename map
    record = json.loads((old_run / "run.json").read_text())
    assert record["schema"] == SCHEMA_VERSION and record["steps"] == 4 and record["resumed_at"] == [2]


def test_a_renamed_setting_still_works_and_says_its_new_name():
    assert RENAMED_SETTINGS["data.crop_scale"] == "lab.crop_scale"
    with pytest.warns(DeprecationWarning, match="'data.crop_scale' is now 'lab.crop_scale'"):
        config = build_config("cpu-small", ["data.crop_scale=[0.5, 1.0]"])
    assert config.lab.crop_scale == [0.5, 1.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a saved run's old names load silently
        build_config(None, None, base={"data": {"crop_scale": [0.4, 1.0]}})


@pytest.mark.parametrize("name", ["config.yaml", "run.json"])
def test_a_run_folder_of_a_newer_schema_is_refused_in_one_line(old_run, capsys, name):
    path = old_run / name
    if name == "config.yaml":
        path.write_text(yaml.safe_dump({"schema": SCHEMA_VERSION + 1, **yaml.safe_load(path.read_text())}))
    else:
        path.write_text(json.dumps({"schema": SCHEMA_VERSION + 1, **json.loads(path.read_text())}))
    assert main(["info", str(old_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{name} was written by a newer dreamteacher" in err, err


def test_bad_settings_files_are_one_line(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\noptim: {epochs: 2}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(UserError, match=r"a.yaml: a base: cycle \(a.yaml -> b.yaml -> a.yaml\)"):
        build_config(str(tmp_path / "a.yaml"))
    with pytest.raises(UserError, match="setting 'optim.epochs' expects int, got 'ten'"):
        build_config("cpu-small", ["optim.epochs=ten"])
