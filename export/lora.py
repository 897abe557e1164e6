"""LoRA at export: fuse into the torch module before export, and record where each linear weight lands.

Fusing follows PEFT's merge (what diffusers' `load_lora_weights` + `fuse_lora(lora_scale=s)` does):
W += (B @ A) * (s * alpha / rank), in float32, then cast to the export dtype. The weight map, written
beside the graph as onnx/<component>.lora.json, names per diffusers module the initializer holding its
weight and whether it is stored transposed, so the runtime can merge a LoRA at load time.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from sd3trt.lora import COMPONENTS, LoraFile, Tensor

WRAPPER_PREFIX = {"transformer": "transformer.", "clip_l": "model.", "clip_g": "model."}


def _tensor(t: Tensor) -> torch.Tensor:
    if t.dtype == "BF16":
        arr = (np.frombuffer(t.data, "<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        arr = np.frombuffer(t.data, {"F64": "<f8", "F32": "<f4", "F16": "<f2"}[t.dtype])
    return torch.from_numpy(arr.astype(np.float32).reshape(t.shape))


@torch.no_grad()
def fuse(model: torch.nn.Module, component: str, loras: list[LoraFile]) -> int:
    """Fuse every LoRA's modules of `component` into `model` (the unwrapped diffusers/transformers module).
    The deltas of several LoRAs are summed in float32 and added once (one rounding in fp16, as at load time)."""
    deltas: dict[str, torch.Tensor] = {}
    for lora in loras:
        for module, p in sorted(lora.modules.get(component, {}).items()):
            d = (_tensor(p["B"]) @ _tensor(p["A"])) * (lora.scale * lora.scaling(component, module))
            deltas[module] = deltas[module] + d if module in deltas else d
    for module, d in deltas.items():
        w = model.get_submodule(module).weight
        w.data = (w.data.float() + d).to(w.dtype)
    return len(deltas)


def weight_map(wrapped: torch.nn.Module, component: str, onnx_path: Path) -> dict:
    """{module: {"initializer", "transposed", "shape"}} for each nn.Linear of the exported module whose weight
    is one initializer of the graph, found by name or by content (W or W.T). Weights that were folded into
    others, or whose bytes occur more than once, get initializer None (a load-time LoRA on them is refused)."""
    import onnx
    from onnx import numpy_helper

    prefix = WRAPPER_PREFIX[component]
    if any(p.dtype == torch.bfloat16 for p in wrapped.parameters()):
        return {}  # numpy has no bf16; bf16 bundles run on TensorRT, which refits instead
    # Names and shapes come from the graph alone; the weights' bytes are read (one tensor at a time) only
    # when a weight is not found by name, so a multi-GB graph is never loaded whole.
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    by_name = {init.name: tuple(init.dims) for init in graph.initializer if len(init.dims) == 2}
    by_bytes: dict = {}

    def content_index() -> dict:
        if not by_bytes:
            for init in graph.initializer:
                if len(init.dims) == 2:
                    arr = numpy_helper.to_array(init, base_dir=str(Path(onnx_path).parent))
                    key = (arr.shape, arr.dtype.str, hashlib.sha256(np.ascontiguousarray(arr).tobytes()).digest())
                    by_bytes.setdefault(key, []).append(init.name)
            by_bytes.setdefault(None, [])
        return by_bytes

    found, used = {}, {}
    for name, layer in wrapped.named_modules():
        if not isinstance(layer, torch.nn.Linear) or not name.startswith(prefix):
            continue
        module = name[len(prefix):]
        w = layer.weight.detach().cpu().numpy()
        hit = None
        if by_name.get(name + ".weight") == w.shape:
            hit = (name + ".weight", False)
        else:
            for arr, transposed in ((w, False), (w.T, True)):
                key = (arr.shape, arr.dtype.str, hashlib.sha256(np.ascontiguousarray(arr).tobytes()).digest())
                names = content_index().get(key, [])
                if len(names) == 1:
                    hit = (names[0], transposed)
                    break
        if hit is not None:
            used.setdefault(hit[0], []).append(module)
        found[module] = {"initializer": hit and hit[0], "transposed": bool(hit and hit[1]), "shape": list(w.shape)}
    for entry in found.values():  # not one initializer of its own: recorded, so a load-time LoRA names why
        if entry["initializer"] is not None and len(used[entry["initializer"]]) != 1:
            entry["initializer"] = None
    return dict(sorted(found.items()))


def write_weight_map(wrapped, component: str, onnx_path: Path, dest: Path) -> Path | None:
    if component not in COMPONENTS:
        return None
    dest.write_text(json.dumps(weight_map(wrapped, component, onnx_path), indent=0, sort_keys=True))
    return dest
