"""The user's path at scale, on a CPU (issue 39): how long listing takes, and whether a two-process
run streams its data with flat memory and resumes exactly, through a folder and through shards.

    python benchmarks/scale_check.py listing WORK [--count 100000]
    python benchmarks/scale_check.py ddp WORK [--count 2000] [--epochs 4]

listing: writes COUNT small PNGs (and a few other files) and times `list_sources` over them (headers
only), against opening and verifying every file (what listing did before). Run twice in a row: the
second pass has the files in the page cache (the figure for a warm file system).

ddp: COUNT small images as a folder and as 10 tar shards; for each, a dt-feat pretraining of the tests'
tiny preset on 2 gloo processes (global batch 16 = 8 per process), uninterrupted, and once more killed
(SIGKILL) in its second epoch and resumed; prints each process's peak RSS after epoch 1 and after the
last epoch, whether the resumed weights equal the uninterrupted ones, and whether the folder and shard
runs logged the same losses. Figures go to WORK/scale-check.json.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

RSS_CALLBACK = """
import json, os, resource, sys
import lightning as L
import dreamteacher.engine.trainer as engine

class PeakRss(L.Callback):  # each process's peak resident memory at the end of every epoch
    def on_train_epoch_end(self, trainer, pl_module):
        path = os.environ["RSS_LOG"] + f".rank{trainer.global_rank}"
        with open(path, "a") as f:
            f.write(json.dumps({"epoch": trainer.current_epoch, "peak_rss_mib":
                                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}) + "\\n")

real = engine.build_trainer
def build_trainer(t, run_dir, max_steps, global_batch, progress=True, callbacks=()):
    return real(t, run_dir, max_steps, global_batch, progress, [*callbacks, PeakRss()])
