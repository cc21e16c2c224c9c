"""What the machine is: its CPU (model and the flags that decide bf16), its GPUs, and the precision
`auto` chooses on it. Results are bit-identical per CPU kind only, so tables name the CPU too."""

from __future__ import annotations

import functools
import platform
import sys
from pathlib import Path

import torch

# CPU flags (Linux /proc/cpuinfo) of native bf16 arithmetic: without them oneDNN emulates bf16,
# about 20x slower than fp32 (the camvid-cpu teacher on an AMD EPYC without avx512_bf16: 21 s a step
# against 1.0 s in fp32)
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_info() -> dict[str, str | list[str]]:
    """{"model": the CPU's name, "flags": its feature flags} (flags empty where /proc/cpuinfo is absent)."""
    model, flags = platform.processor() or platform.machine(), []
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = value.split()
    return {"model": model, "flags": flags}


def cpu_bf16_flag() -> str | None:
    """The flag that says this CPU runs bf16 natively, or None."""
    flags = set(cpu_info()["flags"])
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in flags), None)


def machine_summary() -> dict:
    """The machine in a results table: CPU model and bf16 support, core count, GPU, torch, Python."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_info()["model"], "cpu_bf16": cpu_bf16_flag() or "emulated", "cpus": torch.get_num_threads(),
            "cuda": gpu, "torch": torch.__version__, "python": platform.python_version()}


def uses_gpu(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def resolve_precision(precision: str, accelerator: str) -> tuple[str, str]:
    """(the Lightning precision to run, why): `auto` is bf16-mixed where the hardware runs bf16
    natively (GPUs of compute capability 8.0 and up; CPUs with avx512_bf16 or AMX), 32-true elsewhere.
    Any other value is kept as given."""
    if precision != "auto":
        return precision, "as set"
    if uses_gpu(accelerator):
        major, minor = torch.cuda.get_device_capability(0)
        name = torch.cuda.get_device_name(0)
        if (major, minor) >= (8, 0):
            return "bf16-mixed", f"{name}, compute capability {major}.{minor}, runs bf16 natively"
        return "32-true", f"{name}, compute capability {major}.{minor}: no native bf16"
    if accelerator not in ("auto", "cpu"):
        return "32-true", f"accelerator {accelerator}"
    flag = cpu_bf16_flag()
    if flag:
        return "bf16-mixed", f"CPU {cpu_info()['model']} has {flag}"
    return "32-true", f"CPU {cpu_info()['model']} has no avx512_bf16 or AMX: bf16 would be emulated, ~20x slower"


def say(line: str) -> None:
    """One line to the user on stderr (progress bars go there too; stdout carries results)."""
    print(line, file=sys.stderr, flush=True)
