"""LoRA files, stdlib only: the PATH[:SCALE] grammar, the safetensors container and the SD3 key names.

Shared by the export (which fuses LoRAs into the weights it exports) and the runtime (which merges them
into the ONNX initializers at load time). A LoRA file holds, per linear module, lora_A [rank, in] and
lora_B [out, rank] (diffusers/PEFT naming; `lora.down`/`lora.up` too) and optionally `<module>.alpha`.
Merge rule (PEFT's, which diffusers' `fuse_lora(lora_scale=s)` applies):
    W' = W + sum_i s_i * (alpha_i / rank_i) * (B_i @ A_i)        alpha defaults to the rank
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

from sd3trt.errors import Sd3trtError

# Prefix of a key in diffusers' SD3 LoRA files -> bundle component.
PREFIXES = {"transformer.": "transformer", "text_encoder.": "clip_l", "text_encoder_2.": "clip_g",
            "base_model.model.": "transformer"}
KINDS = (("A", (".lora_A.weight", ".lora_A.default.weight", ".lora.down.weight", ".lora_down.weight")),
         ("B", (".lora_B.weight", ".lora_B.default.weight", ".lora.up.weight", ".lora_up.weight")),
         ("alpha", (".alpha",)))
COMPONENTS = ("transformer", "clip_l", "clip_g")  # what a LoRA can change
LORA_MAP_KEY = "lora_map"  # in a component's manifest entry: file of {module: {initializer, transposed, shape}}
DTYPES = ("F64", "F32", "F16", "BF16")
DESCRIBE = {"transformer": "transformer", "clip_l": "CLIP-L text encoder (text_encoder)",
            "clip_g": "CLIP-G text encoder (text_encoder_2)"}


@dataclass(frozen=True)
class LoraSpec:
    path: Path
    scale: float = 1.0


@dataclass(frozen=True)
class Tensor:
    """A safetensors entry: dtype word (F32, F16, BF16, F64), shape and its raw little-endian bytes."""
    dtype: str
    shape: tuple[int, ...]
    data: bytes


@dataclass
class LoraFile:
    """One LoRA file: per component, module -> {"A": Tensor, "B": Tensor[, "alpha": Tensor]}."""
    path: Path
    scale: float
    sha256: str
    modules: dict[str, dict[str, dict[str, Tensor]]] = field(default_factory=dict)

    @property
    def components(self) -> list[str]:
        return sorted(self.modules)

    metadata: dict = field(default_factory=dict)  # diffusers' lora_adapter_metadata: {"transformer.lora_alpha": ...}

    def scaling(self, component: str, module: str) -> float:
        """alpha / rank of one module, as PEFT computes it: the file's `<module>.alpha` entry, else diffusers'
        saved LoraConfig (lora_alpha, alpha_pattern, use_rslora), else alpha = rank (scaling 1)."""
        p = self.modules[component][module]
        rank = p["A"].shape[0]
        alpha, rslora = float(rank), False
        if "alpha" in p:
            alpha = _scalar(p["alpha"])
        else:
            prefix = {"transformer": "transformer", "clip_l": "text_encoder", "clip_g": "text_encoder_2"}[component]
            meta = {k[len(prefix) + 1:]: v for k, v in self.metadata.items() if k.startswith(prefix + ".")}
            if "lora_alpha" in meta:
                alpha = float(meta["lora_alpha"])
            for pattern, value in (meta.get("alpha_pattern") or {}).items():
                if module == pattern or module.endswith("." + pattern):
                    alpha = float(value)
            rslora = bool(meta.get("use_rslora"))
        return alpha / (math.sqrt(rank) if rslora else rank)

    def record(self) -> dict:
        """What a manifest records of it."""
        return {"file": self.path.name, "sha256": self.sha256, "scale": self.scale, "components": self.components}


def _scalar(t: Tensor) -> float:
    fmt = {"F64": "<d", "F32": "<f", "F16": "<e"}.get(t.dtype)
    if fmt is None:  # BF16: the high half of a float32
        return struct.unpack("<f", b"\0\0" + t.data[:2])[0]
    return struct.unpack(fmt, t.data[:struct.calcsize(fmt)])[0]


def check_scale(value, what: str = "LoRA scale") -> float:
    fix = "write PATH:SCALE with a finite SCALE such as 0.8"
    if isinstance(value, bool):
        raise Sd3trtError(f"{what} {value!r} is not a finite number; {fix}")
    try:
        scale = float(value)
    except (TypeError, ValueError):
        raise Sd3trtError(f"{what} {value!r} is not a finite number; {fix}") from None
    if not math.isfinite(scale):
        raise Sd3trtError(f"{what} {value!r} is not a finite number; {fix}")
    return scale


def parse_arg(text: str) -> LoraSpec:
    """'PATH[:SCALE]' (a command-line --lora) -> LoraSpec; SCALE defaults to 1."""
    text = str(text)
    head, sep, tail = text.rpartition(":")
    if sep and head and "/" not in tail and not tail.endswith(".safetensors"):
        return LoraSpec(Path(head), check_scale(tail))
    return LoraSpec(Path(text), 1.0)


def as_spec(item) -> LoraSpec:
    """A LoraSpec, 'PATH[:SCALE]' string, Path or (path, scale) pair -> LoraSpec."""
    if isinstance(item, LoraSpec):
        return LoraSpec(Path(item.path), check_scale(item.scale))
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return LoraSpec(Path(item[0]), check_scale(item[1]))
    if isinstance(item, Path):
        return LoraSpec(item, 1.0)
    if isinstance(item, str):
        return parse_arg(item)
    raise Sd3trtError(f"a LoRA is a path, 'PATH:SCALE' or (path, scale), got {type(item).__name__}")


def read_safetensors(path: Path, metadata: dict | None = None) -> dict[str, Tensor]:
    """Every tensor of a .safetensors file; an Sd3trtError when the file is not one. `metadata`, when given,
    receives the header's __metadata__ strings."""
    path = Path(path)
    bad = f"LoRA file {path} is not a safetensors file"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise Sd3trtError(f"cannot read LoRA file {path} ({e.strerror or e})") from None
    if len(raw) < 8:
        raise Sd3trtError(f"{bad} (too short); save the LoRA with safetensors")
    (n,) = struct.unpack("<Q", raw[:8])
    try:
        if 8 + n > len(raw):
            raise ValueError
        header = json.loads(raw[8:8 + n].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise Sd3trtError(f"{bad} (no valid header); save the LoRA with safetensors") from None
    meta = header.pop("__metadata__", None)
    if metadata is not None and isinstance(meta, dict):
        metadata.update(meta)
    body = raw[8 + n:]
    out = {}
    for name, info in header.items():
        try:
            dtype, (start, end) = info["dtype"], info["data_offsets"]
            shape = tuple(int(d) for d in info["shape"])
            size = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}.get(dtype)
            if size is None:
                raise Sd3trtError(f"{bad.replace('is not a safetensors file', 'holds')} tensor {name!r} of type "
                                  f"{dtype}; a LoRA's weights are floats (F32, F16, BF16, F64)")
            if not 0 <= start <= end <= len(body) or end - start != size * math.prod(shape):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise Sd3trtError(f"{bad} (tensor {name!r} is unreadable)") from None
        out[name] = Tensor(dtype, shape, body[start:end])
    return out


