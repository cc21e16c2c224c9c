"""`dreamteacher bench RECIPE`: pretrain every row's backbone, fine-tune it at every label fraction and
seed, evaluate, and tabulate.

Work lives under `OUT/runs/`: one folder per pretraining stage and per fine-tuning cell, each with a
`stage.json` that records the hash of its inputs. A stage whose inputs are unchanged is reused; one
whose inputs changed is redone; a half-finished one resumes from its checkpoint. So a killed bench
simply continues, and editing the recipe recomputes exactly what it touches.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from dreamteacher.checkpoints import write_text_atomic
from dreamteacher.config import Sections
from dreamteacher.errors import UserError
from dreamteacher.train.engine import checkpoint_path

RECIPE_DIR = Path(__file__).parent / "recipes"
FRACTIONS = ("1-30", "1-8", "1-4", "full")
STAGE_FILE = "stage.json"


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(recipe: str | Path) -> dict:
    path = Path(recipe)
    if not path.suffix:
        path = RECIPE_DIR / f"{recipe}.yaml"
        if not path.is_file():
            raise UserError(f"unknown recipe '{recipe}'; choose one of {', '.join(available_recipes())} "
                            "or give a recipe .yaml path")
    if not path.is_file():
        raise UserError(f"recipe file not found: {path}")
    spec = yaml.safe_load(path.read_text()) or {}
    for key in ("name", "data", "rows", "iterations", "seeds"):
        if key not in spec:
            raise UserError(f"recipe {path}: missing '{key}'")
    return spec


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# Where every stage of a bench runs (`bench --device`): cpu keeps the recipe's own settings (its
# presets are sized for CPU); gpu moves every stage to one GPU with loader workers. Both are part of
# the stage keys, so the two never mix cells.
DEVICE_SETTINGS = {"cpu": {}, "gpu": {"trainer": {"accelerator": "gpu", "devices": 1}, "data": {"num_workers": 4}}}

# Settings that change how fast a stage runs, not what it computes: left out of stage keys.
EXECUTION_ONLY = {"trainer": ("channels_last", "compile", "sync_batchnorm", "cudnn_benchmark", "reuse_host_memory")}


def key_settings(config: Sections, keep: dict[str, tuple[str, ...] | None] | None = None,
                 drop: dict[str, tuple[str, ...] | None] | None = None) -> dict:
    """What a stage's key covers of `config` (a `Config`, `FinetuneConfig`, ...): the settings that
    differ from its class's defaults, without the execution-only ones and the `drop` ones (section ->
    fields, or None for the whole section); only the `keep` ones when given. A setting added later
    with a default that keeps the old behaviour thus leaves every finished stage valid (a changed
    default is a change of code, which keys do not cover either)."""
    values, defaults = config.to_dict(), type(config)().to_dict()
    kept: dict = {}
    for name, section in values.items():
        fields = (keep or {}).get(name, ()) if keep is not None else None
        if keep is not None and name not in keep:
            continue
        for field_name, value in section.items():
            if fields is not None and field_name not in fields:
                continue
            if value != defaults[name][field_name]:
                kept.setdefault(name, {})[field_name] = value
    for name, fields in {**EXECUTION_ONLY, **(drop or {})}.items():
        if fields is None:
            kept.pop(name, None)
        else:
            for field_name in fields:
                kept.get(name, {}).pop(field_name, None)
    return {name: section for name, section in kept.items() if section}


@functools.cache
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def folder_fingerprint(folder: Path) -> list:
    """Names and content hashes of a folder's files: changes when a file is added, removed or replaced,
    even by one of the same name and size. Hashed once per process and file version (CamVid's 367
    frames: about 0.3 s)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return [(str(p.relative_to(folder)), _file_digest(str(p), (st := p.stat()).st_size, st.st_mtime_ns))
            for p in files]


@dataclass
class Stage:
    """A unit of cached work: `run(folder, resume)` -> summary dict (must hold `seconds`)."""
    folder: Path
    key: str
    run: Callable[[Path, bool], dict]

    def result(self, allow_run: bool = True) -> dict | None:
        """The cached summary when the inputs are unchanged; else (re)computes it, or None when
        `allow_run` is off."""
        marker = self.folder / STAGE_FILE
        if marker.is_file():
            saved = json.loads(marker.read_text())
            if saved.get("key") == self.key and saved.get("done"):
                return saved
        if not allow_run:
            return None
        started = self.folder / "stage-inputs.json"
        resume = (started.is_file() and json.loads(started.read_text()).get("key") == self.key
                  and checkpoint_path(self.folder).is_file())  # else nothing worth keeping was written
        if self.folder.exists() and not resume:
            shutil.rmtree(self.folder)  # inputs changed: its work is stale
        self.folder.mkdir(parents=True, exist_ok=True)
        started.write_text(json.dumps({"key": self.key}))
        summary = {**self.run(self.folder, resume), "key": self.key, "done": True}
        write_text_atomic(marker, json.dumps(summary, indent=2))
        return summary


