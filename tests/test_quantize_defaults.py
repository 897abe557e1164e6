"""`sd3trt quantize` with its defaults on an SD3-style and an SD3.5-style tiny model, for int8 and fp8: one
gate for both precisions, FP8 attention (NVIDIA's recipe), TensorRT-RTX engines from the result.

The models have head_dim 16 (TensorRT's fused FP8 attention needs head_dim % 16 == 0; the other tiny
variants have 8). The SD3.5 style has qk RMS-norm, a dual-attention block, a 3-level VAE
and CLIP-G padded with "!".

Everything is the CLI default except `--calib-scale 0.25` (and --threads 2): the default calibration is 12
runs x 28 steps at 1024 px (capped at the tiny model's 512 px), about two minutes a model on 2 cores; the
knob keeps the image size, prompts, strength, method, layers, level choice and gate, and scales only the
number of runs and steps (3 runs of 7 steps), so the figures come from the same kind of inputs.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from sd3trt.cli import main as sd3trt_main
from sd3trt.engines import accuracy as acc
from sd3trt.engines.calibrate import picture
from sd3trt.engines.qdq_graph import lower_qdq
from sd3trt.manifest import load_bundle
from sd3trt.runtime.pipeline import Img2Img
from helpers import quiet

STYLES = {
    "sd3": dict(head_dim=16),
    "sd35": dict(sd35=True, head_dim=16, vae_levels=3),
}
ARGS = ["--calib-scale", "0.25", "--threads", "2"]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """style -> (bundle root, {precision: (summary printed, manifest entry)}), quantized by the CLI."""
    import contextlib
    import io

    from sd3trt.export.bundle import export_bundle
    from sd3trt.export.tiny_model import TinyOptions, make_tiny

    out = {}
    for style, kw in STYLES.items():
        base = tmp_path_factory.mktemp(f"qdefaults-{style}")
        model = make_tiny(base / "model", TinyOptions(**kw))
        root = export_bundle(model, base / "bundle", log=quiet)
        res = {}
        for p in ("int8", "fp8"):
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                rc = sd3trt_main(["quantize", "--bundle", str(root), "--precision", p, *ARGS])
            text = buf.getvalue()
            assert rc == 0, text[-2000:]
            res[p] = (json.loads(text[text.index("{\n"):]), load_bundle(root).quantized_entry(p), text)
        out[style] = (root, res)
    return out


def test_the_sd35_style_model_has_the_sd35_features(quantized):
    root, _ = quantized["sd35"]
    model_dir = root.parent / "model"
    t = json.loads((model_dir / "transformer" / "config.json").read_text())
    v = json.loads((model_dir / "vae" / "config.json").read_text())
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(model_dir / "tokenizer_2")
    assert t["qk_norm"] == "rms_norm" and list(t["dual_attention_layers"]) == [0] and t["attention_head_dim"] == 16
    assert len(v["block_out_channels"]) == 3
    assert tok.pad_token == "!"


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_defaults_pass_the_one_gate(quantized, style, precision):
    root, res = quantized[style]
    summary, entry, log = res[precision]
    a = entry["accuracy"]
    assert summary["passed"] and a["passed"] and a["thresholds"] == acc.GATE  # the same gate for both precisions
    assert a["image"]["psnr_db"]["min"] >= acc.GATE["psnr_db"] and a["image"]["ssim"]["min"] >= acc.GATE["ssim"]
    assert "transformer" in a and a["transformer"]["calls"] > 0  # diagnostics recorded
    cal = entry["calibration"]
    side = min(1024, load_bundle(root).facts.max_image_side)  # 1024 px, capped by the model (512 / 256 px)
    assert cal["settings"]["steps"] == 7 and cal["settings"]["prompts"] == 3 and cal["settings"]["size"] == side
    assert cal["seconds"]["record"] > 0 and cal["seconds"]["ranges"] > 0
    cov = entry["coverage"]
    n_attn = cov["attention_matmuls"]
    assert n_attn == (6 if style == "sd35" else 4)  # Q.K^T and P.V per attention (2 in the dual block)
    if precision == "fp8":  # NVIDIA's recipe: FP8 attention, per-tensor weights, 16-bit embedders
        assert entry["level"] == "attention" and cov["attention_quantized"] == n_attn
        assert entry["scheme"]["weights"] == "per-tensor symmetric"
        assert "context_embedder" in cov["kept"] and "proj_out" in cov["kept"] and "norm_out.linear" in cov["kept"]
    else:  # INT8: linear layers, per-channel weights, attention in 16-bit
        assert entry["level"] == "linear" and cov["attention_quantized"] == 0
        assert entry["scheme"]["weights"] == "per-output-channel symmetric"
        assert "context_embedder" in cov["quantized"]
    assert all(k.startswith(("time_text_embed", "norm_out", "proj_out", "context_embedder"))
               or ".norm1" in k or ".attn" in k for k in cov["kept"])


@pytest.mark.parametrize("style", list(STYLES))
def test_image_vs_fp32_pipeline_stays_above_the_gate(quantized, style):
    """A request the calibration never saw (other picture, prompt, size, steps and seed)."""
    root, _ = quantized[style]
    bundle = load_bundle(root)
    image = picture(11, 128)
    kw = dict(strength=0.7, steps=6, guidance_scale=5.0, seed=9)
    ref = Img2Img(bundle)(image, "a lighthouse on a rock at dusk", **kw).decoded
    ref = np.clip(ref / 2 + 0.5, 0, 1)
    for p in ("int8", "fp8"):
        got = Img2Img(bundle, transformer_precision=p)(image, "a lighthouse on a rock at dusk", **kw).decoded
        got = np.clip(got / 2 + 0.5, 0, 1)
        assert not np.array_equal(ref, got)
        assert acc.psnr_db(ref, got) >= acc.GATE["psnr_db"] and acc.ssim(ref, got) >= acc.GATE["ssim"], p


def test_a_broken_scale_fails_the_gate(quantized, tmp_path):
    """The gate catches a wrong weight scale (forced by the scale, not by this CPU's numerics): the fp8 graph
    the defaults wrote, with every weight scale doubled."""
    from onnx import numpy_helper

    from sd3trt.engines.calibrate import CalibSettings, collect

    root, res = quantized["sd35"]
    bundle = load_bundle(root)
    entry = res["fp8"][1]
    model = onnx.load(str(root / entry["file"]))
    for i, t in enumerate(model.graph.initializer):
        if t.name.endswith(".weight_scale"):
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 2, t.name))
    path = tmp_path / "broken.onnx"
    onnx.save(model, str(path))
    settings = CalibSettings(**entry["calibration"]["settings"])
    data = collect(bundle, settings, log=quiet)
    held = data.split()[1]
    figures = {"transformer": acc.transformer_accuracy(bundle.onnx_path("transformer"), path, data, held, 2),
               "image": acc.image_accuracy(bundle, path, settings, [int(data.run[held[0]])], 2, quiet)}
    ok, why = acc.gate("fp8", figures)
    assert not ok and why[0].startswith("image PSNR dB"), figures


@pytest.mark.parametrize("style,precision,cc", [("sd3", "fp8", "8.9"), ("sd35", "fp8", "8.9"), ("sd35", "int8", "8.6")])
def test_engines_build_with_8bit_layers(quantized, tmp_path, style, precision, cc):
    """A real TensorRT-RTX build of the quantized transformer, and the strongly typed network it came from:
    every quantized GEMM and (fp8) both attention matmuls read 8-bit Q -> DQ inputs."""
    import shutil

    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is not installed")
    from sd3trt.engines.build import BuildOptions, build_engines, make_logger
    from sd3trt.profiles import Range, ShapeRequest

    root = tmp_path / "bundle"
    shutil.copytree(quantized[style][0], root)
    entry = quantized[style][1][precision][1]
    req = ShapeRequest(images=(Range(64, 64, 128),), image_step=16, batch=Range(1, 1, 1), cfg="on",
                       t5_seq=Range(8, 16, 32))
    opts = BuildOptions(precision, components=("transformer",), request=req, flavour="tensorrt_rtx",
                        compute_capabilities=(cc,), workspace="256MiB", low="fp16")
    built = build_engines(root, opts, log=quiet)
    meta = json.loads((root / built["components"]["transformer"]["metadata"]).read_text())
    assert meta["precision"] == precision and meta["strongly_typed"] and meta["engine_bytes"] > 0

    graph, _ = lower_qdq(onnx.load(str(root / entry["file"])), "fp16")
    logger = make_logger(trt)
    net = trt.Builder(logger).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    assert trt.OnnxParser(net, logger).parse(graph.SerializeToString())
    eight = trt.DataType.FP8 if precision == "fp8" else trt.DataType.INT8
    producer = {}
    for i in range(net.num_layers):
        layer = net.get_layer(i)
        for k in range(layer.num_outputs):
            producer[layer.get_output(k).name] = layer
    cov = entry["coverage"]
    n_q = cov["linear_quantized"] + 2 * cov["attention_quantized"]
    quant = [net.get_layer(i) for i in range(net.num_layers) if net.get_layer(i).type == trt.LayerType.QUANTIZE]
    assert len(quant) == n_q and all(q.get_output(0).dtype == eight for q in quant)
    # Matrix multiplies fed by DQ on both inputs (an 8-bit GEMM or batched matmul TensorRT can fuse).
    mm8 = 0
    for i in range(net.num_layers):
        layer = net.get_layer(i)
        if layer.type != trt.LayerType.MATRIX_MULTIPLY:
            continue
        srcs = [producer.get(layer.get_input(k).name) for k in range(2)]
        # the parser broadcasts a 2-D weight to the activation's rank with a Shuffle after its DQ
        srcs = [producer.get(x.get_input(0).name) if x is not None and x.type == trt.LayerType.SHUFFLE else x
                for x in srcs]
        if all(s is not None and s.type == trt.LayerType.DEQUANTIZE for s in srcs):
            assert all(s.get_output(0).dtype == trt.DataType.HALF for s in srcs)
            assert all(s.get_input(0).dtype == eight for s in srcs)
            mm8 += 1
    assert mm8 == cov["linear_quantized"] + cov["attention_quantized"]
