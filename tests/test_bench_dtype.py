"""The bench's dtype (a bf16 model and bundle), the memory fit of each system, and the accuracy reference that
falls back to diffusers-bf16: a tiny run end to end (well-formedness, not timings) and the decisions alone."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from sd3trt.benchmarks import fit
from sd3trt.errors import Sd3trtError

GIB = 1024 ** 3
# SD3-Medium's parameters per component (random_model's architecture table), stored in bf16.
SD3_MEDIUM = {"text_encoder": (123_650_304, "bf16"), "text_encoder_2": (694_659_840, "bf16"),
              "text_encoder_3": (4_893_906_944, "bf16"), "transformer": (2_084_951_104, "bf16"),
              "vae": (83_819_683, "bf16")}


def test_model_spec_dtype_defaults_and_keys():
    from sd3trt.benchmarks.models import ModelSpec

    assert ModelSpec("sd3-medium").dtype == "bf16" and ModelSpec("sd3-medium").key == "sd3-medium-s0-bf16"
    assert ModelSpec("sd3.5-large", dtype="fp32").key == "sd3.5-large-s0"
    assert ModelSpec("tiny").dtype == "fp32" and ModelSpec("tiny").key == "tiny-L2-s0"  # unchanged
    assert ModelSpec("medium-width").key == "medium-width-L2-E2-s0"
    assert ModelSpec("tiny", dtype="fp16").with_layers(4, 4).key == "tiny-L4-s0-fp16"
    with pytest.raises(Sd3trtError, match="unknown --dtype 'int8'"):
        ModelSpec("tiny", dtype="int8")


def test_fit_skips_a_system_that_would_not_fit_and_says_what_would():
    why = fit.skip_reason("diffusers-fp32", SD3_MEDIUM, "bf16", 23 * GIB, "sd3-medium")
    assert why == ("diffusers-fp32 needs ~33 GiB for sd3-medium with T5 (7.9 B parameters, 29 GiB of weights in "
                   "fp32); 23 GiB is available here: run diffusers-bf16 (~17 GiB) or without T5 (~13 GiB)"), why
    assert fit.skip_reason("diffusers-bf16", SD3_MEDIUM, "bf16", 23 * GIB, "sd3-medium") is None
    assert fit.skip_reason("optimum-intel-openvino", SD3_MEDIUM, "bf16", 23 * GIB, "sd3-medium") is None
    assert fit.skip_reason("sd3trt-openvino-bf16", SD3_MEDIUM, "bf16", 23 * GIB, "sd3-medium") is None
    # the fp32 bundle on ONNX Runtime: every engine loaded does not fit; low-memory mode (one at a time) does
    ort = fit.skip_reason("sd3trt-ort-fp32", SD3_MEDIUM, "fp32", 23 * GIB, "sd3-medium")
    assert "run sd3trt-ort-fp32-lowmem (~" in ort
    assert fit.skip_reason("sd3trt-ort-fp32-lowmem", SD3_MEDIUM, "fp32", 23 * GIB, "sd3-medium") is None
    # nothing fits a small machine: it says so
    small = fit.skip_reason("diffusers-bf16", SD3_MEDIUM, "bf16", 4 * GIB, "sd3-medium")
    assert small.endswith("4.0 GiB is available here: it needs a machine with more memory"), small
    # enough memory, or nothing known: no skip
    assert fit.skip_reason("diffusers-fp32", SD3_MEDIUM, "bf16", 64 * GIB, "sd3-medium") is None
    assert fit.skip_reason("diffusers-fp32", SD3_MEDIUM, "bf16", None, "sd3-medium") is None
    assert fit.skip_reason("diffusers-fp32", {}, "bf16", GIB, "the model") is None


def test_fit_reads_parameters_from_the_safetensors_headers(tiny_sd3):
    from safetensors import safe_open

    model = tiny_sd3[0]
    got = fit.weights(model)
    assert set(got) == {"text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"}
    for comp, (params, dtype) in got.items():
        n = 0
        for f in (model / comp).glob("*.safetensors"):
            with safe_open(f, "pt") as st:
                n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
        assert (params, dtype) == (n, "fp32"), comp


def test_accuracy_falls_back_to_diffusers_bf16(tmp_path):
    from sd3trt.benchmarks.targets import accuracy

    img = np.full((1, 8, 8, 3), 0.5, np.float32)
    np.save(tmp_path / "bf16.npy", img)
    np.save(tmp_path / "ov.npy", img + 0.01)
    results = {"diffusers-fp32": {"status": "skipped", "reason": "diffusers-fp32 needs ~33 GiB"},
               "diffusers-bf16": {"status": "ok", "image_npy": str(tmp_path / "bf16.npy")},
               "sd3trt-openvino-bf16": {"status": "ok", "image_npy": str(tmp_path / "ov.npy")}}
    acc = accuracy(results, 30.0)
    assert acc["reference"] == "diffusers-bf16"
    assert acc["note"] == ("diffusers-bf16 is the accuracy reference, as diffusers-fp32 was skipped: "
                           "diffusers-fp32 needs ~33 GiB")
    assert acc["systems"]["diffusers-bf16"]["identical"]
    assert acc["systems"]["sd3trt-openvino-bf16"]["psnr_db"] == pytest.approx(40.0)
    np.save(tmp_path / "fp32.npy", img)
    results["diffusers-fp32"] = {"status": "ok", "image_npy": str(tmp_path / "fp32.npy")}
    assert accuracy(results, 30.0)["reference"] == "diffusers-fp32" and "note" not in accuracy(results, 30.0)
    del results["diffusers-fp32"], results["diffusers-bf16"]
    assert accuracy(results, 30.0)["reference"] is None


@pytest.fixture(scope="module")
def bf16_result(tmp_path_factory):
    """`sd3trt bench --model tiny --dtype bf16`, with this machine's memory made too small for diffusers-fp32."""
    from sd3trt.benchmarks import models as mdl
    from sd3trt.benchmarks.cli import main

    work = tmp_path_factory.mktemp("bench-bf16")
    cache = work / "cache"
    model, _ = mdl.prepare_apart(mdl.ModelSpec("tiny", dtype="bf16"), cache, log=lambda s: None)  # built in a child
    weights = fit.weights(model)
    between = (fit.need_bytes("diffusers-bf16", weights, "bf16")
               + fit.need_bytes("diffusers-fp32", weights, "bf16")) // 2
    mp = pytest.MonkeyPatch()
    mp.setattr(fit, "available_bytes", lambda: between)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        rc = main(["--quick", "--model", "tiny", "--dtype", "bf16", "--systems",
                   "diffusers-fp32,diffusers-bf16,sd3trt-ort-fp32,sd3trt-openvino-fp32,sd3trt-openvino-bf16",
                   "--machine", "testbox", "--name", "bf16", "--steps", "2", "--reps", "1", "--no-peaks",
                   "--cache-dir", str(cache)])
    finally:
        os.chdir(cwd)
        mp.undo()
    assert rc == 0
    out = work / "sd3trt-bench" / "testbox"
    return out, json.loads((out / "bf16.json").read_text()), cache


