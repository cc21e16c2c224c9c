"""The pretraining stages of a bench: teachers, feature caches, interpreters and pretrained backbones,
each a cached `Stage` built from the recipe's `stages` (bench/recipes.py) and the method registry.
Nothing here knows a method by name: a stage's inputs, its key and whether it reads the feature
cache come from what its method declares."""

from __future__ import annotations

import time
from pathlib import Path

from dreamteacher.bench.recipes import Bench
from dreamteacher.bench.stages import Stage, digest, folder_fingerprint, key_settings
from dreamteacher.core.config import build_config, only_sections
from dreamteacher.core.errors import UserError
from dreamteacher.core.runs import SEGMENTER_INFO, read_json
from dreamteacher.data.features import FORMAT_VERSION
from dreamteacher.methods.base import METHODS, TEACHER_TRAINERS
from dreamteacher.workflows.interpreter import build_interpreter_config, train_interpreter
from dreamteacher.workflows.pretrain import CACHE_SECTIONS, build_feature_cache, pretrain, read_summary
from dreamteacher.workflows.teacher import train_teacher, untrained_teacher

# teachers trained with keyed samples (data order, flips, crops, noise and t from seed, epoch and
# image), which resume exactly; the teachers before it were trained from the global generator
TEACHER_DATA = "keyed-samples"

# the inputs a pretraining stage takes from another stage, and what of that stage it passes
STAGE_INPUTS = {"teacher": "teacher", "encoder": "backbone"}


def per_fraction(bench: Bench, name: str) -> bool:
    """A stage made again for each label fraction (its interpreter learns that fraction's labels)."""
    spec = bench.stage_spec(name)
    return spec.get("interpreter") == "labels" or any(per_fraction(bench, spec[i]) for i in STAGE_INPUTS if i in spec)


def stage(bench: Bench, name: str, fraction: str | None = None, allow_run: bool = True) -> dict | None:
    """The backbone (or teacher) stage `name`: {key, seconds, stages, pretrain_seconds, ...}; None when
    not computed and `allow_run` is off."""
    label = f"{name}@{fraction}" if per_fraction(bench, name) else name
    if label in bench.computed:
        return bench.computed[label]
    spec = bench.stage_spec(name)
    if "method" in spec:
        result = pretrain_stage(bench, name, spec, fraction, allow_run)
    elif "train_teacher" in spec:
        result = teacher_stage(bench, name, spec, allow_run)
    else:
        raise UserError(f"recipe stage '{name}' makes no backbone or teacher ({spec}); a stage has `method` or "
                        "`train_teacher`")
    if result is not None:
        bench.computed[label] = result
    return result


def teacher_stage(bench: Bench, name: str, spec: dict, allow_run: bool) -> dict | None:
    """A teacher trained on the unlabeled images (`train-teacher --kind`), or left untrained."""
    trainer_cls = TEACHER_TRAINERS.get(spec["train_teacher"])
    preset, overrides = bench.pretrain_config(spec.get("overrides", name))
    overrides = only_sections(overrides, trainer_cls.config_sections())  # the recipe's layers serve every stage
    config = build_config(preset, overrides, sections=trainer_cls.config_sections(), owner=trainer_cls.owner())
    unlabeled = bench.unlabeled()
    architecture = {section: None for section in trainer_cls.architecture}
    if spec.get("untrained"):
        key = digest(name, key_settings(config, {"data": ("resolution",), **architecture, "trainer": ("seed",)}))

        def run(folder: Path, resume: bool) -> dict:
            start = time.perf_counter()
            path = untrained_teacher(folder, preset, overrides, seed=config.trainer.seed, kind=trainer_cls.kind)
            return {"teacher": str(path), "seconds": time.perf_counter() - start, "steps": 0, "epochs": 0}
    else:
        # every section the teacher's training reads (its config holds those alone); TEACHER_DATA: its
        # samples are keyed (exact resumes)
        key = digest(name, TEACHER_DATA, key_settings(config), bench.unlabeled_fingerprint())

        def run(folder: Path, resume: bool) -> dict:
            bench.log(f"[bench] training the {trainer_cls.kind} teacher in {folder}")
            result = train_teacher(unlabeled, folder, preset, overrides, resume=resume, progress=bench.progress,
                                   kind=trainer_cls.kind)
            summary = read_summary(folder) or {}
            return {"teacher": str(result.files["teacher"]), "seconds": result.seconds, "steps": result.steps,
                    "epochs": summary.get("epochs"), "resumed_at": result.resumed_at}

    trained = Stage(bench.runs / name, key, run).result(allow_run)
    if trained is None:
        return None
    # a resumed teacher is not bit-identical to an uninterrupted one: its cells say so (results.json)
    timing = {k: trained[k] for k in ("seconds", "steps", "epochs")}
    if trained.get("resumed_at"):
        timing["resumed_at"] = trained["resumed_at"]
    return {**trained, "family": trainer_cls.family, "stages": {name: timing},
            "pretrain_seconds": round(trained["seconds"], 1), "pretrain_epochs": trained["epochs"]}


