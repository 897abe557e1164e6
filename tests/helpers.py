"""Small helpers shared by the test modules (imported as `from helpers import ...`, like needs.py)."""

from __future__ import annotations


def quiet(_msg: str) -> None:
    """A `log=` callback that prints nothing: the exporters, builders and quantizers report progress through it."""


def wait_until(cond, timeout: float = 60.0, what: str = "a condition", every: float = 0.1):
    """cond()'s first truthy value, polled every `every` s; an AssertionError naming `what` after `timeout` s."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def stage(label: str, fn):
    """(fn()'s result, seconds, peak RSS in GiB while it ran), printed as `label: N s, peak RSS X GiB` (the
    opt-in full-size tests' figures)."""
    import time

    from sd3trt.memory import peak_rss_mib, reset_peak_rss

    reset_peak_rss()
    t0 = time.perf_counter()
    out = fn()
    seconds, peak = time.perf_counter() - t0, peak_rss_mib() / 1024
    print(f"\n{label}: {seconds:.0f} s, peak RSS {peak:.1f} GiB")
    return out, seconds, peak


def restore_env(saved: dict) -> None:
    """Put back the environment variables `saved` ({name: value, None when it was unset})."""
    import os

    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
