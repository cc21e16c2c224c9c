"""Never a silent wrong result: a diverging run stops and says so, caches notice replaced images,
settings are range-checked, corrupt weight files are one line, a kill during a checkpoint write
leaves nothing behind, a finished run resumed keeps its record, and `info` runs no code from a file."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import typing

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import REPO, TINY_PRESET, write_images
from dreamteacher import api
from dreamteacher.cli import main
from dreamteacher.core.config import SECTIONS, Config, build_config, parse_overrides
from dreamteacher.core.errors import UserError
from dreamteacher.core.runs import RunFolder
from dreamteacher.workflows.finetune import FinetuneConfig, build_finetune_config
from dreamteacher.workflows.interpreter import InterpreterConfig, build_interpreter_config


def test_a_diverging_run_stops_names_the_step_and_keeps_its_last_good_state(tmp_path, tiny_teacher_dir, capsys):
    images = write_images(tmp_path / "images")
    out = tmp_path / "nan"
    code = main(["pretrain", "--teacher", str(tiny_teacher_dir), "--data", str(images), "--out", str(out),
                 "--no-progress", "--preset", str(TINY_PRESET), "--set", "optim.base_lr=1e12",
                 "--set", "optim.epochs=4", "--set", "trainer.checkpoint_every_n_steps=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "diverged: step " in err[0] and "the loss is non-finite" in err[0]
    summary = json.loads((out / "run.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert summary["status"] == "diverged" and "non-finite" in summary["message"]
    assert not (out / "backbone.safetensors").exists()  # nothing exported from bad weights
    ckpt = RunFolder(out).checkpoint
    if ckpt.is_file():  # any checkpoint written is a good one
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not list(out.rglob(".partial-*"))


def test_exports_refuse_and_info_flags_non_finite_weights(tmp_path, tiny_teacher_dir):
    images = write_images(tmp_path / "images")
    run = api.pretrain(images, tmp_path / "ok", tiny_teacher_dir, preset=TINY_PRESET, progress=False)
    ckpt = torch.load(run.checkpoint, map_location="cpu", weights_only=False)
    key = next(k for k, v in ckpt["state_dict"].items() if k.startswith("backbone.") and v.is_floating_point())
    ckpt["state_dict"][key] = torch.full_like(ckpt["state_dict"][key], math.nan)
    torch.save(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(UserError, match="hold NaN or infinite values .* the run diverged; nothing exported"):
        api.export(tmp_path / "bad.ckpt", tmp_path / "bad.safetensors")
    assert "non_finite_tensors" in api.info(tmp_path / "bad.ckpt")
    weights = load_file(str(run.files["backbone"]))
    first = next(k for k, v in weights.items() if v.is_floating_point())
    weights[first].view(-1)[0] = math.inf
    save_file(weights, str(tmp_path / "inf.safetensors"), metadata={"format": "timm", "model": "test_resnet"})
    flagged = api.info(tmp_path / "inf.safetensors")
    assert flagged["non_finite_tensors"] == 1 and "do not use these weights" in flagged["warning"]
    assert "non_finite_tensors" not in api.info(run.files["backbone"])


def test_the_feature_cache_notices_an_image_replaced_by_one_of_the_same_name_and_size(tmp_path, tiny_teacher_dir):
    folder = tmp_path / "bmp"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):  # BMP: every 32x32 image is the same number of bytes
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"img_{i}.bmp")
    api.build_feature_cache(folder, tmp_path / "cache", tiny_teacher_dir, preset=TINY_PRESET, progress=False)
    size = (folder / "img_2.bmp").stat().st_size
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / "img_2.bmp")
    assert (folder / "img_2.bmp").stat().st_size == size
    with pytest.raises(UserError, match="built from other inputs .*images: cached"):
        api.build_feature_cache(folder, tmp_path / "cache", tiny_teacher_dir, preset=TINY_PRESET, progress=False)


def _numeric_fields(config_cls) -> list[tuple[str, str, object, dict]]:
    """(section, field, type, range metadata) of every numeric setting of a config class."""
    fields = []
    for section, section_cls in config_cls().section_types().items():
        hints = typing.get_type_hints(section_cls)
        for f in dataclasses.fields(section_cls):
            hint = hints[f.name]
            item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else hint
            if item in (int, float):
                fields.append((section, f.name, hint, dict(f.metadata)))
    return fields


def _bad_values(hint, meta: dict) -> list:
    """Values outside the field's declared range (and NaN for floats)."""
    item = typing.get_args(hint)[0] if typing.get_origin(hint) is list else hint
    bad = [math.nan, math.inf] if item is float else []
    low, high = meta.get("low"), meta.get("high")
    if low is not None:
        below = low if meta.get("low_open") else (low - 1 if item is int else low - 0.5)
        if below not in meta.get("allowed", ()):
            bad.append(below)
    if high is not None:
        bad.append(high if meta.get("high_open") else high + 1)
    return [[v, v] if typing.get_origin(hint) is list else v for v in bad]


