"""The accuracy gate of a quantized transformer, runnable on CPU (ONNX Runtime).

Two levels, both against the fp32 bundle on inputs the ranges were NOT fitted on (the held-out runs):
  transformer  noise_pred of the quantized graph vs the fp32 graph on every held-out recorded call:
               cosine similarity and SNR (dB, signal = fp32 output) - worst call and mean
  image        the whole img2img run (same prompt, picture and noise) with the quantized transformer vs
               all-fp32: PSNR (dB) of the decoded float image in [0, 1] - worst run and mean

THRESHOLDS are the gate: every worst-case figure must reach them (override per run with
`sd3trt quantize --min-cosine/--min-snr-db/--min-psnr-db`). They sit 6-10 dB under the worst figure
measured with the defaults, and above what quantizing the final projection gives, so the gate catches
that and any worse mistake (a wrong scale, a transposed weight); the figures are in docs/quantization.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from sd3trt.runtime.ort_session import ort_session

THRESHOLDS = {
    "int8": {"cosine": 0.998, "snr_db": 25.0, "psnr_db": 32.0},
    "fp8": {"cosine": 0.9995, "snr_db": 35.0, "psnr_db": 38.0},
}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    den = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / den) if den else float(np.array_equal(a, b))


def snr_db(ref: np.ndarray, test: np.ndarray) -> float:
    ref, test = ref.astype(np.float64), test.astype(np.float64)
    noise = float(((ref - test) ** 2).sum())
    return float("inf") if noise == 0 else float(10 * np.log10(float((ref ** 2).sum()) / noise))


def psnr_db(ref: np.ndarray, test: np.ndarray, peak: float = 1.0) -> float:
    mse = float(((ref.astype(np.float64) - test.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else float(10 * np.log10(peak * peak / mse))


def summary(values: list[float]) -> dict:
    return {"min": round(min(values), 6), "mean": round(float(np.mean(values)), 6)}


def transformer_accuracy(ref_path: Path, q_path: Path, data, indices: list[int], threads: int = 0) -> dict:
    """Quantized vs fp32 noise_pred on recorded calls `indices` (of a calibrate.CalibData)."""
    ref, q = ort_session(ref_path, threads), ort_session(q_path, threads)
    cos, snr = [], []
    for i in indices:
        feeds = data.feeds(i)
        a = ref.run(["noise_pred"], feeds)[0]
        b = q.run(["noise_pred"], feeds)[0]
        cos.append(cosine(a, b))
        snr.append(snr_db(a, b))
    return {"calls": len(indices), "cosine": summary(cos), "snr_db": summary(snr)}


def image_accuracy(bundle, q_path: Path, settings, runs: list[int], threads: int = 0,
                   log: Callable[[str], None] = print) -> dict:
    """End to end: img2img with the quantized transformer graph at `q_path` vs all-fp32, same inputs and
    noise (`settings`: the calibration settings; `runs`: which calibration runs to replay)."""
    from sd3trt.engines.calibrate import run_inputs
    from sd3trt.runtime.pipeline import Img2Img

    ref_pipe = Img2Img(bundle, threads=threads)
    q_pipe = Img2Img(bundle, threads=threads, onnx_files={"transformer": Path(q_path)})
    psnr = []
    for r in runs:
        req = run_inputs(settings, r)
        a = ref_pipe(**req).decoded
        b = q_pipe(**req).decoded
        a = np.clip(a / 2 + 0.5, 0, 1)
        b = np.clip(b / 2 + 0.5, 0, 1)
        psnr.append(psnr_db(a, b))
        log(f"accuracy: image {len(psnr)}/{len(runs)}: PSNR {psnr[-1]:.2f} dB")
    return {"runs": len(runs), "psnr_db": summary(psnr)}


def gate(precision: str, figures: dict, thresholds: dict | None = None) -> tuple[bool, list[str]]:
    """(passed, failures) of the worst-case figures against the thresholds."""
    th = thresholds or THRESHOLDS[precision]
    checks = [
        ("transformer cosine", figures["transformer"]["cosine"]["min"], th["cosine"]),
        ("transformer SNR dB", figures["transformer"]["snr_db"]["min"], th["snr_db"]),
    ]
    if "image" in figures:
        checks.append(("image PSNR dB", figures["image"]["psnr_db"]["min"], th["psnr_db"]))
    failures = [f"{what} {got:.4g} < {want:g}" for what, got, want in checks if not got >= want]
    return not failures, failures
