"""sd3trt HTTP server (optional extra: pip install sd3trt[server])."""

import sd3trt.runtime  # noqa: F401  (turns ONNX Runtime's telemetry off before anything imports it)