@dataclass
class Bench:
    spec: dict
    out: Path
    data_root: Path
    eval_sets: dict[str, tuple[Path, Path]]  # name -> (images, masks); the first is the primary one
    progress: bool = True
    device: str = "cpu"
    log: Callable[[str], None] = print
    _stages: dict[str, dict] = field(default_factory=dict)

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    def path(self, key: str) -> Path:
        path = self.data_root / self.spec["data"][key]
        if not path.exists():
            raise UserError(f"recipe data '{key}' not found: {path} (set --data-root)")
        return path

    # ---------------------------------------------------------------- pretraining stages
    def overrides(self, *layers: dict | None) -> dict:
        """The recipe's override layers for a stage, with the bench's device settings on top."""
        return _deep_merge(*(layer or {} for layer in layers), DEVICE_SETTINGS[self.device])

    def pretrain_config(self, method: str | None = None) -> tuple[str | None, dict]:
        """The pretraining preset and overrides, with `method_overrides[method]` on top when given."""
        method_layer = (self.spec.get("method_overrides") or {}).get(method) if method else None
        return self.spec.get("pretrain_preset"), self.overrides(self.spec.get("pretrain_overrides"), method_layer)

    def teacher_stage(self, trained: bool, allow_run: bool) -> dict | None:
        from dreamteacher import api
        from dreamteacher.config import build_config

        name = "teacher" if trained else "teacher-untrained"
        if name in self._stages:
            return self._stages[name]
        preset, overrides = self.pretrain_config()
        config = build_config(preset, overrides)
        unlabeled = self.path("unlabeled")
        if trained:
            key = digest(name, key_settings(config, {"data": None, "diffusion": None, "teacher_train": None,
                                                     "trainer": ("seed",)}), folder_fingerprint(unlabeled))

            def run(folder: Path, resume: bool) -> dict:
                self.log(f"[bench] training the teacher in {folder}")
                result = api.train_teacher(unlabeled, folder, preset, overrides, resume=resume, progress=self.progress)
                summary = api.read_summary(folder) or {}
                return {"teacher": str(folder / "teacher"), "seconds": result.seconds, "steps": result.steps,
                        "epochs": summary.get("epochs")}
        else:
            key = digest(name, key_settings(config, {"data": ("resolution",), "diffusion": None, "trainer": ("seed",)}))

            def run(folder: Path, resume: bool) -> dict:
                start = time.perf_counter()
                path = api.untrained_teacher(folder, preset, overrides, seed=config.trainer.seed)
                return {"teacher": str(path), "seconds": time.perf_counter() - start, "steps": 0, "epochs": 0}
        result = Stage(self.runs / name, key, run).result(allow_run)
        if result is not None:
            self._stages[name] = result
        return result

    def gan_teacher_stage(self, allow_run: bool) -> dict | None:
        """A StyleGAN2 trained on the unlabeled images (`method_overrides.gan-teacher` on the preset)."""
        from dreamteacher import api
        from dreamteacher.config import build_config

        if "teacher-stylegan2" in self._stages:
            return self._stages["teacher-stylegan2"]
        preset, overrides = self.pretrain_config("gan-teacher")
        config = build_config(preset, overrides)
        unlabeled = self.path("unlabeled")
        key = digest("teacher-stylegan2", key_settings(config, {"data": None, "gan": None, "teacher_train": None,
                                                                "trainer": ("seed",)}), folder_fingerprint(unlabeled))

        def run(folder: Path, resume: bool) -> dict:
            self.log(f"[bench] training the StyleGAN2 teacher in {folder}")
            result = api.train_teacher(unlabeled, folder, preset, overrides, resume=resume, progress=self.progress,
                                       kind="stylegan2")
            summary = api.read_summary(folder) or {}
            return {"teacher": str(folder / "teacher"), "seconds": result.seconds, "steps": result.steps,
                    "epochs": summary.get("epochs")}

        result = Stage(self.runs / "teacher-stylegan2", key, run).result(allow_run)
        if result is not None:
            self._stages["teacher-stylegan2"] = result
        return result

    def backbone_stage(self, method: str, allow_run: bool = True, fraction: str | None = None) -> dict | None:
        """{backbone, key, pretrain_seconds, pretrain_epochs, stages} of a row's method; SCRATCH for
        `scratch`; None when not computed and `allow_run` is off. Label-guided methods (dt-mix) have
        one backbone per label `fraction`, the one their labels come from."""
        if method == "scratch":
            return SCRATCH
        name = f"{method}@{fraction}" if method in LABEL_GUIDED else method
        if name in self._stages:
            return self._stages[name]
        if method in LABEL_GUIDED:
            result = LABEL_GUIDED[method](self, fraction, allow_run)
        elif method in PRETRAINERS:
            result = PRETRAINERS[method](self, allow_run)
        else:
            known = ", ".join(["scratch", *PRETRAINERS, *LABEL_GUIDED])
            raise UserError(f"recipe row method '{method}' is unknown; available: {known}")
        if result is not None:
            self._stages[name] = result
        return result

    def interpreter_stage(self, fraction: str, seed: int, allow_run: bool) -> dict | None:
        """A feature interpreter on the trained teacher, with the labels of `fraction` (G.2)."""
        from dreamteacher.downstream.interpreter import build_interpreter_config, train_interpreter

        teacher = self.teacher_stage(True, allow_run)
        if teacher is None:
            return None
        preset = self.spec.get("interpreter_preset")
        overrides = self.overrides(self.spec.get("interpreter_overrides"), {"trainer": {"seed": seed}})
        config = build_interpreter_config(preset, overrides)
        split = self.data_root / self.spec["data"]["splits"][fraction]
        images, masks = self.path("images"), self.path("masks")
        key = digest("interpreter", teacher["key"], key_settings(config), split.read_text(),
                     folder_fingerprint(images), folder_fingerprint(masks))

        def run(folder: Path, resume: bool) -> dict:
            self.log(f"[bench] training the feature interpreter on {fraction} of the labels, seed {seed}")
            result = train_interpreter(teacher["teacher"], images, masks, folder, split=split, preset=preset,
                                       overrides=overrides, resume=resume, progress=self.progress)
            return {"interpreter": str(folder), "seconds": result.seconds, "iterations": result.steps,
                    "labeled": json.loads((folder / "segmenter.json").read_text())["labeled_images"]}

        trained = Stage(self.runs / "interpreters" / f"{fraction}-seed{seed}", key, run).result(allow_run)
        if trained is not None:
            trained["teacher_seconds"] = teacher["seconds"]
        return trained

    def cache_stage(self, teacher: dict, preset: str | None, overrides: dict, allow_run: bool) -> dict | None:
        """The offline feature cache of `teacher` on the unlabeled images (K encodings per image),
        shared by every row that distills this teacher with these encoding settings."""
        from dreamteacher import api
        from dreamteacher.config import build_config

        config = build_config(preset, overrides)
        unlabeled = self.path("unlabeled")
        key = digest("cache", teacher["key"], key_settings(config, {"encode": None, "data": ("resolution",)}),
                     folder_fingerprint(unlabeled))
        name = f"cache-{Path(teacher['teacher']).parent.name}-{key[:8]}"
        if name in self._stages:
            return self._stages[name]

        def run(folder: Path, resume: bool) -> dict:
            self.log(f"[bench] encoding the images into the feature cache {folder / 'features'}")
            seconds = api.build_feature_cache(unlabeled, folder / "features", teacher["teacher"], preset, overrides,
                                              progress=self.progress)
            return {"cache": str(folder / "features"), "seconds": seconds}

        result = Stage(self.runs / name, key, run).result(allow_run)
        if result is not None:
            self._stages[name] = result
        return result

    def distill_stage(self, method: str, teacher: dict | None, allow_run: bool,
                      interpreter: dict | None = None, cacheable: bool = True) -> dict | None:
        """A student distilled from `teacher` (with label distillation from `interpreter` when given);
        from the offline feature cache when the recipe sets `feature_cache: true` and the teacher is a
        diffusion model (`cacheable`), else online."""
        if teacher is None:
            return None
        from dreamteacher import api
        from dreamteacher.config import build_config

        preset, overrides = self.pretrain_config(method)
        config = build_config(preset, overrides)
        unlabeled = self.path("unlabeled")
        cache = None
        if cacheable and self.spec.get("feature_cache"):
            cache = self.cache_stage(teacher, preset, overrides, allow_run)
            if cache is None:
                return None
        # the denoising, contrastive and label-distillation settings play no part, nor the teacher's own
        # (its key covers them), nor the number of cached encodings when distilling online
        drop = {"denoise": None, "contrast": None, "gan": None}
        if cache is None:
            drop["encode"] = ("cache_encodings",)
        if interpreter is None:
            drop["loss"] = ("ld_weight", "ld_temperature")
        settings = key_settings(config, drop=drop)
        parts = [method, teacher["key"], settings, folder_fingerprint(unlabeled)]
        if cache is not None:
            parts.append(cache["key"])
        key = digest(*parts, interpreter["key"]) if interpreter else digest(*parts)
        folder_name = f"pretrain-{method}" + (f"-{Path(interpreter['interpreter']).name}" if interpreter else "")

        def run(folder: Path, resume: bool) -> dict:
            self.log(f"[bench] pretraining '{method}' in {folder}" + (" from the feature cache" if cache else ""))
            result = api.pretrain(unlabeled, folder, teacher=teacher["teacher"],
                                  method="dt-mix" if interpreter else "dt-feat", preset=preset, overrides=overrides,
                                  resume=resume, progress=self.progress,
                                  interpreter=interpreter["interpreter"] if interpreter else None,
                                  cache=cache["cache"] if cache else None)
            summary = api.read_summary(folder) or {}
            files = {name: str(path) for name, path in result.files.items()}
            return {**files, "seconds": result.seconds, "steps": result.steps, "epochs": summary.get("epochs")}

        student = Stage(self.runs / folder_name, key, run).result(allow_run)
        if student is None:
            return None
        stages = {"teacher": {k: teacher[k] for k in ("seconds", "steps", "epochs")}}
        if cache is not None:  # each row that reads it would have had to build it
            stages["cache"] = {"seconds": cache["seconds"]}
        if interpreter:
            stages["interpreter"] = {"seconds": interpreter["seconds"], "steps": interpreter["iterations"]}
        stages["student"] = {k: student[k] for k in ("seconds", "steps", "epochs")}
        return {"backbone": student["backbone"], "decoder": student.get("decoder"), "key": student["key"],
                "pretrain_seconds": round(sum(stage["seconds"] for stage in stages.values()), 1),
                "pretrain_epochs": student["epochs"], "stages": stages}

    def own_stage(self, name: str, method: str, upstream: dict | None, allow_run: bool,
                  overrides_name: str | None = None) -> dict | None:
        """A method that needs no diffusion teacher: DeP, DDeP on `upstream`'s backbone (the frozen
        encoder), MoCo v3, or PCD from `upstream`'s MoCo v3 run (the teacher). Its settings are the
        pretraining preset with the recipe's `method_overrides[overrides_name or method]`. Returns
        {run, backbone, decoder, key, pretrain_seconds (upstream's included), ...}."""
        from dreamteacher import api
        from dreamteacher.config import build_config

        if upstream is None and method in ("ddep", "pcd"):
            return None
        preset, overrides = self.pretrain_config(overrides_name or method)
        config = build_config(preset, overrides)
        unlabeled = self.path("unlabeled")
        unused = ("diffusion", "teacher_train", "encode", "loss", "gan",
                  "denoise" if method in ("mocov3", "pcd") else "contrast")
        settings = key_settings(config, drop={section: None for section in unused})
        key = digest(name, method, upstream["key"] if upstream else None, settings, folder_fingerprint(unlabeled))
        inputs = {"encoder": upstream["backbone"]} if method == "ddep" else \
            {"teacher": upstream["run"]} if method == "pcd" else {}

        def run(folder: Path, resume: bool) -> dict:
            self.log(f"[bench] pretraining '{name}' in {folder}")
            result = api.pretrain(unlabeled, folder, method=method, preset=preset, overrides=overrides, resume=resume,
                                  progress=self.progress, **inputs)
            summary = api.read_summary(folder) or {}
            return {"run": str(folder), **{part: str(path) for part, path in result.files.items()},
                    "seconds": result.seconds, "steps": result.steps, "epochs": summary.get("epochs")}

        trained = Stage(self.runs / f"pretrain-{name}", key, run).result(allow_run)
        if trained is None:
            return None
        stages = dict(upstream["stages"]) if upstream else {}
        stages[overrides_name or method] = {k: trained[k] for k in ("seconds", "steps", "epochs")}
        return {"run": trained.get("run", str(self.runs / f"pretrain-{name}")), "backbone": trained["backbone"],
                "decoder": trained.get("decoder"), "key": trained["key"],
                "pretrain_seconds": round((upstream["pretrain_seconds"] if upstream else 0) + trained["seconds"], 1),
                "pretrain_epochs": trained["epochs"], "stages": stages}

    # ---------------------------------------------------------------- fine-tuning cells
    def cell(self, row: dict, fraction: str, seed: int, backbone: dict, allow_run: bool = True) -> dict | None:
        from dreamteacher.downstream.finetune import build_finetune_config, finetune

        method, head = row["method"], row.get("head", "upernet")
        if method == "teacher-interpreter":
            return self.interpreter_cell(fraction, seed, allow_run)
        iterations = row.get("iterations", self.spec["iterations"][fraction])
        if isinstance(iterations, dict):
            iterations = iterations[fraction]
        preset = self.spec.get("finetune_preset")
        overrides = self.overrides(self.spec.get("finetune_overrides"), row.get("finetune_overrides"),
                                   {"model": {"head": head}, "optim": {"iterations": iterations},
                                    "trainer": {"seed": seed}})
        config = build_finetune_config(preset, overrides)
        split = self.data_root / self.spec["data"]["splits"][fraction]
        images, masks = self.path("images"), self.path("masks")
        settings = key_settings(config, drop={} if head == "unet" else {"model": ("unet_width",)})
        key = digest(method, head, fraction, seed, backbone["key"], settings,
                     split.read_text() if split.is_file() else str(split), folder_fingerprint(images),
                     folder_fingerprint(masks))
        folder = self.runs / "cells" / f"{method}--{head}" / f"{fraction}-seed{seed}"

        def run(folder: Path, resume: bool) -> dict:
            self.log(f"[bench] fine-tuning {method} / {head} on {fraction} of the labels, seed {seed}")
            # a pretrained decoder of this head's kind: DeP/DDeP's U-Net, dt-mix's UperNet (G.4)
            kinds = {"unet": ("dep", "ddep", "dt-feat+ddep"), "upernet": ("dt-mix",)}
            decoder = backbone.get("decoder") if method in kinds.get(head, ()) else None
            result = finetune(backbone["backbone"], images, masks, folder, split=split, preset=preset,
                              overrides=overrides, resume=resume, progress=self.progress, decoder=decoder)
            info = json.loads((folder / "segmenter.json").read_text())
            initialized = [part for part in ("backbone", "decoder") if info.get(f"{part}_init") == "pretrained"]
            return {"seconds": result.seconds, "iterations": result.steps, "labeled": info["labeled_images"],
                    "initialized": "+".join(initialized) or "none"}

        trained = Stage(folder, key, run).result(allow_run)
        if trained is None:
            return None
        scores = self.scores(folder, trained["key"], f"{method} / {head} {fraction} seed {seed}")
        return {"method": method, "head": head, "fraction": fraction, "labeled": trained["labeled"], "seed": seed,
                **scores,
                "pretrain_seconds": backbone["pretrain_seconds"], "pretrain_epochs": backbone["pretrain_epochs"],
                "pretrain_stages": backbone["stages"],
                "finetune_iterations": trained["iterations"], "finetune_seconds": round(trained["seconds"], 1),
                "initialized": trained.get("initialized", "none" if method == "scratch" else "backbone")}

    def interpreter_cell(self, fraction: str, seed: int, allow_run: bool) -> dict | None:
        """The teacher + interpreter as the segmenter (Table 5's DDPM-seg family): no fine-tuning."""
        trained = self.interpreter_stage(fraction, seed, allow_run)
        if trained is None:
            return None
        folder = Path(trained["interpreter"])
        scores = self.scores(folder, trained["key"], f"teacher-interpreter {fraction} seed {seed}")
        return {"method": "teacher-interpreter", "head": "interpreter", "fraction": fraction,
                "labeled": trained["labeled"], "seed": seed, **scores,
                "pretrain_seconds": round(trained["teacher_seconds"], 1), "pretrain_epochs": 0,
                "pretrain_stages": {"teacher": {"seconds": trained["teacher_seconds"]}},
                "finetune_iterations": trained["iterations"], "finetune_seconds": round(trained["seconds"], 1),
                "initialized": "teacher+interpreter"}

    def scores(self, folder: Path, key: str, what: str) -> dict:
        """A finished run evaluated on every evaluation set (each cached beside the run, keyed on the
        run and the set's contents, so a set added later costs one evaluation per finished run):
        {"miou", "per_class", "pixel_accuracy"} of the primary (first) set, "scores" of every set, and
        "inference_gflops", the model's forward cost per image at its resolution."""
        from dreamteacher.downstream.finetune import evaluate

        per_set: dict[str, dict] = {}
        gflops = None
        for name, (images, masks) in self.eval_sets.items():
            eval_path = folder / f"eval-{digest(key, folder_fingerprint(images), folder_fingerprint(masks))}.json"
            if eval_path.is_file():
                scores = json.loads(eval_path.read_text())
            else:
                self.log(f"[bench] evaluating {what} on {images}")
                scores = evaluate(folder, images, masks).to_dict()
            if "gflops_per_image" not in scores:  # fresh scores (or older files): cost added, written once
                gflops = gflops if gflops is not None else inference_gflops(folder)
                scores["gflops_per_image"] = gflops
                write_text_atomic(eval_path, json.dumps(scores))
            gflops = scores["gflops_per_image"]
            per_set[name] = {"miou": round(scores["miou"], 2),
                             "per_class": [None if math.isnan(v) else round(v, 2) for v in scores["per_class"]],
                             "pixel_accuracy": round(scores["pixel_accuracy"], 2), "images": scores["images"]}
        primary = per_set[next(iter(per_set))]
        return {"miou": primary["miou"], "per_class": primary["per_class"], "pixel_accuracy": primary["pixel_accuracy"],
                "scores": per_set, "inference_gflops": gflops}


