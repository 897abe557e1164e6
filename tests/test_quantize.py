"""Quantized transformer (INT8 / FP8 Q/DQ): graph validity and coverage, the accuracy gate on the tiny
model, the INT8 CPU path through Img2Img, and real TensorRT-RTX engine builds (no GPU needed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from sd3trt.engines import accuracy as acc
from sd3trt.engines.calibrate import CalibData, CalibSettings, activation_ranges, collect, picture
from sd3trt.engines.gpu_targets import check_target
from sd3trt.engines.qdq_graph import KEEP, lower_qdq, plan_layers, quantize_model, quantize_weight, to_fp8
from sd3trt.engines.transformer_quant import quantize_bundle
from sd3trt.cli import main as sd3trt_main
from sd3trt.errors import Sd3trtError
from sd3trt.manifest import load_bundle, sha256_file
from sd3trt.runtime.ort_session import ort_session
from sd3trt.runtime.pipeline import Img2Img
from helpers import quiet

# Small calibration: 3 runs (2 fit, 1 held out) x 3 steps at 64 px, CFG batch 2.
SETTINGS = CalibSettings(prompts=3, holdout=1, steps=3, strength=0.9, size=64)
QTYPE = {"int8": TensorProto.INT8, "fp8": TensorProto.FLOAT8E4M3FN}


@pytest.fixture(scope="module")
def qbundle(tiny_sd3, tmp_path_factory):
    """A private copy of the tiny fp32 bundle with both quantized transformers (gate enforced)."""
    root = tmp_path_factory.mktemp("quant") / "bundle"
    shutil.copytree(tiny_sd3[1], root)
    entries = {p: quantize_bundle(root, p, SETTINGS, threads=2, log=quiet) for p in ("int8", "fp8")}
    return root, entries


def _linear_count(model: onnx.ModelProto) -> int:
    """MatMul/Gemm nodes whose weight is an initializer: the graph's linear layers, counted independently
    of the planner."""
    inits = {i.name for i in model.graph.initializer}
    return sum(n.op_type in ("MatMul", "Gemm") and n.input[1] in inits for n in model.graph.node)


def _session(model_or_path, optimized=None):
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else model_or_path
    return ort_session(src, threads=2, optimized_path=optimized)


# --------------------------------------------------------------------------- numerics


def test_weight_quantization_numerics():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 48)).astype(np.float32) * np.linspace(0.01, 2, 48, dtype=np.float32)
    q8, s8 = quantize_weight(w, "int8")
    assert q8.dtype == np.int8 and s8.shape == (48,) and np.abs(q8).max() == 127
    assert np.abs(q8 * s8 - w).max() <= s8.max() / 2 + 1e-7  # half a step, per channel
    qf, sf = quantize_weight(w, "fp8")
    assert str(qf.dtype) == "float8_e4m3fn" and np.allclose(np.abs(qf.astype(np.float32)).max(0), 448)
    rel = np.abs(qf.astype(np.float32) * sf - w) / np.maximum(np.abs(w), sf * 2**-6)
    assert rel.max() <= 2**-4 + 1e-6  # 3 mantissa bits: half an ulp
    assert to_fp8(np.array([1e6, -1e6], np.float32)).astype(np.float32).tolist() == [448.0, -448.0]  # saturates


# --------------------------------------------------------------------------- graph validity and coverage


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_qdq_graph_is_valid_and_covers_the_planned_layers(qbundle, precision):
    root, entries = qbundle
    bundle = load_bundle(root, verify_checksums=True)
    entry = bundle.quantized_entry(precision)
    assert entry == entries[precision]
    path = root / entry["file"]
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == (19 if precision == "fp8" else 17)

    src = onnx.load(str(bundle.onnx_path("transformer")))
    plan = plan_layers(src, keep=KEEP[precision])
    cov = entry["coverage"]
    # The tiny model's head_dim is 8: fp8's attention level has nothing to quantize, so the default is linear.
    assert entry["level"] == "linear" and cov["attention_quantized"] == 0
    if precision == "fp8":  # tried first, skipped with the reason recorded
        assert entry["levels_tried"][0]["level"] == "attention"
        assert "head_dim 8 is not a multiple of 16" in entry["levels_tried"][0]["skipped"]
    per_channel = precision == "int8"  # fp8: per-tensor weights (NVIDIA's recipe)
    assert cov["quantized"] == [l.name for l in plan.quantized]
    assert set(cov["kept"]) == {l.name for l in plan.kept}
    # What the default keep-list holds in float, and what it quantizes.
    for name in ("proj_out", "norm_out.linear", "transformer_blocks.0.norm1.linear",
                 "transformer_blocks.0.norm1_context.linear", "time_text_embed.timestep_embedder.linear_1"):
        assert cov["kept"][name].startswith("keep-list")
    assert cov["kept"]["transformer_blocks.0.attn.qk"].startswith("attention matmul")
    assert ("context_embedder" in cov["kept"]) == (precision == "fp8")
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_add_out",
                 "transformer_blocks.0.ff.net.2", "transformer_blocks.1.ff.net.0.proj"):
        assert name in cov["quantized"]
    ops = [n.op_type for n in src.graph.node]
    assert cov["not_linear"] == {"normalization": ops.count("LayerNormalization"), "patch embedding (Conv)": 1}
    n_q = len(plan.quantized)
    assert cov["linear_layers"] == _linear_count(src) and 0.45 < cov["weight_fraction_quantized"] < 0.6
    assert cov["linear_quantized"] == n_q == cov["linear_layers"] - sum(l.kind == "linear" for l in plan.kept)

    # In the graph: each quantized layer is DQ(x) x DQ(W[K, N], axis 1) with W stored quantized; kept ones untouched.
    inits = {i.name: i for i in model.graph.initializer}
    prod = {o: n for n in model.graph.node for o in n.output}
    nodes = {n.name: n for n in model.graph.node}
    for layer in plan.layers:
        node = nodes[layer.node]
        dq = [prod.get(i) for i in node.input[:2]]
        if not layer.quantize:
            assert all(d is None or d.op_type != "DequantizeLinear" for d in dq), layer.name
            continue
        assert [d.op_type for d in dq] == ["DequantizeLinear", "DequantizeLinear"], layer.name
        assert prod[dq[0].input[0]].op_type == "QuantizeLinear"
        w = inits[dq[1].input[0]]
        assert w.data_type == QTYPE[precision] and tuple(w.dims) == layer.weight_shape
        if per_channel:
            assert next(a.i for a in dq[1].attribute if a.name == "axis") == 1
            assert tuple(inits[dq[1].input[1]].dims) == (layer.weight_shape[1],)
        else:
            assert tuple(inits[dq[1].input[1]].dims) == ()
    counts = {op: sum(n.op_type == op for n in model.graph.node) for op in ("QuantizeLinear", "DequantizeLinear")}
    assert counts == {"QuantizeLinear": n_q, "DequantizeLinear": 2 * n_q}
    assert not any(n.op_type == "Transpose" and n.output[0] in {d.input[0] for d in model.graph.node
                   if d.op_type == "DequantizeLinear"} for n in model.graph.node)
    report = json.loads((root / f"onnx/transformer.{precision}.json").read_text())
    assert set(report["layers"]) == set(cov["quantized"])
    assert all(v["activation_amax"] > 0 for v in report["layers"].values())


def test_keep_list_is_configurable(qbundle):
    root, _ = qbundle
    src = onnx.load(str(root / "onnx" / "transformer.onnx"))
    everything = plan_layers(src, keep=(), attention=True)
    assert not everything.kept and everything.coverage()["weight_fraction_quantized"] == 1.0
    blocks = {n.split(".")[1] for n in (l.name for l in everything.layers) if n.startswith("transformer_blocks.")}
    assert everything.coverage()["attention_quantized"] == 2 * len(blocks)  # Q.K^T and P.V per joint block
    edges = plan_layers(src, keep=("@first_block", "@last_block", "proj_out"))
    assert all(not l.quantize for l in edges.layers if l.name.startswith("transformer_blocks."))
    assert [l.name for l in edges.quantized] == [l.name for l in edges.layers if l.quantize]
    assert {l.name for l in edges.quantized} == {"context_embedder", "time_text_embed.timestep_embedder.linear_1",
                                                 "time_text_embed.timestep_embedder.linear_2",
                                                 "time_text_embed.text_embedder.linear_1",
                                                 "time_text_embed.text_embedder.linear_2", "norm_out.linear"}
    with pytest.raises(Sd3trtError, match="@first_block"):
        plan_layers(src, keep=("@middle",))

    # Everything quantized (Gemms rewritten to MatMul + Add, attention matmuls with two activation Q/DQ)
    # still runs on ONNX Runtime and stays close to fp32 - the keep-list is about margin, not validity.
    data = collect(load_bundle(root), SETTINGS, log=quiet)
    fit, held = data.split()
    nodes = {n.name: n for n in src.graph.node}
    taps = everything.taps() + [nodes[l.node].input[1] for l in everything.layers if l.kind == "attention"]
    ranges = activation_ranges(root / "onnx" / "transformer.onnx", list(dict.fromkeys(taps)), data, fit, log=quiet)
    qm, _ = quantize_model(src, "int8", everything, ranges)
    onnx.checker.check_model(qm, full_check=True)
    assert not any(n.op_type == "Gemm" for n in qm.graph.node)
    ref, q = _session(root / "onnx" / "transformer.onnx"), _session(qm)
    feeds = data.feeds(held[0])
    assert acc.cosine(ref.run(None, feeds)[0], q.run(None, feeds)[0]) > 0.99


# --------------------------------------------------------------------------- calibration


def test_calibration_records_every_step_and_is_cached(qbundle):
    root, _ = qbundle
    bundle = load_bundle(root)
    logs = []
    data = collect(bundle, SETTINGS, log=logs.append)
    assert logs and logs[0].startswith("calibration: reusing")
    steps_run = 3  # strength 0.9 of 3 steps: diffusers starts at int(3 - 2.7) = 0
    assert len(data) == SETTINGS.prompts * steps_run
    assert data.hidden_states.shape == (len(data), 2, 16, 8, 8)  # CFG batch [uncond, cond]
    assert data.encoder_hidden_states.shape[:2] == (SETTINGS.prompts, 2)
    assert sorted(set(data.run.tolist())) == [0, 1, 2]
    fit, held = data.split()
    assert set(data.run[held].tolist()) == {2} and len(fit) == 2 * steps_run
    assert len({float(t) for t in data.timestep[:, 0]}) == steps_run  # the timesteps a run visits
    other = CalibSettings(**{**SETTINGS.__dict__, "seed": 5})
    files = sorted((root / "calibration").glob("transformer-*.npz"))  # recordings (the gate keeps a reference beside)
    assert len(files) == 1 and CalibData.load(files[0]).key == data.key
    from sd3trt.engines.calibrate import cache_key

    assert cache_key(bundle, other.checked(bundle.facts)) != data.key
    assert picture(0, 32).size == (32, 32) and np.asarray(picture(0, 32)).std() > 0


def test_range_methods_order(qbundle):
    root, _ = qbundle
    data = collect(load_bundle(root), SETTINGS, log=quiet)
    fit, _ = data.split()
    plan = plan_layers(onnx.load(str(root / "onnx" / "transformer.onnx"), load_external_data=False))
    taps = plan.taps()[:6]
    path = root / "onnx" / "transformer.onnx"
    mx = activation_ranges(path, taps, data, fit, "max", log=quiet)
    pc = activation_ranges(path, taps, data, fit, "percentile", percentile=99.0, log=quiet)
    ms = activation_ranges(path, taps, data, fit, "mse", precision="int8", log=quiet)
    for t in taps:
        assert 0 < pc[t] <= mx[t] * (1 + 1e-6) and 0 < ms[t] <= mx[t] * (1 + 1e-6)
    with pytest.raises(Sd3trtError, match="method"):
        activation_ranges(path, taps, data, fit, "entropy", log=quiet)


# --------------------------------------------------------------------------- the accuracy gate


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_accuracy_gate_holds_on_the_tiny_model(qbundle, precision):
    _, entries = qbundle
    a = entries[precision]["accuracy"]
    th = acc.GATE  # one gate for every precision
    assert acc.THRESHOLDS["int8"] == acc.THRESHOLDS["fp8"] == th
    assert a["passed"] and a["failures"] == [] and a["thresholds"] == th
    assert a["transformer"]["calls"] == 3 and a["image"]["runs"] == 1
    assert a["image"]["psnr_db"]["min"] >= th["psnr_db"] and a["image"]["ssim"]["min"] >= th["ssim"]
    assert 0 < a["transformer"]["cosine"]["min"] <= 1 and a["transformer"]["snr_db"]["min"] > 0  # diagnostics
    cal = entries[precision]["calibration"]
    assert cal["seconds"]["record"] > 0 and cal["seconds"]["ranges"] > 0


def test_a_failed_gate_leaves_the_bundle_alone(qbundle, tmp_path):
    # The gate is made to fail by a threshold no real graph reaches (infinite SNR), never by this CPU's
    # integer numerics: VNNI and AVX2 score the same graph 20 dB apart.
    root = tmp_path / "bundle"
    shutil.copytree(qbundle[0], root)  # with its calibration cache; the shared fixture stays as it is
    before = (root / "manifest.json").read_bytes()
    th = {**acc.THRESHOLDS["int8"], "snr_db": float("inf")}
    why = r"fails the accuracy gate \(transformer SNR dB [\d.]+ < inf\); keep .*--keep"
    with pytest.raises(Sd3trtError, match=why):
        quantize_bundle(root, "int8", SETTINGS, keep=(), image_gate=False, thresholds=th, threads=2, log=quiet)
    assert (root / "manifest.json").read_bytes() == before
    assert not list((root / "onnx").glob(".transformer.*"))  # no staging left behind
    assert load_bundle(root).quantized_entry("int8") == qbundle[1]["int8"]
    figures = {"transformer": {"cosine": {"min": 0.5}, "snr_db": {"min": 1.0}},
               "image": {"psnr_db": {"min": 60.0}, "ssim": {"min": 0.99}}}
    assert acc.gate("fp8", figures) == (True, [])  # transformer figures are diagnostics unless named
    ok, why = acc.gate("fp8", figures, {**acc.GATE, "cosine": 0.99, "snr_db": 20.0})
    assert not ok and len(why) == 2 and why[0].startswith("transformer cosine 0.5 <")
    ok, why = acc.gate("int8", {**figures, "image": {"psnr_db": {"min": 20.0}, "ssim": {"min": 0.5}}})
    assert not ok and why == ["image PSNR dB 20 < 30", "image SSIM 0.5 < 0.97"]


# --------------------------------------------------------------------------- INT8 CPU path


def test_int8_cpu_path_end_to_end_through_img2img(qbundle, tmp_path):
    root, entries = qbundle
    bundle = load_bundle(root)
    # ONNX Runtime fuses every quantized layer into an integer GEMM (the fast CPU path).
    _session(root / entries["int8"]["file"], optimized=tmp_path / "opt.onnx")
    fused = sum(n.op_type == "MatMulIntegerToFloat" for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert fused == entries["int8"]["coverage"]["linear_quantized"]

    image = picture(7, 64)
    kw = dict(strength=0.8, steps=4, guidance_scale=6.0, seed=3)
    ref = Img2Img(bundle)(image, "a lighthouse at dusk", **kw)
    pipe = Img2Img(bundle, transformer_precision="int8")
    res = pipe(image, "a lighthouse at dusk", **kw)
    assert res.images[0].size == (64, 64) and set(pipe.loaded_components) >= {"transformer", "vae_decoder"}
    a, b = np.clip(ref.decoded / 2 + 0.5, 0, 1), np.clip(res.decoded / 2 + 0.5, 0, 1)
    assert acc.psnr_db(a, b) >= acc.GATE["psnr_db"] and acc.ssim(a, b) >= acc.GATE["ssim"]
    assert not np.array_equal(a, b)  # it really ran the quantized graph
    # Naming the graph file is the same as naming the precision.
    pipe2 = Img2Img(bundle, onnx_files={"transformer": bundle.quantized_path("int8")})
    assert np.array_equal(pipe2(image, "a lighthouse at dusk", **kw).decoded, res.decoded)


def test_missing_or_stale_quantized_transformer_is_explained(qbundle, tiny_sd3):
    root, _ = qbundle
    with pytest.raises(Sd3trtError, match="sd3trt quantize --bundle .* --precision int8"):
        Img2Img(load_bundle(tiny_sd3[1]), transformer_precision="int8")
    bundle = load_bundle(root)
    bundle.data["quantized"]["transformer.int8"]["source"]["sha256"] = "0" * 64
    with pytest.raises(Sd3trtError, match="earlier export; re-run"):
        Img2Img(bundle, transformer_precision="int8")
    with pytest.raises(Sd3trtError, match="int8 or fp8"):
        bundle.quantized_path("int4")


# --------------------------------------------------------------------------- TensorRT


def test_fp8_is_refused_before_sm89():
    for cc in ("8.6", "8.0", "7.5", "sm86"):
        with pytest.raises(Sd3trtError, match="FP8 needs compute capability 8.9 or newer"):
            check_target("fp8", [cc])
    check_target("fp8", ["8.9", "9.0", "12.0"])
    check_target("int8", ["7.5", "8.6", "8.9", "12.0"])
    with pytest.raises(Sd3trtError, match="MAJOR.MINOR"):
        check_target("int8", ["ampere"])


def test_lowering_keeps_qdq_next_to_the_gemms(qbundle):
    from sd3trt.engines.mixed_precision import elem_types

    root, entries = qbundle
    data = collect(load_bundle(root), SETTINGS, log=quiet)
    feeds = data.feeds(data.split()[1][0])
    for precision in ("int8", "fp8"):
        qpath = root / entries[precision]["file"]
        low, report = lower_qdq(onnx.load(str(qpath)), "fp16")
        onnx.checker.check_model(low, full_check=True)
        types = elem_types(low)
        users = {}
        for n in low.graph.node:
            for i in n.input:
                users.setdefault(i, []).append(n.op_type)
        for n in low.graph.node:
            if n.op_type in ("QuantizeLinear", "DequantizeLinear"):  # Q takes fp16, DQ gives fp16 ...
                scale = next(i for i in low.graph.initializer if i.name == n.input[1])
                assert scale.data_type == TensorProto.FLOAT16
                assert types[n.input[0] if n.op_type == "QuantizeLinear" else n.output[0]] == TensorProto.FLOAT16
            if n.op_type == "DequantizeLinear":  # ... straight into the GEMM, no Cast in between
                assert users[n.output[0]] == ["MatMul"]
        n_q = entries[precision]["coverage"]["linear_quantized"]
        assert report["dq_folded"] == 2 * n_q and report["q_folded"] + report["q_cast_added"] == n_q
        read = {i for n in low.graph.node for i in n.input} | {o.name for o in low.graph.output}
        assert all(any(o in read for o in n.output) for n in low.graph.node)  # no Cast left dangling
        if precision == "int8":  # ORT runs the fp16 INT8 graph: same result as the fp32 Q/DQ graph
            a = _session(qpath).run(None, feeds)[0]
            b = _session(low).run(None, feeds)[0]
            assert acc.cosine(a, b) > 0.999


@pytest.mark.parametrize("precision,cc", [("int8", "8.6"), ("fp8", "8.9")])
def test_quantized_engine_builds(qbundle, tmp_path, precision, cc):
    """The quantized transformer goes through `sd3trt build`'s one loop: a real engine, metadata, manifest,
    reuse when nothing changed, the target checked before TensorRT starts."""
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed")
    from sd3trt.engines.build import BuildOptions, build_engines, make_logger
    from sd3trt.profiles import Range, ShapeRequest

    root = tmp_path / "bundle"
    shutil.copytree(qbundle[0], root)
    req = ShapeRequest(images=(Range(64, 64, 128),), image_step=16, batch=Range(1, 1, 1), cfg="on",
                       t5_seq=Range(8, 16, 32))
    low = "fp16" if precision == "int8" else "bf16"  # an fp32 bundle: bf16 unless named
    opts = BuildOptions(precision, components=("transformer",), request=req, flavour="tensorrt_rtx",
                        compute_capabilities=(cc,), workspace="256MiB", low="fp16" if low == "fp16" else None)
    entry = build_engines(root, opts, log=quiet)
    assert opts.workspace == "256MiB" and opts.request is req  # the caller's options are left alone
    name = f"{precision}-rtx-sm{cc.replace('.', '')}"
    bundle = load_bundle(root, verify_checksums=True)
    assert bundle.data["engines"][name] == entry
    assert entry["precision"] == precision and entry["components"]["transformer"]["precision"] == precision
    meta = json.loads((root / entry["components"]["transformer"]["metadata"]).read_text())
    assert meta["precision"] == precision and meta["strongly_typed"] and meta["target"]["compute_capabilities"] == [cc]
    assert meta["precision_source"] == f"quantized ({low} elsewhere)"
    assert meta["options"]["workspace"] == 256 << 20
    assert sha256_file(root / meta["engine"]) == meta["engine_sha256"] and meta["engine_bytes"] > 0
    assert meta["source_onnx"]["file"] == f"onnx/transformer.{precision}.onnx"
    assert [t["dtype"] for t in meta["io"]["inputs"]] == ["float32"] * 4
    n_q = qbundle[1][precision]["coverage"]["linear_quantized"]
    assert meta["quantized"]["accuracy_passed"] and meta["precision_pass"]["dq_folded"] == 2 * n_q
    # The network TensorRT built from: one Q and two DQ layers per quantized layer, strongly typed.
    graph, _ = lower_qdq(onnx.load(str(root / f"onnx/transformer.{precision}.onnx")), low)
    logger = make_logger(trt)
    net = trt.Builder(logger).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    assert trt.OnnxParser(net, logger).parse(graph.SerializeToString())
    types = [net.get_layer(i).type for i in range(net.num_layers)]
    assert types.count(trt.LayerType.QUANTIZE) == n_q and types.count(trt.LayerType.DEQUANTIZE) == 2 * n_q
    logs: list[str] = []
    assert build_engines(root, opts, log=logs.append)["components"] == entry["components"]
    assert f"transformer: unchanged, kept engines/{name}/transformer.engine" in logs
    if precision == "fp8":
        for ccs in (("8.6",), ()):  # a named Ampere target, and the portable default (which has 8.6)
            with pytest.raises(Sd3trtError, match="FP8 needs compute capability 8.9"):
                build_engines(root, BuildOptions("fp8", compute_capabilities=ccs, flavour="tensorrt_rtx"), log=quiet)
        with pytest.raises(Sd3trtError, match="weight-stripped fp8 engines cannot be refit"):
            build_engines(root, BuildOptions("fp8", compute_capabilities=("8.9",), strip_weights=True), log=quiet)


# --------------------------------------------------------------------------- command line


def test_quantize_command(qbundle, capsys, tmp_path):
    root = tmp_path / "bundle"
    shutil.copytree(qbundle[0], root)  # with its calibration cache
    argv = ["quantize", "--bundle", str(root), "--precision", "int8", "--calib-prompts", "3", "--holdout", "1",
            "--calib-steps", "3", "--calib-size", "64", "--calib-strength", "0.9", "--no-image-gate", "--threads", "2"]
    assert sd3trt_main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    assert summary["passed"] and summary["file"] == "onnx/transformer.int8.onnx" and summary["quantized_layers"] == (
        qbundle[1]["int8"]["coverage"]["linear_quantized"])
    assert "calibration: reusing" in out
    assert sd3trt_main(argv[:3] + ["--precision", "fp8", "--engine", "8.6"]) == 2
    assert "FP8 needs compute capability 8.9" in capsys.readouterr().err


def test_light_imports():
    code = ("import sys, argparse; import sd3trt.engines.quantize_cli as c, "
            "sd3trt.engines.gpu_targets; "
            "c.add_quantize_command(argparse.ArgumentParser().add_subparsers()); "
            "bad = [m for m in ('onnx', 'onnxruntime', 'torch', 'diffusers', 'tensorrt_rtx', 'numpy') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_quantized_paths_from_the_command_line(qbundle, tmp_path):
    """`sd3trt img2img --precision int8` and `sd3trt build --precision int8` on a quantized bundle."""
    root = tmp_path / "bundle"
    shutil.copytree(qbundle[0], root)
    src = tmp_path / "in.png"
    picture(7, 64).save(src)
    for p in ("int8", "fp8"):
        assert sd3trt_main(["img2img", "--bundle", str(root), "--image", str(src), "--prompt", "a boat",
                            "--steps", "3", "--precision", p, "--out", str(tmp_path / f"{p}.png")]) == 0
    fp32 = Img2Img(load_bundle(root))(src, "a boat", steps=3, seed=0)
    int8 = Img2Img(load_bundle(root), transformer_precision="int8")(src, "a boat", steps=3, seed=0)
    assert not np.array_equal(fp32.decoded, int8.decoded)
    pytest.importorskip("tensorrt_rtx")
    assert sd3trt_main(["build", "--bundle", str(root), "--precision", "int8", "--compute-capability", "8.6",
                        "--image-size", "64:64:128", "--cfg", "on", "--t5-seq", "8:16:32", "--name", "q"]) == 0
    entry = load_bundle(root, verify_checksums=True).data["engines"]["q"]
    assert entry["precision"] == "int8"
    assert {c: v["precision"] for c, v in entry["components"].items()} == {
        "clip_l": "bf16", "clip_g": "bf16", "t5": "bf16", "vae_encoder": "bf16", "vae_decoder": "bf16",
        "transformer": "int8"}
    assert sd3trt_main(["build", "--bundle", str(root), "--precision", "fp8", "--compute-capability", "8.6"]) == 2
