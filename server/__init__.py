"""sd3trt HTTP server (optional extra: pip install sd3trt[server])."""

from sd3trt.server import telemetry as _telemetry

_telemetry.disable_before_import()  # before anything imports onnxruntime (see telemetry.py)
