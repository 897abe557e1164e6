"""`--backend auto`: the CPU backend and transformer precision measured fastest, accuracy-gated, on this kind of
CPU (sd3trt.cpu.cpu_kind); the one table of that choice.

Measured (medium-width model, 512x512, strength 0.6, CFG, 2 threads, 2-core AMD EPYC; end to end):
- avx512bf16, benchmarks/results/amd-epyc-2c-avx512bf16/ (28 steps): OpenVINO with the INT8 transformer and
  bf16 elsewhere 20.1 s, OpenVINO bf16 26.0 s, ONNX Runtime INT8 41.0 s, ONNX Runtime fp32 56.6 s.
- avx2: ONNX Runtime INT8 37.4 s (2.04 s per transformer call), OpenVINO fp32 42.1 s (2.62 s), OpenVINO INT8
  42.9 s (2.79 s), ONNX Runtime fp32 45.5 s (8 steps, issue 27's run; OpenVINO is not in the committed
  benchmarks/results/amd-epyc-2c-avx2/, whose 28-step run has ONNX Runtime INT8 68.1 s vs fp32 98.3 s).
The INT8 VAE decoder is never chosen: it stays opt-in (its image differs visibly under scrutiny: 32.0 dB on
avx512bf16, 25.7 dB with ONNX Runtime on avx2). Kinds not measured take the row of the kind they resemble:
amx (native bf16, like avx512bf16) and the rest (no native bf16, so OpenVINO's float graphs run f32 as on avx2).

    choice = choose(bundle, transformer_precision=None, loras=())   # Choice("onnxruntime", "int8", "avx2", True)

A backend forced by the request (load-time LoRAs: ONNX Runtime; a bf16 bundle: OpenVINO) takes that backend's
fastest precision on the kind: OpenVINO on avx2 runs the float graphs.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

from sd3trt.cpu import cpu_kind
from sd3trt.errors import Sd3trtError
from sd3trt.manifest import gate_passed

# kind -> {backend: its fastest gated transformer precision (None: the float graphs)}, fastest backend first
MEASURED = {"avx512bf16": {"openvino": "int8", "onnxruntime": "int8"},
            "avx2": {"onnxruntime": "int8", "openvino": None}}
RESEMBLES = {"amx": "avx512bf16"}  # a kind not measured -> the measured one it takes the row of (default avx2)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Choice:
    backend: str
    transformer_precision: str | None  # None: the bundle's float graphs
    cpu_kind: str
    measured: bool  # whether this CPU kind's row was measured (else it is the row of the kind it resembles)


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def _usable_graph(bundle, precision: str) -> str | None:
    """None when the bundle has a current `precision` transformer that passed its gate; else why not."""
    try:
        entry = bundle.quantized_entry(precision)
    except Sd3trtError as e:
        return str(e)
    return None if gate_passed(entry) else f"its {precision} transformer was recorded without passing its gate"


def choose(bundle, transformer_precision: str | None = None, loras=(), flags: list[str] | None = None) -> Choice:
    """The backend (and, when `transformer_precision` is None, the transformer precision) for this CPU kind.
    Load-time LoRAs run on ONNX Runtime's float graphs only, a bf16 bundle on OpenVINO only; OpenVINO not
    installed means ONNX Runtime. A precision whose graph the bundle lacks is never picked: the float graphs
    run and the log says so once (per pipeline)."""
    kind = cpu_kind(flags)
    row = MEASURED.get(kind) or MEASURED[RESEMBLES.get(kind, "avx2")]
    backend = next(iter(row))
    if loras:
        backend = "onnxruntime"
    elif bundle.dtype == "bf16":
        backend = "openvino"
    if backend == "openvino" and not openvino_installed():
        log.warning("--backend auto: OpenVINO is the faster backend on this CPU (%s) but is not installed; running "
                    "ONNX Runtime (pip install -e '.[openvino]' for it)", kind)
        backend = "onnxruntime"
    precision = None if loras else row[backend]
    if transformer_precision is not None:
        precision = transformer_precision
    elif precision is not None and (why := _usable_graph(bundle, precision)) is not None:
        log.warning("--backend auto: the %s transformer is the faster one on this CPU (%s) but %s; running the "
                    "float graphs", precision, kind, why)
        precision = None
    choice = Choice(backend, precision, kind, kind in MEASURED)
    log.info("--backend auto on a %s CPU%s: %s, transformer %s", kind, "" if choice.measured else " (not measured: "
             "the choice of the kind it resembles)", backend, precision or "in the bundle's float graphs")
    return choice
