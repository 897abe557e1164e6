"""The few CUDA runtime calls the TensorRT runner needs, through cuda-bindings, each checked.

    gpu = find_gpu()          # ("9.0", "NVIDIA H200"), or Sd3trtError naming the fix
    cuda = Cuda(device=0)     # that GPU current, one non-blocking stream

`rt` may be passed in place of the cuda-bindings runtime module (tests use a fake one).
"""

from __future__ import annotations

import ctypes

import numpy as np

from sd3trt.errors import Sd3trtError

MIN_RUNTIME = 12000  # CUDA 12: cuda-python 11.x returns other tuples (cudaGraphInstantiate among them)


def import_cudart():
    """The cuda-bindings runtime module (cuda-python >= 12 under its older name also works)."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-bindings >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # cuda-python 12.0 - 12.5
        except ImportError:
            raise Sd3trtError(
                "the TensorRT backend needs cuda-bindings for device memory and streams; "
                "pip install cuda-bindings (13.x for CUDA 13 drivers, 12.x for CUDA 12)"
            ) from None
    check_cudart(cudart)
    return cudart


def check_cudart(cudart) -> None:
    """Refuse bindings older than CUDA 12, whose calls return differently shaped results."""
    _, version = cudart.cudaRuntimeGetVersion()
    if (version or 0) < MIN_RUNTIME:
        v = version or 0
        raise Sd3trtError(
            f"the installed cuda-python is for CUDA {v // 1000}.{v % 1000 // 10}, the TensorRT backend needs 12 or "
            "newer; pip install 'cuda-bindings>=12'"
        )


def error_name(rt, err) -> str:
    _, name = rt.cudaGetErrorName(err)
    return name.decode() if isinstance(name, bytes) else str(name)


def check(rt, result, what: str):
    """The value(s) after the error code of a cuda-bindings call; Sd3trtError when the code is not success."""
    if isinstance(result, tuple):
        err, rest = result[0], result[1:]
    else:
        err, rest = result, ()
    if int(err) != 0:
        raise Sd3trtError(f"CUDA call {what} failed ({error_name(rt, err)}); the GPU may be out of memory or in a bad state")
    return rest[0] if len(rest) == 1 else rest


def find_gpu(device: int = 0, rt=None) -> tuple[str, str]:
    """(compute capability "major.minor", name) of GPU `device`; Sd3trtError naming the fix when there is none."""
    cudart = rt or import_cudart()
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or not count:
        name = error_name(cudart, err) if int(err) else "no device"
        if int(err) == int(cudart.cudaError_t.cudaErrorInsufficientDriver):
            _, rtv = cudart.cudaRuntimeGetVersion()
            raise Sd3trtError(
                f"no usable NVIDIA driver here (CUDA: {name}; the CUDA {rtv // 1000}.{rtv % 1000 // 10} "
                "runtime needs a newer or any driver); install the NVIDIA driver or use --backend onnxruntime"
            )
        raise Sd3trtError(f"no NVIDIA GPU is available (CUDA: {name}); use --backend onnxruntime on this machine")
    if device >= count:
        raise Sd3trtError(f"GPU {device} does not exist (this machine has {count}); pick another device")
    props = check(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    raw = props.name
    name = (raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)).split("\x00")[0]
    return f"{props.major}.{props.minor}", name


class Cuda:
    """One GPU made current, one non-blocking stream, and checked allocation and copy calls."""

    def __init__(self, device: int = 0, rt=None):
        self.rt = cudart = rt or import_cudart()
        self.stream = None
        self.device = device
        self.cc, self.name = find_gpu(device, cudart)
        self.check(cudart.cudaSetDevice(device), "cudaSetDevice")
        self.stream = self.check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreate")

    def check(self, result, what: str):
        return check(self.rt, result, what)

    def make_current(self) -> None:
        """CUDA's current device is per thread: a thread other than the constructing one sets it first."""
        self.check(self.rt.cudaSetDevice(self.device), "cudaSetDevice")

    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMalloc(max(nbytes, 256)), f"cudaMalloc({nbytes})"))

    def malloc_host(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMallocHost(max(nbytes, 256)), f"cudaMallocHost({nbytes})"))

    def h2d(self, dst: int, src: int, nbytes: int) -> None:
        self.check(self.rt.cudaMemcpyAsync(dst, src, nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream), "cudaMemcpyAsync")

    def d2h(self, dst: int, src: int, nbytes: int) -> None:
        self.check(self.rt.cudaMemcpyAsync(dst, src, nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream), "cudaMemcpyAsync")

    def sync(self) -> None:
        self.check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def free(self, ptr: int, host: bool = False) -> None:
        if ptr:
            (self.rt.cudaFreeHost if host else self.rt.cudaFree)(ptr)

    def close(self) -> None:
        if self.stream is not None:
            self.rt.cudaStreamDestroy(self.stream)
            self.stream = None


def pinned_view(ptr: int, nbytes: int) -> np.ndarray:
    """A uint8 numpy view of `nbytes` of pinned host memory at `ptr`."""
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_uint8)), shape=(nbytes,))
