"""One HTML page showing what a teacher learned and what a student took from it: teacher samples,
teacher feature activation maps per block and per t (paper Fig. 4/7), k-means clusters of the teacher's
features shown as segmentation maps (Fig. 5), and the student's features after distillation beside the
teacher's (Fig. 8). `report` writes one self-contained file; `viz` a folder of PNGs and its index.html."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreamteacher.analysis.pictures import (
    activation_heatmap,
    grid,
    kmeans_maps,
    pca_basis,
    pca_colors,
    pca_scale,
    to_uint8,
)
from dreamteacher.core.config import build_config, load_config_file
from dreamteacher.core.errors import UserError
from dreamteacher.core.runs import CONFIG, RunFolder
from dreamteacher.data.images import ImageFolder, uint8_to_unit
from dreamteacher.engine.probe import read_probe_log
from dreamteacher.export.checkpoints import read_checkpoint
from dreamteacher.losses import whiten
from dreamteacher.methods.dt_feat import DTFeat, resize_to
from dreamteacher.teachers.base import load_teacher
from dreamteacher.teachers.diffusion import default_blocks
from dreamteacher.teachers.stylegan2 import GanTeacher, gan_folder, load_generator

REPORT_TIMESTEPS = (25, 50, 150, 400)
KMEANS_CLUSTERS = 10


class Figures:
    """Where the page's pictures go: inline as base64 (`folder` None: one self-contained file), or
    as numbered PNG files in `folder` that the page links to."""

    def __init__(self, folder: Path | None = None):
        self.folder, self.count = folder, 0

    def __call__(self, array: np.ndarray, scale: int = 1, name: str = "figure") -> str:
        img = Image.fromarray(array)
        if scale > 1:
            img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
        if self.folder is not None:
            self.count += 1
            file_name = f"{self.count:03d}-{name}.png"
            img.save(self.folder / file_name)
            return f'<img src="{file_name}" title="{file_name}">'
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _load_images(data: str | Path, resolution: list[int], num: int) -> torch.Tensor:
    dataset = ImageFolder(data, resolution, hflip=False)
    picks = np.linspace(0, len(dataset) - 1, num=min(num, len(dataset))).round().astype(int)
    return torch.stack([uint8_to_unit(dataset.load(int(i))) for i in picks])


@torch.no_grad()
def write_report(teacher_path: str | Path, data: str | Path | None, out: str | Path,
                 student_run: str | Path | None = None, num_images: int = 4, num_samples: int = 16, seed: int = 0,
                 png_folder: bool = False) -> Path:
    """The page at `out`; with `png_folder` its pictures are PNG files beside it, else inline.

    A diffusion teacher is shown on `data`'s images, encoded at several t; a GAN teacher on images it
    renders itself (its synthesized dataset: no t, and `data` is not needed), every synthesis level
    unless a `student_run` names the levels it distilled."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure = Figures(out.parent if png_folder else None)
    saved = load_config_file(Path(student_run) / CONFIG) if student_run else _teacher_run_config(teacher_path)
    config = build_config(None, None, base=saved, sections=DTFeat.config_sections())
    gan = gan_folder(teacher_path) if Path(teacher_path).is_dir() else None
    if gan is not None and not student_run:
        generator = load_generator(gan)
        teacher = GanTeacher(generator, list(range(len(generator.feature_specs))))
    else:
        if "encode" not in (saved or {}):  # a teacher's own run names no blocks: its levels at strides 16..2
            probe = load_teacher(teacher_path, build_config(None, {"encode": {"blocks": [0], "t": 0}}, sections=("encode",)))
            if hasattr(probe, "unet"):
                config = build_config(None, {"encode": {"blocks": default_blocks(probe.unet)}}, base=saved,
                                      sections=DTFeat.config_sections())
        teacher = load_teacher(teacher_path, config)

    if isinstance(teacher, GanTeacher):
        height, width = teacher.generator.resolution
        images, rendered = teacher.render(torch.arange(num_images) + seed)
        samples = teacher.render(torch.arange(num_samples) + seed)[0] if num_samples > 0 else None
        features_at = lambda t: rendered  # noqa: E731  (a rendered image has no diffusion step)
        timesteps: list[int | None] = [None]
        source, samples_text = "images rendered from seeds", "rendered from z ~ N(0, I), one seed each"
        activation_text = "at each synthesis level (columns) while rendering"
    else:
        if data is None:
            raise UserError("--data: a diffusion teacher is shown on real images; name an image folder")
        height, width = config.data.resolution
        images = _load_images(data, config.data.resolution, num_images)
        samples = teacher.sample(num_samples, height, width, steps=50,
                                 generator=torch.Generator().manual_seed(seed)) if num_samples > 0 else None
        features_at = lambda t: teacher.features(  # noqa: E731
            teacher.noise(images, t, torch.Generator().manual_seed(seed)), t)
        timesteps = [t for t in REPORT_TIMESTEPS if t < len(teacher.alphas_cumprod)]
        source, samples_text = f"images: <code>{html.escape(str(data))}</code>", "50 DDIM steps from pure noise."
        activation_text = "at each decoder block (columns) after stochastic encoding at step t (rows)"
    size = (height, width)
    sections = [f"<h1>DreamTeacher report</h1><p>teacher: <code>{html.escape(str(teacher_path))}</code>; "
                f"{source} at {height}x{width}</p>"]
    if num_samples > 0:
        sections.append(f"<h2>Teacher samples</h2><p>{samples_text}</p>" + figure(grid(to_uint8(samples)), 2, "samples"))

    specs = teacher.feature_specs
    header = ["image", "t"] + [f"block {s.block} (stride {s.stride}, {s.channels} ch)" for s in specs]
    feats_by_t = {t: features_at(t) for t in timesteps}
    rows = []
    for i in range(images.shape[0]):
        for t, feats in feats_by_t.items():
            label = "-" if t is None else str(t)
            tag = "" if t is None else f"-t{t}"
            maps = [figure(activation_heatmap(f[i: i + 1], size)[0], 2, f"activation-image{i}{tag}-block{s.block}")
                    for f, s in zip(feats, specs)]
            first = figure(to_uint8(images[i: i + 1])[0], 2, f"image{i}") if t == timesteps[0] else ""
            rows.append([first, label, *maps])
    sections.append("<h2>Teacher feature activation maps</h2><p>Sum of squared activations over channels "
                    f"{activation_text}, as in the paper's Fig. 4/7.</p>" + _table(header, rows))
    at_run_t = feats_by_t.get(config.encode.t) or features_at(config.encode.t)  # what the student regresses
    sections.append(_kmeans_section(teacher, images, at_run_t, size, seed, figure))

    if student_run:
        sections.append(_student_section(Path(student_run), config, teacher, images, at_run_t, size, figure))
        records = read_probe_log(Path(student_run))
        if records:
            sections.append(_probe_section(records, figure))
    html_text = ("<!doctype html><html><head><meta charset='utf-8'><title>DreamTeacher report</title><style>"
                 "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{padding:3px;"
                 "border:1px solid #ddd;font-size:12px;vertical-align:middle}img{image-rendering:pixelated}"
                 "</style></head><body>" + "\n".join(sections) + "</body></html>")
    out.write_text(html_text)
    return out


