"""DLPack tensors that live on a CUDA device: the GPU edges of the embedding API.

A CPU tensor never comes here (numpy reads it zero-copy with np.from_dlpack). A CUDA one is described
through its DLPack capsule (pointer, shape, dtype) and copied with cuda-bindings on the caller's stream:
to_host() for an input image, copy_into() for a result written into a caller's device buffer. The
copies go through host memory, where the pipeline's numpy stages work anyway.

    GPU path: to_host and copy_into call CUDA; describe() and stream_handle() need no GPU.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from sd3trt.errors import Sd3trtError

CPU, CUDA, CUDA_HOST = 1, 2, 3  # DLDeviceType values sd3trt meets
_DTYPES = {(0, 8): "int8", (0, 16): "int16", (0, 32): "int32", (0, 64): "int64", (1, 8): "uint8",
           (2, 16): "float16", (2, 32): "float32", (2, 64): "float64"}  # (DLDataTypeCode, bits) -> numpy


class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _Device), ("ndim", ctypes.c_int32), ("dtype", _DataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class _ManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _Tensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


@dataclass
class DeviceTensor:
    """What a DLPack capsule says about a tensor; `capsule` keeps its memory alive (its destructor frees it)."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    device: tuple[int, int]  # (DLDeviceType, device id)
    capsule: object

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


def device_type(obj) -> int:
    return int(obj.__dlpack_device__()[0])


def stream_handle(stream) -> int | None:
    """A CUDA stream as an integer handle: an int, or an object with __cuda_stream__, cuda_stream (torch)
    or ptr (cupy); None stays None (CUDA's legacy default stream)."""
    if stream is None or (isinstance(stream, int) and not isinstance(stream, bool)):
        return stream
    if hasattr(stream, "__cuda_stream__"):
        return int(stream.__cuda_stream__()[1])
    for attr in ("cuda_stream", "ptr"):
        if isinstance(getattr(stream, attr, None), int):
            return int(getattr(stream, attr))
    raise Sd3trtError(f"stream must be a CUDA stream handle (int) or a stream object (torch, cupy, __cuda_stream__), "
                      f"got {type(stream).__name__}")


def describe(obj, stream: int | None = None) -> DeviceTensor:
    """The tensor behind obj.__dlpack__(): C-contiguous, of a dtype numpy has, or an Sd3trtError."""
    capsule = obj.__dlpack__() if stream is None else obj.__dlpack__(stream=stream)
    t = _ManagedTensor.from_address(_capsule_pointer(capsule, b"dltensor")).dl_tensor
    shape = tuple(int(t.shape[i]) for i in range(t.ndim))
    name = _DTYPES.get((t.dtype.code, t.dtype.bits)) if t.dtype.lanes == 1 else None
    if name is None:
        raise Sd3trtError(f"a DLPack tensor of type code {t.dtype.code}, {t.dtype.bits} bits has no numpy dtype; "
                          "pass uint8 or float16/32/64")
    if t.strides and any(shape):
        want, step = [], 1
        for n in reversed(shape):
            want.insert(0, step)
            step *= n
        got = [int(t.strides[i]) for i in range(t.ndim)]
        if any(g != w for g, w, n in zip(got, want, shape) if n > 1):
            raise Sd3trtError(f"the DLPack tensor of shape {shape} is not contiguous (strides {got}); pass a "
                              "contiguous one (e.g. .contiguous())")
    return DeviceTensor(int(t.data or 0) + int(t.byte_offset), shape, np.dtype(name),
                        (int(t.device.device_type), int(t.device.device_id)), capsule)


def mismatch(dtype, shape, results) -> str:
    have = " or ".join(f"{r.dtype} {list(r.shape)}" for r in results)
    return f"out is {dtype} {list(shape)}; this result is {have}: pass an array of one of those"


def _cudart(rt):
    if rt is not None:
        return rt
    from sd3trt.runtime.cuda import import_cudart

    return import_cudart()


def to_host(obj, stream=None, rt=None) -> np.ndarray:
    """GPU path: a copy in host memory of the CUDA tensor `obj`, read on the caller's `stream`."""
    from sd3trt.runtime.cuda import check

    cudart, handle = _cudart(rt), stream_handle(stream)
    t = describe(obj, handle)
    out = np.empty(t.shape, t.dtype)
    s = handle or 0
    check(cudart, cudart.cudaMemcpyAsync(out.ctypes.data, t.ptr, t.nbytes,
                                         cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, s), "cudaMemcpyAsync")
    check(cudart, cudart.cudaStreamSynchronize(s), "cudaStreamSynchronize")
    return out


def copy_into(out, results: tuple[np.ndarray, ...], stream=None, rt=None) -> None:
    """GPU path: write whichever of `results` matches the caller's CUDA tensor `out` (dtype and shape) into
    it on `stream`; done when this returns."""
    from sd3trt.runtime.cuda import check

    cudart, handle = _cudart(rt), stream_handle(stream)
    t = describe(out, handle)
    match = [r for r in results if r.dtype == t.dtype and r.shape == t.shape]
    if not match:
        raise Sd3trtError(mismatch(t.dtype, t.shape, results))
    src = np.ascontiguousarray(match[0])
    s = handle or 0
    check(cudart, cudart.cudaMemcpyAsync(t.ptr, src.ctypes.data, src.nbytes,
                                         cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, s), "cudaMemcpyAsync")
    check(cudart, cudart.cudaStreamSynchronize(s), "cudaStreamSynchronize")
