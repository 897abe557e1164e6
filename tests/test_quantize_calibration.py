"""Calibration at scale, on the tiny model: block-by-block ranges against whole-graph ranges, the backends
and their one ranges file, quantization from an fp16 bundle through the gate, the streaming Q/DQ writer's
memory, --calib-prompts FILE, the time estimate's refusal, and the recipe's kept layers."""

from __future__ import annotations

import json
import shutil
import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from sd3trt.engines import calib_backends, calib_estimate
from sd3trt.engines import accuracy as acc
from sd3trt.engines.calib_backends import Backend, choose
from sd3trt.engines.calibrate import CalibSettings, activation_ranges, collect, read_prompts, run_inputs
from sd3trt.engines.qdq_graph import (FP8_KEEP, KEEP, KEEP_BY_DEPTH, MODELOPT_FILTER, Plan, Layer, block_count,
                                      keep_for_depth, plan_layers, quantize_model, rewrite)
from sd3trt.engines.qdq_writer import weight_reader, write_streaming
from sd3trt.engines.transformer_quant import quantize_bundle
from sd3trt.errors import Sd3trtError
from sd3trt.manifest import load_bundle

SETTINGS = CalibSettings(prompts=3, holdout=1, steps=3, strength=0.9, size=64)
# Block-by-block vs whole graph, max |x|, measured on the tiny SD3 model: fp32 within 8.5e-8 relative
# (0.7 ulp; most tensors equal), fp16 within 6.3e-4 (under one fp16 ulp, 2^-10): the parts' graphs fuse
# differently at their edges. The bounds: two fp32 ulps, one fp16 ulp.
ROUNDING = {"fp32": 2.0**-22, "fp16": 2.0**-10}


def _quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def bundles(tiny_sd3, tmp_path_factory):
    """dtype -> a private copy of the tiny bundle exported in that type."""
    from sd3trt.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("calib")
    fp32 = root / "fp32"
    shutil.copytree(tiny_sd3[1], fp32)
    return {"fp32": fp32, "fp16": export_bundle(tiny_sd3[0], root / "fp16", dtype="fp16", log=_quiet)}


def _taps(path):
    plan = plan_layers(onnx.load(str(path), load_external_data=False), keep=(), attention=True)
    return plan.taps()


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_block_by_block_ranges_equal_whole_graph_ranges(bundles, dtype, tmp_path):
    bundle = load_bundle(bundles[dtype])
    backend = Backend("onnxruntime", dtype, 2)
    data = collect(bundle, SETTINGS, threads=2, log=_quiet, backend=backend)
    fit, _ = data.split()
    src = bundle.onnx_path("transformer")
    taps = _taps(src)
    logs = []
    whole = activation_ranges(src, taps, data, fit, backend=backend, log=_quiet)
    parts = activation_ranges(src, taps, data, fit, backend=backend, blocks=True, work_dir=tmp_path, log=logs.append)
    assert [l for l in logs if "part" in l] == [f"calibration: part {i}/2 measured ({n} tensors)"
                                                for i, n in ((1, 16), (2, 9))]  # two blocks, every tap once
    assert set(whole) == set(parts) == set(taps) and all(v > 0 for v in whole.values())
    worst = max(abs(whole[t] - parts[t]) / whole[t] for t in taps)
    assert worst <= ROUNDING[dtype], f"block-by-block ranges differ by {worst:.3g} relative"
    assert list(tmp_path.iterdir()) == []  # the spilled block inputs are gone
    if dtype == "fp32":  # fp16: one tensor's 99th percentile moved 1.6% (docs/quantization.md), so max only
        pct_whole = activation_ranges(src, taps, data, fit, "percentile", 99.0, backend=backend, log=_quiet)
        pct_parts = activation_ranges(src, taps, data, fit, "percentile", 99.0, backend=backend, blocks=True,
                                      log=_quiet)
        assert max(abs(pct_whole[t] - pct_parts[t]) / pct_whole[t] for t in taps) <= ROUNDING[dtype]


