"""LoRA at load time, in numpy: the merged weights of the initializers a LoRA changes.

The files are read by sd3trt.lora (stdlib); the graph's base weights are read here with a minimal protobuf
walk (no onnx package, no torch); the export recorded, per diffusers module, the initializer holding its
weight and whether it is stored transposed (MatMul takes [in, out]). The session then loads with those
initializers overridden (runners.OrtRunner). W' = W + sum_i s_i * (alpha_i / rank_i) * (B_i @ A_i).
"""

from __future__ import annotations

import json
import math
import mmap
from pathlib import Path

import numpy as np

from sd3trt.errors import Sd3trtError
from sd3trt.lora import LoraFile, Tensor, check_against, read_loras
from sd3trt.runtime.bf16 import bf16_bits_to_f32

QUANTIZED_FIX = ("a LoRA cannot be applied to a quantized transformer at load time; fuse it before quantizing: "
                 "`sd3trt export --lora PATH[:SCALE] ...` then `sd3trt quantize`")


def to_array(t: Tensor) -> np.ndarray:
    if t.dtype == "BF16":
        return bf16_bits_to_f32(np.frombuffer(t.data, "<u2")).reshape(t.shape)
    return np.frombuffer(t.data, {"F64": "<f8", "F32": "<f4", "F16": "<f2"}[t.dtype]).reshape(t.shape)


def delta(lora: LoraFile, component: str, module: str) -> np.ndarray:
    """scale * scaling * (B @ A) (scaling: alpha / rank, LoraFile.scaling), float32 [out, in], in PEFT's order of operations."""
    p = lora.modules[component][module]
    a, b = to_array(p["A"]).astype(np.float32), to_array(p["B"]).astype(np.float32)
    return (b @ a) * np.float32(lora.scaling(component, module) * lora.scale)


def weight_maps(bundle) -> dict[str, dict | None]:
    """component -> its recorded weight map (None when the export recorded none), for the bundle's components."""
    maps = {}
    for comp in bundle.component_names():
        path = bundle.lora_map_path(comp)
        maps[comp] = json.loads(path.read_text()) if path else None
    return maps


def read_for(bundle, backend: str, items, transformer_precision: str | None, custom_files: dict) -> list[LoraFile]:
    """The LoRAs Img2Img(loras=...) was given, read; or a refusal (TensorRT engines, a quantized transformer,
    caller-supplied graphs) naming the fix. Runs before any graph is chosen or loaded."""
    if not items:
        return []
    if isinstance(items, (str, Path)):
        items = [items]
    if backend == "tensorrt":
        raise Sd3trtError("TensorRT engines take a LoRA by refitting an engine built with --refit (`sd3trt refit "
                          f"--bundle {bundle.root} --lora PATH[:SCALE]`), or fuse it at export with "
                          "`sd3trt export --lora`; load-time LoRAs are for the ONNX Runtime backends")
    if backend == "openvino":
        raise Sd3trtError("load-time LoRAs run on the ONNX Runtime backends; use --backend onnxruntime, or fuse the "
                          "LoRA at export with `sd3trt export --lora` and run that bundle on openvino")
    loras = read_loras(items)
    touched = {c for lora in loras for c in lora.modules}
    if "transformer" in touched and transformer_precision not in (None, "fp32"):
        raise Sd3trtError(QUANTIZED_FIX)
    foreign = sorted(touched & set(custom_files))
    if foreign:
        raise Sd3trtError(f"a load-time LoRA changes the bundle's own {foreign[0]} graph, not one passed in "
                          "onnx_files; fuse it into that graph instead")
    return loras


def overrides(bundle, items, onnx_files: dict) -> tuple[list[LoraFile], dict[str, dict[str, np.ndarray]]]:
    """(the LoRAs read, {component: {initializer: merged weight}}) for a bundle; Sd3trtError when one does not fit."""
    loras = items if all(isinstance(i, LoraFile) for i in items) else read_loras(items)
    if not loras:
        return [], {}
    maps = weight_maps(bundle)
    check_against(loras, maps, f"bundle {bundle.root}")
    out = {}
    for comp in sorted({c for lora in loras for c in lora.modules}):
        out[comp] = merged_initializers(loras, comp, maps[comp], onnx_files[comp])
    return loras, out


# ---------------------------------------------------------------- ONNX initializers, numpy-only

_ONNX_DTYPES = {1: np.float32, 10: np.float16, 11: np.float64, 16: "bf16"}


