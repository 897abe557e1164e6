"""The one way sd3trt opens an ONNX Runtime session: runtime, calibration, accuracy gates and benchmarks.

Every session logs errors only, optimizes the whole graph, runs without the CPU arena (each session's
arena keeps its largest activations for life: six sessions added 2.6 GiB of peak RSS on the
medium-width bundle at 512 px, for no measurable speed) and, with enable_fallback=0, fails instead of
silently retrying on the next execution provider.
"""

from __future__ import annotations

from pathlib import Path

from sd3trt.runtime.telemetry import disable_events


def ort_session(model: Path | str | bytes, threads: int = 0, providers: list | None = None,
                optimized_path: Path | None = None, initializers: dict | None = None):
    """An onnxruntime.InferenceSession over a path or serialized model bytes (CPU unless `providers`).
    initializers: {name: numpy array} replacing the graph's initializers of those names (a load-time LoRA);
    the arrays must outlive the session (ONNX Runtime does not copy them); such a session optimizes at the
    extended level."""
    import onnxruntime as ort

    disable_events()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = False
    if threads:
        opts.intra_op_num_threads = threads
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
    values = [(name, ort.OrtValue.ortvalue_from_numpy(v)) for name, v in (initializers or {}).items()]
    if values:
        # Measured with ONNX Runtime 1.32 on CPU: at ORT_ENABLE_ALL an fp16 graph runs with its original
        # weights, not the overriding ones (fp32 graphs, and fp16 at ORT_ENABLE_EXTENDED, take them).
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    for name, value in values:
        opts.add_initializer(name, value)
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, sess_options=opts, providers=providers or ["CPUExecutionProvider"],
                                   enable_fallback=0)
    if values:
        session.sd3trt_initializers = (values, initializers)  # the session reads them: they live as long as it
    return session