def test_backends_write_one_ranges_file(bundles, tmp_path):
    """ONNX Runtime and OpenVINO measure the same tensors into the same file format; fp32 OpenVINO agrees with
    ONNX Runtime to float rounding, bf16 OpenVINO to bf16's 8 bits."""
    pytest.importorskip("openvino")
    files = {}
    for name in ("onnxruntime", "openvino"):
        root = tmp_path / name
        shutil.copytree(bundles["fp32"], root, ignore=shutil.ignore_patterns("calibration", "*.int8.*"))
        entry = quantize_bundle(root, "int8", SETTINGS, calib_backend=name, threads=2, log=_quiet)
        assert entry["calibration"]["backend"].startswith(name) and entry["accuracy"]["passed"]
        per_call = entry["calibration"]["seconds_per_call"]
        assert per_call["record"] > 0 and per_call["ranges"] > 0
        (path,) = (root / "calibration").glob("ranges-*.json")
        files[name] = json.loads(path.read_text())
    a, b = files["onnxruntime"], files["openvino"]
    assert set(a) == set(b) and set(a["tensors"]) == set(b["tensors"]) and a["method"] == b["method"] == "max"
    assert a["backend"] == "onnxruntime (fp32)" and b["backend"] in ("openvino (fp32)", "openvino (bf16)")
    tol = 2.0**-7 if b["backend"].endswith("(bf16)") else 1e-4
    # The recorded inputs differ too (each backend ran the whole img2img), so the bound is on the ranges' ratio.
    worst = max(abs(a["tensors"][t] - b["tensors"][t]) / a["tensors"][t] for t in a["tensors"])
    assert worst <= 4 * tol, worst


def test_quantizing_an_fp16_bundle_keeps_fp16_and_passes_the_gate(bundles, tmp_path):
    root = tmp_path / "b"
    shutil.copytree(bundles["fp16"], root)
    for precision in ("int8", "fp8"):
        entry = quantize_bundle(root, precision, SETTINGS, calib_backend="onnxruntime", threads=2, log=_quiet)
        a = entry["accuracy"]
        assert a["passed"] and a["image"]["psnr_db"]["min"] >= acc.GATE["psnr_db"]
        assert entry["source_dtype"] == "fp16" and entry["scheme"]["unquantized"] == "fp16" and entry["opset"] == 19
        model = onnx.load(str(root / entry["file"]))
        floats = {t.data_type for t in model.graph.initializer} & {TensorProto.FLOAT, TensorProto.FLOAT16}
        assert floats == {TensorProto.FLOAT16}  # every float weight and scale stays 16-bit
        dq_types = {t.data_type for t in model.graph.initializer if t.name.endswith("weight_scale")}
        assert dq_types == {TensorProto.FLOAT16}
        assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
        seconds = entry["calibration"]["seconds"]
        assert seconds["total"] >= seconds["gate"] > 0 and entry["calibration"]["seconds_per_call"]["record"] > 0
    with pytest.raises(Sd3trtError, match="bf16 bundle cannot be calibrated yet.*--dtype fp16"):
        choose("auto", type("B", (), {"dtype": "bf16"})())
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed")
    from sd3trt.engines.build import BuildOptions, build_engines
    from sd3trt.profiles import Range, ShapeRequest

    req = ShapeRequest(images=(Range(64, 64, 64),), image_step=16, batch=Range(1, 1, 1), cfg="on",
                       t5_seq=Range(8, 16, 32))
    entry = build_engines(root, BuildOptions("fp8", components=("transformer",), request=req, flavour="tensorrt_rtx",
                                             compute_capabilities=("8.9",), workspace="256MiB"), log=_quiet)
    meta = json.loads((root / entry["components"]["transformer"]["metadata"]).read_text())
    assert meta["precision"] == "fp8" and meta["strongly_typed"] and meta["engine_bytes"] > 0
    assert [t["dtype"] for t in meta["io"]["inputs"]] == ["float16", "float16", "float16", "float32"]


