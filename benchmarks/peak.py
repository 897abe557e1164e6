"""The machine's measured matmul peak per precision, the denominator of "fraction of hardware peak".

Run in a subprocess of the benchmark (`python -m sd3trt.benchmarks.peak OUT.json THREADS BUDGET_S [SHAPES]`)
with the same thread count as the systems. Each library/precision is timed on square products (512 ... 3072)
and, first, on the model's own layer shapes (SHAPES: a JSON list of [M, K, N], e.g. tokens x hidden x 4 hidden),
warm (a first call packs weights and JIT-compiles, then the best of a few calls counts); the best rate over
shapes is the library's. Libraries:

  fp32  torch.mm and torch.nn.functional.linear (MKL / oneDNN), numpy.matmul, ONNX Runtime MatMul with a
        constant B (MLAS), OpenVINO MatMul with a constant B (f32)
  bf16  torch.mm and torch.nn.functional.linear on bfloat16 tensors (linear goes through oneDNN, as the
        models' nn.Linear layers do), OpenVINO MatMul with the bf16 inference precision (AVX512_BF16 / AMX)
  int8  torch._int_mm (int8 x int8 -> int32), ONNX Runtime MatMulInteger (uint8 x int8 -> int32, MLAS),
        OpenVINO MatMul between Q/DQ pairs (the pattern of `sd3trt quantize` graphs: VNNI / AMX int8)

The peak of a precision is the best of its libraries: the best this machine was seen to do, not the
datasheet number. A system whose transformer still runs faster than that is reported against its own
rate (report.py raises the peak and says so), so no fraction exceeds 100%.
"""

from __future__ import annotations

import json
import os
import sys
import time

SQUARES = (512, 1024, 2048, 3072)


def _best_rate(fn, flops: float, reps: int, budget_end: float) -> float:
    """Best GFLOP/s over `reps` warm calls (at least one)."""
    fn()  # warm-up (also packs weights, JIT kernels)
    best = None
    for _ in range(reps):
        if best is not None and time.perf_counter() > budget_end:
            break
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best = dt if best is None or dt < best else best
    return flops / best / 1e9


def _sweep(make, shapes: list[tuple[int, int, int]], budget_s: float, reps: int = 3) -> dict:
    end = time.perf_counter() + budget_s
    by_shape = {}
    for m, k, n in shapes:
        if time.perf_counter() > end:
            break
        try:
            fn = make(m, k, n)
        except Exception as e:  # a library without this kernel: recorded, not fatal
            return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "by_shape": by_shape}
        gflops = _best_rate(fn, 2.0 * m * k * n, reps, end)
        by_shape[f"{m}x{k}x{n}"] = round(gflops, 3)
        del fn
    best = max(by_shape.values()) if by_shape else None
    return {"gflops": best, "by_shape": by_shape}


