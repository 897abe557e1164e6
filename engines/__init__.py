"""sd3trt.engines: TensorRT engines for a bundle and the quantized graphs they can be built from.

  build.py              `sd3trt build`: the one build loop (every component, every precision)
  cli.py                the `sd3trt build` command line
  gpu_targets.py        which GPUs a build targets, and which of them run INT8/FP8 GEMMs
  mixed_precision.py    fp16/bf16 precision passes over the ONNX graphs (fp32 islands, autocast)
  qdq_graph.py          Q/DQ graphs: the quantization pass, and their lowering for TensorRT
  calibrate.py          calibration inputs recorded from img2img runs, activation ranges
  accuracy.py           the accuracy gate of a quantized transformer
  transformer_quant.py  calibrate, quantize, gate and record the INT8/FP8 transformer
  vae_quant.py          the INT8 VAE convolutions for ONNX Runtime CPU
  quantize_cli.py       the `sd3trt quantize` command line
"""
