"""sd3trt: Stable Diffusion 3 img2img on ONNX Runtime and TensorRT, with a lean numpy runtime.

The embedding API, loaded on first use (`import sd3trt` stays light):

    sd3trt.Img2Img    the pipeline: Img2Img.from_bundle(path, backend=...), prepare(...) -> Plan, run(plan) -> Result
    sd3trt.Plan       a checked request        sd3trt.Result   arrays, timings, warnings
    sd3trt.Noise      caller-supplied noise    sd3trt.Cancel / sd3trt.Cancelled   stopping a run
    sd3trt.Sd3trtError, sd3trt.RequestError    refusals, one sentence each (RequestError.field: which parameter)

The library logs through `logging` (logger "sd3trt"; silent unless the host configures logging) and never prints.
"""

import logging

from sd3trt.errors import Sd3trtError

__version__ = "0.1.0"
_RUNTIME = ("Img2Img", "Plan", "Result", "Noise", "Cancel", "Cancelled", "RequestError")
__all__ = ["Sd3trtError", "__version__", *_RUNTIME]

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str):
    if name in _RUNTIME:
        import sd3trt.runtime

        return getattr(sd3trt.runtime, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
