"""What the experiments share: fine-tune a backbone at 1/30 of CamVid's labels with the camvid-cpu
recipe's cell settings (300 iterations, seeds 0-2) and score it on val/. Resumable per cell."""

from pathlib import Path

import dreamteacher as dt
from dreamteacher.bench.runner import load_recipe

recipe = load_recipe("camvid-cpu")
root = Path(recipe["data"]["root"])


def miou_at_1_30(backbone: Path, out: Path, seeds=(0, 1, 2)) -> list[float]:
    scores = []
    for seed in seeds:
        cell = out / f"1-30-seed{seed}"
        if not (cell / "segmenter.json").is_file():
            dt.finetune(backbone, root / "train", root / "trainannot", cell,
                        split=root / recipe["data"]["splits"]["1-30"], preset="camvid-cpu",
                        overrides={"optim": {"iterations": recipe["iterations"]["1-30"]}, "trainer": {"seed": seed}},
                        resume=(cell / "checkpoints" / "last.ckpt").is_file(), progress=False)
        scores.append(dt.evaluate(cell, root / "val", root / "valannot").miou)
    return scores
