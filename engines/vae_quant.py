"""INT8 VAE for the CPU path: static Q/DQ on the VAE encoder's or decoder's convolutions, gated on images.

    entry = quantize_vae("bundle", "vae_decoder")   # onnx/vae_decoder.int8.onnx + manifest["quantized"]

The fp32 VAE already runs near the CPU's fp32 matmul peak on ONNX Runtime (docs/quantization.md), so only
a narrower type makes it faster. The scheme is ONNX
Runtime's own static quantizer (onnxruntime.quantization.quantize_static), which ONNX Runtime fuses into
QLinearConv:

* Conv only (Attention, GroupNorm, SiLU, Upsample stay float); conv_in, conv_out and the mid block's
  convolutions stay float (KEEP_FLOAT);
* each convolution's output is quantized too (ONNX Runtime fuses DQ -> Conv -> Q into QLinearConv, 3x
  faster than running the graph unfused), so the group norms and residual additions that read it take
  its rounding: 4 dB of image PSNR at medium width. OpenVINO, which runs int8 convolutions with float
  outputs, gives those readers the float output back (runtime/ov_runner.py);
* activations: uint8 asymmetric, per tensor, ranges at the 99.999th percentile (PERCENTILE; max ranges
  lose 2 dB to rare outliers) of the calibration pictures (encoder) or of the
  encoder's latents of those pictures (decoder: what it decodes at the end of img2img is a clean
  latent); weights: int8 symmetric per output channel, **reduce_range** (7 bits): without it the AVX2
  u8s8 kernels (vpmaddubsw) saturate.

This is a CPU (ONNX Runtime) format: TensorRT wants symmetric int8 activations, and on a GPU the VAE
runs in fp16/bf16 engines instead. The gate compares against the fp32 graph on held-out pictures:
decoder - PSNR of the decoded image; encoder - SNR of the latent mean and PSNR of its fp32 decode.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import logging
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

import sd3trt
from sd3trt.engines import accuracy as acc
from sd3trt.engines.calibrate import CalibSettings, picture
from sd3trt.engines.transformer_quant import load_source_bundle
from sd3trt.errors import Sd3trtError
from sd3trt.manifest import QUANTIZED, commit_entry, quantized_key
from sd3trt.runtime.ort_session import ort_session

COMPONENTS = ("vae_encoder", "vae_decoder")
CALIB_SIDE = 256  # px: ranges are per tensor, so a smaller picture gives the same ranges at a quarter of the memory
# Worst held-out figure each part must reach: the decoder's measured PSNR sits above 28 dB and the
# saturating (no reduce_range) variant's ~23 dB below it (docs/quantization.md); the encoder fails its
# latent SNR gate on every variant tried, so it stays fp32.
THRESHOLDS = {"psnr_db": 28.0, "latent_snr_db": 20.0}
# Convolutions left in float: the mid block runs at the latent's resolution (~3% of the decoder's FLOPs)
# and is where int8 loses most.
KEEP_FLOAT = ("conv_in", "conv_out", "mid_block")
PERCENTILE = 99.999  # activation ranges: 99.99 clips too much on some pictures (-5 dB), max keeps outliers


def _calibration_pictures(bundle, settings: CalibSettings) -> np.ndarray:
    from sd3trt.runtime.images import preprocess

    side = min(settings.size, CALIB_SIDE)
    side -= side % bundle.facts.pixel_multiple
    side = max(side, bundle.facts.pixel_multiple)
    return np.concatenate([preprocess(picture(i, side)) for i in range(settings.prompts)])


def _inputs(bundle, component: str, pixels: np.ndarray, threads: int) -> list[dict]:
    """One feed per picture: the pixels (encoder) or the fp32 encoder's latent mean (decoder)."""
    if component == "vae_encoder":
        return [{"image": pixels[i:i + 1]} for i in range(len(pixels))]
    enc = ort_session(bundle.onnx_path("vae_encoder"), threads)
    return [{"latent": enc.run(["mean"], {"image": pixels[i:i + 1]})[0]} for i in range(len(pixels))]


@contextlib.contextmanager
def _quiet_quantizer():
    """Mute the quantizer: its warnings to the root logger (without the logging.warning() call installing a
    stderr handler) and the calibrator's progress prints."""
    root, null = logging.getLogger(), logging.NullHandler()
    level = root.level
    root.setLevel(logging.ERROR)
    root.addHandler(null)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.removeHandler(null)
        root.setLevel(level)


def _to_unit(x: np.ndarray) -> np.ndarray:
    return np.clip(x / 2 + 0.5, 0, 1)


def vae_accuracy(bundle, component: str, q_path: Path, feeds: list[dict], threads: int = 0) -> dict:
    """Figures of the quantized graph at `q_path` against the bundle's fp32 graph on `feeds`."""
    ref = ort_session(bundle.onnx_path(component), threads)
    q = ort_session(q_path, threads)
    if component == "vae_decoder":
        psnr = [acc.psnr_db(_to_unit(ref.run(None, f)[0]), _to_unit(q.run(None, f)[0])) for f in feeds]
        return {"inputs": len(feeds), "psnr_db": acc.summary(psnr)}
    dec = ort_session(bundle.onnx_path("vae_decoder"), threads)
    snr, psnr = [], []
    for f in feeds:
        a, b = ref.run(["mean"], f)[0], q.run(["mean"], f)[0]
        snr.append(acc.snr_db(a, b))
        psnr.append(acc.psnr_db(_to_unit(dec.run(None, {"latent": a})[0]), _to_unit(dec.run(None, {"latent": b})[0])))
    return {"inputs": len(feeds), "latent_snr_db": acc.summary(snr), "psnr_db": acc.summary(psnr)}


