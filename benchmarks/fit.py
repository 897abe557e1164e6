"""Whether a system can hold the model in this machine's memory, decided before it starts (a skip with a
sentence, not an out-of-memory kill half an hour in).

A system's resident weights are the model's parameters at the precision it keeps them in:

  diffusers-*-fp32 / -bf16      every component in fp32 / bf16 (torch_dtype), whatever the files hold
  optimum-intel-openvino        the model's own precision (its IR export keeps it: load_in_8bit=False)
  optimum-intel-openvino-int8   8-bit weights
  sd3trt-*                      the bundle's float type; an INT8 transformer / VAE decoder in 8 bits;
                                low-memory mode holds one component at a time (the largest counts)

plus NEED_FACTOR of that and NEED_BASE for activations, libraries and the interpreter, against the memory
available (MemAvailable) when the bench starts: systems run one after another, so each has it to itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

GIB = 1024 ** 3
NEED_FACTOR = 1.1
NEED_BASE = GIB // 2
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
FILE_DTYPES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}
T5 = "text_encoder_3"  # the diffusers component of T5-XXL: most of SD3's parameters
# The bundle's components and the model directory's component each comes from.
SOURCES = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": T5, "transformer": "transformer",
           "vae_encoder": "vae", "vae_decoder": "vae"}
# What to run instead of a system that does not fit.
INSTEAD = {"diffusers-fp32": "diffusers-bf16", "diffusers-compile-fp32": "diffusers-compile-bf16",
           "optimum-intel-openvino": "optimum-intel-openvino-int8", "sd3trt-ort-fp32": "sd3trt-ort-fp32-lowmem"}


def weights(model_dir: Path) -> dict[str, tuple[int, str]]:
    """{component directory: (parameters, float type of most of them)} of a diffusers model, read from its
    safetensors headers (nothing is loaded); {} when it has none."""
    out = {}
    for d in sorted(p for p in Path(model_dir).iterdir() if p.is_dir()):
        files = sorted(d.glob("*.safetensors"))
        plain = [f for f in files if "." not in f.name[: -len(".safetensors")]]  # not a variant (model.fp16...)
        by_type: dict[str, int] = {}
        for f in plain or files:
            with open(f, "rb") as fh:
                header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
            for name, t in header.items():
                if name != "__metadata__":
                    kind = FILE_DTYPES.get(t["dtype"], "fp32")
                    by_type[kind] = by_type.get(kind, 0) + math.prod(t["shape"])
        if by_type:
            out[d.name] = (sum(by_type.values()), max(by_type, key=by_type.get))
    return out


def available_bytes() -> int | None:
    """The memory a new process can have now (sd3trt.memory.available_mib, as the engine build's check reads it),
    in bytes; None where the system does not say."""
    from sd3trt.memory import available_mib

    mib = available_mib()
    return None if mib is None else int(mib * 2**20)


def _held(system: str, model: dict, bundle_dtype: str, without: str | None = None) -> tuple[int, str]:
    """(bytes of weights `system` holds, the precision it holds most of them in)."""
    params = {c: n for c, (n, _) in model.items() if c != without}
    if system.startswith("diffusers-"):
        prec = system.rsplit("-", 1)[1]
        return sum(params.values()) * BYTES[prec], prec
    if system.startswith("optimum-intel-"):
        if system.endswith("-int8"):
            return sum(params.values()), "8-bit weights"
        return sum(n * BYTES[model[c][1]] for c, n in params.items()), "the model's own precision"
    per = {}  # sd3trt: per bundle component
    for comp, src in SOURCES.items():
        if src in params:
            share = params[src] // 2 if src == "vae" else params[src]  # the VAE: encoder and decoder
            int8 = "-int8" in system and (comp == "transformer" or (comp == "vae_decoder" and system.endswith("-vae")))
            per[comp] = share * (1 if int8 else BYTES[bundle_dtype])
    held = max(per.values(), default=0) if system.endswith("-lowmem") else sum(per.values())
    return held, bundle_dtype


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n < 10 * GIB else f"{n / GIB:.0f} GiB"


def _count(params: int) -> str:
    return f"{params / 1e9:.1f} B parameters" if params >= 1e9 else f"{params / 1e6:.1f} M parameters"


def need_bytes(system: str, model: dict, bundle_dtype: str, without: str | None = None) -> int:
    return int(_held(system, model, bundle_dtype, without)[0] * NEED_FACTOR + NEED_BASE)


def skip_reason(system: str, model: dict, bundle_dtype: str, available: int | None, label: str) -> str | None:
    """None when `system` would fit in `available` bytes (or nothing is known); else one sentence saying what it
    needs, what is here and what would fit. model: weights(model_dir); label: the model's name."""
    if not model or available is None:
        return None
    need = need_bytes(system, model, bundle_dtype)
    if need <= available:
        return None
    held, prec = _held(system, model, bundle_dtype)
    with_t5 = " with T5" if T5 in model else ""
    text = (f"{system} needs ~{_gib(need)} for {label}{with_t5} ({_count(sum(n for n, _ in model.values()))}, "
            f"{_gib(held)} of weights in {prec}); {_gib(available)} is available here")
    fits = []
    alt = INSTEAD.get(system)
    if alt and need_bytes(alt, model, bundle_dtype) <= available:
        fits.append(f"run {alt} (~{_gib(need_bytes(alt, model, bundle_dtype))})")
    if T5 in model and need_bytes(system, model, bundle_dtype, without=T5) <= available:
        fits.append(f"without T5 (~{_gib(need_bytes(system, model, bundle_dtype, without=T5))})")
    return text + (": " + " or ".join(fits) if fits else ": it needs a machine with more memory")


def summary(model: dict, available: int | None, label: str) -> str:
    """One line for the log: the model's size and the memory the systems have here."""
    params = sum(n for n, _ in model.values())
    here = "unknown" if available is None else _gib(available)
    return (f"{label}: {_count(params)} ({_gib(params * 2)} in 16 bits, {_gib(params * 4)} in fp32); memory "
            f"available for each system: {here}")