SCRATCH = {"backbone": None, "key": "scratch", "pretrain_seconds": 0.0, "pretrain_epochs": 0, "stages": {}}


def inference_gflops(folder: Path) -> float:
    """Forward FLOPs of a finished run's segmenter on one image at its resolution (GFLOPs, multiply-
    adds counted twice): the teacher + interpreter against a fine-tuned student, in one unit."""
    from torch.utils.flop_counter import FlopCounterMode

    from dreamteacher.downstream.models import load_segmenter

    model, info = load_segmenter(folder)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.rand(1, 3, *info["resolution"]))
    return round(counter.get_total_flops() / 1e9, 2)


def _dt_feat(bench: Bench, allow_run: bool) -> dict | None:
    return bench.distill_stage("dt-feat", bench.teacher_stage(True, allow_run), allow_run)


def _dt_feat_gan(bench: Bench, allow_run: bool) -> dict | None:
    """Feature distillation from a StyleGAN2 trained on the same images, on its synthesized dataset."""
    return bench.distill_stage("dt-feat-gan", bench.gan_teacher_stage(allow_run), allow_run, cacheable=False)


def _dt_feat_untrained(bench: Bench, allow_run: bool) -> dict | None:
    return bench.distill_stage("dt-feat-untrained", bench.teacher_stage(False, allow_run), allow_run)


