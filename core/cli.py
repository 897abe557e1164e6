"""`sd3trt` command line. Each subcommand has only its own flags; heavy imports happen inside them."""

# The one core module that imports the subpackages: it gathers their commands, and runs `demo` (which
# needs both export and the runtime).

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sd3trt.errors import Sd3trtError


def _make_tiny(a) -> None:
    from sd3trt.export.tiny_model import TinyOptions, make_tiny

    opts = TinyOptions(
        seed=a.seed,
        patch_size=a.patch_size,
        latent_channels=a.latent_channels,
        num_layers=a.layers,
        sd35=a.sd35,
        with_t5=not a.no_t5,
        head_dim=a.head_dim,
        vae_levels=a.vae_levels,
    )
    make_tiny(a.out, opts, overwrite=a.overwrite)
    print(f"tiny SD3{'.5' if a.sd35 else ''} model written to {a.out}")


def _make_random(a) -> None:
    from sd3trt.export.random_model import make_random

    depth = {}
    for item in a.depth:
        name, sep, layers = item.partition("=")
        if not sep or not layers.isdigit():
            raise Sd3trtError(f"--depth {item!r}: write COMPONENT=LAYERS, e.g. --depth transformer=2")
        depth[name] = int(layers)
    make_random(a.arch, a.out, dtype=a.dtype, seed=a.seed, depth=depth, overwrite=a.overwrite)
    print(f"random {a.arch} model written to {a.out}")


def _export(a) -> None:
    from sd3trt.export.bundle import export_bundle

    export_bundle(a.model, a.out, dtype=a.dtype, opset=a.opset, skip_t5=a.skip_t5, overwrite=a.overwrite,
                  loras=a.lora)


def _verify(a) -> None:
    from sd3trt.manifest import load_bundle

    load_bundle(a.bundle, verify_checksums=True, report=lambda rel, verdict: print(f"{verdict:<8} {rel}", flush=True))


def _demo(a) -> None:
    """Make a tiny model, export it, and run img2img on a generated picture (export + runtime)."""
    from PIL import Image, ImageDraw

    from sd3trt.export.bundle import export_bundle
    from sd3trt.export.tiny_model import make_tiny
    from sd3trt.runtime import images as imgs
    from sd3trt.runtime.cli import print_progress
    from sd3trt.runtime.pipeline import Img2Img

    work, out = Path(a.workdir), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    imgs.check_output(out, overwrite=a.overwrite)
    model, bundle = work / "tiny-model", work / "tiny-bundle"
    if not (model / "model_index.json").is_file():
        print(f"making a tiny random SD3 model in {model}")
        make_tiny(model, overwrite=True)
    export_bundle(model, bundle, overwrite=True)
    picture = Image.new("RGB", (128, 96), "white")
    draw = ImageDraw.Draw(picture)
    draw.ellipse((20, 10, 90, 80), fill=(220, 60, 40))
    draw.rectangle((70, 40, 120, 90), fill=(40, 90, 200))
    src = work / "demo-input.png"
    imgs.save_image(picture, src)
    with Img2Img.from_bundle(bundle) as pipe:
        res = pipe(src, "a red circle and a blue square, watercolor", negative_prompt="blurry",
                   strength=0.7, steps=a.steps, seed=0, progress=print_progress)
    imgs.save_image(res.images[0], out)
    print(f"demo image written to {out} ({res.images[0].width}x{res.images[0].height})")
    print("timings (s): " + ", ".join(f"{k} {v:.3f}" for k, v in res.timings.items()))


def add_demo(sub) -> None:
    d = sub.add_parser("demo", help="make a tiny model, export it and run img2img (needs the export extra)")
    d.add_argument("--workdir", type=Path, default=Path("demo-out"))
    d.add_argument("--out", type=Path, default=Path("demo-out/demo.png"))
    d.add_argument("--steps", type=int, default=10)
    d.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    d.set_defaults(func=_demo)


def add_make_tiny(sub) -> None:
    p = sub.add_parser("make-tiny", help="write a tiny random-weight SD3 model in diffusers format")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--patch-size", type=int, default=2)
    p.add_argument("--latent-channels", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--sd35", action="store_true", help="SD3.5 style: qk_norm and dual-attention layers")
    p.add_argument("--no-t5", action="store_true", help="a model without the T5 text encoder")
    p.add_argument("--head-dim", type=int, default=8, help="attention head dim (16 or more: FP8 quantizes attention)")
    p.add_argument("--vae-levels", type=int, default=4, choices=(2, 3, 4), help="VAE resolution levels")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_make_tiny)


def add_make_random(sub) -> None:
    from sd3trt.export.architectures import TRANSFORMERS

    p = sub.add_parser("make-random", help="write a real SD3 / SD3.5 architecture with random weights "
                                           "(diffusers format), one module at a time")
    p.add_argument("--arch", required=True, choices=tuple(TRANSFORMERS))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtype", default="bf16", help="fp32 | fp16 | bf16 (the real SD3.5 checkpoints are bf16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--depth", action="append", default=[], metavar="COMPONENT=LAYERS",
                   help="fewer layers for one of transformer, clip_l, clip_g, t5 (repeatable); default: full depth")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_make_random)


def add_export(sub) -> None:
    p = sub.add_parser("export", help="export a local diffusers SD3 model to an ONNX bundle")
    p.add_argument("--model", type=Path, required=True, help="diffusers-format SD3 / SD3.5 model directory")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument("--dtype", default="fp32", help="fp32 | fp16 | bf16")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--skip-t5", action="store_true", help="leave T5 out (the runtime then feeds zeros, as diffusers does)")
    p.add_argument("--overwrite", action="store_true", help="update an existing bundle; unchanged components are kept")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="fuse a LoRA (diffusers/PEFT safetensors) into the exported weights at SCALE (default 1); "
                        "repeatable")
    p.set_defaults(func=_export)


def add_verify(sub) -> None:
    p = sub.add_parser("verify", help="re-hash every file of a bundle and compare it with the manifest's sha256",
                       description="Re-hash every file the bundle's manifest lists and print one line per file "
                                   "(ok, MISMATCH or missing); exit status 2 when any file is wrong.")
    p.add_argument("--bundle", type=Path, required=True, help="bundle directory (the one holding manifest.json)")
    p.set_defaults(func=_verify)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sd3trt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_make_tiny(sub)
    add_make_random(sub)
    add_export(sub)
    add_verify(sub)
    from sd3trt.engines.cli import add_engine_commands
    from sd3trt.runtime.cli import add_runtime_commands

    from sd3trt.benchmarks.cli import add_bench_command
    from sd3trt.server.cli import add_server_commands

    add_engine_commands(sub)
    add_runtime_commands(sub)
    add_demo(sub)
    add_server_commands(sub)
    add_bench_command(sub)
    return parser


# Third-party advice a user of these commands cannot act on (transformers on torchvision, diffusers on
# components a tiny model leaves out); read when those libraries are imported. A user's own setting wins.
QUIET_LIBRARIES = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}


def main(argv: list[str] | None = None) -> int:
    for k, v in QUIET_LIBRARIES.items():
        os.environ.setdefault(k, v)
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Sd3trtError as e:
        print(f"sd3trt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sd3trt {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
