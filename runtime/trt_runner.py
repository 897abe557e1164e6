"""TensorRT backend behind the Runner interface: engines from `sd3trt build`, CUDA via cuda-bindings.

    runner = TrtRunner.from_bundle(bundle, "transformer")          # newest usable build, or build="..."
    out = runner.run({"hidden_states": ..., ...})                    # numpy in, numpy out

Per runner: one deserialized engine, one execution context per optimization profile (created on first
use, all sharing one device scratch allocation since they run on one stream), device buffers sized
for the largest shape the profiles allow (so addresses never change), pinned host staging buffers,
and one CUDA stream. Before anything touches the GPU the request is checked against the engine's
profiles, and the engine's metadata against the installed TensorRT and the GPU; every failure is an
Sd3trtError naming the fix. bf16 engine tensors are exchanged as float32 on the host.

No torch, no onnx: numpy, the TensorRT module and cuda-bindings only.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
from pathlib import Path

import numpy as np

from sd3trt.engines.flavour import PIP_NAMES, load_flavour
from sd3trt.engines.profiles import SINGLE_BATCH, EngineProfiles, request_shapes
from sd3trt.errors import Sd3trtError
from sd3trt.runtime.runners import Runner
from sd3trt.spec import COMPONENTS, T5_DEFAULT_LENGTH, concrete_shape, request_dims

ENV_BUILD = "SD3TRT_ENGINE_BUILD"  # which engines/<build> to use when a bundle holds several
ENV_CACHE = "SD3TRT_CACHE_DIR"  # where runtime caches go when the bundle is read-only
ENV_CUDA_GRAPH = "SD3TRT_CUDA_GRAPH"  # 1: capture the transformer step in a CUDA graph per shape
ENV_WS_BUDGET = "SD3TRT_WEIGHT_STREAMING_BUDGET"  # bytes of weights kept on the GPU (weight-streaming builds)
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "bool": 1, "int8": 1, "uint8": 1}
HOST_DTYPE = {"bfloat16": "float32"}  # numpy has no bf16: the host side of a bf16 tensor is float32
DIAGNOSTICS = {
    "VERSION_MISMATCH": "it was built with another TensorRT version",
    "UNSUPPORTED_CC": "it was built for another GPU architecture",
    "OLD_CUDA_DRIVER": "the NVIDIA driver is too old for it",
    "OLD_CUDA_RUNTIME": "the CUDA runtime is too old for it",
    "INSUFFICIENT_GPU_MEMORY": "the GPU has too little free memory",
    "MALFORMED_ENGINE": "the file is damaged",
    "CUDA_ERROR": "CUDA reported an error",
}


# --------------------------------------------------------------------------- bf16 on the host


def f32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def bf16_bits_to_f32(b: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(b, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


# --------------------------------------------------------------------------- builds in a bundle


def _flavour_installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def select_build(bundle, build: str | None = None) -> tuple[str, dict]:
    """(name, manifest entry) of the engine build to use: `build`, $SD3TRT_ENGINE_BUILD, or the newest
    build whose TensorRT flavour is installed."""
    engines = bundle.data.get("engines") or {}
    if not engines:
        raise Sd3trtError(
            f"bundle {bundle.root} has no TensorRT engines; build them with "
            f"`sd3trt build --bundle {bundle.root} --precision fp16` (or use --backend onnxruntime)"
        )
    build = build or os.environ.get(ENV_BUILD)
    if build:
        if build not in engines:
            raise Sd3trtError(f"bundle {bundle.root} has no engine build {build!r}; it has {', '.join(sorted(engines))}")
        return build, engines[build]
    usable = [n for n, e in engines.items() if _flavour_installed(e.get("flavour", ""))] or list(engines)
    name = max(usable, key=lambda n: engines[n].get("built_at", ""))
    return name, engines[name]


def read_metadata(bundle, build: str, entry: dict, component: str) -> dict:
    comp = entry.get("components", {}).get(component)
    if comp is None:
        raise Sd3trtError(
            f"engine build {build!r} has no {component} engine; run `sd3trt build --bundle {bundle.root} "
            f"--name {build} --components {component}` with the build's options"
        )
    path = bundle.path(comp["metadata"])
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise Sd3trtError(f"cannot read engine metadata {path} ({e}); re-run `sd3trt build`") from None


def check_request(bundle, height: int, width: int, num_images: int = 1, cfg: bool = True,
                  t5_seq: int = T5_DEFAULT_LENGTH, build: str | None = None) -> str:
    """Refuse a whole img2img request before any engine runs if some engine's profiles cannot take it.
    Returns the build name. Needs no GPU."""
    name, entry = select_build(bundle, build)
    facts = bundle.facts
    for component in [c for c in COMPONENTS if c in bundle.data["components"]]:
        meta = read_metadata(bundle, name, entry, component)
        batch = 1 if component in SINGLE_BATCH else num_images * (2 if cfg and component == "transformer" else 1)
        dims = request_dims(facts, batch, height, width, t5_seq)
        index, why = EngineProfiles.from_metadata(meta).explain(request_shapes(meta["io"]["inputs"], dims))
        if index is None:
            raise Sd3trtError(
                f"engine build {name!r} cannot take a {width}x{height} px request with {num_images} image(s), "
                f"CFG {'on' if cfg else 'off'} and T5 length {t5_seq} ({component}: {why}); rebuild with "
                "`sd3trt build` and --image-size/--batch/--cfg/--t5-seq ranges that cover it"
            )
    return name


# --------------------------------------------------------------------------- CUDA through cuda-bindings


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-bindings >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise Sd3trtError(
                "the TensorRT backend needs cuda-bindings for device memory and streams; "
                "pip install cuda-bindings (13.x for CUDA 13 drivers, 12.x for CUDA 12)"
            ) from None
    return cudart


class Cuda:
    """The few CUDA runtime calls the runner needs, each checked."""

    def __init__(self, device: int = 0):
        self.rt = cudart = _import_cudart()
        err, count = cudart.cudaGetDeviceCount()
        code = int(err)
        if code != 0 or not count:
            _, name = cudart.cudaGetErrorName(err) if code else (None, b"no device")
            name = name.decode() if isinstance(name, bytes) else str(name)
            if code == int(cudart.cudaError_t.cudaErrorInsufficientDriver):
                _, rtv = cudart.cudaRuntimeGetVersion()
                raise Sd3trtError(
                    f"no usable NVIDIA driver here (CUDA: {name}; the CUDA {rtv // 1000}.{rtv % 1000 // 10} "
                    "runtime needs a newer or any driver); install the NVIDIA driver or use --backend onnxruntime"
                )
            raise Sd3trtError(f"no NVIDIA GPU is available (CUDA: {name}); use --backend onnxruntime on this machine")
        if device >= count:
            raise Sd3trtError(f"GPU {device} does not exist (this machine has {count}); pick another device")
        self.check(cudart.cudaSetDevice(device), "cudaSetDevice")
        props = self.check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
        self.cc = f"{props.major}.{props.minor}"
        raw = props.name
        self.name = (raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)).split("\x00")[0]
        self.stream = self.check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreate")

    def check(self, result, what: str):
        if isinstance(result, tuple):
            err, rest = result[0], result[1:]
        else:
            err, rest = result, ()
        if int(err) != 0:
            _, name = self.rt.cudaGetErrorName(err)
            name = name.decode() if isinstance(name, bytes) else str(name)
            raise Sd3trtError(f"CUDA call {what} failed ({name}); the GPU may be out of memory or in a bad state")
        return rest[0] if len(rest) == 1 else rest

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


def _pinned_view(ptr: int, nbytes: int) -> np.ndarray:
    return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_uint8)), shape=(nbytes,))


# --------------------------------------------------------------------------- the runner


class TrtRunner(Runner):
    """One component's TensorRT engine."""

    def __init__(self, name: str, entry: dict, engine_path: Path, meta: dict, onnx_path: Path | None = None,
                 runtime_cache: Path | None = None, cuda_graph: bool = False,
                 weight_streaming_budget: int | None = None, device: int = 0, verify_engine: bool = False):
        # Host-side view of the manifest entry (bf16 travels as float32), for Runner.check.
        host = {k: [dict(t, dtype=HOST_DTYPE.get(t["dtype"], t["dtype"])) for t in meta["io"][k]] for k in ("inputs", "outputs")}
        super().__init__(name, host)
        self._released = True  # nothing to free yet
        self.dev: dict[str, int] = {}
        self.pinned: dict[str, int] = {}
        self.nbytes: dict[str, int] = {}
        self.scratch = 0
        self.contexts: dict[int, object] = {}
        self.graphs: dict[tuple, object] = {}
        self.cuda_graph = cuda_graph
        self.runtime_cache_path = Path(runtime_cache) if runtime_cache else None
        self.runtime_cache = None
        self.engine = None
        self.meta = meta
        self.build = meta["build"]
        self.profiles = EngineProfiles.from_metadata(meta)
        self.device_dtypes = {t["name"]: t["dtype"] for t in meta["io"]["inputs"] + meta["io"]["outputs"]}
        self.output_specs = meta["io"]["outputs"]
        _check_entry_matches(name, entry, meta)

        # 1. The TensorRT this engine was built with (no GPU needed to refuse a mismatch).
        self.flavour = fl = _engine_flavour(meta)
        trt = self.trt = fl.trt
        # 2. A GPU and a driver.
        self.cuda = cuda = Cuda(device)
        self._released = False  # from here on close() frees what exists
        _check_target(meta, cuda)
        # 3. The engine file.
        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise Sd3trtError(f"engine {engine_path} is missing; re-run `sd3trt build` for build {self.build!r}")
        data = engine_path.read_bytes()
        stale = len(data) != meta.get("engine_bytes", len(data))
        if not stale and verify_engine and meta.get("engine_sha256"):  # opt-in: hashing GBs takes seconds
            import hashlib

            stale = hashlib.sha256(data).hexdigest() != meta["engine_sha256"]
        if stale:
            raise Sd3trtError(f"engine {engine_path} does not match its metadata; re-run `sd3trt build --force`")
        self.logger = _logger(trt)
        self.runtime = trt.Runtime(self.logger)
        self._explain_invalid(data, engine_path)
        self.engine = self.runtime.deserialize_cuda_engine(data)
        del data
        if self.engine is None:
            why = "; ".join(self.logger.errors[-2:]) or "no message"
            raise Sd3trtError(
                f"{fl.name} {fl.version} cannot load engine {engine_path} ({why[:300]}); it was built for another "
                f"GPU or TensorRT, rebuild it here with `sd3trt build --force`"
            )
        if meta.get("options", {}).get("strip_weights"):
            self._refit_from_onnx(onnx_path)
        if weight_streaming_budget is not None and hasattr(self.engine, "weight_streaming_budget_v2"):
            self.engine.weight_streaming_budget_v2 = int(weight_streaming_budget)
        self._check_engine_bindings()

        # 4. Buffers: device at the largest profile shape, pinned host staging of the same size.
        for tname, nbytes in self._max_bytes().items():
            self.nbytes[tname] = nbytes
            self.dev[tname] = cuda.malloc(nbytes)
            self.pinned[tname] = cuda.malloc_host(nbytes)
        n_prof = self.engine.num_optimization_profiles
        self.scratch_bytes = max(_profile_memory(self.engine, i) for i in range(n_prof))
        self.scratch = cuda.malloc(self.scratch_bytes)

    # ---------------------------------------------------------------- construction helpers

    @classmethod
    def from_bundle(cls, bundle, name: str, build: str | None = None, **kw) -> "TrtRunner":
        build_name, entry = select_build(bundle, build)
        meta = read_metadata(bundle, build_name, entry, name)
        engine_path = bundle.path(entry["components"][name]["engine"])
        kw.setdefault("runtime_cache", _runtime_cache_path(engine_path, meta))
        if os.environ.get(ENV_CUDA_GRAPH, "") not in ("", "0"):
            kw.setdefault("cuda_graph", name == "transformer")  # fixed shapes across the denoising loop
        budget = os.environ.get(ENV_WS_BUDGET)
        if budget and meta.get("options", {}).get("weight_streaming"):
            kw.setdefault("weight_streaming_budget", int(float(budget)))
        return cls(name, bundle.component(name), engine_path, meta, onnx_path=bundle.onnx_path(name), **kw)

    def _explain_invalid(self, data: bytes, engine_path: Path) -> None:
        if not hasattr(self.runtime, "get_engine_validity"):
            return
        try:
            validity, diag = self.runtime.get_engine_validity(data)
        except Exception:
            return
        if validity.name != "INVALID":
            return
        flags = self.trt.EngineInvalidityDiagnostics.__members__
        reasons = [text for key, text in DIAGNOSTICS.items() if key in flags and int(diag) & int(flags[key])]
        raise Sd3trtError(
            f"engine {engine_path} cannot run on this {self.cuda.name} (compute capability {self.cuda.cc}): "
            f"{'; '.join(reasons) or 'TensorRT reports it invalid'}; rebuild it here with `sd3trt build --force`"
        )

    def _refit_from_onnx(self, onnx_path: Path | None) -> None:
        trt = self.trt
        if onnx_path is None or not Path(onnx_path).is_file():
            raise Sd3trtError(f"{self.name}: the engine is weight-stripped and its ONNX {onnx_path} is missing; re-export the bundle")
        refitter = trt.Refitter(self.engine, self.logger)
        parser_refitter = trt.OnnxParserRefitter(refitter, self.logger)
        if not parser_refitter.refit_from_file(str(onnx_path)) or not refitter.refit_cuda_engine():
            why = "; ".join(self.logger.errors[-2:]) or "no message"
            raise Sd3trtError(f"{self.name}: refitting the weight-stripped engine from {onnx_path} failed ({why[:300]}); rebuild it")

    def _check_engine_bindings(self) -> None:
        e, trt = self.engine, self.trt
        got = {}
        for i in range(e.num_io_tensors):
            n = e.get_tensor_name(i)
            got[n] = (e.get_tensor_mode(n) == trt.TensorIOMode.INPUT, _dtype_name(e.get_tensor_dtype(n)))
        want = {n: (n in self.inputs, d) for n, d in self.device_dtypes.items()}
        if got != want:
            raise Sd3trtError(
                f"{self.name}: the engine's bindings {sorted(got.items())} differ from its metadata "
                f"{sorted(want.items())}; rebuild it with `sd3trt build --force`"
            )

    def _max_bytes(self) -> dict[str, int]:
        sizes = {}
        for p in self.profiles.profiles:
            for n, s in p["shapes"].items():
                sizes[n] = max(sizes.get(n, 0), int(np.prod(s["max"])) * ITEMSIZE[self.device_dtypes[n]])
            for t in self.output_specs:
                shape = concrete_shape(t["shape"], p["dims"]["max"])
                sizes[t["name"]] = max(sizes.get(t["name"], 0), int(np.prod(shape)) * ITEMSIZE[t["dtype"]])
        return sizes

    def _context(self, index: int):
        ctx = self.contexts.get(index)
        if ctx is not None:
            return ctx
        trt, e = self.trt, self.engine
        user = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        if hasattr(e, "create_runtime_config"):
            config = e.create_runtime_config()
            config.set_execution_context_allocation_strategy(user)
            if self.flavour.has_runtime_cache:
                if self.runtime_cache is None:
                    self.runtime_cache = config.create_runtime_cache()
                    if self.runtime_cache_path and self.runtime_cache_path.is_file():
                        self.runtime_cache.deserialize(self.runtime_cache_path.read_bytes())
                config.set_runtime_cache(self.runtime_cache)
            if self.cuda_graph and hasattr(config, "cuda_graph_strategy"):
                config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
            ctx = e.create_execution_context(config)
        else:
            ctx = e.create_execution_context(user)
        if ctx is None:
            raise Sd3trtError(f"{self.name}: TensorRT could not create an execution context ({'; '.join(self.logger.errors[-1:])})")
        if hasattr(ctx, "set_device_memory"):
            ctx.set_device_memory(self.scratch, self.scratch_bytes)
        else:
            ctx.device_memory = self.scratch
        if not ctx.set_optimization_profile_async(index, self.cuda.stream_handle):
            raise Sd3trtError(f"{self.name}: TensorRT refused optimization profile {index}")
        self.cuda.sync()
        self.contexts[index] = ctx
        return ctx

    # ---------------------------------------------------------------- running

    def check(self, feeds: dict[str, np.ndarray]) -> None:
        super().check(feeds)
        self.profiles.select({n: a.shape for n, a in feeds.items()})

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._released:
            raise Sd3trtError(f"{self.name}: this engine was closed; load it again")
        cuda = self.cuda
        shapes = {n: tuple(a.shape) for n, a in feeds.items()}
        index = self.profiles.select(shapes)
        ctx = self._context(index)
        for n, arr in feeds.items():
            nbytes = self._stage_input(n, arr)
            cuda.h2d(self.dev[n], self.pinned[n], nbytes)
            if not ctx.set_input_shape(n, shapes[n]):
                raise Sd3trtError(f"{self.name}: TensorRT refused shape {shapes[n]} for {n}; rebuild the engine for it")
            ctx.set_tensor_address(n, self.dev[n])
        out_shapes = {}
        for n in self.outputs:
            shp = tuple(ctx.get_tensor_shape(n))
            if any(d < 0 for d in shp):
                raise Sd3trtError(f"{self.name}: TensorRT could not infer the shape of output {n} for inputs {shapes}")
            if int(np.prod(shp)) * ITEMSIZE[self.device_dtypes[n]] > self.nbytes[n]:
                raise Sd3trtError(f"{self.name}: output {n} {shp} exceeds its buffer; the engine metadata is stale, rebuild it")
            out_shapes[n] = shp
            ctx.set_tensor_address(n, self.dev[n])
        self._execute(ctx, index, shapes)
        for n, shp in out_shapes.items():
            cuda.d2h(self.pinned[n], self.dev[n], int(np.prod(shp)) * ITEMSIZE[self.device_dtypes[n]])
        cuda.sync()
        return {n: self._read_output(n, shp) for n, shp in out_shapes.items()}

    def _stage_input(self, n: str, arr: np.ndarray) -> int:
        dt = self.device_dtypes[n]
        view = _pinned_view(self.pinned[n], self.nbytes[n])
        if dt == "bfloat16":
            bits = f32_to_bf16_bits(arr)
            view[: bits.nbytes] = bits.reshape(-1).view(np.uint8)
            return bits.nbytes
        src = np.ascontiguousarray(arr, dtype=np.dtype(dt))
        view[: src.nbytes] = src.reshape(-1).view(np.uint8)
        return src.nbytes

    def _read_output(self, n: str, shp: tuple) -> np.ndarray:
        dt = self.device_dtypes[n]
        count = int(np.prod(shp))
        raw = _pinned_view(self.pinned[n], self.nbytes[n])
        if dt == "bfloat16":
            return bf16_bits_to_f32(raw[: count * 2].view(np.uint16)).reshape(shp)
        return raw[: count * ITEMSIZE[dt]].view(np.dtype(dt)).reshape(shp).copy()

    def _execute(self, ctx, index: int, shapes: dict) -> None:
        cuda = self.cuda
        manual_graph = self.cuda_graph and not self.flavour.is_rtx  # RTX captures itself (cuda_graph_strategy)
        key = (index, tuple(sorted(shapes.items())))
        graph = self.graphs.get(key) if manual_graph else None
        if graph is not None:
            cuda.check(cuda.rt.cudaGraphLaunch(graph, cuda.stream), "cudaGraphLaunch")
            return
        if not ctx.execute_async_v3(cuda.stream_handle):
            raise Sd3trtError(f"{self.name}: TensorRT failed to run ({'; '.join(self.logger.errors[-2:])[:300]})")
        if manual_graph and key not in self.graphs:
            self.graphs[key] = self._capture(ctx)

    def _capture(self, ctx):
        """Capture one enqueue at these shapes into a CUDA graph (after a normal run has set everything up)."""
        cuda, rt = self.cuda, self.cuda.rt
        cuda.sync()
        if hasattr(ctx, "is_stream_capturable") and not ctx.is_stream_capturable(cuda.stream_handle):
            return None
        cuda.check(rt.cudaStreamBeginCapture(cuda.stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture")
        ok = ctx.execute_async_v3(cuda.stream_handle)
        graph = cuda.check(rt.cudaStreamEndCapture(cuda.stream), "cudaStreamEndCapture")
        try:
            return cuda.check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate") if ok else None
        finally:
            rt.cudaGraphDestroy(graph)

    # ---------------------------------------------------------------- lifetime

    def save_runtime_cache(self) -> None:
        if self.runtime_cache is None or self.runtime_cache_path is None:
            return
        try:
            blob = bytes(memoryview(self.runtime_cache.serialize()))
            from sd3trt.manifest import write_bytes_atomic

            write_bytes_atomic(self.runtime_cache_path, blob)
        except OSError:
            pass  # a read-only bundle: the cache only saves start-up time

    def close(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            self.cuda.sync()
        except Sd3trtError:
            pass
        self.save_runtime_cache()
        for g in self.graphs.values():
            if g is not None:
                self.cuda.rt.cudaGraphExecDestroy(g)
        self.graphs.clear()
        self.contexts.clear()
        self.engine = None
        for p in self.dev.values():
            self.cuda.free(p)
        for p in self.pinned.values():
            self.cuda.free(p, host=True)
        self.cuda.free(self.scratch)
        self.scratch = 0
        self.dev, self.pinned = {}, {}
        self.cuda.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# --------------------------------------------------------------------------- checks used above


def _check_entry_matches(name: str, entry: dict, meta: dict) -> None:
    if meta.get("component") != name:
        raise Sd3trtError(f"engine metadata is for {meta.get('component')!r}, not {name!r}; re-run `sd3trt build`")
    want = {t["name"]: t["shape"] for t in entry["inputs"] + entry["outputs"]}
    got = {t["name"]: t["shape"] for t in meta["io"]["inputs"] + meta["io"]["outputs"]}
    if want != got:
        raise Sd3trtError(f"{name}: the engine was built from another export of this component; re-run `sd3trt build --force`")


def _engine_flavour(meta: dict):
    want, version = meta.get("flavour"), meta.get("tensorrt_version")
    if want not in PIP_NAMES:
        raise Sd3trtError(f"engine metadata names an unknown TensorRT flavour {want!r}; re-run `sd3trt build`")
    fl = load_flavour(want)
    if fl.version != version:
        raise Sd3trtError(
            f"engine build {meta.get('build')!r} was made with {want} {version}, this machine has {fl.version}; "
            f"rebuild it here with `sd3trt build --force` (or install {PIP_NAMES[want]}=={version})"
        )
    return fl


def _check_target(meta: dict, cuda: Cuda) -> None:
    target = meta.get("target", {})
    ccs = target.get("compute_capabilities") or []
    if ccs and cuda.cc not in ccs:
        raise Sd3trtError(
            f"engine build {meta.get('build')!r} targets compute capability {', '.join(ccs)}, this {cuda.name} is "
            f"{cuda.cc}; rebuild with `sd3trt build --compute-capability {cuda.cc}` (or on this GPU)"
        )


def _runtime_cache_path(engine_path: Path, meta: dict) -> Path | None:
    """Beside the engine when the bundle is writable, else under $SD3TRT_CACHE_DIR / ~/.cache/sd3trt."""
    if meta.get("flavour") != "tensorrt_rtx":
        return None
    name = f"{meta['component']}.runtime.cache"
    if os.access(engine_path.parent, os.W_OK):
        return engine_path.parent / name
    base = Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "sd3trt")
    return base / f"{meta.get('engine_sha256', 'engine')[:16]}-{name}"


def _profile_memory(engine, index: int) -> int:
    if hasattr(engine, "get_device_memory_size_for_profile_v2"):
        return int(engine.get_device_memory_size_for_profile_v2(index))
    return int(getattr(engine, "device_memory_size_v2", getattr(engine, "device_memory_size", 0)))


def _dtype_name(dt) -> str:
    return {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
            "BOOL": "bool", "INT8": "int8", "UINT8": "uint8"}.get(dt.name, dt.name.lower())


def _logger(trt):
    class CaptureLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg)

    return CaptureLogger()


# --------------------------------------------------------------------------- ONNX Runtime on the GPU


def ort_gpu_providers(kind: str, bundle=None, fp16: bool | None = None) -> list:
    """Execution providers for OrtRunner on a GPU: kind "cuda" or "tensorrt" (falls back to CUDA, then CPU).

    The TensorRT provider caches its engines and timing data under <bundle>/engines/ort-trt/.
    """
    if kind == "cuda":
        return [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    if kind != "tensorrt":
        raise Sd3trtError(f"unknown ONNX Runtime GPU provider {kind!r}; use cuda or tensorrt")
    opts = {"device_id": 0, "trt_fp16_enable": bool(fp16) if fp16 is not None else bool(bundle and bundle.dtype == "fp16")}
    if bundle is not None:
        cache = str(Path(bundle.root) / "engines" / "ort-trt")
        opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=cache, trt_timing_cache_enable=True,
                    trt_timing_cache_path=cache)
    return [("TensorrtExecutionProvider", opts), ("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
