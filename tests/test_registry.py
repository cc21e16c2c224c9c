"""Adding a method is one module and one recipe row: a small method defined in this file, with its own
config section, goes through `pretrain` (Python and command line), `export`, `info` and a bench cell
without touching a package file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch import nn

import dreamteacher as dt
from conftest import TINY, TINY_PRESET, write_images, write_scenes
from dreamteacher.cli import main
from dreamteacher.core.config import SECTIONS, Section, bounded, build_config, register_section
from dreamteacher.core.errors import UserError
from dreamteacher.methods.base import METHODS, PretrainMethod, register_method
from dreamteacher.nn.backbone import Backbone
from test_downstream import FINETUNE


@dataclass
class TinyAutoencoderConfig(Section):
    """The test method's own settings."""

    detail_weight: float = bounded(0.5, low=0)


class TinyAutoencoder(PretrainMethod):
    """Reconstructs the image from the backbone's finest level (1x1 conv, upsampled): the smallest
    method that trains a backbone."""

    name = "test-autoencoder"
    summary = "a test-only autoencoder"
    sections = ("data", "student", "test_autoencoder", "optim", "trainer")

    def __init__(self, config):
        super().__init__(config)
        self.backbone = Backbone(config.student.backbone)
        self.decoder = nn.Conv2d(self.backbone.channels[0], 3, 1)

    @classmethod
    def describe_settings(cls, config) -> str:
        return f"reconstruction, detail weight {config.test_autoencoder.detail_weight:g}"

    def compute_losses(self, batch):
        images = batch["images"]
        recon = F.interpolate(self.decoder(self.backbone(images)[0]), size=images.shape[-2:], mode="bilinear")
        detail = (recon.diff(dim=-1) - images.diff(dim=-1)).abs().mean()
        mse = F.mse_loss(recon, images)
        return {"loss": mse + self.config.test_autoencoder.detail_weight * detail, "mse": mse, "detail": detail}


@pytest.fixture
def registered():
    register_section("test_autoencoder", TinyAutoencoderConfig)
    register_method(TinyAutoencoder)
    yield TinyAutoencoder
    METHODS.unregister(TinyAutoencoder.name)
    SECTIONS.unregister("test_autoencoder")


def test_a_method_registered_in_a_test_module_pretrains_exports_and_benches(registered, tmp_path: Path, capsys):
    images = write_images(tmp_path / "images")
    run = dt.pretrain(images, tmp_path / "ae", method="test-autoencoder", preset=TINY_PRESET, progress=False,
                      test_autoencoder={"detail_weight": 0.25})
    assert run.steps == 4 and (run.run_dir / "backbone.safetensors").is_file()
    model = timm.create_model("test_resnet", num_classes=0)
    model.load_state_dict(load_file(str(run.files["backbone"])), strict=True)  # the export: timm keys, strict
    trained = dt.api.read_summary(run.run_dir)
    assert trained["method"] == "test-autoencoder" and trained["status"] == "finished"
    assert build_config(None, TINY + ["test_autoencoder.detail_weight=2"]).test_autoencoder.detail_weight == 2.0
    with pytest.raises(UserError, match="setting 'test_autoencoder.detail_weight' must be >= 0"):
        build_config(None, TINY + ["test_autoencoder.detail_weight=-1"])
    # its inputs are checked like any method's: it takes the images alone
    with pytest.raises(UserError, match="--teacher is not an input of --method test-autoencoder"):
        dt.pretrain(images, tmp_path / "x", teacher=tmp_path, method="test-autoencoder", preset=TINY_PRESET)

    # the command line lists it and runs it; `info` describes what it wrote
    assert main(["pretrain", "--method", "test-autoencoder", "--data", str(images), "--out", str(tmp_path / "cli"),
                 "--no-progress", "--preset", str(TINY_PRESET)]) == 0
    assert main(["info", str(tmp_path / "cli")]) == 0
    assert "a test-only autoencoder" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "cli"), "--format", "smp", "--out", str(tmp_path / "smp.safetensors")]) == 0

    # one recipe row: the bench pretrains it and fine-tunes a cell from it
    scenes, masks = write_scenes(tmp_path / "scenes")
    (scenes.parent / "splits").mkdir()
    (scenes.parent / "splits" / "small.txt").write_text("scene_0.png\nscene_1.png\n")
    pretrain = {}
    for item in TINY:
        key, value = item.split("=", 1)
        section, field = key.split(".")
        pretrain.setdefault(section, {})[field] = yaml.safe_load(value)
    recipe = {"name": "registry", "data": {"root": str(scenes.parent), "unlabeled": "images", "images": "images",
                                           "masks": "masks", "eval_images": "images", "eval_masks": "masks",
                                           "splits": {"1-30": "splits/small.txt"}},
              "pretrain_overrides": pretrain, "finetune_overrides": FINETUNE, "iterations": {"1-30": 2},
              "seeds": {"1-30": [0]}, "rows": [{"method": "test-autoencoder", "head": "upernet"}]}
    (tmp_path / "registry.yaml").write_text(yaml.safe_dump(recipe))
    result = dt.bench(tmp_path / "registry.yaml", tmp_path / "bench", progress=False)
    (cell,) = result.rows
    assert cell["method"] == "test-autoencoder" and cell["initialized"] == "backbone"
    # the stage's own seconds are unrounded; the cell's total is rounded to 0.1 s, which a fast machine
    # can make 0.0 on this 4-step run
    assert set(cell["pretrain_stages"]) == {"test-autoencoder"} and cell["pretrain_stages"]["test-autoencoder"]["seconds"] > 0
    assert cell["pretrain_seconds"] == round(cell["pretrain_stages"]["test-autoencoder"]["seconds"], 1)
    assert "`test-autoencoder`: test-autoencoder on the test_resnet: reconstruction, detail weight 0.5" in \
        (tmp_path / "bench" / "results.md").read_text()
    with torch.no_grad():
        assert 0 <= cell["miou"] <= 100
