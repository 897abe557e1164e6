"""sd3trt.runtime: the lean img2img runtime (numpy, tokenizers, Pillow and an engine backend; no torch).

The public names load on first use, so `import sd3trt.runtime.images` stays light.
"""

from __future__ import annotations

import importlib

from sd3trt.runtime import telemetry as _telemetry

_telemetry.disable_before_import()  # before anything imports onnxruntime (see telemetry.py)

_PUBLIC = {
    "Img2Img": "sd3trt.runtime.pipeline",
    "Plan": "sd3trt.runtime.plan",
    "Noise": "sd3trt.runtime.plan",
    "RequestError": "sd3trt.runtime.plan",
    "Result": "sd3trt.runtime.result",
    "Cancel": "sd3trt.runtime.cancel",
    "Cancelled": "sd3trt.runtime.cancel",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