def _linear_chain(path, layers: int, width: int):
    """A graph of `layers` MatMuls with [width, width] fp32 weights in external data."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), f"w{i}")
        inits.append(w)
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"y{i}"], name=f"/layers.{i}/MatMul"))
        x = f"y{i}"
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, width])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [4, width])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return model


def _stream(tmp_path, layers: int, width: int):
    """(peak traced bytes while writing, written files, source path, plan, ranges) of a chain's Q/DQ graph."""
    src = tmp_path / f"chain{layers}.onnx"
    _linear_chain(src, layers, width)
    graph = onnx.load(str(src), load_external_data=False)
    plan = plan_layers(graph, keep=())
    ranges = {l.activation: 4.5 for l in plan.quantized}  # unit-variance activations (weights scaled 1/sqrt(width))
    qdq = rewrite(graph, "int8", plan, ranges, weight_reader(graph, src.parent))
    out = tmp_path / f"out{layers}"
    out.mkdir()
    tracemalloc.start()
    files = write_streaming(qdq, src.parent, out / "q.onnx")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, files, src, plan, ranges


def test_streaming_writer_holds_one_weight_and_writes_what_memory_would(tmp_path):
    width = 512  # 1 MiB a weight
    weight = width * width * 4
    few, _, _, _, _ = _stream(tmp_path, 2, width)
    peak, files, src, plan, ranges = _stream(tmp_path, 16, width)
    # One weight's quantization at a time (its copies: bytes read, float values, rounding): the peak does not
    # grow with the layer count, and stays far under the 16 MiB the weights take.
    assert peak < few * 1.25 + 2**16 and peak < 16 * weight / 2, (few, peak)
    assert [f.name for f in files] == ["q.onnx", "q.onnx.data"] and files[0].stat().st_size < weight / 8
    streamed = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(files[0])).graph.initializer}
    memory, _ = quantize_model(onnx.load(str(src)), "int8", plan, ranges)
    expected = {t.name: numpy_helper.to_array(t) for t in memory.graph.initializer}
    assert streamed.keys() == expected.keys() and all(np.array_equal(streamed[k], expected[k]) for k in expected)
    x = np.random.default_rng(1).standard_normal((4, width)).astype(np.float32)
    from sd3trt.runtime.ort_session import ort_session

    ref = ort_session(src).run(None, {"x": x})[0]
    got = ort_session(files[0]).run(None, {"x": x})[0]
    assert acc.snr_db(ref, got) > 20  # 16 int8 layers in a row still compute the chain


def test_calib_prompts_file(tmp_path, bundles):
    from sd3trt.engines.quantize_cli import _settings

    f = tmp_path / "prompts.txt"
    f.write_text("a red bicycle\n\n  a lighthouse at night  \na bowl of cherries\na snowy street\n")
    assert read_prompts(f) == ("a red bicycle", "a lighthouse at night", "a bowl of cherries", "a snowy street")
    args = type("A", (), dict(calib_scale=1.0, calib_prompts=str(f), calib_steps=2, calib_strength=None,
                              calib_size=64, seed=None, holdout=0))()
    s = _settings(args)
    assert s.prompts == 4 and s.holdout == 1 and s.prompt_texts[1] == "a lighthouse at night"
    assert [run_inputs(s, i)["prompt"] for i in range(4)] == list(s.prompt_texts)
    args.calib_prompts = "6"
    assert _settings(args).prompts == 6 and _settings(args).prompt_texts == ()
    (tmp_path / "one.txt").write_text("only one\n")
    with pytest.raises(Sd3trtError, match="has 1 prompt"):
        read_prompts(tmp_path / "one.txt")
    with pytest.raises(Sd3trtError, match="no such file"):
        read_prompts(tmp_path / "missing.txt")
    bundle = load_bundle(bundles["fp32"])
    with pytest.raises(Sd3trtError, match="one prompt a run"):
        collect(bundle, CalibSettings(**{**s.__dict__, "prompts": 3}), log=_quiet)


