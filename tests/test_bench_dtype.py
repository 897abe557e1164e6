"""The bench's dtype (a bf16 model and bundle), the memory fit of each system, and the accuracy reference that
falls back to diffusers-bf16: a tiny run end to end (well-formedness, not timings) and the decisions alone."""

from __future__ import annotations

import math

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
