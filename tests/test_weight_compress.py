"""8-bit weights without calibration (`sd3trt compress-weights`, `img2img --weights w8`) on the tiny bundles."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from sd3trt.engines.cpu_gate import GateSettings
from sd3trt.engines.weight_compress import compress_bundle, quantize_weight
from sd3trt.errors import Sd3trtError
from sd3trt.export.bundle import export_bundle
from sd3trt.manifest import load_bundle
from sd3trt.runtime.pipeline import Img2Img

pytest.importorskip("openvino")
GATE_RUNS = GateSettings(runs=1, steps=4, size=64)
REQUEST = dict(prompt="a watercolor fox", negative_prompt="blurry", strength=0.6, steps=4, seed=3)


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SD3TRT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ov-cache"))


@pytest.fixture(scope="module")
def w8_bundle(tiny_sd3, tmp_path_factory):
    root = tmp_path_factory.mktemp("w8") / "bundle"
    shutil.copytree(tiny_sd3[1], root)
    entries = compress_bundle(root, ("transformer", "t5"), GATE_RUNS, log=_quiet)
    return root, entries


def test_weights_are_int8_with_one_scale_per_output_channel():
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    q, scale = quantize_weight(w, axis=1)  # MatMul's B [K, N]: a scale per N
    assert q.dtype == np.int8 and scale.shape == (32,) and np.abs(q).max() == 127
    assert np.abs(q * scale - w).max() <= scale.max() / 2 + 1e-7  # rounding to nearest


def test_compressed_graphs_are_listed_gated_and_run(w8_bundle, tiny_sd3):
    root, entries = w8_bundle
    b = load_bundle(root, verify_checksums=True)  # the new files are listed with their sha256
    for c in ("transformer", "t5"):
        e = entries[c]
        assert e["report"]["bytes_after"] < 0.3 * e["report"]["bytes_before"]  # fp32 -> int8 + scales
        assert e["gate"]["passed"] and e["gate"]["image"]["psnr_db"]["min"] >= 30
    assert set(b.compressed_graphs()) == {"transformer", "t5"}
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with Img2Img(load_bundle(tiny_sd3[1]), backend="onnxruntime") as p:
        ref = p(pixels, **REQUEST).decoded
    for backend in ("onnxruntime", "openvino"):
        with Img2Img(b, backend=backend, weights="w8", cpu_precision="fp32" if backend == "openvino" else None) as p:
            assert p.onnx_files["transformer"].name == "transformer.w8.onnx"
            assert p.onnx_files["vae_decoder"].name == "vae_decoder.onnx"
            out = p(pixels, **REQUEST).decoded
        assert 0 < np.abs(out - ref).max() < 0.1, backend


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_openvino_keeps_the_weights_compressed(tiny_sd3, tmp_path, dtype):
    """OpenVINO's compiled transformer reads int8 weights in its FullyConnected layers (not expanded at load)."""
    from sd3trt.runtime.ov_runner import OvRunner

    root = export_bundle(tiny_sd3[0], tmp_path / dtype, dtype=dtype, components=("transformer",), log=_quiet)
    compress_bundle(root, ("transformer",), None, log=_quiet)
    b = load_bundle(root)
    runner = OvRunner("transformer", b.component("transformer"), b.compressed_graphs()["transformer"], "fp32")
    fcs = [op for op in runner.compiled.get_runtime_model().get_ordered_ops()
           if op.get_rt_info()["layerType"].astype(str) == "FullyConnected"]
    weight_types = {str(op.input(1).get_element_type()) for op in fcs}
    runner.close()
    assert any("i8" in t or "int8" in t for t in weight_types), weight_types


def test_bad_uses_are_refused(tiny_sd3, tmp_path):
    root = tmp_path / "bundle"
    shutil.copytree(tiny_sd3[1], root)
    with pytest.raises(Sd3trtError, match="no usable 8-bit-weight graphs .none made from the present export"):
        Img2Img.from_bundle(root, weights="w8")
    with pytest.raises(Sd3trtError, match="vae_decoder is not compressed"):
        compress_bundle(root, ("vae_decoder",), None, log=_quiet)
    compress_bundle(root, ("transformer",), None, log=_quiet)
    with pytest.raises(Sd3trtError, match="8-bit weights are graphs for the CPU backends, not tensorrt"):
        Img2Img.from_bundle(root, backend="tensorrt", weights="w8")
    with pytest.raises(Sd3trtError, match="unknown weights 'w4'"):
        Img2Img.from_bundle(root, weights="w4")


def test_modules_kept_in_fp32_get_fp32_weights_back(tiny_factory, tmp_path):
    """A 16-bit graph with an fp32 block (spec.Fp32Rule): each weight is expanded to its own type."""
    import onnx
    import onnxruntime as ort

    from sd3trt.export.components import example_inputs
    from sd3trt.spec import Fp32Rule, component_specs, request_dims

    rule = Fp32Rule("transformer", ("transformer_blocks.1",), ("fp16",), {}, "sd3trt", "test")
    root = export_bundle(tiny_factory("sd35")[0], tmp_path / "b16", dtype="fp16", fp32_rules={"transformer": (rule,)},
                         components=("transformer",), log=_quiet)
    compress_bundle(root, ("transformer",), None, log=_quiet)
    b = load_bundle(root)
    path = b.compressed_graphs()["transformer"]
    onnx.checker.check_model(str(path))
    facts = b.facts
    args = example_inputs(facts, "transformer", "fp16", request_dims(facts, 2, 64, 64, 8))
    feeds = {t.name: a.numpy() for t, a in zip(component_specs(facts)["transformer"].inputs, args)}
    feeds["timestep"] = feeds["timestep"].astype(np.float32)
    ref = ort.InferenceSession(str(b.onnx_path("transformer"))).run(None, feeds)[0].astype(np.float32)
    out = ort.InferenceSession(str(path)).run(None, feeds)[0].astype(np.float32)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.05
