"""Precision by hardware: `auto` is bf16 where the hardware runs it natively and fp32 elsewhere, said
in one line; tables name the CPU."""

from __future__ import annotations

import pytest
import torch

from dreamteacher.core import hardware
from dreamteacher.core.hardware import machine_summary, resolve_precision


@pytest.fixture
def cpu(monkeypatch):
    def set_flags(*flags: str) -> None:
        monkeypatch.setattr(hardware, "cpu_info", lambda: {"model": "Test CPU", "flags": ["avx2", *flags]})
    return set_flags


@pytest.mark.parametrize("flags,expected", [((), "32-true"), (("avx512_bf16",), "bf16-mixed"),
                                            (("amx_bf16", "amx_tile"), "bf16-mixed")])
def test_auto_precision_on_a_cpu_follows_its_bf16_flags(cpu, flags, expected):
    cpu(*flags)
    precision, why = resolve_precision("auto", "cpu")
    assert precision == expected and "Test CPU" in why
    assert resolve_precision("bf16-mixed", "cpu") == ("bf16-mixed", "as set")  # an explicit choice stands


@pytest.mark.parametrize("capability,expected", [((7, 0), "32-true"), ((8, 0), "bf16-mixed"), ((9, 0), "bf16-mixed")])
def test_auto_precision_on_a_gpu_follows_its_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    assert resolve_precision("auto", "auto")[0] == expected
    assert resolve_precision("auto", "gpu")[0] == expected


def test_the_chosen_precision_is_said_in_one_line_and_recorded(tmp_path, cpu, capsys):
    import json

    from conftest import TINY_PRESET, write_images
    from dreamteacher.cli import main

    cpu()  # a CPU without native bf16: auto trains in fp32
    images = write_images(tmp_path / "images", count=8)
    args = ["train-teacher", "--data", str(images), "--out", str(tmp_path / "teacher"), "--no-progress",
            "--preset", str(TINY_PRESET), "--set", "trainer.precision=auto"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "precision: auto -> 32-true (CPU Test CPU has no avx512_bf16 or AMX" in err
    assert json.loads((tmp_path / "teacher" / "run.json").read_text())["precision"] == "32-true"


def test_machine_summary_names_the_cpu_and_its_bf16():
    summary = machine_summary()
    assert summary["cpu"] and summary["cpu_bf16"] in ("avx512_bf16", "amx_bf16", "emulated")