def cache_stage(bench: Bench, teacher: dict, preset: str | None, overrides: dict, allow_run: bool) -> dict | None:
    """The offline feature cache of `teacher` on the unlabeled images (K encodings per image),
    shared by every stage that distills this teacher with these encoding settings."""
    config = build_config(preset, only_sections(overrides, CACHE_SECTIONS), sections=CACHE_SECTIONS,
                          owner="the feature cache")
    unlabeled = bench.unlabeled()
    key = digest("cache", FORMAT_VERSION, teacher["key"], key_settings(config, {"encode": None, "data": ("resolution",)}),
                 bench.unlabeled_fingerprint())
    name = f"cache-{Path(teacher['teacher']).parent.name}-{key[:8]}"
    if name in bench.computed:
        return bench.computed[name]

    def run(folder: Path, resume: bool) -> dict:
        bench.log(f"[bench] encoding the images into the feature cache {folder / 'features'}")
        seconds = build_feature_cache(unlabeled, folder / "features", teacher["teacher"], preset, overrides,
                                      progress=bench.progress)
        return {"cache": str(folder / "features"), "seconds": seconds}

    result = Stage(bench.runs / name, key, run).result(allow_run)
    if result is not None:
        bench.computed[name] = result
    return result


def interpreter_stage(bench: Bench, teacher_name: str, fraction: str, seed: int, allow_run: bool) -> dict | None:
    """A feature interpreter on the teacher of stage `teacher_name`, with the labels of `fraction` (G.2)."""
    teacher = stage(bench, teacher_name, allow_run=allow_run)
    if teacher is None:
        return None
    preset = bench.spec.get("interpreter_preset")
    overrides = bench.overrides(bench.spec.get("interpreter_overrides"), {"trainer": {"seed": seed}})
    config = build_interpreter_config(preset, overrides)
    split = bench.data_root / bench.spec["data"]["splits"][fraction]
    images, masks = bench.path("images"), bench.path("masks")
    key = digest("interpreter", teacher["key"], key_settings(config), split.read_text(),
                 folder_fingerprint(images), folder_fingerprint(masks))

    def run(folder: Path, resume: bool) -> dict:
        bench.log(f"[bench] training the feature interpreter on {fraction} of the labels, seed {seed}")
        result = train_interpreter(teacher["teacher"], images, masks, folder, split=split, preset=preset,
                                   overrides=overrides, resume=resume, progress=bench.progress)
        return {"interpreter": str(folder), "seconds": result.seconds, "iterations": result.steps,
                "labeled": read_json(folder / SEGMENTER_INFO)["labeled_images"]}

    trained = Stage(bench.runs / "interpreters" / f"{fraction}-seed{seed}", key, run).result(allow_run)
    if trained is not None:
        trained = {**trained, "teacher_seconds": teacher["pretrain_seconds"], "teacher_stages": teacher["stages"]}
    return trained


def pretrain_stage(bench: Bench, name: str, spec: dict, fraction: str | None, allow_run: bool) -> dict | None:
    """`pretrain --method` with the stage's inputs taken from other stages; its wall-clock counts theirs."""
    method = METHODS.get(spec["method"])
    preset, shared = bench.pretrain_config(spec.get("overrides", name))
    overrides = only_sections(shared, method.config_sections())  # the recipe's layers serve every stage
    config = build_config(preset, overrides, sections=method.config_sections(), owner=method.owner())
    unlabeled = bench.unlabeled()
    upstream: dict[str, dict] = {}
    for input_name in STAGE_INPUTS:
        if input_name in spec:
            made = stage(bench, spec[input_name], fraction, allow_run)
            if made is None:
                return None
            upstream[input_name] = made
    inputs = {input_name: made[STAGE_INPUTS[input_name]] for input_name, made in upstream.items()}
    parts: dict[str, dict] = {}
    if spec.get("interpreter") == "labels":
        interpreter = interpreter_stage(bench, spec["teacher"], fraction, 0, allow_run)
        if interpreter is None:
            return None
        inputs["interpreter"] = interpreter["interpreter"]
        upstream["interpreter"] = interpreter
        parts["interpreter"] = {"seconds": interpreter["seconds"], "steps": interpreter["iterations"]}
    teacher = upstream.get("teacher")
    if method.reads_cache and bench.spec.get("feature_cache") and teacher and teacher.get("family") == "diffusion":
        cache = cache_stage(bench, teacher, preset, shared, allow_run)
        if cache is None:
            return None
        inputs["cache"] = cache["cache"]
        upstream["cache"] = cache
        parts["cache"] = {"seconds": cache["seconds"]}  # each row that reads it would have had to build it
    # every section the method reads (its config holds those alone, the probe's execution-only)
    key = digest("pretrain", name, method.name, {k: v["key"] for k, v in upstream.items()}, key_settings(config),
                 bench.unlabeled_fingerprint())
    folder = bench.runs / (f"pretrain-{name}" + (f"-{fraction}" if per_fraction(bench, name) else ""))

    def run(folder: Path, resume: bool) -> dict:
        bench.log(f"[bench] pretraining '{name}' ({method.name}) in {folder}")
        result = pretrain(unlabeled, folder, method=method.name, preset=preset, overrides=overrides, resume=resume,
                          progress=bench.progress, **inputs)
        summary = read_summary(folder) or {}
        return {"run": str(folder), **{part: str(path) for part, path in result.files.items()},
                "seconds": result.seconds, "steps": result.steps, "epochs": summary.get("epochs")}

    trained = Stage(folder, key, run).result(allow_run)
    if trained is None:
        return None
    stages = {}
    for made in upstream.values():
        stages.update(made.get("stages", {}))
    stages.update(parts)
    stages[name] = {k: trained[k] for k in ("seconds", "steps", "epochs")}
    return {**trained, "method": method.name, "stages": stages,
            "pretrain_seconds": round(sum(s["seconds"] for s in stages.values()), 1),
            "pretrain_epochs": trained["epochs"]}
