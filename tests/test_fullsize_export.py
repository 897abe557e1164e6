"""Opt-in (not in CI): export real full-size transformer architectures with random weights.

    SD3TRT_FULLSIZE=1 .venv/bin/pytest tests/test_fullsize_export.py -s

Proves the external-data path on graphs over 2 GB within this machine's memory; prints time and peak RSS.
Measured here (2 cores, 24 GiB): sd3-medium fp32 (2.0 B parameters): weights written in 77 s, export in
184 s, 7.77 GiB external data, peak RSS 9.0 GiB (the exporter's tensors are re-packed one at a time).
sd3.5-large fp16 (8.1 B, 16 GiB of weights) did not fit under a 23.5 GB address-space cap while other
jobs ran: loading the 10 GB safetensors shard failed to mmap; it needs a quieter or larger machine.
"""

from __future__ import annotations

import os
import resource
import time

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("SD3TRT_FULLSIZE") != "1", reason="opt-in: set SD3TRT_FULLSIZE=1")


@pytest.mark.parametrize("arch,dtype", [("sd3-medium", "fp32"), ("sd3.5-large", "fp16")])
def test_fullsize_transformer_export(tmp_path, arch, dtype):
    import onnx

    from sd3trt.export.architectures import TRANSFORMERS, write_random_transformer
    from sd3trt.export.onnx_export import export_component
    from sd3trt.spec import ModelFacts

    cfg = TRANSFORMERS[arch]
    t0 = time.perf_counter()
    model_dir = write_random_transformer(arch, tmp_path / "model", dtype)
    t1 = time.perf_counter()
    facts = ModelFacts(
        vae_scaling_factor=1.5305, vae_shift_factor=0.0609, vae_scale_factor=8, latent_channels=16,
        patch_size=cfg["patch_size"], joint_attention_dim=cfg["joint_attention_dim"],
        pooled_projection_dim=cfg["pooled_projection_dim"], pos_embed_max_size=cfg["pos_embed_max_size"],
        clip_l_hidden=768, clip_g_hidden=1280, clip_l_projection=768, clip_g_projection=1280, has_t5=True,
        t5_hidden=4096,
    )
    files = export_component(model_dir, facts, "transformer", tmp_path / "bundle" / "transformer.onnx", dtype)
    t2 = time.perf_counter()
    assert [p.name for p in files] == ["transformer.onnx", "transformer.onnx.data"]
    data_size = files[1].stat().st_size
    assert data_size > 2**31
    onnx.checker.check_model(str(files[0]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\n{arch} {dtype}: weights written in {t1 - t0:.0f} s, ONNX export in {t2 - t1:.0f} s, "
          f"{data_size / 2**30:.2f} GiB external data, peak RSS {peak:.1f} GiB")
