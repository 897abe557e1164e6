"""`sd3trt export`: a diffusers SD3 model directory -> a self-describing bundle (ONNX + manifest.json).

Each finished component leaves a sidecar `onnx/<name>.json` (its manifest entry with a fingerprint
of its inputs). A re-run reuses components whose fingerprint and files still match; the manifest is
written last, atomically, so an interrupted export never leaves one that points to a partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import sd3trt
from sd3trt.errors import Sd3trtError
from sd3trt.memory import peak_rss_mib, reset_peak_rss
from sd3trt.manifest import FORMAT, FORMAT_VERSION, MANIFEST, sha256_file, update_manifest, write_json_atomic
from sd3trt import lora as lora_files
from sd3trt import precision as words
from sd3trt.spec import COMPONENT_SOURCES, COMPONENTS, TOKENIZER_SOURCES, component_specs, read_model_facts
from sd3trt.spec import fp32_rules as spec_rules

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _fingerprint(model_dir: Path, component: str, dtype: str, opset: int, loras: list | None = None,
                 fp32: list | None = None) -> str:
    """Hash of everything the component's export depends on: source files, options, LoRAs fused, fp32 rules,
    exporter version."""
    import torch

    h = hashlib.sha256(f"{component}|{dtype}|{opset}|{sd3trt.__version__}|{torch.__version__}|lora-map-1".encode())
    if loras:
        h.update(json.dumps(loras, sort_keys=True).encode())
    if fp32:
        h.update(json.dumps(fp32, sort_keys=True).encode())
    src = model_dir / COMPONENT_SOURCES[component]
    for p in sorted(src.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(src)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _reusable(out: Path, component: str, fingerprint: str) -> dict | None:
    side = out / "onnx" / f"{component}.json"
    try:
        entry = json.loads(side.read_text())
    except (OSError, ValueError):
        return None
    if entry.get("fingerprint") != fingerprint:
        return None
    for rel, digest in entry["files"].items():
        if not (out / rel).is_file() or sha256_file(out / rel) != digest:
            return None
    return entry


def _save_tokenizer(model_dir: Path, out: Path, name: str, max_length: int) -> dict:
    """Load the tokenizer with transformers and save it again: this writes tokenizer.json even for
    checkpoints that ship only vocab.json/merges.txt, in the form the runtime's `tokenizers` reads."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    src = model_dir / TOKENIZER_SOURCES[name]
    cls = T5TokenizerFast if name == "t5" else CLIPTokenizer
    try:
        tok = cls.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise Sd3trtError(f"cannot load the {name} tokenizer from {src} ({str(e).splitlines()[0]})") from None
    dest = out / "tokenizers" / name
    with tempfile.TemporaryDirectory(dir=out, prefix=f".tok-{name}.") as tmp:
        tok.save_pretrained(tmp)
        dest.mkdir(parents=True, exist_ok=True)
        files = {}
        for fname in TOKENIZER_FILES:
            if (Path(tmp) / fname).is_file():
                os.replace(Path(tmp) / fname, dest / fname)
                files[f"tokenizers/{name}/{fname}"] = sha256_file(dest / fname)
    if f"tokenizers/{name}/tokenizer.json" not in files:
        raise Sd3trtError(f"transformers wrote no tokenizer.json for {name}; the runtime needs it")
    return {"dir": f"tokenizers/{name}", "max_length": max_length, "files": files}


