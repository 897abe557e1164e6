"""The GPU check: everything the GPU paths need a GPU to show, in one run and one summary.

    python tests/gpu_check.py            # from the repository root, on a machine with an NVIDIA GPU

Needs full TensorRT (tensorrt-cu13) or TensorRT-RTX (tensorrt-rtx-cu13), cuda-bindings, and the export
extras (torch, diffusers) for the tiny model; onnxruntime-gpu for the ONNX Runtime GPU backends. Takes
a few minutes. Parts:
  1. what is here: the GPU, the TensorRT flavour and whether it can run on this GPU, cuda-bindings,
     ONNX Runtime and its providers;
  2. every gpu-marked test (pytest -m gpu tests/test_trt_runner.py tests/test_quantize_gpu.py), which builds
     the tiny engines and calibrates on the GPU;
  3. img2img on the tiny model with each GPU backend against the CPU (ONNX Runtime) image: PSNR.
Exit status 0 when no part failed; a backend that is not installed counts as failed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GPU_BACKENDS = ("tensorrt", "onnxruntime-cuda", "onnxruntime-trt")
MIN_PSNR = 30.0  # dB against the CPU image, 8-bit; fp32 engines (TF32 matmuls) and providers land far above
PYTEST_LIMIT_S = 420
PROMPT, STEPS, SIZE = "a fox in the snow", 4, (64, 96)  # width, height


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment() -> tuple[list[str], bool]:
    from sd3trt.runtime.flavour import gpu_mismatch, load_flavour
    from sd3trt.errors import Sd3trtError
    from sd3trt.runtime.cuda import find_gpu

    lines, ok = [], True
    try:
        gpu = find_gpu(0)
        lines.append(f"GPU            {gpu[1]} (compute capability {gpu[0]})")
    except Sd3trtError as e:
        gpu, ok = None, False
        lines.append(f"GPU            none: {e}")
    try:
        fl = load_flavour()
        lines.append(f"TensorRT       {fl.name} {fl.version}")
        problem = gpu and gpu_mismatch(fl, *gpu)
        if problem:
            ok = False
            lines.append(f"               {problem}")
    except Sd3trtError as e:
        ok = False
        lines.append(f"TensorRT       {e}")
    lines.append(f"cuda-bindings  {_version('cuda-bindings')}")
    try:
        import onnxruntime as ort

        lines.append(f"onnxruntime    {ort.__version__}: {', '.join(ort.get_available_providers())}")
    except ImportError:
        lines.append("onnxruntime    not installed")
    return lines, ok


def gpu_tests(workdir: Path) -> tuple[list[str], bool]:
    report = workdir / "gpu-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={report}",
           "tests/test_trt_runner.py", "tests/test_quantize_gpu.py"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=PYTEST_LIMIT_S)
    except subprocess.TimeoutExpired:
        return [f"pytest -m gpu  timed out after {PYTEST_LIMIT_S} s"], False
    seconds = time.perf_counter() - t0
    if not report.is_file():
        return [f"pytest -m gpu  did not run (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-300:]}"], False
    root = ET.parse(report).getroot()
    suite = root if root.tag == "testsuite" else root[0]
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    lines = [f"pytest -m gpu  {passed} passed, {n['failures']} failed, {n['errors']} errors, {n['skipped']} skipped "
             f"({seconds:.0f} s)"]
    skips: dict[str, int] = {}
    for case in suite.iter("testcase"):
        for outcome in ("failure", "error", "skipped"):
            found = case.find(outcome)
            if found is None:
                continue
            why = ((found.get("message") or "").splitlines() or [""])[0][:200]
            if outcome == "skipped":
                skips[why] = skips.get(why, 0) + 1
            else:
                lines.append(f"  {outcome:8} {case.get('name')}: {why}")
    lines += [f"  skipped  {count} x {why}" for why, count in skips.items()]
    ok = proc.returncode == 0 and passed > 0
    return lines, ok


def img2img_psnr(workdir: Path) -> tuple[list[str], bool]:
    from PIL import Image

    from sd3trt.engines.build import BuildOptions, build_engines
    from sd3trt.runtime.flavour import load_flavour
    from sd3trt.profiles import Range, ShapeRequest
    from sd3trt.errors import Sd3trtError
    from sd3trt.export.bundle import export_bundle
    from sd3trt.export.tiny_model import TinyOptions, make_tiny
    from sd3trt.manifest import load_bundle
    from sd3trt.runtime.pipeline import Img2Img

    quiet = lambda s: None  # noqa: E731
    bundle_dir = export_bundle(make_tiny(workdir / "model", TinyOptions()), workdir / "bundle", log=quiet)
    build_error = None
    try:
        ccs = ("current",) if load_flavour().is_rtx else ()
        request = ShapeRequest(images=(Range(64, 96, 128),), batch=Range(1, 1, 1), cfg="both", t5_seq=Range(8, 16, 32))
        build_engines(bundle_dir, BuildOptions("fp32", name="f32", request=request, compute_capabilities=ccs), log=quiet)
    except Sd3trtError as e:
        build_error = f"engine build failed: {e}"
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (SIZE[1], SIZE[0], 3), dtype=np.uint8), "RGB")

    def render(backend: str) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        with Img2Img(load_bundle(bundle_dir), backend=backend) as pipe:
            image = pipe(picture, PROMPT, strength=0.6, steps=STEPS, guidance_scale=5.0, seed=3,
                         max_sequence_length=16).images[0]
        return np.asarray(image, np.float64), time.perf_counter() - t0

    reference, seconds = render("onnxruntime")
    lines = [f"img2img {SIZE[0]}x{SIZE[1]}, {STEPS} steps, fp32 bundle; CPU reference {seconds:.1f} s"]
    ok = True
    for backend in GPU_BACKENDS:
        if backend == "tensorrt" and build_error:
            lines.append(f"  {backend:17} FAILED  {build_error}")
            ok = False
            continue
        try:
            image, seconds = render(backend)
        except Sd3trtError as e:
            lines.append(f"  {backend:17} FAILED  {e}")
            ok = False
            continue
        mse = float(np.mean((image - reference) ** 2))
        psnr = float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
        good = psnr >= MIN_PSNR
        ok &= good
        lines.append(f"  {backend:17} {'ok    ' if good else 'FAILED'}  PSNR {psnr:5.1f} dB (min {MIN_PSNR:.0f})  {seconds:.1f} s")
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="check the GPU paths of sd3trt on this machine")
    p.add_argument("--keep", type=Path, help="work in this directory and keep it (default: a temporary one)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sd3trt-gpu-check-") as tmp:
        workdir = a.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        parts = [("environment", environment), ("gpu tests", lambda: gpu_tests(workdir)),
                 ("img2img", lambda: img2img_psnr(workdir))]
        summary, failed = [], []
        for title, part in parts:
            try:
                lines, ok = part()
            except Exception as e:  # a check script reports every part, whatever breaks
                lines, ok = [f"{title}: {type(e).__name__}: {e}"], False
            summary += lines
            if not ok:
                failed.append(title)
    print("\n".join(["", "sd3trt GPU check", "=" * 16] + summary
                     + [f"RESULT: {'PASS' if not failed else 'FAIL (' + ', '.join(failed) + ')'}"]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