def _dep(bench: Bench, allow_run: bool) -> dict | None:
    return bench.own_stage("dep", "dep", None, allow_run)


def _dt_feat_ddep(bench: Bench, allow_run: bool) -> dict | None:
    """DreamTeacher encoder (frozen) + a DDeP-pretrained U-Net decoder on it."""
    return bench.own_stage("dt-feat+ddep", "ddep", bench.backbone_stage("dt-feat", allow_run), allow_run)


def _mocov3(bench: Bench, allow_run: bool) -> dict | None:
    """MoCo v3 directly on the student architecture: the contrastive baseline."""
    return bench.own_stage("mocov3", "mocov3", None, allow_run)


def _pcd(bench: Bench, allow_run: bool) -> dict | None:
    """A MoCo v3 teacher (`method_overrides.moco-teacher`: ResNet-50) on the same images, distilled
    into the student by PCD; the row's pretraining wall-clock is both stages'."""
    teacher = bench.own_stage("moco-teacher", "mocov3", None, allow_run, overrides_name="moco-teacher")
    return bench.own_stage("pcd", "pcd", teacher, allow_run)


def _dt_mix(bench: Bench, fraction: str, allow_run: bool) -> dict | None:
    """Mix distillation with the interpreter trained on `fraction`'s labels (seed 0)."""
    interpreter = bench.interpreter_stage(fraction, 0, allow_run)
    if interpreter is None:
        return None
    return bench.distill_stage("dt-mix", bench.teacher_stage(True, allow_run), allow_run, interpreter)


