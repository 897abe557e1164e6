"""What machine a result was measured on: CPU model and ISA flags, cores, memory, GPU, library versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path

from sd3trt.cpu import cpu_kind, cpuinfo

# ISA features that decide matmul speed per precision (shown first; the full flag list is kept too).
KEY_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "amx_fp16")
LIBRARIES = ("sd3trt", "numpy", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino",
             "tokenizers", "pillow", "tensorrt", "tensorrt-rtx", "matplotlib")


def _lscpu() -> dict:
    if not shutil.which("lscpu"):
        return {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    d = {}
    for line in out.splitlines():
        if ":" in line:
            k, v = (s.strip() for s in line.split(":", 1))
            d[k] = v
    keep = ("Vendor ID", "Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)",
            "L2 cache", "L3 cache", "Hypervisor vendor", "CPU max MHz")
    return {k: d[k] for k in keep if k in d}


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _gpus() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return []
    return [l.strip() for l in out.stdout.splitlines() if l.strip()] if out.returncode == 0 else []


def versions() -> dict:
    out = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def describe() -> dict:
    cpu = cpuinfo()
    flags = cpu.get("flags", [])
    return {
        "platform": platform.platform(),
        "cpu": {
            "model": cpu.get("model", platform.processor() or "unknown"),
            "family": cpu.get("family"),
            "model_number": cpu.get("model_number"),
            "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "key_flags": [f for f in KEY_FLAGS if f in flags],
            "flags": flags,
            "lscpu": _lscpu(),
        },
        "memory_gib": _mem_total_gib(),
        "gpus": _gpus(),
        "versions": versions(),
    }


def slug(desc: dict) -> str:
    """Folder name for results: CPU model, usable cores, widest ISA (and the GPU, when there is one)."""
    model = desc["cpu"]["model"].lower()
    model = re.sub(r"\(r\)|\(tm\)|cpu|processor|\d+-core|@.*$", " ", model)
    model = re.sub(r"[^a-z0-9]+", "-", model).strip("-") or "cpu"
    parts = [model, f"{desc['cpu']['usable_cpus']}c", cpu_kind(desc["cpu"]["flags"])]
    if desc["gpus"]:
        gpu = re.sub(r"[^a-z0-9]+", "-", desc["gpus"][0].split(",")[0].lower()).strip("-")
        parts.append(gpu)
    return "-".join(parts)
