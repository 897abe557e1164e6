"""The `sd3trt img2img` subcommand: the one part of the runtime that prints (the library logs)."""

from __future__ import annotations

import logging
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from sd3trt.errors import Sd3trtError


def print_progress(i: int, n: int) -> None:
    bar = "#" * (20 * i // n)
    end = "\n" if i == n else ""
    print(f"\rdenoising {bar:<20} {i}/{n}", end=end, file=sys.stderr, flush=True)


def _read_noise(path: Path):
    from sd3trt.runtime.plan import Noise

    try:
        with np.load(path) as z:
            if "latents" not in z:
                raise Sd3trtError(f"{path} has no array 'latents' (found {list(z.keys())}); save it with np.savez")
            return Noise(z["latents"], z["posterior"] if "posterior" in z else None)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise Sd3trtError(f"cannot read noise file {path} ({e}); pass an .npz with arrays 'latents' [and 'posterior']") from None


@contextmanager
def warnings_on_stderr() -> Iterator[None]:
    """For the command's duration, the library's warnings (logger "sd3trt") go to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    handler.setLevel(logging.WARNING)
    logger = logging.getLogger("sd3trt")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def output_paths(out: Path, n: int) -> list[Path]:
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


def run_img2img(a) -> None:
    from sd3trt.runtime import images as imgs
    from sd3trt.runtime.pipeline import Img2Img

    outs = output_paths(a.out, a.num_images)
    for out in outs:  # every output path, and the noise file, checked before any work
        imgs.check_output(out, overwrite=a.overwrite)
    noise = _read_noise(a.noise) if a.noise else None
    with warnings_on_stderr(), Img2Img.from_bundle(
            a.bundle, backend=a.backend, low_memory=a.low_memory, engine_build=a.engines,
            transformer_precision=a.precision, vae_precision=a.vae_precision, loras=a.lora,
            cpu_precision=a.cpu_precision, weights=a.weights) as pipe:
        res = pipe(
            a.image, a.prompt, negative_prompt=a.negative_prompt, strength=a.strength, steps=a.steps,
            guidance_scale=a.guidance, seed=a.seed, num_images=a.num_images, noise=noise,
            max_sequence_length=a.max_sequence_length, progress=print_progress, max_pixels=a.max_pixels,
        )
    for w in res.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for img, path in zip(res.images, outs):
        imgs.save_image(img, path)
        print(f"wrote {path}")
    print("timings (s): " + ", ".join(f"{k} {v:.3f}" for k, v in res.timings.items()))


def add_precisions(p) -> None:
    """--precision, --vae-precision and --cpu-precision: what img2img and serve run each graph in."""
    from sd3trt import precision as words
    from sd3trt.runtime.ov_runner import CPU_PRECISIONS

    p.add_argument("--precision", default=None, choices=words.ENGINE,
                   help="transformer precision: onnxruntime/openvino run fp32 graphs or int8/fp8 ones from `sd3trt "
                        "quantize`; tensorrt uses the engine build of this precision (`sd3trt build --precision`)")
    p.add_argument("--vae-precision", default=None, choices=words.FLOATS + words.VAE_QUANTIZED,
                   help="int8: the VAE's int8 convolutions on the CPU backends (`sd3trt quantize --component "
                        "vae_decoder`); fp16/bf16/fp32 with tensorrt: the engine build whose VAE has it")
    p.add_argument("--cpu-precision", default=None, choices=CPU_PRECISIONS,
                   help="openvino backend: auto (default: bf16 where the CPU has AVX512_BF16 or AMX), fp32 or bf16; "
                        "bf16 runs the graphs that passed `sd3trt gate`")


def add_runtime_commands(sub) -> None:
    from sd3trt.precision import WEIGHTS
    from sd3trt.runtime.images import DEFAULT_MAX_PIXELS
    from sd3trt.runtime.pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS, DEFAULT_STRENGTH
    from sd3trt.runtime.runners import BACKENDS
    from sd3trt.spec import T5_DEFAULT_LENGTH

    p = sub.add_parser("img2img", help="run SD3 img2img on a bundle")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--strength", type=float, default=DEFAULT_STRENGTH)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", type=Path, help=".npz with 'latents' [num_images,C,h,w] and optional 'posterior' [1,C,h,w]")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--max-sequence-length", type=int, default=T5_DEFAULT_LENGTH)
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="decompression-bomb limit on input pixels")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS,
                   help="auto: the CPU backend and transformer precision measured fastest on this kind of CPU "
                        "(ONNX Runtime INT8 on AVX2, OpenVINO INT8 + bf16 on AVX-512 BF16; float graphs where the "
                        "bundle has no gated INT8 transformer)")
    p.add_argument("--engines", default=None, help="which `sd3trt build` output to use (tensorrt backend)")
    add_precisions(p)
    p.add_argument("--weights", default=None, choices=WEIGHTS,
                   help="w8: the 8-bit-weight graphs of `sd3trt compress-weights` (CPU backends; half the memory of "
                        "16-bit weights, for models that would not fit otherwise)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="merge a LoRA (diffusers/PEFT safetensors) into the weights at load time, at SCALE (default 1); "
                        "repeatable; ONNX Runtime backends (TensorRT: `sd3trt refit`)")
    p.add_argument("--low-memory", action="store_true", help="load each engine only while it is needed")
    p.add_argument("--out", type=Path, required=True,
                   help="output image (.png, .jpg, .webp); with --num-images N > 1: OUT-0.png ... OUT-<N-1>.png")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=run_img2img)