# label-guided methods: one backbone per label fraction
LABEL_GUIDED: dict[str, Callable[[Bench, str, bool], dict | None]] = {"dt-mix": _dt_mix}

# method name (as used across the project's tables) -> how its backbone (and decoder) is pretrained
PRETRAINERS: dict[str, Callable[[Bench, bool], dict | None]] = {
    "dt-feat": _dt_feat, "dt-feat-untrained": _dt_feat_untrained, "dep": _dep, "dt-feat+ddep": _dt_feat_ddep,
    "mocov3": _mocov3, "pcd": _pcd, "dt-feat-gan": _dt_feat_gan}


def _deep_merge(*layers: dict) -> dict:
    merged: dict = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = _deep_merge(merged[key], value)
            else:
                merged[key] = value
    return merged


def _select(values: list[str], chosen: list[str] | None, what: str) -> list[str]:
    if not chosen:
        return values
    unknown = [c for c in chosen if c not in values]
    if unknown:
        raise UserError(f"--{what}: {', '.join(unknown)} not in the recipe (it has {', '.join(values)})")
    return [v for v in values if v in chosen]


@dataclass
class BenchResult:
    out: Path
    rows: list[dict]
    files: dict[str, Path]


def bench(recipe: str | Path, out: str | Path, eval_images: str | Path | None = None,
          eval_masks: str | Path | None = None, data_root: str | Path | None = None,
          rows: list[str] | None = None, fractions: list[str] | None = None, seeds: list[int] | None = None,
          progress: bool = True, device: str = "cpu") -> BenchResult:
    """Run (or continue) every selected cell of `recipe`; write OUT/results.{json,md,png}.

    `rows` selects by method (`dt-feat`) or method:head (`dt-feat:readout`). The results files always
    cover every finished cell of the recipe, including cells from earlier invocations (from their work
    folders, or from the previous results.json for rows not selected now). `device` (cpu, gpu) is where
    every stage runs.
    """
    from dreamteacher.bench.report import write_results

    spec = load_recipe(recipe)
    if device not in DEVICE_SETTINGS:
        raise UserError(f"--device must be one of {', '.join(DEVICE_SETTINGS)}, got '{device}'")
    if device == "gpu" and not torch.cuda.is_available():
        raise UserError("--device gpu: no CUDA GPU is visible to torch on this machine")
    out = Path(out)
    root = Path(data_root) if data_root else Path(spec["data"]["root"])
    if not root.is_dir():
        raise UserError(f"recipe data root not found: {root} (set --data-root)")
    if (eval_images is None) != (eval_masks is None):
        raise UserError("--eval-images and --eval-masks go together")
    bench_ = Bench(spec, out, root, eval_sets(spec, root, eval_images, eval_masks), progress, device)
    row_ids = [":".join(_row_key(r)) for r in spec["rows"]]
    wanted_rows = [r for r, rid in zip(spec["rows"], row_ids)
                   if not rows or rid in rows or r["method"] in rows]
    if rows and not wanted_rows:
        raise UserError(f"--rows {','.join(rows)} matches no recipe row (it has {', '.join(row_ids)})")
    wanted_fractions = _select([f for f in FRACTIONS if f in spec["data"]["splits"]], fractions, "fractions")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: list[dict] = []
    for row in spec["rows"]:
        selected = row in wanted_rows
        method = row["method"]
        shared = None if method in LABEL_GUIDED or method == "teacher-interpreter" else \
            bench_.backbone_stage(method, allow_run=selected)
        for fraction in FRACTIONS:
            if fraction not in spec["data"]["splits"] or fraction not in row.get("fractions", FRACTIONS):
                continue
            asked = selected and fraction in wanted_fractions
            if method == "teacher-interpreter":
                backbone = SCRATCH  # no backbone: the cell is the interpreter itself
            elif method in LABEL_GUIDED:
                backbone = bench_.backbone_stage(method, allow_run=asked, fraction=fraction)
            else:
                backbone = shared
            row_seeds = row.get("seeds", spec["seeds"][fraction])
            if isinstance(row_seeds, dict):
                row_seeds = row_seeds[fraction]
            for seed in row_seeds:
                run_now = selected and fraction in wanted_fractions and (not seeds or seed in seeds)
                # cells not asked for are still reported when an earlier invocation finished them
                cell = bench_.cell(row, fraction, seed, backbone, allow_run=run_now) if backbone else None
                if cell is not None:
                    results.append(cell)
    results += _carried_over(out, spec["rows"], wanted_rows, results)
    order = {_row_key(r): i for i, r in enumerate(spec["rows"])}
    results.sort(key=lambda cell: order.get(_row_key(cell), len(order)))  # the recipe's row order
    meta = _bench_meta(spec, bench_, root, time.perf_counter() - started)
    files = write_results(out, meta, results)
    return BenchResult(out, results, files)


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