def _old_manifest(out: Path) -> dict:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def export_bundle(
    model_dir: Path,
    out: Path,
    dtype: str = "fp32",
    opset: int = 17,
    skip_t5: bool = False,
    overwrite: bool = False,
    components: tuple[str, ...] | None = None,
    log: Callable[[str], None] = print,
    loras: list | None = None,
    fp32_rules: dict | None = None,
    stream_bytes: int | None = None,
) -> Path:
    """loras: LoRAs to fuse into the exported weights ('PATH[:SCALE]' strings, paths, (path, scale) pairs or
    sd3trt.lora.LoraSpec), as diffusers' load_lora_weights + fuse_lora(lora_scale=SCALE) would.
    fp32_rules: {component: spec.Fp32Rule tuple} in place of the spec's rules for the model (spec.fp32_rules).
    stream_bytes: weights past this size go to external data, tensor by tensor (default: onnx_export's)."""
    from sd3trt.export.onnx_export import STREAM_BYTES, export_component

    model_dir, out = Path(model_dir), Path(out)
    words.check(dtype, words.FLOATS, "--dtype")
    facts = read_model_facts(model_dir, skip_t5=skip_t5)
    loras = lora_files.read_loras(loras)  # every LoRA checked against the model before anything is written
    if loras:
        shapes = {c: lora_files.linear_shapes(model_dir / COMPONENT_SOURCES[c]) for c in lora_files.COMPONENTS
                  if (model_dir / COMPONENT_SOURCES[c]).is_dir()}
        lora_files.check_against(loras, shapes, f"model {model_dir}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise Sd3trtError(f"{out} already exists; pass --overwrite to update it (unchanged components are kept)")
    out.mkdir(parents=True, exist_ok=True)
    old = _old_manifest(out)
    (out / MANIFEST).unlink(missing_ok=True)  # the bundle is incomplete until the new manifest lands

    specs = component_specs(facts)
    wanted = [c for c in COMPONENTS if c in specs and (components is None or c in components)]
    entries = {}
    for i, name in enumerate(wanted, 1):
        fused = [lora for lora in loras if name in lora.modules]
        records = [lora.record() for lora in fused]
        rules = fp32_rules[name] if fp32_rules is not None and name in fp32_rules else spec_rules(model_dir, name)
        kept = [{"modules": list(r.modules), "dtypes": list(r.dtypes), "upcast_by": r.upcast_by, "source": r.source}
                for r in rules]
        fp = _fingerprint(model_dir, name, dtype, opset, records, kept)
        entry = _reusable(out, name, fp)
        if entry is not None:
            log(f"[{i}/{len(wanted)}] {name}: unchanged, kept")
        else:
            log(f"[{i}/{len(wanted)}] {name}: exporting ...")
            t0 = time.perf_counter()
            exact_peak = reset_peak_rss()
            files = export_component(model_dir, facts, name, out / "onnx" / f"{name}.onnx", dtype, opset, fused,
                                     stream_bytes=STREAM_BYTES if stream_bytes is None else stream_bytes,
                                     fp32_rules=tuple(r for r in rules if dtype in r.dtypes))
            seconds, peak = time.perf_counter() - t0, peak_rss_mib()
            spec = specs[name]
            entry = {
                "file": f"onnx/{name}.onnx",
                "inputs": [t.to_dict(words.NUMPY[dtype]) for t in spec.inputs],
                "outputs": [t.to_dict(words.NUMPY[dtype]) for t in spec.outputs],
                "files": {f"onnx/{p.name}": sha256_file(p) for p in files},
                "fingerprint": fp,
                "export": {"dtype": dtype, "opset": opset, "torch_onnx": "torchscript", "seconds": round(seconds, 1),
                           # this component's own peak where the kernel can reset it, else the process's so far
                           "peak_rss_mib": round(peak) if peak else None, "peak_rss_own": exact_peak},
            }
            if records:
                entry["export"]["loras"] = records
            if kept:
                entry["export"]["fp32_modules"] = kept
            if f"onnx/{name}.lora.json" in entry["files"]:
                entry[lora_files.LORA_MAP_KEY] = f"onnx/{name}.lora.json"
            write_json_atomic(out / "onnx" / f"{name}.json", entry)
            size = sum(p.stat().st_size for p in files) / 2**20
            log(f"[{i}/{len(wanted)}] {name}: done in {seconds:.1f} s ({size:.1f} MiB, peak RSS {peak / 1024:.1f} GiB)")
        entries[name] = entry

    tokenizers = {
        "clip_l": _save_tokenizer(model_dir, out, "clip_l", facts.clip_max_length),
        "clip_g": _save_tokenizer(model_dir, out, "clip_g", facts.clip_max_length),
    }
    if facts.has_t5:
        tokenizers["t5"] = _save_tokenizer(model_dir, out, "t5", facts.t5_max_length)
    scheduler = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sd3trt_version": sd3trt.__version__,
        "dtype": dtype,
        "opset": opset,
        "source": {"model_dir": str(model_dir.resolve()), "pipeline": "StableDiffusion3Img2ImgPipeline"},
        "model": facts.to_dict(),
        "scheduler": scheduler,
        "tokenizers": tokenizers,
        "components": entries,
        "loras": [lora.record() for lora in loras],  # fused into the exported weights, in order
        # Engines stay valid only if every graph they were built from is byte-identical.
        "engines": old.get("engines", {}) if old.get("components") == entries else {},
    }
    update_manifest(out, lambda _old: manifest)
    log(f"bundle written: {out / MANIFEST}")
    return out
