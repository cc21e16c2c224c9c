"""Benchmark recipes (`bench/recipes/*.yaml`): the data, evaluation sets, settings, stages and rows of
a bench, and the `Bench` that carries one recipe through a run.

A row names a segmenter to fine-tune and score: `{method: NAME, head: HEAD}`, where NAME is a stage of
the recipe's `stages` (how its backbone is made) or, where the recipe has no stage of that name, a
registered method trained on the images alone. A stage is one of

    {train_teacher: KIND}            train-teacher --kind KIND on the unlabeled images
    {train_teacher: KIND, untrained: true}
                                     the same teacher at its random initialization (a control)
    {method: NAME, INPUT: STAGE...}  pretrain --method NAME; INPUT (teacher, encoder) from another stage
    {method: NAME, interpreter: labels, teacher: STAGE}
                                     ... with an interpreter trained on each row fraction's labels
    {interpreter: STAGE}             the teacher of STAGE with a feature interpreter as the segmenter

and takes its settings from the pretraining preset with `method_overrides[overrides]` on top
(`overrides` defaults to the stage's name).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from dreamteacher.core.config import available_presets, build_config, deep_merge, load_preset, register_preset_kind
from dreamteacher.core.errors import UserError
from dreamteacher.core.hashing import folder_fingerprint
from dreamteacher.data.images import list_images
from dreamteacher.data.labeled import find_mask, load_mask, read_split
from dreamteacher.methods.base import METHODS

RECIPE_DIR = Path(__file__).parent / "recipes"
FRACTIONS = ("1-30", "1-8", "1-4", "full")

# Where every stage of a bench runs (`bench --device`): cpu keeps the recipe's own settings (its
# presets are sized for CPU); gpu moves every stage to one GPU with loader workers. Both are part of
# the stage keys, so the two never mix cells.
DEVICE_SETTINGS = {"cpu": {}, "gpu": {"trainer": {"accelerator": "gpu", "devices": 1}, "data": {"num_workers": 4}}}


register_preset_kind("recipe", RECIPE_DIR)


def load_recipe(recipe: str | Path) -> dict:
    """A recipe's settings (a name of `bench/recipes/` or a .yaml path), on top of those of the recipe it
    names as `base:` (a name, or a path relative to it): merged section by section, lists (rows,
    fractions) replaced whole, and a key set to null removed (core.config.load_preset)."""
    spec = load_preset("recipe", recipe)
    for key in ("name", "data", "rows", "iterations", "seeds"):
        if key not in spec:
            raise UserError(f"recipe {recipe}: missing '{key}'")
    return spec


def available_recipes() -> list[str]:
    return available_presets("recipe")


def eval_sets(spec: dict, root: Path, extra_images: str | Path | None = None,
              extra_masks: str | Path | None = None) -> dict[str, tuple[Path, Path]]:
    """The recipe's evaluation sets, name -> (images, masks), in its order (the first is the primary
    one): `data.eval_sets` ({name: {images, masks}}), or the single pair `data.eval_images` /
    `data.eval_masks` named after its folder; plus `extra_images` / `extra_masks` (`--eval-images`),
    named after its folder too (with `-extra` where that name is taken)."""
    data = spec["data"]
    listed = data.get("eval_sets") or {Path(data["eval_images"]).name: {"images": data["eval_images"],
                                                                       "masks": data["eval_masks"]}}
    sets = {name: (root / paths["images"], root / paths["masks"]) for name, paths in listed.items()}
    if extra_images is not None:
        name = Path(extra_images).name
        sets[name if name not in sets else f"{name}-extra"] = (Path(extra_images), Path(extra_masks))
    for images, masks in sets.values():
        for folder in (images, masks):
            if not folder.is_dir():
                raise UserError(f"evaluation folder not found: {folder}")
    return sets


def row_key(row: dict) -> tuple[str, str]:
    """(method, head) of a recipe row or of a result cell."""
    return row["method"], row.get("head", "upernet")


def cell_key(cell: dict) -> tuple:
    return (*row_key(cell), cell["fraction"], cell["seed"])


def select(values: list[str], chosen: list[str] | None, what: str) -> list[str]:
    if not chosen:
        return values
    unknown = [c for c in chosen if c not in values]
    if unknown:
        raise UserError(f"--{what}: {', '.join(unknown)} not in the recipe (it has {', '.join(values)})")
    return [v for v in values if v in chosen]


@dataclass
class Bench:
    """One recipe being run into `out`: where its data is, how its stages are configured, and the
    stages computed so far (each stage once per invocation)."""

    spec: dict
    out: Path
    data_root: Path
    eval_sets: dict[str, tuple[Path, Path]]  # name -> (images, masks); the first is the primary one
    progress: bool = True
    device: str = "cpu"
    log: Callable[[str], None] = print
    computed: dict[str, dict] = field(default_factory=dict)

    @property
    def runs(self) -> Path:
        """The work folders (absolute: their paths are stored in stage summaries and read from anywhere)."""
        return self.out.resolve() / "runs"

    def path(self, key: str) -> Path:
        path = self.data_root / self.spec["data"][key]
        if not path.exists():
            raise UserError(f"recipe data '{key}' not found: {path} (set --data-root)")
        return path

    def unlabeled(self) -> Path | list[Path]:
        """The pretraining images: `data.unlabeled`, one folder or a list of folders used together
        (relative to the data root)."""
        listed = self.spec["data"]["unlabeled"]
        folders = [self.data_root / f for f in (listed if isinstance(listed, list) else [listed])]
        for folder in folders:
            if not folder.is_dir():
                raise UserError(f"recipe data 'unlabeled' not found: {folder} (set --data-root)")
        return folders if isinstance(listed, list) else folders[0]

    def unlabeled_fingerprint(self) -> list:
        """What the pretraining images are, for stage keys: names and contents of every file."""
        unlabeled = self.unlabeled()
        if isinstance(unlabeled, list):
            return [folder_fingerprint(folder) for folder in unlabeled]
        return folder_fingerprint(unlabeled)

    def overrides(self, *layers: dict | None) -> dict:
        """The recipe's override layers for a stage, with the bench's device settings on top."""
        return deep_merge(*(layer or {} for layer in layers), DEVICE_SETTINGS[self.device])

    def pretrain_config(self, overrides_name: str | None = None) -> tuple[str | None, dict]:
        """The pretraining preset and overrides, `method_overrides[overrides_name]` on top when given,
        and the recipe's live probe (its folders relative to the data root; it changes no result)."""
        layer = (self.spec.get("method_overrides") or {}).get(overrides_name) if overrides_name else None
        preset = self.spec.get("pretrain_preset")
        overrides = self.overrides(self.spec.get("pretrain_overrides"), layer, self.probe_settings())
        steps_images = self.spec.get("pretrain_steps_for_images")
        if steps_images:  # the optimizer steps of `epochs` over that many images, whatever this dataset's size
            optim = build_config(preset, overrides).optim
            steps = optim.epochs * max(1, int(steps_images) // optim.batch_size)
            overrides = deep_merge(overrides, {"optim": {"max_steps": steps}})
        return preset, overrides

    def probe_settings(self) -> dict:
        probe = dict(self.spec.get("probe") or {})
        for key in ("images", "masks", "split", "eval_images", "eval_masks"):
            if probe.get(key):
                probe[key] = str(self.data_root / probe[key])
        return {"probe": probe} if probe else {}

    def stage_spec(self, name: str) -> dict:
        """How stage `name` is made: the recipe's `stages[name]`, or a registered method of that name
        trained on the images alone."""
        stages = self.spec.get("stages") or {}
        if name in stages:
            return stages[name]
        if name in METHODS:
            return {"method": name}
        known = ", ".join([*stages, *(m for m in METHODS if m not in stages)])
        raise UserError(f"recipe row or stage '{name}' is neither a stage of the recipe nor a method; known: {known}")


def check_labels(bench: Bench, num_classes: int, ignore_index: int) -> None:
    """Before any stage runs: every split file exists and names images that have label maps, every
    image of every evaluation set has its label map, and the label values found fit the recipe's
    class count (ids 0..num_classes-1, or the ignore id; and every class id up to the last one
    present somewhere). One line naming the file and the mismatch otherwise."""
    images, masks = bench.path("images"), bench.path("masks")
    labeled: dict[str, Path] = {}
    for fraction, relative in bench.spec["data"]["splits"].items():
        split = bench.data_root / relative
        if not split.is_file():
            raise UserError(f"recipe split {fraction}: file not found: {split}")
        for name in read_split(split):
            if not (images / name).is_file():
                raise UserError(f"split file {split} names {name}, which is not in {images}")
            labeled[name] = find_mask(masks, name)
    to_check = [(path, f"split images of {images}") for path in labeled.values()]
    for set_name, (set_images, set_masks) in bench.eval_sets.items():
        for path in list_images(set_images):
            try:
                to_check.append((find_mask(set_masks, str(path.relative_to(set_images))), f"evaluation set {set_name}"))
            except UserError:
                raise UserError(f"evaluation set {set_name}: image {path} has no label map in {set_masks}") from None
    class_names = bench.spec["data"].get("class_names")
    if class_names and len(class_names) != num_classes:
        raise UserError(f"recipe data.class_names names {len(class_names)} classes but num_classes is {num_classes}")
    highest = -1
    for path, where in to_check:
        values = np.unique(load_mask(path))
        bad = values[((values < 0) | (values >= num_classes)) & (values != ignore_index)]
        if bad.size:
            raise UserError(f"label map {path} ({where}) holds class ids {bad[:5].tolist()} outside 0..{num_classes - 1} "
                            f"(ignore id {ignore_index}): the recipe's num_classes / ignore_index do not match the labels")
        kept = values[values != ignore_index]
        highest = max(highest, int(kept.max()) if kept.size else -1)
    if highest < num_classes - 1:
        raise UserError(f"the label maps in {masks} and the evaluation sets hold class ids up to {highest} only, but the "
                        f"recipe's num_classes is {num_classes} (ignore id {ignore_index}): the class count does not "
                        "match the labels")