def _row_key(row: dict) -> tuple[str, str]:
    """(method, head) of a recipe row or of a result cell."""
    return row["method"], row.get("head", "upernet")


def _cell_key(cell: dict) -> tuple:
    return (*_row_key(cell), cell["fraction"], cell["seed"])


def _carried_over(out: Path, recipe_rows: list[dict], wanted_rows: list[dict], results: list[dict]) -> list[dict]:
    """Cells of the previous OUT/results.json whose work folders are gone (deleted to free disk, or a
    fresh clone of a committed table): kept, marked `carried_over`, for recipe rows this invocation did
    not select. A selected row is always reported from its current cells only, so a changed recipe
    never leaves stale numbers beside new ones."""
    previous = out / "results.json"
    if not previous.is_file():
        return []
    try:
        old_cells = json.loads(previous.read_text()).get("rows", [])
    except json.JSONDecodeError as err:
        raise UserError(f"{previous}: not a results file ({err}); move it away to rebuild the table") from err
    unselected = {_row_key(r) for r in recipe_rows if r not in wanted_rows}
    present = {_cell_key(c) for c in results}
    return [{**cell, "carried_over": True} for cell in old_cells
            if _row_key(cell) in unselected and _cell_key(cell) not in present]


def _bench_meta(spec: dict, bench_: Bench, root: Path, seconds: float) -> dict:
    from dreamteacher.config import build_config
    from dreamteacher.downstream.finetune import build_finetune_config
    from dreamteacher.methods.denoising import fixed_sigma

    pre = build_config(*bench_.pretrain_config())
    gan = build_config(*bench_.pretrain_config("gan-teacher"))
    gan_student = build_config(*bench_.pretrain_config("dt-feat-gan"))
    dep = build_config(*bench_.pretrain_config("dep"))
    contrastive = {name: build_config(*bench_.pretrain_config(name)) for name in ("moco-teacher", "pcd", "mocov3")}
    fine = build_finetune_config(spec.get("finetune_preset"), bench_.overrides(spec.get("finetune_overrides")))
    return {
        "recipe": spec["name"], "image_size": fine.data.resolution, "backbone": fine.model.backbone,
        "data": {"root": str(root), "unlabeled": spec["data"]["unlabeled"], "splits": spec["data"]["splits"],
                 "eval_sets": {name: {"images": str(images), "masks": str(masks),
                                      "about": (spec["data"].get("eval_about") or {}).get(name, "")}
                               for name, (images, masks) in bench_.eval_sets.items()}},
        "settings_chosen_on": spec.get("settings_chosen_on"),
        "class_names": spec["data"].get("class_names"),
        "pretrain": {"preset": spec.get("pretrain_preset"), "resolution": pre.data.resolution,
                     "student": pre.student.backbone, "teacher_steps": pre.teacher_train.max_steps,
                     "teacher_crop": pre.teacher_train.crop, "epochs": pre.optim.epochs, "t": pre.encode.t,
                     "blocks": pre.encode.blocks,
                     "loss": {k: getattr(pre.loss, k) for k in ("mse_weight", "at_weight", "whiten")},
                     "cache_encodings": pre.encode.cache_encodings if spec.get("feature_cache") else None},
        "finetune": {"preset": spec.get("finetune_preset"), "iterations": spec["iterations"],
                     "batch_size": fine.optim.batch_size, "optimizer": fine.optim.name, "lr": fine.optim.lr,
                     "decoder_channels": fine.model.decoder_channels},
        "seeds": spec["seeds"],
        "device": bench_.device,
        # dt-feat-gan's teacher is not the preset's diffusion U-Net: the table says what it is
        "gan_teacher": {"iterations": gan.teacher_train.max_steps, "student_epochs": gan_student.optim.epochs,
                        "blocks": gan_student.encode.blocks},
        "dep": {"epochs": dep.optim.epochs, "crop": dep.denoise.crop, "sigma": fixed_sigma(dep, "dep"),
                "unet_width": dep.denoise.unet_width},
        "contrastive": {name: {"backbone": c.student.backbone, "epochs": c.optim.epochs, "optimizer": c.optim.name,
                               "base_lr": c.optim.base_lr, "weight_decay": c.optim.weight_decay,
                               "batch_size": c.optim.batch_size, "queue_size": c.contrast.queue_size}
                        for name, c in contrastive.items()},
        "machine": {"cpus": torch.get_num_threads(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "torch": torch.__version__, "python": platform.python_version()},
        "bench_seconds_this_invocation": round(seconds, 1),
    }
