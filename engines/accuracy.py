"""The accuracy gate of a quantized transformer, runnable on CPU (ONNX Runtime). One gate for every precision.

Against the fp32 bundle, on inputs the ranges were NOT fitted on (the held-out runs):
  image        (the gate) the whole img2img run (same prompt, picture and noise) with the quantized
               transformer vs all-fp32: PSNR (dB) and SSIM of the decoded float image in [0, 1] - worst run
               and mean. This is what a user sees, so it is what decides.
  transformer  (diagnostics) noise_pred of the quantized graph vs the fp32 graph on every held-out recorded
               call: cosine similarity and SNR (dB, signal = fp32 output) - worst call and mean. Recorded
               and printed; they gate only when a run names a minimum (--min-cosine / --min-snr-db).

THRESHOLDS are the same for int8 and fp8 (a better result is never refused because of its number
format); every worst-case image figure must reach them (override per run with `sd3trt quantize
--min-psnr-db/--min-ssim`). The figures they were chosen from are in docs/quantization.md.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import numpy as np

from sd3trt.files import write_bytes_atomic
from sd3trt.runtime.ort_session import ort_session

# One gate for int8 and fp8 (docs/quantization.md, "The gate"): decoded image vs the fp32 pipeline.
GATE = {"psnr_db": 30.0, "ssim": 0.97}
# Kept for callers that index by precision: the same thresholds for every precision.
THRESHOLDS = {"int8": dict(GATE), "fp8": dict(GATE)}


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


def _blur(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable 'valid' convolution over the last two axes."""
    from numpy.lib.stride_tricks import sliding_window_view

    k = len(kernel)
    x = sliding_window_view(x, k, axis=-1) @ kernel
    x = np.swapaxes(sliding_window_view(np.swapaxes(x, -1, -2), k, axis=-1) @ kernel, -1, -2)
    return x


def ssim(ref: np.ndarray, test: np.ndarray, peak: float = 1.0, sigma: float = 1.5) -> float:
    """Mean structural similarity (Wang et al. 2004: Gaussian window sigma 1.5, 11 taps, K1 0.01, K2 0.03),
    per channel over the last two axes (images as [..., H, W]), numpy only. 1.0 for identical images."""
    a, b = ref.astype(np.float64), test.astype(np.float64)
    k = int(min(11, a.shape[-1], a.shape[-2]))
    k -= 1 - k % 2
    t = np.arange(k) - (k - 1) / 2
    g = np.exp(-t * t / (2 * sigma * sigma))
    g /= g.sum()
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    mu_a, mu_b = _blur(a, g), _blur(b, g)
    va = _blur(a * a, g) - mu_a ** 2
    vb = _blur(b * b, g) - mu_b ** 2
    cov = _blur(a * b, g) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (va + vb + c2))
    return float(s.mean())


def summary(values: list[float]) -> dict:
    return {"min": round(min(values), 6), "mean": round(float(np.mean(values)), 6)}


class _WholeGraph:
    """The transformer graph at `path` as one ONNX Runtime CPU session."""

    def __init__(self, path: Path, threads: int):
        self.session = ort_session(path, threads)

    def run(self, feeds: dict) -> dict:
        return {"noise_pred": self.session.run(["noise_pred"], feeds)[0]}


