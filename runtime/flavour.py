"""Which TensorRT is installed: full `tensorrt` or `tensorrt_rtx`, behind one small interface.

Standard library only, so both the engine builder and the runtime (`sd3trt.runtime.trt_runner`) can
import it. The code elsewhere uses only the API the two flavours share; where they differ (target
compute capability and runtime cache: RTX only; timing cache: full TensorRT only; GPUs: RTX has no
datacenter Hopper/Blackwell target), `Flavour` says so, and gpu_mismatch names the fix.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

from sd3trt.errors import Sd3trtError

FLAVOURS = ("tensorrt", "tensorrt_rtx")
# pip package that provides each module (the CUDA 13 wheels; -cu12 variants exist for CUDA 12 drivers)
PIP_NAMES = {"tensorrt": "tensorrt-cu13", "tensorrt_rtx": "tensorrt-rtx-cu13"}
ENV = "SD3TRT_TRT_FLAVOUR"


@dataclass(frozen=True)
class Flavour:
    name: str  # "tensorrt" | "tensorrt_rtx"
    trt: object  # the imported module
    version: str

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt_rtx"

    @property
    def short(self) -> str:
        return "rtx" if self.is_rtx else "trt"

    @property
    def has_runtime_cache(self) -> bool:
        return hasattr(self.trt, "IRuntimeCache") and hasattr(self.trt.ICudaEngine, "create_runtime_config")

    @property
    def has_timing_cache(self) -> bool:
        # TensorRT-RTX keeps the API but documents timing-cache calls as no-ops (deprecated in RTX 1.2).
        return not self.is_rtx

    @property
    def can_target_compute_capability(self) -> bool:
        return hasattr(self.trt, "ComputeCapability") and hasattr(self.trt.IBuilderConfig, "set_compute_capability")

    def supports_gpu(self, cc: str) -> bool:
        """Whether engines of this flavour can run on a GPU of compute capability `cc` ("9.0"). TensorRT-RTX
        lists its architectures (no datacenter Hopper/Blackwell); full TensorRT builds for the GPU it runs on."""
        if not self.is_rtx:
            return True
        return "SM" + cc.replace(".", "") in self.trt.ComputeCapability.__members__

    def rebuild_hint(self, cc: str) -> str:
        """The build command that makes engines for a GPU of compute capability `cc` with this flavour."""
        if self.can_target_compute_capability:
            return f"`sd3trt build --force --compute-capability {cc}`"
        return "`sd3trt build --force` on this GPU"


def gpu_mismatch(fl: Flavour, cc: str, gpu: str) -> str | None:
    """None when `fl` can run engines on this GPU, else the sentence that says so and names the fix."""
    if fl.supports_gpu(cc):
        return None
    known = ", ".join(f"{m[2:-1]}.{m[-1]}" for m in fl.trt.ComputeCapability.__members__ if m.startswith("SM"))
    return (
        f"{fl.name} {fl.version} cannot run engines on this {gpu} (compute capability {cc}; it supports {known}); "
        f"install full TensorRT for datacenter GPUs (pip install {PIP_NAMES['tensorrt']}) and build with "
        "`sd3trt build --flavour tensorrt`"
    )


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None
    except Exception as e:  # a broken install (missing shared library) raises OSError & co.
        raise Sd3trtError(
            f"`import {name}` failed ({str(e).splitlines()[0]}); reinstall it with pip install {PIP_NAMES[name]}"
        ) from None


def load_flavour(name: str | None = None) -> Flavour:
    """`name` None or "auto": $SD3TRT_TRT_FLAVOUR, else full TensorRT if installed, else TensorRT-RTX."""
    name = name or os.environ.get(ENV) or "auto"
    if name not in FLAVOURS + ("auto",):
        raise Sd3trtError(f"unknown TensorRT flavour {name!r}; use auto, {' or '.join(FLAVOURS)}")
    for candidate in FLAVOURS if name == "auto" else (name,):
        mod = _import(candidate)
        if mod is not None:
            return Flavour(candidate, mod, str(getattr(mod, "__version__", "unknown")))
    if name == "auto":
        raise Sd3trtError(
            "no TensorRT is installed; pip install tensorrt-rtx-cu13 (or the full tensorrt-cu13 on a GPU machine)"
        )
    raise Sd3trtError(f"{name} is not installed; pip install {PIP_NAMES[name]}")
