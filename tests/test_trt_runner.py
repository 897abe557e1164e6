"""TrtRunner: what fails cleanly without a GPU (here), and real engine runs vs ONNX Runtime (gpu-marked).

GPU tests build the tiny bundle's engines for the GPU present (TensorRT-RTX for the current compute
capability, or full TensorRT), run them through TrtRunner and compare with ONNX Runtime on CPU. They
skip cleanly where there is no GPU, no CUDA driver, no cuda-bindings, or a TensorRT-RTX that cannot
target this GPU.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from sd3trt.engines.profiles import Range, ShapeRequest
from sd3trt.errors import Sd3trtError
from sd3trt.manifest import load_bundle
from sd3trt.runtime.runners import OrtRunner
from sd3trt.runtime.trt_runner import (
    TrtRunner, bf16_bits_to_f32, f32_to_bf16_bits, ort_gpu_providers, read_metadata, select_build,
)
from sd3trt.spec import concrete_shape, request_dims

ALL = ("clip_l", "clip_g", "t5", "vae_encoder", "vae_decoder", "transformer")
REQUEST = ShapeRequest(images=(Range(64, 96, 128),), batch=Range(1, 1, 2), cfg="both", t5_seq=Range(8, 16, 32))


def _gpu_reason() -> str | None:
    """None when a GPU, a driver, cuda-bindings and a TensorRT that can build for it are all here."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            return "cuda-bindings is not installed"
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or not count:
        return "no CUDA GPU / driver"
    try:
        from sd3trt.engines.flavour import load_flavour

        fl = load_flavour()
    except Sd3trtError as e:
        return str(e)
    if fl.is_rtx:
        _, props = cudart.cudaGetDeviceProperties(0)
        if f"SM{props.major}{props.minor}" not in fl.trt.ComputeCapability.__members__:
            return f"{fl.name} {fl.version} cannot target compute capability {props.major}.{props.minor}"
    return None


GPU_REASON = _gpu_reason()
needs_gpu = pytest.mark.skipif(GPU_REASON is not None, reason=f"needs a usable NVIDIA GPU: {GPU_REASON}")
needs_no_gpu = pytest.mark.skipif(GPU_REASON is None, reason="checks the no-GPU error; a GPU is present")


@pytest.fixture(scope="module")
def built(tiny_sd3, tmp_path_factory):
    """A private copy of the fp32 tiny bundle with one real fp32 engine build ("f32"): for the GPU present,
    or - TensorRT-RTX needs none to build - for compute capability 8.9."""
    from sd3trt.engines.build import BuildOptions, build_engines
    from sd3trt.engines.flavour import load_flavour

    try:
        fl = load_flavour()
    except Sd3trtError as e:
        pytest.skip(str(e))
    if not fl.is_rtx and GPU_REASON is not None:
        pytest.skip(f"{fl.name} needs a GPU to build engines")
    ccs = () if not fl.is_rtx else ("current",) if GPU_REASON is None else ("8.9",)
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


def test_engine_from_another_tensorrt_is_refused_before_touching_the_gpu(built):
    bundle = load_bundle(built)
    name, entry = select_build(bundle)
    meta = read_metadata(bundle, name, entry, "vae_decoder")
    engine = bundle.path(entry["components"]["vae_decoder"]["engine"])
    old = dict(meta, tensorrt_version="0.9.0")
    with pytest.raises(Sd3trtError, match=r"was made with tensorrt_rtx 0\.9\.0, this machine has .*sd3trt build --force"):
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


def test_ort_gpu_providers(built):
    bundle = load_bundle(built)
    trt = ort_gpu_providers("tensorrt", bundle)
    assert [p if isinstance(p, str) else p[0] for p in trt] == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert trt[0][1]["trt_engine_cache_path"].endswith("engines/ort-trt") and trt[0][1]["trt_fp16_enable"] is False
    assert ort_gpu_providers("cuda")[0][0] == "CUDAExecutionProvider"
    with pytest.raises(Sd3trtError, match="use cuda or tensorrt"):
        ort_gpu_providers("rocm")


def test_runtime_imports_no_torch_or_onnx():
    code = ("import sys, sd3trt.runtime.trt_runner; "
            "bad = [m for m in ('torch', 'onnx', 'diffusers', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


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
    """fp32 and fp16 builds of the tiny bundle for this GPU (and bf16 derived from fp32)."""
    from sd3trt.engines.build import BuildOptions, build_engines
    from sd3trt.engines.flavour import load_flavour
    from sd3trt.export.bundle import export_bundle

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
def test_cuda_graph_replay_is_identical(gpu_builds):
    bundle_dir, build = gpu_builds["fp16"]
    bundle = load_bundle(bundle_dir)
    plain = TrtRunner.from_bundle(bundle, "transformer", build=build)
    graphed = TrtRunner.from_bundle(bundle, "transformer", build=build, cuda_graph=True)
    try:
        feeds = _feeds(bundle, "transformer", request_dims(bundle.facts, 2, 96, 64, 16), np.float16)
        want = plain.run(feeds)["noise_pred"]
        for _ in range(3):  # the first run captures, the next ones replay
            assert np.array_equal(graphed.run(feeds)["noise_pred"], want)
    finally:
        plain.close()
        graphed.close()


@needs_gpu
@pytest.mark.gpu
def test_pipeline_tensorrt_matches_onnxruntime(gpu_builds):
    pipeline = pytest.importorskip("sd3trt.runtime.pipeline")
    from PIL import Image

    bundle_dir, build = gpu_builds["fp32"]
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (96, 64, 3), dtype=np.uint8), "RGB")
    bundle = load_bundle(bundle_dir)
    trt_pipe = pipeline.Img2Img(bundle, backend="tensorrt",
                                runner_factory=lambda n: TrtRunner.from_bundle(bundle, n, build=build))
    ort_pipe = pipeline.Img2Img(bundle, backend="onnxruntime")
    kw = dict(strength=0.6, steps=4, guidance_scale=5.0, seed=3, max_sequence_length=16)
    a = np.asarray(trt_pipe(picture, "a fox", **kw).images[0], np.int16)
    b = np.asarray(ort_pipe(picture, "a fox", **kw).images[0], np.int16)
    assert a.shape == b.shape and np.abs(a - b).max() <= 3
