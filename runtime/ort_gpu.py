"""ONNX Runtime on the GPU: the execution providers to ask for, and a check that the session got them.

ONNX Runtime falls back quietly: its Python layer retries a session on the next provider when the
first throws (OrtRunner turns that off), and a CUDA provider whose libraries (cuBLAS, cuDNN, TensorRT)
do not load only logs a warning and leaves the session on the CPU. `get_available_providers()` lists
what the wheel was compiled with, not what loaded; `session.get_providers()` says what the session
really uses, so check_session_providers compares that with the request.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

from sd3trt.errors import Sd3trtError
from sd3trt.runtime.caches import bundle_key, writable_dir

CPU = "CPUExecutionProvider"
# ONNX Runtime's shared library for each GPU provider: onnxruntime/capi/<prefix>onnxruntime_providers_<x><suffix>
PROVIDER_LIBS = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "tensorrt"}


def ort_gpu_providers(kind: str, bundle=None, fp16: bool | None = None) -> list:
    """Execution providers for OrtRunner on a GPU: kind "cuda" or "tensorrt" (which hands the nodes
    TensorRT cannot take to CUDA, then CPU). The TensorRT provider caches its engines and timing data
    under <bundle>/engines/ort-trt/, or under $SD3TRT_CACHE_DIR when the bundle is read-only."""
    if kind == "cuda":
        return [("CUDAExecutionProvider", {"device_id": 0}), CPU]
    if kind != "tensorrt":
        raise Sd3trtError(f"unknown ONNX Runtime GPU provider {kind!r}; use cuda or tensorrt")
    opts = {"device_id": 0, "trt_fp16_enable": bool(fp16) if fp16 is not None else bool(bundle and bundle.dtype == "fp16")}
    if bundle is not None:
        # ONNX Runtime creates this directory without its parents and throws when it cannot.
        cache = str(writable_dir(Path(bundle.root) / "engines" / "ort-trt", f"ort-trt-{bundle_key(bundle.root)}"))
        opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=cache, trt_timing_cache_enable=True,
                    trt_timing_cache_path=cache)
    return [("TensorrtExecutionProvider", opts), ("CUDAExecutionProvider", {"device_id": 0}), CPU]


def provider_name(p) -> str:
    return p if isinstance(p, str) else p[0]


def check_session_providers(session, requested: list, component: str) -> None:
    """Refuse a session whose first provider is not the first one asked for, naming what failed to load."""
    want = provider_name(requested[0])
    got = session.get_providers()
    if want == CPU or (got and got[0] == want):
        return
    raise Sd3trtError(
        f"{component}: ONNX Runtime could not start its {want} (the session would run on {got[0] if got else 'nothing'}): "
        f"{provider_load_error(want)}; install what is missing or use --backend onnxruntime"
    )


def provider_load_error(provider: str, capi: Path | None = None) -> str:
    """Why the provider's shared library does not load, from the dynamic loader (it names the missing library)."""
    short = PROVIDER_LIBS.get(provider)
    if short is None:
        return f"{provider} is not a provider sd3trt uses"
    if capi is None:
        import onnxruntime

        capi = Path(onnxruntime.__file__).parent / "capi"
    prefix, suffix = ("", ".dll") if sys.platform == "win32" else ("lib", ".so")
    lib = capi / f"{prefix}onnxruntime_providers_{short}{suffix}"
    if not lib.is_file():
        return f"this onnxruntime has no {lib.name} (pip install onnxruntime-gpu in place of onnxruntime)"
    try:
        shared = capi / f"{prefix}onnxruntime_providers_shared{suffix}"
        if shared.is_file():
            ctypes.CDLL(str(shared), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(lib))
    except OSError as e:
        return f"{lib.name} does not load ({e})"
    return f"{lib.name} loads, so the provider failed later (set log_severity_level 1 to see ONNX Runtime's reason)"