class Reference:
    """The bundle's own outputs the gate compares with - each held-out call's noise_pred and each replayed run's
    image - computed once and kept in `path` (an .npz written atomically by save() when something was added), so
    every level and every precision gated on the same recording reuses them. path None: kept in memory only."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self.added = False
        self.values: dict[str, np.ndarray] = {}
        if path is not None and Path(path).is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    self.values = {k: z[k] for k in z.files}
            except (OSError, ValueError):
                self.values = {}  # damaged: computed again

    def get(self, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        if key not in self.values:
            self.values[key] = np.asarray(compute())
            self.added = True
        return self.values[key]

    def save(self) -> None:
        if self.added and self.path is not None:
            buf = io.BytesIO()
            np.savez(buf, **self.values)
            write_bytes_atomic(Path(self.path), buf.getvalue())
        self.added = False


def transformer_accuracy(ref_path: Path, q_path: Path, data, indices: list[int], threads: int = 0,
                         runner: Callable | None = None, reference: Reference | None = None) -> dict:
    """Quantized vs reference (the bundle's graph) noise_pred on recorded calls `indices` (of a
    calibrate.CalibData). runner(path) -> an object whose run(feeds) gives {"noise_pred": ...} (default: an
    ONNX Runtime CPU session of the whole graph); reference: where the reference outputs are kept (the
    reference graph runs only for calls it does not hold)."""
    runner = runner or (lambda path: _WholeGraph(path, threads))
    reference = reference or Reference()
    ref, q = None, runner(q_path)
    cos, snr = [], []
    for i in indices:
        feeds = data.feeds(i)

        def reference_call(feeds=feeds):
            nonlocal ref
            ref = ref or runner(ref_path)
            return ref.run(feeds)["noise_pred"]

        a = reference.get(f"call{i}", reference_call)
        b = q.run(feeds)["noise_pred"]
        cos.append(cosine(a, b))
        snr.append(snr_db(a, b))
    reference.save()
    return {"calls": len(indices), "cosine": summary(cos), "snr_db": summary(snr)}


def image_accuracy(bundle, q_path: Path, settings, runs: list[int], threads: int = 0,
                   log: Callable[[str], None] = print, runner: Callable | None = None,
                   others: Callable | None = None, reference: Reference | None = None) -> dict:
    """End to end: img2img with the quantized transformer graph at `q_path` vs the bundle's own graphs, same
    inputs and noise (`settings`: the calibration settings; `runs`: which calibration runs to replay).
    runner(path) -> the transformer's runner, others(name) -> every other component's (both pipelines
    share them, so the comparison is the transformer's alone); given, each component is released after
    use (low memory). Default: the pipeline's own ONNX Runtime runners. reference: where the reference
    images are kept (the reference pipeline runs only for runs it does not hold)."""
    from sd3trt.engines.calibrate import run_inputs
    from sd3trt.runtime.pipeline import Img2Img

    def pipeline(path: Path):
        if runner is None:
            return Img2Img(bundle, threads=threads, onnx_files={"transformer": path})
        return Img2Img(bundle, threads=threads, low_memory=True,
                       runner_factory=lambda name: runner(path) if name == "transformer" else others(name))

    reference = reference or Reference()
    ref_pipe = None
    q_pipe = pipeline(Path(q_path))
    psnr, ss = [], []
    for r in runs:
        req = run_inputs(settings, r)

        def reference_image(req=req):
            nonlocal ref_pipe
            ref_pipe = ref_pipe or pipeline(bundle.onnx_path("transformer"))
            return ref_pipe(**req).decoded

        a = reference.get(f"image{r}", reference_image)
        b = q_pipe(**req).decoded
        a = np.clip(a / 2 + 0.5, 0, 1)
        b = np.clip(b / 2 + 0.5, 0, 1)
        psnr.append(psnr_db(a, b))
        ss.append(ssim(a, b))
        log(f"accuracy: image {len(psnr)}/{len(runs)}: PSNR {psnr[-1]:.2f} dB, SSIM {ss[-1]:.4f}")
    reference.save()
    return {"runs": len(runs), "psnr_db": summary(psnr), "ssim": summary(ss)}


def gate(precision: str, figures: dict, thresholds: dict | None = None) -> tuple[bool, list[str]]:
    """(passed, failures) of the worst-case figures against the thresholds (the same for every precision):
    image PSNR and SSIM, plus transformer cosine / SNR when the thresholds name them."""
    th = GATE if thresholds is None else thresholds
    checks = []
    for key, what in (("psnr_db", "image PSNR dB"), ("ssim", "image SSIM")):
        if th.get(key) is not None and key in figures.get("image", {}):
            checks.append((what, figures["image"][key]["min"], th[key]))
    for key, what in (("cosine", "transformer cosine"), ("snr_db", "transformer SNR dB")):
        if th.get(key) is not None:
            checks.append((what, figures["transformer"][key]["min"], th[key]))
    failures = [f"{what} {got:.4g} < {want:g}" for what, got, want in checks if not got >= want]
    return not failures, failures
