"""Where calibration runs: the img2img runs it records and the tapped graphs it measures ranges on.

    backend = choose("auto", bundle, threads=2)   # cuda, else openvino, else onnxruntime
    run = backend.open(model_proto, base_dir, ["t0_amax", ...])   # tapped graph -> callable(feeds) -> arrays
    runner = backend.runner("transformer", entry, path)            # for the recorded img2img runs

  cuda         onnxruntime-gpu's CUDA execution provider, the bundle's own type (fp32 / fp16); chosen by
               auto when the provider is compiled in and a GPU answers;
  openvino     OpenVINO's CPU plugin, in bf16 where the CPU computes it natively (AVX512_BF16 or AMX),
               else fp32; chosen by auto when OpenVINO is installed;
  onnxruntime  ONNX Runtime's CPU provider in the bundle's type.

Every backend measures the same tensors and the ranges file has one format (calibrate.RangesFile), so
the quantizer does not care which one ran; the file records which did. A tapped graph is saved beside
the source graph (so its external weights resolve) for as long as the backend takes to load it.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sd3trt.errors import Sd3trtError

NAMES = ("auto", "cuda", "openvino", "onnxruntime")


def _gpu_answers() -> bool:
    """onnxruntime-gpu's CUDA provider is compiled in and cuda-bindings sees a GPU."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        from sd3trt.runtime.cuda import find_gpu

        find_gpu(0)
    except (Sd3trtError, ImportError):
        return False
    return True


def _openvino_installed() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Timer:
    """Seconds per call of everything one backend ran, by purpose ("record", "ranges", ...)."""

    seconds: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)

    def add(self, what: str, since: float) -> None:
        self.seconds[what] = self.seconds.get(what, 0.0) + time.perf_counter() - since
        self.calls[what] = self.calls.get(what, 0) + 1

    def per_call(self) -> dict:
        return {k: round(self.seconds[k] / self.calls[k], 3) for k in self.seconds if self.calls[k]}


@dataclass
class Backend:
    name: str  # "cuda" | "openvino" | "onnxruntime"
    precision: str  # what it computes in: "fp32", "fp16" or "bf16"
    threads: int = 0
    timer: Timer = field(default_factory=Timer)

    def describe(self) -> str:
        return f"{self.name} ({self.precision})"

    def providers(self) -> list:
        from sd3trt.runtime.ort_gpu import ort_gpu_providers

        return ort_gpu_providers("cuda") if self.name == "cuda" else ["CPUExecutionProvider"]

    def open(self, model, base_dir: Path, outputs: list[str], what: str = "ranges"):
        """`model` (an onnx.ModelProto, maybe with external weights under base_dir) as a callable
        feeds -> list of `outputs` arrays; each call is timed under `what`."""
        import onnx

        fd, tmp = tempfile.mkstemp(dir=base_dir, prefix=".calib-", suffix=".onnx")
        os.close(fd)
        try:
            onnx.save_model(model, tmp)
            call = self._open_file(Path(tmp), outputs)
        finally:
            Path(tmp).unlink(missing_ok=True)

        def run(feeds: dict) -> list[np.ndarray]:
            t0 = time.perf_counter()
            out = call(feeds)
            self.timer.add(what, t0)
            return out

        return run

    def _open_file(self, path: Path, outputs: list[str]):
        if self.name == "openvino":
            from sd3trt.runtime.ov_runner import HINTS, core

            config = {"INFERENCE_PRECISION_HINT": HINTS[self.precision], "PERFORMANCE_HINT": "LATENCY",
                      "NUM_STREAMS": 1, **({"INFERENCE_NUM_THREADS": self.threads} if self.threads else {})}
            compiled = core().compile_model(core().read_model(str(path)), "CPU", config)
            request = compiled.create_infer_request()
            ports = [compiled.output(n) for n in outputs]

            def infer(feeds):
                res = request.infer(feeds)
                return [np.array(res[p]) for p in ports]

            return infer
        from sd3trt.runtime.ort_gpu import check_session_providers
        from sd3trt.runtime.ort_session import ort_session

        providers = self.providers()
        session = ort_session(path, self.threads, providers)
        check_session_providers(session, providers, "calibration")
        return lambda feeds: session.run(outputs, feeds)

    def runner(self, name: str, entry: dict, path: Path, blocks: bool = False):
        """The runner of one bundle component for the recorded img2img runs; blocks: the transformer and T5
        one block at a time (calib_blocks.PartsRunner)."""
        from sd3trt.engines.calib_blocks import PARTED, PartsRunner

        if blocks and name in PARTED:
            return PartsRunner(name, entry, path, self)
        if self.name == "openvino":
            from sd3trt.runtime.ov_runner import OvRunner

            return OvRunner(name, entry, path, precision=self.precision, threads=self.threads)
        from sd3trt.runtime.runners import OrtRunner

        return OrtRunner(name, entry, path, providers=self.providers(), threads=self.threads)


def choose(asked: str, bundle, threads: int = 0) -> Backend:
    """The backend for `--calib-backend asked`; refuses, in one sentence, one that cannot run this bundle here."""
    if asked not in NAMES:
        raise Sd3trtError(f"unknown calibration backend {asked!r}; use {', '.join(NAMES)}")
    dtype = bundle.dtype
    if dtype == "bf16":
        raise Sd3trtError("a bf16 bundle cannot be calibrated yet: the tapped graphs and the accuracy gate run on "
                          "ONNX Runtime, which has no bf16 kernels on the CPU; re-export with --dtype fp16 (or fp32) "
                          "to quantize")
    if asked == "auto":
        asked = "cuda" if _gpu_answers() else "openvino" if _openvino_installed() else "onnxruntime"
    if asked == "cuda":
        if not _gpu_answers():
            raise Sd3trtError("--calib-backend cuda needs onnxruntime-gpu and an NVIDIA GPU, and this machine has "
                              "neither working; use --calib-backend openvino or onnxruntime")
        return Backend("cuda", dtype, threads)
    if asked == "openvino":
        if not _openvino_installed():
            raise Sd3trtError("--calib-backend openvino needs OpenVINO: pip install -e '.[openvino]'")
        from sd3trt.runtime.ov_runner import cpu_has_bf16

        return Backend("openvino", "bf16" if cpu_has_bf16() else "fp32", threads)
    return Backend("onnxruntime", dtype, threads)