def vae_gate(figures: dict, thresholds: dict) -> list[str]:
    checks = [("image PSNR dB", figures["psnr_db"]["min"], thresholds["psnr_db"])]
    if "latent_snr_db" in figures:
        checks.append(("latent SNR dB", figures["latent_snr_db"]["min"], thresholds["latent_snr_db"]))
    return [f"{what} {got:.4g} < {want:g}" for what, got, want in checks if not got >= want]


def quantize_vae(bundle_dir, component: str, settings: CalibSettings = CalibSettings(),
                 thresholds: dict | None = None, force: bool = False, threads: int = 0,
                 log: Callable[[str], None] = print) -> dict:
    """Write onnx/<component>.int8.onnx and list it in the manifest; returns the entry.
    Raises Sd3trtError when the gate fails (unless force)."""
    import onnx

    if component not in COMPONENTS:
        raise Sd3trtError(f"INT8 VAE quantization takes {' or '.join(COMPONENTS)}, not {component!r}")
    try:
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)
    except ImportError as e:
        raise Sd3trtError(f"INT8 VAE quantization needs onnxruntime's quantization tools ({e}); "
                          "pip install onnxruntime") from None
    bundle = load_source_bundle(bundle_dir, types=("fp32",))  # ONNX Runtime's quantizer takes fp32 graphs
    settings = settings.checked(bundle.facts)
    th = {**THRESHOLDS, **(thresholds or {})}
    t_start = time.perf_counter()
    src_path = bundle.onnx_path(component)

    class Reader(CalibrationDataReader):
        def __init__(self, feeds: list[dict]):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    pixels = _calibration_pictures(bundle, settings)
    feeds = _inputs(bundle, component, pixels, threads)
    fit, held = feeds[: -settings.holdout], feeds[-settings.holdout:]
    graph = onnx.load(str(src_path), load_external_data=False)
    convs = [n.name for n in graph.graph.node if n.op_type == "Conv"]
    del graph
    keep = [n for n in convs if any(k in n for k in KEEP_FLOAT)]
    log(f"quantize: {component}: {len(convs) - len(keep)}/{len(convs)} convolutions to int8 "
        f"(kept in float: {', '.join(keep) or 'none'}); calibrating on {len(fit)} pictures of {pixels.shape[-1]} px")

    onnx_dir = src_path.parent
    name = f"{component}.int8.onnx"
    with tempfile.TemporaryDirectory(dir=onnx_dir, prefix=f".{name}.") as tmp:
        staged = Path(tmp) / name
        t0 = time.perf_counter()
        with _quiet_quantizer():  # its advice to pre-process is for classification models
            quantize_static(
                str(src_path), str(staged), Reader(fit), quant_format=QuantFormat.QDQ, per_channel=True,
                reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                op_types_to_quantize=["Conv"], nodes_to_exclude=keep,
                calibrate_method=CalibrationMethod.Percentile, extra_options={"CalibPercentile": PERCENTILE},
            )
        log(f"quantize: {component}: graph written in {time.perf_counter() - t0:.1f} s; running the accuracy gate")
        figures = vae_accuracy(bundle, component, staged, held, threads)
        failures = vae_gate(figures, th)
        passed = not failures
        log(f"accuracy: {component} on {len(held)} held-out pictures: image PSNR min {figures['psnr_db']['min']:.2f} dB"
            + (f", latent SNR min {figures['latent_snr_db']['min']:.2f} dB" if "latent_snr_db" in figures else ""))
        if failures and not force:
            raise Sd3trtError(f"the int8 {component} fails the accuracy gate ({'; '.join(failures)}); keep the fp32 "
                              "VAE, or pass --force to record it anyway")
        entry = _entry(bundle, component, name, keep, settings, fit, held, pixels, figures, th, passed, failures,
                       t_start)
        entry = commit_entry(bundle.root, QUANTIZED, quantized_key("int8", component), {f"onnx/{name}": staged}, entry)
    log(f"quantize: {component}: {'passed' if passed else 'FAILED (recorded with --force)'}; {entry['file']} listed")
    return entry


def _entry(bundle, component, name, keep, settings, fit, held, pixels, figures, th, passed, failures, t_start) -> dict:
    return {
        "component": component, "precision": "int8", "file": f"onnx/{name}",
        "source": bundle.source_record(component),
        "format": "onnx-qdq (onnxruntime.quantization, CPU)",
        "scheme": {"activations": f"per-tensor asymmetric uint8, static ({PERCENTILE}th percentile)",
                   "weights": "per-output-channel symmetric int8, reduce_range (7 bit)",
                   "ops": "Conv", "kept": keep},
        "calibration": {"settings": {**asdict(settings), "prompt_texts": list(settings.prompt_texts)}, "pictures_fit": len(fit), "pictures_held_out": len(held),
                        "side_px": int(pixels.shape[-1])},
        "accuracy": {component: figures, "thresholds": th, "passed": passed, "failures": failures},
        "sd3trt_version": sd3trt.__version__,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
