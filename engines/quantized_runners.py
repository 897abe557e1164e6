"""Runner factories that run a bundle's quantized transformer graph on ONNX Runtime (CPU: INT8 as fused
integer GEMMs; FP8 Q/DQ too, as a slow float reference):

    pipe = Img2Img(bundle, runner_factory=quantized_runner_factory(bundle, "int8"))
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def quantized_runner_factory(pipe_or_bundle, precision: str = "int8", threads: int = 0) -> Callable:
    """A `runner_factory` for Img2Img: the quantized transformer on ONNX Runtime, every other component as usual.

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
