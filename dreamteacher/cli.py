"""`dreamteacher` command line: a thin layer over `dreamteacher.api`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from dreamteacher.errors import UserError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    from dreamteacher.config import available_presets

    p.add_argument("--preset", help=f"named preset: {', '.join(available_presets())}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. --set optim.epochs=10 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue RUN from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs are still written)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamteacher", description=(
        "Pretrain image backbones for dense prediction by distilling generative models."))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-teacher", help="train a DDPM teacher on an unlabeled image folder")
    p.add_argument("--data", required=True, help="folder of unlabeled images")
    p.add_argument("--out", required=True, help="run folder to create")
    _add_config_args(p)

    p = sub.add_parser("sample", help="write a PNG grid of teacher samples")
    p.add_argument("run", help="train-teacher run, diffusers folder or ADM .pt")
    p.add_argument("--out", help="PNG path (default RUN/samples.png)")
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("pretrain", help="distill a teacher into a timm student backbone")
    p.add_argument("--method", default="dt-feat", choices=["dt-feat"])
    p.add_argument("--teacher", help="train-teacher run, diffusers DDPM/UNet2DModel folder, or ADM .pt")
    p.add_argument("--data", required=True, help="folder of unlabeled images")
    p.add_argument("--out", required=True, help="run folder to create")
    p.add_argument("--model", help="timm backbone name (same as --set student.backbone=NAME)")
    _add_config_args(p)

    p = sub.add_parser("export", help="write the backbone alone (timm keys, safetensors)")
    p.add_argument("run", help="pretrain run folder or its checkpoint")
    p.add_argument("--out", help="output .safetensors (default RUN/backbone.safetensors)")

    p = sub.add_parser("report", help="HTML report: teacher samples, teacher and student feature maps")
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", help="pretrain run folder")
    p.add_argument("--data", required=True, help="folder of images to show")
    p.add_argument("--out", required=True, help="report .html path")
    return parser


def run(args: argparse.Namespace) -> None:
    from dreamteacher import api

    progress = not getattr(args, "no_progress", False)
    if args.command == "train-teacher":
        result = api.train_teacher(args.data, args.out, args.preset, args.overrides, args.resume, progress)
        print(f"teacher: {result.files['teacher']} ({result.steps} steps, {result.seconds:.0f} s)")
    elif args.command == "sample":
        print(f"samples: {api.sample(args.run, args.out, args.num, args.steps, args.seed)}")
    elif args.command == "pretrain":
        result = api.pretrain(args.data, args.out, args.teacher, args.method, args.model, args.preset,
                              args.overrides, args.resume, progress)
        print(f"backbone: {result.files.get('backbone')} ({result.steps} steps, {result.seconds:.0f} s)")
    elif args.command == "export":
        print(f"backbone: {api.export(args.run, args.out)}")
    elif args.command == "report":
        from dreamteacher.viz.report import write_report

        print(f"report: {write_report(args.teacher, args.data, args.out, student_run=args.student)}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub
    try:
        run(args)
    except UserError as exc:
        print(f"dreamteacher {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dreamteacher {args.command}: interrupted; the last checkpoint is kept (continue with --resume)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
