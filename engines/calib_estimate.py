"""How long a quantization will take, known before it starts: the transformer's FLOPs per call times the
calls it will make, over the matmul speed the calibration backend measures here in a fraction of a second.

    est = estimate(model, bundle.facts, settings, backend, levels=2, method="max", taps=700, recorded=False,
                   referenced=False)
    est.seconds, est.calls, est.flops_per_call, est.gflops

FLOPs per call (CFG batch 2 when guidance > 1): 2 x K x N x rows for every linear layer, the rows being the
image tokens, the text tokens (the text stream's layers: `add_*`, `*context*`) or the batch (adaLN
modulations and the timestep/text embeddings); plus 2 x S^2 x width for each attention matmul (Q.K^T,
P.V) over the joint sequence S. Calls: the recorded img2img runs (unless cached) and the range passes over
the fitting calls (one, plus one per 32 tensors for percentile / mse on the whole graph), at the
calibration backend's speed; the gate's held-out calls and image runs at ONNX Runtime CPU's speed in the
bundle's type (the gate runs there): the quantized graph's per level tried, the reference's once per
recording (none when an earlier quantization of it kept them, `referenced`). Real
graphs add normalizations, softmax, data movement and the other components, so the estimate is a floor:
within 0.75-1.2x per call on the medium-width model at 512 px, 5-7x under for a whole small-model run
(docs/quantization.md).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from sd3trt.errors import Sd3trtError

LIMIT_S = 3600.0  # longer than this needs --allow-long: the user is told the faster option first
PROBE = 1024  # the probe matmul: [PROBE, PROBE] x [PROBE, PROBE]
TEXT_TOKENS_CLIP = 77
PER_PASS = 32  # tensors per histogram pass on the whole graph (calibrate.activation_ranges)
BATCH_ROWS = ("norm1.linear", "norm1_context.linear", "norm_out.linear", "time_text_embed.")
TEXT_ROWS = ("add_", "context")


@dataclass
class Estimate:
    seconds: float
    calls: int
    flops_per_call: float
    gflops: float  # the backend's measured matmul speed
    backend: str

    def line(self) -> str:
        return (f"{self.calls} transformer calls of {self.flops_per_call / 1e12:.3g} TFLOP at the "
                f"{self.gflops:.0f} GFLOP/s {self.backend} measured here: about {_duration(self.seconds)}")


def _duration(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min" if s >= 60 else f"{s:.0f} s"


def steps_run(settings) -> int:
    from sd3trt.runtime.scheduler import img2img_start_index

    return settings.steps - img2img_start_index(settings.steps, settings.strength)


def flops_per_call(model, facts, settings) -> float:
    """The transformer's multiply-adds x 2 for one call at the calibration size (module docstring)."""
    from sd3trt.engines.qdq_graph import plan_layers

    side = settings.size // facts.vae_scale_factor // facts.patch_size
    image, text = side * side, TEXT_TOKENS_CLIP + settings.max_sequence_length
    batch = 2 if settings.guidance > 1 else 1
    plan = plan_layers(model, keep=(), attention=True)
    total, widths = 0.0, {}
    for layer in plan.layers:
        if layer.kind != "linear":
            continue
        k, n = layer.weight_shape
        rows = 1 if any(p in layer.name for p in BATCH_ROWS) else text if any(p in layer.name for p in TEXT_ROWS) else image
        total += 2.0 * k * n * rows * batch
        if layer.name.endswith("attn.to_q") or layer.name.endswith("attn2.to_q"):
            widths[layer.name.rsplit(".", 1)[0]] = n
    for layer in plan.layers:
        if layer.kind == "attention":
            attn = layer.name.rsplit(".", 1)[0]
            s = image if attn.endswith("attn2") else image + text
            total += 2.0 * s * s * widths.get(attn, 0) * batch
    return total


def measure_gflops(backend, dtype: str, workdir) -> float:
    """The backend's speed on one [PROBE]^3 matmul in the bundle's type: best of 3 calls after a warm-up."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    np_type = {"fp16": np.float16}.get(dtype, np.float32)
    elem = TensorProto.FLOAT16 if np_type is np.float16 else TensorProto.FLOAT
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((PROBE, PROBE)).astype(np_type), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", elem, [PROBE, PROBE])],
                              [helper.make_tensor_value_info("y", elem, [PROBE, PROBE])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    onnx.checker.check_model(model)
    run = backend.open(model, workdir, ["y"], what="probe")
    x = np.ones((PROBE, PROBE), np_type)
    run({"x": x})
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        run({"x": x})
        best = min(best, time.perf_counter() - t0)
    return 2.0 * PROBE**3 / best / 1e9


def calls(settings, levels: int, method: str, taps: int, blocks: bool, recorded: bool,
          referenced: bool = False) -> tuple[int, int]:
    """(transformer calls on the calibration backend, calls of the accuracy gate on ONNX Runtime's CPU)."""
    per_run = steps_run(settings)
    fit_calls = (settings.prompts - settings.holdout) * per_run
    held_calls = settings.holdout * per_run
    passes = 1 if method == "max" else 1 + (1 if blocks else math.ceil(taps / PER_PASS))
    record = 0 if recorded else settings.prompts * per_run
    quantized = 2 * held_calls  # the held-out calls, and the image runs' calls; the reference's the same, once
    return record + fit_calls * passes, levels * quantized + (0 if referenced else quantized)


def estimate(model, facts, settings, backend, dtype: str, workdir, levels: int, method: str, taps: int,
             blocks: bool, recorded: bool, gate_gflops: float | None = None, referenced: bool = False) -> Estimate:
    """gate_gflops: ONNX Runtime CPU's measured speed in the bundle's type (measured when not given)."""
    from sd3trt.engines.calib_backends import Backend

    calib, gate = calls(settings, levels, method, taps, blocks, recorded, referenced)
    f = flops_per_call(model, facts, settings)
    g = measure_gflops(backend, dtype, workdir)
    if gate_gflops is None:
        gate_gflops = g if backend.name == "onnxruntime" else measure_gflops(Backend("onnxruntime", dtype), dtype,
                                                                            workdir)
    return Estimate(f * (calib / g + gate / gate_gflops) / 1e9, calib + gate, f, g, backend.describe())


def refuse_if_long(est: Estimate, alternatives: list[Estimate], settings, limit_s: float = LIMIT_S) -> None:
    """One sentence, before any calibration runs, when the estimate is past `limit_s`: the time, and the
    faster options (another backend measured here, a --calib-scale that fits the limit)."""
    if est.seconds <= limit_s:
        return
    options = [f"--calib-backend {a.backend.split()[0]} (about {_duration(a.seconds)})"
               for a in sorted(alternatives, key=lambda a: a.seconds) if a.seconds < est.seconds * 0.8]
    factor = math.sqrt(limit_s / est.seconds)  # runs and steps both scale
    if factor >= 0.05:
        options.append(f"--calib-scale {max(factor, 0.01):.2f} (about {_duration(limit_s)} or less)")
    else:
        options.append("a GPU (--calib-backend cuda)")
    raise Sd3trtError(
        f"these calibration settings ({settings.prompts} runs x {steps_run(settings)} steps at {settings.size} px) "
        f"would take {est.line()}; use {' or '.join(options)}, or pass --allow-long to run them anyway"
    )
