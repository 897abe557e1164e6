"""The systems a benchmark compares, and why one cannot run here (a skip with a reason, never a silent gap)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

SYSTEMS = {
    "diffusers-fp32": "diffusers StableDiffusion3Img2ImgPipeline, eager PyTorch, float32",
    "diffusers-bf16": "diffusers, eager PyTorch, bfloat16 weights and activations",
    "diffusers-compile-fp32": "diffusers, transformer through torch.compile (inductor), float32",
    "diffusers-compile-bf16": "diffusers, transformer through torch.compile (inductor), bfloat16",
    "optimum-intel-openvino": "optimum-intel OVStableDiffusion3Img2ImgPipeline on OpenVINO (CPU, own venv), "
                              "bf16 where the CPU has AVX512_BF16/AMX, else f32",
    "optimum-intel-openvino-int8": "optimum-intel on OpenVINO with its 8-bit hybrid quantization (8-bit weights; "
                                   "int8 activations in the transformer's attention)",
    "sd3trt-ort-fp32": "sd3trt runtime on ONNX Runtime (CPU), fp32 bundle, engines loaded at start",
    "sd3trt-ort-fp32-lowmem": "sd3trt on ONNX Runtime, fp32, low_memory=True (each engine loaded only while needed)",
    "sd3trt-ort-int8": "sd3trt on ONNX Runtime, INT8 Q/DQ transformer from `sd3trt quantize`, other engines fp32",
    "sd3trt-ort-int8-vae": "sd3trt on ONNX Runtime, INT8 transformer and INT8 VAE decoder convolutions "
                           "(`sd3trt quantize --component vae_decoder`), other engines fp32",
    "sd3trt-openvino-fp32": "sd3trt runtime on OpenVINO (CPU plugin), the bundle's graphs computed in f32",
    "sd3trt-openvino-bf16": "sd3trt on OpenVINO, bf16 compute: an fp32 bundle's graphs that passed `sd3trt gate` "
                            "(the rest f32), or every graph of a bf16 bundle",
    "sd3trt-openvino-int8": "sd3trt on OpenVINO, INT8 Q/DQ transformer from `sd3trt quantize`, float graphs in bf16 "
                            "where gated (--cpu-precision auto)",
    "sd3trt-openvino-int8-vae": "sd3trt on OpenVINO, INT8 transformer and INT8 VAE decoder convolutions, float "
                                "parts in bf16 where gated",
    "sd3trt-trt": "sd3trt runtime on TensorRT engines from `sd3trt build` (GPU)",
}
OPENVINO = ("sd3trt-openvino-fp32", "sd3trt-openvino-bf16", "sd3trt-openvino-int8", "sd3trt-openvino-int8-vae")
DEFAULT_SYSTEMS = ("diffusers-fp32", "diffusers-bf16", "diffusers-compile-fp32", "diffusers-compile-bf16",
                   "sd3trt-ort-fp32", "sd3trt-ort-fp32-lowmem", "sd3trt-ort-int8", "sd3trt-ort-int8-vae",
                   "sd3trt-openvino-fp32", "sd3trt-openvino-bf16", "sd3trt-openvino-int8", "sd3trt-openvino-int8-vae",
                   "sd3trt-trt",
                   "optimum-intel-openvino", "optimum-intel-openvino-int8")
# The accuracy gate of the speed target: PSNR (dB) of a system's image vs the diffusers reference's (fp32, else
# bf16: targets.REFERENCES), set between what the INT8 transformer and the INT8 VAE decoder score on the
# medium-width model (docs/quantization.md).
GATE_PSNR_DB = 30.0
# A measured run during which other processes used more than this share of the machine's CPUs is
# "disturbed": kept in the JSON, left out of the statistics, replaced by another run.
MAX_OTHER_CPU = 0.10
DIFFUSERS = tuple(s for s in SYSTEMS if s.startswith("diffusers-"))
# What a user would run instead of sd3trt: every diffusers configuration and optimum-intel's OpenVINO pipelines.
PEERS = DIFFUSERS + tuple(s for s in SYSTEMS if s.startswith("optimum-intel-"))
# What the transformer computes in, for "fraction of the matmul peak of its precision".
PRECISION = {"diffusers-fp32": "fp32", "diffusers-bf16": "bf16", "diffusers-compile-fp32": "fp32",
             "diffusers-compile-bf16": "bf16", "sd3trt-ort-fp32": "fp32", "sd3trt-ort-fp32-lowmem": "fp32",
             "sd3trt-ort-int8": "int8", "sd3trt-ort-int8-vae": "int8", "sd3trt-openvino-fp32": "fp32",
             "sd3trt-openvino-bf16": "bf16", "sd3trt-openvino-int8": "int8", "sd3trt-openvino-int8-vae": "int8",
             "sd3trt-trt": "gpu",
             # the peers' linear layers compute in bf16 where the CPU has it (the worker records what ran)
             "optimum-intel-openvino": "bf16", "optimum-intel-openvino-int8": "bf16"}


def parse_systems(text: str | None, compile_: bool) -> list[str]:
    if not text:
        return list(DEFAULT_SYSTEMS)
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
    if compile_ and not any(n.startswith("diffusers-compile-") for n in names):
        names.append("diffusers-compile-fp32")
    return names


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def gpu_present() -> bool:
    """Whether `nvidia-smi -L` lists a GPU (no CUDA library is loaded to find out)."""
    if shutil.which("nvidia-smi") is None:
        return False
    import subprocess

    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def skip_reason(system: str, bundle_dir: Path, cpu_flags: list[str], compile_: bool, device: str,
                peers: bool = True) -> str | None:
    """None when `system` can run here; otherwise one sentence saying why not and what would enable it.
    peers: whether the optimum-intel peers may build their environment (--peers, or named in --systems)."""
    if system.startswith("optimum-intel-"):  # the peer venv itself is made (minutes) only when the system runs
        import platform

        if not peers:
            return ("the optimum-intel peers need an environment of their own (~6 GB, built once in minutes); pass "
                    "--peers (or name them in --systems) to include them")

        if platform.machine().lower() not in ("x86_64", "amd64"):
            return (f"the optimum-intel peers are benchmarked on x86-64 CPUs only (their precision follows x86 ISA "
                    f"flags) and this machine is {platform.machine()}")
        if not _has("diffusers"):
            return ("the optimum-intel peers take their diffusers version from this environment and diffusers is not "
                    "installed here (pip install -e '.[export]')")
        return None
    if system.startswith("diffusers-"):
        if not (_has("torch") and _has("diffusers") and _has("transformers")):
            return "torch/diffusers/transformers are not installed (pip install -e '.[export]')"
        if system.startswith("diffusers-compile-"):
            if not compile_:
                return "torch.compile takes minutes to compile the transformer; pass --compile to include it"
            if device == "cpu" and not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
                return "torch.compile (inductor) needs a C++ compiler on CPU and none is on PATH"
        return None
    from sd3trt.errors import Sd3trtError
    from sd3trt.manifest import load_bundle

    try:
        bundle = load_bundle(bundle_dir)
    except Sd3trtError as e:
        return f"no usable bundle: {e}"
    if system.startswith("sd3trt-ort"):
        if not _has("onnxruntime"):
            return "onnxruntime is not installed"
        if bundle.dtype == "bf16":
            return ("ONNX Runtime cannot run a bf16 bundle on CPU; the sd3trt-openvino systems run it (or pass "
                    "--dtype fp32)")
        if bundle.dtype != "fp32":
            return (f"{system} measures the fp32 bundle on ONNX Runtime and this bundle is {bundle.dtype} "
                    "(pass --dtype fp32)")
    if "-int8" in system:
        why = _int8_skip(system, bundle)
        if why:
            return why
    if system in OPENVINO:
        why = openvino_skip(system, bundle)
        if why:
            return why
    if system == "sd3trt-trt":
        if not gpu_present():
            return "TensorRT needs an NVIDIA GPU and none is present on this machine"
        if not (_has("tensorrt") or _has("tensorrt_rtx")):
            return "neither tensorrt nor tensorrt_rtx is installed (pip install -e '.[engines]')"
        if not bundle.engine_builds():
            return f"the bundle has no TensorRT engines; build them with `sd3trt build --bundle {bundle.root}`"
    return None


def _int8_skip(system: str, bundle) -> str | None:
    """Why an sd3trt int8 system cannot run: a missing or failed INT8 transformer (and VAE decoder, "-vae")."""
    from sd3trt.errors import Sd3trtError
    from sd3trt.manifest import gate_passed

    for component in ("transformer", "vae_decoder") if system.endswith("-vae") else ("transformer",):
        try:
            entry = bundle.quantized_entry("int8", component)
        except Sd3trtError as e:
            return f"{e} (or pass --quantize to let the benchmark do it)"
        if not gate_passed(entry):
            return f"the bundle's int8 {component} failed its accuracy gate (recorded with --force); not benchmarked"
    return None


def openvino_skip(system: str, bundle) -> str | None:
    """Why the sd3trt OpenVINO `system` cannot run on `bundle` here; None when it can."""
    if not _has("openvino"):
        return "OpenVINO is not installed (pip install -e '.[openvino]')"
    if system == "sd3trt-openvino-bf16":
        from sd3trt.runtime.cpu_precision import passed_graphs
        from sd3trt.runtime.ov_runner import cpu_has_bf16

        if not cpu_has_bf16():
            return "this CPU has no native bf16 (AVX512_BF16 or AMX), so OpenVINO runs fp32 (sd3trt-openvino-fp32)"
        if bundle.dtype == "fp16":
            return ("the bf16 gate measures against an fp32 bundle, so OpenVINO computes this fp16 bundle in fp32 "
                    "(sd3trt-openvino-fp32); pass --dtype bf16 for bf16 compute")
        if bundle.dtype == "fp32" and not passed_graphs(bundle):  # a bf16 bundle's graphs are bf16 already
            return (f"no graph of the bundle has passed the bf16 gate; run `sd3trt gate --bundle {bundle.root}` "
                    "(or pass --quantize to let the benchmark do it)")
    return None


def bf16_note(cpu_flags: list[str], device: str) -> str | None:
    if device != "cpu":
        return None
    if "avx512_bf16" in cpu_flags or "amx_bf16" in cpu_flags:
        return None
    return ("this CPU has no native bf16 instructions (no AVX512_BF16 / AMX), so PyTorch bf16 matmuls fall back "
            "to slow conversion kernels; diffusers-bf16 is far slower than fp32 here")
