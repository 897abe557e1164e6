"""sd3trt.engines: `sd3trt build` - TensorRT engines for a bundle (build.py), their optimization profiles
(profiles.py), the precision passes over the ONNX graphs (precision.py) and the TensorRT flavour in use
(flavour.py). The runtime imports only flavour.py and profiles.py (standard library), never onnx.
"""
