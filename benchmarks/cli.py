"""`sd3trt bench`: core/cli.py registers it through `add_bench_command(subparsers)`.

Nothing heavy at import time (torch, diffusers, ONNX Runtime load inside the command and its workers).
Also runnable on its own: `python -m sd3trt.benchmarks [options]`.
"""

from __future__ import annotations

import argparse
import sys

from sd3trt.errors import Sd3trtError

DESCRIPTION = """Run one img2img workload through diffusers and sd3trt side by side, each system in a fresh process,
on the same weights, prompt, picture and noise; write a JSON, a Markdown table and a plot of latency, memory
and accuracy. Without --model-dir the model is generated with random weights (cached)."""

EXAMPLES = """examples:
  sd3trt bench --quick                                   # tiny model, a couple of minutes, every system
  sd3trt bench --model medium-width --steps 8 --reps 2   # SD3-Medium widths, 2 layers; ./sd3trt-bench/<machine>/
  sd3trt bench --model medium-width --systems diffusers-fp32,sd3trt-ort-fp32 --project-layers 4
  sd3trt bench --model medium-width --quantize           # make the bundle's INT8 transformer first
  sd3trt bench --model sd3-medium --peers               # full SD3-Medium in bf16, on a 24 GiB CPU machine too
  sd3trt bench --model-dir /models/sd3-medium --bundle /bundles/sd3-medium --device cuda   # real weights, GPU
  sd3trt bench --rebuild sd3trt-bench/<machine>/<name>.json                             # re-render a report
  sd3trt bench --model medium-width --out benchmarks/results/<machine>   # results to commit, in a source checkout

systems: diffusers-fp32 diffusers-bf16 diffusers-compile-fp32 diffusers-compile-bf16 sd3trt-ort-fp32
         sd3trt-ort-fp32-lowmem sd3trt-ort-int8 sd3trt-ort-int8-vae sd3trt-openvino-fp32 sd3trt-openvino-bf16
         sd3trt-openvino-int8 sd3trt-openvino-int8-vae sd3trt-trt optimum-intel-openvino optimum-intel-openvino-int8 (--peers)
         (unavailable ones are listed as skipped, with why)
"""


