"""sd3trt."""
