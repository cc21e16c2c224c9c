"""`dreamteacher` command line: a thin layer over `dreamteacher.api`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import yaml

from dreamteacher import api
from dreamteacher.analysis.metrics import format_iou_table
from dreamteacher.bench.runner import bench
from dreamteacher.bench.speed import bench_speed, format_speed
from dreamteacher.core.config import available_presets
from dreamteacher.core.errors import Diverged, UserError
from dreamteacher.export.checkpoints import FORMATS
from dreamteacher.methods.base import METHODS, TEACHER_TRAINERS
from dreamteacher.nn.segmenters import HEADS
from dreamteacher.viz.report import write_report
from dreamteacher.workflows.plan import format_plan


def _add_config_args(p: argparse.ArgumentParser, finetune: bool = False, kind: str | None = None) -> None:
    presets = available_presets("finetune" if finetune else "interpreter" if kind == "interpreter" else "pretrain")
    p.add_argument("--preset", help=f"named preset, or a preset .yaml file: {', '.join(presets)}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set optim.epochs=10 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue RUN from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs are still written)")


def _add_labeled_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", required=True, help="folder of training images")
    p.add_argument("--masks", required=True, help="folder of label maps (class ids), same file names")
    p.add_argument("--split", help="file naming the labeled images to use, one per line (default: all)")
    p.add_argument("--out", required=True, help="run folder to create")
    p.add_argument("--num-classes", type=int, help="same as --set data.num_classes=N")
    p.add_argument("--ignore-index", type=int, help="label id to ignore (same as --set data.ignore_index=K)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamteacher", description=(
        "Pretrain image backbones for dense prediction by distilling generative models."))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-teacher", help="train a DDPM (or StyleGAN2) teacher on an unlabeled image folder")
    p.add_argument("--kind", default="ddpm", choices=TEACHER_TRAINERS.names(),
                   help="; ".join(f"{name}: {cls.summary}" for name, cls in TEACHER_TRAINERS.items()))
    p.add_argument("--data", required=True, help="folder of unlabeled images")
    p.add_argument("--out", required=True, help="run folder to create")
    _add_config_args(p)

    p = sub.add_parser("sample", help="write a PNG grid of teacher samples")
    p.add_argument("run", help="train-teacher run, diffusers folder or ADM .pt")
    p.add_argument("--out", help="PNG path (default RUN/samples.png)")
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("pretrain", help="pretrain a timm backbone: distill a teacher, denoise (dep, ddep) or "
                       "contrast (mocov3, pcd)")
    p.add_argument("--method", default="dt-feat", choices=METHODS.names(),
                   help="; ".join(f"{name}: {cls.summary}" for name, cls in METHODS.items()))
    p.add_argument("--teacher", help="train-teacher run (DDPM or StyleGAN2), diffusers DDPM/UNet2DModel or Stable "
                   "Diffusion folder, or ADM .pt; "
                   "for pcd a MoCo v3 checkpoint (official layout) or mocov3 run")
    p.add_argument("--data", required=True, help="folder of unlabeled images")
    p.add_argument("--out", required=True, help="run folder to create")
    p.add_argument("--model", help="timm backbone name (same as --set student.backbone=NAME)")
    p.add_argument("--cache", help="folder of the offline feature dataset: K teacher encodings per image "
                   "(encode.cache_encodings), built on first use and reused; the teacher is not run while training")
    p.add_argument("--rebuild-cache", action="store_true", help="replace a --cache built from other inputs")
    p.add_argument("--encoder", help="ddep: the frozen encoder, an exported backbone .safetensors")
    p.add_argument("--interpreter", help="dt-mix: a `dreamteacher interpreter` run (its teacher is the default)")
    p.add_argument("--init", help="weights the student starts from (timm-keyed .safetensors, a .pth state dict, or "
                   "an export), e.g. ImageNet weights; checked strictly against the backbone")
    p.add_argument("--probe-images", help="labeled images for the live dense probe (same as --set probe.images=DIR)")
    p.add_argument("--probe-masks", help="their label maps (--set probe.masks=DIR; with --set probe.num_classes=N)")
    p.add_argument("--probe-split", help="the probe readout's training images (--set probe.split=FILE)")
    _add_config_args(p)

    p = sub.add_parser("plan", help="what a pretraining will cost before it runs: images, steps, FLOPs, memory and "
                       "time per device (from a few timed real steps here), the feature cache against the free disk")
    p.add_argument("--data", required=True, help="the images: a folder, a text file of paths, or tar shards "
                   "('shards/{000000..000099}.tar')")
    p.add_argument("--method", default="dt-feat", help="the pretraining to plan (`none`: the teacher's training alone)")
    p.add_argument("--teacher", help="an existing teacher (otherwise training one is planned too)")
    p.add_argument("--kind", default="ddpm", choices=TEACHER_TRAINERS.names(), help="the teacher to train")
    p.add_argument("--cache", help="where the feature cache would go (its size is checked against the free disk)")
    p.add_argument("--out", help="also write the plan as JSON here")
    p.add_argument("--timed-steps", type=int, default=3, help="timed training steps per stage (after 2 untimed)")
    p.add_argument("--preset", help=f"named preset, or a preset .yaml file: {', '.join(available_presets())}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, as for train-teacher and pretrain (e.g. --set trainer.devices=4)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("export", help="write the backbone alone, in the key names of a fine-tuning library")
    p.add_argument("run", help="pretrain run folder or its checkpoint")
    p.add_argument("--format", default="timm", choices=list(FORMATS),
                   help="timm/torchvision/smp: .safetensors; mmseg: .pth; detectron2: .pkl (default timm)")
    p.add_argument("--out", help="output file (default RUN/backbone[.FORMAT].EXT)")

    p = sub.add_parser("finetune", help="fine-tune a segmentation head on an exported (or random) backbone")
    p.add_argument("--backbone", required=True, help="exported backbone .safetensors, or 'none' for random init")
    _add_labeled_data_args(p)
    p.add_argument("--head", choices=list(HEADS), help="same as --set model.head=...")
    p.add_argument("--decoder", help="a dep/ddep (unet) or dt-mix (upernet) run's decoder.safetensors to start from")
    _add_config_args(p, finetune=True)

    p = sub.add_parser("interpreter", help="train a feature interpreter on a frozen teacher with a few labels")
    p.add_argument("--teacher", required=True, help="train-teacher run, diffusers folder or ADM .pt")
    _add_labeled_data_args(p)
    _add_config_args(p, kind="interpreter")

    p = sub.add_parser("evaluate", help="mIoU and per-class IoU of a fine-tuned (or interpreter) run")
    p.add_argument("run", help="finetune run folder")
    p.add_argument("--images", required=True)
    p.add_argument("--masks", required=True)
    p.add_argument("--split", help="file naming the images to evaluate (default: all)")
    p.add_argument("--out", help="also write the scores as JSON here")

    p = sub.add_parser("bench", help="pretrain, fine-tune at every label fraction and seed, tabulate")
    p.add_argument("recipe", help="recipe name (camvid-cpu, camvid-gpu) or a recipe .yaml")
    p.add_argument("--out", required=True, help="results folder (results.json/.md/.png; work in OUT/runs)")
    p.add_argument("--eval-images", help="one more evaluation set beside the recipe's (CamVid unseen/ and val/): "
                   "its images")
    p.add_argument("--eval-masks", help="its label maps")
    p.add_argument("--data-root", help="dataset root the recipe's paths are relative to")
    p.add_argument("--rows", help="comma-separated methods or method:head to run, e.g. dt-feat,scratch:upernet")
    p.add_argument("--fractions", help="comma-separated, e.g. 1-30,1-8")
    p.add_argument("--seeds", help="comma-separated, e.g. 0")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"],
                   help="where every stage runs (gpu: one CUDA GPU; cells are kept apart from cpu ones)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("bench-speed", help="time the parts and the whole of a pretraining step (images/s, memory)")
    p.add_argument("--preset", default="cpu-small", help="pretraining preset to time (default cpu-small)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set trainer.channels_last=true (repeatable)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--teacher", help="teacher to time (default: the preset's U-Net, untrained: same cost)")
    p.add_argument("--data", help="image folder of optim.batch_size x --steps images (default: synthetic 480x360 JPEGs)")
    p.add_argument("--steps", type=int, default=8, help="timed steps (one epoch)")
    p.add_argument("--no-cache", action="store_true", help="skip the feature-cache comparison")
    p.add_argument("--out", help="also write the figures as JSON here")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("info", help="what a run folder, checkpoint or export holds")
    p.add_argument("path")

    for name, what, out in (("report", "one self-contained HTML file", "report .html path"),
                            ("viz", "a folder of PNGs and its index.html", "folder to write")):
        p = sub.add_parser(name, help=f"what a teacher learned, as {what}: samples, activation maps per block "
                           "and t, k-means maps of its features; with --student, the student's features")
        p.add_argument("--teacher", required=True, help="train-teacher run, diffusers folder or ADM .pt")
        p.add_argument("--student", help="pretrain run folder (dt-feat)")
        p.add_argument("--data", help="folder of images to show (a GAN teacher renders its own)")
        p.add_argument("--out", required=True, help=out)
        p.add_argument("--num-images", type=int, default=4, help="images to show (default 4)")
        p.add_argument("--num-samples", type=int, default=16, help="teacher samples to draw (default 16; 0: none)")
    return parser


def run(args: argparse.Namespace) -> None:
    progress = not getattr(args, "no_progress", False)
    if args.command == "train-teacher":
        result = api.train_teacher(args.data, args.out, args.preset, args.overrides, args.resume, progress,
                                   kind=args.kind)
        print(f"teacher: {result.files['teacher']} ({result.steps} steps, {result.seconds:.0f} s)")
    elif args.command == "sample":
        print(f"samples: {api.sample(args.run, args.out, args.num, args.steps, args.seed)}")
    elif args.command == "pretrain":
        flags = {"probe.images": args.probe_images, "probe.masks": args.probe_masks, "probe.split": args.probe_split}
        overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + args.overrides
        result = api.pretrain(args.data, args.out, args.teacher, args.method, args.model, args.preset,
                              overrides, args.resume, progress, args.cache, args.rebuild_cache,
                              encoder=args.encoder, interpreter=args.interpreter, init=args.init)
        if "backbone" in result.files:  # written by the first process only
            print(f"backbone: {result.files['backbone']} ({result.steps} steps, {result.seconds:.0f} s)")
        if "decoder" in result.files:
            print(f"decoder: {result.files['decoder']}")
        probed = (api.read_summary(result.run_dir) or {}).get("probe")
        if probed:
            key = "miou" if probed["first"].get("miou") is not None else "effective_rank"
            print(f"probe {key}: {probed['first'][key]} at the start -> {probed['last'][key]} at epoch "
                  f"{probed['last']['epoch']} (best at epoch {probed['best_epoch']}; {result.run_dir}/logs/probe.jsonl)")
    elif args.command == "plan":
        method = None if args.method == "none" else args.method
        if method is not None and method not in METHODS:
            raise UserError(f"--method {method}: unknown; choose one of {', '.join(METHODS.names())} or none")
        result = api.plan(args.data, args.preset, args.overrides, method, args.teacher, args.kind, args.cache,
                          args.out, args.timed_steps, progress)
        print(format_plan(result))
        if args.out:
            print(f"plan: {args.out}")
    elif args.command == "export":
        print(f"backbone: {api.export(args.run, args.out, args.format)}")
    elif args.command == "finetune":
        flags = {"data.num_classes": args.num_classes, "data.ignore_index": args.ignore_index,
                 "model.head": args.head}
        overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + args.overrides
        result = api.finetune(args.backbone, args.images, args.masks, args.out, args.split, args.preset, overrides,
                          args.resume, progress, decoder=args.decoder)
        print(f"segmenter: {result.segmenter} ({result.steps} iterations, {result.seconds:.0f} s, "
              f"backbone {result.init['backbone_init']}, decoder {result.init['decoder_init']})")
    elif args.command == "interpreter":
        flags = {"data.num_classes": args.num_classes, "data.ignore_index": args.ignore_index}
        overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + args.overrides
        result = api.train_interpreter(args.teacher, args.images, args.masks, args.out, args.split, args.preset,
                                   overrides, args.resume, progress)
        print(f"interpreter: {result.weights} ({result.steps} iterations, {result.seconds:.0f} s); "
              f"evaluate it with `dreamteacher evaluate {result.run_dir} --images DIR --masks DIR`")
    elif args.command == "evaluate":
        result = api.evaluate(args.run, args.images, args.masks, args.split, out=args.out)
        print(format_iou_table(result.per_class))
        print(f"mIoU {result.miou:.2f} | pixel accuracy {result.pixel_accuracy:.2f} | {result.images} images")
    elif args.command == "bench":
        def listed(value: str | None) -> list[str] | None:
            return [v.strip() for v in value.split(",") if v.strip()] if value else None

        seeds = [int(s) for s in listed(args.seeds)] if args.seeds else None
        result = bench(args.recipe, args.out, args.eval_images, args.eval_masks, args.data_root,
                       listed(args.rows), listed(args.fractions), seeds, progress, args.device)
        print(result.files["md"].read_text())
        print(f"results: {', '.join(str(p) for p in result.files.values())}")
    elif args.command == "bench-speed":
        results = bench_speed(args.preset, args.overrides, args.device, args.teacher, args.data, args.steps,
                              args.out, cache=not args.no_cache, progress=progress)
        print(format_speed(results))
        if args.out:
            print(f"results: {args.out}")
    elif args.command == "info":
        print(yaml.safe_dump(api.info(args.path), sort_keys=False, default_flow_style=None, width=110).rstrip())
    elif args.command in ("report", "viz"):
        out = Path(args.out) / "index.html" if args.command == "viz" else args.out
        page = write_report(args.teacher, args.data, out, student_run=args.student, num_images=args.num_images,
                            num_samples=args.num_samples,
                            png_folder=args.command == "viz")
        print(f"{args.command}: {page}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub
    try:
        run(args)
    except UserError as exc:
        print(f"dreamteacher {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Diverged as exc:
        print(f"dreamteacher {args.command}: diverged: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"dreamteacher {args.command}: interrupted; the last checkpoint is kept (continue with --resume)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
