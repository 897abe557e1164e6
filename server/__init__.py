"""sd3trt HTTP server (optional extra: pip install sd3trt[server])."""
