"""Small helpers shared by the test modules (imported as `from helpers import ...`, like needs.py)."""

from __future__ import annotations


def quiet(_msg: str) -> None:
    """A `log=` callback that prints nothing: the exporters, builders and quantizers report progress through it."""
