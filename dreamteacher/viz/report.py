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

from dreamteacher.config import build_config, load_config_file
from dreamteacher.data.images import ImageFolder, uint8_to_unit
from dreamteacher.viz.images import (activation_heatmap, grid, kmeans_maps, pca_basis, pca_colors, pca_scale,
                                     to_uint8)

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
def write_report(teacher_path: str | Path, data: str | Path, out: str | Path, student_run: str | Path | None = None,
                 num_images: int = 4, num_samples: int = 16, seed: int = 0, png_folder: bool = False) -> Path:
    """The page at `out`; with `png_folder` its pictures are PNG files beside it, else inline."""
    from dreamteacher.api import load_teacher

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure = Figures(out.parent if png_folder else None)
    config = (build_config(None, None, base=load_config_file(Path(student_run) / "config.yaml"))
              if student_run else build_config(None, None, base=_teacher_run_config(teacher_path)))
    teacher = load_teacher(teacher_path, config)
    height, width = config.data.resolution
    images = _load_images(data, config.data.resolution, num_images)
    size = (height, width)
    sections = [f"<h1>DreamTeacher report</h1><p>teacher: <code>{html.escape(str(teacher_path))}</code>; "
                f"images: <code>{html.escape(str(data))}</code> at {height}x{width}</p>"]

    samples = teacher.sample(num_samples, height, width, steps=50, generator=torch.Generator().manual_seed(seed))
    sections.append("<h2>Teacher samples</h2><p>50 DDIM steps from pure noise.</p>"
                    + figure(grid(to_uint8(samples)), 2, "samples"))

    specs = teacher.feature_specs
    header = ["image", "t"] + [f"block {s.block} (stride {s.stride}, {s.channels} ch)" for s in specs]
    rows = []
    for i in range(images.shape[0]):
        for t in REPORT_TIMESTEPS:
            if t >= len(teacher.alphas_cumprod):
                continue
            gen = torch.Generator().manual_seed(seed + i)
            feats = teacher.features(teacher.noise(images[i: i + 1], t, gen), t)
            maps = [figure(activation_heatmap(f, size)[0], 2, f"activation-image{i}-t{t}-block{s.block}")
                    for f, s in zip(feats, specs)]
            first = figure(to_uint8(images[i: i + 1])[0], 2, f"image{i}") if t == REPORT_TIMESTEPS[0] else ""
            rows.append([first, str(t), *maps])
    sections.append("<h2>Teacher feature activation maps</h2><p>Sum of squared activations over channels "
                    "at each decoder block (columns) after stochastic encoding at step t (rows), as in the "
                    "paper's Fig. 4/7.</p>" + _table(header, rows))
    sections.append(_kmeans_section(teacher, images, config.encode.t, size, seed, figure))

    if student_run:
        sections.append(_student_section(Path(student_run), config, teacher, images, size, seed, figure))
    html_text = ("<!doctype html><html><head><meta charset='utf-8'><title>DreamTeacher report</title><style>"
                 "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{padding:3px;"
                 "border:1px solid #ddd;font-size:12px;vertical-align:middle}img{image-rendering:pixelated}"
                 "</style></head><body>" + "\n".join(sections) + "</body></html>")
    out.write_text(html_text)
    return out


def _kmeans_section(teacher, images: torch.Tensor, t: int, size: tuple[int, int], seed: int, figure: Figures) -> str:
    """Fig. 5: per block, one k-means over the pixels of all images; a color is a cluster everywhere."""
    feats = teacher.features(teacher.noise(images, t, torch.Generator().manual_seed(seed)), t)
    maps = [kmeans_maps(f, size, k=KMEANS_CLUSTERS, seed=seed)[0] for f in feats]
    header = ["image"] + [f"block {s.block} (stride {s.stride})" for s in teacher.feature_specs]
    rows = [[figure(to_uint8(images[i: i + 1])[0], 2, f"kmeans-image{i}")]
            + [figure(m[i], 2, f"kmeans-image{i}-block{s.block}") for m, s in zip(maps, teacher.feature_specs)]
            for i in range(images.shape[0])]
    return (f"<h2>Teacher features, k-means (k={KMEANS_CLUSTERS})</h2><p>Each block's features after "
            f"encoding at t={t}, clustered with one k-means over every pixel of these images (channels "
            "standardized, vectors normalized), as in the paper's Fig. 5: the same color is the same "
            "cluster in every image. Clusters that follow objects and parts mean the teacher's features "
            "already separate them.</p>" + _table(header, rows))


def _teacher_run_config(teacher_path: str | Path) -> dict | None:
    path = Path(teacher_path) / "config.yaml"
    return load_config_file(path) if path.is_file() else None


def _student_section(run: Path, config, teacher, images: torch.Tensor, size: tuple[int, int], seed: int,
                     figure: Figures) -> str:
    from dreamteacher.checkpoints import read_checkpoint
    from dreamteacher.losses import whiten
    from dreamteacher.methods.dt_feat import DTFeat, resize_to
    from dreamteacher.train.engine import checkpoint_path

    ckpt = read_checkpoint(checkpoint_path(run))
    method = DTFeat(config, teacher.feature_specs, teacher)
    method.load_state_dict(ckpt["state_dict"])
    method.eval()
    gen = torch.Generator().manual_seed(seed)
    teacher_feats = teacher.features(teacher.noise(images, config.encode.t, gen), config.encode.t)
    student_feats = method.student_features(images)
    backbone_feats = method.backbone(images)
    header = ["image"] + [f"block {s.block}: teacher | student" for s in teacher.feature_specs] + \
             [f"backbone stride {s}" for s in method.backbone.strides]
    columns = []
    for t_feat, s_feat in zip(teacher_feats, student_feats):
        target = whiten(resize_to(t_feat, s_feat.shape[-2:]))
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
    return (f"<h2>Student after distillation</h2><p>run <code>{html.escape(str(run))}</code>, step "
            f"{ckpt.get('global_step', '?')}, backbone <code>{html.escape(config.student.backbone)}</code>. "
            "Teacher targets (whitened, t=%d) and the student's regressor outputs, colored by the same PCA "
            "basis per block: matching colors mean the student reproduces the teacher's features. Then the "
            "backbone's own activation maps per level (Fig. 8).</p>" % config.encode.t) + _table(header, rows)
