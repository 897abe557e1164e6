"""Opt-in (not in CI): parity with diffusers at the real widths.

    SD3TRT_FULLSIZE=1 .venv/bin/pytest tests/test_fullsize_parity.py -s

1. SD3.5-Large's widths (MMDiT 2432, CLIP-L/G, T5-XXL, the SD3 VAE) at 2 layers each, fp32, img2img on ONNX
   Runtime against diffusers fp32 with the same weights and noise: the bounds of test_pipeline_parity.py.
2. The full-depth transformer of a bf16 bundle (SD3.5-Large, 38 blocks, block 35 in fp32) on OpenVINO against
   diffusers' transformer in bf16 on one denoising step, same weights and inputs (set SD3TRT_FULLSIZE_MODEL and
   _BUNDLE to a make-random model and its bf16 bundle). On a 24 GiB machine the 16-bit graph does not fit
   OpenVINO (its first call passed 23 GiB), so its 8-bit-weight graph (`compress-weights`) runs; with more
   memory set SD3TRT_FULLSIZE_WEIGHTS=bf16 to run the 16-bit graph itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from diffusers_ref import run_reference
from test_pipeline_parity import MAX_FLOAT, MAX_LEVELS, picture

pytestmark = pytest.mark.skipif(os.environ.get("SD3TRT_FULLSIZE") != "1", reason="opt-in: set SD3TRT_FULLSIZE=1")
MAX_REL_L2 = 0.05  # measured 0.032 (8-bit weights, SD3.5-Large, 256x256, text 141 tokens, AVX-512 BF16)


def test_sd35_large_widths_match_diffusers_fp32(tmp_path):
    from sd3trt.export.bundle import export_bundle
    from sd3trt.export.random_model import make_random
    from sd3trt.runtime.pipeline import Img2Img, Noise

    depth = {"transformer": 2, "clip_l": 2, "clip_g": 2, "t5": 2}
    model = make_random("sd3.5-large", tmp_path / "model", dtype="fp32", depth=depth)
    bundle = export_bundle(model, tmp_path / "bundle", log=lambda s: None)
    image = picture(128, 128)
    rng = np.random.default_rng(7)
    latents = rng.standard_normal((1, 16, 16, 16)).astype(np.float32)
    posterior = rng.standard_normal((1, 16, 16, 16)).astype(np.float32)
    prompt = "a lighthouse on a cliff"
    ref_u8, ref_float = run_reference(model, image, prompt, "blurry", 0.6, 4, 7.0, 1, latents, posterior)
    with Img2Img.from_bundle(bundle) as pipe:
        res = pipe(image, prompt, negative_prompt="blurry", strength=0.6, steps=4, guidance_scale=7.0,
                   noise=Noise(latents, posterior))
    diff = np.abs(res.array.astype(int) - ref_u8.astype(int))
    err = np.abs(np.clip(res.decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1) - ref_float).max()
    print(f"\nSD3.5-Large widths, 2 layers: max {diff.max()} levels ({np.count_nonzero(diff)} pixels), float {err:.2e}")
    assert diff.max() <= MAX_LEVELS and err <= MAX_FLOAT


@pytest.mark.skipif(not os.environ.get("SD3TRT_FULLSIZE_BUNDLE"), reason="set SD3TRT_FULLSIZE_MODEL and _BUNDLE")
def test_full_depth_transformer_matches_diffusers_bf16_on_one_step():
    import gc

    import torch
    from diffusers import SD3Transformer2DModel

    from sd3trt.manifest import load_bundle
    from sd3trt.runtime.ov_runner import OvRunner

    model_dir = Path(os.environ["SD3TRT_FULLSIZE_MODEL"])
    b = load_bundle(Path(os.environ["SD3TRT_FULLSIZE_BUNDLE"]))
    rng = np.random.default_rng(0)
    feeds = {
        "hidden_states": rng.standard_normal((2, 16, 32, 32)).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77 + 64, 4096)).astype(np.float32),
        "pooled_projections": rng.standard_normal((2, 2048)).astype(np.float32),
        "timestep": np.array([700.0, 700.0], np.float32),
    }
    tr = SD3Transformer2DModel.from_pretrained(model_dir / "transformer", torch_dtype=torch.bfloat16).eval()
    with torch.no_grad():
        args = {k: torch.from_numpy(v).to(torch.bfloat16 if k != "timestep" else torch.float32) for k, v in feeds.items()}
        ref = tr(**args, return_dict=False)[0].float().numpy()
    del tr, args
    gc.collect()
    w8 = os.environ.get("SD3TRT_FULLSIZE_WEIGHTS", "w8") == "w8"
    path = b.compressed_graphs()["transformer"] if w8 else b.onnx_path("transformer")
    runner = OvRunner("transformer", b.component("transformer"), path, precision="bf16")
    ours = runner.run(feeds)["noise_pred"]
    runner.close()
    rel = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
    print(f"\nfull-depth transformer ({'8-bit weights' if w8 else 'bf16'}) on OpenVINO vs diffusers bf16: "
          f"relative L2 {rel:.4f}")
    assert np.isfinite(ours).all() and rel <= MAX_REL_L2
