"""Every precision word sd3trt accepts, and what each stage means by it: the one vocabulary.

  bundle dtype        the float type of the exported graphs          FLOATS
  engine precision    what `sd3trt build --precision` builds          FLOATS + QUANTIZED
  transformer         what `img2img --precision` runs                 ("fp32",) + QUANTIZED
  quantized graph     what `sd3trt quantize --precision` writes        QUANTIZED (the VAE: VAE_QUANTIZED)
  engine low type     the float type around a quantized engine's GEMMs LOW_TYPES
  weights             what `img2img --weights` runs (CPU backends)      WEIGHTS: w8, the 8-bit weights of
                      `sd3trt compress-weights` (no calibration; activations keep the graph's float type)
"""

from __future__ import annotations

from sd3trt.errors import Sd3trtError

FLOATS = ("fp32", "fp16", "bf16")
QUANTIZED = ("int8", "fp8")
VAE_QUANTIZED = ("int8",)  # ONNX Runtime CPU convolutions; GPU engines run the VAE in fp16/bf16
ENGINE = FLOATS + QUANTIZED
TRANSFORMER = ("fp32",) + QUANTIZED
VAE = ("fp32",) + VAE_QUANTIZED
LOW_TYPES = ("fp16", "bf16")
WEIGHTS = ("w8",)
NUMPY = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
HOST_NUMPY = {**NUMPY, "bf16": "float32"}  # numpy has no bfloat16: the host side of a bf16 tensor is float32


def check(precision: str, allowed: tuple[str, ...], what: str) -> str:
    """`precision` when it is one of `allowed`; else one sentence naming `what` and the choices."""
    if precision not in allowed:
        raise Sd3trtError(f"unknown {what} {precision!r}; use {' or '.join(allowed)}")
    return precision
