"""The machine's measured matmul peak per precision, the denominator of "fraction of hardware peak".

Run in a subprocess of the benchmark (`python -m sd3trt.benchmarks.peak OUT.json THREADS BUDGET_S`) with
the same thread count as the systems. For each library/precision it times square matmuls of growing size
(256, 512, ... up to 4096, stopping at a size where one product takes over `max_call_s`) and keeps the best
rate over sizes (best of a few repetitions per size). Libraries:

  fp32  torch.mm and torch.nn.functional.linear (MKL / oneDNN), numpy.matmul (numpy's BLAS), ONNX Runtime
        MatMul with a constant B (MLAS)
  bf16  torch.mm and torch.nn.functional.linear on bfloat16 tensors (different kernels: linear goes through
        oneDNN, which is what the models' nn.Linear layers use)
  int8  torch._int_mm (int8 x int8 -> int32), ONNX Runtime MatMulInteger (uint8 x int8 -> int32, MLAS)

The peak of a precision is the best of its libraries: the best this machine was seen to do, not the
datasheet number. A precision without a fast kernel here shows up as a low peak, which is the point.
"""

from __future__ import annotations

import json
import os
import sys
import time

SIZES = (256, 512, 1024, 2048, 4096)


def _rate(fn, n: int, reps: int, budget_end: float, max_call_s: float) -> tuple[float | None, float]:
    """(best GFLOP/s, time of the first call) of fn at size n."""
    t0 = time.perf_counter()
    fn()  # warm-up (also packs weights, JIT kernels)
    first = time.perf_counter() - t0
    if first > max_call_s * 4:
        return 2 * n**3 / first / 1e9, first
    best = None
    for _ in range(reps):
        if time.perf_counter() > budget_end:
            break
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best = dt if best is None or dt < best else best
    if best is None:
        best = first
    return 2 * n**3 / best / 1e9, first


def _sweep(make, budget_s: float, max_call_s: float, reps: int = 3) -> dict:
    end = time.perf_counter() + budget_s
    by_size = {}
    for n in SIZES:
        if time.perf_counter() > end:
            break
        try:
            fn = make(n)
        except Exception as e:  # a library without this kernel: recorded, not fatal
            return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "by_size": by_size}
        gflops, first = _rate(fn, n, reps, end, max_call_s)
        by_size[str(n)] = round(gflops, 3)
        del fn
        if first > max_call_s:
            break
    best = max(by_size.values()) if by_size else None
    return {"gflops": best, "by_size": by_size}


def _ort_model(op: str, n: int, threads: int):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from sd3trt.runtime.ort_session import ort_session

    rng = np.random.default_rng(0)
    if op == "MatMul":
        b = numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "B")
        inp = helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])
        out = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [n, n])
        node = helper.make_node("MatMul", ["A", "B"], ["Y"])
        a = rng.standard_normal((n, n), dtype=np.float32)
    else:
        b = numpy_helper.from_array(rng.integers(-127, 128, (n, n), dtype=np.int8), "B")
        inp = helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n])
        out = helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])
        node = helper.make_node("MatMulInteger", ["A", "B"], ["Y"])
        a = rng.integers(0, 256, (n, n), dtype=np.uint8)
    graph = helper.make_graph([node], "peak", [inp], [out], initializer=[b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sess = ort_session(model.SerializeToString(), threads)
    return lambda: sess.run(None, {"A": a})


def measure(threads: int, budget_s: float = 20.0, max_call_s: float = 0.5) -> dict:
    """Peaks in GFLOP/s per precision (and per library), each library sweep given budget_s / 9 seconds."""
    import numpy as np

    each = budget_s / 9
    libs: dict[str, dict] = {}
    try:
        import torch

        if threads:
            torch.set_num_threads(threads)

        def torch_mm(dtype):
            def make(n):
                g = torch.Generator().manual_seed(0)
                a = torch.randn(n, n, generator=g).to(dtype)
                b = torch.randn(n, n, generator=g).to(dtype)
                return lambda: torch.mm(a, b)

            return make

        def torch_linear(dtype):  # F.linear takes another path than torch.mm for bf16 (oneDNN matmul)
            def make(n):
                g = torch.Generator().manual_seed(0)
                a = torch.randn(n, n, generator=g).to(dtype)
                w = torch.randn(n, n, generator=g).to(dtype)
                return lambda: torch.nn.functional.linear(a, w)

            return make

        def torch_int(n):
            a = torch.randint(-127, 128, (n, n), dtype=torch.int8)
            b = torch.randint(-127, 128, (n, n), dtype=torch.int8)
            return lambda: torch._int_mm(a, b)

        libs["fp32/torch.mm"] = _sweep(torch_mm(torch.float32), each, max_call_s)
        libs["fp32/torch.linear"] = _sweep(torch_linear(torch.float32), each, max_call_s)
        libs["bf16/torch.mm"] = _sweep(torch_mm(torch.bfloat16), each, max_call_s)
        libs["bf16/torch.linear"] = _sweep(torch_linear(torch.bfloat16), each, max_call_s)
        libs["int8/torch._int_mm"] = _sweep(torch_int, each, max_call_s)
    except ImportError as e:
        libs["torch"] = {"error": f"not installed ({e})"}

    def np_make(n):
        rng = np.random.default_rng(0)
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        return lambda: a @ b

    libs["fp32/numpy"] = _sweep(np_make, each, max_call_s)
    try:
        import onnxruntime  # noqa: F401

        libs["fp32/onnxruntime.MatMul"] = _sweep(lambda n: _ort_model("MatMul", n, threads), each, max_call_s)
        libs["int8/onnxruntime.MatMulInteger"] = _sweep(lambda n: _ort_model("MatMulInteger", n, threads), each, max_call_s)
    except ImportError as e:
        libs["onnxruntime"] = {"error": f"not installed ({e})"}

    peaks = {}
    for key, r in libs.items():
        if "/" in key and r.get("gflops"):
            prec = key.split("/")[0]
            if r["gflops"] > peaks.get(prec, {}).get("gflops", 0):
                peaks[prec] = {"gflops": r["gflops"], "library": key.split("/", 1)[1]}
    return {"threads": threads, "budget_s": budget_s, "peaks": peaks, "libraries": libs,
            "loadavg_1m": os.getloadavg()[0]}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out, threads, budget = argv[0], int(argv[1]), float(argv[2])
    res = measure(threads, budget)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, out)
    for prec, p in sorted(res["peaks"].items()):
        print(f"  peak {prec}: {p['gflops']:.1f} GFLOP/s ({p['library']})", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
