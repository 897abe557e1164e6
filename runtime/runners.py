"""Engine runners: one per component, strict about what they accept (names, dtypes, shapes).

Every backend implements `Runner.run(feeds) -> outputs` over numpy arrays; the manifest entry of the
component says what is legal, and a wrong request fails here with a sentence naming the input.
"""

from __future__ import annotations

import functools
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from sd3trt.errors import Sd3trtError
from sd3trt.manifest import tensor_specs
from sd3trt.runtime.ort_gpu import check_session_providers, provider_name
from sd3trt.runtime.ort_session import ort_session

BACKENDS = ("onnxruntime", "openvino", "onnxruntime-cuda", "onnxruntime-trt", "tensorrt", "auto")  # auto: a CPU one


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library or platform); looked up once."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def error_line(e: BaseException) -> str:
    """The first line of a backend's exception (ONNX Runtime and OpenVINO raise multi-line reports)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def onnx_file(name: str, path) -> Path:
    """`path` as a Path when the file is there; else the sentence naming the component and the fix."""
    path = Path(path)
    if not path.is_file():
        raise Sd3trtError(f"{name}: ONNX file {path} is missing; re-run `sd3trt export`")
    return path


def release_heap() -> None:
    """Hand freed heap pages back to the OS (glibc malloc_trim; a no-op elsewhere). Loading an ONNX
    file parses its weights through transient copies that glibc keeps mapped: measured on the
    medium-width bundle, ~700 MiB of RSS that nothing uses any more."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class Runner:
    """Base: validation against the manifest's input specs; subclasses implement _run.

    run(feeds) = check(feeds) + execute(feeds). Threads: an engine that cannot run two calls at once
    (thread_safe False) is run under the runner's lock; ONNX Runtime sessions run concurrently.
    """

    thread_safe = False

    def __init__(self, name: str, entry: dict):
        self.name = name
        self.inputs = {t["name"]: t for t in tensor_specs(entry, "inputs")}
        self.outputs = [t["name"] for t in tensor_specs(entry, "outputs")]
        self._lock = threading.Lock()

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
        return self.execute(feeds)

    def execute(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run feeds that check() accepted: the engine call alone (what a benchmark times)."""
        if self.thread_safe:
            return self._run(feeds)
        with self._lock:
            return self._run(feeds)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the engine's memory (the low-memory mode calls this after each use)."""


class OrtRunner(Runner):
    """ONNX Runtime session (CPU by default; CUDA/TensorRT execution providers when installed).
    InferenceSession.run may be called from several threads at once."""

    thread_safe = True

    def __init__(self, name: str, entry: dict, path: Path, providers: list | None = None, threads: int = 0,
                 initializers: dict | None = None):
        """initializers: {name: array} overriding the graph's (a LoRA merged at load time; runtime/lora.py)."""
        super().__init__(name, entry)
        self._initializers = dict(initializers or {})  # ONNX Runtime keeps pointers to them: keep them alive
        import onnxruntime as ort

        path = onnx_file(name, path)
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
            self.session = ort_session(path, threads, providers, initializers=self._initializers)
        except Exception as e:  # ORT raises its own exception types; name the file and the cure
            why = error_line(e)
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


class RunnerPool:
    """The loaded runners of one pipeline, shared by the threads that call it.

    get(name) loads a runner on first use (under the pool's lock: one load per component). hold(*names)
    marks runners in use for a block; with low_memory a runner is closed when its last holder leaves.
    """

    def __init__(self, make: Callable[[str], Runner], low_memory: bool = False):
        self.make = make
        self.low_memory = low_memory
        self._lock = threading.Lock()
        self._loaded: dict[str, Runner] = {}
        self._users: Counter = Counter()

    def get(self, name: str) -> Runner:
        with self._lock:
            runner = self._loaded.get(name)
            if runner is None:
                runner = self._loaded[name] = self.make(name)
            return runner

    @contextmanager
    def hold(self, *names: str) -> Iterator[None]:
        with self._lock:
            self._users.update(names)
        try:
            yield
        finally:
            idle = []
            with self._lock:
                self._users.subtract(names)
                for n in names:
                    if self.low_memory and self._users[n] <= 0 and n in self._loaded:
                        idle.append(self._loaded.pop(n))
            for runner in idle:
                runner.close()

    def loaded(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._loaded)

    def close(self) -> None:
        """Close every loaded runner (call it when no run is in flight). Idempotent."""
        with self._lock:
            runners, self._loaded = self._loaded, {}
        for runner in runners.values():
            runner.close()
