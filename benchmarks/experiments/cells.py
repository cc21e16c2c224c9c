"""What the experiments share: fine-tune a backbone at 1/30 of CamVid's labels with the camvid-cpu
recipe's cell settings (300 iterations, seeds 0-2) and score it on val/. Resumable per cell.
`device` is the bench's (`DEVICE_SETTINGS`), `root` the dataset root (default: the recipe's)."""

from pathlib import Path

import dreamteacher as dt
from dreamteacher.bench.runner import DEVICE_SETTINGS, _deep_merge, load_recipe

recipe = load_recipe("camvid-cpu")
root = Path(recipe["data"]["root"])


def finished(run: Path) -> bool:
    """A training run that wrote its summary (skip it)."""
    return (run / "run.json").is_file()


def interrupted(run: Path) -> bool:
    """A training run that left a checkpoint (resume it)."""
    return (run / "checkpoints" / "last.ckpt").is_file()


def miou_at_1_30(backbone: Path | None, out: Path, seeds=(0, 1, 2), device: str = "cpu",
                 data_root: Path | None = None, overrides: dict | None = None,
                 decoder: Path | None = None) -> list[float]:
    """`overrides` on top of the cell settings (e.g. the head or lr); `decoder` a pretrained one."""
    data = Path(data_root) if data_root else root
    scores = []
    for seed in seeds:
        cell = out / f"1-30-seed{seed}"
        if not (cell / "segmenter.json").is_file():
            cell_settings = {"optim": {"iterations": recipe["iterations"]["1-30"]}, "trainer": {"seed": seed}}
            dt.finetune(backbone, data / "train", data / "trainannot", cell,
                        split=data / recipe["data"]["splits"]["1-30"], preset="camvid-cpu",
                        overrides=_deep_merge(cell_settings, overrides or {}, DEVICE_SETTINGS[device]),
                        resume=interrupted(cell), progress=False, decoder=decoder)
        scores.append(dt.evaluate(cell, data / "val", data / "valannot").miou)
    return scores
