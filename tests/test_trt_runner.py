"""TrtRunner and the GPU path: what can be checked without a GPU (here), and real runs (gpu-marked).

CPU tests cover the decisions that need no GPU: flavour vs GPU, capture state machine (fake CUDA
runtime in fake_cudart.py), runtime-cache save points, ONNX Runtime provider verification, size
parsing. GPU tests build the tiny bundle's engines for the GPU present (TensorRT-RTX for the current
compute capability, or full TensorRT), run them through TrtRunner and compare with ONNX Runtime on CPU.
They skip where there is no GPU (no driver, no cuda-bindings); on a GPU that the installed TensorRT
cannot target (TensorRT-RTX on a datacenter GPU) they fail with that message instead.
"""

from __future__ import annotations

import json
import logging
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from fake_cudart import Err, FakeContext, FakeCudart

from sd3trt.runtime.flavour import Flavour, gpu_mismatch, load_flavour
from sd3trt.profiles import Range, ShapeRequest
from sd3trt.errors import Sd3trtError
from sd3trt.manifest import load_bundle
from sd3trt.runtime import cuda as cuda_module
from sd3trt.runtime.caches import RuntimeCacheFile
from sd3trt.runtime.cuda import Cuda, check_cudart, find_gpu
from sd3trt.runtime.cuda_graph import CudaGraph
from sd3trt.runtime.ort_gpu import check_session_providers, ort_gpu_providers, provider_load_error
from sd3trt.runtime.runners import OrtRunner
from sd3trt.runtime.bf16 import bf16_bits_to_f32, f32_to_bf16_bits
from sd3trt.runtime.builds import read_metadata, select_build
from sd3trt.runtime.trt_runner import (
    TrtRunner, check_bindings, env_options, scratch_bytes,
)
from sd3trt.spec import concrete_shape, request_dims

ALL = ("clip_l", "clip_g", "t5", "vae_encoder", "vae_decoder", "transformer")
REQUEST = ShapeRequest(images=(Range(64, 96, 128),), batch=Range(1, 1, 2), cfg="both", t5_seq=Range(8, 16, 32))


def _find_gpu() -> tuple[tuple[str, str] | None, str]:
    """((compute capability, name), "") of GPU 0, or (None, why there is none)."""
    try:
        return find_gpu(0), ""
    except Sd3trtError as e:
        return None, str(e)


def _flavour_problem() -> str | None:
    """Why the installed TensorRT cannot run engines on the GPU present; None without a GPU or when it can."""
    if GPU is None:
        return None
    try:
        return gpu_mismatch(load_flavour(), *GPU)
    except Sd3trtError as e:
        return str(e)


GPU, NO_GPU_REASON = _find_gpu()
FLAVOUR_PROBLEM = _flavour_problem()
needs_gpu = pytest.mark.skipif(GPU is None, reason=f"needs an NVIDIA GPU: {NO_GPU_REASON}")
needs_no_gpu = pytest.mark.skipif(GPU is not None, reason="checks the no-GPU error; a GPU is present")


@pytest.fixture(scope="module")
def built(tiny_sd3, tmp_path_factory):
    """A private copy of the fp32 tiny bundle with one real fp32 engine build ("f32"): for the GPU present,
    or - TensorRT-RTX needs none to build - for compute capability 8.9."""
    from sd3trt.engines.build import BuildOptions, build_engines

    try:
        fl = load_flavour()
    except Sd3trtError as e:
        pytest.skip(str(e))
    if not fl.is_rtx and GPU is None:
        pytest.skip(f"{fl.name} needs a GPU to build engines")
    ccs = () if not fl.is_rtx else ("current",) if GPU is not None and FLAVOUR_PROBLEM is None else ("8.9",)
    bundle_dir = tmp_path_factory.mktemp("runner") / "bundle"
    shutil.copytree(tiny_sd3[1], bundle_dir)
    build_engines(bundle_dir, BuildOptions("fp32", name="f32", request=REQUEST, compute_capabilities=ccs),
                  log=lambda s: None)
    return bundle_dir


# --------------------------------------------------------------------------- without a GPU


@needs_no_gpu
def test_no_gpu_is_a_clear_error(built):
    bundle = load_bundle(built)
    with pytest.raises(Sd3trtError) as e:
        TrtRunner.from_bundle(bundle, "transformer")
    msg = str(e.value)
    assert ("no usable NVIDIA driver" in msg or "no NVIDIA GPU" in msg or "cuda-bindings" in msg), msg
    assert "--backend onnxruntime" in msg or "pip install cuda-bindings" in msg