def _kmeans_section(teacher, images: torch.Tensor, feats: list[torch.Tensor], size: tuple[int, int], seed: int,
                    figure: Figures) -> str:
    """Fig. 5: per block, one k-means over the pixels of all images; a color is a cluster everywhere."""
    maps = [kmeans_maps(f, size, k=KMEANS_CLUSTERS, seed=seed)[0] for f in feats]
    header = ["image"] + [f"block {s.block} (stride {s.stride})" for s in teacher.feature_specs]
    rows = [[figure(to_uint8(images[i: i + 1])[0], 2, f"kmeans-image{i}")]
            + [figure(m[i], 2, f"kmeans-image{i}-block{s.block}") for m, s in zip(maps, teacher.feature_specs)]
            for i in range(images.shape[0])]
    return (f"<h2>Teacher features, k-means (k={KMEANS_CLUSTERS})</h2><p>Each block's features (a diffusion "
            "teacher's after encoding at the run's t), clustered with one k-means over every pixel of these "
            "images (channels standardized, vectors normalized), as in the paper's Fig. 5: the same color is "
            "the same cluster in every image. Clusters that follow objects and parts mean the teacher's "
            "features already separate them.</p>" + _table(header, rows))


def probe_curve(records: list[dict]) -> np.ndarray:
    """The live probe's values against epochs (mIoU, and the effective rank on a second axis), as an
    RGB picture."""
    import matplotlib  # noqa: PLC0415 - plotting, only when a page draws it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    epochs = [r["epoch"] for r in records]
    fig, ax = plt.subplots(figsize=(6.0, 3.4), dpi=100)
    if records[0].get("miou") is not None:
        ax.plot(epochs, [r["miou"] for r in records], "o-", color="tab:blue", label="readout mIoU")
        ax.set_ylabel("readout mIoU", color="tab:blue")
        rank_ax = ax.twinx()
    else:
        rank_ax = ax
    rank_ax.plot(epochs, [r["effective_rank"] for r in records], "s--", color="tab:orange", label="effective rank")
    rank_ax.set_ylabel("effective rank", color="tab:orange")
    ax.set_xlabel("epoch")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.canvas.draw()
    picture = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return picture