def test_a_bf16_bench_runs_openvino_on_the_bf16_bundle(bf16_result):
    from sd3trt.manifest import load_bundle
    from sd3trt.runtime.ov_runner import cpu_has_bf16

    _, rep, cache = bf16_result
    assert rep["model"]["bundle"] == str(cache / "tiny-L2-s0-bf16" / "bundle-bf16")
    assert load_bundle(rep["model"]["bundle"]).dtype == "bf16" and rep["model"]["spec"]["dtype"] == "bf16"
    model = cache / "tiny-L2-s0-bf16" / "model"  # the same bf16 weights for every system
    assert {dtype for _, dtype in fit.weights(model).values()} == {"bf16"}
    systems = rep["systems"]
    assert systems["sd3trt-openvino-fp32"]["status"] == "ok"
    assert systems["sd3trt-openvino-bf16"]["status"] == ("ok" if cpu_has_bf16() else "skipped")
    if cpu_has_bf16():
        assert set(rep["raw"]["sd3trt-openvino-bf16"]["first_run"]["graph_precisions"].values()) == {"bf16"}
    assert systems["sd3trt-ort-fp32"]["status"] == "skipped"
    assert systems["sd3trt-ort-fp32"]["reason"].startswith("ONNX Runtime cannot run a bf16 bundle on CPU")
    assert systems["diffusers-bf16"]["status"] == "ok"


def test_a_system_that_does_not_fit_is_skipped_and_the_reference_falls_back(bf16_result):
    out, rep, _ = bf16_result
    fp32 = rep["systems"]["diffusers-fp32"]
    assert fp32["status"] == "skipped" and fp32["reason"].startswith("diffusers-fp32 needs ~")
    assert "run diffusers-bf16 (~" in fp32["reason"]
    acc = rep["accuracy"]
    assert acc["reference"] == "diffusers-bf16" and acc["systems"]["diffusers-bf16"]["identical"]
    assert "diffusers-fp32 was skipped: diffusers-fp32 needs ~" in acc["note"]
    assert "sd3trt-openvino-fp32" in acc["systems"]
    md = (out / "bf16.md").read_text()
    assert "- **Accuracy reference** diffusers-bf16 is the accuracy reference, as diffusers-fp32 was skipped" in md
    assert "PSNR vs diffusers-bf16 (dB)" in md and "speed-up vs diffusers-bf16)" in md
    assert fp32["reason"][:40] in md