def _with(base: list[str], section: str, name: str, value) -> dict:
    overrides = parse_overrides(base)
    overrides.setdefault(section, {})[name] = value
    return overrides


@pytest.mark.parametrize("config_cls, build, base", [
    (Config, build_config, ["data.resolution=[32,32]", "diffusion.block_out_channels=[32,32,32]",
                            "diffusion.attention_levels=[2]"]),
    (FinetuneConfig, build_finetune_config, ["data.num_classes=3"]),
    (InterpreterConfig, build_interpreter_config, ["data.num_classes=3"]),
])
def test_every_numeric_setting_is_range_checked(config_cls, build, base):
    fields = _numeric_fields(config_cls)
    assert len(fields) > 10
    build(None, base)  # the base itself is valid
    unchecked = [f"{s}.{n}" for s, n, _, meta in fields if "low" not in meta]
    assert not unchecked, f"numeric settings without a declared range: {unchecked}"
    tried = 0
    for section, name, hint, meta in fields:
        for value in _bad_values(hint, meta):
            with pytest.raises(UserError, match=f"setting '{section}.{name}' must be"):
                build(None, _with(base, section, name, value))
            tried += 1
    assert tried >= len(fields)


def test_the_cases_that_used_to_pass_validation_are_refused():
    for override, message in [("optim.base_lr=-1", "optim.base_lr' must be > 0"),
                              ("optim.base_lr=0", "optim.base_lr' must be > 0"),
                              ("optim.epochs=-3", "optim.epochs' must be >= 1"),
                              ("loss.mse_weight=.nan", "loss.mse_weight' must be >= 0"),
                              ("optim.warmup_epochs=-1", "optim.warmup_epochs' must be >= 0"),
                              ("trainer.checkpoint_every_n_steps=0", "checkpoint_every_n_steps' must be >= 1"),
                              ("optim.max_steps=0", "optim.max_steps' must be >= 1 \\(or -1\\)")]:
        with pytest.raises(UserError, match=message):
            build_config("cpu-small", [override])
    assert {"data", "optim", "trainer", "loss", "encode", "denoise", "contrast", "gan"} <= set(SECTIONS)


