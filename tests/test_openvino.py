"""The openvino backend: parity with diffusers at fp32, the bf16 gate and its use, INT8 graphs, the model cache."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from diffusers_ref import run_reference
from sd3trt.cli import main as sd3trt_main
from sd3trt.engines import accuracy as acc
from sd3trt.engines.calibrate import CalibSettings
from sd3trt.engines.cpu_gate import GateSettings, gate_bf16
from sd3trt.errors import Sd3trtError
from sd3trt.export.bundle import export_bundle
from sd3trt.manifest import CPU_GATES, load_bundle
from sd3trt.runtime import ov_runner
from sd3trt.runtime.cpu_precision import GATE_KEY
from sd3trt.runtime.pipeline import Img2Img, Noise
from test_pipeline_parity import CASES, MAX_FLOAT, MAX_LEVELS, case_noise, picture

pytest.importorskip("openvino")
BF16 = ov_runner.cpu_has_bf16()
GATE_RUNS = GateSettings(runs=2, steps=4, size=64)
REQUEST = dict(prompt="a watercolor fox in the snow", negative_prompt="blurry", strength=0.7, steps=4, seed=3)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SD3TRT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ov-cache"))


def _copy(bundle, tmp_path):
    root = tmp_path / "bundle"
    shutil.copytree(bundle, root)
    return root


def _float(res) -> np.ndarray:
    return np.clip(res.decoded / 2 + 0.5, 0, 1)


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}x{c[2]}-s{c[3]}-n{c[4]}-g{c[5]}" for c in CASES])
def test_fp32_matches_diffusers(tiny_factory, case):
    """Measured on these cases: at most 1 level on the uint8 image (0 to 2 pixels), float image within 4.7e-6 of
    diffusers': the same bounds as ONNX Runtime's (test_pipeline_parity.py)."""
    variant, w, h, strength, steps, guidance, negative, n, prompt = case
    model_dir, bundle_dir = tiny_factory(variant)
    image = picture(w, h)
    latents, posterior = case_noise(variant, w, h, n)
    ref_u8, ref_float = run_reference(model_dir, image, prompt, negative, strength, steps, guidance, n, latents, posterior)
    with Img2Img.from_bundle(bundle_dir, backend="openvino", cpu_precision="fp32") as pipe:
        res = pipe(image, prompt, negative_prompt=negative, strength=strength, steps=steps, guidance_scale=guidance,
                   num_images=n, noise=Noise(latents, posterior))
        assert set(pipe.graph_precisions.values()) == {"fp32"}
    ours = np.stack([np.asarray(im) for im in res.images])
    diff = np.abs(ours.astype(int) - ref_u8.astype(int))
    assert diff.max() <= MAX_LEVELS, f"max deviation {diff.max()} levels, {np.count_nonzero(diff)} pixels"
    assert np.abs(_float(res).transpose(0, 2, 3, 1) - ref_float).max() <= MAX_FLOAT


@pytest.mark.skipif(not BF16, reason="this CPU has no native bf16 (the refusal is tested below)")
def test_bf16_gate_is_recorded_and_used(tiny_sd3, tmp_path):
    root = _copy(tiny_sd3[1], tmp_path)
    with pytest.raises(Sd3trtError, match="sd3trt gate --bundle"):  # explicit bf16 before any gate: refused
        Img2Img.from_bundle(root, backend="openvino", cpu_precision="bf16")
    record = gate_bf16(root, GATE_RUNS, threads=2, log=lambda s: None)
    bundle = load_bundle(root)
    assert bundle.data[CPU_GATES][GATE_KEY]["graphs"] == record["graphs"]
    assert set(record["graphs"]) == set(bundle.data["components"])
    passed = {k for k, g in record["graphs"].items() if g["passed"]}
    assert "transformer" in passed, record["graphs"]["transformer"]

    image = picture(64, 64)
    with Img2Img(bundle, backend="openvino", cpu_precision="fp32") as ref_pipe:
        ref = _float(ref_pipe(image, **REQUEST))
    with Img2Img(bundle, backend="openvino") as pipe:  # auto: bf16 where it passed
        assert {k for k, p in pipe.graph_precisions.items() if p == "bf16"} == passed
        assert {pipe.runner(k).precision for k in passed} == {"bf16"}
        got = _float(pipe(image, **REQUEST))
    assert not np.array_equal(got, ref)  # bf16 really ran
    assert acc.psnr_db(ref, got) >= acc.GATE["psnr_db"] and acc.ssim(ref, got) >= acc.GATE["ssim"]

    # a re-exported graph (another sha256) voids its verdict: it runs in fp32 again
    data = json.loads((root / "manifest.json").read_text())
    data[CPU_GATES][GATE_KEY]["graphs"]["transformer"]["sha256"] = "0" * 64
    (root / "manifest.json").write_text(json.dumps(data))
    assert Img2Img.from_bundle(root, backend="openvino").graph_precisions["transformer"] == "fp32"


@pytest.mark.skipif(BF16, reason="this CPU has native bf16 (tested above)")
def test_bf16_is_refused_without_native_bf16(tiny_sd3, tmp_path):
    with pytest.raises(Sd3trtError, match="no native bf16.*--cpu-precision fp32"):
        Img2Img.from_bundle(tiny_sd3[1], backend="openvino", cpu_precision="bf16")
    with pytest.raises(Sd3trtError, match="no native bf16"):
        gate_bf16(tiny_sd3[1], GATE_RUNS, log=lambda s: None)
    assert set(Img2Img.from_bundle(tiny_sd3[1], backend="openvino").graph_precisions.values()) == {"fp32"}


@pytest.fixture(scope="module")
def int8_bundle(tiny_int8, tmp_path_factory):
    """A copy of the tiny bundle with the INT8 transformer and VAE decoder (their gates run on ONNX Runtime)."""
    from sd3trt.engines.vae_quant import quantize_vae

    root = tmp_path_factory.mktemp("ov-int8") / "bundle"
    shutil.copytree(tiny_int8, root)
    quantize_vae(root, "vae_decoder", CalibSettings(prompts=4, holdout=1, size=64), threads=2, log=lambda s: None)
    return root


def test_int8_graphs_pass_the_gate_on_openvino(int8_bundle):
    """The Q/DQ graphs of `sd3trt quantize` compiled by OpenVINO: the image vs the fp32 pipeline passes the gate
    (in fp32, and in bf16 for the float parts where the CPU has it, as --cpu-precision auto runs them)."""
    bundle = load_bundle(int8_bundle)
    image = picture(64, 64)
    with Img2Img(bundle, backend="openvino", cpu_precision="fp32") as ref_pipe:
        ref = _float(ref_pipe(image, **REQUEST))
    if BF16:
        gate_bf16(int8_bundle, GATE_RUNS, threads=2, log=lambda s: None)
        bundle = load_bundle(int8_bundle)
    for cpu_precision in ("fp32", "bf16") if BF16 else ("fp32",):
        with Img2Img(bundle, backend="openvino", transformer_precision="int8", vae_precision="int8",
                     cpu_precision=cpu_precision) as pipe:
            assert pipe.onnx_files["transformer"] == bundle.quantized_path("int8")
            got = _float(pipe(image, **REQUEST))
        assert not np.array_equal(got, ref)
        assert acc.psnr_db(ref, got) >= acc.GATE["psnr_db"] and acc.ssim(ref, got) >= acc.GATE["ssim"], cpu_precision
    if BF16:
        graphs = bundle.data[CPU_GATES][GATE_KEY]["graphs"]
        assert {"transformer.int8", "vae_decoder.int8"} <= set(graphs)


def test_model_cache_is_reused_and_keyed_by_the_file(tiny_sd3, tmp_path, monkeypatch):
    monkeypatch.setenv("SD3TRT_CACHE_DIR", str(tmp_path / "cache"))
    root = _copy(tiny_sd3[1], tmp_path)
    bundle = load_bundle(root)
    path = bundle.onnx_path("vae_encoder")
    ov_runner.OvRunner("vae_encoder", bundle.component("vae_encoder"), path, threads=2).close()
    cache = ov_runner.model_cache_dir(path)
    blobs = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert blobs and str(cache).startswith(str(tmp_path / "cache" / "openvino"))
    runner = ov_runner.OvRunner("vae_encoder", bundle.component("vae_encoder"), path, threads=2)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == blobs  # imported, not compiled again
    out = runner.run({"image": np.zeros((1, 3, 64, 64), np.float32)})
    assert set(out) == {"mean", "std"} and out["mean"].shape == (1, 16, 8, 8)
    path.touch()  # a rewritten file gets another cache entry
    assert ov_runner.model_cache_dir(path) != cache


def test_bad_requests_are_refused_up_front(tiny_sd3, tmp_path):
    bundle_dir = tiny_sd3[1]
    cases = [
        (dict(backend="onnxruntime", cpu_precision="bf16"), "cpu_precision is for the openvino backend"),
        (dict(backend="openvino", cpu_precision="fp16"), "unknown CPU precision 'fp16'"),
        (dict(backend="openvino", loras=[str(tmp_path / "x.safetensors")]), "load-time LoRAs run on the ONNX Runtime"),
        (dict(backend="openvino", transformer_precision="int8"), "sd3trt quantize --bundle"),
    ]
    for kw, message in cases:
        with pytest.raises(Sd3trtError, match=message):
            Img2Img.from_bundle(bundle_dir, **kw)


def test_cli_img2img_on_openvino(tiny_sd3, tmp_path, capsys):
    picture(64, 64).save(tmp_path / "in.png")
    args = ["img2img", "--bundle", str(tiny_sd3[1]), "--image", str(tmp_path / "in.png"), "--prompt", "a fox",
            "--steps", "3", "--backend", "openvino", "--cpu-precision", "fp32", "--out", str(tmp_path / "out.png")]
    assert sd3trt_main(args) == 0
    assert (tmp_path / "out.png").stat().st_size > 0
    assert sd3trt_main(args[:-2] + ["--cpu-precision", "bf16", "--backend", "onnxruntime", "--out",
                                    str(tmp_path / "b.png")]) == 2
    assert "cpu_precision is for the openvino backend" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()


def test_server_on_openvino(tiny_sd3, tmp_path):
    pytest.importorskip("fastapi")
    from test_server import ServerProcess, new_key, post

    s = ServerProcess(tiny_sd3[1], tmp_path / "keys.db", tmp_path / "server.log", "--backend", "openvino",
                      "--cpu-precision", "fp32").start()
    try:
        r = post(s, new_key(s, 1), seed=7, output_format="png")
        assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n", r.text
    finally:
        s.stop()
    bad = ServerProcess(tiny_sd3[1], tmp_path / "keys.db", tmp_path / "bad.log", "--backend", "onnxruntime",
                        "--cpu-precision", "bf16")
    with pytest.raises(AssertionError, match="server exited with 2"):
        bad.start()
    assert "cpu_precision is for the openvino backend" in (tmp_path / "bad.log").read_text()


def test_gate_command_checks_its_options_first(tiny_sd3, capsys):
    for args, message in ((["--runs", "0"], "--runs must be at least 1"), (["--strength", "1.5"], "--strength 1.5")):
        assert sd3trt_main(["gate", "--bundle", str(tiny_sd3[1]), *args]) == 2
        assert message in capsys.readouterr().err


def test_int8_vae_convolutions_hand_their_float_output_to_the_other_readers(int8_bundle):
    """The int8 VAE graph quantizes each convolution's output (ONNX Runtime's QLinearConv form); on OpenVINO the
    group norms and residual additions reading it get the float output instead, which is closer to fp32."""
    import onnx

    bundle = load_bundle(int8_bundle)
    path = bundle.quantized_path("int8", "vae_decoder")
    g = onnx.load(str(path)).graph
    producers = {o: n for n in g.node for o in n.output}
    float_readers = sum(1 for n in g.node if n.op_type != "Conv" for x in n.input
                        if producers.get(x) is not None and producers[x].op_type == "DequantizeLinear"
                        and producers[x].input[0] in producers
                        and producers[producers[x].input[0]].op_type == "QuantizeLinear")
    model = ov_runner.core().read_model(str(path))
    assert ov_runner.float_outside_int8(model) == float_readers > 0
    assert ov_runner.float_outside_int8(model) == 0  # nothing left to rewire

    latent = np.random.default_rng(0).standard_normal((1, 16, 8, 8)).astype(np.float32) * 0.8
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2}
    ref = ov_runner.core().compile_model(str(bundle.onnx_path("vae_decoder")), "CPU", config)({"latent": latent})[0]
    stored = ov_runner.core().compile_model(str(path), "CPU", config)({"latent": latent})[0]
    runner = ov_runner.OvRunner("vae_decoder", bundle.component("vae_decoder"), path, threads=2)
    got = runner.run({"latent": latent})["image"]
    runner.close()
    unit = lambda x: np.clip(x / 2 + 0.5, 0, 1)  # noqa: E731
    print(f"\n[int8 vae on openvino] PSNR vs fp32: stored form {acc.psnr_db(unit(ref), unit(stored)):.2f} dB, "
          f"float readers {acc.psnr_db(unit(ref), unit(got)):.2f} dB")
    assert acc.psnr_db(unit(ref), unit(got)) > acc.psnr_db(unit(ref), unit(stored))


@pytest.mark.parametrize("dtype,min_psnr", [("bf16", 35.0), ("fp16", 55.0)])
def test_16bit_bundles_run_on_openvino_close_to_diffusers_in_their_dtype(tiny_sd3, tmp_path, dtype, min_psnr):
    """A CPU user needs no fp32 bundle: bf16 and fp16 bundles run on OpenVINO (bf16 graphs in bf16 where the CPU
    has it, with float32 at the edges; fp16 graphs in fp32). Measured against diffusers in the same dtype, same
    noise, 64x64, 4 steps: bf16 38.6 dB (diffusers' own bf16 is 41.8 dB from its fp32), fp16 59.4 dB."""
    import torch

    model_dir = tiny_sd3[0]
    bundle = export_bundle(model_dir, tmp_path / dtype, dtype=dtype, log=lambda s: None)
    image = picture(64, 64)
    latents, posterior = case_noise("sd3", 64, 64, 1)
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    _, ref = run_reference(model_dir, image, REQUEST["prompt"], "blurry", 0.6, 4, 7.0, 1, latents, posterior,
                           dtype=torch_dtype)
    with Img2Img.from_bundle(bundle, backend="openvino") as pipe:
        res = pipe(image, REQUEST["prompt"], negative_prompt="blurry", strength=0.6, steps=4, guidance_scale=7.0,
                   noise=Noise(latents, posterior))
        want = "bf16" if dtype == "bf16" and BF16 else "fp32"
        assert set(pipe.graph_precisions.values()) == {want}
    assert acc.psnr_db(ref, _float(res).transpose(0, 2, 3, 1)) >= min_psnr
