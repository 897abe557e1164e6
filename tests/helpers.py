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
