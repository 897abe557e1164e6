"""`sd3trt quantize`: registered by core/cli.py through `add_quantize_command(subparsers)`.

Nothing heavy at import time (onnx, ONNX Runtime and TensorRT load inside the command).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sd3trt import precision as words


EXAMPLES = """examples:
  sd3trt quantize --bundle B --precision int8                     # CPU INT8 path (ONNX Runtime)
  sd3trt quantize --bundle B --precision fp8 --engine 8.9         # NVIDIA's FP8 recipe, FP8 attention if it passes
  sd3trt quantize --bundle B --precision fp8 --calib-scale 0.25   # a quarter of the calibration, small machines
  sd3trt quantize --bundle B --precision fp8 --level linear --method percentile --engine-name fp16-rtx-sm89
  sd3trt quantize --bundle B --precision int8 --keep default,@first_block,@last_block --calib-prompts 16
  sd3trt quantize --bundle B --precision fp8 --calib-prompts my-prompts.txt --calib-backend openvino
  sd3trt quantize --bundle B --precision int8 --component vae_decoder   # int8 VAE convolutions (CPU)
"""


def _prompts(value: str | None) -> tuple[int | None, tuple[str, ...]]:
    """--calib-prompts: a run count, or a file of prompts (one a line; as many runs as prompts)."""
    from sd3trt.engines.calibrate import read_prompts

    if value is None:
        return None, ()
    if value.strip().isdigit():
        return int(value), ()
    texts = read_prompts(value)
    return len(texts), texts


def _settings(a):
    """The calibration settings: the defaults (CalibSettings) scaled by --calib-scale, then any named value."""
    from sd3trt.engines.calibrate import CalibSettings

    base = CalibSettings().scaled(a.calib_scale)
    count, texts = _prompts(a.calib_prompts)
    given = {"prompts": count, "steps": a.calib_steps, "strength": a.calib_strength,
             "size": a.calib_size, "seed": a.seed}
    kw = {**base.__dict__, **{k: v for k, v in given.items() if v is not None}, "prompt_texts": texts}
    kw["holdout"] = a.holdout or (base.holdout if count is None else max(1, count // 4))
    return CalibSettings(**kw)


def _keep(text: str | None, precision: str = "int8") -> tuple[str, ...]:
    from sd3trt.engines.qdq_graph import KEEP

    if text is None:
        return KEEP[precision]
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if part == "default":
            out += KEEP[precision]
        elif part and part != "none":
            out.append(part)
    return tuple(out)


def _quantize(a) -> None:
    from sd3trt.engines.calibrate import CalibSettings
    from sd3trt.engines.transformer_quant import quantize_bundle

    if a.component != "transformer":
        return _quantize_vae(a)

    ccs = tuple(c.strip() for v in (a.engine or []) for c in v.split(",") if c.strip())
    if ccs:  # refuse an impossible target before the (long) calibration
        from sd3trt.engines.gpu_targets import check_target

        check_target(a.precision, [c for c in ccs if c.lower() != "current"])
    settings = _settings(a)
    from sd3trt.engines.accuracy import GATE

    th = dict(GATE)
    for k, v in (("cosine", a.min_cosine), ("snr_db", a.min_snr_db), ("psnr_db", a.min_psnr_db), ("ssim", a.min_ssim)):
        if v is not None:
            th[k] = v
    level = a.level if a.level != "auto" else ("attention" if a.attention else None)
    per_channel = None if a.weights == "auto" else a.weights == "per-channel"
    entry = quantize_bundle(
        a.bundle, a.precision, settings, method=a.method, percentile=a.percentile, keep=_keep(a.keep, a.precision),
        level=level, per_channel=per_channel, image_gate=not a.no_image_gate,
        thresholds=th, force=a.force, threads=a.threads, calib_backend=a.calib_backend,
        blocks={"auto": "auto", "on": True, "off": False}[a.calib_blocks], allow_long=a.allow_long,
    )
    acc = entry["accuracy"]
    cov = entry["coverage"]
    summary = {
        "file": entry["file"], "precision": entry["precision"], "method": entry["method"],
        "quantized_layers": cov["linear_quantized"] + cov["attention_quantized"],
        "kept_layers": len(cov["kept"]), "weight_fraction_quantized": cov["weight_fraction_quantized"],
        "level": entry["level"], "weights": entry["scheme"]["weights"],
        "transformer": {k: acc["transformer"][k] for k in ("cosine", "snr_db")},
        "image_psnr_db": acc.get("image", {}).get("psnr_db"), "image_ssim": acc.get("image", {}).get("ssim"),
        "thresholds": acc["thresholds"], "passed": acc["passed"],
        "calibration_backend": entry["calibration"]["backend"], "calibration_blocks": entry["calibration"]["blocks"],
        "calibration_seconds": entry["calibration"]["seconds"],
        "seconds_per_transformer_call": entry["calibration"]["seconds_per_call"], "seconds": entry["seconds"],
    }
    print(json.dumps(summary, indent=2))
    if ccs:  # the quantized transformer's engine, through `sd3trt build`'s loop
        from sd3trt.engines.build import BuildOptions, build_engines

        build_engines(a.bundle, BuildOptions(a.precision, name=a.engine_name, components=("transformer",),
                                             flavour=a.flavour, compute_capabilities=ccs, low=a.engine_low))


# Options of the transformer's quantizer that the VAE's does not take: given with --component vae_*, refused.
TRANSFORMER_ONLY = ("calib_scale", "calib_steps", "calib_strength", "method", "percentile", "keep", "level", "attention",
                    "weights", "no_image_gate", "min_ssim", "min_cosine", "min_snr_db", "engine_name", "engine_low",
                    "flavour", "calib_backend", "calib_blocks", "allow_long")


def _quantize_vae(a) -> None:
    from sd3trt.engines.calibrate import CalibSettings
    from sd3trt.engines.vae_quant import quantize_vae
    from sd3trt.errors import Sd3trtError

    if a.precision not in words.VAE_QUANTIZED:
        raise Sd3trtError(f"the VAE quantizes to {' or '.join(words.VAE_QUANTIZED)} only (the ONNX Runtime CPU "
                          f"path), not {a.precision}; GPU engines run the VAE in fp16/bf16")
    if a.engine:
        raise Sd3trtError("--engine builds a quantized transformer engine; the int8 VAE is an ONNX Runtime CPU graph")
    given = ["--" + d.replace("_", "-") for d in TRANSFORMER_ONLY if getattr(a, d) != a.transformer_defaults[d]]
    if given:
        raise Sd3trtError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} to the transformer; the VAE "
                          "quantizer takes --calib-prompts, --holdout, --calib-size, --seed, --min-psnr-db, --force "
                          "and --threads")
    vae_defaults = CalibSettings(prompts=8, holdout=2, size=512)  # the VAE gate's measured defaults
    if a.calib_prompts is not None and not a.calib_prompts.strip().isdigit():
        raise Sd3trtError(f"--calib-prompts {a.calib_prompts}: the VAE calibrates on pictures, not prompts; give it a "
                          "picture count")
    prompts = int(a.calib_prompts) if a.calib_prompts is not None else vae_defaults.prompts
    settings = CalibSettings(prompts=prompts, holdout=a.holdout or max(1, prompts // 4),
                             size=a.calib_size or vae_defaults.size, seed=a.seed or 0)
    th = {"psnr_db": a.min_psnr_db} if a.min_psnr_db is not None else None
    entry = quantize_vae(a.bundle, a.component, settings, thresholds=th, force=a.force, threads=a.threads)
    print(json.dumps({"file": entry["file"], "precision": a.precision, "component": a.component,
                      "accuracy": entry["accuracy"], "seconds": entry["seconds"]}, indent=2))


def add_quantize_command(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "quantize", help="quantize the transformer to INT8 or FP8 (calibration, Q/DQ ONNX, accuracy gate)",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--bundle", type=Path, required=True,
                   help="a bundle written by `sd3trt export`, fp32 or fp16: the layers left unquantized keep its "
                        "type (the VAE quantizer takes fp32)")
    p.add_argument("--precision", required=True, choices=words.QUANTIZED,
                   help="int8: Ampere-class GPUs and CPUs (ONNX Runtime); fp8: Ada/Hopper/Blackwell (SM 8.9+)")
    p.add_argument("--component", default="transformer", choices=("transformer", "vae_decoder", "vae_encoder"),
                   help="what to quantize (default transformer); vae_decoder / vae_encoder: int8 convolutions for "
                        "ONNX Runtime CPU, gated on the decoded image")
    g = p.add_argument_group("calibration")
    g.add_argument("--calib-scale", type=float, default=1.0,
                   help="scale the calibration down for small machines: runs and steps times this (0-1, default 1: "
                        "12 runs of 28 steps at strength 0.75, 1024 px capped by the model)")
    g.add_argument("--calib-prompts", metavar="N|FILE",
                   help="img2img runs recorded (default 12, times --calib-scale), or a file of prompts, one a line "
                        "(one run each, in place of the built-in set)")
    g.add_argument("--calib-backend", choices=("auto", "cuda", "openvino", "onnxruntime"), default="auto",
                   help="what runs calibration: cuda (onnxruntime-gpu), openvino (bf16 where the CPU has it) or "
                        "onnxruntime (CPU); auto (default): the first of these that works here")
    g.add_argument("--calib-blocks", choices=("auto", "on", "off"), default="auto",
                   help="measure ranges one transformer block at a time, each block's inputs spilled to disk "
                        "(the same ranges, memory for one block); auto (default): on past 4 GiB of weights")
    g.add_argument("--allow-long", action="store_true",
                   help="run even when the estimated time passes an hour (otherwise refused, naming the faster option)")
    g.add_argument("--holdout", type=int, default=0, help="runs kept for the accuracy gate (default a quarter, >= 1)")
    g.add_argument("--calib-steps", type=int, help="denoising steps per run (default 28, times --calib-scale)")
    g.add_argument("--calib-strength", type=float, help="img2img strength of the runs (default 0.75)")
    g.add_argument("--calib-size", type=int, help="image side in px (default 1024, capped by the model)")
    g.add_argument("--seed", type=int)
    g.add_argument("--method", choices=("max", "percentile", "mse"), default="max",
                   help="activation range: max |x|, a percentile of |x|, or the least-error clip (default max)")
    g.add_argument("--percentile", type=float, default=99.99, help="for --method percentile (default 99.99)")
    g = p.add_argument_group("layers")
    g.add_argument("--keep", help="layers kept in float: comma-separated globs over module paths, 'default' for the "
                                  "built-in list, @first_block/@last_block, or none (default: the built-in list)")
    g.add_argument("--level", choices=("auto", "linear", "attention"), default="auto",
                   help="linear: the linear layers; attention: also the attention matmuls (Q.K^T, P.V, softmax "
                        "output quantized; fp8 needs head_dim %% 16 == 0). auto (default): the fastest level that "
                        "passes the gate (fp8: attention, then linear; int8: linear)")
    g.add_argument("--attention", action="store_true", help="same as --level attention")
    g.add_argument("--weights", choices=("auto", "per-channel", "per-tensor"), default="auto",
                   help="weight scales (default auto: int8 per output channel, fp8 per tensor as NVIDIA's recipe)")
    g.add_argument("--per-tensor-weights", dest="weights", action="store_const", const="per-tensor",
                   help="same as --weights per-tensor")
    g = p.add_argument_group("gate")
    g.add_argument("--no-image-gate", action="store_true", help="skip the end-to-end image comparison")
    g.add_argument("--min-psnr-db", type=float, help="gate: worst image PSNR vs the fp32 pipeline in dB (default 30, "
                                                      "every precision)")
    g.add_argument("--min-ssim", type=float, help="gate: worst image SSIM vs the fp32 pipeline (default 0.97)")
    g.add_argument("--min-cosine", type=float, help="also gate on the worst transformer cosine (default: reported only)")
    g.add_argument("--min-snr-db", type=float, help="also gate on the worst transformer SNR in dB (default: reported only)")
    g.add_argument("--force", action="store_true", help="record the result even when it fails the gate")
    g.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (default: all cores)")
    g = p.add_argument_group("TensorRT engine (optional)")
    g.add_argument("--engine", action="append", metavar="CC",
                   help="also build the quantized transformer engine for these compute capabilities, e.g. 8.9")
    g.add_argument("--engine-name", help="engine build to add it to (default <precision>-<rtx|trt>-<target>)")
    g.add_argument("--engine-low", choices=words.LOW_TYPES, default="fp16",
                   help="type of the layers around the quantized ones (default fp16)")
    g.add_argument("--flavour", choices=("auto", "tensorrt", "tensorrt_rtx"), default=None)
    p.set_defaults(func=_quantize, transformer_defaults={d: p.get_default(d) for d in TRANSFORMER_ONLY})
    return p