def _size(text: str) -> tuple[int, int]:
    try:
        if "x" in text:
            w, h = text.lower().split("x")
            return int(w), int(h)
        return int(text), int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not N or WxH") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    from sd3trt import precision as words
    from sd3trt.benchmarks import models, systems  # light: no torch
    from sd3trt.spec import T5_DEFAULT_LENGTH

    g = p.add_argument_group("model")
    g.add_argument("--model", choices=models.SHAPES, default="medium-width",
                   help="model shape (sd3-medium / sd3.5-large: the full architectures, bf16 by default; SD3-Medium "
                        "with T5-XXL holds 7.9 B parameters, ~15 GiB in bf16 and ~29 GiB in fp32; a system that "
                        "would not fit in this machine's memory is skipped, saying so)")
    g.add_argument("--dtype", choices=words.FLOATS, default=None,
                   help="float type of the generated model and of the bundle (default: bf16 for sd3-medium / "
                        "sd3.5-large, fp32 otherwise); systems that cannot run it are skipped, saying why")
    g.add_argument("--layers", type=int, default=2, help="transformer blocks (tiny, medium-width)")
    g.add_argument("--encoder-layers", type=int, default=2, help="layers per text encoder (medium-width)")
    g.add_argument("--model-dir", help="benchmark this local diffusers SD3 model instead of a generated one")
    g.add_argument("--bundle", help="its sd3trt bundle (default: exported into the cache on first use)")
    g.add_argument("--cache-dir", help="where generated models and bundles are kept (default ~/.cache/sd3trt/bench)")
    w = p.add_argument_group("workload")
    w.add_argument("--size", type=_size, default=None, help="image size, N or WxH (default 512; quick: 64)")
    w.add_argument("--steps", type=int, default=None, help="inference steps (default 28; quick: 4)")
    w.add_argument("--strength", type=float, default=0.6)
    w.add_argument("--guidance", type=float, default=7.0, help="CFG scale (<= 1 turns CFG off)")
    w.add_argument("--num-images", "--batch", type=int, default=1, dest="num_images", help="images per request")
    w.add_argument("--prompt", default=None)
    w.add_argument("--negative-prompt", default=None)
    w.add_argument("--max-sequence-length", type=int, default=T5_DEFAULT_LENGTH, help="T5 tokens")
    w.add_argument("--seed", type=int, default=0, help="weights, picture and noise seed")
    w.add_argument("--prompt-cache", action="store_true",
                   help="let sd3trt reuse encoded prompts across runs (default: encode every run, like diffusers)")
    r = p.add_argument_group("measurement")
    r.add_argument("--systems", help=f"comma-separated (default: {','.join(systems.DEFAULT_SYSTEMS)})")
    r.add_argument("--compile", action="store_true", help="include diffusers with torch.compile (slow to compile)")
    r.add_argument("--peers", action="store_true",
                   help="include the optimum-intel peers (their own environment: ~6 GB, built once, in minutes)")
    r.add_argument("--quantize", action="store_true",
                   help="create the bundle's INT8 transformer (sd3trt quantize, with calibration) if it is missing")
    r.add_argument("--reps", type=int, default=None, help="measured warm runs per system (default 3; quick: 2)")
    r.add_argument("--system-reps", default="", metavar="SYSTEM=N,...",
                   help="measured runs for particular systems, e.g. diffusers-bf16=1 for a slow one; 0: its first "
                        "(cold) image is the only run, reported as such")
    r.add_argument("--max-other-cpu", type=float, default=systems.MAX_OTHER_CPU,
                   help="a run during which other processes used more than this share of the CPUs is left out of "
                        f"the statistics and replaced (default {systems.MAX_OTHER_CPU:g})")
    r.add_argument("--extra-reps", type=int, default=None,
                   help="runs allowed per system to replace disturbed ones (default 3; quick: 0)")
    r.add_argument("--warmup", type=int, default=0, help="extra warm-up runs after the first (cold) image")
    r.add_argument("--threads", type=int, default=0, help="threads for every system (default: all usable CPUs)")
    r.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="diffusers' device")
    r.add_argument("--project-layers", type=int, default=None,
                   help="also measure a model with this many layers per component and project per-layer costs to "
                        "full depth (default 4 for medium-width, off otherwise; 0 turns it off)")
    r.add_argument("--project-systems", help="systems measured at the second depth (default: all that ran, "
                                             "low-memory mode excepted)")
    r.add_argument("--project-reps", type=int, default=1, help="measured runs per system at the second depth")
    r.add_argument("--project-to", choices=tuple(models.FULL_DEPTH), default="sd3-medium")
    r.add_argument("--timeout", type=float, default=None, help="seconds per system before it is stopped (default 3600)")
    r.add_argument("--gate-psnr", type=float, default=None,
                   help="accuracy gate: PSNR of the image vs the diffusers reference's (fp32, else bf16), dB "
                        f"(default {systems.GATE_PSNR_DB:g}; with --rebuild: re-apply to a saved result)")
    r.add_argument("--peak-budget", type=float, default=None, help="seconds for the matmul peak measurement")
    r.add_argument("--no-peaks", action="store_true", help="skip the matmul peak measurement")
    r.add_argument("--quick", action="store_true", help="tiny model, 64 px, 4 steps, 2 runs: a couple of minutes")
    o = p.add_argument_group("output")
    o.add_argument("--out", help="results directory (default ./sd3trt-bench/<machine>/ under the working directory)")
    o.add_argument("--machine", help="machine name for the results folder (default: from the CPU)")
    o.add_argument("--name", help="file name stem of the results (default: from model and workload)")
    o.add_argument("--keep-work", action="store_true", help="keep the per-system work files")
    o.add_argument("--rebuild", metavar="JSON", help="re-render the Markdown and plot of a saved result, run nothing")