def _varint(buf, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value or (offset, length)) of one protobuf message in buf[start:end]."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos)
        num, wire = tag >> 3, tag & 7
        if wire == 0:
            val, pos = _varint(buf, pos)
            yield num, wire, val
        elif wire == 2:
            n, pos = _varint(buf, pos)
            yield num, wire, (pos, n)
            pos += n
        elif wire == 1:
            yield num, wire, buf[pos:pos + 8]
            pos += 8
        elif wire == 5:
            yield num, wire, buf[pos:pos + 4]
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def read_initializers(path: Path, names) -> dict[str, np.ndarray]:
    """The named initializers of an ONNX file (raw or external data), as numpy arrays (copies)."""
    path, wanted, found = Path(path), set(names), {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for num, wire, val in _fields(buf, 0, len(buf)):
            if num != 7 or wire != 2:  # ModelProto.graph
                continue
            for gnum, gwire, gval in _fields(buf, val[0], val[0] + val[1]):
                if gnum == 5 and gwire == 2:  # GraphProto.initializer
                    t = _tensor(buf, *gval, path.parent, wanted)
                    if t is not None:
                        found[t[0]] = t[1]
    missing = wanted - set(found)
    if missing:
        raise Sd3trtError(f"{path} has no initializer {sorted(missing)[0]!r}; re-run `sd3trt export`")
    return found


def _tensor(buf, start: int, length: int, folder: Path, wanted: set):
    dims, dtype, name, raw, external, floats = [], None, None, None, {}, None
    for num, wire, val in _fields(buf, start, start + length):
        if num == 8:
            name = bytes(buf[val[0]:val[0] + val[1]]).decode()
            if name not in wanted:
                return None
        elif num == 1:
            if wire == 2:
                p, e = val[0], val[0] + val[1]
                while p < e:
                    d, p = _varint(buf, p)
                    dims.append(d)
            else:
                dims.append(val)
        elif num == 2:
            dtype = val
        elif num == 9:
            raw = bytes(buf[val[0]:val[0] + val[1]])
        elif num == 4 and wire == 2:
            floats = bytes(buf[val[0]:val[0] + val[1]])
        elif num == 13:
            kv = {}
            for knum, _, kval in _fields(buf, val[0], val[0] + val[1]):
                kv[knum] = bytes(buf[kval[0]:kval[0] + kval[1]]).decode()
            external[kv.get(1)] = kv.get(2)
    if name is None:
        return None
    np_dtype = _ONNX_DTYPES.get(dtype)
    if np_dtype is None:
        raise Sd3trtError(f"initializer {name!r} has ONNX data type {dtype}, which a LoRA cannot change")
    if external:
        with open(folder / external["location"], "rb") as f:
            f.seek(int(external.get("offset") or 0))
            size = math.prod(dims) * (2 if np_dtype in (np.float16, "bf16") else np.dtype(np_dtype).itemsize)
            raw = f.read(int(external["length"]) if "length" in external else size)
    if raw is None:
        raw = floats if floats is not None else b""
        np_dtype = np.float32 if dtype == 1 else np_dtype
    if np_dtype == "bf16":
        raise Sd3trtError(f"initializer {name!r} is bf16; load-time LoRA needs an fp32 or fp16 bundle")
    arr = np.frombuffer(raw, np.dtype(np_dtype).newbyteorder("<")).reshape(dims).copy()
    return name, arr


def merged_initializers(loras: list[LoraFile], component: str, wmap: dict, onnx_path: Path) -> dict[str, np.ndarray]:
    """{initializer name: merged weight} of `component` (in the initializer's layout and dtype)."""
    deltas: dict[str, np.ndarray] = {}
    for lora in loras:
        for module in lora.modules.get(component, {}):
            d = delta(lora, component, module)
            deltas[module] = deltas[module] + d if module in deltas else d
    if not deltas:
        return {}
    names = {wmap[m]["initializer"]: m for m in deltas}
    base = read_initializers(onnx_path, names)
    out = {}
    for name, w in base.items():
        module = names[name]
        d = deltas[module].T if wmap[module]["transposed"] else deltas[module]
        if w.shape != d.shape:
            raise Sd3trtError(f"{onnx_path}: initializer {name} is {list(w.shape)}, the recorded map says "
                              f"{list(d.shape)}; re-run `sd3trt export`")
        out[name] = np.ascontiguousarray((w.astype(np.float32) + d).astype(w.dtype))
    return out