@needs_no_gpu
def test_pipeline_tensorrt_backend_fails_cleanly_without_gpu(built):
    pipeline = pytest.importorskip("sd3trt.runtime.pipeline")
    pipe = pipeline.Img2Img.from_bundle(built, backend="tensorrt")
    with pytest.raises(Sd3trtError, match="NVIDIA|cuda-bindings"):
        pipe.runner("clip_l")


def test_bundle_without_engines(tiny_sd3):
    bundle = load_bundle(tiny_sd3[1])
    assert not bundle.data.get("engines")
    with pytest.raises(Sd3trtError, match=r"has no TensorRT engines; build them with `sd3trt build --bundle"):
        TrtRunner.from_bundle(bundle, "clip_l")


def test_build_selection(built, monkeypatch):
    bundle = load_bundle(built)
    assert select_build(bundle)[0] == "f32"
    with pytest.raises(Sd3trtError, match=r"no engine build 'nope'; it has f32"):
        select_build(bundle, "nope")
    monkeypatch.setenv("SD3TRT_ENGINE_BUILD", "nope")
    with pytest.raises(Sd3trtError, match="no engine build 'nope'"):
        select_build(bundle)
    # newest build wins when several are usable
    data = json.loads(json.dumps(bundle.data))
    data["engines"]["older"] = dict(data["engines"]["f32"], built_at="2000-01-01T00:00:00+00:00")
    monkeypatch.delenv("SD3TRT_ENGINE_BUILD")
    assert select_build(type(bundle)(bundle.root, data))[0] == "f32"
    entry = dict(data["engines"]["f32"], components={})
    with pytest.raises(Sd3trtError, match="has no transformer engine; run `sd3trt build"):
        read_metadata(bundle, "f32", entry, "transformer")


def test_precision_picks_the_engine_build_or_is_refused(built):
    """img2img --precision / --vae-precision with tensorrt: the build that has them, or one sentence; never ignored."""
    pipeline = pytest.importorskip("sd3trt.runtime.pipeline")
    bundle = load_bundle(built)
    data = json.loads(json.dumps(bundle.data))
    f32 = data["engines"]["f32"]
    data["engines"]["q8"] = dict(f32, precision="bf16", transformer_precision="int8", built_at="2000-01-01T00:00:00")
    both = type(bundle)(bundle.root, data)

    def build(**kw):
        return pipeline.Img2Img(both, backend="tensorrt", **kw).engine_build

    assert build() == "f32"  # the newest
    assert build(transformer_precision="int8") == "q8" and build(vae_precision="bf16") == "q8"
    assert build(transformer_precision="fp32", vae_precision="fp32") == "f32"
    assert build(engine_build="q8", transformer_precision="int8") == "q8"
    with pytest.raises(Sd3trtError, match=r"no engine build with a fp8 transformer \(it has f32 \(fp32/fp32\), "
                                          r"q8 \(int8/bf16\)\); build one with `sd3trt build --bundle .* --precision fp8`"):
        build(transformer_precision="fp8")
    with pytest.raises(Sd3trtError, match=r"engine build 'f32' runs the transformer in fp32 .*--precision int8`"):
        build(engine_build="f32", transformer_precision="int8")
    with pytest.raises(Sd3trtError, match="no engine build with a fp16 VAE"):
        build(vae_precision="fp16")
    with pytest.raises(Sd3trtError, match="int8 VAE is a CPU graph"):
        build(vae_precision="int8")
    with pytest.raises(Sd3trtError, match="unknown transformer precision 'int4'"):
        build(transformer_precision="int4")
    with pytest.raises(Sd3trtError, match="onnx_files picks ONNX Runtime graphs"):
        build(onnx_files={"transformer": "x.onnx"})
    with pytest.raises(Sd3trtError, match=r"onnxruntime backend runs the transformer in fp32 or int8 or fp8; fp16 is a "
                                          r"TensorRT engine precision: use --backend tensorrt"):
        pipeline.Img2Img(both, transformer_precision="fp16")


