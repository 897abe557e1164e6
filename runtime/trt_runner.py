"""TensorRT backend behind the Runner interface: engines from `sd3trt build`, CUDA via cuda-bindings.

    runner = TrtRunner.from_bundle(bundle, "transformer")          # newest usable build, or build="..."
    out = runner.run({"hidden_states": ..., ...})                    # numpy in, numpy out

Per runner: one deserialized engine, one execution context per optimization profile (created on first
use, all sharing one device scratch allocation since they run on one stream), device buffers sized
for the largest shape the profiles allow (so addresses never change and are set once per context),
pinned host staging buffers, and one CUDA stream. Before anything touches the GPU the request is
checked against the engine's profiles, and the engine's metadata against the installed TensorRT and
the GPU; every failure is an Sd3trtError naming the fix. bf16 engine tensors are exchanged as float32
on the host. Optional: a CUDA graph per context (cuda_graph.py), the TensorRT-RTX runtime cache
(caches.py). CUDA itself is in cuda.py, ONNX Runtime's GPU providers in ort_gpu.py.

No torch, no onnx: numpy, the TensorRT module and cuda-bindings only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from sd3trt.errors import Sd3trtError
from sd3trt.manifest import build_option, tensor_specs
from sd3trt.profiles import EngineProfiles
from sd3trt.runtime.bf16 import bf16_bits_to_f32, f32_to_bf16_bits
from sd3trt.runtime.builds import read_metadata, select_build
from sd3trt.runtime.caches import RuntimeCacheFile, runtime_cache_path
from sd3trt.runtime.cuda import Cuda, pinned_view
from sd3trt.runtime.cuda_graph import CudaGraph
from sd3trt.runtime.flavour import PIP_NAMES, gpu_mismatch, load_flavour
from sd3trt.runtime.runners import Runner
from sd3trt.sizes import parse_size
from sd3trt.spec import concrete_shape

log = logging.getLogger(__name__)
ENV_CUDA_GRAPH = "SD3TRT_CUDA_GRAPH"  # 1: replay the transformer step from a CUDA graph (re-captured on shape changes)
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


# --------------------------------------------------------------------------- the runner

SPECIALIZATIONS = ("lazy", "eager", "none")  # TensorRT-RTX dynamic-shape kernel specialization strategies


class TrtRunner(Runner):
    """One component's TensorRT engine.

    Threads: one stream and one set of device and pinned buffers per runner, so run() holds the runner's
    lock (Runner.thread_safe is False): calls from several threads take turns, as they would on the GPU.

    kernel_specialization (TensorRT-RTX only): "lazy" (its default) swaps in shape-specialized kernels
    compiled in the background after the first runs at a shape, so early outputs may differ in the last
    bits from later ones; "eager" compiles them before the first run returns; "none" never specializes.
    """

    def __init__(self, name: str, entry: dict, engine_path: Path, meta: dict, onnx_path: Path | None = None,
                 runtime_cache: Path | None = None, cuda_graph: bool = False,
                 weight_streaming_budget: int | None = None, device: int = 0, verify_engine: bool = False,
                 kernel_specialization: str | None = None):
        # Host-side view of the manifest entry (bf16 travels as float32), for Runner.check.
        host = {k: [dict(t, dtype=HOST_DTYPE.get(t["dtype"], t["dtype"])) for t in meta["io"][k]] for k in ("inputs", "outputs")}
        super().__init__(name, host)
        if kernel_specialization not in (None,) + SPECIALIZATIONS:
            raise Sd3trtError(f"unknown kernel specialization {kernel_specialization!r}; use {', '.join(SPECIALIZATIONS)}")
        self._released = True  # nothing to free yet
        self.dev: dict[str, int] = {}
        self.pinned: dict[str, int] = {}
        self.nbytes: dict[str, int] = {}
        self.scratch = 0
        self.contexts: dict[int, object] = {}
        self.configs: dict[int, object] = {}  # each context's IRuntimeConfig: it must outlive the context
        self.ctx_shapes: dict[int, dict] = {}  # the input shapes last set on each context
        self.graphs: dict[int, CudaGraph] = {}  # per context, when capturing CUDA graphs ourselves
        self.cuda_graph = cuda_graph
        self.kernel_specialization = kernel_specialization
        self.runtime_cache_path = Path(runtime_cache) if runtime_cache else None
        self.runtime_cache: RuntimeCacheFile | None = None
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
        # 2. A GPU and a driver, that this TensorRT and this engine can run on.
        self.cuda = cuda = Cuda(device)
        self._released = False  # from here on close() frees what exists
        _check_gpu(meta, fl, cuda)
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
                f"GPU or TensorRT, rebuild it here with {fl.rebuild_hint(cuda.cc)}"
            )
        if build_option(meta, "strip_weights"):
            self._refit_from_onnx(onnx_path)
        if weight_streaming_budget is not None and hasattr(self.engine, "weight_streaming_budget_v2"):
            self.engine.weight_streaming_budget_v2 = int(weight_streaming_budget)
        check_bindings(name, self.engine, trt, self.device_dtypes, set(self.inputs))

        # 4. Buffers: device at the largest profile shape, pinned host staging of the same size; scratch.
        for tname, nbytes in self._max_bytes().items():
            self.nbytes[tname] = nbytes
            self.dev[tname] = cuda.malloc(nbytes)
            self.pinned[tname] = cuda.malloc_host(nbytes)
        self.scratch_bytes = scratch_bytes(self.engine)  # after the weight-streaming budget, which changes it
        self.scratch = cuda.malloc(self.scratch_bytes)

    # ---------------------------------------------------------------- construction helpers

    @classmethod
    def from_bundle(cls, bundle, name: str, build: str | None = None, **kw) -> "TrtRunner":
        build_name, entry = select_build(bundle, build)
        meta = read_metadata(bundle, build_name, entry, name)
        engine_path = bundle.engine_files(entry, name)[0]
        kw.setdefault("runtime_cache", runtime_cache_path(engine_path, meta))
        for key, value in env_options(name, meta).items():
            kw.setdefault(key, value)
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
            f"{'; '.join(reasons) or 'TensorRT reports it invalid'}; rebuild it with "
            f"{self.flavour.rebuild_hint(self.cuda.cc)}"
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
                if self.runtime_cache is None:  # one cache for all of this engine's contexts
                    self.runtime_cache = RuntimeCacheFile(config.create_runtime_cache(), self.runtime_cache_path)
                config.set_runtime_cache(self.runtime_cache.cache)
            if self.cuda_graph and hasattr(config, "cuda_graph_strategy"):
                config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
            if self.kernel_specialization and hasattr(config, "dynamic_shapes_kernel_specialization_strategy"):
                strategy = trt.DynamicShapesKernelSpecializationStrategy.__members__[self.kernel_specialization.upper()]
                config.dynamic_shapes_kernel_specialization_strategy = strategy
            self.configs[index] = config
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
            raise Sd3trtError(f"{self.name}: TensorRT refused optimization profile {index}; rebuild the engine with `sd3trt build --force`")
        for n, ptr in self.dev.items():  # fixed buffers: their addresses are set once per context
            if not ctx.set_tensor_address(n, ptr):
                raise Sd3trtError(f"{self.name}: TensorRT refused the device buffer of {n} ({'; '.join(self.logger.errors[-1:])}); rebuild the engine with `sd3trt build --force`")
        self.cuda.sync()
        self.contexts[index] = ctx
        if self.cuda_graph and not self.flavour.is_rtx:  # RTX captures itself (cuda_graph_strategy above)
            self.graphs[index] = CudaGraph(self.cuda, ctx, f"{self.name} (profile {index})")
        return ctx

    # ---------------------------------------------------------------- running

    def check(self, feeds: dict[str, np.ndarray]) -> None:
        super().check(feeds)
        self.profiles.select({n: a.shape for n, a in feeds.items()})

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._released:
            raise Sd3trtError(f"{self.name}: this engine was closed; load it again")
        cuda = self.cuda
        cuda.make_current()
        shapes = {n: tuple(a.shape) for n, a in feeds.items()}
        index = self.profiles.select(shapes)
        ctx = self._context(index)
        for n, arr in feeds.items():
            cuda.h2d(self.dev[n], self.pinned[n], self._stage_input(n, arr))
        self._set_shapes(index, ctx, shapes)
        out_shapes = self._output_shapes(ctx, shapes)
        key = (index, tuple(sorted(shapes.items())))
        graph = self.graphs.get(index)
        if graph is None:
            self._enqueue(ctx)
        else:
            graph.run(key, lambda: self._enqueue(ctx))
        for n, shp in out_shapes.items():
            cuda.d2h(self.pinned[n], self.dev[n], int(np.prod(shp)) * ITEMSIZE[self.device_dtypes[n]])
        cuda.sync()
        if self.runtime_cache is not None:
            self.runtime_cache.ran(key)  # saves after the first run at each new shape
        return {n: self._read_output(n, shp) for n, shp in out_shapes.items()}

    def _set_shapes(self, index: int, ctx, shapes: dict) -> None:
        if self.ctx_shapes.get(index) == shapes:
            return  # unchanged: no shape work for TensorRT, and a captured graph stays valid
        self.ctx_shapes.pop(index, None)
        for n, shp in shapes.items():
            if not ctx.set_input_shape(n, shp):
                raise Sd3trtError(f"{self.name}: TensorRT refused shape {shp} for {n}; rebuild the engine for it")
        self.ctx_shapes[index] = shapes

    def _output_shapes(self, ctx, shapes: dict) -> dict[str, tuple]:
        out = {}
        for n in self.outputs:
            shp = tuple(ctx.get_tensor_shape(n))
            if any(d < 0 for d in shp):
                raise Sd3trtError(f"{self.name}: TensorRT could not infer the shape of output {n} for inputs {shapes}; rebuild the engine")
            if int(np.prod(shp)) * ITEMSIZE[self.device_dtypes[n]] > self.nbytes[n]:
                raise Sd3trtError(f"{self.name}: output {n} {shp} exceeds its buffer; the engine metadata is stale, rebuild it")
            out[n] = shp
        return out

    def _enqueue(self, ctx) -> None:
        if not ctx.execute_async_v3(self.cuda.stream_handle):
            raise Sd3trtError(f"{self.name}: TensorRT failed to run ({'; '.join(self.logger.errors[-2:])[:300]}); "
                              "rebuild the engine with `sd3trt build --force` if this persists")

    def _stage_input(self, n: str, arr: np.ndarray) -> int:
        dt = self.device_dtypes[n]
        view = pinned_view(self.pinned[n], self.nbytes[n])
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
        raw = pinned_view(self.pinned[n], self.nbytes[n])
        if dt == "bfloat16":
            return bf16_bits_to_f32(raw[: count * 2].view(np.uint16)).reshape(shp)
        return raw[: count * ITEMSIZE[dt]].view(np.dtype(dt)).reshape(shp).copy()

    # ---------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Free the GPU memory; saves the TensorRT-RTX runtime cache first."""
        if self._released:
            return
        self._released = True
        try:
            self.cuda.sync()
        except Sd3trtError:
            pass
        if self.runtime_cache is not None:
            self.runtime_cache.save()
            self.runtime_cache = None
        for g in self.graphs.values():
            g.drop()
        self.graphs.clear()
        self.contexts.clear()
        self.configs.clear()  # after the contexts that use them
        self.ctx_shapes.clear()
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