def read_lora(spec: LoraSpec) -> LoraFile:
    """Read a LoRA file and group its keys by component and module; unknown key names are an error."""
    path = Path(spec.path)
    if not path.is_file():
        raise Sd3trtError(f"LoRA file {path} does not exist")
    header_meta: dict = {}
    tensors = read_safetensors(path, header_meta)
    lora = LoraFile(path, spec.scale, hashlib.sha256(path.read_bytes()).hexdigest())
    try:
        adapter = json.loads(header_meta.get("lora_adapter_metadata") or "{}")
        lora.metadata = adapter if isinstance(adapter, dict) else {}
    except ValueError:
        raise Sd3trtError(f"LoRA {path.name}: its lora_adapter_metadata is not valid JSON") from None
    unknown = []
    for key, t in tensors.items():
        comp, module, kind = classify(key)
        if comp is None:
            unknown.append(key)
        else:
            lora.modules.setdefault(comp, {}).setdefault(module, {})[kind] = t
    if unknown:
        kohya = any(k.startswith(("lora_unet_", "lora_te")) for k in unknown)
        hint = (" (kohya naming: convert it to diffusers naming first)" if kohya else
                "; an SD3 LoRA in diffusers/PEFT naming has keys like "
                "transformer.transformer_blocks.0.attn.to_q.lora_A.weight")
        raise Sd3trtError(f"LoRA {path.name} is not an SD3 LoRA: {len(unknown)} unknown key(s), e.g. "
                          f"{sorted(unknown)[0]!r}{hint}")
    if not lora.modules:
        raise Sd3trtError(f"LoRA {path.name} holds no LoRA weights")
    for comp, modules in lora.modules.items():
        for module, p in modules.items():
            for need in ("A", "B"):
                if need not in p:
                    raise Sd3trtError(f"LoRA {path.name}: {comp} module {module} has no lora_{need}")
            a, b = p["A"].shape, p["B"].shape
            if len(a) != 2 or len(b) != 2 or a[0] != b[1]:
                raise Sd3trtError(f"LoRA {path.name}: {comp} module {module} has lora_A {list(a)} and lora_B "
                                  f"{list(b)}, which do not make a linear LoRA")
    return lora