def test_engine_from_another_tensorrt_is_refused_before_touching_the_gpu(built):
    bundle = load_bundle(built)
    name, entry = select_build(bundle)
    meta = read_metadata(bundle, name, entry, "vae_decoder")
    engine = bundle.path(entry["components"]["vae_decoder"]["engine"])
    old = dict(meta, tensorrt_version="0.9.0")
    with pytest.raises(Sd3trtError, match=rf"was made with {meta['flavour']} 0\.9\.0, this machine has .*sd3trt build --force"):
        TrtRunner("vae_decoder", bundle.component("vae_decoder"), engine, old)
    other = dict(meta, flavour="tensorrt")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(Sd3trtError, match="tensorrt is not installed; pip install tensorrt-cu13"):
            TrtRunner("vae_decoder", bundle.component("vae_decoder"), engine, other)
    with pytest.raises(Sd3trtError, match="metadata is for 'vae_decoder', not 'transformer'"):
        TrtRunner("transformer", bundle.component("transformer"), engine, meta)
    with pytest.raises(Sd3trtError, match="built from another export"):
        TrtRunner("vae_decoder", bundle.component("vae_encoder"), engine, meta)


def test_bf16_host_conversion_matches_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 100,
                        np.array([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 3.4e38, -3.4e38, np.inf, -np.inf, 1e-40],
                                 np.float32)])
    bits = f32_to_bf16_bits(x)
    assert bits.dtype == np.uint16
    assert np.array_equal(bits, x.astype(ml_dtypes.bfloat16).view(np.uint16))  # round to nearest even
    back = bf16_bits_to_f32(bits)
    assert np.array_equal(back, x.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert np.isnan(bf16_bits_to_f32(f32_to_bf16_bits(np.array([np.nan], np.float32)))).all()


def test_ort_gpu_providers(built, tmp_path, monkeypatch):
    bundle = load_bundle(built)
    trt = ort_gpu_providers("tensorrt", bundle)
    assert [p if isinstance(p, str) else p[0] for p in trt] == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert trt[0][1]["trt_engine_cache_path"].endswith("engines/ort-trt") and trt[0][1]["trt_fp16_enable"] is False
    assert ort_gpu_providers("cuda")[0][0] == "CUDAExecutionProvider"
    with pytest.raises(Sd3trtError, match="use cuda or tensorrt"):
        ort_gpu_providers("rocm")
    # ONNX Runtime creates its cache directory without parents: a bundle without engines/ gets them made
    fresh = SimpleNamespace(root=tmp_path / "fresh", dtype="fp16")
    fresh.root.mkdir()
    opts = ort_gpu_providers("tensorrt", fresh)[0][1]
    assert opts["trt_engine_cache_path"] == str(fresh.root / "engines" / "ort-trt") and opts["trt_fp16_enable"]
    assert (fresh.root / "engines" / "ort-trt").is_dir()
    # a bundle where the directory cannot be made: the cache directory instead
    monkeypatch.setenv("SD3TRT_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "engines").write_text("a file where the directory would go")
    opts = ort_gpu_providers("tensorrt", SimpleNamespace(root=tmp_path / "blocked", dtype="fp32"))[0][1]
    assert opts["trt_engine_cache_path"].startswith(str(tmp_path / "cache" / "ort-trt-"))
    assert opts["trt_timing_cache_path"] == opts["trt_engine_cache_path"]
    assert ort_gpu_providers("tensorrt", SimpleNamespace(root=tmp_path / "blocked", dtype="fp32"))[0][1] == opts


# --------------------------------------------------------------------------- GPU-path logic, on the CPU


class _Session:
    def __init__(self, providers):
        self.providers = providers

    def get_providers(self):
        return self.providers


def test_session_on_another_provider_is_refused(tmp_path):
    cuda = ort_gpu_providers("cuda")
    check_session_providers(_Session(["CUDAExecutionProvider", "CPUExecutionProvider"]), cuda, "t5")
    check_session_providers(_Session(["CPUExecutionProvider"]), ["CPUExecutionProvider"], "t5")
    # CUDA's libraries failed to load: ONNX Runtime only logs it and runs the session on the CPU
    with pytest.raises(Sd3trtError, match=r"^t5: ONNX Runtime could not start its CUDAExecutionProvider \(the session "
                                          r"would run on CPUExecutionProvider\): .*; install what is missing or use "
                                          r"--backend onnxruntime$"):
        check_session_providers(_Session(["CPUExecutionProvider"]), cuda, "t5")
    # the TensorRT provider failed and CUDA took over
    with pytest.raises(Sd3trtError, match="could not start its TensorrtExecutionProvider .*would run on CUDAExecutionProvider"):
        check_session_providers(_Session(["CUDAExecutionProvider", "CPUExecutionProvider"]),
                                ort_gpu_providers("tensorrt"), "t5")


def test_provider_load_error_names_the_library(tmp_path):
    assert "has no libonnxruntime_providers_cuda.so (pip install onnxruntime-gpu" in provider_load_error(
        "CUDAExecutionProvider", tmp_path)
    (tmp_path / "libonnxruntime_providers_tensorrt.so").write_bytes(b"not a shared library")
    why = provider_load_error("TensorrtExecutionProvider", tmp_path)
    assert why.startswith("libonnxruntime_providers_tensorrt.so does not load (") and "libonnxruntime_providers_tensorrt.so" in why[40:]


def _graph(rt, **ctx_kw):
    cuda = Cuda(0, rt=rt)
    ctx = FakeContext(rt, **ctx_kw)
    return CudaGraph(cuda, ctx, "transformer"), ctx


def _run(graph, ctx, shapes):
    ctx.shapes = shapes  # what the runner's set_input_shape did
    graph.run(shapes, ctx.enqueue)


def test_cuda_graph_is_recaptured_after_a_shape_change():
    rt = FakeCudart()
    graph, ctx = _graph(rt)
    for shapes in ("A", "A", "B", "A", "A"):
        _run(graph, ctx, shapes)
    c = [x[0] for x in rt.calls]
    # A: plain run, then capture; A: replay; B: drop A, plain run (TensorRT needs one after a shape
    # change), capture; back to A: the same again - never a replay of a graph captured at other shapes
    assert c == ["enqueue", "begin", "enqueue", "end", "instantiate", "launch",
                 "exec_destroy", "enqueue", "begin", "enqueue", "end", "instantiate",
                 "exec_destroy", "enqueue", "begin", "enqueue", "end", "instantiate", "launch"]
    runs = [x for x in rt.calls if x[0] == "enqueue"]
    assert [r[1:] for r in runs] == [("A", "run"), ("A", "captured"), ("B", "run"), ("B", "captured"),
                                     ("A", "run"), ("A", "captured")]
    launched = [x[1] for x in rt.calls if x[0] == "launch"]
    assert launched == [rt.calls[4][1], rt.calls[-2][1]] and len(rt.live_execs) == 1
    graph.drop()
    assert not rt.live_execs and not rt.capturing


@pytest.mark.parametrize("failure", ["refused", "invalidated", "not capturable"])
def test_failed_capture_falls_back_to_plain_runs(failure, caplog):
    rt = FakeCudart()
    if failure == "refused":
        graph, ctx = _graph(rt, fail_in_capture=Sd3trtError("transformer: TensorRT failed to run"))
    elif failure == "invalidated":
        graph, ctx = _graph(rt)
        rt.end_capture_error = Err.cudaErrorStreamCaptureInvalidated
    else:
        graph, ctx = _graph(rt, capturable=False)
    with caplog.at_level(logging.WARNING, logger="sd3trt.runtime.cuda_graph"):
        for shapes in ("A", "A", "B"):
            _run(graph, ctx, shapes)
    assert not rt.capturing and not rt.live_execs and graph.failed
    assert [x[1] for x in rt.calls if x[0] == "enqueue" and x[2] == "run"] == ["A", "A", "B"]  # every run plain
    assert [x[0] for x in rt.calls].count("begin") == (0 if failure == "not capturable" else 1)  # tried once
    if failure == "invalidated":
        assert ("get_last_error",) in rt.calls  # the capture's error is cleared
    [record] = caplog.records  # reported once
    assert "CUDA graph capture failed" in record.message and "running without CUDA graphs" in record.message


def test_an_interrupt_during_capture_ends_the_capture():
    rt = FakeCudart()
    graph, ctx = _graph(rt, fail_in_capture=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        _run(graph, ctx, "A")
    assert not rt.capturing  # the stream is usable again
    ctx.fail_in_capture = None
    _run(graph, ctx, "B")
    assert rt.calls[-1][0] == "instantiate" and len(rt.live_execs) == 1


def test_gpu_discovery_errors():
    assert find_gpu(0, FakeCudart(cc=(9, 0), name="NVIDIA H200")) == ("9.0", "NVIDIA H200")
    with pytest.raises(Sd3trtError, match=r"no usable NVIDIA driver here .*CUDA 13\.0 runtime.*--backend onnxruntime"):
        find_gpu(0, FakeCudart(count_error=Err.cudaErrorInsufficientDriver))
    with pytest.raises(Sd3trtError, match=r"no NVIDIA GPU is available \(CUDA: cudaErrorNoDevice\)"):
        find_gpu(0, FakeCudart(count_error=Err.cudaErrorNoDevice))
    with pytest.raises(Sd3trtError, match="GPU 1 does not exist"):
        find_gpu(1, FakeCudart())
    check_cudart(FakeCudart(runtime=12000))
    with pytest.raises(Sd3trtError, match=r"cuda-python is for CUDA 11\.8, the TensorRT backend needs 12.*cuda-bindings>=12"):
        check_cudart(FakeCudart(runtime=11080))


def test_flavour_that_cannot_target_the_gpu():
    rtx = load_flavour("tensorrt_rtx") if _installed("tensorrt_rtx") else None
    full = Flavour("tensorrt", SimpleNamespace(), "10.13")
    assert gpu_mismatch(full, "9.0", "NVIDIA H200") is None
    assert full.rebuild_hint("9.0") == "`sd3trt build --force` on this GPU"
    if rtx is None:
        return
    msg = gpu_mismatch(rtx, "9.0", "NVIDIA H200")
    assert msg.startswith(f"tensorrt_rtx {rtx.version} cannot run engines on this NVIDIA H200 (compute capability 9.0;")
    assert msg.endswith("install full TensorRT for datacenter GPUs (pip install tensorrt-cu13) and build with "
                        "`sd3trt build --flavour tensorrt`")
    assert gpu_mismatch(rtx, "8.9", "NVIDIA GeForce RTX 4090") is None
    assert rtx.rebuild_hint("8.6") == "`sd3trt build --force --compute-capability 8.6`"


def _installed(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def test_runner_names_the_flavour_or_target_problem(built, monkeypatch):
    bundle = load_bundle(built)
    name, entry = select_build(bundle)
    meta = read_metadata(bundle, name, entry, "vae_decoder")
    if meta["flavour"] != "tensorrt_rtx":
        pytest.skip("full TensorRT builds on and for the GPU present")
    monkeypatch.setattr(cuda_module, "import_cudart", lambda: FakeCudart(cc=(9, 0), name="NVIDIA H200"))
    with pytest.raises(Sd3trtError, match=r"cannot run engines on this NVIDIA H200 .*install full TensorRT"):
        TrtRunner.from_bundle(bundle, "vae_decoder")
    other = (7, 5) if meta["target"]["compute_capabilities"] != ["7.5"] else (8, 6)
    cc = f"{other[0]}.{other[1]}"
    monkeypatch.setattr(cuda_module, "import_cudart", lambda: FakeCudart(cc=other, name="NVIDIA RTX"))
    with pytest.raises(Sd3trtError, match=rf"targets compute capability .*, this NVIDIA RTX is {cc}; rebuild it with "
                                          rf"`sd3trt build --force --compute-capability {cc}`"):
        TrtRunner.from_bundle(bundle, "vae_decoder")


class _Cache:
    """An IRuntimeCache: accepts or rejects a blob; serializes to its content."""

    def __init__(self, accept=True):
        self.accept, self.content, self.serialized = accept, b"compiled kernels", 0

    def deserialize(self, blob):
        if self.accept:
            self.content = bytes(blob)
        return self.accept

    def serialize(self):
        self.serialized += 1
        return self.content


def test_runtime_cache_saved_at_new_shapes_and_rejected_cache_replaced(tmp_path, caplog):
    path = tmp_path / "transformer.runtime.cache"
    cache = RuntimeCacheFile(_Cache(), path)
    for key in ("A", "A", "B", "A"):
        cache.ran(key)
    assert cache.cache.serialized == 2 and path.read_bytes() == b"compiled kernels"  # first A, first B
    accepted = RuntimeCacheFile(_Cache(), path)
    assert accepted.cache.content == b"compiled kernels"
    path.write_bytes(b"from another GPU")
    with caplog.at_level(logging.WARNING, logger="sd3trt.runtime.caches"):
        rejected = RuntimeCacheFile(_Cache(accept=False), path)
    [record] = caplog.records
    assert "rejected the runtime cache" in record.message and "replaces it at the next save" in record.message
    rejected.ran("A")
    assert path.read_bytes() == b"compiled kernels"


def test_runtime_cache_that_cannot_be_written_is_reported_once(tmp_path, caplog):
    (tmp_path / "blocked").write_text("a file where the directory would go")
    cache = RuntimeCacheFile(_Cache(), tmp_path / "blocked" / "x.runtime.cache")
    with caplog.at_level(logging.WARNING, logger="sd3trt.runtime.caches"):
        cache.ran("A")
        cache.save()
    [record] = caplog.records
    assert "cannot save the TensorRT-RTX runtime cache" in record.message and "SD3TRT_CACHE_DIR" in record.message


def test_env_options(monkeypatch):
    streaming = {"options": {"weight_streaming": True}}
    monkeypatch.setenv("SD3TRT_WEIGHT_STREAMING_BUDGET", "4GiB")
    assert env_options("transformer", streaming) == {"weight_streaming_budget": 4 << 30}
    assert env_options("transformer", {"options": {}}) == {}
    monkeypatch.setenv("SD3TRT_WEIGHT_STREAMING_BUDGET", "lots")
    with pytest.raises(Sd3trtError, match="SD3TRT_WEIGHT_STREAMING_BUDGET 'lots' is not a size such as 4GiB"):
        env_options("transformer", streaming)
    monkeypatch.delenv("SD3TRT_WEIGHT_STREAMING_BUDGET")
    monkeypatch.setenv("SD3TRT_CUDA_GRAPH", "1")
    assert env_options("transformer", streaming) == {"cuda_graph": True}
    assert env_options("vae_decoder", streaming) == {"cuda_graph": False}


class _Enum:
    def __init__(self, name):
        self.name = name


FAKE_TRT = SimpleNamespace(TensorIOMode=SimpleNamespace(INPUT="in", OUTPUT="out"),
                           TensorLocation=SimpleNamespace(DEVICE="device", HOST="host"))


class _Engine:
    def __init__(self, tensors, memory=0, per_profile=()):
        self.tensors, self.num_io_tensors = tensors, len(tensors)  # name -> (mode, dtype, location, shape io)
        self.names = list(tensors)
        self.device_memory_size_v2, self.per_profile = memory, per_profile
        self.num_optimization_profiles = len(per_profile)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, n):
        return self.tensors[n][0]

    def get_tensor_dtype(self, n):
        return _Enum(self.tensors[n][1])

    def get_tensor_location(self, n):
        return self.tensors[n][2]

    def is_shape_inference_io(self, n):
        return self.tensors[n][3]

    def get_device_memory_size_for_profile_v2(self, i):
        return self.per_profile[i]


def test_engine_bindings_are_checked():
    dtypes = {"latent": "float16", "sample": "float16"}
    good = {"latent": ("in", "HALF", "device", False), "sample": ("out", "HALF", "device", False)}
    check_bindings("vae_decoder", _Engine(good), FAKE_TRT, dtypes, {"latent"})
    with pytest.raises(Sd3trtError, match="differ from its metadata"):
        check_bindings("vae_decoder", _Engine(dict(good, sample=("out", "FLOAT", "device", False))), FAKE_TRT, dtypes, {"latent"})
    for bad in (("in", "HALF", "host", False), ("in", "HALF", "device", True)):
        with pytest.raises(Sd3trtError, match="engine tensor latent is a host-side shape tensor.*sd3trt build --force"):
            check_bindings("vae_decoder", _Engine(dict(good, latent=bad)), FAKE_TRT, dtypes, {"latent"})


def test_scratch_covers_the_engine_and_every_profile():
    assert scratch_bytes(_Engine({}, memory=1000, per_profile=(600, 1200))) == 1200
    assert scratch_bytes(_Engine({}, memory=1000, per_profile=(600, 800))) == 1000


# --------------------------------------------------------------------------- with a GPU


def _feeds(bundle, component, dims, dtype, seed=0):
    rng = np.random.default_rng(seed)
    feeds = {}
    for t in bundle.component(component)["inputs"]:
        shape = concrete_shape(t["shape"], dims)
        if t["dtype"] == "int64":
            feeds[t["name"]] = rng.integers(3, 300, shape)
        else:
            feeds[t["name"]] = rng.standard_normal(shape).astype(np.float32)
    if component == "transformer":
        feeds["timestep"] = np.linspace(990.5, 20.25, dims["batch"]).astype(np.float32)
    return {k: v.astype(dtype) if v.dtype == np.float32 and k != "timestep" else v for k, v in feeds.items()}


def _dims_for(facts, component, shape):
    batch, h, w, t5 = shape
    if component in ("clip_l", "clip_g", "t5", "vae_encoder"):
        batch = 1
    return request_dims(facts, batch, h, w, t5)


@pytest.fixture(scope="module")
def gpu_builds(tiny_sd3, tmp_path_factory):
    """fp32 and fp16 builds of the tiny bundle for this GPU (and bf16 derived from fp32). On a GPU the
    installed TensorRT cannot target, every test using them fails with the reason and the fix."""
    from sd3trt.engines.build import BuildOptions, build_engines
    from sd3trt.export.bundle import export_bundle

    if FLAVOUR_PROBLEM is not None:
        pytest.fail(FLAVOUR_PROBLEM, pytrace=False)
    ccs = ("current",) if load_flavour().is_rtx else ()
    root = tmp_path_factory.mktemp("gpu")
    b32 = root / "b32"
    shutil.copytree(tiny_sd3[1], b32)
    b16 = root / "b16"
    export_bundle(tiny_sd3[0], b16, dtype="fp16", log=lambda s: None)
    quiet = lambda s: None  # noqa: E731
    build_engines(b32, BuildOptions("fp32", name="f32", request=REQUEST, compute_capabilities=ccs), log=quiet)
    build_engines(b32, BuildOptions("bf16", name="bf16", request=REQUEST, compute_capabilities=ccs), log=quiet)
    build_engines(b16, BuildOptions("fp16", name="f16", request=REQUEST, compute_capabilities=ccs), log=quiet)
    return {"fp32": (b32, "f32"), "bf16": (b32, "bf16"), "fp16": (b16, "f16")}


# fp32 engines may use TF32 matmuls (TensorRT's default); fp16/bf16 are compared with the fp32 graph.
TOLERANCE = {"fp32": 5e-3, "fp16": 3e-2, "bf16": 8e-2}


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("component", ALL)
def test_engine_matches_onnxruntime(gpu_builds, tiny_sd3, precision, component):
    bundle_dir, build = gpu_builds[precision]
    bundle = load_bundle(bundle_dir)
    ref_bundle = load_bundle(tiny_sd3[1])  # fp32 ONNX Runtime reference
    runner = TrtRunner.from_bundle(bundle, component, build=build)
    ref = OrtRunner(component, ref_bundle.component(component), ref_bundle.onnx_path(component), threads=1)
    host = {"fp16": np.float16}.get(precision, np.float32)
    try:
        for i, shape in enumerate([(1, 64, 128, 8), (2, 128, 96, 32)]):
            dims = _dims_for(bundle.facts, component, shape)
            feeds = _feeds(bundle, component, dims, host, seed=i)
            got = runner.run(feeds)
            want = ref.run({k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in feeds.items()})
            for name, w in want.items():
                g = got[name].astype(np.float32)
                assert g.shape == w.shape, (component, name)
                rel = float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-6))
                assert rel < TOLERANCE[precision], (component, name, shape, rel)
    finally:
        runner.close()


@needs_gpu
@pytest.mark.gpu
def test_engine_bindings_and_profiles_on_the_gpu(gpu_builds):
    bundle_dir, build = gpu_builds["fp16"]
    bundle = load_bundle(bundle_dir)
    runner = TrtRunner.from_bundle(bundle, "transformer", build=build)
    try:
        e, trt = runner.engine, runner.trt
        assert e.num_optimization_profiles == 2  # CFG off and on
        names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        want = bundle.component("transformer")
        assert sorted(names) == sorted(t["name"] for t in want["inputs"] + want["outputs"])
        for t in want["inputs"]:
            for p, prof in enumerate(runner.meta["profiles"]):
                lo, opt, hi = e.get_tensor_profile_shape(t["name"], p)
                assert [list(lo), list(opt), list(hi)] == [prof["shapes"][t["name"]][k] for k in ("min", "opt", "max")]
            assert e.get_tensor_mode(t["name"]) == trt.TensorIOMode.INPUT
        feeds = _feeds(bundle, "transformer", request_dims(bundle.facts, 2, 256, 64, 16), np.float16)
        with pytest.raises(Sd3trtError, match="outside the optimization profiles"):
            runner.run(feeds)  # 256 px was not built: refused before anything runs
        feeds = _feeds(bundle, "transformer", request_dims(bundle.facts, 4, 64, 64, 16), np.float16)
        assert runner.run(feeds)["noise_pred"].shape == (4, 16, 8, 8)  # batch 4 only fits the CFG profile
        assert set(runner.contexts) == {1}
    finally:
        runner.close()
    if runner.flavour.is_rtx:
        assert runner.runtime_cache_path is not None and runner.runtime_cache_path.is_file()
    with pytest.raises(Sd3trtError, match="closed"):
        runner._run(feeds)


@needs_gpu
@pytest.mark.gpu
def test_wrong_flavour_is_a_clear_error(built):
    if FLAVOUR_PROBLEM is None:
        pytest.skip("the installed TensorRT can run engines on this GPU")
    with pytest.raises(Sd3trtError, match="install full TensorRT for datacenter GPUs"):
        TrtRunner.from_bundle(load_bundle(built), "vae_decoder")


@needs_gpu
@pytest.mark.gpu
def test_cuda_graph_follows_shape_changes(gpu_builds):
    """A -> B -> A on one context: each run matches a plain runner at its shape, and replays are identical.
    EAGER specialization: TensorRT-RTX's default (lazy) swaps kernels after the first runs at a shape."""
    bundle_dir, build = gpu_builds["fp16"]
    bundle = load_bundle(bundle_dir)
    plain = TrtRunner.from_bundle(bundle, "transformer", build=build, kernel_specialization="eager")
    graphed = TrtRunner.from_bundle(bundle, "transformer", build=build, cuda_graph=True, kernel_specialization="eager")
    try:
        a = _feeds(bundle, "transformer", request_dims(bundle.facts, 2, 96, 64, 16), np.float16)
        b = _feeds(bundle, "transformer", request_dims(bundle.facts, 2, 64, 128, 8), np.float16, seed=1)
        want = {"a": plain.run(a)["noise_pred"], "b": plain.run(b)["noise_pred"]}
        got = {"a": [], "b": []}
        for key, feeds in (("a", a), ("a", a), ("b", b), ("b", b), ("a", a), ("a", a)):
            got[key].append(graphed.run(feeds)["noise_pred"])  # first at a shape: run + capture; then replay
        for key, outs in got.items():
            assert all(np.array_equal(o, outs[0]) for o in outs[1:]), key
            scale = float(np.abs(want[key]).max())
            assert float(np.abs(outs[0].astype(np.float32) - want[key]).max()) <= 1e-3 * scale, key
        assert not any(g.failed for g in graphed.graphs.values())  # full TensorRT: our capture worked
    finally:
        plain.close()
        graphed.close()


@needs_gpu
@pytest.mark.gpu
def test_runtime_cache_saved_after_first_run_and_replaced_when_rejected(gpu_builds, tmp_path, caplog):
    bundle_dir, build = gpu_builds["fp16"]
    bundle = load_bundle(bundle_dir)
    path = tmp_path / "vae_decoder.runtime.cache"
    feeds = _feeds(bundle, "vae_decoder", _dims_for(bundle.facts, "vae_decoder", (1, 64, 64, 8)), np.float16)
    runner = TrtRunner.from_bundle(bundle, "vae_decoder", build=build, runtime_cache=path)
    try:
        if not runner.flavour.has_runtime_cache:
            pytest.skip(f"{runner.flavour.name} has no runtime cache")
        runner.run(feeds)
        assert path.is_file() and path.stat().st_size > 0  # saved without waiting for close()
    finally:
        runner.close()
    path.write_bytes(b"a cache from another GPU")
    runner = TrtRunner.from_bundle(bundle, "vae_decoder", build=build, runtime_cache=path)
    try:
        with caplog.at_level(logging.WARNING, logger="sd3trt.runtime.caches"):
            runner.run(feeds)
        assert any("rejected the runtime cache" in r.message for r in caplog.records)
        assert path.read_bytes() != b"a cache from another GPU"
    finally:
        runner.close()


@needs_gpu
@pytest.mark.gpu
def test_pipeline_tensorrt_matches_onnxruntime(gpu_builds):
    pipeline = pytest.importorskip("sd3trt.runtime.pipeline")
    from PIL import Image

    bundle_dir, build = gpu_builds["fp32"]
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (96, 64, 3), dtype=np.uint8), "RGB")
    bundle = load_bundle(bundle_dir)
    trt_pipe = pipeline.Img2Img(bundle, backend="tensorrt", engine_build=build)
    ort_pipe = pipeline.Img2Img(bundle, backend="onnxruntime")
    kw = dict(strength=0.6, steps=4, guidance_scale=5.0, seed=3, max_sequence_length=16)
    a = np.asarray(trt_pipe(picture, "a fox", **kw).images[0], np.int16)
    b = np.asarray(ort_pipe(picture, "a fox", **kw).images[0], np.int16)
    assert a.shape == b.shape and np.abs(a - b).max() <= 3
