"""`need(module)`: a module the scale-out tests use. Without it they skip, except in CI (CI set), which installs
the scale extra: there a missing module is a failure, never a skip."""

from __future__ import annotations

import importlib
import os

import pytest


def need(module: str):
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)