def classify(key: str) -> tuple[str | None, str | None, str | None]:
    """(component, module, "A" | "B" | "alpha") of a LoRA key, or Nones."""
    for prefix in sorted(PREFIXES, key=len, reverse=True):
        if key.startswith(prefix):
            rest = key[len(prefix):]
            for kind, suffixes in KINDS:
                for s in suffixes:
                    if rest.endswith(s) and len(rest) > len(s):
                        return PREFIXES[prefix], rest[: -len(s)], kind
            break
    return None, None, None


def check_against(loras: list[LoraFile], maps: dict[str, dict | None], where: str) -> None:
    """Refuse, before anything is written or loaded, LoRAs whose components or modules the target lacks.
    maps: component -> {module: {"shape": [out, in], ...}} of its linear weights (None: none recorded)."""
    for lora in loras:
        for comp, modules in lora.modules.items():
            if comp not in maps:
                raise Sd3trtError(f"LoRA {lora.path.name} changes the {DESCRIBE.get(comp, comp)}, which {where} does "
                                  "not have; use a LoRA without it, or a model/bundle that has that encoder")
            wmap = maps[comp]
            if wmap is None:
                raise Sd3trtError(f"{where} records no weight names for its {comp}; re-export it with this sd3trt to "
                                  "load LoRAs at run time, or fuse the LoRA with `sd3trt export --lora`")
            for module, p in sorted(modules.items()):
                if module not in wmap:
                    raise Sd3trtError(f"LoRA {lora.path.name} is not for this model: its {comp} has no linear "
                                      f"weight {module!r}")
                if "initializer" in wmap[module] and wmap[module]["initializer"] is None:
                    raise Sd3trtError(f"the export folded the weight of {comp} {module} into other constants, so "
                                      f"LoRA {lora.path.name} cannot be merged at load time; fuse it with "
                                      "`sd3trt export --lora PATH[:SCALE]`")
                want, got = tuple(wmap[module]["shape"]), (p["B"].shape[0], p["A"].shape[1])
                if got != want:
                    raise Sd3trtError(f"LoRA {lora.path.name} is not for this model: {comp} {module} is "
                                      f"{list(want)} (out, in), the LoRA makes {list(got)}")


def read_loras(items) -> list[LoraFile]:
    return [read_lora(as_spec(i)) for i in items or ()]


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of a safetensors file, from its header alone."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: tuple(v["shape"]) for k, v in header.items()}


def linear_shapes(folder: Path) -> dict[str, dict]:
    """{module: {"shape": [out, in]}} of every 2-D `.weight` in a diffusers/transformers model folder."""
    shapes = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        shapes.update(safetensors_shapes(f))
    return {k[: -len(".weight")]: {"shape": list(s)} for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2}