def test_a_long_calibration_is_refused_before_it_starts(bundles, tmp_path):
    root = tmp_path / "b"
    shutil.copytree(bundles["fp32"], root, ignore=shutil.ignore_patterns("calibration", "*.int8.*", "*.fp8.*"))
    bundle = load_bundle(root)
    model = onnx.load(str(bundle.onnx_path("transformer")), load_external_data=False)
    est = calib_estimate.estimate(model, bundle.facts, SETTINGS, Backend("onnxruntime", "fp32", 2), "fp32",
                                  tmp_path, 1, "max", 25, False, False)
    with pytest.raises(Sd3trtError) as e:  # a limit of a quarter of the estimate: --calib-scale ~0.5 fits it
        quantize_bundle(root, "int8", SETTINGS, calib_backend="onnxruntime", time_limit_s=est.seconds / 4, threads=2,
                        log=_quiet)
    msg = str(e.value)
    assert "would take" in msg and "--calib-scale 0." in msg and "--allow-long" in msg and "GFLOP/s" in msg
    assert not (root / "calibration").exists()  # nothing recorded
    small, big = (calib_estimate.flops_per_call(model, bundle.facts, CalibSettings(**{**SETTINGS.__dict__, "size": s}))
                  for s in (512, 1024))
    assert small > 0 and 2.5 < big / small < 16  # 4x the image tokens (text stays 333): linear < x4, attention < x16
    assert calib_estimate.steps_run(SETTINGS) == 3 and calib_estimate.steps_run(CalibSettings()) == 21


def test_the_recipe_keeps_the_field_s_layers():
    assert set(MODELOPT_FILTER) <= set(FP8_KEEP) and "proj_out" in FP8_KEEP
    assert {"pos_embed.*", "x_embedder*"} <= set(KEEP["int8"]) and "context_embedder" not in KEEP["int8"]
    names = [f"/transformer/transformer_blocks.{i}/attn/to_q/MatMul" for i in range(38)]
    assert block_count(names) == 38 and KEEP_BY_DEPTH[38] == ("transformer_blocks.35.*",)
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"], name=n) for n in names[:1]], "g", [], [])
    assert keep_for_depth(helper.make_model(g)) == ()
    g38 = helper.make_graph([helper.make_node("Identity", ["x"], ["y"], name=n) for n in names], "g", [], [])
    assert keep_for_depth(helper.make_model(g38)) == ("transformer_blocks.35.*",)


def test_backend_choice_and_the_cuda_path_logic(monkeypatch, bundles):
    bundle = load_bundle(bundles["fp16"])
    monkeypatch.setattr(calib_backends, "_gpu_answers", lambda: True)
    b = choose("auto", bundle, threads=2)
    assert b.name == "cuda" and b.precision == "fp16"
    assert b.providers()[0] == ("CUDAExecutionProvider", {"device_id": 0})
    monkeypatch.setattr(calib_backends, "_gpu_answers", lambda: False)
    with pytest.raises(Sd3trtError, match="--calib-backend cuda needs onnxruntime-gpu"):
        choose("cuda", bundle)
    assert choose("onnxruntime", bundle).describe() == "onnxruntime (fp16)"
    with pytest.raises(Sd3trtError, match="unknown calibration backend"):
        choose("tpu", bundle)
    if calib_backends._openvino_installed():
        assert choose("auto", bundle).name == "openvino"


def test_the_estimate_counts_the_flops_the_benchmarks_count(tiny_sd3, bundles):
    """The quantizer counts from the ONNX graph (a bundle keeps no diffusers config), the benchmarks from the
    config (benchmarks/flops.py): the same matrix products, but for the patch-embedding Conv."""
    from sd3trt.benchmarks.flops import transformer_call_flops

    bundle = load_bundle(bundles["fp32"])
    config = json.loads((tiny_sd3[0] / "transformer" / "config.json").read_text())
    model = onnx.load(str(bundle.onnx_path("transformer")), load_external_data=False)
    for size in (64, 512):
        s = CalibSettings(size=size)
        latent = size // bundle.facts.vae_scale_factor
        ref = transformer_call_flops(config, latent, latent, 77 + s.max_sequence_length, 2)["total"]
        assert abs(calib_estimate.flops_per_call(model, bundle.facts, s) / ref - 1) < 0.02


