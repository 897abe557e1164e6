"""Opt-in (not in CI): INT8 and FP8 quantization of the SD3.5-Large transformer from its fp16 bundle on a 24 GiB CPU
machine, calibrated block by block on OpenVINO, gated on ONNX Runtime, and the TensorRT-RTX FP8 engine built from
the result (ahead of time, no GPU).

    SD3TRT_FULLSIZE=1 [SD3TRT_FULLSIZE_BUNDLE=/big/disk/bundle] [SD3TRT_FULLSIZE_DIR=/big/disk] \
        .venv/bin/pytest tests/test_fullsize_quantize.py -s

Without SD3TRT_FULLSIZE_BUNDLE the fp16 bundle is made here (make-random, export: ~30 GB on disk, removed at the
end). The calibration settings are the smallest that still fit ranges on more than one call (2 runs x 3 steps
at 512 px, one run held out for the gate): at ~1-2 min per transformer call on 2 cores, the defaults would take
days. Each stage prints its time and peak RSS; docs/quantization.md's full-size figures come from this run
(int8 68 min / 8.0 GiB, fp8 49 min / 7.6 GiB, both gates passed). The FP8 engine needs ~25 GiB (2.25x its
graph), so on a 24 GiB machine its build is refused before it starts and that test is skipped with the sentence.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from helpers import stage

pytestmark = pytest.mark.skipif(os.environ.get("SD3TRT_FULLSIZE") != "1", reason="opt-in: set SD3TRT_FULLSIZE=1")
LIMIT_GIB = 20.0


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    given = os.environ.get("SD3TRT_FULLSIZE_BUNDLE")
    if given:
        yield Path(given)
        return
    from sd3trt.export.bundle import export_bundle
    from sd3trt.export.random_model import make_random

    root = Path(os.environ.get("SD3TRT_FULLSIZE_DIR") or tmp_path_factory.mktemp("fullsize")) / "sd3.5-large-fp16"
    model = make_random("sd3.5-large", root / "model", dtype="fp16", overwrite=True)
    bundle = export_bundle(model, root / "bundle", dtype="fp16", overwrite=True)
    shutil.rmtree(model)
    yield Path(bundle)
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_fullsize_quantize(bundle_dir, precision):
    from sd3trt.engines.calibrate import CalibSettings
    from sd3trt.engines.transformer_quant import quantize_bundle

    settings = CalibSettings(prompts=2, holdout=1, steps=3, size=512)
    entry, _, peak = stage(f"sd3.5-large quantize {precision}", lambda: quantize_bundle(
        bundle_dir, precision, settings, calib_backend="openvino", blocks=True, threads=2, allow_long=True))
    cal = entry["calibration"]
    print(f"  level {entry['level']}; calibration {cal['backend']}, block by block: seconds {cal['seconds']}, per call "
          f"{cal['seconds_per_call']}; gate {entry['accuracy']}")
    assert peak <= LIMIT_GIB
    assert cal["blocks"] and entry["accuracy"]["passed"]  # a failed gate raises, naming the figures


def test_fullsize_fp8_engine(bundle_dir):
    from sd3trt.engines.build import BuildOptions, build_engines
    from sd3trt.errors import Sd3trtError
    from sd3trt.manifest import load_bundle, quantized_key

    if quantized_key("fp8") not in load_bundle(bundle_dir).quantized_graphs():
        pytest.skip("no fp8 graph (test_fullsize_quantize[fp8] did not run or pass)")
    opts = BuildOptions("fp8", components=("transformer",), compute_capabilities=("8.9",))
    try:
        _, _, peak = stage("sd3.5-large build fp8 transformer (TensorRT-RTX, SM 8.9)",
                           lambda: build_engines(bundle_dir, opts))
    except Sd3trtError as e:  # the 10.7 GiB graph needs ~25 GiB: a 24 GiB machine refuses before it starts
        assert "needs about" in str(e) and "GiB of memory" in str(e), e
        pytest.skip(str(e))
    assert peak <= LIMIT_GIB
