"""Fault injection (issue 30): kill a tiny pretraining with SIGKILL at random moments, N times in a row,
resume it each time, and check that the final backbone equals an uninterrupted run's bit for bit
and that no temporary file is left behind.

    python benchmarks/fault_injection.py [--kills 10] [--seed 0] [--work DIR]

Prints one line per kill (when it struck, the step the checkpoint held) and the verdict; exit code 1
when the backbones differ or a stray file is found.
"""

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import TINY_PRESET, tiny_unet, write_images  # noqa: E402  (the tests' tiny images and teacher)

parser = argparse.ArgumentParser()
parser.add_argument("--kills", type=int, default=10)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--epochs", type=int, default=30)
parser.add_argument("--work", type=Path)
args = parser.parse_args()

work = args.work or Path(tempfile.mkdtemp(prefix="fault-injection-"))
images = write_images(work / "images", count=16)
teacher = work / "teacher"
if not teacher.exists():
    from diffusers import DDPMPipeline

    from dreamteacher.teachers.diffusion import default_scheduler

    DDPMPipeline(unet=tiny_unet(), scheduler=default_scheduler()).save_pretrained(teacher)
settings = ["--preset", str(TINY_PRESET), "--set", f"optim.epochs={args.epochs}"]


def command(out: Path, resume: bool = False) -> list[str]:
    return [sys.executable, "-m", "dreamteacher.cli", "pretrain", "--teacher", str(teacher), "--data", str(images),
            "--out", str(out), "--no-progress", *settings, *(["--resume"] if resume else [])]


def step_of(out: Path) -> int | None:
    ckpt = out / "checkpoints" / "last.ckpt"
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] if ckpt.is_file() else None


start = time.perf_counter()
subprocess.run(command(work / "reference"), check=True, capture_output=True)
full = time.perf_counter() - start
print(f"uninterrupted run: {full:.1f} s, {step_of(work / 'reference')} steps")

rng = random.Random(args.seed)
out = work / "killed"
for kill in range(args.kills):
    process = subprocess.Popen(command(out, resume=step_of(out) is not None), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    delay = rng.uniform(0.5, full / 2)  # a resumed run starts its interpreter and imports again
    try:
        process.wait(timeout=delay)
        print(f"kill {kill + 1}: the run finished before {delay:.1f} s")
        break
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        print(f"kill {kill + 1}: SIGKILL after {delay:.1f} s, checkpoint at step {step_of(out)}")
subprocess.run(command(out, resume=step_of(out) is not None), check=True, capture_output=True)
reference, resumed = load_file(str(work / "reference" / "backbone.safetensors")), \
    load_file(str(out / "backbone.safetensors"))
same = reference.keys() == resumed.keys() and all(torch.equal(reference[k], resumed[k]) for k in reference)
strays = [p for p in out.rglob("*") if p.name.startswith(".partial-")]
print(f"final backbone {'identical to' if same else 'DIFFERENT from'} the uninterrupted run's; "
      f"{len(strays)} stray temporary files")
sys.exit(0 if same and not strays else 1)
