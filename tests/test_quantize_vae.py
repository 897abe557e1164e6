"""INT8 VAE convolutions (ONNX Runtime CPU): the graph, its gate, the bundle entry, and Img2Img using it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from sd3trt.engines import accuracy as acc
from sd3trt.engines.calibrate import CalibSettings, picture
from sd3trt.engines.vae_quant import THRESHOLDS, quantize_vae
from sd3trt.errors import Sd3trtError
from sd3trt.manifest import load_bundle, sha256_file
from sd3trt.runtime.pipeline import Img2Img
from helpers import quiet

SETTINGS = CalibSettings(prompts=4, holdout=1, size=64)


@pytest.fixture(scope="module")
def vbundle(tiny_sd3, tmp_path_factory):
    """A copy of the tiny bundle with the int8 decoder made by the command line's defaults."""
    from sd3trt.cli import main

    root = tmp_path_factory.mktemp("qvae") / "bundle"
    shutil.copytree(tiny_sd3[1], root)
    assert main(["quantize", "--bundle", str(root), "--precision", "int8", "--component", "vae_decoder"]) == 0
    return root, load_bundle(root).data["quantized"]["vae_decoder.int8"]


def test_cli_defaults_pass_the_gate_quietly(vbundle, tmp_path, capfd):
    from sd3trt.cli import main

    root, entry = vbundle
    assert entry["calibration"]["settings"]["prompts"] == 8 and entry["calibration"]["side_px"] == 256
    assert entry["accuracy"]["passed"] and entry["accuracy"]["vae_decoder"]["psnr_db"]["min"] >= THRESHOLDS["psnr_db"]
    copy = tmp_path / "bundle"
    shutil.copytree(root, copy)
    capfd.readouterr()
    assert main(["quantize", "--bundle", str(copy), "--precision", "int8", "--component", "vae_decoder"]) == 0
    out, err = capfd.readouterr()
    assert "WARNING" not in out + err and "pre-processing" not in out + err
    assert json.loads(out[out.index("{"):])["accuracy"]["passed"]


def test_decoder_graph_quantizes_the_convolutions_and_is_listed(vbundle, tmp_path):
    root, entry = vbundle
    assert entry["accuracy"]["passed"] and entry["accuracy"]["vae_decoder"]["psnr_db"]["min"] >= THRESHOLDS["psnr_db"]
    g = onnx.load(str(root / entry["file"])).graph
    producers = {o: n for n in g.node for o in n.output}
    convs = [n for n in g.node if n.op_type == "Conv"]
    quantized = [n for n in convs if producers.get(n.input[1]) is not None
                 and producers[n.input[1]].op_type == "DequantizeLinear"]
    kept = {n.name for n in convs} - {n.name for n in quantized}
    assert kept == set(entry["scheme"]["kept"])
    assert {"/decoder/conv_in/Conv", "/decoder/conv_out/Conv"} <= kept
    assert all("conv_in" in n or "conv_out" in n or "/mid_block/" in n for n in kept)
    assert len(quantized) == len(convs) - len(kept) > 10
    # Weights: int8, 7-bit range (reduce_range: no saturation in the AVX2 u8s8 kernels).
    inits = {i.name: i for i in g.initializer}
    w = onnx.numpy_helper.to_array(inits[producers[quantized[0].input[1]].input[0]])
    assert w.dtype == np.int8 and np.abs(w.astype(int)).max() <= 64
    # ONNX Runtime fuses them into integer convolutions (the fast path).
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(root / entry["file"]), so, providers=["CPUExecutionProvider"])
    assert sum(n.op_type == "QLinearConv" for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node) == len(quantized)
    manifest = json.loads((root / "manifest.json").read_text())
    listed = manifest["quantized"]["vae_decoder.int8"]
    assert listed["files"] == {entry["file"]: sha256_file(root / entry["file"])}


def test_img2img_with_the_int8_decoder(vbundle):
    root, _ = vbundle
    bundle = load_bundle(root)
    kw = dict(strength=0.7, steps=3, guidance_scale=5.0, seed=2)
    ref = Img2Img(bundle)(picture(5, 64), "a red barn", **kw)
    pipe = Img2Img(bundle, vae_precision="int8")
    assert pipe.onnx_files["vae_decoder"] == root / "onnx" / "vae_decoder.int8.onnx"
    assert pipe.onnx_files["vae_encoder"] == root / "onnx" / "vae_encoder.onnx"  # no int8 encoder listed
    res = pipe(picture(5, 64), "a red barn", **kw)
    a, b = np.clip(ref.decoded / 2 + 0.5, 0, 1), np.clip(res.decoded / 2 + 0.5, 0, 1)
    assert not np.array_equal(a, b)
    assert acc.psnr_db(a, b) >= THRESHOLDS["psnr_db"]


def test_a_failed_gate_leaves_the_bundle_alone(vbundle, tmp_path):
    root = tmp_path / "bundle"
    shutil.copytree(vbundle[0], root)
    before = (root / "manifest.json").read_bytes()
    # Failure forced by a threshold no graph reaches, not by this CPU's integer numerics.
    with pytest.raises(Sd3trtError, match=r"int8 vae_encoder fails the accuracy gate \(.*latent SNR dB [\d.]+ < inf"):
        quantize_vae(root, "vae_encoder", SETTINGS, thresholds={"latent_snr_db": float("inf")}, threads=2, log=quiet)
    assert (root / "manifest.json").read_bytes() == before
    assert not (root / "onnx" / "vae_encoder.int8.onnx").exists()
    assert not [p for p in (root / "onnx").iterdir() if p.name.startswith(".")]  # no staging left


def test_missing_int8_vae_and_bad_requests_are_explained(tiny_sd3, capsys):
    bundle = load_bundle(tiny_sd3[1])
    with pytest.raises(Sd3trtError, match="no int8 vae_decoder or vae_encoder.*--component vae_decoder"):
        Img2Img(bundle, vae_precision="int8")
    with pytest.raises(Sd3trtError, match="unknown VAE precision 'fp8'"):
        Img2Img(bundle, vae_precision="fp8")
    with pytest.raises(Sd3trtError, match="int8 VAE is a CPU graph, not for the tensorrt backend; use --backend onnxruntime or openvino"):
        Img2Img(bundle, backend="tensorrt", vae_precision="int8")
    with pytest.raises(Sd3trtError, match="takes vae_encoder or vae_decoder, not 'transformer'"):
        quantize_vae(tiny_sd3[1], "transformer")
    from sd3trt.cli import main

    assert main(["quantize", "--bundle", str(tiny_sd3[1]), "--precision", "fp8", "--component", "vae_decoder"]) == 2
    assert "int8 only" in capsys.readouterr().err
    # The transformer's options are refused with the VAE, not ignored.
    assert main(["quantize", "--bundle", str(tiny_sd3[1]), "--precision", "int8", "--component", "vae_encoder",
                 "--method", "percentile", "--calib-steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "--calib-steps, --method only apply to the transformer; the VAE quantizer takes --calib-prompts" in err
    assert len(err.strip().splitlines()) == 1
