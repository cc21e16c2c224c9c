"""What the experiments share: fine-tune a backbone at 1/30 of CamVid's labels with the camvid-cpu
recipe's cell settings (300 iterations, seeds 0-2) and score it on val/ and on held-out train/
images. Resumable per cell. `device` is the bench's (`DEVICE_SETTINGS`), `root` the dataset root
(default: the recipe's)."""

import json
from pathlib import Path

import dreamteacher as dt
from dreamteacher.bench.recipes import DEVICE_SETTINGS, Bench, eval_sets, load_recipe
from dreamteacher.core.config import deep_merge

recipe = load_recipe("camvid-cpu")
root = Path(recipe["data"]["root"])


def recipe_bench(spec: dict, out: Path, data: Path) -> Bench:
    """A `Bench` of `spec` (the recipe or a variant of it) working in `out`, evaluating on its sets."""
    return Bench(spec, out, data, eval_sets(spec, data), progress=False)


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
                        overrides=deep_merge(cell_settings, overrides or {}, DEVICE_SETTINGS[device]),
                        resume=interrupted(cell), progress=False, decoder=decoder)
        scores.append(dt.evaluate(cell, data / "val", data / "valannot").miou)
    return scores


def heldout_split(folder: Path, data_root: Path | None = None) -> Path:
    """`folder`/train_heldout.txt: the labeled train/ images outside the 1/4 split (275 for CamVid),
    never used by a 1/30 or 1/8 cell: where a user with more labels than the 12 chooses settings,
    so that val/ stays the benchmark's split and is only reported."""
    data = Path(data_root) if data_root else root
    split = {name: (data / recipe["data"]["splits"][name]).read_text().split() for name in ("1-4", "full")}
    in_quarter = set(split["1-4"])
    folder.mkdir(parents=True, exist_ok=True)
    heldout = folder / "train_heldout.txt"
    heldout.write_text("\n".join(name for name in split["full"] if name not in in_quarter) + "\n")
    return heldout


def heldout_miou_at_1_30(out: Path, seeds=(0, 1, 2), data_root: Path | None = None) -> list[float]:
    """The finished 1/30 cells of `miou_at_1_30(..., out, seeds)` scored on `heldout_split`."""
    data = Path(data_root) if data_root else root
    split = heldout_split(out, data)
    return [dt.evaluate(out / f"1-30-seed{seed}", data / "train", data / "trainannot", split=split).miou
            for seed in seeds]


def score_into(result: dict, out: Path, name: str, backbone: str | Path | None, overrides: dict,
               data_root: Path | None = None) -> float:
    """Fine-tunes `name` at 1/30 into `out`/`name`, adds its val/ and held-out scores and every run's
    means to `result`, rewrites `out`/result.json (partial results survive a stop) and returns the
    held-out mean."""
    result.setdefault("val", {})[name] = miou_at_1_30(backbone, out / name, data_root=data_root, overrides=overrides)
    result.setdefault("heldout", {})[name] = heldout_miou_at_1_30(out / name, data_root=data_root)
    result["means"] = {split: {n: round(sum(v) / len(v), 2) for n, v in result[split].items()}
                       for split in ("val", "heldout")}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(name, json.dumps({split: result["means"][split][name] for split in ("val", "heldout")}), flush=True)
    return result["means"]["heldout"][name]
