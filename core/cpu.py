"""Which kind of CPU this is, from its ISA flags: the name benchmark results are filed under
(benchmarks/results/<model>-<cores>c-<kind>/) and what `--backend auto` chooses by (runtime/auto_backend.py).

    cpu_kind()                           # "avx512bf16" here, "avx2" on an AVX2-only machine
    cpu_kind(["sse4_2", "avx", "avx2"])  # "avx2"
"""

from __future__ import annotations

import platform
from pathlib import Path


def cpuinfo() -> dict:
    """Model name, family, model number, MHz and flags of the first CPU in /proc/cpuinfo ({} where there is none)."""
    info: dict = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    keys = {"model name": "model", "flags": "flags", "cpu family": "family", "model": "model_number", "cpu MHz": "mhz"}
    for line in text.splitlines():
        if ":" not in line:
            continue
        k, v = (s.strip() for s in line.split(":", 1))
        if k in keys and keys[k] not in info:
            info[keys[k]] = v.split() if k == "flags" else float(v) if k == "cpu MHz" else v
    return info


def cpu_kind(flags: list[str] | None = None) -> str:
    """The widest ISA that decides matmul speed per precision: amx, avx512bf16, avx512, avx2, x86 (or the
    machine's architecture where /proc/cpuinfo lists no flags). `flags`: this CPU's when None."""
    flags = cpuinfo().get("flags", []) if flags is None else flags
    if "amx_bf16" in flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512bf16"
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "x86" if flags else platform.machine()
