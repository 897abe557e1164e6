"""Would batching requests help on this machine? Time the engines batched vs one request at a time.

    python -m sd3trt.benchmarks.batching --bundle B [--backend onnxruntime] [--size 512] [--requests 4]

For each of the transformer (one denoising step, with the CFG copies), the VAE encoder and the VAE
decoder: ``--requests`` requests as one engine call vs as separate calls, best of ``--reps``. The
server does not batch (see server/worker.py); run this on the target accelerator with the real
bundle to decide whether that should change there.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from sd3trt.runtime.pipeline import Img2Img
from sd3trt.spec import concrete_shape, request_dims

PER_REQUEST = {"transformer": 2, "vae_encoder": 1, "vae_decoder": 1}  # transformer: CFG doubles the batch


def feeds(runner, dims: dict, rng) -> dict:
    return {name: rng.standard_normal(concrete_shape(spec["shape"], dims)).astype(spec["dtype"])
            for name, spec in runner.inputs.items()}


def best(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m sd3trt.benchmarks.batching", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True)
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    pipe = Img2Img.from_bundle(a.bundle, backend=a.backend, threads=a.threads)
    rng = np.random.default_rng(0)
    for name, per in PER_REQUEST.items():
        runner = pipe.runner(name)
        one = feeds(runner, request_dims(pipe.facts, per, a.size, a.size), rng)
        many = feeds(runner, request_dims(pipe.facts, per * a.requests, a.size, a.size), rng)
        runner.run(one), runner.run(many)  # warm-up
        batched = best(lambda: runner.run(many), a.reps)
        separate = best(lambda: [runner.run(one) for _ in range(a.requests)], a.reps)
        print(f"{name:12s} {a.size}px x{a.requests}: batched {batched * 1e3:8.1f} ms, separate {separate * 1e3:8.1f} ms, "
              f"speed-up {separate / batched:.2f}x")


if __name__ == "__main__":
    main()