def _onnx_matmul(m: int, k: int, n: int, quantized: bool):
    """An ONNX MatMul A[m,k] x B[k,n] with constant B: float, or between Q/DQ pairs (int8 weights per column)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inp = helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])
    out = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])
    if not quantized:
        inits = [numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "B")]
        nodes = [helper.make_node("MatMul", ["A", "B"], ["Y"])]
    else:
        inits = [numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), "Bq"),
                 numpy_helper.from_array(np.full((n,), 0.01, np.float32), "Bs"),
                 numpy_helper.from_array(np.zeros((n,), np.int8), "Bz"),
                 numpy_helper.from_array(np.array(0.05, np.float32), "As"),
                 numpy_helper.from_array(np.array(0, np.uint8), "Az")]
        nodes = [helper.make_node("QuantizeLinear", ["A", "As", "Az"], ["Aq"]),
                 helper.make_node("DequantizeLinear", ["Aq", "As", "Az"], ["Ad"]),
                 helper.make_node("DequantizeLinear", ["Bq", "Bs", "Bz"], ["Bd"], axis=1),
                 helper.make_node("MatMul", ["Ad", "Bd"], ["Y"])]
    graph = helper.make_graph(nodes, "peak", [inp], [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, rng.standard_normal((m, k), dtype=np.float32)


def _ort_model(op: str, m: int, k: int, n: int, threads: int):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from sd3trt.runtime.ort_session import ort_session

    if op == "MatMul":
        model, a = _onnx_matmul(m, k, n, quantized=False)
    else:
        rng = np.random.default_rng(0)
        b = numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), "B")
        inp = helper.make_tensor_value_info("A", TensorProto.UINT8, [m, k])
        out = helper.make_tensor_value_info("Y", TensorProto.INT32, [m, n])
        node = helper.make_node("MatMulInteger", ["A", "B"], ["Y"])
        a = rng.integers(0, 256, (m, k), dtype=np.uint8)
        model = helper.make_model(helper.make_graph([node], "peak", [inp], [out], initializer=[b]),
                                  opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
    sess = ort_session(model.SerializeToString(), threads)
    return lambda: sess.run(None, {"A": a})


def _ov_model(hint: str, quantized: bool, m: int, k: int, n: int, threads: int):
    import openvino as ov

    model, a = _onnx_matmul(m, k, n, quantized)
    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU", config)
    request = compiled.create_infer_request()
    return lambda: request.infer({0: a})


def measure(threads: int, budget_s: float = 90.0, shapes: list | None = None) -> dict:
    """Peaks in GFLOP/s per precision (and per library), each library given an equal share of budget_s."""
    import numpy as np

    shapes = [tuple(s) for s in shapes or []] + [(q, q, q) for q in SQUARES]  # the model's shapes first
    sweeps: dict[str, object] = {}
    try:
        import torch

        if threads:
            torch.set_num_threads(threads)

        def torch_mm(dtype, linear: bool):
            def make(m, k, n):
                g = torch.Generator().manual_seed(0)
                a = torch.randn(m, k, generator=g).to(dtype)
                if linear:  # weight [n, k], as nn.Linear stores it
                    w = torch.randn(n, k, generator=g).to(dtype)
                    return lambda: torch.nn.functional.linear(a, w)
                b = torch.randn(k, n, generator=g).to(dtype)
                return lambda: torch.mm(a, b)

            return make

        def torch_int(m, k, n):
            a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
            b = torch.randint(-127, 128, (k, n), dtype=torch.int8)
            return lambda: torch._int_mm(a, b)

        sweeps["fp32/torch.mm"] = torch_mm(torch.float32, False)
        sweeps["fp32/torch.linear"] = torch_mm(torch.float32, True)
        sweeps["bf16/torch.mm"] = torch_mm(torch.bfloat16, False)
        sweeps["bf16/torch.linear"] = torch_mm(torch.bfloat16, True)
        sweeps["int8/torch._int_mm"] = torch_int
    except ImportError as e:
        sweeps["torch"] = {"error": f"not installed ({e})"}

    def np_make(m, k, n):
        rng = np.random.default_rng(0)
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        return lambda: a @ b

    sweeps["fp32/numpy"] = np_make
    for module, entries in (
        ("onnxruntime", {"fp32/onnxruntime.MatMul": lambda m, k, n: _ort_model("MatMul", m, k, n, threads),
                         "int8/onnxruntime.MatMulInteger": lambda m, k, n: _ort_model("MatMulInteger", m, k, n, threads)}),
        ("openvino", {"fp32/openvino.MatMul": lambda m, k, n: _ov_model("f32", False, m, k, n, threads),
                      "bf16/openvino.MatMul": lambda m, k, n: _ov_model("bf16", False, m, k, n, threads),
                      "int8/openvino.MatMul(Q/DQ)": lambda m, k, n: _ov_model("f32", True, m, k, n, threads)}),
    ):
        try:
            __import__(module)
            __import__("onnx")
            sweeps.update(entries)
        except ImportError as e:
            sweeps[module] = {"error": f"not installed ({e})"}
    each = budget_s / max(1, sum(callable(v) for v in sweeps.values()))
    libs = {key: _sweep(v, shapes, each) if callable(v) else v for key, v in sweeps.items()}

    peaks = {}
    for key, r in libs.items():
        if "/" in key and r.get("gflops"):
            prec = key.split("/")[0]
            if r["gflops"] > peaks.get(prec, {}).get("gflops", 0):
                peaks[prec] = {"gflops": r["gflops"], "library": key.split("/", 1)[1]}
    return {"threads": threads, "budget_s": budget_s, "shapes": [list(s) for s in shapes], "peaks": peaks,
            "libraries": libs, "loadavg_1m": os.getloadavg()[0]}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out, threads, budget = argv[0], int(argv[1]), float(argv[2])
    res = measure(threads, budget, shapes=json.loads(argv[3]) if len(argv) > 3 else None)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, out)
    for prec, p in sorted(res["peaks"].items()):
        print(f"  peak {prec}: {p['gflops']:.1f} GFLOP/s ({p['library']})", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