def config_from_args(a):
    from sd3trt.benchmarks.run import DEFAULT_NEGATIVE, DEFAULT_PROMPT, QUICK, BenchConfig
    from sd3trt.benchmarks import systems as sysm
    from sd3trt.benchmarks.systems import parse_systems

    base = dict(QUICK) if a.quick else {}
    model = a.model if not (a.quick and a.model == "medium-width") else base.get("model", a.model)
    w, h = a.size if a.size else ((base["width"], base["height"]) if a.quick else (512, 512))
    project = a.project_layers
    if project is None:
        project = 4 if (model == "medium-width" and not a.quick and not a.model_dir) else 0
    try:
        names = parse_systems(a.systems, a.compile)
        project_systems = parse_systems(a.project_systems, False) if a.project_systems else None
        system_reps = {}
        for item in filter(None, (x.strip() for x in a.system_reps.split(","))):
            k, _, v = item.partition("=")
            parse_systems(k, False)
            system_reps[k] = int(v)
            if system_reps[k] < 0:
                raise ValueError(f"--system-reps {item}: 0 or more runs")
    except ValueError as e:
        raise Sd3trtError(str(e)) from None
    for v, what in ((w, "width"), (h, "height"), (a.num_images, "--num-images")):
        if v < 1:
            raise Sd3trtError(f"{what} must be at least 1")
    return BenchConfig(
        model=model, layers=a.layers, encoder_layers=a.encoder_layers, dtype=a.dtype, model_dir=a.model_dir,
        bundle_dir=a.bundle,
        width=w, height=h, steps=a.steps or base.get("steps", 28), strength=a.strength, guidance=a.guidance,
        num_images=a.num_images, reps=a.reps or base.get("reps", 3), warmup=a.warmup, systems=names,
        compile=a.compile, peers=a.peers or any(n.startswith("optimum-intel-") for n in (a.systems or "").split(",")),
        quantize=a.quantize, threads=a.threads, device=a.device,
        prompt=a.prompt if a.prompt is not None else DEFAULT_PROMPT,
        negative_prompt=a.negative_prompt if a.negative_prompt is not None else DEFAULT_NEGATIVE,
        max_sequence_length=a.max_sequence_length, seed=a.seed, cache_dir=a.cache_dir, out_dir=a.out,
        machine=a.machine, name=a.name, project_layers=project, project_to=a.project_to, project_reps=a.project_reps,
        project_systems=project_systems, system_reps=system_reps,
        timeout_s=a.timeout or base.get("timeout_s", 3600.0), gate_psnr_db=sysm.GATE_PSNR_DB if a.gate_psnr is None else a.gate_psnr,
        peak_budget_s=a.peak_budget or base.get("peak_budget_s", 90.0), peaks=not a.no_peaks,
        prompt_cache=a.prompt_cache, keep_work=a.keep_work, quick=a.quick, max_other_cpu=a.max_other_cpu,
        extra_reps=a.extra_reps if a.extra_reps is not None else base.get("extra_reps", 3),
    )


def run_command(a) -> None:
    if a.rebuild:
        from sd3trt.benchmarks.report import rebuild

        rebuild(a.rebuild, gate_db=a.gate_psnr)
        print(f"re-rendered {a.rebuild}")
        return
    from sd3trt.benchmarks.run import run_bench

    try:
        run_bench(config_from_args(a))
    except ValueError as e:
        raise Sd3trtError(str(e)) from None


def add_bench_command(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="benchmark sd3trt against diffusers (latency, memory, fraction of peak)",
                       description=DESCRIPTION, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run_command)
    return p


def main(argv: list[str] | None = None) -> int:
    """`python -m sd3trt.benchmarks [bench] [options]`: the same as `sd3trt bench [options]`."""
    from sd3trt.cli import main as sd3trt_main

    argv = list(sys.argv[1:] if argv is None else argv)
    return sd3trt_main(argv if argv[:1] == ["bench"] else ["bench", *argv])
