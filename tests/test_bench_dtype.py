"""The bench's dtype (a bf16 model and bundle), the memory fit of each system, and the accuracy reference that
falls back to diffusers-bf16: a tiny run end to end (well-formedness, not timings) and the decisions alone."""

from __future__ import annotations

import pytest

from sd3trt.errors import Sd3trtError


def test_model_spec_dtype_defaults_and_keys():
    from sd3trt.benchmarks.models import ModelSpec

    assert ModelSpec("sd3-medium").dtype == "bf16" and ModelSpec("sd3-medium").key == "sd3-medium-s0-bf16"
    assert ModelSpec("sd3.5-large", dtype="fp32").key == "sd3.5-large-s0"
    assert ModelSpec("tiny").dtype == "fp32" and ModelSpec("tiny").key == "tiny-L2-s0"  # unchanged
    assert ModelSpec("medium-width").key == "medium-width-L2-E2-s0"
    assert ModelSpec("tiny", dtype="fp16").with_layers(4, 4).key == "tiny-L4-s0-fp16"
    with pytest.raises(Sd3trtError, match="unknown --dtype 'int8'"):
        ModelSpec("tiny", dtype="int8")
