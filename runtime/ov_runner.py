"""OpenVINO runner: the bundle's ONNX graphs (fp32, and the Q/DQ graphs of `sd3trt quantize`) compiled by
OpenVINO's CPU plugin, in f32 or bf16.

    runner = OvRunner("transformer", bundle.component("transformer"), path, precision="bf16", threads=2)

Each runner compiles its graph once (latency hint, one stream, `threads` threads) and keeps the compiled
model in OpenVINO's model cache under cache_base()/openvino/<file key>: a restart imports the compiled blob
instead of compiling again. The key names the file by path, size and modification time, so a re-exported
graph never meets a stale blob (OpenVINO's own key adds the compile settings).

The INT8 VAE graphs quantize each convolution's output as well as its inputs, the form ONNX Runtime fuses
into QLinearConv (engines/vae_quant.py). OpenVINO's int8 convolutions produce float outputs, so here the
group norms and residual additions that read a convolution get its float output back
(`float_outside_int8`); only the next convolution reads the quantized value. On the medium-width decoder
that takes its image from 28.2 to 32.3 dB PSNR vs fp32, at the same speed (docs/quantization.md).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from sd3trt.errors import Sd3trtError
from sd3trt.files import graph_size
from sd3trt.runtime.caches import cache_base
from sd3trt.runtime.runners import Runner, error_line, onnx_file, release_heap

CPU_PRECISIONS = ("auto", "fp32", "bf16")
# Larger graphs are compiled at every start instead: a full-size transformer's blob would be another 16 GB on disk.
CACHE_MAX_BYTES = 4 << 30
HINTS = {"fp32": "f32", "bf16": "bf16"}


@functools.cache
def core():
    """The process's one openvino.Core (its plugins load once)."""
    try:
        import openvino as ov
    except ImportError:
        raise Sd3trtError("the openvino backend needs OpenVINO: pip install -e '.[openvino]'") from None
    return ov.Core()


def openvino_version() -> str:
    import openvino as ov

    return ov.__version__.split("-")[0]


def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin computes bf16 natively here (AVX512_BF16 or AMX)."""
    return "BF16" in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def resolve_cpu_precision(asked: str) -> str:
    """"fp32" or "bf16" for an asked-for "auto" | "fp32" | "bf16"; bf16 on a CPU without it is refused."""
    if asked not in CPU_PRECISIONS:
        raise Sd3trtError(f"unknown CPU precision {asked!r}; use {', '.join(CPU_PRECISIONS)}")
    if asked == "fp32":
        return "fp32"
    if cpu_has_bf16():
        return "bf16"
    if asked == "bf16":
        raise Sd3trtError("this CPU has no native bf16 (no AVX512_BF16 or AMX), so OpenVINO would emulate it "
                          "slowly; use --cpu-precision fp32 (or auto)")
    return "fp32"


INT8_OPS = ("Convolution", "GroupConvolution", "MatMul")  # what OpenVINO runs in int8 behind a FakeQuantize
DEQUANTIZE = ("Convert", "Subtract", "Multiply")  # the ops a DequantizeLinear becomes


def _constant(node) -> bool:
    """A Constant, or a Convert of one (a zero point stored as uint8)."""
    if node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    return node.get_type_name() == "Constant"


def float_outside_int8(model) -> int:
    """Rewire every reader of a quantized tensor that is not an int8 op to the float tensor (in place);
    returns how many inputs were rewired."""
    rewired = 0
    for fq in model.get_ops():
        if fq.get_type_name() != "FakeQuantize":
            continue
        end = fq  # follow the dequantization chain: Convert, then Subtract / Multiply by constants
        for _ in range(8):
            readers = list(end.output(0).get_target_inputs())
            nxt = readers[0].get_node() if len(readers) == 1 else None
            if nxt is None or nxt.get_type_name() not in DEQUANTIZE or not (
                    nxt.get_type_name() == "Convert" or any(_constant(v.get_node()) for v in nxt.input_values())):
                break
            end = nxt
        for reader in list(end.output(0).get_target_inputs()):
            if reader.get_node().get_type_name() not in INT8_OPS:
                reader.replace_source_output(fq.input_value(0))
                rewired += 1
    return rewired


def _float32_io(model, names: set[str]):
    """The model with float32 tensors at its bf16 inputs and outputs `names` (OpenVINO converts at the edge)."""
    if not names:
        return model
    import openvino as ov
    from openvino.preprocess import PrePostProcessor

    ppp = PrePostProcessor(model)
    for i, port in enumerate(model.inputs):
        if port.get_any_name() in names:
            ppp.input(i).tensor().set_element_type(ov.Type.f32)
    for i, port in enumerate(model.outputs):
        if port.get_any_name() in names:
            ppp.output(i).tensor().set_element_type(ov.Type.f32)
    return ppp.build()


def model_cache_dir(path: Path) -> Path:
    st = Path(path).stat()
    key = hashlib.sha256(f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_base() / "openvino" / key


class OvRunner(Runner):
    """One compiled OpenVINO model and its infer request (calls are serialized by the runner's lock)."""

    def __init__(self, name: str, entry: dict, path: Path, precision: str = "fp32", threads: int = 0):
        super().__init__(name, entry)
        if precision not in HINTS:
            raise Sd3trtError(f"{name}: OpenVINO runs fp32 or bf16, not {precision!r}")
        path = onnx_file(name, path)
        self.precision = precision
        config = {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        cache = model_cache_dir(path)
        try:
            if graph_size(path) <= CACHE_MAX_BYTES:
                cache.mkdir(parents=True, exist_ok=True)
                config["CACHE_DIR"] = str(cache)
        except OSError:
            pass  # no cache: each start compiles (slower start, same results)
        ov_core = core()
        bf16_io = [t for t in entry["inputs"] + entry["outputs"] if t["dtype"] == "bfloat16"]
        try:
            model = str(path)
            if name.startswith("vae_") and path.name.endswith(".int8.onnx"):
                model = ov_core.read_model(model)
                float_outside_int8(model)
            if bf16_io:
                model = _float32_io(ov_core.read_model(model), {t["name"] for t in bf16_io})
            self.compiled = ov_core.compile_model(model, "CPU", config)
        except Exception as e:  # OpenVINO raises RuntimeError with a multi-line report
            raise Sd3trtError(f"{name}: OpenVINO cannot compile {path} ({error_line(e)}); re-export it, or use "
                              "--backend onnxruntime") from None
        self.request = self.compiled.create_infer_request()
        for t in bf16_io:  # numpy has no bf16: the caller feeds and reads float32 (see _float32_io)
            if t["name"] in self.inputs:
                self.inputs[t["name"]] = dict(t, dtype="float32")
        release_heap()

    def _run(self, feeds):
        res = self.request.infer(feeds)  # outputs are copies (share_outputs=False): safe past the next call
        return {name: res[name] for name in self.outputs}

    def close(self) -> None:
        self.request = None
        self.compiled = None
        release_heap()
