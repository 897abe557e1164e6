"""The engines' commands, registered together by core/cli.py through `add_engine_commands(subparsers)`:
`sd3trt build`, `sd3trt quantize` (its flags: quantize_cli.py), `sd3trt gate`, `sd3trt compress-weights` and
`sd3trt refit`.
Each command's work is in its own module, imported when it runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from sd3trt import precision as words
from sd3trt.errors import Sd3trtError
from sd3trt.profiles import DEFAULT_IMAGES
from sd3trt.spec import SD3_PIXEL_MULTIPLE, T5_DEFAULT_LENGTH


EXAMPLES = """examples:
  sd3trt build --bundle B --precision fp16 --image-size 512:1024:1536 --batch 1:2 --cfg both
  sd3trt build --bundle B --precision bf16 --compute-capability 8.9 --static --image-size 1024
  sd3trt quantize --bundle B --precision fp8 && sd3trt build --bundle B --precision fp8 --compute-capability 8.9
"""


def _build(a) -> None:
    from sd3trt.engines.build import BuildOptions, build_engines
    from sd3trt.profiles import Range, ShapeRequest

    keep = () if a.keep_fp32.strip().lower() in ("", "none") else tuple(s.strip() for s in a.keep_fp32.split(",") if s.strip())
    req = ShapeRequest(
        images=tuple(Range.parse(s, "--image-size") for s in (a.image_size or [])),
        image_step=a.image_step,
        batch=Range.parse(a.batch, "--batch"),
        cfg=a.cfg,
        t5_seq=Range.parse(a.t5_seq, "--t5-seq"),
        static=a.static,
    )
    ccs = tuple(c.strip() for v in (a.compute_capability or []) for c in v.split(",") if c.strip())
    opts = BuildOptions(
        precision=a.precision, name=a.name,
        components=tuple(c.strip() for c in a.components.split(",")) if a.components else None,
        request=req, flavour=a.flavour, compute_capabilities=ccs, workspace=a.workspace, opt_level=a.opt_level,
        refit=a.refit, strip_weights=a.strip_weights, weight_streaming=a.weight_streaming,
        timing_cache=a.timing_cache, keep_fp32=keep, force=a.force,
    )
    build_engines(a.bundle, opts)


def add_build_command(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "build", help="build TensorRT engines for a bundle (one per component, listed in its manifest)",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory written by `sd3trt export`")
    p.add_argument("--precision", required=True, choices=words.ENGINE,
                   help="fp16/fp32 need a bundle exported in that dtype; bf16 takes a bf16 bundle or derives from an "
                        "fp32 one; int8/fp8 (after `sd3trt quantize`): the quantized transformer, the rest in the "
                        "bundle's fp16/bf16 (bf16 from an fp32 bundle)")
    p.add_argument("--name", help="build name: engines/<name>/ (default <precision>-<rtx|trt>-<target>)")
    p.add_argument("--components", help="comma-separated subset (default: every component of the bundle)")
    g = p.add_argument_group("shapes (optimization profiles)")
    g.add_argument("--image-size", action="append", metavar="MIN:OPT:MAX",
                   help="image side range in px for height and width, or one size; repeat for several profiles "
                        f"(default {':'.join(map(str, DEFAULT_IMAGES))}, capped by the model)")
    g.add_argument("--image-step", type=int, default=SD3_PIXEL_MULTIPLE,
                   help="sizes are multiples of this (default %(default)s; a multiple of the model's pixel multiple)")
    g.add_argument("--batch", default="1", metavar="MIN:OPT:MAX", help="images per request (default 1)")
    g.add_argument("--cfg", choices=("on", "off", "both"), default="both",
                   help="classifier-free guidance doubles the transformer batch; both = a profile for each (default)")
    g.add_argument("--t5-seq", default=str(T5_DEFAULT_LENGTH), metavar="MIN:OPT:MAX",
                   help="T5 token length range (default %(default)s)")
    g.add_argument("--static", action="store_true", help="fixed shapes: every range collapses to its OPT value")
    g = p.add_argument_group("TensorRT")
    g.add_argument("--flavour", choices=("auto", "tensorrt", "tensorrt_rtx"), default=None,
                   help="auto (default; $SD3TRT_TRT_FLAVOUR, else tensorrt if installed, else tensorrt_rtx)")
    g.add_argument("--compute-capability", action="append", metavar="CC",
                   help="tensorrt_rtx ahead-of-time target(s), e.g. 8.9 or 8.6,12.0 or current "
                        "(default: the flavour's portable set)")
    g.add_argument("--workspace", help="builder workspace limit, e.g. 4GiB")
    g.add_argument("--opt-level", type=int, choices=range(6), metavar="0-5", help="builder optimization level")
    g.add_argument("--refit", action="store_true", help="refittable engines (weights can be swapped later)")
    g.add_argument("--strip-weights", action="store_true",
                   help="weight-stripped engines (implies --refit); weights are refit from the bundle's ONNX at load")
    g.add_argument("--weight-streaming", action="store_true", help="allow streaming weights from host memory")
    g.add_argument("--timing-cache", type=Path, help="timing cache file (full TensorRT; default in engines/)")
    g.add_argument("--keep-fp32", default=",".join(_default_keep()),
                   help="op types kept in fp32 in fp16/bf16 engines, comma-separated, or none")
    p.add_argument("--force", action="store_true", help="rebuild components even when nothing changed")
    p.set_defaults(func=_build)
    return p


def _default_keep() -> tuple[str, ...]:
    return ("LayerNormalization", "InstanceNormalization", "GroupNormalization", "RMSNormalization")


def _gate_settings(a):
    """The image gate's requests from --runs/--steps/--strength/--size, each checked."""
    from sd3trt.engines.cpu_gate import GateSettings

    for what, value in (("--runs", a.runs), ("--steps", a.steps), ("--size", a.size)):
        if value < 1:
            raise Sd3trtError(f"{what} must be at least 1, got {value}")
    if not 0 < a.strength <= 1:
        raise Sd3trtError(f"--strength {a.strength} must be in (0, 1]")
    return GateSettings(runs=a.runs, steps=a.steps, strength=a.strength, size=a.size)


