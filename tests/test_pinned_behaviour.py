"""Refactoring must not change what training computes: a short dt-feat pretraining on the demo preset
(fixed seed, the demo's teacher at its random initialization, the embedded CamVid frames) gives the
loss values and exported weights recorded before the package was restructured (2026-11-30).

The tolerances (1e-5 on losses, 1e-6 on weight sums) hold on the CPU kinds and torch build these
figures were recorded with (x86-64 with AVX-512, torch 2.14.1, the demo's fp32 student): another CPU
kind or torch build computes other roundings and may need them loosened. That is by design: the test
exists to catch a change of computation in this code, and its figures are re-recorded only when a
change of computation is intended."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from safetensors.torch import load_file

import dreamteacher as dt
from conftest import REPO

LOSSES = [6.94144868850708, 6.127512454986572, 5.716897964477539, 5.3037590980529785]
WEIGHTS = {"tensors": 120, "sum": 6724.191563571366, "sum_of_squares": 13929.900930105223,
           "conv1": -1.932845181418088, "layer4.1.bn2.running_var": 412.5845398902893}


def test_a_demo_dt_feat_pretraining_gives_the_recorded_losses_and_weights(tmp_path: Path):
    teacher = dt.api.untrained_teacher(tmp_path / "teacher", "demo", seed=0)
    dt.pretrain(REPO / "examples" / "camvid48", tmp_path / "student", teacher=teacher, preset="demo",
                progress=False, overrides=["optim.max_steps=4", "trainer.log_every_n_steps=1"])
    with open(tmp_path / "student" / "logs" / "metrics.csv") as f:
        losses = [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert losses == pytest.approx(LOSSES, rel=1e-5)
    weights = load_file(str(tmp_path / "student" / "backbone.safetensors"))
    assert len(weights) == WEIGHTS["tensors"]
    assert float(sum(v.double().sum() for v in weights.values())) == pytest.approx(WEIGHTS["sum"], rel=1e-6)
    assert float(sum(v.double().pow(2).sum() for v in weights.values() if v.is_floating_point())) == \
        pytest.approx(WEIGHTS["sum_of_squares"], rel=1e-6)
    assert float(weights["conv1.weight"].double().sum()) == pytest.approx(WEIGHTS["conv1"], rel=1e-5)
    assert float(weights["layer4.1.bn2.running_var"].double().sum()) == \
        pytest.approx(WEIGHTS["layer4.1.bn2.running_var"], rel=1e-6)