def env_options(component: str, meta: dict) -> dict:
    """Runner options from the environment: $SD3TRT_CUDA_GRAPH (the transformer, whose shapes are fixed
    across the denoising loop) and $SD3TRT_WEIGHT_STREAMING_BUDGET (weight-streaming builds)."""
    opts = {}
    if os.environ.get(ENV_CUDA_GRAPH, "") not in ("", "0"):
        opts["cuda_graph"] = component == "transformer"
    budget = parse_size(os.environ.get(ENV_WS_BUDGET) or None, ENV_WS_BUDGET)
    if budget is not None and build_option(meta, "weight_streaming"):
        opts["weight_streaming_budget"] = budget
    return opts


def _check_entry_matches(name: str, entry: dict, meta: dict) -> None:
    if meta.get("component") != name:
        raise Sd3trtError(f"engine metadata is for {meta.get('component')!r}, not {name!r}; re-run `sd3trt build`")
    want = {t["name"]: t["shape"] for t in tensor_specs(entry, "inputs") + tensor_specs(entry, "outputs")}
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


def _check_gpu(meta: dict, fl, cuda) -> None:
    """The engine's TensorRT flavour can run on this GPU (`cuda`: .cc, .name), and the engine was built for it."""
    problem = gpu_mismatch(fl, cuda.cc, cuda.name)
    if problem:
        raise Sd3trtError(problem)
    ccs = meta.get("target", {}).get("compute_capabilities") or []
    if ccs and cuda.cc not in ccs:
        raise Sd3trtError(
            f"engine build {meta.get('build')!r} targets compute capability {', '.join(ccs)}, this {cuda.name} is "
            f"{cuda.cc}; rebuild it with {fl.rebuild_hint(cuda.cc)}"
        )