def _gate_options(p) -> None:
    from sd3trt.engines.cpu_gate import GateSettings

    p.add_argument("--runs", type=int, default=GateSettings.runs, help="img2img requests compared (default %(default)s)")
    p.add_argument("--steps", type=int, default=GateSettings.steps, help="denoising steps (default %(default)s)")
    p.add_argument("--strength", type=float, default=GateSettings.strength)
    p.add_argument("--size", type=int, default=GateSettings.size, help="image side in px (default %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: all)")


def _gate(a) -> None:
    from sd3trt.engines.cpu_gate import gate_bf16

    record = gate_bf16(a.bundle, _gate_settings(a), a.threads)
    bf16 = sorted(k for k, g in record["graphs"].items() if g["passed"])
    print(f"bf16 on OpenVINO: {', '.join(bf16) or 'no graph'} (recorded in {a.bundle / 'manifest.json'}; "
          f"{record['seconds']:.0f} s)")


def add_gate_command(sub) -> argparse.ArgumentParser:
    from sd3trt.engines.accuracy import GATE

    p = sub.add_parser("gate", help="measure which graphs may run in bf16 on OpenVINO (image vs fp32) and record it",
                       description="Run img2img on OpenVINO with each graph of the bundle in bf16 and compare the image "
                                   f"with the fp32 pipeline's (worst PSNR >= {GATE['psnr_db']:g} dB and SSIM >= "
                                   f"{GATE['ssim']:g}); `--backend openvino` then runs the graphs that passed in bf16.")
    p.add_argument("--bundle", type=Path, required=True, help="an fp32 bundle written by `sd3trt export`")
    _gate_options(p)
    p.set_defaults(func=_gate)
    return p


def _compress(a) -> None:
    from sd3trt.engines.weight_compress import compress_bundle

    components = tuple(c.strip() for c in a.components.split(",") if c.strip())
    settings = None if a.no_gate else _gate_settings(a)
    if settings is None:
        print("compress-weights: --no-gate: the 8-bit-weight graphs run without an image comparison")
    compress_bundle(a.bundle, components, settings, threads=a.threads)


def add_compress_command(sub) -> argparse.ArgumentParser:
    from sd3trt.engines.accuracy import GATE
    from sd3trt.engines.weight_compress import COMPRESSIBLE

    p = sub.add_parser("compress-weights", help="8-bit weights (no calibration) for the CPU backends: half the memory "
                                                "of 16-bit weights",
                       description="Store each MatMul weight of the chosen graphs as int8 with one scale per output "
                                   "channel (`img2img --weights w8` runs them; OpenVINO keeps them compressed). Then "
                                   "img2img with them is compared with the bundle's own graphs (worst PSNR >= "
                                   f"{GATE['psnr_db']:g} dB and SSIM >= {GATE['ssim']:g}); graphs that fail stay unused.")
    p.add_argument("--bundle", type=Path, required=True, help="a bundle written by `sd3trt export`")
    p.add_argument("--components", default="transformer,t5", help=f"comma-separated, of {', '.join(COMPRESSIBLE)}")
    p.add_argument("--no-gate", action="store_true",
                   help="skip the image comparison (where the reference pipeline cannot fit the machine)")
    _gate_options(p)
    p.set_defaults(func=_compress)
    return p


def _refit(a) -> None:
    from sd3trt.engines.refit import apply_refit, refit_plan

    plan = refit_plan(a.bundle, a.lora, a.engines)
    for c, weights in plan.describe().items():
        print(f"{c}: {len(weights)} weight(s) to refit in build {plan.build!r}")
    if a.plan_only:
        return
    from sd3trt.runtime.cuda import find_gpu

    find_gpu()  # refitting needs the GPU the engines run on: a clear error without one
    apply_refit(a.bundle, plan, a.name)


def add_refit_command(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("refit", help="apply a LoRA to TensorRT engines built with --refit (no rebuild)")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--lora", action="append", required=True, metavar="PATH[:SCALE]", help="repeatable")
    p.add_argument("--engines", default=None, help="the --refit build to start from (default: the newest)")
    p.add_argument("--name", default=None, help="name of the new build (default <build>-lora)")
    p.add_argument("--plan-only", action="store_true", help="check and print the plan; touch no GPU")
    p.set_defaults(func=_refit)
    return p


def add_engine_commands(sub) -> None:
    """build, quantize, gate, compress-weights and refit, in that order in `sd3trt --help`."""
    from sd3trt.engines.quantize_cli import add_quantize_command

    add_build_command(sub)
    add_quantize_command(sub)
    add_gate_command(sub)
    add_compress_command(sub)
    add_refit_command(sub)
