"""This process's peak resident set, and a reset of it so that one stage's peak can be read on its own."""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def proc_status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float | None:
    """Peak resident set: VmHWM (per address space, so it starts afresh at exec; `reset_peak_rss` lowers it).

    ru_maxrss is the fallback only: Linux carries it across fork and execve, so a worker would report at
    least the RSS its parent had when it forked.
    """
    hwm = proc_status_mib("VmHWM")
    if hwm is not None:
        return hwm
    return ru_maxrss_mib()


def ru_maxrss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if sys.platform != "darwin" else r / 2**20


def reset_peak_rss() -> bool:
    """Set VmHWM to the current RSS (Linux >= 4.0: writing 5 to /proc/self/clear_refs); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def available_mib() -> float | None:
    """Memory a new allocation can have now: MemAvailable (plus free swap) from /proc/meminfo; None elsewhere."""
    try:
        info = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()}
    except (OSError, ValueError, IndexError):
        return None
    return (info.get("MemAvailable", 0) + info.get("SwapFree", 0)) / 1024
