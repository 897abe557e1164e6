"""`sd3trt refit`: a LoRA into TensorRT engines built with --refit, without rebuilding them.

The plan (CPU): the merged weights of the initializers the LoRAs change (runtime/lora.py), named as in the
ONNX graph the engine was built from, which are the names TensorRT's ONNX parser gives refittable weights;
each is checked against that graph (name, shape, dtype) and, on a GPU, against the engine's own list of
refittable weights before anything is set. Applying it (GPU): deserialize, Refitter.set_named_weights,
refit_cuda_engine, serialize into a new build `<build>-lora` (or --name) beside the original, which stays.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from sd3trt.errors import Sd3trtError
from sd3trt.files import write_bytes_atomic, write_json_atomic
from sd3trt.lora import read_loras
from sd3trt.manifest import (ENGINES, build_components, build_flavour, build_option, commit_entry, engine_digests,
                             entry_file, entry_sha256, load_bundle, newest_build)
from sd3trt.runtime import lora as lora_runtime


@dataclass
class RefitPlan:
    build: str
    weights: dict[str, dict[str, np.ndarray]]  # component -> {weight name: merged array}
    loras: list

    def describe(self) -> dict[str, dict[str, tuple[tuple[int, ...], str]]]:
        """component -> {name: (shape, dtype)}: what the engine's refittable weights must match."""
        return {c: {n: (tuple(a.shape), a.dtype.name) for n, a in w.items()} for c, w in self.weights.items()}


def _pick_build(bundle, build: str | None) -> tuple[str, dict]:
    builds = bundle.engine_builds()
    if build is None:
        refittable = sorted(n for n, e in builds.items() if build_option(e, "refit"))
        if not refittable:
            raise Sd3trtError(f"bundle {bundle.root} has no engine build made with --refit; build one with "
                              f"`sd3trt build --bundle {bundle.root} --precision fp16 --refit` (on a GPU machine)")
        build = newest_build(builds, refittable)
    entry = bundle.engine_build(build)
    if not build_option(entry, "refit"):
        raise Sd3trtError(f"engine build {build!r} was not built with --refit; rebuild it with `sd3trt build ... "
                          "--refit`, or fuse the LoRA at export (`sd3trt export --lora`) and build again")
    return build, entry


def refit_plan(bundle_dir: Path, loras, build: str | None = None) -> RefitPlan:
    """Everything `sd3trt refit` checks before a GPU is touched; an Sd3trtError naming the fix otherwise."""
    bundle = load_bundle(Path(bundle_dir))
    loras = read_loras(loras)
    if not loras:
        raise Sd3trtError("name at least one --lora PATH[:SCALE]")
    build, entry = _pick_build(bundle, build)
    touched = sorted({c for lora in loras for c in lora.modules})
    for c in touched:
        files = bundle.engine_files(entry, c)
        if files is None:
            raise Sd3trtError(f"engine build {build!r} has no {c} engine, which the LoRA changes")
        meta = json.loads(files[1].read_text())
        own = bundle.component(c) if bundle.has(c) else None
        from_export = own is not None and meta["source_onnx"]["file"] == entry_file(own)
        if meta.get("precision_source") != "as-exported" or not from_export:
            raise Sd3trtError(f"the {c} engine of build {build!r} was made from a {meta.get('precision_source')} graph "
                              "whose weights are not the bundle's; fuse the LoRA before quantizing or converting: "
                              "`sd3trt export --lora PATH[:SCALE]`, then quantize/build again")
        if meta["source_onnx"]["sha256"] != entry_sha256(own):
            raise Sd3trtError(f"the {c} engine of build {build!r} was built from an earlier export; rebuild it")
    _, weights = lora_runtime.overrides(bundle, loras, {c: bundle.onnx_path(c) for c in touched})
    return RefitPlan(build, weights, loras)


def check_refittable(plan: RefitPlan, component: str, refittable: dict[str, tuple[tuple[int, ...], str] | None]) -> None:
    """Every planned weight must be one of the engine's refittable weights, with the same shape and dtype
    (None: the engine did not say). refittable: name -> (shape, numpy dtype name)."""
    for name, (shape, dtype) in sorted(plan.describe()[component].items()):
        if name not in refittable:
            raise Sd3trtError(f"{component}: weight {name!r} is not refittable in this engine (TensorRT folded or "
                              "fused it); fuse the LoRA at export (`sd3trt export --lora`) and rebuild")
        have = refittable[name]
        if have is not None and (tuple(have[0]), have[1]) != (shape, dtype):
            raise Sd3trtError(f"{component}: refittable weight {name!r} is {list(have[0])} {have[1]} in the engine, "
                              f"the LoRA plan has {list(shape)} {dtype}")


def apply_refit(bundle_dir: Path, plan: RefitPlan, name: str | None = None,
                log: Callable[[str], None] = print) -> dict:  # pragma: no cover - needs a GPU (tests marked gpu)
    """Refit the plan's engines into a new build (GPU). Returns the manifest's new engines[<name>] entry."""
    from sd3trt.engines.build import make_logger
    from sd3trt.runtime.flavour import load_flavour

    bundle = load_bundle(Path(bundle_dir))
    src = bundle.engine_build(plan.build)
    name = name or f"{plan.build}-lora"
    fl = load_flavour(build_flavour(src))
    trt, logger = fl.trt, make_logger(fl.trt)
    out_dir = bundle.root / "engines" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    components = {}
    for c, v in build_components(src).items():
        engine_path, meta_path = bundle.engine_files(src, c)
        meta = json.loads(meta_path.read_text())
        engine_rel, meta_rel = f"engines/{name}/{c}.engine", f"engines/{name}/{c}.json"
        if c in plan.weights:
            runtime = trt.Runtime(logger)
            engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
            refitter = trt.Refitter(engine, logger)
            check_refittable(plan, c, {n: None for n in refitter.get_all_weights()})
            for wname, arr in plan.weights[c].items():
                if not refitter.set_named_weights(wname, trt.Weights(arr)):
                    raise Sd3trtError(f"{c}: TensorRT refused the refit weight {wname!r}")
            if not refitter.refit_cuda_engine():
                raise Sd3trtError(f"{c}: TensorRT could not refit the engine; rebuild with the LoRA fused at export")
            data = bytes(memoryview(engine.serialize()))
            write_bytes_atomic(bundle.root / engine_rel, data)
            meta.update(engine=engine_rel, engine_sha256=hashlib.sha256(data).hexdigest(), engine_bytes=len(data),
                        build=name, loras=[lora.record() for lora in plan.loras if c in lora.modules])
            log(f"{c}: refit {len(plan.weights[c])} weight(s) into {engine_rel}")
        else:
            shutil.copyfile(engine_path, bundle.root / engine_rel)
            meta.update(engine=engine_rel, build=name)
        write_json_atomic(bundle.root / meta_rel, meta)
        components[c] = {**v, "engine": engine_rel, "metadata": meta_rel, "engine_sha256": meta["engine_sha256"]}

    entry = {**src, "components": components, "files": engine_digests(components),
             "refit_from": plan.build, "loras": [lora.record() for lora in plan.loras],
             "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    in_place = {v["metadata"]: bundle.root / v["metadata"] for v in components.values()}
    return commit_entry(bundle.root, ENGINES, name, in_place, entry)