def check_bindings(component: str, engine, trt, device_dtypes: dict[str, str], inputs: set[str]) -> None:
    """The engine's I/O tensors are the metadata's (names, direction, dtype), all in device memory."""
    got = {}
    for i in range(engine.num_io_tensors):
        n = engine.get_tensor_name(i)
        got[n] = (engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT, _dtype_name(engine.get_tensor_dtype(n)))
        if engine.get_tensor_location(n) != trt.TensorLocation.DEVICE or engine.is_shape_inference_io(n):
            raise Sd3trtError(
                f"{component}: engine tensor {n} is a host-side shape tensor, which this runner does not feed; "
                "rebuild the engine from the bundle's ONNX with `sd3trt build --force`"
            )
    want = {n: (n in inputs, d) for n, d in device_dtypes.items()}
    if got != want:
        raise Sd3trtError(
            f"{component}: the engine's bindings {sorted(got.items())} differ from its metadata "
            f"{sorted(want.items())}; rebuild it with `sd3trt build --force`"
        )


def scratch_bytes(engine) -> int:
    """Scratch shared by every context: at least device_memory_size_v2 (set_device_memory's minimum) and
    at least what each optimization profile needs."""
    sizes = [int(getattr(engine, "device_memory_size_v2", getattr(engine, "device_memory_size", 0)))]
    if hasattr(engine, "get_device_memory_size_for_profile_v2"):
        sizes += [int(engine.get_device_memory_size_for_profile_v2(i)) for i in range(engine.num_optimization_profiles)]
    return max(sizes)


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
                self.errors.append(msg)  # raised with the Sd3trtError that follows; logged at debug level
                log.debug("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:  # advice, not failures: info level
                log.info("TensorRT: %s", msg)

    return CaptureLogger()
