"""Which kernels OpenVINO's CPU plugin runs for a bundle's graphs: per layer type, the execution precision, the
kernel (primitiveType, e.g. brgemm_avx512_i8, gemm_mlas_f32, jit_avx2_f32) and the element types it reads.

    python -m sd3trt.benchmarks.ov_kernels --bundle B [--precision int8] [--size 256]

It runs one small img2img on the openvino backend (kernels of dynamic graphs are chosen at the first call),
then prints the table of each component. Nothing is timed: a speed question needs `sd3trt bench`.
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np

SKIP = {"Input", "Output", "Const"}


def kernel_table(compiled) -> Counter:
    """{(layer type, execution precision, kernel, input element types): count} of an ov.CompiledModel."""
    table: Counter = Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str)
        if layer in SKIP:
            continue
        inputs = ",".join(op.input(i).get_element_type().get_type_name() for i in range(op.get_input_size()))
        table[(layer, info["runtimePrecision"].astype(str), info["primitiveType"].astype(str), inputs)] += 1
    return table


def tables(bundle, precision: str | None = None, size: int = 256, cpu_precision: str = "fp32",
           threads: int = 0) -> dict[str, Counter]:
    """{component: kernel_table} after one img2img of `size` px on the openvino backend."""
    from sd3trt.runtime.pipeline import Img2Img

    with Img2Img.from_bundle(bundle, backend="openvino", transformer_precision=precision,
                             cpu_precision=cpu_precision, threads=threads) as pipe:
        pipe(np.zeros((size, size, 3), np.uint8), "a fox", steps=1, strength=1.0, seed=0)
        return {name: kernel_table(pipe.runner(name).compiled) for name in pipe.loaded_components}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m sd3trt.benchmarks.ov_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True)
    p.add_argument("--precision", choices=("int8",), default=None, help="the bundle's INT8 transformer")
    p.add_argument("--cpu-precision", choices=("fp32", "bf16", "auto"), default="fp32")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    for name, table in tables(a.bundle, a.precision, a.size, a.cpu_precision, a.threads).items():
        print(f"== {name}")
        for (layer, prec, kernel, inputs), n in sorted(table.items()):
            print(f"  {n:4d} x {layer:24s} {prec:5s} {kernel:24s} reads {inputs}")


if __name__ == "__main__":
    main()
