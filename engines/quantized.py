"""Quantized graphs in a bundle: which GPUs can run them, and runner factories that use them.

The manifest section itself (read through Bundle.quantized_entry / quantized_path in sd3trt.manifest)
gains, from `sd3trt quantize` (see engines/quantize_bundle.py):

    "quantized": {"transformer.int8": {"component": "transformer", "precision": "int8",
                   "file": "onnx/transformer.int8.onnx", "files": {path: sha256},
                   "source": {"file": "onnx/transformer.onnx", "sha256": ...},   # the fp32 graph it came from
                   "method": ..., "calibration": {...}, "coverage": {...}, "accuracy": {...}, ...}}

    pipe = Img2Img(bundle, runner_factory=quantized_runner_factory(bundle, "int8"))
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from sd3trt.errors import Sd3trtError



# Smallest compute capability whose GEMMs take each precision (TensorRT-RTX support matrix: FP8 GEMMs
# from Ada, 8.9; INT8 Q/DQ engines build for every target, Turing 7.5 included).
MIN_CC = {"fp8": (8, 9), "int8": (7, 5)}
ARCH = {(7, 5): "Turing", (8, 0): "Ampere", (8, 6): "Ampere", (8, 7): "Ampere", (8, 9): "Ada", (9, 0): "Hopper",
        (10, 0): "Blackwell", (12, 0): "Blackwell", (12, 1): "Blackwell"}
PORTABLE_RTX = ("8.6", "8.9", "12.0")  # TensorRT-RTX's default targets when none is named


def parse_cc(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(?:sm_?)?(\d+)[._]?(\d)\s*", str(text).lower())
    if not m:
        raise Sd3trtError(f"compute capability {text!r} is not MAJOR.MINOR, e.g. 8.9")
    return int(m.group(1)), int(m.group(2))


def check_target(precision: str, compute_capabilities) -> None:
    """Sd3trtError when a named target cannot run `precision` GEMMs (FP8 before 8.9)."""
    need = MIN_CC[precision]
    for cc in compute_capabilities:
        got = parse_cc(cc)
        if got < need:
            arch = ARCH.get(got, f"SM {got[0]}.{got[1]}")
            if precision == "fp8":
                raise Sd3trtError(
                    f"FP8 needs compute capability 8.9 or newer (Ada, Hopper, Blackwell) and target {cc} is {arch}; "
                    "build --precision int8 for it, or name an FP8-capable target such as --compute-capability 8.9"
                )
            raise Sd3trtError(
                f"{precision.upper()} engines need compute capability {need[0]}.{need[1]} or newer and target {cc} is "
                f"{arch}; build fp16 engines for it instead"
            )


def quantized_runner_factory(pipe_or_bundle, precision: str = "int8", threads: int = 0) -> Callable:
    """A `runner_factory` for Img2Img: the quantized transformer on ONNX Runtime (CPU: INT8 runs as
    fused integer GEMMs; FP8 Q/DQ runs too, as a slow float reference), every other component as usual.

    Pass the bundle (before making the pipeline) or an Img2Img (its other runners stay its own).
    """
    pipe = pipe_or_bundle if hasattr(pipe_or_bundle, "bundle") and hasattr(pipe_or_bundle, "runner") else None
    bundle = pipe.bundle if pipe is not None else pipe_or_bundle
    return transformer_factory(bundle, bundle.quantized_path(precision), threads, pipe)


def transformer_factory(bundle, path: Path, threads: int = 0, pipe=None) -> Callable:
    """A runner_factory running the transformer graph at `path` and the bundle's other graphs."""
    from sd3trt.runtime.runners import OrtRunner

    threads = threads or (pipe.threads if pipe is not None else 0)

    def factory(name: str):
        if name == "transformer":
            return OrtRunner(name, bundle.component(name), path, threads=threads)
        if pipe is not None:
            return pipe._default_factory(name)
        return OrtRunner(name, bundle.component(name), bundle.onnx_path(name), threads=threads)

    return factory