def test_corrupt_teacher_and_weight_files_are_one_line(tmp_path, tiny_teacher_dir, capsys):
    images = write_images(tmp_path / "images")
    cut = tmp_path / "cut"
    shutil.copytree(tiny_teacher_dir, cut)
    weights = next((cut / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    garbage = tmp_path / "garbage"
    shutil.copytree(tiny_teacher_dir, garbage)
    (garbage / "unet" / "config.json").write_text("{not json")
    adm = tmp_path / "adm.pt"
    adm.write_bytes(b"\x80\x02 not a torch file")
    moco = tmp_path / "moco.pth"
    moco.write_bytes(b"PK\x03\x04 truncated")
    cases = [(["pretrain", "--teacher", str(cut)], "cut.*cannot load its U-Net"),
             (["pretrain", "--teacher", str(garbage)], "config.json: not a readable JSON file"),
             (["pretrain", "--teacher", str(adm)], "adm.pt: cannot read as a PyTorch state dict"),
             (["pretrain", "--method", "pcd", "--teacher", str(moco)], "unreadable MoCo v3 checkpoint .*moco.pth")]
    for args, message in cases:
        code = main([*args, "--data", str(images), "--out", str(tmp_path / "out"), "--preset", str(TINY_PRESET)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        import re

        assert re.search(message, err[0]), err[0]
    export = tmp_path / "half.safetensors"
    export.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    code = main(["finetune", "--backbone", str(export), "--images", str(images), "--masks", str(images),
                 "--out", str(tmp_path / "seg"), "--num-classes", "3"])
    assert code == 2 and "half.safetensors: not a safetensors backbone export" in capsys.readouterr().err


KILLER = """
import os, signal, sys, torch
import dreamteacher.engine.trainer as trainer

real_save, calls = torch.save, []

def dying_save(obj, path, *args, **kwargs):  # the second checkpoint dies halfway through its write
    calls.append(path)
    if len(calls) == 2:
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, path, *args, **kwargs)

trainer.torch.save = dying_save
from dreamteacher.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_during_a_checkpoint_write_leaves_no_stray_file_and_resumes(tmp_path, tiny_teacher_dir):
    images = write_images(tmp_path / "images")
    out = tmp_path / "run"
    args = ["pretrain", "--teacher", str(tiny_teacher_dir), "--data", str(images), "--out", str(out), "--no-progress",
            "--preset", str(TINY_PRESET), "--set", "optim.epochs=3"]
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    killed = subprocess.run([sys.executable, "-c", KILLER, *args], cwd=REPO / "tests", env=env,
                            capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    orphans = list(out.rglob(".partial-*"))
    assert orphans and not list((tmp_path / "tmp").iterdir())  # the write went to the run folder, not $TMPDIR
    step = torch.load(RunFolder(out).checkpoint, map_location="cpu", weights_only=True)["global_step"]
    assert step == 1  # the first checkpoint, whole; the second never replaced it
    assert main([*args, "--resume"]) == 0
    assert not list(out.rglob(".partial-*"))
    assert json.loads((out / "run.json").read_text())["steps"] == 6


def test_resuming_a_finished_run_keeps_its_record(tmp_path, tiny_teacher_dir, capsys):
    images = write_images(tmp_path / "images")
    run = api.pretrain(images, tmp_path / "done", tiny_teacher_dir, preset=TINY_PRESET, progress=False)
    before = json.loads((run.run_dir / "run.json").read_text())
    assert before["final_loss"] is not None
    again = api.pretrain(images, tmp_path / "done", resume=True, progress=False)
    after = json.loads((run.run_dir / "run.json").read_text())
    assert again.steps == before["steps"] and after["final_loss"] == before["final_loss"]
    assert "Previous log files" not in capsys.readouterr().err


def test_info_never_runs_code_from_a_pickle(tmp_path):
    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    crafted = tmp_path / "model.pkl"
    crafted.write_bytes(pickle.dumps({"model": {"stem.conv1.weight": Payload()}, "meta": {"format": "detectron2"}}))
    with pytest.raises(UserError, match="not a weights pickle .*posix.system is not allowed|system is not allowed"):
        api.info(crafted)
    assert not (tmp_path / "pwned").exists()
    honest = tmp_path / "honest.pkl"
    honest.write_bytes(pickle.dumps({"model": {"stem.conv1.weight": np.zeros((2, 3), np.float32)},
                                     "meta": {"format": "detectron2"}}))
    assert api.info(honest)["tensors"] == 1


def test_images_smaller_than_the_training_resolution_are_warned_about_once(tmp_path):
    from dreamteacher.data.images import ImageFolder

    write_images(tmp_path / "images", count=3, size=(48, 64))
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tmp_path / "images" / "tiny.png")
    Image.fromarray(np.zeros((30, 70, 3), np.uint8)).save(tmp_path / "images" / "short.png")
    with pytest.warns(UserWarning, match=r"2 of 5 images in .* smaller than the training resolution 64x48 "
                                         r"\(the smallest: tiny.png, 1x1\)") as caught:
        ImageFolder(tmp_path / "images", [48, 64])
    assert len([w for w in caught if "smaller than the training resolution" in str(w.message)]) == 1


def test_atomic_writes_leave_files_readable_as_the_umask_allows(tmp_path):
    from dreamteacher.core.runs import write_text_atomic

    mask = os.umask(0o022)
    os.umask(mask)
    path = write_text_atomic(tmp_path / "results.json", "{}")
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
