"""`sd3trt build`: registered by core/cli.py through `add_build_command(subparsers)`."""

from __future__ import annotations

import argparse
from pathlib import Path

from sd3trt import precision as words
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
                        "(default 512:1024:1536, capped by the model)")
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
