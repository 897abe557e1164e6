"""Which GPUs an engine build targets: compute-capability names, the flavour's targets, and which targets
can run INT8/FP8 GEMMs."""

from __future__ import annotations

import re

from sd3trt.errors import Sd3trtError
from sd3trt.runtime.flavour import Flavour, gpu_mismatch

# Smallest compute capability whose GEMMs take each quantized precision (TensorRT-RTX support matrix:
# FP8 GEMMs from Ada, 8.9; INT8 Q/DQ engines build for every target, Turing 7.5 included).
MIN_CC = {"fp8": (8, 9), "int8": (7, 5)}
ARCH = {(7, 5): "Turing", (8, 0): "Ampere", (8, 6): "Ampere", (8, 7): "Ampere", (8, 9): "Ada", (9, 0): "Hopper",
        (10, 0): "Blackwell", (12, 0): "Blackwell", (12, 1): "Blackwell"}
PORTABLE_RTX = ("8.6", "8.9", "12.0")  # TensorRT-RTX's default targets when none is named


def parse_cc(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(?:sm_?)?(\d+)[._]?(\d)\s*", str(text).lower())
    if not m:
        raise Sd3trtError(f"compute capability {text!r} is not MAJOR.MINOR, e.g. 8.9")
    return int(m.group(1)), int(m.group(2))


def check_target(precision: str, compute_capabilities) -> None:
    """Sd3trtError when a named target cannot run `precision` GEMMs (FP8 before 8.9)."""
    need = MIN_CC[precision]
    for cc in compute_capabilities:
        got = parse_cc(cc)
        if got < need:
            arch = ARCH.get(got, f"SM {got[0]}.{got[1]}")
            if precision == "fp8":
                raise Sd3trtError(
                    f"FP8 needs compute capability 8.9 or newer (Ada, Hopper, Blackwell) and target {cc} is {arch}; "
                    "build --precision int8 for it, or name an FP8-capable target such as --compute-capability 8.9"
                )
            raise Sd3trtError(
                f"{precision.upper()} engines need compute capability {need[0]}.{need[1]} or newer and target {cc} is "
                f"{arch}; build fp16 engines for it instead"
            )


def built_for(fl: Flavour, target: dict) -> tuple[str, ...]:
    """The compute capabilities an engine built for `target` runs on (TensorRT-RTX's portable set when none
    is named)."""
    ccs = tuple(target["compute_capabilities"])
    return ccs or (PORTABLE_RTX if fl.is_rtx else ())


def current_gpu() -> tuple[str, str] | None:
    """("major.minor", name) of GPU 0 via cuda-bindings, or None when there is no usable GPU."""
    from sd3trt.runtime.cuda import find_gpu

    try:
        return find_gpu(0)
    except Sd3trtError:
        return None


def resolve_targets(fl: Flavour, wanted: tuple[str, ...]) -> tuple[list, dict]:
    """Builder compute-capability enums and the metadata's description of the target."""
    trt = fl.trt
    if not fl.can_target_compute_capability:
        if wanted:
            raise Sd3trtError(
                f"{fl.name} builds for the GPU it runs on; drop --compute-capability (ahead-of-time targets "
                "need tensorrt_rtx)"
            )
        gpu = current_gpu()
        if gpu is None:
            raise Sd3trtError(f"{fl.name} needs an NVIDIA GPU to build engines; build on the target GPU or use --flavour tensorrt_rtx")
        return [], {"compute_capabilities": [gpu[0]], "mode": "build-gpu"}
    if not wanted:
        return [], {"compute_capabilities": [], "mode": "portable-default"}
    enums, names = [], []
    available = [m for m in trt.ComputeCapability.__members__ if m.startswith("SM")]
    for w in wanted:
        if w.lower() == "current":
            gpu = current_gpu()
            if gpu is None:
                raise Sd3trtError("--compute-capability current needs a GPU here; name the target instead, e.g. 8.9")
            problem = gpu_mismatch(fl, *gpu)
            if problem:
                raise Sd3trtError(problem)
            if len(wanted) > 1:
                raise Sd3trtError("--compute-capability current cannot be combined with other targets")
            enums.append(trt.ComputeCapability.CURRENT)
            names.append(gpu[0])
            continue
        key = "SM" + re.sub(r"^sm|[._\s]", "", w.strip().lower())
        if key not in available:
            shown = ", ".join(f"{a[2:-1]}.{a[-1]}" for a in available)
            raise Sd3trtError(f"{fl.name} {fl.version} cannot target compute capability {w!r}; use one of {shown}")
        enums.append(getattr(trt.ComputeCapability, key))
        names.append(f"{key[2:-1]}.{key[-1]}")
    return enums, {"compute_capabilities": names, "mode": "aot"}


def default_build_name(precision: str, fl: Flavour, target: dict) -> str:
    ccs = target["compute_capabilities"]
    tag = "_".join("sm" + c.replace(".", "") for c in ccs) if ccs else "portable"
    return f"{precision}-{fl.short}-{tag}"