def _probe_section(records: list[dict], figure: Figures) -> str:
    last = records[-1]
    readout = f"readout mIoU {records[0]['miou']} -> {last['miou']}, " if last.get("miou") is not None else ""
    return ("<h2>Pretraining, watched: the live probe</h2><p>Every few epochs the frozen backbone's "
            f"{readout}effective rank {records[0]['effective_rank']} -> {last['effective_rank']} (epoch 0 is the "
            "starting point; <code>logs/probe.jsonl</code>).</p>" + figure(probe_curve(records), 1, "probe"))


def _teacher_run_config(teacher_path: str | Path) -> dict | None:
    path = Path(teacher_path) / CONFIG
    return load_config_file(path) if path.is_file() else None


def _student_section(run: Path, config, teacher, images: torch.Tensor, teacher_feats: list[torch.Tensor],
                     size: tuple[int, int], figure: Figures) -> str:
    ckpt = read_checkpoint(RunFolder(run).checkpoint)
    method_name = ckpt["hyper_parameters"].get("method")
    if method_name != DTFeat.name:  # the pictures pair a dt-feat regressor's outputs with the teacher's blocks
        return (f"<h2>Student</h2><p>run <code>{html.escape(str(run))}</code> is a {html.escape(str(method_name))} "
                "run: the student-beside-teacher pictures are drawn for dt-feat students.</p>")
    method = DTFeat(config, teacher.feature_specs, teacher)
    method.load_state_dict(ckpt["state_dict"])
    method.eval()
    student_feats = method.student_features(images)
    backbone_feats = method.backbone(images)
    header = ["image"] + [f"block {s.block}: teacher | student" for s in teacher.feature_specs] + \
             [f"backbone stride {s}" for s in method.backbone.strides]
    columns = []
    for t_feat, s_feat in zip(teacher_feats, student_feats):
        target = whiten(resize_to(t_feat, s_feat.shape[-2:]), config.lab.whiten)
        basis = pca_basis(target)
        scale = pca_scale(target, basis)
        columns.append((pca_colors(target, basis, size, scale), pca_colors(s_feat, basis, size, scale)))
    heatmaps = [activation_heatmap(f, size) for f in backbone_feats]
    rows = []
    for i in range(images.shape[0]):
        row = [figure(to_uint8(images[i: i + 1])[0], 2, f"student-image{i}")]
        row += [figure(np.concatenate([t[i], np.full((size[0], 2, 3), 255, np.uint8), s[i]], axis=1), 2,
                       f"student-image{i}-block{spec.block}") for (t, s), spec in zip(columns, teacher.feature_specs)]
        row += [figure(h[i], 2, f"student-image{i}-stride{stride}") for h, stride in zip(heatmaps, method.backbone.strides)]
        rows.append(row)
    encoded = "" if isinstance(teacher, GanTeacher) else f", t={config.encode.t}"  # a GAN renders, no t
    return (f"<h2>Student after distillation</h2><p>run <code>{html.escape(str(run))}</code>, step "
            f"{ckpt.get('global_step', '?')}, backbone <code>{html.escape(config.student.backbone)}</code>. "
            f"Teacher targets (whitened{encoded}) and the student's regressor outputs, colored by the same PCA "
            "basis per block: matching colors mean the student reproduces the teacher's features. Then the "
            "backbone's own activation maps per level (Fig. 8).</p>") + _table(header, rows)
