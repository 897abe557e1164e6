"""Stand-ins for cuda-bindings' runtime module and a TensorRT execution context, for CPU tests of the
CUDA-side logic (GPU discovery, CUDA-graph capture). They record calls and hold CUDA's rules that the
code must respect: no stream sync while capturing, graphs launched only while instantiated."""

from __future__ import annotations

import enum
from types import SimpleNamespace


class Err(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901


class FakeCudart:
    cudaError_t = Err
    cudaStreamNonBlocking = 1
    cudaStreamCaptureMode = SimpleNamespace(cudaStreamCaptureModeThreadLocal=2)
    STREAM = 7

    def __init__(self, cc=(8, 9), name="NVIDIA GeForce RTX 4090", devices=1, count_error=Err.cudaSuccess,
                 runtime=13000):
        self.cc, self.name, self.devices, self.count_error, self.runtime = cc, name, devices, count_error, runtime
        self.calls: list[tuple] = []
        self.capturing = False
        self.end_capture_error = Err.cudaSuccess  # what cudaStreamEndCapture reports
        self.live_execs: set[int] = set()
        self._next = 100

    def _new(self) -> int:
        self._next += 1
        return self._next

    # discovery
    def cudaRuntimeGetVersion(self):
        return Err.cudaSuccess, self.runtime

    def cudaGetDeviceCount(self):
        if self.count_error:
            return self.count_error, None
        return Err.cudaSuccess, self.devices

    def cudaGetErrorName(self, err):
        return Err.cudaSuccess, Err(int(err)).name.encode()

    def cudaGetDeviceProperties(self, device):
        return Err.cudaSuccess, SimpleNamespace(major=self.cc[0], minor=self.cc[1], name=self.name.encode() + b"\0\0\0")

    def cudaSetDevice(self, device):
        return Err.cudaSuccess

    # streams
    def cudaStreamCreateWithFlags(self, flags):
        return Err.cudaSuccess, self.STREAM

    def cudaStreamDestroy(self, stream):
        self.calls.append(("stream_destroy",))
        return Err.cudaSuccess

    def cudaStreamSynchronize(self, stream):
        assert not self.capturing, "cudaStreamSynchronize on a capturing stream"
        return Err.cudaSuccess

    def cudaGetLastError(self):
        self.calls.append(("get_last_error",))
        return Err.cudaSuccess

    # graphs
    def cudaStreamBeginCapture(self, stream, mode):
        assert not self.capturing, "capture begun twice"
        self.capturing = True
        self.calls.append(("begin",))
        return Err.cudaSuccess

    def cudaStreamEndCapture(self, stream):
        assert self.capturing, "capture ended without a begin"
        self.capturing = False
        self.calls.append(("end",))
        if self.end_capture_error:
            return self.end_capture_error, None
        return Err.cudaSuccess, self._new()

    def cudaGraphInstantiate(self, graph, flags):
        exe = self._new()
        self.live_execs.add(exe)
        self.calls.append(("instantiate", exe))
        return Err.cudaSuccess, exe

    def cudaGraphDestroy(self, graph):
        return Err.cudaSuccess

    def cudaGraphLaunch(self, exe, stream):
        assert exe in self.live_execs, "launch of a destroyed graph"
        self.calls.append(("launch", exe))
        return Err.cudaSuccess

    def cudaGraphExecDestroy(self, exe):
        self.live_execs.remove(exe)
        self.calls.append(("exec_destroy", exe))
        return Err.cudaSuccess


class FakeContext:
    """An execution context whose enqueue is recorded with the shapes set and whether the stream captures."""

    def __init__(self, rt: FakeCudart, capturable: bool = True, fail_in_capture: BaseException | None = None):
        self.rt, self.capturable, self.fail_in_capture = rt, capturable, fail_in_capture
        self.shapes = None

    def is_stream_capturable(self, stream) -> bool:
        return self.capturable

    def enqueue(self) -> None:
        if self.rt.capturing and self.fail_in_capture is not None:
            raise self.fail_in_capture
        self.rt.calls.append(("enqueue", self.shapes, "captured" if self.rt.capturing else "run"))
