"""Engine runners: one per component, strict about what they accept (names, dtypes, shapes).

Every backend implements `Runner.run(feeds) -> outputs` over numpy arrays; the manifest entry of the
component says what is legal, and a wrong request fails here with a sentence naming the input.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from sd3trt.errors import Sd3trtError
from sd3trt.runtime.ort_gpu import check_session_providers, provider_name
from sd3trt.runtime.ort_session import ort_session

BACKENDS = ("onnxruntime", "onnxruntime-cuda", "onnxruntime-trt", "tensorrt")


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library or platform); looked up once."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def release_heap() -> None:
    """Hand freed heap pages back to the OS (glibc malloc_trim; a no-op elsewhere). Loading an ONNX
    file parses its weights through transient copies that glibc keeps mapped: measured on the
    medium-width bundle, ~700 MiB of RSS that nothing uses any more."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class Runner:
    """Base: validation against the manifest's input specs; subclasses implement _run."""

    def __init__(self, name: str, entry: dict):
        self.name = name
        self.inputs = {t["name"]: t for t in entry["inputs"]}
        self.outputs = [t["name"] for t in entry["outputs"]]

    def check(self, feeds: dict[str, np.ndarray]) -> None:
        missing = set(self.inputs) - set(feeds)
        extra = set(feeds) - set(self.inputs)
        if missing or extra:
            raise Sd3trtError(
                f"{self.name}: inputs {sorted(feeds)} do not match the engine's {sorted(self.inputs)}"
            )
        for name, arr in feeds.items():
            spec = self.inputs[name]
            if arr.dtype.name != spec["dtype"]:
                raise Sd3trtError(f"{self.name}: input {name} is {arr.dtype.name}, the engine expects {spec['dtype']}")
            if arr.ndim != len(spec["shape"]):
                raise Sd3trtError(
                    f"{self.name}: input {name} has shape {arr.shape}, the engine expects {spec['shape']}"
                )
            for got, want in zip(arr.shape, spec["shape"]):
                if isinstance(want, int) and got != want:
                    raise Sd3trtError(
                        f"{self.name}: input {name} has shape {arr.shape}, the engine expects {spec['shape']}"
                    )

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check(feeds)
        return self._run(feeds)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the engine's memory (the low-memory mode calls this after each use)."""


class OrtRunner(Runner):
    """ONNX Runtime session (CPU by default; CUDA/TensorRT execution providers when installed)."""

    def __init__(self, name: str, entry: dict, path: Path, providers: list | None = None, threads: int = 0):
        super().__init__(name, entry)
        import onnxruntime as ort

        if not Path(path).is_file():
            raise Sd3trtError(f"{name}: ONNX file {path} is missing; re-run `sd3trt export`")
        available = ort.get_available_providers()
        providers = providers or ["CPUExecutionProvider"]
        unknown = [provider_name(p) for p in providers if provider_name(p) not in available]  # compiled in?
        if unknown:
            raise Sd3trtError(
                f"ONNX Runtime execution provider(s) {unknown} are not available here (available: {available}); "
                "install onnxruntime-gpu for CUDA/TensorRT providers"
            )
        first = provider_name(providers[0])
        try:
            self.session = ort_session(path, threads, providers)
        except Exception as e:  # ORT raises its own exception types; name the file and the cure
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            if first != "CPUExecutionProvider":
                raise Sd3trtError(
                    f"{name}: ONNX Runtime's {first} cannot load {path} ({why}); use --backend onnxruntime if the GPU "
                    "provider cannot be fixed"
                ) from None
            raise Sd3trtError(f"{name}: ONNX Runtime cannot load {path} ({why}); re-export it") from None
        check_session_providers(self.session, providers, name)
        release_heap()

    def _run(self, feeds):
        outs = self.session.run(self.outputs, feeds)
        return dict(zip(self.outputs, outs))

    def close(self) -> None:
        self.session = None
        release_heap()