def test_block_by_block_quantization_records_and_gates_in_parts(bundles, tmp_path):
    """blocks=True: the transformer is recorded, measured and gated one block at a time, and a part-wise
    run of the float and the Q/DQ graph gives the whole graph's output."""
    from sd3trt.engines.calib_blocks import PartsRunner
    from sd3trt.runtime.runners import OrtRunner

    root = tmp_path / "b"
    shutil.copytree(bundles["fp32"], root, ignore=shutil.ignore_patterns("calibration", "*.int8.*", "*.fp8.*"))
    logs = []
    entry = quantize_bundle(root, "int8", SETTINGS, calib_backend="onnxruntime", blocks=True, threads=2,
                            log=logs.append)
    assert entry["calibration"]["blocks"] and entry["accuracy"]["passed"]
    assert any("part 2/2 measured" in line for line in logs)
    bundle = load_bundle(root)
    data = collect(bundle, SETTINGS, log=_quiet, backend=Backend("onnxruntime", "fp32", 2))
    spec = bundle.component("transformer")
    for path in (bundle.onnx_path("transformer"), root / entry["file"]):
        whole = OrtRunner("transformer", spec, path, threads=2).run(data.feeds(4))["noise_pred"]
        parts = PartsRunner("transformer", spec, path, Backend("onnxruntime", "fp32", 2)).run(data.feeds(4))
        assert np.abs(parts["noise_pred"] - whole).max() <= 1e-5 * np.abs(whole).max()


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_t5_runs_in_parts_as_it_runs_whole(bundles, dtype):
    """Block-by-block recording runs T5 in parts too (its 11 GB fp16 graph is the other component that does not
    fit whole beside OpenVINO's copy): one part per encoder block, the same hidden states as the whole graph."""
    from sd3trt.engines.calib_blocks import cut
    from sd3trt.runtime.runners import OrtRunner

    bundle = load_bundle(bundles[dtype])
    spec, path = bundle.component("t5"), bundle.onnx_path("t5")
    backend = Backend("onnxruntime", dtype, 2)
    parts = backend.runner("t5", spec, path, blocks=True)
    assert len(cut(onnx.load(str(path), load_external_data=False))) == len(parts.parts) > 1
    ids = np.random.default_rng(0).integers(0, 100, (2, 16)).astype(np.int64)
    whole = OrtRunner("t5", spec, path, threads=2).run({"input_ids": ids})
    got = parts.run({"input_ids": ids})
    for name, value in whole.items():
        assert got[name].dtype == value.dtype
        np.testing.assert_array_equal(got[name], value)


def test_the_gate_s_reference_is_computed_once_per_recording(bundles, tmp_path):
    """The bundle's own outputs the gate compares with are kept beside the recording: a second precision gated on
    the same recording runs only its own graph (fewer gate calls in its estimate) and gets the same figures as
    when it computes the reference itself."""
    root = tmp_path / "b"
    shutil.copytree(bundles["fp32"], root, ignore=shutil.ignore_patterns("calibration", "*.int8.*", "*.fp8.*"))
    logs = []
    quantize_bundle(root, "int8", SETTINGS, calib_backend="onnxruntime", threads=2, log=logs.append)
    refs = list((root / "calibration").glob("reference-*.npz"))
    assert len(refs) == 1
    with np.load(refs[0]) as z:
        assert {k for k in z.files if k.startswith("image")} == {"image2"}  # the one held-out run
        calls = [k for k in z.files if k.startswith("call")]
        assert len(calls) == SETTINGS.holdout * calib_estimate.steps_run(SETTINGS)
    first = next(line for line in logs if line.startswith("estimate:"))
    logs.clear()
    kept = quantize_bundle(root, "fp8", SETTINGS, calib_backend="onnxruntime", threads=2, level="linear",
                           log=logs.append)
    again = next(line for line in logs if line.startswith("estimate:"))
    per_run = calib_estimate.steps_run(SETTINGS)
    recording, reference = SETTINGS.prompts * per_run, 2 * SETTINGS.holdout * per_run  # both kept from the first
    assert int(first.split()[1]) - int(again.split()[1]) == recording + reference  # one level each
    refs[0].unlink()
    fresh = quantize_bundle(root, "fp8", SETTINGS, calib_backend="onnxruntime", threads=2, level="linear", force=True,
                            log=_quiet)
    assert kept["accuracy"]["image"] == fresh["accuracy"]["image"]
    assert kept["accuracy"]["transformer"] == fresh["accuracy"]["transformer"]
