"""Calibration on the GPU (onnxruntime-gpu's CUDA provider): run by tests/gpu_check.py; skipped without one.
The backend's choice and provider list are tested on the CPU in tests/test_quantize_calibration.py."""

from __future__ import annotations

import json
import shutil

import pytest

from sd3trt.engines import calib_backends
from sd3trt.engines.calibrate import CalibSettings
from sd3trt.engines.transformer_quant import quantize_bundle

SETTINGS = CalibSettings(prompts=3, holdout=1, steps=3, strength=0.9, size=64)
needs_cuda = pytest.mark.skipif(not calib_backends._gpu_answers(),
                                reason="needs onnxruntime-gpu's CUDA provider and an NVIDIA GPU")


@needs_cuda
@pytest.mark.gpu
def test_cuda_calibration_gives_the_cpu_ranges_and_passes_the_gate(tiny_sd3, tmp_path):
    ranges = {}
    for name in ("cuda", "onnxruntime"):
        root = tmp_path / name
        shutil.copytree(tiny_sd3[1], root, ignore=shutil.ignore_patterns("calibration", "*.int8.*", "*.fp8.*"))
        entry = quantize_bundle(root, "fp8", SETTINGS, calib_backend=name, threads=2, log=lambda s: None)
        assert entry["accuracy"]["passed"] and entry["calibration"]["backend"].startswith(name)
        assert entry["calibration"]["seconds_per_call"]["record"] > 0
        (path,) = (root / "calibration").glob("ranges-*.json")
        ranges[name] = json.loads(path.read_text())["tensors"]
    assert ranges["cuda"].keys() == ranges["onnxruntime"].keys()
    # TF32 matmuls on the GPU: ~1e-3 relative per product; the recorded runs differ too.
    worst = max(abs(ranges["cuda"][t] - v) / v for t, v in ranges["onnxruntime"].items())
    assert worst < 0.05, worst