engine.build_trainer = build_trainer
from dreamteacher.cli import main
sys.exit(main(sys.argv[1:]))
"""


def write_pngs(folder: Path, count: int, size: int = 32, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img_{i:06d}.png"
        if not path.exists():
            base = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)
            Image.fromarray(base).resize((size, size), Image.Resampling.BILINEAR).save(path)
        paths.append(path)
    return paths


def listing(work: Path, count: int) -> dict:
    from dreamteacher.data.images import list_sources

    folder = work / "many"
    start = time.perf_counter()
    write_pngs(folder, count)
    for name in ("labels.csv", "README.txt", "notes.json"):
        (folder / name).write_text("not an image")
    written = time.perf_counter() - start
    figures = {"images": count, "write_seconds": round(written, 1), "passes": []}
    for _ in range(2):
        start = time.perf_counter()
        found = list_sources(folder)
        headers = time.perf_counter() - start
        start = time.perf_counter()
        for ref in found.images:  # what listing did before: open and verify every file
            with Image.open(ref.path) as img:
                img.verify()
        verify = time.perf_counter() - start
        figures["passes"].append({"list_sources_seconds": round(headers, 2), "open_and_verify_seconds": round(verify, 2),
                                  "found": len(found.images), "skipped": len(found.skipped)})
        print(json.dumps(figures["passes"][-1]), flush=True)
    return figures


def write_shards(paths: list[Path], out: Path, shards: int) -> str:
    out.mkdir(parents=True, exist_ok=True)
    per = (len(paths) + shards - 1) // shards
    for s in range(shards):
        with tarfile.open(out / f"{s:06d}.tar", "w") as tar:
            for path in paths[s * per:(s + 1) * per]:
                data = path.read_bytes()
                info = tarfile.TarInfo(path.name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(out / f"{{000000..{shards - 1:06d}}}.tar")


def losses(run: Path) -> list[float]:
    logs = run / "logs"
    rows = []
    for path in sorted(logs.glob("metrics.part*.csv")) + [logs / "metrics.csv"]:
        rows += [r for r in csv.DictReader(open(path)) if r.get("train/loss")]
    return [float(r["train/loss"]) for r in sorted(rows, key=lambda r: int(r["step"]))]


def ddp(work: Path, count: int, epochs: int) -> dict:
    from safetensors.torch import load_file

    from conftest import TINY_PRESET, tiny_unet

    images = work / "images"
    paths = write_pngs(images, count, size=40)
    pattern = write_shards(paths, work / "shards", 10)
    teacher = work / "teacher"
    if not teacher.exists():
        from diffusers import DDPMPipeline

        from dreamteacher.teachers.diffusion import default_scheduler

        DDPMPipeline(unet=tiny_unet(), scheduler=default_scheduler()).save_pretrained(teacher)
    settings = ["--preset", str(TINY_PRESET), "--set", "optim.batch_size=16", "--set", f"optim.epochs={epochs}",
                "--set", "trainer.devices=2", "--set", "trainer.strategy=ddp", "--set", "trainer.checkpoint_every_n_steps=20",
                "--set", "trainer.log_every_n_steps=5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps_per_epoch = count // 16
    figures: dict = {"images": count, "epochs": epochs, "global_batch": 16, "processes": 2, "runs": {}}
    for name, data in (("folder", str(images)), ("shards", pattern)):
        whole, cut = work / f"{name}-whole", work / f"{name}-cut"
        for out in (whole, cut):
            subprocess.run(["rm", "-rf", str(out)], check=True)
        log = work / f"{name}-rss"
        for old in work.glob(f"{name}-rss.rank*"):
            old.unlink()
        wrapper = work / "rss_cli.py"  # a file: Lightning starts the second process by running it again
        wrapper.write_text(RSS_CALLBACK)
        args = [sys.executable, str(wrapper), "pretrain", "--teacher", str(teacher), "--data", data,
                "--no-progress", *settings]
        start = time.perf_counter()
        done = subprocess.run([*args, "--out", str(whole)], env={**env, "RSS_LOG": str(log)}, capture_output=True,
                              text=True)
        seconds = time.perf_counter() - start
        assert done.returncode == 0, done.stderr[-3000:]
        rss = {}
        for rank_log in sorted(work.glob(f"{name}-rss.rank*")):
            records = [json.loads(line) for line in rank_log.read_text().splitlines()]
            rss[rank_log.suffix[1:]] = {"after_epoch_1": records[0]["peak_rss_mib"],
                                        f"after_epoch_{len(records)}": records[-1]["peak_rss_mib"],
                                        "growth": round(records[-1]["peak_rss_mib"] / records[0]["peak_rss_mib"] - 1, 3)}
        # killed (SIGKILL, the whole process group) once a checkpoint mid-epoch 2 is on disk, then resumed
        proc = subprocess.Popen([*args, "--out", str(cut)], env={**env, "RSS_LOG": str(work / "ignore")},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        ckpt = cut / "checkpoints" / "last.ckpt"
        target = steps_per_epoch + steps_per_epoch // 2
        while proc.poll() is None:
            if ckpt.is_file():
                import torch

                try:
                    step = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
                except Exception:  # noqa: BLE001 - caught mid-rename: look again
                    step = 0
                if step >= target:
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
            time.sleep(0.5)
        proc.wait()
        import torch

        killed_at = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
        resumed = subprocess.run([sys.executable, "-m", "dreamteacher.cli", "pretrain", "--data", data, "--out", str(cut),
                                  "--resume", "--no-progress"], env=env, capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        a, b = load_file(str(whole / "backbone.safetensors")), load_file(str(cut / "backbone.safetensors"))
        same = all(torch.equal(a[k], b[k]) for k in a)
        figures["runs"][name] = {"seconds": round(seconds, 1), "steps": epochs * steps_per_epoch,
                                 "peak_rss_mib": rss, "killed_at_step": killed_at,
                                 "resumed_weights_equal_uninterrupted": same,
                                 "losses": [round(x, 5) for x in losses(whole)]}
        print(json.dumps({k: v for k, v in figures["runs"][name].items() if k != "losses"}), flush=True)
    figures["folder_and_shard_losses_equal"] = figures["runs"]["folder"]["losses"] == figures["runs"]["shards"]["losses"]
    print("folder and shard losses equal:", figures["folder_and_shard_losses_equal"])
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["listing", "ddp"])
    parser.add_argument("work", type=Path)
    parser.add_argument("--count", type=int)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.what == "listing":
        result = listing(args.work, args.count or 100_000)
    else:
        result = ddp(args.work, args.count or 2000, args.epochs)
    from dreamteacher.core.hardware import machine_summary

    out = args.work / f"scale-check-{args.what}.json"
    out.write_text(json.dumps({"machine": machine_summary(), **result}, indent=2))
    print(f"figures: {out}")
