"""sd3trt: Stable Diffusion 3 img2img on ONNX Runtime and TensorRT, with a lean numpy runtime."""

__version__ = "0.1.0"
